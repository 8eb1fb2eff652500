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
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing

from conversion.errors import ConversionError
from conversion.integrity import META_FORMAT, META_NAME, read_meta  # noqa: F401 - re-exported
from conversion.safe_pickle import check_dist_checkpoint
from conversion.output_dir import atomic_output_dir
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


def save(state: Callable[[], Dict], path: Path, meta: Callable[[], Dict], assets_dir: Optional[Path], overwrite: bool = False,
         is_asset: Callable[[Path], bool] = lambda p: True, strategy=None) -> None:
    """Write a model's sharded state (all ranks take part) and the bridge files (rank 0) into `path`,
    atomically. `state()` gives this rank's sharded state dict (`sharded_state(model)`); `meta()`
    the contents of bridge_meta.json (asked for after the tensors are written); `strategy` is the
    dist_checkpointing save strategy (None: megatron-core's default, torch_dist).

    Rank 0 creates the hidden temporary sibling and broadcasts its path; every rank writes its
    shards into it with `dist_checkpointing.save`; rank 0 writes `common.pt` where megatron-core
    did not (0.19.2: see `providers.megatron_imports.add_common_state_file`, so that 0.16.1 loads
    the checkpoint too), the tracker, bridge_meta.json and the assets; after a barrier (and a check
    that every rank succeeded) rank 0 renames it into place and tells every rank how that went. Any
    failure is raised on every rank and leaves no output directory.
    """
    from bridge.ranks import broadcast_from_rank0, world

    rank, size = world()
    multi = size > 1
    if rank != 0:
        tmp_or_error = broadcast_from_rank0(None)
        if isinstance(tmp_or_error, Exception):
            raise tmp_or_error
        tmp = Path(tmp_or_error)
        error = capture_error(lambda: dist_checkpointing.save(state(), str(tmp / RELEASE_DIR), sharded_strategy=strategy))
        error = first_rank_error(error)
        if error:
            raise ConversionError(f"writing the Megatron checkpoint {path} failed: {error}")
        dist.barrier()  # rank 0 renames after this ...
        on_rank0(None)  # ... and says how it went: in place when save() returns
        return
    try:
        context = atomic_output_dir(path, overwrite=overwrite)
        tmp = context.__enter__()
    except Exception as e:
        if multi:
            broadcast_from_rank0(ConversionError(str(e)) if isinstance(e, ConversionError) else e)
        raise
    try:
        (tmp / RELEASE_DIR).mkdir(exist_ok=True)
        if multi:
            broadcast_from_rank0(str(tmp))
            error = capture_error(lambda: dist_checkpointing.save(state(), str(tmp / RELEASE_DIR), sharded_strategy=strategy))
            error = error or capture_error(lambda: add_common_state_file(tmp / RELEASE_DIR))
            error = error or capture_error(lambda: _write_bridge_files(tmp, meta, assets_dir, is_asset))
            error = first_rank_error(error)
            if error:
                raise ConversionError(f"writing the Megatron checkpoint {path} failed: {error}")
            dist.barrier()
        else:
            dist_checkpointing.save(state(), str(tmp / RELEASE_DIR), sharded_strategy=strategy)
            add_common_state_file(tmp / RELEASE_DIR)
            _write_bridge_files(tmp, meta, assets_dir, is_asset)
    except BaseException as e:
        context.__exit__(type(e), e, e.__traceback__)
        raise
    on_rank0(lambda: context.__exit__(None, None, None))  # the atomic rename


def _write_bridge_files(tmp: Path, meta: Callable[[], Dict], assets_dir: Optional[Path], is_asset: Callable[[Path], bool]) -> None:
    (tmp / TRACKER_NAME).write_text(RELEASE_DIR)
    (tmp / META_NAME).write_text(json.dumps({"format": META_FORMAT, **meta()}, indent=1) + "\n")
    assets = tmp / ASSETS_DIR
    assets.mkdir()
    if assets_dir is not None:
        for src in sorted(Path(assets_dir).rglob("*")):
            if src.is_file() and is_asset(src):
                dest = assets / src.relative_to(assets_dir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)


def capture_error(fn) -> Optional[str]:
    """Run `fn`; None on success, else a one-line description of the failure."""
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 - reported on every rank by first_rank_error
        return f"rank {dist.get_rank()}: {type(e).__name__}: {e}"


def on_rank0(step: Optional[Callable[[], None]]) -> None:
    """Rank 0 runs `step` (the other ranks pass None) and every rank learns how it went: all return
    when it succeeded; when it failed, rank 0 raises its own exception and the others a
    ConversionError with its message. (Without a multi-rank group: just `step()`.)"""
    from bridge.ranks import broadcast_from_rank0

    if step is None:
        failure = broadcast_from_rank0(None)
        if failure:
            raise ConversionError(f"rank 0: {failure}")
        return
    try:
        step()
    except BaseException as e:
        broadcast_from_rank0(str(e) if isinstance(e, ConversionError) else f"{type(e).__name__}: {e}")
        raise
    broadcast_from_rank0("")


def first_rank_error(error: Optional[str]) -> Optional[str]:
    """The first rank's failure message, on every rank (None when all succeeded)."""
    errors: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


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
