"""The ranks of a torch.distributed run: every rank question of the bridge goes through here.

`ensure_process_group` (torchrun's group, or a one-process group so the CLIs need no launcher),
`world()` ((rank, size); (0, 1) without a group), `gather` (one object from every rank) and
`broadcast_from_rank0`. Without a multi-rank group none of them runs a collective.
(conversion/split.py's `launcher_rank` reads torchrun's environment instead: the CLIs need the
rank before torch is imported.)
"""

from __future__ import annotations

import os
from typing import Any, List, Tuple

import torch
import torch.distributed as dist


def world() -> Tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ensure_process_group() -> Tuple[int, int]:
    """Join torchrun's process group (launched by torchrun), else create a one-process group; the
    caller's group when it made one. Returns `world()`."""
    if dist.is_initialized():
        return world()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    else:  # one process: an in-memory store, no port (and nothing leaks into child processes' env)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return world()


def gather(obj: Any) -> List[Any]:
    """`obj` of every rank, in rank order, on every rank (`[obj]` without a multi-rank group)."""
    size = world()[1]
    if size == 1:
        return [obj]
    out: List[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_rank0(obj: Any) -> Any:
    """`obj` as rank 0 has it, on every rank (no-op without a multi-rank group)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
