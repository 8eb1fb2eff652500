"""The ranks of a torch.distributed run: every rank question of the bridge goes through here.

`ensure_process_group` (torchrun's group, or a one-process group so the CLIs need no launcher),
`world()` ((rank, size); (0, 1) without a group), `gather` (one object from every rank) and
`every_rank` / `on_rank0` (run a step; when it failed on any rank, every rank raises the first
failing rank's error). Without a multi-rank group none of them runs a collective.
(conversion/split.py's `launcher_rank` reads torchrun's environment instead: the CLIs need the
rank before torch is imported.)
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from conversion.errors import ConversionError


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


def _describe(error: BaseException) -> str:
    """One line for an error: a ConversionError's message is already one, others get their type."""
    return str(error) if isinstance(error, ConversionError) else f"{type(error).__name__}: {error}"


def agree(error: Optional[Exception], what: str, result: Any = None) -> List[Any]:
    """Every rank's outcome of one step: `error` (None: it succeeded) and `result` here.

    When the step failed on some rank, every rank raises: the first rank that failed its own
    `error`, every other rank a ConversionError naming that rank and its error (`what` says what
    was being done). Otherwise returns every rank's `result`, in rank order. Every rank must call
    it, after the same steps (it is one collective)."""
    outcomes = gather((None if error is None else _describe(error), result))
    failed = next((r for r, (failure, _) in enumerate(outcomes) if failure is not None), None)
    if failed is None:
        return [value for _, value in outcomes]
    if failed == world()[0]:
        raise error
    raise ConversionError(f"{what} failed on rank {failed}: {outcomes[failed][0]}")


def every_rank(step: Callable[[], Any], what: str) -> List[Any]:
    """Run `step` on every rank and return every rank's result (in rank order); when it failed on
    any rank, raise the first failing rank's error on every rank (see `agree`). Only an Exception
    is agreed on: Ctrl-C / SystemExit leave at once (torchrun stops the other ranks)."""
    try:
        result = step()
    except Exception as e:  # noqa: BLE001 - raised again on every rank by agree
        return agree(e, what)
    return agree(None, what, result)


def on_rank0(step: Callable[[], Any], what: str) -> Any:
    """Rank 0 runs `step`, every rank returns its result or raises its error (see `every_rank`)."""
    return every_rank(step if world()[0] == 0 else (lambda: None), what)[0]
