"""No file of a Megatron checkpoint runs code when it is read.

A megatron-core `torch_dist` checkpoint directory holds three kinds of pickles:

* `.metadata` — torch.distributed.checkpoint's index. torch reads it with plain `pickle.load`, which
  calls whatever a hostile file names. Here it is read by `AllowListUnpickler`: exact
  (module, name) pairs only — no module wildcards, and no dotted names (protocol 4's
  `STACK_GLOBAL` resolves `("torch.distributed.checkpoint.filesystem", "os.system")` through the
  module's attributes; an exact pair cannot name it).
* the records of non-tensor objects in `*.distcp` (megatron's `_extra_state` entries, optimizer
  step counters and parameter groups): torch's load planner reads them with
  `torch.load(weights_only=False)`. Each is read here first with `torch.load(weights_only=True)`.
* `common.pt` (megatron's common state): megatron reads it with torch.load's default; it is read
  here with `weights_only=True` whatever that default is.
`weights_only=True` also admits `argparse.Namespace` (Megatron-LM's `args` in the common state, a
plain attribute bag; registered below, as `import megatron.core` registers it too), and nothing else
beyond torch's own list. (`torch.serialization.safe_globals` as a context manager would not do: its
exit removes the class even where megatron had registered it before.)

`check_dist_checkpoint(directory)` runs all three before megatron-core or torch open anything
(`bridge.checkpoint.load`, and so `AutoBridge.load_megatron_model`, `bridge-verify`,
`generate.py --mcore-path`, `finetune.py --resume`); `convert-mcore-to-hf` reads only `.metadata`
and tensor records itself (`bridge.streaming.DcpReader`), through the same unpickler and
`weights_only=True`. Anything refused is a `ConversionError` naming the file.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import pickle
from pathlib import Path
from typing import Any, FrozenSet, Tuple

import torch

from conversion.errors import ConversionError

torch.serialization.add_safe_globals([argparse.Namespace])  # Megatron-LM's `args` (see the module docstring)

_DCP = "torch.distributed.checkpoint"

# Every global torch.distributed.checkpoint's `.metadata` names (torch 2.13 / 2.14, checkpoints of
# megatron-core 0.16.1 / 0.19.2: model and optimizer state), nothing else.
DCP_METADATA_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset(
    {(f"{_DCP}.metadata", n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                        "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                        "_MEM_FORMAT_ENCODING")}
    | {(f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")}
    | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
       ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
       ("builtins", "set"), ("builtins", "frozenset")}
    | {("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}
)


class AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the exact (module, name) pairs it is given."""

    def __init__(self, file, allowed: FrozenSet[Tuple[str, str]]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return getattr(importlib.import_module(module), name)  # exact pairs hold no dotted names


def load_dcp_metadata(path: Path):
    """torch.distributed.checkpoint `Metadata` from a `.metadata` file, through the allow-list."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = AllowListUnpickler(f, DCP_METADATA_GLOBALS).load()
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing (expected torch.distributed.checkpoint metadata)") from None
    except Exception as e:  # noqa: BLE001 - any refused or malformed pickle is one error
        raise ConversionError(f"{path}: not valid torch.distributed.checkpoint metadata ({e})") from None
    if not isinstance(metadata, Metadata):  # allowed classes, but not the index (e.g. a bare set)
        raise ConversionError(f"{path}: not valid torch.distributed.checkpoint metadata "
                              f"(a {type(metadata).__name__}, not a Metadata)")
    return metadata


def data_file(directory: Path, relative_path: str) -> Path:
    """A data file named by `.metadata`, which must lie inside the checkpoint directory."""
    path = (Path(directory) / relative_path).resolve()
    if Path(directory).resolve() not in path.parents:
        raise ConversionError(f"{directory}/.metadata: data file {relative_path!r} escapes the checkpoint directory")
    return path


def _weights_only_load(data, what: str) -> None:
    try:
        torch.load(data, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's refusal (or a malformed record), in one line
        message = str(e).strip().splitlines()
        raise ConversionError(f"{what}: refused, it is not a plain data pickle "
                              f"({type(e).__name__}: {message[0] if message else ''})") from None


def check_dist_checkpoint(directory: Path) -> None:
    """Read every pickle of a torch_dist checkpoint directory safely (see the module docstring);
    raise ConversionError naming the first file that is refused."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    directory = Path(directory)
    metadata = load_dcp_metadata(directory / ".metadata")
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        where = f"{directory / info.relative_path} (record {index.fqn!r})"
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(f"{where}: transformed records ({info.transform_descriptors}) are not supported")
        with open(data_file(directory, info.relative_path), "rb") as f:
            record = os.pread(f.fileno(), info.length, info.offset)
        if len(record) != info.length:
            raise ConversionError(f"{where}: the file ends inside the record")
        _weights_only_load(io.BytesIO(record), where)
    common = directory / "common.pt"
    if common.exists():
        _weights_only_load(str(common), str(common))
