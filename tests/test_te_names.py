"""The CPU build has the parameter names of the Transformer Engine build, derived from megatron-core's
own TE spec (`megatron.core.models.mamba.mamba_layer_specs.mamba_stack_spec`).

Walk the TE spec slot by slot, see which Transformer Engine module megatron puts there, and compare
the parameters that module registers (TE's public layout, the table below) with the parameters of
the module the CPU build puts in the same slot. Routed experts are not in the table: megatron gives
`SequentialMLP` and TE's grouped experts the same dist-checkpoint keys by design.
"""

import pytest

from bridge.tiny_models import build_hf_model, save_hf_model, tiny_config

# Parameters Transformer Engine's modules register (no biases: the model has add_bias_linear=False).
TE_PARAMETERS = {
    "TELayerNormColumnParallelLinear": {"layer_norm_weight", "weight"},  # TE LayerNormLinear, RMSNorm
    "TEColumnParallelLinear": {"weight"},
    "TERowParallelLinear": {"weight"},
    "TEDotProductAttention": set(),
    "TENorm": {"weight"},  # TE RMSNorm
}


def _te_name(cls) -> str:
    from megatron.core.extensions import transformer_engine as te

    for name in TE_PARAMETERS:
        if getattr(te, name, None) is cls:
            return name
    raise AssertionError(f"{cls!r} is not a Transformer Engine module of the table")


@pytest.fixture(scope="module")
def cpu_model(parallel_state, tmp_path_factory):
    from bridge import AutoBridge

    hf_dir = save_hf_model(build_hf_model(tiny_config(pattern="M*-E")), tmp_path_factory.mktemp("te") / "hf")
    return AutoBridge.from_hf_pretrained(hf_dir).to_megatron_provider().provide()


def test_cpu_build_has_the_te_spec_parameter_names(cpu_model):
    from megatron.core.extensions import transformer_engine as te
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

    from providers.megatron_imports import checkpoint_name, spec_submodules

    spec = mamba_stack_spec.submodules
    mlp = spec_submodules(spec.mlp_layer.submodules.mlp)  # a ModuleSpec (0.16.1) or a builder (0.19.2)
    layers = cpu_model.decoder.layers
    slots = [  # (module of the CPU build, the class the TE spec puts in that slot)
        (layers[0].mixer.in_proj, spec.mamba_layer.submodules.mixer.submodules.in_proj),
        (layers[0].mixer.out_proj, spec.mamba_layer.submodules.mixer.submodules.out_proj),
        (layers[1].self_attention.linear_qkv, spec.attention_layer.submodules.self_attention.submodules.linear_qkv),
        (layers[1].self_attention.core_attention, spec.attention_layer.submodules.self_attention.submodules.core_attention),
        (layers[1].self_attention.linear_proj, spec.attention_layer.submodules.self_attention.submodules.linear_proj),
        (layers[2].mlp.linear_fc1, mlp.linear_fc1),
        (layers[2].mlp.linear_fc2, mlp.linear_fc2),
        (layers[3].pre_mlp_layernorm, spec.moe_layer.submodules.pre_mlp_layernorm),
        (cpu_model.decoder.final_norm, te.TENorm),  # the hybrid stack's hard-wired final norm
    ]
    for module, te_cls in slots:
        names = {n for n, _ in module.named_parameters(recurse=False)}
        assert names == TE_PARAMETERS[_te_name(te_cls)], (type(module).__name__, _te_name(te_cls), names)
    # The Mamba mixer's own parameters are megatron's (not TE's): same in both builds. Under their
    # checkpoint keys they are the same on both megatron-core versions (0.16.1: an nn.Conv1d
    # `conv1d.weight`; 0.19.2: the mixer's own `conv1d_weight`, checkpointed as `conv1d.weight`).
    own = {checkpoint_name(f"mixer.{n}")[len("mixer."):] for n, _ in layers[0].mixer.named_parameters()}
    assert own == {"A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "norm.weight",
                   "in_proj.layer_norm_weight", "in_proj.weight", "out_proj.weight"}
    keys = {v.key for v in layers[0].mixer.sharded_state_dict(prefix="mixer.").values()}
    assert {"mixer.conv1d.weight", "mixer.conv1d.bias"} <= keys, keys  # (factories: their key)
