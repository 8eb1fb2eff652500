"""Unit tests of conversion/direct_io.py (O_DIRECT writing) and of the safetensors layout that
relies on it (SafetensorsWriter with `origins`). CPU only, a few hundred KiB of I/O, no skips:
whether O_DIRECT is available depends on the file system of pytest's tmp_path, and the tests
check the direct path where it is and the buffered fallback where it is not."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import conversion.direct_io as dio
from conversion.direct_io import PAGE, DirectFile, DirectStream, buffer_address
from conversion.dtypes import dtype_from_name
from conversion.hf_writer import SafetensorsWriter, _data_start_residue
from conversion.safetensors_io import HFCheckpoint

P = PAGE
SMALL_MIN_DIRECT = 2 * P
SMALL_BOUNCE = 16 * P  # 64 KiB with 4 KiB pages


@pytest.fixture
def small_sizes(monkeypatch):
    """MIN_DIRECT and BOUNCE shrunk so that a few hundred KiB exercise every path. The per-thread
    bounce buffer is replaced too: a main-thread buffer of the small size must not outlive the test
    (later tests would find it shorter than the restored BOUNCE)."""
    monkeypatch.setattr(dio, "MIN_DIRECT", SMALL_MIN_DIRECT)
    monkeypatch.setattr(dio, "BOUNCE", SMALL_BOUNCE)
    monkeypatch.setattr(dio, "_bounce", threading.local())
    calls = []
    real = dio._bounce_buffer
    monkeypatch.setattr(dio, "_bounce_buffer", lambda: (calls.append(1), real())[1])
    return calls  # one entry per pwrite that copied through the bounce buffer


def o_direct_works(directory: Path) -> bool:
    """Whether the file system of `directory` takes an aligned O_DIRECT write."""
    path = directory / "probe"
    path.write_bytes(b"")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    try:
        buf = mmap.mmap(-1, P)
        os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        path.unlink()


def interior(offset: int, n: int) -> int:
    """Length of the whole pages inside [offset, offset + n)."""
    return max(0, (offset + n) // P * P - -(-offset // P) * P)


# (length, memory) pieces laid end to end; "A": memory aligned like the file offset (zero copy),
# "U": memory 8 bytes off (bounce buffer). Offsets follow from the lengths, so the pieces cover
# the file, neighbours share pages at their edges, and each repetition shifts all alignments.
PIECES = [
    (5 * P + 100, "A"),   # aligned start, unaligned end: direct [0, 5P) + buffered tail
    (40 * P + 200, "U"),  # shares page 5 with the previous piece; interior 39P > BOUNCE: bounce loops
    (P + 37, "A"),        # smaller than MIN_DIRECT: buffered
    (10, "U"),            # a few bytes inside one page
    (2 * P, "A"),         # >= MIN_DIRECT but its interior (one page) is not: buffered
    (20 * P + 999, "A"),  # unaligned both ends, 19 whole pages direct without a copy
    (P - 1346, "U"),      # brings the next piece to a page boundary
    (17 * P, "U"),        # page-aligned both ends, 17P > BOUNCE: two bounce rounds
    (30 * P, "A"),        # page-aligned both ends, zero copy
    (3 * P + 5, "U"),     # bounce, single round
]


def layout(repeats: int = 3):
    ranges, offset = [], 0
    for _ in range(repeats):
        for n, kind in PIECES:
            ranges.append((offset, n, kind))
            offset += n
    return ranges, offset


def write_ranges(path: Path, seed: int = 0):
    """Write the pieces from 6 threads in random order; return (file, expected bytes, ranges)."""
    ranges, total = layout()
    rng = random.Random(seed)
    want = rng.randbytes(total)
    aligned = mmap.mmap(-1, total)          # want[i] at aligned[i]: memory aligned like the file
    aligned[:] = want
    shifted = mmap.mmap(-1, total + 8)      # want[i] at shifted[i + 8]: never aligned like the file
    shifted[8:] = want
    va, vs = memoryview(aligned), memoryview(shifted)
    f = DirectFile(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)

    def one(r):
        offset, n, kind = r
        data = va[offset:offset + n] if kind == "A" else vs[offset + 8:offset + 8 + n]
        f.pwrite(data, offset)

    order = list(ranges)
    rng.shuffle(order)
    with ThreadPoolExecutor(6) as pool:
        for fut in [pool.submit(one, r) for r in order]:
            fut.result()
    return f, want, ranges


def test_pwrite_threads_cover_file_exactly(tmp_path, small_sizes):
    """Concurrent pwrites of disjoint ranges (zero-copy, bounce, buffered, page-sharing edges) give
    exactly the intended bytes; with O_DIRECT, exactly the big interiors went direct, and only the
    unaligned memory went through the bounce buffer."""
    direct_ok = o_direct_works(tmp_path)
    path = tmp_path / "out.bin"
    fds = open_fds()
    f, want, ranges = write_ranges(path)
    direct, direct_bytes = f.direct, f.direct_bytes
    f.close(fsync=True)
    f.close()
    assert open_fds() == fds  # both descriptors (buffered and O_DIRECT) closed
    assert path.read_bytes() == want
    big = [(o, n, k) for o, n, k in ranges if interior(o, n) >= SMALL_MIN_DIRECT]
    if direct_ok:
        assert direct is not None
        assert direct_bytes == sum(interior(o, n) for o, n, _ in big) > 0
        assert sum(interior(o, n) for o, n, k in big if k == "A") > 0
        assert len(small_sizes) == sum(k == "U" for _, _, k in big) > 0  # "A" ranges never copied
    else:
        assert direct is None and direct_bytes == 0


def test_pwrite_buffered_fallback(tmp_path, small_sizes, monkeypatch):
    """BRIDGE_DIRECT_IO=0: no O_DIRECT descriptor, nothing written directly, same bytes."""
    monkeypatch.setenv("BRIDGE_DIRECT_IO", "0")
    path = tmp_path / "out.bin"
    f, want, _ = write_ranges(path, seed=1)
    assert f.direct is None and f.direct_bytes == 0 and not small_sizes
    f.close()
    assert path.read_bytes() == want


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_direct_stream_writes_holes_fileno_close(tmp_path, small_sizes):
    """DirectStream: small and large (read-only, typed, aligned) writes at tell(), holes from skip()
    read as zeros, fileno() flushes gathered small writes, size includes a trailing hole, close twice
    releases its descriptors once."""
    rng = random.Random(2)
    fds = open_fds()
    path = tmp_path / "stream.bin"
    s = DirectStream(path)
    want = bytearray()

    def write(data, raw: bytes):
        assert s.write(data) == len(raw)
        want.extend(raw)
        assert s.tell() == len(want)

    def skip(n):
        s.skip(n)
        want.extend(bytes(n))
        assert s.tell() == len(want)

    a, b = rng.randbytes(100), rng.randbytes(3000)
    write(a, a)
    write(b, b)                                             # both still gathered (< MIN_DIRECT)
    skip(900)                                               # a hole
    c = rng.randbytes(40)
    write(c, c)                                             # gathered again, after the hole
    skip(60)                                                # another hole between small writes
    write(c, c)
    big = rng.randbytes(5 * P + 3)
    write(memoryview(big), big)                             # read-only, unaligned memory: bounce
    floats = np.arange(3 * P, dtype=np.float32)             # 12 KiB of float32: a non-byte format
    write(memoryview(floats), floats.tobytes())
    skip(-len(want) % P)                                    # to a page boundary ...
    aligned = mmap.mmap(-1, 20 * P)
    aligned[:] = rng.randbytes(20 * P)
    write(memoryview(aligned), bytes(aligned))              # ... for memory aligned like the file
    tail = rng.randbytes(50)
    write(tail, tail)                                       # gathered, not in the file yet
    os.fsync(s.fileno())
    with open(path, "rb") as g:                             # another reader sees everything so far
        assert g.read() == bytes(want)
    more = rng.randbytes(77)
    write(more, more)
    skip(1234)                                              # a trailing hole
    if o_direct_works(tmp_path):
        assert s.file.direct_bytes > 0
    s.close(fsync=True)
    assert open_fds() == fds
    s.close()
    assert path.stat().st_size == len(want) == s.tell()
    assert path.read_bytes() == bytes(want)


def test_buffer_address():
    """buffer_address gives the first byte's address of tensors, slices, read-only bytes and
    bytearrays, and refuses objects without a buffer."""
    t = torch.arange(1000, dtype=torch.float32)
    assert buffer_address(memoryview(t.numpy())) == t.data_ptr()
    data = b"read-only bytes"
    view = memoryview(data)
    address = buffer_address(view)
    assert address != 0 and ctypes.string_at(address, len(data)) == data
    assert buffer_address(view[5:]) == address + 5
    ba = bytearray(b"x" * 64)
    assert buffer_address(ba) == ctypes.addressof((ctypes.c_char * 64).from_buffer(ba))
    with pytest.raises(TypeError):
        buffer_address(12345)


def make_tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed.weight": torch.randn(700, 9, generator=g),                              # F32, > 6 pages
        "model.layers.0.attn.q": torch.randn(33, 65, generator=g).to(torch.bfloat16),        # BF16, ~1 page
        "model.layers.0.mlp.up": torch.randn(3001, generator=g).to(torch.float16),           # F16, > 1 page
        "model.layers.0.norm": torch.randn(17, generator=g),                                 # F32, tiny
        "model.pos_ids": torch.randint(-5, 10**9, (1025,), generator=g, dtype=torch.int64),  # I64, > 2 pages
        "model.mask": torch.rand(5003, generator=g) > 0.5,                                   # BOOL, > 1 page
        "model.bytes": torch.randint(0, 256, (9000,), generator=g, dtype=torch.uint8),       # U8, > 2 pages
        "lm_head.weight": torch.randn(2000, 5, generator=g).to(torch.bfloat16),              # BF16, ~5 pages
    }


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def make_source(root: Path, shards: int, metadata):
    """A Hugging Face weights directory written by safetensors itself (one file, or shards + index)."""
    root.mkdir()
    tensors = make_tensors(shards)
    names = sorted(tensors)
    files = {}
    for i in range(shards):
        file_name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, root / file_name, metadata=metadata)
        files.update({n: file_name for n in part})
    if shards > 1:
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    return tensors, sorted(set(files.values()))


def export_like_source(src: Path, out: Path, use_origins: bool = True):
    """Write every tensor of `src` (as mapped by HFCheckpoint.get) with SafetensorsWriter, from
    threads, in an order unlike the file's; checks the manifest offsets on the way."""
    ckpt = HFCheckpoint(src)
    manifest = ckpt.manifest()
    for name, m in manifest.items():
        assert isinstance(m["offset"], int)
        with open(src / m["file"], "rb") as f:
            f.seek(m["offset"])
            assert f.read(ckpt.nbytes(name)) == raw(ckpt.get(name)), name
    specs = {n: (m["file"], dtype_from_name(m["dtype"]), tuple(m["shape"])) for n, m in manifest.items()}
    origins = {n: m["offset"] for n, m in manifest.items()} if use_origins else None
    out.mkdir()
    writer = SafetensorsWriter(out, dict(reversed(list(specs.items()))), origins)
    writer.create()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: writer.write(n, ckpt.get(n)), sorted(specs)))
    direct_bytes = writer.direct_bytes
    writer.close()
    ckpt.close()
    return manifest, writer, direct_bytes


def header_offsets(path: Path):
    """name -> absolute data offset, in file order."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return 8 + n, {k: 8 + n + v["data_offsets"][0] for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])}


@pytest.mark.parametrize("shards", [1, 2])
def test_writer_with_origins_reproduces_source_bytes(tmp_path, small_sizes, shards):
    """With origins, SafetensorsWriter reproduces a safetensors-written file byte for byte (same
    order, same offsets): safetensors 0.8 writes the same compact JSON, `__metadata__` first, padded
    with spaces to 8 bytes, so the padded header equals the source's. The mapped source tensors sit
    at their file's page offset, so with O_DIRECT they go to the disk without a bounce copy."""
    src, out = tmp_path / "src", tmp_path / "out"
    _, files = make_source(src, shards, {"format": "pt"})
    _, writer, direct_bytes = export_like_source(src, out)
    for file_name in files:
        assert (out / file_name).read_bytes() == (src / file_name).read_bytes(), file_name
    if o_direct_works(tmp_path):
        assert direct_bytes > 0 and not small_sizes


def test_writer_with_origins_follows_any_source_order(tmp_path, small_sizes):
    """A source whose tensors are not in safetensors' own order (narrow dtypes first, names
    descending, as another writer may lay them out): the writer follows the origins, not its
    default order, and reproduces the file byte for byte (the header is built in the writer's
    compact JSON format and padded to 8 bytes, like safetensors pads it)."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    tensors = make_tensors(3)
    order = sorted(tensors, key=lambda n: (tensors[n].element_size(), [-ord(c) for c in n]))
    entries, pos = {}, 0
    st_names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                torch.bool: "BOOL", torch.uint8: "U8"}
    for n in order:
        nbytes = tensors[n].numel() * tensors[n].element_size()
        entries[n] = {"dtype": st_names[tensors[n].dtype], "shape": list(tensors[n].shape),
                      "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    (src / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"".join(raw(tensors[n]) for n in order))
    assert all(torch.equal(load_file(src / "model.safetensors")[n], t) for n, t in tensors.items())
    export_like_source(src, out)
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_writer_with_origins_keeps_page_offsets_and_order(tmp_path, small_sizes):
    """A source header shorter than the writer's (no `__metadata__`): the files differ, but every
    tensor keeps its offset modulo PAGE and its place in the order, and loads back equal."""
    src, out = tmp_path / "src", tmp_path / "out"
    tensors, _ = make_source(src, 1, None)
    export_like_source(src, out)
    _, src_offsets = header_offsets(src / "model.safetensors")
    _, out_offsets = header_offsets(out / "model.safetensors")
    assert list(out_offsets) == list(src_offsets)
    assert {n: o % P for n, o in out_offsets.items()} == {n: o % P for n, o in src_offsets.items()}
    loaded = load_file(out / "model.safetensors")
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_writer_without_origins_starts_data_on_a_page(tmp_path, small_sizes):
    """Without origins the data section starts at a page boundary, the header's offsets are the
    writer's, and the tensors load back equal."""
    src, out = tmp_path / "src", tmp_path / "out"
    tensors, _ = make_source(src, 1, {"format": "pt"})
    _, writer, _ = export_like_source(src, out, use_origins=False)
    start, offsets = header_offsets(out / "model.safetensors")
    assert start % P == 0
    assert offsets == {n: writer.offsets[n] for n in offsets}
    loaded = load_file(out / "model.safetensors")
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_data_start_residue():
    """The residue follows the largest tensor with an origin; 0 without origins or when the implied
    residue is not a multiple of 8."""
    entries = {"big": {"data_offsets": [0, 4000]}, "small": {"data_offsets": [4000, 4016]}}
    assert _data_start_residue(entries, {}) == 0
    assert _data_start_residue(entries, {"big": 8 + 288, "small": 8 + 288 + 4000}) == 296
    assert _data_start_residue(entries, {"big": P + 8 + 296}) == 304
    assert _data_start_residue(entries, {"small": 8 + 4000 + 296}) == 304  # only known one counts
    assert _data_start_residue(entries, {"big": 8 + 85}) == 0               # 93: not a multiple of 8
    assert _data_start_residue(entries, {"big": 8 + 85, "small": 0}) == 0
