"""Output directories written atomically, the checks before any work, and the tests' hooks.

Outputs are written into a hidden sibling `.{name}.tmp-{host}-{pid}-{random}` and renamed to
`{name}` only when complete; `--overwrite` moves the old output to `.{name}.old-{host}-{pid}` for
the moment of the swap. A run killed at any moment (SIGKILL, OOM, power loss) therefore leaves at
most such hidden siblings, never a directory at the output path. The next run into the same
output removes the siblings whose process (same host, pid not running) is gone; siblings of a
live process (a concurrent run) or of another host (shared file systems) are left alone.

`OutputDir` holds the steps of one such output in one process (open the temporary, publish it,
discard it); bridge/output.py's `OutputTransaction` runs them for every writer, on rank 0 of a
process group, and is the one way outputs are written.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from conversion.errors import ConversionError


# ---------------------------------------------------------------------------- the tests' hooks

def free_bytes(directory: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `directory` (its nearest existing ancestor)."""
    d = Path(directory).absolute()
    while not d.exists() and d != d.parent:
        d = d.parent
    return shutil.disk_usage(d).free


class Hooks:
    """The points where tests step in. Library code only calls them; tests replace them
    (in-process: monkeypatch; in a CLI subprocess: tests/hooked_cli.py), so that nothing on a
    library path reads a test setting from the environment.

    `pause(point)`: called at `before-rename` (the output is complete in its temporary directory)
    and at `mid-export` (the export has laid out its safetensors files and written its first
    tensor), for tests that kill or interrupt the process there. `free_bytes(directory)`: the
    free space the disk check sees."""

    def pause(self, point: str) -> None:
        pass

    def free_bytes(self, directory: str | os.PathLike) -> int:
        return free_bytes(directory)


hooks = Hooks()


# ---------------------------------------------------------------------------- checks before any work

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


def check_free_space(output: str | os.PathLike, needed: int, what: str = "the output") -> None:
    """Refuse to start when the output's file system has fewer than `needed` free bytes."""
    output = Path(output)
    free = hooks.free_bytes(output.parent)
    if needed > free:
        raise ConversionError(f"{output}: not enough free disk space for {what}: needs about {_gib(needed)} "
                              f"({needed} bytes), the file system of {output.parent} has {_gib(free)} free")


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**2 else f"{n} B"


def dir_bytes(directory: str | os.PathLike, keep=lambda p: True) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file() and keep(p))


# ---------------------------------------------------------------------------- one output, one process

class OutputDir:
    """The hidden temporary sibling of the output `path` and its publication.

    `open()` checks the path, creates missing parents and the temporary (removing stale ones of
    dead runs first) and returns the temporary; `publish()` runs `finalize(tmp)` (the Megatron
    checkpoint writes its checksum file this way), makes every file durable and renames the
    temporary to `path` (see `_publish`); `discard()` removes the temporary and the parents `open`
    created, and is a no-op once published.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False,
                 finalize: Optional[Callable[[Path], None]] = None):
        self.path, self.overwrite, self.finalize = Path(path), overwrite, finalize
        self.tmp: Optional[Path] = None
        self._tag = f"{_host()}-{os.getpid()}"
        self._created: List[Path] = []  # parents open() made, innermost first

    def open(self) -> Path:
        check_output_path(self.path, self.overwrite)
        parent = self.path.parent.absolute()
        while not parent.exists():
            self._created.append(parent)
            parent = parent.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{self._tag}-", dir=self.path.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the output gets the usual permissions
        return self.tmp

    def publish(self) -> None:
        if self.finalize is not None:
            self.finalize(self.tmp)
        hooks.pause("before-rename")
        fsync_tree(self.tmp)
        _publish(self.tmp, self.path, self.overwrite, self._tag)
        self.tmp = None
        _fsync_path(self.path.parent)

    def discard(self) -> None:
        if self.tmp is None:
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None
        for d in self._created:
            try:
                d.rmdir()
            except OSError:
                break


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
