"""Splitting work across the processes of a torchrun launch. No torch needed: the CLIs use it
before anything heavy is imported."""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple


def launcher_rank() -> Tuple[int, int]:
    """(rank, world size) that torchrun gives this process (RANK / WORLD_SIZE), else (0, 1).

    Read from the environment, not from torch.distributed (bridge/ranks.py's `world()`): the CLIs
    need the rank before torch is imported and the process group exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def assign(sizes: Sequence[int], ranks: int) -> List[int]:
    """Owner rank of each item: largest first to the least-loaded rank (the same on every rank)."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def my_share(items: Sequence[str], sizes: Sequence[int], rank: int, ranks: int) -> List[str]:
    return [item for item, owner in zip(items, assign(sizes, ranks)) if owner == rank]
