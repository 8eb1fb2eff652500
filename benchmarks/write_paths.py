"""How fast can this machine write a copy of a checkpoint's bytes, by each write path?

The measurement behind conversion/direct_io.py: copies the safetensors files of a directory (by
default the 8.94 GiB slice that benchmarks/conversion.py generates) with the source in the page
cache, each way timed up to its data being on disk:

  cp       `cp -r` + `sync`
  buffered pwrite from a mapping of the source (through the page cache), then fsync
  bounce   O_DIRECT pwrite via an aligned buffer (one user-space copy, no page cache)
  direct   O_DIRECT pwrite straight from the source's mapping (no copy at all)

`python benchmarks/write_paths.py [--source DIR] [--threads 2] [--modes cp,buffered,bounce,direct]`
prints one line per mode: wall seconds, GB/s, user and system CPU seconds.
"""

import argparse
import mmap
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

CHUNK = 16 << 20


def warm(files):
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(CHUNK):
                pass


def copy(files, out: Path, mode: str, threads: int) -> None:
    if mode == "cp":
        subprocess.run(["cp", "-r", str(files[0].parent), str(out / "copy")], check=True)
        subprocess.run(["sync"], check=True)
        return
    flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if mode in ("bounce", "direct") else 0)
    dst = {f: os.open(out / f.name, flags) for f in files}
    src = {f: os.open(f, os.O_RDONLY) for f in files}
    maps = {f: mmap.mmap(src[f], 0, prot=mmap.PROT_READ) for f in files}
    size = {f: os.path.getsize(f) for f in files}
    jobs = [(f, off) for f in files for off in range(0, size[f], CHUNK)]

    def work(i):
        buffer = mmap.mmap(-1, CHUNK)  # page-aligned
        for f, off in jobs[i::threads]:
            n = min(CHUNK, size[f] - off)
            padded = -(-n // mmap.PAGESIZE) * mmap.PAGESIZE  # O_DIRECT writes whole pages; truncated after
            if mode == "buffered":
                os.pwrite(dst[f], memoryview(maps[f])[off:off + n], off)
            elif mode == "direct" and off + padded <= size[f]:
                os.pwrite(dst[f], memoryview(maps[f])[off:off + padded], off)
            else:  # bounce, and the file's last partial page in direct mode
                buffer[:n] = maps[f][off:off + n]
                os.pwrite(dst[f], memoryview(buffer)[:padded], off)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for f in files:
        os.ftruncate(dst[f], size[f])
        os.fsync(dst[f])
        os.close(dst[f])
        maps[f].close()
        os.close(src[f])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="/tmp/nemotron-omni-bench/slice-moe2")
    p.add_argument("--workdir", default="/tmp/nemotron-omni-bench/write-paths")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="cp,buffered,bounce,direct")
    args = p.parse_args()
    files = sorted(Path(args.source).glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{args.source}: no safetensors files (run benchmarks/conversion.py --generate-only)")
    total = sum(f.stat().st_size for f in files)
    out = Path(args.workdir)
    print(f"{len(files)} files, {total / 2**30:.2f} GiB, {os.cpu_count()} cores, {args.threads} threads")
    for mode in args.modes.split(","):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        subprocess.run(["sync"], check=True)
        warm(files)
        t0, c0 = time.perf_counter(), os.times()
        copy(files, out, mode, args.threads)
        dt, c1 = time.perf_counter() - t0, os.times()
        user = c1.user - c0.user + c1.children_user - c0.children_user
        system = c1.system - c0.system + c1.children_system - c0.children_system
        print(f"{mode:9s} {dt:6.2f} s  {total / dt / 1e9:5.2f} GB/s  user {user:5.2f} s  sys {system:5.2f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
