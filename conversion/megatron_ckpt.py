"""What a Megatron checkpoint directory says about itself, read without megatron: which torch_dist
directory holds the weights, their keys / shapes / dtypes (the `.metadata` pickle, read through the
allow-list), the target its keys were written for, its parameter dtype and its vocab rows.

Three writers are read alike:
- this project (`convert-hf-to-mcore`, the examples): `release/` + `bridge_meta.json`;
- Megatron-Bridge: `iter_NNNNNNN/` (or `release/`) with `run_config.yaml`, tracker
  `latest_checkpointed_iteration.txt` (and `latest_train_state.pt`);
- Megatron-LM: `iter_NNNNNNN/` with `args` in the common state, tracker
  `latest_checkpointed_iteration.txt`.
The path given may be the checkpoint root (the tracker picks the directory, `iteration` overrides
it) or a torch_dist directory itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from conversion.errors import ConversionError
from conversion.integrity import META_NAME
from conversion.naming import Target, detect
from conversion.safe_pickle import load_dcp_metadata

TRACKER_NAME = "latest_checkpointed_iteration.txt"
RELEASE_DIR = "release"
EMBEDDING = "embedding.word_embeddings.weight"  # the key whose rows and dtype say the vocab and dtype


@dataclass
class MegatronCheckpoint:
    root: Path                  # what was given
    directory: Path             # the torch_dist directory (release/, iter_NNNNNNN/)
    tensors: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]  # key -> (global shape, dtype)
    target: Target
    meta: Optional[dict]        # bridge_meta.json, when this project wrote it
    metadata: object = None     # the `.metadata` index itself (read once: bridge.streaming.DcpReader takes it)

    @property
    def embedding(self) -> Tuple[Tuple[int, ...], torch.dtype]:
        for key, value in self.tensors.items():
            if key.endswith(EMBEDDING):
                return value
        raise ConversionError(f"{self.directory}: no {EMBEDDING!r} tensor (not a NemotronH / Omni checkpoint)")

    @property
    def params_dtype(self) -> torch.dtype:
        return self.embedding[1]

    @property
    def vocab_rows(self) -> int:
        return self.embedding[0][0]


def iteration_dir(root: Path, iteration: Optional[int] = None) -> Path:
    """The torch_dist directory of a checkpoint root (the tracker's, or `iteration`'s) or `root`
    itself when it is one."""
    root = Path(root)
    if iteration is None and (root / ".metadata").is_file():
        return root
    if iteration is not None:
        directory = root / f"iter_{iteration:07d}"
        if not directory.is_dir():
            found = sorted(p.name for p in root.glob("iter_*")) + ([RELEASE_DIR] if (root / RELEASE_DIR).is_dir() else [])
            raise ConversionError(f"{root}: no iteration {iteration} ({directory.name}); the checkpoint has "
                                  f"{', '.join(found) or 'none'}")
        return directory
    tracker = root / TRACKER_NAME
    if not tracker.is_file():
        raise ConversionError(f"{root}: not a Megatron checkpoint (no {TRACKER_NAME} naming its iteration "
                              "directory, and no torch_dist .metadata)")
    text = tracker.read_text().strip()
    if text == RELEASE_DIR:
        return root / RELEASE_DIR
    if not text.isdigit():
        raise ConversionError(f"{tracker}: expected 'release' or an iteration number, got {text[:40]!r}")
    return root / f"iter_{int(text):07d}"


def open_checkpoint(root: Path, iteration: Optional[int] = None) -> MegatronCheckpoint:
    """Describe the checkpoint at `root` (see the module docstring)."""
    from conversion.integrity import read_meta
    from conversion.naming import TARGETS

    directory = iteration_dir(root, iteration)
    metadata = load_dcp_metadata(directory / ".metadata")  # exact-class allow-list: a hostile pickle runs nothing
    tensors = {key: (tuple(m.size), m.properties.dtype) for key, m in metadata.state_dict_metadata.items()
               if hasattr(m, "chunks")}
    meta = read_meta(Path(root)) if (Path(root) / META_NAME).is_file() else None
    target = TARGETS[meta.get("target", "bridge")] if meta else detect(tensors)
    return MegatronCheckpoint(Path(root), directory, tensors, target, meta, metadata)
