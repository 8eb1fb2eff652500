"""Writing a Hugging Face model directory: safetensors files laid out up front and filled tensor
by tensor (`SafetensorsWriter`), the index, config.json and the source's non-weight files
(`write_config_and_assets`, `copy_assets`).

`SafetensorsWriter` lays every file out from the names, dtypes and shapes first (header, offsets,
file size), then each tensor is written at its offset with `os.pwrite` whenever it arrives, in
any order, from any thread or rank: no file is ever buffered in memory. The safetensors library
has no such writer (`save_file` takes a whole dict of tensors); the files are plain safetensors
(8-byte header length, JSON header, contiguous data) and the tests read them back with the
safetensors library and transformers. Output keeps the shard layout of the source when one is
given (so HF -> Megatron -> HF gives back the same files), otherwise it packs tensors into shards
of at most `max_shard_bytes`.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import threading
from pathlib import Path
from typing import Collection, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from conversion.direct_io import PAGE, DirectFile
from conversion.dtypes import safetensors_dtype
from conversion.errors import ConversionError
from conversion.output_dir import hooks
from conversion.safetensors_io import INDEX_NAME, PICKLE_NAMES, SINGLE_NAME, allocate, nbytes_of

CONFIG_NAME = "config.json"


def is_weight_file(name: str) -> bool:
    """A file of a model directory that holds weights (or their index): never an asset."""
    return name.endswith(".safetensors") or name == INDEX_NAME or name in PICKLE_NAMES


def copy_assets(src_dir: Optional[Path], dest: Path, leave_out: Collection[str] = ()) -> None:
    """Copy every file of `src_dir` but the weights (tokenizer, generation config, ...) to the same
    relative path under `dest`; `leave_out`: relative paths not to copy. The one asset copier of
    the HF exports, the Megatron checkpoint's `hf_assets/` and the fine-tuning checkpoints."""
    if src_dir is None:
        return
    src_dir = Path(src_dir)
    for src in sorted(src_dir.rglob("*")):
        rel = src.relative_to(src_dir)
        if not src.is_file() or is_weight_file(src.name) or rel.as_posix() in leave_out:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def write_config_and_assets(out_dir: Path, config: dict, assets_dir: Optional[Path]) -> None:
    """What an HF directory holds besides its weights and index: config.json (`config`) and the
    source's non-weight files (its own config.json left out: `config` replaces it)."""
    copy_assets(assets_dir, out_dir, leave_out={CONFIG_NAME})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


MAX_SHARD_BYTES = 5 * 1024**3  # the largest shard an export without a source manifest writes


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


def _byte_view(tensor: torch.Tensor):
    """The bytes of a contiguous CPU tensor as a writable buffer (no copy; the caller keeps `tensor`
    alive while using it). Not via `.numpy()`, which would pin the storage for good and make it
    impossible to free early (see bridge/streaming.py)."""
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    return memoryview((ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())).cast("B")


def _data_start_residue(entries: Dict[str, dict], origins: Dict[str, int]) -> int:
    """Where, modulo the page size, a safetensors file's data should start so that its largest
    tensor with a known origin sits at the page offset it had in its source file (every tensor
    does when the file holds the source file's tensors in the source's order); a page boundary
    without origins. Kept a multiple of 8 (the safetensors library's alignment)."""
    known = [(e["data_offsets"][1] - e["data_offsets"][0], n) for n, e in entries.items() if n in origins]
    if not known:
        return 0
    _, name = max(known)
    residue = (origins[name] - entries[name]["data_offsets"][0]) % PAGE
    return residue if residue % 8 == 0 else 0


class SafetensorsWriter:
    """Safetensors files laid out up front, filled tensor by tensor at known offsets.

    `specs`: name -> (file name, torch dtype, shape). Within a file, tensors are ordered as in the
    source file they came from (`origins`: name -> the tensor's byte offset there, from the
    manifest), else as the safetensors library orders them (wider dtypes first, then by name); the
    header is padded with spaces (which the format allows) so that the data starts where it
    started in the source modulo the page size (else at a page boundary). Each tensor then sits at
    the page offset it had in the source, as its mapping in a checkpoint converted from that
    source does (bridge/streaming.py places them so): it goes to the disk without a copy
    (`direct_io.DirectFile`). `create()` writes every header and sizes every file (one process:
    rank 0); `write(name, tensor)` may then be called from any thread or process, in any order;
    `close()` flushes. `check_complete()` refuses a tensor not written by this writer object.
    """

    def __init__(self, out_dir: Path, specs: Dict[str, Tuple[str, torch.dtype, Tuple[int, ...]]],
                 origins: Optional[Dict[str, int]] = None):
        self.out_dir = Path(out_dir)
        self.specs = specs
        self.offsets: Dict[str, int] = {}
        self.file_sizes: Dict[str, int] = {}
        self.headers: Dict[str, bytes] = {}
        origins = origins or {}
        for file_name in sorted({f for f, _, _ in specs.values()}):
            names = sorted((n for n, (f, _, _) in specs.items() if f == file_name),
                           key=lambda n: (0, origins[n], nbytes_of(specs[n][2], specs[n][1]), n) if n in origins
                           else (1, -specs[n][1].itemsize, n))  # (an empty tensor sits before one at its offset)
            entries, pos = {}, 0
            for n in names:
                _, dtype, shape = specs[n]
                nbytes = nbytes_of(shape, dtype)
                entries[n] = {"dtype": safetensors_dtype(dtype), "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
            header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
            header += b" " * ((_data_start_residue(entries, origins) - 8 - len(header)) % PAGE)
            start = 8 + len(header)
            self.headers[file_name] = len(header).to_bytes(8, "little") + header
            self.file_sizes[file_name] = start + pos
            for n in names:
                self.offsets[n] = start + entries[n]["data_offsets"][0]
        self._files: Dict[str, DirectFile] = {}
        self._lock = threading.Lock()
        self.written: set = set()
        self._paused = False

    def create(self) -> None:
        for file_name, header in self.headers.items():
            with open(self.out_dir / file_name, "wb") as f:
                f.write(header)
                allocate(f.fileno(), self.file_sizes[file_name])

    def _file(self, file_name: str) -> DirectFile:
        with self._lock:
            if file_name not in self._files:
                self._files[file_name] = DirectFile(self.out_dir / file_name)
            return self._files[file_name]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.specs:
            raise ConversionError(f"export produced tensor {name!r} that has no destination file")
        file_name, dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ConversionError(f"export produced tensor {name!r} as {tensor.dtype} {tuple(tensor.shape)}, "
                                  f"expected {dtype} {tuple(shape)}")
        with self._lock:
            if name in self.written:
                raise ConversionError(f"export produced tensor {name!r} twice")
            self.written.add(name)
        tensor = tensor.detach().cpu().contiguous()
        self._file(file_name).pwrite(_byte_view(tensor), self.offsets[name])
        if not self._paused:
            self._paused = True
            hooks.pause("mid-export")

    @property
    def direct_bytes(self) -> int:
        """Bytes written to the disk directly so far (see `direct_io`)."""
        return sum(f.direct_bytes for f in self._files.values())

    def check_complete(self, names: Optional[Iterable[str]] = None) -> None:
        """Refuse a tensor of `names` (default: every tensor of the files) that this writer object
        has not written."""
        missing = sorted(set(self.specs if names is None else names) - self.written)
        if missing:
            raise ConversionError(f"export did not produce {len(missing)} tensor(s), e.g. {missing[0]!r}")

    def close(self, fsync: bool = True) -> None:
        with self._lock:
            files, self._files = list(self._files.values()), {}
        for f in files:
            f.close(fsync=fsync)

    def write_index(self) -> None:
        """`model.safetensors.index.json` when there is more than one file."""
        if len(self.headers) > 1:
            total = sum(nbytes_of(shape, dtype) for _, dtype, shape in self.specs.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for n, (f, _, _) in sorted(self.specs.items())}}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_hf_weights(out_dir: Path, tensors: Iterator[Tuple[str, torch.Tensor]],
                     specs: Dict[str, Tuple[str, torch.dtype, Tuple[int, ...]]],
                     origins: Optional[Dict[str, int]] = None) -> None:
    """Write `tensors` (every name of `specs`, once) into the safetensors files `specs` names, + index."""
    writer = SafetensorsWriter(out_dir, specs, origins)
    writer.create()
    try:
        for name, tensor in tensors:
            writer.write(name, tensor)
    finally:
        writer.close()
    writer.check_complete()
    writer.write_index()


