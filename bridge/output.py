"""The one output transaction: every writer of the bridge (the Megatron checkpoint, the in-memory
and the streaming HF exports) writes its output directory inside `output_transaction`."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from bridge.ranks import agree, on_rank0
from conversion.output_dir import OutputDir


@contextmanager
def output_transaction(path: str | os.PathLike, what: str, overwrite: bool = False,
                       finalize: Optional[Callable[[Path], None]] = None) -> Iterator[Path]:
    """Yield the hidden temporary sibling of `path`, renamed to `path` only when the block
    succeeded on every rank (see conversion/output_dir.py for the atomic publication).

    Rank 0 creates the temporary (after the output checks) and every rank gets its path, or rank
    0's error. Every rank then writes its part in the block; their outcomes are agreed on (the
    first failing rank's error is raised on every rank, `what` naming what was written); rank 0
    runs `finalize(tmp)`, makes the files durable and renames the temporary into place, and every
    rank learns how that went. Whatever fails, on any rank, the temporary is removed: nothing
    half-written is left at or beside `path`. Without a multi-rank group: the same steps, no
    collectives. Ctrl-C (any BaseException that is not an Exception) removes the temporary and
    leaves at once.
    """
    out = OutputDir(path, overwrite, finalize)  # only rank 0 runs its steps
    tmp = Path(on_rank0(out.open, what))
    try:
        try:
            yield tmp
        except Exception as e:  # noqa: BLE001 - raised again, on every rank, by agree
            agree(e, what)
        else:
            agree(None, what)
        on_rank0(out.publish, what)
    except BaseException:
        out.discard()
        raise
