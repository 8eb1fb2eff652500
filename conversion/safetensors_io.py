"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded with an index).

Reading is lazy: `HFCheckpoint` opens each shard with `safe_open` and returns one tensor at a time,
so nothing larger than the tensor asked for is materialised. Writing keeps the shard layout of the
source when one is given (so HF -> Megatron -> HF gives back the same files), otherwise it packs
tensors into shards of at most `max_shard_bytes`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conversion.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")

# safetensors dtype strings <-> torch dtypes (the ones checkpoints of this model use, plus ints).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_NAME = {
    torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
    torch.bfloat16: "bfloat16", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
    torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
}
_NAME_TO_TORCH = {v: k for k, v in _TORCH_TO_NAME.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _TORCH_TO_NAME[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _NAME_TO_TORCH[name]
    except KeyError:
        raise ConversionError(f"unknown dtype {name!r}; expected one of {sorted(_NAME_TO_TORCH)}") from None


def _safe_member(root: Path, file_name: str, where: str) -> Path:
    """Resolve `file_name` inside `root`, refusing names that escape it (`../x`, absolute paths)."""
    if not isinstance(file_name, str) or not file_name or os.path.isabs(file_name):
        raise ConversionError(f"{where}: shard name {file_name!r} must be a relative file name inside {root}")
    path = (root / file_name).resolve()
    if root.resolve() not in path.parents:
        raise ConversionError(f"{where}: shard name {file_name!r} escapes the checkpoint directory {root}")
    return path


class HFCheckpoint:
    """Lazy view of the safetensors weights of a Hugging Face model directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConversionError(f"{self.root}: not a directory (expected a Hugging Face model directory)")
        index_path = self.root / INDEX_NAME
        self.weight_map: Dict[str, str] = {}
        self._handles: Dict[str, object] = {}
        self._meta: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {}
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
                assert isinstance(weight_map, dict)
            except Exception as e:  # noqa: BLE001 - any malformed index is one error
                raise ConversionError(f"{index_path}: not a valid safetensors index ({e})") from None
            for name, file_name in weight_map.items():
                path = _safe_member(self.root, file_name, str(index_path))
                if not path.is_file():
                    raise ConversionError(f"{index_path}: tensor {name!r} is in shard {file_name!r}, which does not exist")
                self.weight_map[name] = file_name
        elif (self.root / SINGLE_NAME).is_file():
            self._scan_files([SINGLE_NAME])
        else:
            files = sorted(p.name for p in self.root.glob("*.safetensors"))
            if files:
                self._scan_files(files)
            elif any((self.root / n).exists() for n in PICKLE_NAMES):
                raise ConversionError(
                    f"{self.root}: holds only pickle weights (pytorch_model.bin); they are never unpickled here - "
                    "safetensors is required (convert with transformers' save_pretrained(safe_serialization=True))")
            else:
                raise ConversionError(f"{self.root}: no model.safetensors or {INDEX_NAME} found")
        self._read_headers()

    def _scan_files(self, files: List[str]) -> None:
        for file_name in files:
            for name in self._open(file_name).keys():
                self.weight_map[name] = file_name

    def _open(self, file_name: str):
        handle = self._handles.get(file_name)
        if handle is None:
            path = self.root / file_name
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001
                raise ConversionError(f"{path}: cannot read safetensors file ({e})") from None
            self._handles[file_name] = handle
        return handle

    def _read_headers(self) -> None:
        """Read dtype and shape of every tensor from the shard headers (no tensor data is read)."""
        for file_name in sorted(set(self.weight_map.values())):
            handle = self._open(file_name)
            names_in_file = set(handle.keys())
            for name in [n for n, f in self.weight_map.items() if f == file_name]:
                if name not in names_in_file:
                    raise ConversionError(f"{self.root / file_name}: tensor {name!r} listed in the index is missing")
                sl = handle.get_slice(name)
                st_dtype = sl.get_dtype()
                if st_dtype not in _ST_DTYPES:
                    raise ConversionError(f"{self.root / file_name}: tensor {name!r} has unsupported dtype {st_dtype}")
                self._meta[name] = (_ST_DTYPES[st_dtype], tuple(sl.get_shape()))

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][0]

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.root}: tensor {name!r} not found in the checkpoint")
        file_name = self.weight_map[name]
        try:
            return self._open(file_name).get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{self.root / file_name}: cannot read tensor {name!r} ({e})") from None

    def nbytes(self, name: str) -> int:
        dtype, shape = self._meta[name]
        n = 1
        for s in shape:
            n *= s
        return n * torch.empty((), dtype=dtype).element_size()

    def manifest(self) -> Dict[str, dict]:
        """name -> {file, dtype, shape}: what export needs to write the same files back."""
        return {
            name: {"file": self.weight_map[name], "dtype": dtype_name(self._meta[name][0]),
                   "shape": list(self._meta[name][1])}
            for name in self.weight_map
        }


def plan_shards(tensors: Iterable[Tuple[str, int]], max_shard_bytes: int) -> Dict[str, str]:
    """Assign (name, nbytes) pairs, in order, to `model-0000i-of-0000n.safetensors` files."""
    groups: List[List[str]] = [[]]
    size = 0
    for name, nbytes in tensors:
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {name: SINGLE_NAME for name in groups[0]}
    n = len(groups)
    return {name: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, g in enumerate(groups) for name in g}


def write_hf_weights(out_dir: Path, tensors: Iterator[Tuple[str, torch.Tensor]], weight_map: Dict[str, str]) -> None:
    """Write `tensors` into the safetensors files named by `weight_map` (+ the index when sharded).

    Tensors are buffered per destination file and each file is written as soon as all of its
    tensors have arrived, so memory holds at most the files still being filled.
    """
    remaining: Dict[str, set] = {}
    for name, file_name in weight_map.items():
        remaining.setdefault(file_name, set()).add(name)
    pending: Dict[str, Dict[str, torch.Tensor]] = {f: {} for f in remaining}
    seen = set()
    for name, tensor in tensors:
        if name not in weight_map:
            raise ConversionError(f"export produced tensor {name!r} that has no destination file")
        if name in seen:
            raise ConversionError(f"export produced tensor {name!r} twice")
        seen.add(name)
        file_name = weight_map[name]
        pending[file_name][name] = tensor.detach().contiguous()
        remaining[file_name].discard(name)
        if not remaining[file_name]:
            save_file(pending.pop(file_name), str(out_dir / file_name), metadata={"format": "pt"})
    missing = sorted(set(weight_map) - seen)
    if missing:
        raise ConversionError(f"export did not produce {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": _total_size(out_dir, weight_map)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _total_size(out_dir: Path, weight_map: Dict[str, str]) -> int:
    total = 0
    for file_name in sorted(set(weight_map.values())):
        with safe_open(str(out_dir / file_name), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 1
                for s in sl.get_shape():
                    n *= s
                total += n * torch.empty((), dtype=_ST_DTYPES[sl.get_dtype()]).element_size()
    return total


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory that is renamed to `path` only when the block succeeds.

    A crash or kill at any moment leaves at most a hidden `.{name}.tmp-*` sibling, never a directory
    at `path` that looks like a finished checkpoint. On an exception the temporary is removed.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())) and not overwrite:
        raise ConversionError(f"{path}: output path exists and is not empty (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
