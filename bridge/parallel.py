"""torch.distributed + megatron parallel state: use what the caller set up, else create it.

Under torchrun the caller's process group (and, if initialised, megatron's parallel state) is used.
In a plain process a one-process gloo group is created so the CLIs need no launcher.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def ensure_process_group() -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
        return
    # One process: an in-memory store, no port (and nothing leaks into child processes' env).
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def ensure_parallel_state(tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None,
                          vpp: Optional[int] = None, seed: int = 1234) -> None:
    """Initialise megatron's parallel state for the given layout unless the caller already did."""
    ensure_process_group()
    if not parallel_state.model_parallel_is_initialized():
        world = dist.get_world_size()
        if world % (tp * pp) != 0:
            raise ValueError(f"world size {world} is not divisible by TP={tp} x PP={pp}")
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
