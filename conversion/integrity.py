"""Checksums (XXH3-128) of checkpoint files, and reading a converted checkpoint's `bridge_meta.json` without
megatron (so the CLIs can refuse a broken input in a second, before importing anything heavy).

A Megatron checkpoint written by the bridge records:
- in `bridge_meta.json`, `hf_checksums`: {file: {size, xxh3_128}} of the source HF weight files
  (safetensors + index) and config.json, taken at conversion time: what it was made from;
- in `bridge_checksums.json` (named by `checksums_file` in `bridge_meta.json`): {path: {size,
  xxh3_128}} of every other file of the checkpoint (`release/*` of megatron-core's dist checkpoint,
  `bridge_meta.json`, the tracker, `hf_assets/*`), taken when the checkpoint is complete and before it
  is renamed into place. Loading verifies them (`verify_megatron_checkpoint`): a changed, truncated
  or missing file is refused, naming the file. Files added later (not recorded) are not checked.
Checkpoints written before checksums were recorded (no `checksums_file`) load unverified.

Why XXH3-128 and not sha256: the checksums catch corruption (a flipped byte, a truncated or
swapped file), not an attacker, who could rewrite the checksum file too. sha256 runs at about
0.2 GB/s per core on a CPU without SHA instructions (measured on the CI machine): two passes over a
62 GB checkpoint would cost longer than the conversion. XXH3 runs at about 8 GB/s. Checksum files in
the older `sha256/1` format are still verified, with sha256.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import xxhash

from conversion.errors import ConversionError

META_NAME = "bridge_meta.json"          # beside the Megatron checkpoint (bridge.checkpoint re-exports it)
META_FORMAT = "nemotron-omni-bridge/1"
CHECKSUMS_NAME = "bridge_checksums.json"
CHECKSUMS_FORMAT = "xxh3-128/1"
DIGESTS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}  # record key -> hash constructor
_FORMAT_DIGEST = {"xxh3-128/1": "xxh3_128", "sha256/1": "sha256"}
_WINDOW = 64 * 1024 * 1024  # a multiple of mmap.ALLOCATIONGRANULARITY


def digest_file(path: Path, algorithm: str = "xxh3_128") -> str:
    """The file's digest, read through a memory map window by window (hashing the page cache's
    pages in place costs half of reading them into a buffer first)."""
    h = DIGESTS[algorithm]()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start in range(0, size, _WINDOW):
            with mmap.mmap(f.fileno(), min(_WINDOW, size - start), prot=mmap.PROT_READ, offset=start) as window:
                h.update(window)  # both hashes release the GIL: files hash in parallel in threads
    return h.hexdigest()


def checksums(root: Path, rel_paths: Iterable[str], algorithm: str = "xxh3_128",
              workers: Optional[int] = None) -> Dict[str, Dict]:
    """{relative path: {"size", algorithm}} for the given files under `root` (hashed in parallel
    on up to `workers` threads, default the cores)."""
    root = Path(root)
    rel_paths = sorted(set(rel_paths))
    workers = max(1, min(workers or 8, os.cpu_count() or 1, len(rel_paths)))
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(lambda r: digest_file(root / r, algorithm), rel_paths))
    return {r: {"size": (root / r).stat().st_size, algorithm: d} for r, d in zip(rel_paths, digests)}


def _yield_cpu() -> None:
    """Lower this thread's scheduling priority (Linux: per thread; threads it starts inherit it):
    background hashing only has to finish by the end of the conversion, and on a machine with
    few cores it should not take CPU from the conversion's own start-up and writer threads."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the normal priority
        pass


def in_background(fn, *args, **kwargs) -> Future:
    """Run `fn` in a daemon thread (one that never delays the process's exit, e.g. after Ctrl-C);
    its result or exception comes back through the returned future."""
    future: Future = Future()

    def run():
        _yield_cpu()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the result
            future.set_exception(e)

    threading.Thread(target=run, daemon=True, name=f"background-{getattr(fn, '__name__', 'task')}").start()
    return future


def share_checksums_in_background(root: Path, rel_paths: Iterable[str], rank: int, ranks: int) -> Future:
    """Checksums of this rank's share of the files (balanced by size across `ranks`), in a daemon
    thread (one file at a time: it runs beside the conversion)."""
    from conversion.split import my_share

    rel_paths = sorted(set(rel_paths))
    share = my_share(rel_paths, [(Path(root) / r).stat().st_size for r in rel_paths], rank, ranks)
    return in_background(checksums, root, share, workers=1)


def tree_checksums(root: Path, exclude: Iterable[str] = (CHECKSUMS_NAME,),
                   known: Optional[Dict[str, Dict]] = None) -> Dict[str, Dict]:
    """Checksums of every file under `root`, keyed by posix path relative to `root`; files in
    `known` (hashed while they were written) whose size still matches are not read again."""
    root = Path(root)
    exclude = set(exclude)
    known = known or {}
    files = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    files = [f for f in files if f not in exclude]
    reuse = {f: known[f] for f in files if f in known and known[f]["size"] == (root / f).stat().st_size}
    return {**checksums(root, [f for f in files if f not in reuse]), **reuse}


def write_checksums_file(root: Path, known: Optional[Dict[str, Dict]] = None) -> None:
    """Write `bridge_checksums.json` for every file now under `root` (the finished checkpoint)."""
    doc = {"format": CHECKSUMS_FORMAT, "files": dict(sorted(tree_checksums(root, known=known).items()))}
    (Path(root) / CHECKSUMS_NAME).write_text(json.dumps(doc, indent=1) + "\n")


_verified: Dict[Tuple[str, str], Tuple] = {}


def verify_checksums(root: Path, recorded: Optional[Dict[str, Dict]], what: str = "checkpoint file",
                     algorithm: str = "xxh3_128", hashes: bool = True) -> None:
    """Every recorded file exists with its recorded size and digest; else one error naming the file.

    Sizes are checked for all files first (cheap), then (unless `hashes=False`) the digests. A successful verification is
    remembered for this process as long as no file's size / mtime changed, so the CLI's early check
    and the loader do not hash twice.
    """
    if not recorded:
        return
    root = Path(root)
    stats = []
    for rel, rec in sorted(recorded.items()):
        path = root / rel
        if not path.is_file():
            raise ConversionError(f"{path}: {what} is missing (it was written at conversion and is recorded in {META_NAME})")
        st = path.stat()
        if st.st_size != rec.get("size"):
            raise ConversionError(f"{path}: {what} has {st.st_size} bytes, {rec.get('size')} were written at conversion "
                                  f"(the file is truncated or corrupt)")
        stats.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    if not hashes:
        return
    key = (str(root.resolve()), json.dumps(recorded, sort_keys=True))
    if _verified.get(key) == tuple(stats):
        return
    actual = checksums(root, recorded, algorithm)
    for rel, rec in sorted(recorded.items()):
        if actual[rel][algorithm] != rec.get(algorithm):
            raise ConversionError(f"{root / rel}: {what} is corrupt: {algorithm} {actual[rel][algorithm][:16]}... "
                                  f"differs from {str(rec.get(algorithm))[:16]}... recorded at conversion in {META_NAME}")
    _verified[key] = tuple(stats)


def read_meta(path: Path) -> Dict:
    """`bridge_meta.json` of a converted checkpoint, checked (same rules as bridge.checkpoint.read_meta)."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: input path does not exist or is not a directory (expected a converted Megatron checkpoint)")
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise ConversionError(f"{meta_path}: missing; {path} is not a checkpoint written by convert-hf-to-mcore")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ConversionError(f"{meta_path}: format {got!r}, expected {META_FORMAT!r}")
    for field in ("hf_config", "hf_manifest", "params_dtype"):
        if field not in meta:
            raise ConversionError(f"{meta_path}: missing required field {field!r}")
    return meta


def verify_megatron_checkpoint(path: Path, meta: Optional[Dict] = None, hashes: bool = True) -> Dict:
    """Read and check `bridge_meta.json`, then verify every file recorded in the checksum file
    (only that each exists with its size when `hashes=False`: the streaming export hashes in the
    background while it converts and refuses to finish on a mismatch)."""
    path = Path(path)
    meta = meta if meta is not None else read_meta(path)
    name = meta.get("checksums_file")
    if not name:
        return meta  # written before checksums were recorded
    sums_path = path / name
    if not sums_path.is_file():
        raise ConversionError(f"{sums_path}: missing ({META_NAME} says the checkpoint's checksums are recorded there)")
    try:
        doc = json.loads(sums_path.read_text())
        files = doc["files"]
        if doc.get("format") not in _FORMAT_DIGEST or not isinstance(files, dict):
            raise ValueError(f"format {doc.get('format')!r}, expected {CHECKSUMS_FORMAT!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{sums_path}: not a valid checksum file ({e})") from None
    verify_checksums(path, files, "Megatron checkpoint file", _FORMAT_DIGEST[doc["format"]], hashes)
    return meta
