"""torchrun worker of tests/test_output_transaction.py: the output transaction and `every_rank` on
2 ranks (gloo). Each case's outcome on this rank ("ok" or the exception's type and message) goes to
OUT/results{rank}.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from bridge.output import output_transaction
from bridge.ranks import ensure_process_group, every_rank


def write(out: Path, rank: int, fail_on: int = -1) -> None:
    """Every rank writes one file into the output; rank `fail_on` then fails."""
    with output_transaction(out, f"writing {out.name}") as tmp:
        (tmp / f"rank{rank}").write_text(str(rank))
        if rank == fail_on:
            raise ValueError(f"rank {rank} cannot write")


def main() -> None:
    out = Path(sys.argv[1])
    rank, _ = ensure_process_group()
    cases = {
        "ok": lambda: write(out / "ok", rank),
        "rank1_fails": lambda: write(out / "rank1_fails", rank, fail_on=1),
        "rank0_fails": lambda: write(out / "rank0_fails", rank, fail_on=0),
        "refused": lambda: write(out / "not_empty", rank),  # the test put a file there
    }
    results = {}
    for name, case in cases.items():
        try:
            case()
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded for the test
            results[name] = f"{type(e).__name__}: {e}"
    results["every_rank"] = every_rank(lambda: 10 * rank, "counting")
    (out / f"results{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()  # left to interpreter shutdown, gloo's threads may abort the process


if __name__ == "__main__":
    main()
