"""Writing converted tensors to disk without copying them into the page cache (O_DIRECT).

A buffered write copies every byte into the page cache, and the kernel later writes the cached
pages back: on the 2-core benchmark machine that copy, not the disk, is what limits `cp -r` and
the conversions (about 1 CPU-second per 0.75 GB). With O_DIRECT the disk reads the bytes straight
from the process's memory; for a tensor that is a mapping of its source file (`map_bytes`) that
memory is the source's own page-cache pages, so nothing is copied at all (`benchmarks/write_paths.py`,
8.94 GiB on that machine: 5.3 s, against 11.7 s for `cp -r` + sync and 9.6 s through an aligned
buffer).

O_DIRECT needs the file offset, the length and the memory address aligned (to the device's logical
block, 512 bytes on most disks; `PAGE` is used, which every device accepts). `DirectFile.pwrite`
therefore writes the page-aligned interior of a range directly and its unaligned head and tail
(under a page each) through the page cache. The two never meet on one page: a page is either
inside one write's interior or holds edges only, so the kernel's page-cache invalidation around a
direct write never discards buffered bytes. When the interior's memory is not aligned like its
file offset (a source tensor at an unaligned file position), it is copied through a small aligned
buffer first, which still skips the page cache. The writers place tensors so that the usual case
is aligned: `streaming.py` pads DCP records, `SafetensorsWriter` pads headers.

A file system without O_DIRECT (tmpfs, some network file systems), or `BRIDGE_DIRECT_IO=0` in the
environment, gets ordinary buffered writes: same bytes, same files.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from pathlib import Path

PAGE = mmap.PAGESIZE
MIN_DIRECT = 1 << 20   # smaller ranges are written through the page cache (a syscall saves nothing)
BOUNCE = 8 << 20       # the per-thread aligned buffer for interiors whose memory is not aligned
_MAX_WRITE = 1 << 30   # one write() moves at most ~2 GiB on Linux; stay well under
DIRECT_IO_ENV = "BRIDGE_DIRECT_IO"


def direct_io_enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get(DIRECT_IO_ENV, "1") != "0"


_bounce = threading.local()


def _bounce_buffer() -> memoryview:
    if getattr(_bounce, "buffer", None) is None:
        _bounce.buffer = mmap.mmap(-1, BOUNCE)  # anonymous mappings are page-aligned
    return memoryview(_bounce.buffer)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + _MAX_WRITE], offset + done)


class DirectFile:
    """A file written at known offsets, from any number of threads (disjoint ranges), the
    page-aligned interior of each range with O_DIRECT. `close(fsync=True)` makes it durable."""

    def __init__(self, path: Path, flags: int = os.O_WRONLY, mode: int = 0o666):
        self.path = Path(path)
        self.fd = os.open(self.path, flags, mode)
        self.direct = None
        if direct_io_enabled():
            try:
                self.direct = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                self.direct = None
        self._direct_fd = self.direct  # closed by close(), never while another thread may use it
        self.direct_bytes = 0  # bytes that went to the disk directly (the tests look)
        self._lock = threading.Lock()

    def pwrite(self, data, offset: int) -> None:
        """Write the bytes of the contiguous buffer `data` at `offset`."""
        data = memoryview(data).cast("B")
        address = buffer_address(data)
        n = len(data)
        head = -offset % PAGE                       # [0, head) and [tail, n) are the unaligned edges
        tail = head + (n - head) // PAGE * PAGE if n > head else head
        direct = self.direct
        if direct is None or tail - head < MIN_DIRECT:
            _pwrite_all(self.fd, data, offset)
            return
        try:
            if (address + head) % PAGE == 0:       # the memory is aligned like the file: no copy
                _pwrite_all(direct, data[head:tail], offset + head)
            else:
                buffer = _bounce_buffer()
                for start in range(head, tail, BOUNCE):
                    k = min(BOUNCE, tail - start)
                    buffer[:k] = data[start:start + k]
                    _pwrite_all(direct, buffer[:k], offset + start)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.direct = None                     # the file system refuses O_DIRECT writes after all
            _pwrite_all(self.fd, data, offset)
            return
        with self._lock:
            self.direct_bytes += tail - head
        _pwrite_all(self.fd, data[:head], offset)
        _pwrite_all(self.fd, data[tail:], offset + tail)

    def close(self, fsync: bool = False) -> None:
        if self.fd < 0:
            return
        try:
            if fsync:
                os.fsync(self.fd)  # the buffered edges, the size, and the device's write cache
        finally:
            if self._direct_fd is not None:
                os.close(self._direct_fd)
            os.close(self.fd)
            self.fd, self.direct = -1, None


class _PyBuffer(ctypes.Structure):  # CPython's Py_buffer
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def buffer_address(obj) -> int:
    """Address of the memory of a (contiguous) buffer object, read-only ones included (ctypes'
    from_buffer wants a writable one; torch's checkpoint writer hands out read-only views)."""
    view = _PyBuffer()
    if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(obj), ctypes.byref(view), 0) != 0:
        raise TypeError(f"{type(obj).__name__} does not expose a contiguous buffer")
    try:
        return view.buf or 0
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


class DirectStream:
    """A file written front to back (the file-like object torch.save and torch.distributed.checkpoint
    write to) through `DirectFile`. Small writes are gathered in memory and written together;
    `skip(n)` leaves n bytes unwritten (a hole, read as zeros), which lets the caller place the
    next large write at the page offset of its memory (see bridge/streaming.py)."""

    def __init__(self, path: Path):
        self.file = DirectFile(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.pos = 0
        self._small = bytearray()
        self._small_at = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if n < MIN_DIRECT:
            if not self._small:
                self._small_at = self.pos
            self._small += view
            if len(self._small) >= MIN_DIRECT:
                self._flush_small()
        else:
            self._flush_small()
            self.file.pwrite(view, self.pos)
        self.pos += n
        return n

    def skip(self, n: int) -> None:
        self._flush_small()
        self.pos += n

    def _flush_small(self) -> None:
        if self._small:
            _pwrite_all(self.file.fd, memoryview(self._small), self._small_at)
            self._small.clear()

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self._flush_small()

    def fileno(self) -> int:
        self._flush_small()  # callers fsync the descriptor: everything written must be in the file
        return self.file.fd

    def close(self, fsync: bool = False) -> None:
        if self.file.fd < 0:
            return  # closed already (torch's checkpoint writer closes the streams it is given)
        try:
            self._flush_small()
            os.ftruncate(self.file.fd, self.pos)  # a trailing hole still counts in the size
        finally:
            self.file.close(fsync=fsync)
