# Verbatim from Megatron-Bridge 0.6.2 (PyPI wheel megatron_bridge-0.6.2-py3-none-any.whl,
# sha256 bcb7274ab9327167c345aa24b96b95790ce5090df1945d883bdc41065d5649e2), file megatron/bridge/training/checkpointing.py (two functions).
# Copyright (c) NVIDIA CORPORATION & AFFILIATES; Apache License 2.0.
# Test data only: tests/test_upstream_layouts.py parses it (ast), nothing imports or runs it.

# lines 295-346
def read_metadata(tracker_filename: str) -> tuple[int, bool]:
    """Read the metadata from the Megatron-LM tracker file.

    Args:
        tracker_filename: Path to the tracker file.

    Returns:
        A tuple containing the iteration number and a boolean indicating if it's a release checkpoint.
    """
    iteration = 0
    release = False

    if MultiStorageClientFeature.is_enabled():
        msc = MultiStorageClientFeature.import_package()
        open_file = msc.open
    else:
        open_file = open

    with open_file(tracker_filename, "r") as f:
        metastring = f.read().strip()
        try:
            iteration = int(metastring)
        except ValueError:
            release = metastring == "release"
            if not release:
                print_rank_0("ERROR: Invalid metadata file {}. Exiting".format(tracker_filename))
                sys.exit()
    assert iteration > 0 or release, "error parsing metadata file {}".format(tracker_filename)

    # Get the max iteration retrieved across the ranks.
    if torch.distributed.is_initialized():
        iters_cuda = torch.tensor([iteration], dtype=torch.long, device="cuda")
        torch.distributed.all_reduce(iters_cuda, op=torch.distributed.ReduceOp.MAX)
        max_iter = iters_cuda[0].item()

        # We should now have all the same iteration.
        # If not, print a warning and chose the maximum
        # iteration across all ranks.
        if iteration != max_iter:
            rank = torch.distributed.get_rank()
            print_rank_0(
                "WARNING: on rank {} found iteration {} in the "
                "metadata while max iteration across the ranks "
                "is {}, replacing it with max iteration.".format(rank, iteration, max_iter),
                flush=True,
            )
    else:
        # When loading a checkpoint outside of training (for example,
        # when editing it), we might not have torch distributed
        # initialized, in this case, just assume we have the latest
        max_iter = iteration
    return max_iter, release


# lines 2626-3205
def _load_checkpoint_from_path(
    load_dir: str,
    state: GlobalState,
    model: list[MegatronModule],
    optimizer: Optional[MegatronOptimizer],
    opt_param_scheduler: Optional[Any],
    strict: bool = True,
    checkpointing_context: Optional[dict[str, Any]] = None,
    skip_load_to_model_and_opt: bool = False,
    ignore_ckpt_step: bool = False,
    pg_collection: Optional[ProcessGroupCollection] = None,
    module_name: str | None = None,
) -> tuple[int, int]:
    """Load a checkpoint from a given path.

    Args:
        load_dir: The directory containing the checkpoint.
        state: The GlobalState object.
        model: The model module(s) to load state into.
        optimizer: The optimizer instance to load state into.
        opt_param_scheduler: The scheduler instance to load state into.
        strict: Whether to enforce strict loading (see torch.nn.Module.load_state_dict).
        checkpointing_context: Dictionary to store context across loads (e.g., strategies).
        skip_load_to_model_and_opt: If True, only loads metadata (iteration, rng) but
                                      skips loading state into model and optimizer modules.
        ignore_ckpt_step: If True, ignores the ckpt_step config and loads latest checkpoint.
                          Used when loading pretrained checkpoints in PEFT scenarios.
        pg_collection: Optional ProcessGroupCollection. When provided, uses this instead of
                      extracting from model via get_pg_collection(). Required for MegatronMIMO where
                      model-level PG extraction may not reflect rank-local topology.

    Returns:
        A tuple containing:
        - iteration: The training iteration number.
        - num_floating_point_operations_so_far: The total FLOPs computed so far.
    """
    cfg = state.cfg
    model = unwrap_model(model)
    pg_collection = pg_collection or get_pg_collection(model)
    ckpt_format = cfg.checkpoint.ckpt_format

    # HuggingFace-format directories are only honored for pretrained model
    # initialization.  Resume training via ``checkpoint.load`` should use a
    # complete native Megatron checkpoint.
    if is_hf_checkpoint_dir(load_dir):
        if load_dir == cfg.checkpoint.load:
            raise ValueError(
                "checkpoint.load does not support HuggingFace-format directories. "
                "Use checkpoint.load with a native Megatron checkpoint for resume training, "
                "or use checkpoint.pretrained_checkpoint for full-model HuggingFace initialization."
            )
        print_rank_0(f" loading HuggingFace-format checkpoint from {load_dir}")
        return _load_hf_pretrained_checkpoint(
            load_dir,
            state,
            model,
            optimizer,
            skip_load_to_model_and_opt=skip_load_to_model_and_opt,
        )

    # Step 1: Load base checkpoint with rank0=True (torch_dist only)
    if ckpt_format == "torch_dist":
        state_dict, checkpoint_name, release, ckpt_type = _load_base_checkpoint(
            load_dir,
            cfg.checkpoint,
            rank0=True,
            checkpointing_context=checkpointing_context,
            ignore_ckpt_step=ignore_ckpt_step,
            cfg=cfg,
            is_megatron_mimo=False,
            pg_collection=pg_collection,
        )

    # Step 2: Initialize scaffolding
    load_kwargs = {}
    ignore_rng_state = False
    ignore_rerun_state = True
    run_config = None  # Initialize for later use

    # Step 3: Format-specific preparation
    if ckpt_format == "torch_dist":
        if state_dict is None:
            return 0, 0

        if ckpt_type == CheckpointType.LOCAL:
            # Local checkpoints don't contain run_config.yaml and checkpoint_name
            # is a CkptID tuple, not a string path.  Use current config — local
            # checkpoints always resume with the same parallelism.
            run_config = {
                "model": {
                    "tensor_model_parallel_size": cfg.model.tensor_model_parallel_size,
                    "pipeline_model_parallel_size": cfg.model.pipeline_model_parallel_size,
                    "encoder_tensor_model_parallel_size": getattr(cfg.model, "encoder_tensor_model_parallel_size", 0),
                    "encoder_pipeline_model_parallel_size": getattr(
                        cfg.model, "encoder_pipeline_model_parallel_size", 0
                    ),
                },
                "checkpoint": {
                    "save_optim": cfg.checkpoint.save_optim,
                    "save_rng": cfg.checkpoint.save_rng,
                    "fully_parallel_save": cfg.checkpoint.fully_parallel_save,
                },
            }
        else:
            # Read run_config for TP/PP compatibility checks
            run_config_filename = get_checkpoint_run_config_filename(checkpoint_name)
            if file_exists(run_config_filename):
                run_config = read_run_config(run_config_filename)
            else:
                print_rank_0("run_config.yaml not found, extracting config from legacy Megatron-LM checkpoint")
                run_config = _extract_megatron_lm_args_from_state_dict(state_dict)

        # MegatronMIMO manages per-module parallelism via MegatronMIMOParallelismConfig,
        # so there is no single global (TP, PP) to compare.  Skip the
        # compatibility check entirely for MegatronMIMO configs.
        _is_megatron_mimo = "megatron_mimo_parallelism_config" in run_config.get("model", {}) or hasattr(
            cfg.model, "megatron_mimo_parallelism_config"
        )
        if _is_megatron_mimo:
            tp_pp_match = True
            mismatch_msg = ""
        else:
            ckpt_tp_pp = (
                run_config["model"]["tensor_model_parallel_size"],
                run_config["model"]["pipeline_model_parallel_size"],
            )
            run_tp_pp = (
                cfg.model.tensor_model_parallel_size,
                cfg.model.pipeline_model_parallel_size,
            )
            tp_pp_match = ckpt_tp_pp == run_tp_pp
            mismatch_msg = "(TP, PP) mismatch after resume ({} vs {} from checkpoint)".format(run_tp_pp, ckpt_tp_pp)

        # Determine if RNG state will be loaded
        if (
            tp_pp_match
            and not release
            and not cfg.checkpoint.finetune
            and cfg.checkpoint.load_rng
            and run_config["checkpoint"]["save_rng"]
        ):
            gen_sd_rng_state = get_rng_state(
                cfg.rng.data_parallel_random_init,
                ckpt_format,
                pg_collection=pg_collection,
                module_name=module_name,
            )
        else:
            ignore_rng_state = True
            gen_sd_rng_state = None
            if not tp_pp_match:
                print_rank_0("{}: RNG state will be ignored".format(mismatch_msg))

        if ckpt_type == CheckpointType.LOCAL:
            # Local checkpoints don't store content metadata in common.pt.
            sharded_sd_metadata = _build_sharded_state_dict_metadata(
                cfg.optimizer.use_distributed_optimizer, cfg.checkpoint
            )
        else:
            sharded_sd_metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=state_dict)
        print_rank_0(f"sharded_state_dict metadata loaded from the checkpoint: {sharded_sd_metadata}")

        # Determine if optimizer state will be loaded
        if (
            not release
            and not cfg.checkpoint.finetune
            and cfg.checkpoint.load_optim
            and run_config["checkpoint"]["save_optim"]
        ):
            gen_sd_optim = optimizer
            gen_sd_opt_param_scheduler = opt_param_scheduler

            if cfg.optimizer.use_distributed_optimizer:
                if sharded_sd_metadata is None:
                    sharded_sd_metadata = {
                        "distrib_optim_sharding_type": (
                            "fully_sharded_model_space"
                            if run_config["checkpoint"]["fully_parallel_save"]
                            else "dp_zero_gather_scatter"
                        ),
                    }
                if (
                    not tp_pp_match
                    and sharded_sd_metadata["distrib_optim_sharding_type"]
                    not in DistributedOptimizer.checkpoint_fully_reshardable_formats
                ):
                    raise RuntimeError(
                        f"{mismatch_msg}: not supported for DistributedOptimizer with sharding type"
                        f" {sharded_sd_metadata['distrib_optim_sharding_type']}."
                        f" Please use `checkpoint_config.fully_parallel_save=True` for checkpoint saving."
                    )
        else:
            gen_sd_optim = None
            gen_sd_opt_param_scheduler = None

        # Determine if rerun state will be loaded
        if tp_pp_match and not release and not cfg.checkpoint.finetune and "rerun_state_machine" in state_dict:
            rerun_state_machine = get_rerun_state_machine()
            gen_sd_rerun_state = rerun_state_machine.state_dict(
                data_iterator=None, ckpt_format=ckpt_format, force=True
            )
            ignore_rerun_state = False
        else:
            gen_sd_rerun_state = None
            if not tp_pp_match:
                print_rank_0("{}: Rerun state will be ignored".format(mismatch_msg))

        if sharded_sd_metadata is None:
            sharded_sd_metadata = {}
        sharded_sd_metadata["dp_cp_group"] = pg_collection.dp_cp
        optim_sd_kwargs = dict(metadata=sharded_sd_metadata, is_loading=True)
        model_sd_kwargs = dict(metadata=sharded_sd_metadata)

        # Build sharded state dict for loading
        with contextlib.ExitStack() as stack:
            if cfg.checkpoint.finetune and hasattr(model[0], "hide_loss_modules"):
                for m in model:
                    stack.enter_context(m.hide_loss_modules())
            load_kwargs["sharded_state_dict"] = generate_state_dict(
                cfg.checkpoint,
                model,
                gen_sd_optim,
                gen_sd_opt_param_scheduler,
                gen_sd_rng_state,
                optim_sd_kwargs=optim_sd_kwargs,
                model_sd_kwargs=model_sd_kwargs,
                rerun_state=gen_sd_rerun_state,
                pg_collection=pg_collection,
            )

    elif ckpt_format == "fsdp_dtensor":
        # Handle fsdp_dtensor format

        # Resolve checkpoint path
        if is_checkpoint_iteration_directory(load_dir):
            checkpoint_name = load_dir
        else:
            tracker_filename = get_checkpoint_train_state_filename(load_dir, prefix=TRACKER_PREFIX)
            if file_exists(tracker_filename):
                train_state = read_train_state(tracker_filename)
                iteration = train_state.step
                release = False
            else:
                legacy_tracker_filename = get_checkpoint_tracker_filename(load_dir)
                if file_exists(legacy_tracker_filename):
                    iteration, release = read_metadata(legacy_tracker_filename)
                else:
                    print_rank_0(f"WARNING: could not find metadata file in {load_dir}")
                    return 0, 0
            checkpoint_name = get_checkpoint_name(load_dir, iteration, release)

        tp_pp_match = True
        run_config_filename = get_checkpoint_run_config_filename(checkpoint_name)
        if file_exists(run_config_filename):
            run_config = read_run_config(run_config_filename)
            ckpt_tp_pp = (
                run_config["model"]["tensor_model_parallel_size"],
                run_config["model"]["pipeline_model_parallel_size"],
            )
            run_tp_pp = (
                cfg.model.tensor_model_parallel_size,
                cfg.model.pipeline_model_parallel_size,
            )
            tp_pp_match = ckpt_tp_pp == run_tp_pp

        reader = _get_filesystem_reader(checkpoint_name)
        try:
            state_dict_metadata = reader.read_metadata().state_dict_metadata
        except FileNotFoundError:
            state_dict_metadata = {}

        # Decide what sections to load based on metadata and config
        gen_sd_rerun_state = {}
        gen_sd_opt_param_scheduler = None
        gen_sd_rng_state = None
        gen_sd_optim = None
        if not cfg.checkpoint.finetune:
            if "rerun_state_machine" in state_dict_metadata:
                gen_sd_rerun_state = get_rerun_state_machine().state_dict(
                    data_iterator=None, ckpt_format=ckpt_format, force=True
                )
            if cfg.checkpoint.load_rng and tp_pp_match:
                gen_sd_rng_state = get_rng_state(
                    cfg.rng.data_parallel_random_init, ckpt_format, pg_collection=pg_collection
                )
            elif cfg.checkpoint.load_rng:
                ignore_rng_state = True
                print_rank_0(
                    f"(TP, PP) mismatch after resume ({run_tp_pp} vs {ckpt_tp_pp} from checkpoint): "
                    "RNG state will be ignored"
                )
            if cfg.checkpoint.load_optim:
                gen_sd_optim = optimizer
                gen_sd_opt_param_scheduler = opt_param_scheduler

        optim_sd_kwargs = dict(
            metadata=_build_sharded_state_dict_metadata(cfg.optimizer.use_distributed_optimizer, cfg.checkpoint),
            is_loading=True,
        )

        state_dict = generate_state_dict(
            cfg.checkpoint,
            model=model,
            optimizer=gen_sd_optim,
            opt_param_scheduler=gen_sd_opt_param_scheduler,
            rng_state=gen_sd_rng_state,
            optim_sd_kwargs=optim_sd_kwargs,
            rerun_state=gen_sd_rerun_state,
            iteration=1,
            pg_collection=pg_collection,
        )
        # Store model reference for preprocessing during load
        state_dict["_model"] = model
        load_kwargs["sharded_state_dict"] = state_dict
    else:
        # Unsupported checkpoint format
        raise NotImplementedError(
            f"Checkpoint format '{ckpt_format}' is not supported. Supported formats are: 'torch_dist', 'fsdp_dtensor'"
        )

    # Apply PEFT resume filtering (common across all checkpoint formats)
    is_peft_resume = (
        cfg.peft is not None
        and cfg.checkpoint.load is not None
        and load_dir == cfg.checkpoint.load
        and load_dir != cfg.checkpoint.pretrained_checkpoint
        and not cfg.checkpoint.finetune
    )
    if is_peft_resume and "sharded_state_dict" in load_kwargs:
        load_kwargs["sharded_state_dict"] = apply_peft_adapter_filter_to_state_dict(
            load_kwargs["sharded_state_dict"], cfg.peft
        )

    # Load the checkpoint
    state_dict, checkpoint_name, release, ckpt_type = _load_base_checkpoint(
        load_dir,
        cfg.checkpoint,
        rank0=False,
        checkpointing_context=checkpointing_context,
        ignore_ckpt_step=ignore_ckpt_step,
        cfg=cfg,
        is_megatron_mimo=(_is_megatron_mimo if ckpt_format == "torch_dist" else False),
        pg_collection=pg_collection,
        **load_kwargs,
    )

    # Checkpoint not loaded
    if state_dict is None:
        return 0, 0

    # Common finalization
    set_checkpoint_version(state_dict.get("checkpoint_version", 0))

    # Handle train state
    if not cfg.checkpoint.finetune:
        if ckpt_type == CheckpointType.LOCAL:
            # Local checkpoints embed train_state_metadata in the state dict.
            if "train_state_metadata" in state_dict:
                print_rank_0("Restoring TrainState from local checkpoint (train_state_metadata)")
                state.train_state = TrainState()
                state.train_state.load_state_dict(state_dict["train_state_metadata"])
            else:
                print_rank_0("WARNING: train_state_metadata not found in local checkpoint, counters reset")
                state.train_state = TrainState(step=state_dict.get("iteration", 0))
        else:
            train_state_filename = get_checkpoint_train_state_filename(checkpoint_name)
            if file_exists(train_state_filename):
                state.train_state = read_train_state(train_state_filename)
            else:
                print_rank_0(f"{train_state_filename} not found, creating TrainState from checkpoint state dict")
                state.train_state = _get_train_state_from_state_dict(state_dict)

    if cfg.checkpoint.finetune or release:
        state.train_state.step = 0

    # For local checkpoints, checkpoint_name is a CkptID tuple.
    # Normalize to string for downstream logging / wandb / mlflow.
    if ckpt_type == CheckpointType.LOCAL and not isinstance(checkpoint_name, (str, bytes, os.PathLike)):
        checkpoint_name = str(checkpoint_name)

    if not cfg.checkpoint.finetune:
        update_num_microbatches(consumed_samples=state.train_state.consumed_train_samples, verbose=True)

    # Load model weights
    if not skip_load_to_model_and_opt:
        # Process state dict for GLU interleaving if needed.
        # Assumption: checkpoints are always in contiguous (non-interleaved) format.
        routed_interleave_size, shared_interleave_size = _get_model_glu_interleave_sizes(model, cfg)

        # Interleave if model expects interleaved weights.
        if routed_interleave_size is not None:
            print_rank_0(
                "[GLU Interleaving] Interleaving routed/dense GLU weights on load: "
                f"model expects interleaving (size={routed_interleave_size}), "
                "converting checkpoint from contiguous to interleaved format"
            )
        if shared_interleave_size is not None:
            print_rank_0(
                "[GLU Interleaving] Interleaving shared expert GLU weights on load: "
                f"model expects interleaving (size={shared_interleave_size}), "
                "converting checkpoint from contiguous to interleaved format"
            )
        if routed_interleave_size is not None or shared_interleave_size is not None:
            if len(model) == 1:
                state_dict["model"] = _process_state_dict_for_model_glu_interleaving(
                    state_dict["model"],
                    routed_interleave_size,
                    shared_interleave_size,
                    use_megatron_fsdp=cfg.ddp.use_megatron_fsdp,
                )
            else:
                for i in range(len(model)):
                    model_key = "model%d" % i
                    if model_key in state_dict:
                        state_dict[model_key] = _process_state_dict_for_model_glu_interleaving(
                            state_dict[model_key],
                            routed_interleave_size,
                            shared_interleave_size,
                            use_megatron_fsdp=cfg.ddp.use_megatron_fsdp,
                        )

        # Handle PEFT resume for strict loading
        load_strict = strict
        is_peft_resume = (
            cfg.peft is not None
            and cfg.checkpoint.load is not None
            and load_dir == cfg.checkpoint.load
            and load_dir != cfg.checkpoint.pretrained_checkpoint
            and not cfg.checkpoint.finetune
        )
        load_strict = False if is_peft_resume else strict

        if len(model) == 1:
            _load_model_state_dict(model[0], state_dict["model"], load_strict)
        else:
            for i in range(len(model)):
                model_key = "model%d" % i
                if model_key not in state_dict:
                    continue
                _load_model_state_dict(model[i], state_dict[model_key], load_strict)

    checkpoint_version = get_checkpoint_version()
    print_rank_0(f" checkpoint version {checkpoint_version}")

    # Load optimizer and scheduler
    if not release and not cfg.checkpoint.finetune and cfg.checkpoint.load_optim:
        try:
            if (
                not skip_load_to_model_and_opt
                and optimizer is not None
                and not getattr(optimizer, "is_stub_optimizer", False)
            ):
                if isinstance(optimizer, LayerWiseDistributedOptimizer) and ckpt_type == CheckpointType.LOCAL:
                    # Local checkpoints save LayerWiseDistributedOptimizer state to a
                    # separate per-rank file at the base local checkpoint directory rather
                    # than embedding it in the sharded distributed checkpoint.
                    # Load it back from that file here.
                    dp_rank = pg_collection.dp.rank()
                    local_ckpt_dir = checkpointing_context["local_checkpoint_manager"].local_ckpt_dir
                    optim_ckpt_path = os.path.join(local_ckpt_dir, f"layer_wise_optimizer_{dp_rank}.pt")
                    optimizer.load_state_dict_from_file(optim_ckpt_path)
                else:
                    # torch.no_grad() is needed for local checkpoints: the
                    # DistributedOptimizer copies loaded tensors into main
                    # params via .copy_(), which fails on leaf Variables that
                    # require grad without this context.
                    with torch.no_grad():
                        optimizer.load_state_dict(state_dict["optimizer"])

            if opt_param_scheduler is not None:
                if "lr_scheduler" in state_dict:
                    opt_param_scheduler.load_state_dict(state_dict["lr_scheduler"])
                else:
                    opt_param_scheduler.load_state_dict(state_dict["opt_param_scheduler"])
        except KeyError as e:
            print_rank_0(
                "Unable to load optimizer from checkpoint {}. "
                "Specify load_optim=False or finetune=True to prevent "
                "attempting to load the optimizer state.".format(checkpoint_name)
            )
            raise e
    else:
        if (cfg.model.fp16 or cfg.model.bf16) and optimizer is not None and not cfg.ddp.use_megatron_fsdp:
            if cfg.checkpoint.load_main_params_from_ckpt:
                optimizer.reload_model_params(state_dict=state_dict)
            else:
                optimizer.reload_model_params()

    # Load rerun state
    if not ignore_rerun_state:
        try:
            if "rerun_state_machine" in state_dict:
                get_rerun_state_machine().load_state_dict(state_dict["rerun_state_machine"])
        except Exception as e:
            print_rank_0(f"Unable to restore RerunMachine from checkpoint: {e}. Skipping.")
            sys.exit()

    # Load RNG states
    if not release and not cfg.checkpoint.finetune and cfg.checkpoint.load_rng and not ignore_rng_state:
        try:
            cuda_rng_tracker = tensor_parallel.get_cuda_rng_tracker()
            graph_safe_rng = tensor_parallel.is_graph_safe_cuda_rng_tracker(cuda_rng_tracker)
            if "rng_state" in state_dict:
                if ckpt_format == "fsdp_dtensor":
                    # FSDP DTensor format: {(pp_rank, tp_rank): rng_state_list}
                    tp_rank = pg_collection.tp.rank()
                    pp_rank = pg_collection.pp.rank()
                    key = f"({pp_rank}, {tp_rank})"
                    if key in state_dict["rng_state"]:
                        rng_state_list = state_dict["rng_state"][key]
                    else:
                        print_rank_0("WARNING: RNG state not found for current TP/PP rank")
                        rng_state_list = next(iter(state_dict["rng_state"].values()))
                    rng_state = (
                        rng_state_list[pg_collection.dp.rank()]
                        if cfg.rng.data_parallel_random_init
                        else rng_state_list[0]
                    )
                else:
                    # torch_dist format: ShardedObject
                    rng_state = (
                        state_dict["rng_state"][pg_collection.dp.rank()]
                        if cfg.rng.data_parallel_random_init
                        else state_dict["rng_state"][0]
                    )

                random.setstate(rng_state["random_rng_state"])
                np.random.set_state(rng_state["np_rng_state"])
                torch.set_rng_state(rng_state["torch_rng_state"])
                torch.cuda.set_rng_state(rng_state["cuda_rng_state"])
                if not rng_state["rng_tracker_states"]:
                    raise KeyError
                rng_tracker_states = {
                    k: tensor_parallel.convert_cuda_rng_state(v, to_graphable=graph_safe_rng)
                    for k, v in rng_state["rng_tracker_states"].items()
                }
                cuda_rng_tracker.set_states(rng_tracker_states)
            else:  # backward compatibility
                random.setstate(state_dict["random_rng_state"])
                np.random.set_state(state_dict["np_rng_state"])
                torch.set_rng_state(state_dict["torch_rng_state"])
                torch.cuda.set_rng_state(state_dict["cuda_rng_state"])
                if not state_dict["rng_tracker_states"]:
                    raise KeyError
                rng_tracker_states = {
                    k: tensor_parallel.convert_cuda_rng_state(v, to_graphable=graph_safe_rng)
                    for k, v in state_dict["rng_tracker_states"].items()
                }
                cuda_rng_tracker.set_states(rng_tracker_states)
        except KeyError:
            print_rank_0(
                "Unable to load rng state from checkpoint {}. "
                "Specify load_rng=False or finetune=True to prevent "
                "attempting to load the rng state.".format(checkpoint_name)
            )
            sys.exit()

    # Final synchronization and logging
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

    print_rank_0(
        f"  successfully loaded checkpoint from {load_dir} "
        f"[ t {pg_collection.tp.rank()}/{pg_collection.tp.size()}, "
        f"p {pg_collection.pp.rank()}/{pg_collection.pp.size()} ] "
        f"at iteration {state.train_state.step}"
    )

    if not torch.distributed.is_initialized() or is_last_rank():
        wandb_utils.on_load_checkpoint_success(checkpoint_name, load_dir, state.wandb_logger)
        mlflow_utils.on_load_checkpoint_success(checkpoint_name, load_dir, state.mlflow_logger)
        comet_utils.on_load_checkpoint_success(checkpoint_name, load_dir, state.comet_logger)

    torch.cuda.empty_cache()

    if state.train_state.step > 0:
        is_local_chkpt = ckpt_type == CheckpointType.LOCAL
        fault_tolerance.on_checkpoint_loaded(is_local_chkpt=is_local_chkpt, global_state=state)

    return state.train_state.step, state.train_state.floating_point_operations_so_far
