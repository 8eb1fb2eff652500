"""Reading Hugging Face safetensors checkpoints (single file or sharded with an index), lazily.

`HFCheckpoint.get` maps one tensor's bytes at a time (`map_bytes`: a private mapping of just that
tensor, no copy), so nothing larger than the tensor asked for is resident (the mapped pages count
in the process's RSS while the tensor lives; `drop_pages` releases them early), and threads can
read in parallel. Every shard's header is read and checked when the checkpoint is opened
(`read_safetensors_header`), so a truncated or corrupt file fails there. Writing is
conversion/hf_writer.py; output directories are conversion/output_dir.py.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from conversion.dtypes import SAFETENSORS, dtype_from_safetensors, dtype_name
from conversion.errors import ConversionError
from conversion.hf_paths import checkpoint_member

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def read_safetensors_header(path: Path) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) from the header of `path`, after checking the file."""
    return {name: (d, shape) for name, (d, shape, _) in _read_header(path).items()}


def _read_header(path: Path) -> Dict[str, Tuple[str, Tuple[int, ...], int]]:
    """name -> (safetensors dtype, shape, absolute file offset of its data), after checking the file.

    Only the header is read. The checks make a truncated or corrupt file fail here, when the
    checkpoint is opened, instead of half-way through a conversion: the header length fits the
    file, the header is a JSON object of tensors with known dtypes, integer shapes and data offsets
    whose length matches dtype x shape, and the data section ends exactly at the end of the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ConversionError(f"{path}: truncated safetensors file ({size} bytes; not even the 8-byte header length)")
            n = int.from_bytes(prefix, "little")
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise ConversionError(f"{path}: corrupt or truncated safetensors header (header length {n} bytes, "
                                      f"file has {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{path}: corrupt safetensors header (expected a JSON object: {e})") from None
    out: Dict[str, Tuple[str, Tuple[int, ...], int]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            st_dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in list(shape) + [begin, stop]) or stop < begin:
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise ConversionError(f"{path}: corrupt safetensors header: entry for tensor {name!r} needs "
                                  "'dtype', 'shape' and 'data_offsets' [begin, end]") from None
        if st_dtype not in SAFETENSORS.values():
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype!r} "
                                  f"(expected one of {sorted(SAFETENSORS.values())})")
        nbytes = nbytes_of(shape, dtype_from_safetensors(st_dtype))
        if stop - begin != nbytes:
            raise ConversionError(f"{path}: corrupt safetensors header: tensor {name!r} {st_dtype} {list(shape)} "
                                  f"needs {nbytes} bytes, its data offsets give {stop - begin}")
        end = max(end, stop)
        out[name] = (st_dtype, tuple(shape), 8 + n + begin)
    data = size - 8 - n
    if end > data:
        raise ConversionError(f"{path}: truncated safetensors file: the header needs {end} bytes of tensor data, "
                              f"the file holds {data} ({size} bytes in all, expected {8 + n + end})")
    if end < data:
        raise ConversionError(f"{path}: corrupt safetensors file: {data - end} bytes after the last tensor "
                              f"(expected {8 + n + end} bytes, the file has {size})")
    return out


def nbytes_of(shape, dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype."""
    return math.prod(shape) * dtype.itemsize


class OpenFiles:
    """One OS file descriptor per file, opened on first use and shared by all threads (os.pread /
    os.pwrite carry their own offset, so threads share no seek position). `path_of(name)` gives
    the path of a file name (and may refuse it)."""

    def __init__(self, flags: int, path_of: Callable[[str], Path]):
        self.flags, self.path_of = flags, path_of
        self._fds: Dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, name: str) -> int:
        with self._lock:
            if name not in self._fds:
                self._fds[name] = os.open(self.path_of(name), self.flags)
            return self._fds[name]

    def close(self, fsync: bool = False) -> None:
        with self._lock:
            for fd in self._fds.values():
                if fsync:
                    os.fsync(fd)
                os.close(fd)
            self._fds.clear()


class HFCheckpoint:
    """Lazy view of the safetensors weights of a Hugging Face model directory.

    Opening it reads and checks every shard's header (see `read_safetensors_header`); tensor data
    is read only by `get` (thread-safe: a mapping per tensor of one descriptor per file).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConversionError(f"{self.root}: not a directory (expected a Hugging Face model directory)")
        index_path = self.root / INDEX_NAME
        self.weight_map: Dict[str, str] = {}
        self._files = OpenFiles(os.O_RDONLY, lambda file_name: self.root / file_name)
        self._meta: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {}
        self._headers: Dict[str, Dict[str, Tuple[str, Tuple[int, ...], int]]] = {}
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
                assert isinstance(weight_map, dict)
            except Exception as e:  # noqa: BLE001 - any malformed index is one error
                raise ConversionError(f"{index_path}: not a valid safetensors index ({e})") from None
            for name, file_name in weight_map.items():
                path = checkpoint_member(self.root, file_name, str(index_path))
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
            for name in self._header(file_name):
                self.weight_map[name] = file_name

    def _header(self, file_name: str) -> Dict[str, Tuple[str, Tuple[int, ...], int]]:
        if file_name not in self._headers:
            self._headers[file_name] = _read_header(self.root / file_name)
        return self._headers[file_name]

    def close(self) -> None:
        self._files.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _read_headers(self) -> None:
        """Read dtype and shape of every tensor from the shard headers (no tensor data is read)."""
        for file_name in sorted(set(self.weight_map.values())):
            header = self._header(file_name)
            for name in [n for n, f in self.weight_map.items() if f == file_name]:
                if name not in header:
                    raise ConversionError(f"{self.root / file_name}: tensor {name!r} listed in the index is missing")
                st_dtype, shape, _ = header[name]
                self._meta[name] = (dtype_from_safetensors(st_dtype), shape)
            unlisted = sorted(n for n in header if self.weight_map.get(n) != file_name)
            if unlisted:
                where = f"{INDEX_NAME} lists it in {self.weight_map[unlisted[0]]!r}" if unlisted[0] in self.weight_map \
                    else f"{INDEX_NAME} does not list it"
                raise ConversionError(f"{self.root / file_name}: holds tensor {unlisted[0]!r}, but {where} "
                                      "(the shards and the index disagree)")

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][0]

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, mapped from its file (`map_bytes`: no copy, the page cache's pages).
        They count in this process's RSS while it is used; `drop_pages(tensor)` gives them back
        early (the mapping itself goes with the tensor)."""
        if name not in self.weight_map:
            raise ConversionError(f"{self.root}: tensor {name!r} not found in the checkpoint")
        file_name = self.weight_map[name]
        dtype, shape = self._meta[name]
        offset = self._header(file_name)[name][2]
        try:
            return map_bytes(self._files.fd(file_name), offset, self.nbytes(name)).view(dtype).view(shape)
        except (OSError, EOFError, ValueError) as e:
            raise ConversionError(f"{self.root / file_name}: cannot read tensor {name!r} ({e})") from None

    def nbytes(self, name: str) -> int:
        dtype, shape = self._meta[name]
        return nbytes_of(shape, dtype)

    def source_files(self) -> List[str]:
        """The files that make up the checkpoint: its safetensors files, the index, config.json."""
        files = set(self.weight_map.values()) | {"config.json"}
        files |= {INDEX_NAME} if (self.root / INDEX_NAME).is_file() else set()
        return sorted(files)

    def manifest(self) -> Dict[str, dict]:
        """name -> {file, dtype, shape, offset}: what export needs to write the same files back
        (`offset`: where the tensor's bytes start in its file, see `SafetensorsWriter`)."""
        return {
            name: {"file": self.weight_map[name], "dtype": dtype_name(self._meta[name][0]),
                   "shape": list(self._meta[name][1]), "offset": self._header(self.weight_map[name])[name][2]}
            for name in self.weight_map
        }


def _libc():
    """The C library's mmap / munmap / madvise / fallocate on Linux; None elsewhere (the code then
    maps with Python's mmap module and allocates sparse files)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return libc


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def allocate(fd: int, size: int) -> None:
    """Make the file `size` bytes long with its blocks allocated up front (fallocate): threads then
    fill it at any offsets without the file system allocating blocks under the file's lock on
    every write (measured on ext4, 4 threads filling 2 files of 4 GiB: 8.2 s with allocated
    blocks, 10.7 s for sparse files, sync included). A sparse file where fallocate is unsupported."""
    if _LIBC is None or _LIBC.fallocate(fd, 0, 0, size) != 0:
        os.ftruncate(fd, size)


def map_bytes(fd: int, offset: int, nbytes: int) -> torch.Tensor:
    """Bytes [offset, offset + nbytes) of file `fd` as a uint8 tensor that maps them (no copy): a
    private copy-on-write mapping, so writing to the tensor never changes the file; its storage is
    exactly these bytes and not resizable (see `drop_pages`), and it is unmapped when the tensor's
    storage is freed. The mapping holds no file descriptor (Python's mmap objects hold one each:
    torch's checkpoint writer keeps a tensor per parameter name until its file is closed, hundreds
    at once). A file too short is refused (EOFError); one truncated while mapped would fault when
    the missing pages are touched."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    size = os.fstat(fd).st_size
    if offset + nbytes > size:
        raise EOFError(f"file ends {offset + nbytes - size} bytes early")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset + nbytes - start
    if _LIBC is None:
        region = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    else:
        address = _LIBC.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, start)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        region = (ctypes.c_char * length).from_address(address)
        unmap = weakref.finalize(region, _LIBC.munmap, address, length)  # when the tensor's storage lets go
        unmap.atexit = False  # at exit the process's mappings go with it; never unmap under a live object
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset - start)


def drop_pages(tensor: torch.Tensor) -> None:
    """Unmap from this process the whole pages of a tensor returned by `HFCheckpoint.get` (a
    private file mapping): its RSS falls now, although something (torch's checkpoint writer) may
    still hold the tensor. Reading it afterwards would read the file again; it is not read. (Linux;
    elsewhere a no-op.)"""
    storage, page = tensor.untyped_storage(), mmap.PAGESIZE
    begin = -(-storage.data_ptr() // page) * page
    end = (storage.data_ptr() + storage.nbytes()) // page * page
    if end > begin and _LIBC is not None:
        _LIBC.madvise(begin, end - begin, mmap.MADV_DONTNEED)

