"""Where the files of a Hugging Face checkpoint may be: its directory, or — for a snapshot in the
Hugging Face hub cache — the cache repository's `blobs/`.

The hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) stores a
model as `models--ORG--NAME/snapshots/<revision>/FILE`, every FILE a symlink to
`../../blobs/<hash>`. Names from an index are still refused when they escape the directory
lexically (`../x`, absolute paths), and symlinks are refused when they point anywhere but into the
directory itself or, for a snapshot, into its own repository's `blobs/`.

A hub id (`ORG/NAME`, optionally `ORG/NAME@REVISION`) that is not a local path is looked up in the
cache, offline: `refs/<revision>` (default `main`) names the snapshot. Nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

from conversion.errors import ConversionError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def hub_blobs_dir(root: Path) -> Optional[Path]:
    """The `blobs/` of the hub-cache repository whose snapshot `root` is, else None."""
    root = Path(os.path.abspath(root))
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent / "blobs"
    return None


def allowed_targets(root: Path) -> List[Path]:
    """The directories the checkpoint's files may resolve into."""
    roots = [Path(root).resolve()]
    blobs = hub_blobs_dir(root)
    if blobs is not None:
        roots.append(blobs.resolve())
    return roots


def checkpoint_member(root: Path, file_name: str, where: str) -> Path:
    """The path of `file_name` (a name from an index) inside the checkpoint directory `root`,
    refusing names that escape it and symlinks that point outside the allowed targets."""
    root = Path(root)
    if not isinstance(file_name, str) or not file_name or os.path.isabs(file_name):
        raise ConversionError(f"{where}: shard name {file_name!r} must be a relative file name inside {root}")
    lexical = Path(os.path.normpath(os.path.join(os.path.abspath(root), file_name)))
    if Path(os.path.abspath(root)) not in lexical.parents:
        raise ConversionError(f"{where}: shard name {file_name!r} escapes the checkpoint directory {root}")
    target = lexical.resolve()
    if not any(allowed in target.parents for allowed in allowed_targets(root)):
        blobs = hub_blobs_dir(root)
        also = f" nor into the hub cache's {blobs}" if blobs is not None else ""
        raise ConversionError(f"{where}: shard {file_name!r} is a link to {target}, which lies neither inside the "
                              f"checkpoint directory {root}{also}")
    return lexical


def resolve_hf_path(path: str | os.PathLike, what: str = "a local Hugging Face model directory") -> Path:
    """A local directory as given, or the hub-cache snapshot of a hub id (offline)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ConversionError(f"{p}: input path is not a directory (expected {what})")
        return p
    text = str(path)
    if not _HUB_ID.match(text):
        raise ConversionError(f"{p}: input path does not exist (expected {what})")
    repo_id, _, revision = text.partition("@")
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    snapshot = repo / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise ConversionError(f"{text}: neither a local directory nor a model in the Hugging Face hub cache "
                              f"{hub_cache_dir()} (looked for {repo}/refs/{revision or 'main'}; nothing is downloaded: "
                              f"fetch it first, e.g. `hf download {repo_id}`)")
    return snapshot
