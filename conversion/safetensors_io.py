"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded with an index).

Reading is lazy: `HFCheckpoint.get` maps one tensor's bytes at a time (`map_bytes`: a private
mapping of just that tensor, no copy), so nothing larger than the tensor asked for is resident (the
mapped pages count in the process's RSS while the tensor lives; `drop_pages` releases them early),
and threads can read in parallel. Writing (`SafetensorsWriter`) lays every file out from the names,
dtypes and shapes first (header, offsets, file size), then each tensor is written at its offset with
`os.pwrite` whenever it arrives, in any order, from any thread or rank: no file is ever buffered
in memory. The safetensors library has no such writer (`save_file` takes a whole dict of tensors);
the files are plain safetensors (8-byte header length, JSON header, contiguous data) and the tests
read them back with the safetensors library and transformers. Output keeps the shard layout of the
source when one is given (so HF -> Megatron -> HF gives back the same files), otherwise it packs
tensors into shards of at most `max_shard_bytes`.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from conversion.direct_io import PAGE, DirectFile
from conversion.dtypes import SAFETENSORS, dtype_from_safetensors, dtype_name, safetensors_dtype
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
    `close()` flushes. `missing()` names the tensors not written by this writer object.
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
            pause_for_tests("mid-export")

    @property
    def direct_bytes(self) -> int:
        """Bytes written to the disk directly so far (see `direct_io`)."""
        return sum(f.direct_bytes for f in self._files.values())

    def missing(self) -> List[str]:
        return sorted(set(self.specs) - self.written)

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
    missing = writer.missing()
    if missing:
        raise ConversionError(f"export did not produce {len(missing)} tensor(s), e.g. {missing[0]!r}")
    writer.write_index()


# ---------------------------------------------------------------------------- output directories
#
# Outputs are written into a hidden sibling `.{name}.tmp-{host}-{pid}-{random}` and renamed to
# `{name}` only when complete; `--overwrite` moves the old output to `.{name}.old-{host}-{pid}` for
# the moment of the swap. A run killed at any moment (SIGKILL, OOM, power loss) therefore leaves at
# most such hidden siblings, never a directory at the output path. The next run into the same
# output removes the siblings whose process (same host, pid not running) is gone; siblings of a
# live process (a concurrent run) or of another host (shared file systems) are left alone.

_FINALIZER: "contextvars.ContextVar[Optional[Callable[[Path], None]]]" = contextvars.ContextVar("finalizer", default=None)


@contextlib.contextmanager
def finalize_outputs_with(fn: Callable[[Path], None]):
    """Within this block, `atomic_output_dir` calls `fn(tmp)` once the output is complete and
    before it is renamed into place (the Megatron checkpoint writes its checksum file this way)."""
    token = _FINALIZER.set(fn)
    try:
        yield
    finally:
        _FINALIZER.reset(token)


FREE_BYTES_ENV = "BRIDGE_FAKE_FREE_BYTES"   # tests: pretend the output's file system has this many free bytes
TEST_PAUSE_ENV = "BRIDGE_TEST_PAUSE"        # tests: "POINT:MARKER_FILE" -> at POINT, create MARKER_FILE and sleep


def pause_for_tests(point: str) -> None:
    """Test hook for the interruption tests: with BRIDGE_TEST_PAUSE=POINT:FILE[:GO], create FILE at
    POINT and wait (up to 10 minutes, or until the file GO exists) so that the test can kill or
    interrupt the process there, or run another one meanwhile. Points:
    `before-rename` (the output is complete in its temporary directory) and `mid-export` (the
    export has laid out its safetensors files and written its first tensor). Unset (always, outside tests): does nothing."""
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec or spec.split(":", 1)[0] != point:
        return
    import time

    _, marker, go = (spec.split(":", 2) + [""])[:3]
    Path(marker).write_text(str(os.getpid()))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (go and Path(go).exists()):  # POINT:MARKER:GO resumes on GO
        time.sleep(0.05)


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in os.uname().nodename) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> List[Path]:
    """Remove `.{name}.tmp-*` / `.{name}.old-*` siblings left by killed runs on this host."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    host = _host()
    for kind in ("tmp", "old"):
        prefix = f".{path.name}.{kind}-{host}-"
        for sibling in path.parent.glob(f".{glob_escape(path.name)}.{kind}-*"):
            rest = sibling.name[len(prefix):] if sibling.name.startswith(prefix) else ""
            pid = rest.split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)) and sibling.is_dir():
                shutil.rmtree(sibling, ignore_errors=True)
                removed.append(sibling)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def check_output_path(path: str | os.PathLike, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output path that exists and is not an empty directory (unless `overwrite`), that
    is a file, or that is / contains / lies inside one of the `inputs`. Cheap; run it before any work."""
    path = Path(path)
    resolved = path.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if resolved == src or resolved in src.parents or src in resolved.parents:
            raise ConversionError(f"{path}: output path must be outside the input {src} (and not contain it)")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ConversionError(f"{path}: output path exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise ConversionError(f"{path}: output path exists and is not empty (pass --overwrite to replace it)")
    return path


def free_bytes(directory: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `directory` (its nearest existing ancestor).
    BRIDGE_FAKE_FREE_BYTES, when set, is returned instead (for tests); it is read only here."""
    fake = os.environ.get(FREE_BYTES_ENV)
    if fake:
        return int(fake)
    d = Path(directory).absolute()
    while not d.exists() and d != d.parent:
        d = d.parent
    return shutil.disk_usage(d).free


def check_free_space(output: str | os.PathLike, needed: int, what: str = "the output") -> None:
    """Refuse to start when the output's file system has fewer than `needed` free bytes."""
    output = Path(output)
    free = free_bytes(output.parent)
    if needed > free:
        raise ConversionError(f"{output}: not enough free disk space for {what}: needs about {_gib(needed)} "
                              f"({needed} bytes), the file system of {output.parent} has {_gib(free)} free")


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**2 else f"{n} B"


def dir_bytes(directory: str | os.PathLike, keep=lambda p: True) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file() and keep(p))


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory that is renamed to `path` only when the block succeeds.

    A crash or kill at any moment leaves at most a hidden `.{name}.tmp-*` sibling, never a directory
    at `path` that looks like a finished checkpoint; the next run removes it (see above). On an
    exception (including Ctrl-C) the temporary is removed, and so are parent directories this call
    created.
    """
    path = Path(path)
    check_output_path(path, overwrite)
    created = []
    parent = path.parent.absolute()
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tag = f"{_host()}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{tag}-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the output gets the usual permissions
    try:
        yield tmp
        finalizer = _FINALIZER.get()
        if finalizer is not None:
            finalizer(tmp)
        pause_for_tests("before-rename")
        fsync_tree(tmp)
        _publish(tmp, path, overwrite, tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break
        raise
    _fsync_path(path.parent)


def fsync_tree(root: Path) -> None:
    """Every file and directory under `root` (and `root`) on stable storage: a crash after the
    rename that publishes it must not leave a checkpoint whose files are partly unwritten."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(directory) / name)
        _fsync_path(Path(directory))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap the two paths atomically (Linux >= 3.15)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _publish(tmp: Path, path: Path, overwrite: bool, tag: str) -> None:
    """Rename the complete temporary `tmp` to `path`.

    Without `overwrite`: a plain rename(2), which replaces nothing but an empty directory, so of
    two runs into one output the one that finishes second fails (naming the output) instead of
    replacing the first one's result. With `overwrite` and an existing output: the two directories
    are swapped atomically (renameat2 RENAME_EXCHANGE), so at every moment `path` is either the old
    or the new output; the old one is then removed. Where the file system cannot swap, the old
    output is first renamed to a hidden `.NAME.old-*` sibling (which survives a crash in between)."""
    try:
        os.rename(tmp, path)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not overwrite:
            raise ConversionError(f"{path}: another run completed this output while this one was running; "
                                  "this run's result was discarded (pass --overwrite to replace it)") from None
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # the old output, now at the temporary's name
        return
    old = path.with_name(f".{path.name}.old-{tag}")
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
