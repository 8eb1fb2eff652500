"""Megatron checkpoints on disk, in Megatron-LM's directory convention.

    OUT/
      latest_checkpointed_iteration.txt   "release"  (Megatron-LM's tracker file)
      release/                             megatron-core dist_checkpointing (torch_dist) files
      bridge_meta.json                     HF config, provider fields, dtype, HF tensor manifest
      hf_assets/                           non-weight files of the source HF dir (tokenizer, ...)

Megatron-LM's `--load` / `--finetune` read the tracker and `release/`; the bridge's own files sit
beside them and never inside what Megatron reads. The model's state is saved under the key `model`
(Megatron-LM's key), with `checkpoint_version` and `iteration` beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Optional

from megatron.core import dist_checkpointing

from bridge.output import output_transaction
from bridge.ranks import world
from conversion.errors import ConversionError
from conversion.hf_writer import copy_assets
from conversion.integrity import META_FORMAT, META_NAME, read_meta  # noqa: F401 - re-exported
from conversion.safe_pickle import check_dist_checkpoint
from providers.megatron_imports import add_common_state_file, common_load_kwargs

TRACKER_NAME = "latest_checkpointed_iteration.txt"
RELEASE_DIR = "release"
ASSETS_DIR = "hf_assets"


def sharded_state(model) -> Dict:
    from bridge.weights import model_chunks

    chunks = model_chunks(model)
    state = {"checkpoint_version": 3.0, "iteration": 0}
    if len(chunks) == 1:
        state["model"] = chunks[0].sharded_state_dict()
    else:  # virtual pipeline stages: Megatron-LM's model0, model1, ...
        for i, chunk in enumerate(chunks):
            state[f"model{i}"] = chunk.sharded_state_dict()
    return state


def save(state: Callable[[], Dict], path: Path, meta: Callable[[], Dict], assets_dir: Optional[Path],
         overwrite: bool = False, strategy=None, finalize: Optional[Callable[[Path], None]] = None) -> None:
    """Write a model's sharded state (all ranks take part) and the bridge files (rank 0) into `path`,
    atomically. `state()` gives this rank's sharded state dict (`sharded_state(model)`); `meta()`
    the contents of bridge_meta.json (asked for after the tensors are written); `strategy` is the
    dist_checkpointing save strategy (None: megatron-core's default, torch_dist); `finalize(tmp)`
    runs on rank 0 once every rank has written its part, before the rename (the checksum file).

    Every rank writes its shards with `dist_checkpointing.save`; rank 0 writes `common.pt` where
    megatron-core did not (0.19.2: see `providers.megatron_imports.add_common_state_file`, so that
    0.16.1 loads the checkpoint too), the tracker, bridge_meta.json and the assets. The output
    transaction (bridge/output.py) makes it atomic: any failure, on any rank, is raised on every
    rank and leaves no output directory.
    """
    with output_transaction(path, f"writing the Megatron checkpoint {path}", overwrite, finalize) as tmp:
        release = tmp / RELEASE_DIR
        release.mkdir(exist_ok=True)  # on every rank: no rank may start writing before it exists
        dist_checkpointing.save(state(), str(release), sharded_strategy=strategy)
        if world()[0] == 0:
            add_common_state_file(release)
            (tmp / TRACKER_NAME).write_text(RELEASE_DIR)
            write_bridge_files(tmp, meta(), assets_dir)


def write_bridge_files(root: Path, meta: Dict, assets_dir: Optional[Path]) -> None:
    """bridge_meta.json (`meta`, with the format tag) and hf_assets/ (the non-weight files of
    `assets_dir`) of a checkpoint; also the fine-tuning example's checkpoints."""
    (root / META_NAME).write_text(json.dumps({"format": META_FORMAT, **meta}, indent=1) + "\n")
    assets = root / ASSETS_DIR
    assets.mkdir(exist_ok=True)
    copy_assets(assets_dir, assets)


def checkpoint_dir(path: Path) -> Path:
    tracker = Path(path) / TRACKER_NAME
    if not tracker.is_file():
        raise ConversionError(f"{tracker}: missing (expected Megatron-LM's tracker file)")
    it = tracker.read_text().strip()
    sub = RELEASE_DIR if it == "release" else f"iter_{int(it):07d}"
    return Path(path) / sub


def load(model, path: Path) -> None:
    """Load the weights of a converted checkpoint into `model` (any parallel layout: it reshards)."""
    from bridge.weights import model_chunks

    state = sharded_state(model)
    directory = str(checkpoint_dir(path))
    check_dist_checkpoint(directory)  # every pickle of it read safely before megatron / torch read it
    # common_load_kwargs: megatron-core 0.16.1 reads a checkpoint without common.pt (0.19.2's format) too
    loaded = dist_checkpointing.load(state, directory, **common_load_kwargs(directory))
    chunks = model_chunks(model)
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        chunk.load_state_dict(loaded[key], strict=True)
