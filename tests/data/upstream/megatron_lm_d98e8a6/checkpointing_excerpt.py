# Verbatim from NVIDIA/Megatron-LM main at commit d98e8a64ddf34856e74b24714e3bedb2f5a39553 (2026-08-22,
# megatron/core/package_info.py 0.20.0), file megatron/training/checkpointing.py (two functions).
# Copyright (c) NVIDIA CORPORATION & AFFILIATES; Apache License 2.0 (Megatron-LM's LICENSE).
# Test data only: tests/test_upstream_layouts.py parses it (ast), nothing imports or runs it.

# lines 176-221
def check_checkpoint_args(checkpoint_args, skip_args: set[str] | None = None):
    """Ensure fixed arguments for a model are the same for the input
    arguments and the one retrieved from checkpoint."""
    args = get_args()
    skip_args = skip_args or set()

    def _compare(arg_name, old_arg_name=None, default=None):
        if arg_name in skip_args:
            return
        if old_arg_name is not None:
            ckpt_arg_name = old_arg_name
        else:
            ckpt_arg_name = arg_name
        if default is not None:
            checkpoint_value = getattr(checkpoint_args, ckpt_arg_name, default)
        else:
            checkpoint_value = getattr(checkpoint_args, ckpt_arg_name)
        args_value = getattr(args, arg_name)
        error_message = (
            '{} value from checkpoint ({}) is not equal to the input argument value ({}).'.format(
                arg_name, checkpoint_value, args_value
            )
        )
        assert checkpoint_value == args_value, error_message

    _compare('num_layers')
    _compare('hidden_size')
    _compare('num_attention_heads')
    if hasattr(args, 'gdp_num_householder'):
        _compare('gdp_num_householder', default=3)
    _compare('add_position_embedding', default=True)
    if args.vocab_file:
        _compare('max_position_embeddings')
        _compare('make_vocab_size_divisible_by')
        if not args.use_dist_ckpt:
            _compare('padded_vocab_size')
        _compare('tokenizer_type')
    if args.data_parallel_random_init:
        _compare('data_parallel_random_init')
    if args.phase_transition_iterations:
        _compare('global_batch_size')
    if get_checkpoint_version() < 3.0:
        _compare('tensor_model_parallel_size', old_arg_name='model_parallel_size')
    if get_checkpoint_version() >= 3.0 and not args.use_dist_ckpt:
        _compare('tensor_model_parallel_size')
        _compare('pipeline_model_parallel_size')


# lines 2368-2449
def _maybe_setup_gpt_to_hybrid_load(args, ckpt_args, model):
    """Detect a GPT (pure transformer) checkpoint being loaded into a HybridModel run.

    Returns ``(layer_maps, load_optim)`` where ``layer_maps`` is used to retarget
    the run's sharded state dict at the GPT checkpoint's keys (see
    ``megatron.core.dist_checkpointing.gpt_checkpoint_interop``) and ``load_optim`` is
    True when the GPT optimizer state should be translated and loaded as well.
    Returns ``(None, False)`` when checkpoint and runtime already agree. Raises
    RuntimeError for combinations that cannot be loaded.
    """
    from megatron.core.dist_checkpointing.gpt_checkpoint_interop import gpt_compatible_layer_maps
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    def _contains_hybrid_model(module):
        # Megatron-FSDP and Float16Module both retain the wrapped module under
        # ``module`` but are intentionally not handled by the regular
        # ``unwrap_model`` helper. Multimodal wrappers (e.g. LLaVAModel) attach
        # the language model under ``language_model`` instead.
        while module is not None:
            if isinstance(module, HybridModel):
                return True
            inner = getattr(module, 'language_model', None)
            if inner is not None and isinstance(inner, HybridModel):
                return True
            module = getattr(module, 'module', None)
        return False

    runtime_is_hybrid = any(_contains_hybrid_model(m) for m in model)
    ckpt_pattern = getattr(ckpt_args, 'hybrid_layer_pattern', None) or getattr(
        ckpt_args, 'hybrid_override_pattern', None
    )
    if runtime_is_hybrid == bool(ckpt_pattern):
        return None, False
    if not runtime_is_hybrid:
        raise RuntimeError(
            f'The checkpoint was saved by a hybrid model run (hybrid layer pattern '
            f'{ckpt_pattern!r}) but the current run builds a non-hybrid model. Load it '
            f'with the hybrid training entrypoint instead.'
        )

    # GPT checkpoint feeding a HybridModel run: translate the sharded state
    # dict at load time instead of converting the checkpoint on disk.
    if not args.hybrid_layer_pattern:
        raise RuntimeError(
            'Loading a GPT checkpoint into a hybrid model requires '
            '--hybrid-layer-pattern so checkpoint layers can be paired with '
            'hybrid layer positions.'
        )
    try:
        layer_maps = gpt_compatible_layer_maps(args.hybrid_layer_pattern)
    except ValueError as exc:
        raise RuntimeError(f'Cannot load a GPT checkpoint into this hybrid model: {exc}') from exc

    ckpt_num_layers = getattr(ckpt_args, 'num_layers', None)
    if ckpt_num_layers is not None and ckpt_num_layers != layer_maps.num_gpt_layers:
        raise RuntimeError(
            f'Hybrid layer pattern {args.hybrid_layer_pattern!r} pairs with a GPT '
            f'checkpoint of {layer_maps.num_gpt_layers} layers, but the checkpoint '
            f'has num_layers={ckpt_num_layers}.'
        )

    # The optimizer state is loaded unless the user opts out or the GPT run saved
    # no optimizer state. Fresh layers (e.g. Mamba) have no counterpart in the GPT
    # checkpoint, so their optimizer state stays freshly initialized; warn about it.
    load_optim = not args.no_load_optim and not getattr(ckpt_args, 'no_save_optim', False)
    if load_optim and layer_maps.fresh_init:
        print_rank_0(
            f'> WARNING: {len(layer_maps.fresh_init)} hybrid layer(s) have no GPT '
            f'counterpart (e.g. Mamba positions); their weights and optimizer state '
            f'start from a fresh initialization while the GPT-sourced attention and '
            f'MLP layers load their optimizer state. Pass --no-load-optim to start '
            f"every layer's optimizer state fresh."
        )

    print_rank_0(
        f'> loading a GPT checkpoint into the hybrid model: {layer_maps.num_gpt_layers} '
        f'GPT layers feed {len(layer_maps.attention_to_gpt)} attention and '
        f'{len(layer_maps.mlp_to_gpt)} MLP positions; {len(layer_maps.fresh_init)} '
        f'hybrid layers keep their fresh initialization'
        + ('; optimizer state will be loaded.' if load_optim else '; optimizer state starts fresh.')
    )
    return layer_maps, load_optim
