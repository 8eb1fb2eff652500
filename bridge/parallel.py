"""Megatron parallel state: use what the caller set up, else create it.

Under torchrun the caller's process group (and, if initialised, megatron's parallel state) is used.
In a plain process a one-process gloo group is created so the CLIs need no launcher (the process
group and the rank helpers: bridge/ranks.py).

Also here: the pure layout check (`check_layout` / `layout_problems`: which model sizes a TP / PP /
EP / ETP / VPP layout does not divide), `setup_for_provider` (parallel state <-> provider fields,
sequence-parallel default) and `build_model` (this rank's model chunks, one per virtual stage).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core import parallel_state

from bridge.ranks import ensure_process_group, world
from conversion.errors import ConversionError


def ensure_parallel_state(tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None,
                          vpp: Optional[int] = None, seed: int = 1234) -> None:
    """Initialise megatron's parallel state for the given layout unless the caller already did."""
    _, size = ensure_process_group()
    if not parallel_state.model_parallel_is_initialized():
        if size % (tp * pp) != 0:
            raise ValueError(f"world size {size} is not divisible by TP={tp} x PP={pp}")
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
        )
    _seed_rng_tracker(seed)


def _seed_rng_tracker(seed: int) -> None:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    if tracker.get_states():
        return
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from providers import cpu_compat

        cpu_compat.apply_cpu_patches()
        cpu_compat.cpu_manual_seed(seed)


def layout() -> dict:
    """The current parallel layout (ranks and sizes) from megatron's parallel state."""
    ps = parallel_state
    return dict(
        tp_rank=ps.get_tensor_model_parallel_rank(), tp=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(), ep=ps.get_expert_model_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(), etp=ps.get_expert_tensor_parallel_world_size(),
    )


# ---------------------------------------------------------------------------- layout checks

def _getter(fields):
    return fields.get if isinstance(fields, dict) else (lambda k, d=None: getattr(fields, k, d))


def _is_moe(fields) -> bool:
    get = _getter(fields)
    return bool(get("num_moe_experts")) and "E" in (get("hybrid_override_pattern") or "E")


def layout_problems(fields, tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None,
                    vpp: Optional[int] = None, world: Optional[int] = None,
                    padded_vocab_size: Optional[int] = None) -> List[str]:
    """Every way the parallel layout does not fit the model sizes, as readable sentences.

    Pure arithmetic on provider fields (a dict or a provider): no process group, no model. `etp`
    defaults to `tp` (megatron's default). Used before any work by `provide()`, the bridge's load /
    export entry points and the CLIs.
    """
    get = _getter(fields)
    etp = tp if etp is None else etp
    problems: List[str] = []
    for name, value in (("TP", tp), ("PP", pp), ("EP", ep), ("ETP", etp)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name}={value!r} must be a positive integer")
    if vpp is not None and (not isinstance(vpp, int) or vpp < 1):
        problems.append(f"VPP={vpp!r} must be a positive integer or unset")
    if problems:
        return problems

    def need(size_name, size, par_name, par):
        if size and par > 1 and size % par:
            problems.append(f"{size_name} ({size}) is not divisible by {par_name}={par}")

    heads, groups = get("num_attention_heads"), get("num_query_groups") or get("num_attention_heads")
    pattern = get("hybrid_override_pattern") or ""
    if "*" in pattern or not pattern:
        need("attention heads", heads, "TP", tp)
        need("KV heads (query groups)", groups, "TP", tp)
    if "M" in pattern:
        need("Mamba heads", get("mamba_num_heads"), "TP", tp)
        need("Mamba groups", get("mamba_num_groups"), "TP", tp)
    if "-" in pattern:
        need("MLP hidden size (ffn_hidden_size)", get("ffn_hidden_size"), "TP", tp)
    experts = get("num_moe_experts")
    if _is_moe(fields):
        need("routed experts", experts, "EP", ep)
        need("expert hidden size (moe_ffn_hidden_size)", get("moe_ffn_hidden_size") or get("ffn_hidden_size"), "ETP", etp)
        need("shared-expert hidden size", get("moe_shared_expert_intermediate_size"), "TP", tp)
    else:
        if ep > 1:
            problems.append(f"EP={ep} needs a model with MoE layers; this one has none")
    if padded_vocab_size:
        need("padded vocab", padded_vocab_size, "TP", tp)
    layers = get("num_layers") or len(pattern)
    if pp > 1 or (vpp or 1) > 1:
        stages = pp * (vpp or 1)
        what = f"PP={pp}" + (f" x VPP={vpp}" if vpp else "")
        if layers % stages:
            problems.append(f"layers ({layers}) are not divisible by {what} = {stages} pipeline chunks")
    if vpp is not None and vpp > 1 and pp < 2:
        problems.append(f"VPP={vpp} needs PP >= 2 (got PP={pp})")
    if world is not None:
        if world % (tp * pp):
            problems.append(f"world size {world} is not divisible by TP={tp} x PP={pp}")
        elif world % (etp * ep * pp):
            problems.append(f"world size {world} is not divisible by ETP={etp} x EP={ep} x PP={pp}")
    return problems


def check_layout(fields, tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None,
                 vpp: Optional[int] = None, world: Optional[int] = None,
                 padded_vocab_size: Optional[int] = None) -> None:
    """Raise `ConversionError` naming every size that does not fit the layout (see `layout_problems`)."""
    problems = layout_problems(fields, tp, pp, ep, etp, vpp, world, padded_vocab_size)
    if problems:
        etp_s = tp if etp is None else etp
        raise ConversionError(f"parallel layout TP={tp} PP={pp} EP={ep} ETP={etp_s}"
                              + (f" VPP={vpp}" if vpp else "") + " does not fit the model: "
                              + "; ".join(problems))


def current_sizes() -> Optional[dict]:
    """tp/pp/ep/etp/vpp from megatron's parallel state, or None when it is not initialised."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    ps = parallel_state
    return dict(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                ep=ps.get_expert_model_parallel_world_size(), etp=ps.get_expert_tensor_parallel_world_size(),
                vpp=ps.get_virtual_pipeline_model_parallel_world_size())


def provider_sizes(provider) -> dict:
    """tp/pp/ep/etp/vpp as set on a provider (megatron's field names)."""
    return dict(tp=provider.tensor_model_parallel_size, pp=provider.pipeline_model_parallel_size,
                ep=provider.expert_model_parallel_size, etp=provider.expert_tensor_parallel_size,
                vpp=provider.virtual_pipeline_model_parallel_size)


def setup_for_provider(provider) -> dict:
    """Make megatron's parallel state and the provider agree; return the layout used.

    The layout is megatron's parallel state when the caller initialised it (a provider field that
    was set to something else is an error), otherwise the provider's fields, from which the
    parallel state is created. The layout is checked against the model sizes before anything is
    built, and sequence parallelism is turned on when TP > 1 with MoE layers (megatron requires it).
    """
    ensure_process_group()
    state = current_sizes()
    wanted = provider_sizes(provider)
    if state is None:
        check_layout(provider, **wanted, world=world()[1],
                     padded_vocab_size=_padded_vocab(provider, wanted["tp"]))
        ensure_parallel_state(**wanted)
        state = current_sizes()
    else:
        _seed_rng_tracker(1234)
        defaults = dict(tp=1, pp=1, ep=1, etp=None, vpp=None)
        clashes = [f"{k.upper()}: provider {wanted[k]} vs parallel state {state[k]}" for k in wanted
                   if wanted[k] != defaults[k] and wanted[k] != state[k]]
        if clashes:
            raise ConversionError("the provider's parallel sizes differ from megatron's initialised parallel "
                                  "state (" + "; ".join(clashes) + ")")
    check_layout(provider, **state, world=world()[1], padded_vocab_size=_padded_vocab(provider, state["tp"]))
    provider.tensor_model_parallel_size = state["tp"]
    provider.pipeline_model_parallel_size = state["pp"]
    provider.expert_model_parallel_size = state["ep"]
    provider.expert_tensor_parallel_size = state["etp"]
    provider.virtual_pipeline_model_parallel_size = state["vpp"]
    if state["pp"] > 1 and getattr(provider, "pipeline_dtype", None) is None:
        provider.pipeline_dtype = provider.params_dtype
    if state["tp"] > 1 and _is_moe(provider):
        provider.sequence_parallel = True
    return state


def _padded_vocab(provider, tp: int) -> Optional[int]:
    fn = getattr(provider, "padded_vocab_size", None)
    if not callable(fn) or getattr(provider, "vocab_size", None) is None:
        return None
    saved = provider.tensor_model_parallel_size
    try:
        provider.tensor_model_parallel_size = tp
        return fn()
    finally:
        provider.tensor_model_parallel_size = saved


def build_model(provider) -> List[torch.nn.Module]:
    """The model chunks of this rank: one per virtual pipeline stage (one without VPP).

    Like Megatron-LM's `get_model`: chunk `v` has the embedding only on the first virtual stage of
    the first pipeline rank and the output layer only on the last virtual stage of the last rank.
    """
    state = setup_for_provider(provider)
    vpp = state["vpp"]
    if vpp is None:
        return [provider.provide()]
    ps = parallel_state
    chunks = []
    for v in range(vpp):
        chunks.append(provider.provide(pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
                                       post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v),
                                       vp_stage=v))
    return chunks


# provide() asks the bridge for this policy (providers never import the bridge).
from providers import mamba_provider as _mamba_provider  # noqa: E402

_mamba_provider.PARALLEL_SETUP = setup_for_provider
