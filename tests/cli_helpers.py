"""Helpers for tests that run the real console scripts in subprocesses and break checkpoints on disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
PROGRESS_LINE = re.compile(r"^(hf -> megatron|megatron -> hf): ")  # bridge/streaming.py's tqdm bars


def cli_command(name: str, *args, hooks: Sequence[str] = ()) -> Tuple[List[str], Dict[str, str]]:
    """The command line and environment that run the console script `name` with `args`; with
    `hooks` (tests/hooked_cli.py's options, e.g. `--free-bytes 10`) through tests/hooked_cli.py,
    which installs them first."""
    if not hooks:
        return [str(BIN / name), *map(str, args)], dict(os.environ)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # `tests` importable
    return ([sys.executable, "-m", "tests.hooked_cli", *map(str, hooks), name, *map(str, args)],
            {**os.environ, "PYTHONPATH": path})


def run_cli(name: str, *args, env: Optional[Dict[str, str]] = None, hooks: Sequence[str] = (),
            timeout: int = 300) -> subprocess.CompletedProcess:
    cmd, full_env = cli_command(name, *args, hooks=hooks)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**full_env, **(env or {})})


def read_all(path: Path) -> Dict[str, tuple]:
    """name -> (file name, tensor) of every tensor of the safetensors files in `path`."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = (f.name, h.get_tensor(k))
    return out


def assert_same_hf(a: Path, b: Path) -> None:
    """The two HF directories hold the same tensors, in the same files, dtypes and bits."""
    ta, tb = read_all(a), read_all(b)
    assert sorted(ta) == sorted(tb)
    for name, (file_name, tensor) in ta.items():
        assert tb[name][0] == file_name, name
        assert tb[name][1].dtype == tensor.dtype and torch.equal(tb[name][1], tensor), name


def assert_cli_export_equals(mcore: Path, hf: Path, out: Path, *args) -> None:
    """`convert-mcore-to-hf` of the Megatron checkpoint `mcore` (and `args`) into `out` gives back `hf`
    bit for bit."""
    proc = run_cli("convert-mcore-to-hf", "--mcore-path", mcore, "--output", out, "--quiet", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_hf(hf, out)


def as_training_writes_it(converted: Path, dest: Path, iteration: int = 100) -> Path:
    """A copy of a checkpoint's torch_dist files laid out as Megatron-LM's (and Megatron-Bridge's)
    training writes them: `iter_NNNNNNN/` named by the tracker, none of this project's files beside it."""
    shutil.copytree(Path(converted) / "release", Path(dest) / f"iter_{iteration:07d}")
    (Path(dest) / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return Path(dest)


def hidden_siblings(path: Path):
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def assert_clean_failure(proc: subprocess.CompletedProcess, output: Path, *fragments: str, code: int = 2,
                         output_existed: bool = False) -> str:
    """Non-zero exit, one `error:` line on stderr holding every fragment, no traceback, no output.
    (Progress-bar lines, which a conversion without --quiet prints before it fails, are not counted.)"""
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines()
             if line.strip() and not PROGRESS_LINE.match(line)]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if not output_existed:
        assert not Path(output).exists(), f"{output} was left behind"
    assert hidden_siblings(output) == [], hidden_siblings(output)
    return lines[0]


# ---------------------------------------------------------------------------- breaking HF checkpoints

def shards(hf_dir: Path):
    return sorted(Path(hf_dir).glob("*.safetensors"))


def shard_of(hf_dir: Path, name: str) -> Path:
    index = Path(hf_dir) / "model.safetensors.index.json"
    if index.exists():
        return Path(hf_dir) / json.loads(index.read_text())["weight_map"][name]
    return Path(hf_dir) / "model.safetensors"


def edit_tensors(hf_dir: Path, name: str, fn) -> None:
    """Replace the state of the shard holding `name` by fn(state) (a dict name -> tensor)."""
    path = shard_of(hf_dir, name)
    state = load_file(str(path))
    state = fn(state) or state
    save_file(state, str(path), metadata={"format": "pt"})


def edit_index(hf_dir: Path, fn) -> None:
    index = Path(hf_dir) / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    fn(doc["weight_map"])
    index.write_text(json.dumps(doc))


def edit_config(hf_dir: Path, fn) -> None:
    path = Path(hf_dir) / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def copy_dir(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def swap_experts(hf_dir: Path, layer: int, a: int = 0, b: int = 1, proj: str = "up_proj") -> None:
    """Swap one projection of two routed experts in place (one tensor swapped, shapes unchanged)."""
    na = f"backbone.layers.{layer}.mixer.experts.{a}.{proj}.weight"
    nb = f"backbone.layers.{layer}.mixer.experts.{b}.{proj}.weight"
    assert shard_of(hf_dir, na) == shard_of(hf_dir, nb)

    def fn(state):
        state[na], state[nb] = state[nb].clone(), state[na].clone()

    edit_tensors(hf_dir, na, fn)


# ---------------------------------------------------------------------------- shared fixtures

_CACHE: Dict[str, tuple] = {}


def tiny_converted(tmp_path_factory):
    """(hf_dir, mcore_dir): the tiny NemotronH (fp32, sharded with an index, a tokenizer file)
    converted once per test session by the real `convert-hf-to-mcore`."""
    if "fp32" not in _CACHE:
        from bridge.tiny_models import build_hf_model, save_hf_model, tiny_config

        tmp = tmp_path_factory.mktemp("tiny_converted")
        hf_dir = save_hf_model(build_hf_model(tiny_config(), seed=7), tmp / "hf", dtype=torch.float32,
                               max_shard_size="100KB")
        (hf_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
        proc = run_cli("convert-hf-to-mcore", "--hf-path", hf_dir, "--output", tmp / "mcore", "--quiet")
        assert proc.returncode == 0, proc.stderr[-3000:]
        _CACHE["fp32"] = (hf_dir, tmp / "mcore")
    return _CACHE["fp32"]
