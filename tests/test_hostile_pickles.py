"""No file of a Megatron checkpoint runs code, in any entry point (conversion/safe_pickle.py).

Hand-crafted pickles that would create a marker file if anything executed them:
* `.metadata` naming `os.system` through a dotted protocol-4 `STACK_GLOBAL`
  (`("torch.distributed.checkpoint.filesystem", "os.system")`: the module is one torch writes, the
  name reaches `os` through its attributes) and through a plain protocol-0 `GLOBAL`;
* a non-tensor record of a `.distcp` file (torch's planner reads those with `weights_only=False`);
* megatron's `common.pt`.
The checkpoints carry no checksum file, as training checkpoints do not, so nothing but the
allow-list stands between the file and the unpickler. Entry points: `convert-mcore-to-hf`,
`AutoBridge.load_megatron_model`, `bridge-verify`, `examples/generate.py --mcore-path` and
`examples/finetune.py --resume`."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bridge.tiny_models import build_hf_model, save_hf_model
from tests.cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


def _short(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def stack_global_payload(command: str) -> bytes:
    """protocol 4: "torch.distributed.checkpoint.filesystem" "os.system" STACK_GLOBAL (command,) REDUCE."""
    return (b"\x80\x04" + _short("torch.distributed.checkpoint.filesystem") + _short("os.system") + b"\x93"
            + _short(command) + b"\x85" + b"R" + b".")


def global_payload(command: str) -> bytes:
    """protocol 0: GLOBAL 'os system', (command,) REDUCE."""
    return b"cos\nsystem\n(" + _short(command) + b"tR."


class _Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_pickles")
    hf = save_hf_model(build_hf_model(seed=4), root / "hf")
    r = run_cli("convert-hf-to-mcore", "--hf-path", hf, "--output", root / "mcore", "--quiet")
    assert r.returncode == 0, r.stderr
    # as a training checkpoint (examples/finetune.py's): no checksum file, none named in bridge_meta.json
    (root / "mcore" / "bridge_checksums.json").unlink()
    meta = json.loads((root / "mcore" / "bridge_meta.json").read_text())
    del meta["checksums_file"]
    (root / "mcore" / "bridge_meta.json").write_text(json.dumps(meta))
    return hf, root / "mcore"


def _copy(mcore: Path, dest: Path) -> Path:
    shutil.copytree(mcore, dest)
    return dest


def _hostile_metadata(mcore, tmp_path, payload):
    ckpt = _copy(mcore, tmp_path / "ckpt")
    marker = tmp_path / "ran"
    (ckpt / "release" / ".metadata").write_bytes(payload(f"touch {marker}"))
    return ckpt, marker


def _hostile_record(mcore, tmp_path):
    """The first non-tensor record of the checkpoint re-pointed at a pickle that runs a command."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt = _copy(mcore, tmp_path / "ckpt")
    marker = tmp_path / "ran"
    release = ckpt / "release"
    with open(release / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file, written by torch a moment ago
    index, info = next((i, s) for i, s in metadata.storage_data.items()
                       if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    buf = io.BytesIO()
    torch.save(_Payload(f"touch {marker}"), buf)
    with open(release / info.relative_path, "ab") as f:
        info.offset, info.length = f.tell(), len(buf.getvalue())
        f.write(buf.getvalue())
    with open(release / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return ckpt, marker, index.fqn


def _hostile_common(mcore, tmp_path):
    ckpt = _copy(mcore, tmp_path / "ckpt")
    marker = tmp_path / "ran"
    torch.save(_Payload(f"touch {marker}"), ckpt / "release" / "common.pt")
    return ckpt, marker


def _env():
    e = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def _run_entry_point(entry: str, ckpt: Path, hf: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    if entry == "convert-mcore-to-hf":
        return run_cli(entry, "--mcore-path", ckpt, "--output", tmp_path / "out", "--quiet")
    if entry == "bridge-verify":
        return run_cli(entry, "--hf-path", hf, "--mcore-path", ckpt)
    if entry == "load_megatron_model":
        code = f"from bridge import AutoBridge; AutoBridge.load_megatron_model({str(ckpt)!r})"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_env(),
                              timeout=300)
    if entry == "generate.py":
        args = ["--mcore-path", ckpt, "--prompt-ids", "11,22", "--max-new-tokens", "1"]
    else:  # finetune.py --resume: the checkpoint laid out as finetune.py's --output
        (ckpt / "release").rename(ckpt / "iter_0000001")
        (ckpt / "latest_checkpointed_iteration.txt").write_text("1")
        args = ["--hf-path", hf, "--synthetic", "--steps", "2", "--output", ckpt, "--resume",
                "--global-batch-size", "1", "--micro-batch-size", "1"]
    return subprocess.run([sys.executable, str(REPO / "examples" / entry), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=_env(), timeout=400)


ENTRY_POINTS = ["convert-mcore-to-hf", "load_megatron_model", "bridge-verify", "generate.py", "finetune.py"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_dotted_stack_global_in_metadata_runs_nothing(converted, tmp_path, entry):
    hf, mcore = converted
    ckpt, marker = _hostile_metadata(mcore, tmp_path, stack_global_payload)
    r = _run_entry_point(entry, ckpt, hf, tmp_path)
    assert not marker.exists(), f"{entry} ran code from .metadata"
    assert r.returncode != 0
    assert "torch.distributed.checkpoint.filesystem.os.system is not allowed" in r.stderr, r.stderr[-2000:]
    if entry != "load_megatron_model":  # the tools: one error line (and exit 2 for bad input, the bridge's CLIs)
        assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr[-2000:]
        assert r.returncode == 2 or entry.endswith(".py")
        assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [r.stderr.strip().splitlines()[-1]]


def test_plain_global_in_metadata_runs_nothing(converted, tmp_path):
    hf, mcore = converted
    ckpt, marker = _hostile_metadata(mcore, tmp_path, global_payload)
    r = _run_entry_point("load_megatron_model", ckpt, hf, tmp_path)
    assert not marker.exists() and r.returncode != 0
    assert "os.system is not allowed" in r.stderr


@pytest.mark.parametrize("entry", ["load_megatron_model", "bridge-verify"])
def test_hostile_non_tensor_record_runs_nothing(converted, tmp_path, entry):
    hf, mcore = converted
    ckpt, marker, fqn = _hostile_record(mcore, tmp_path)
    r = _run_entry_point(entry, ckpt, hf, tmp_path)
    assert not marker.exists(), f"{entry} ran code from a .distcp record"
    assert r.returncode != 0 and f"(record {fqn!r}): refused, it is not a plain data pickle" in r.stderr, r.stderr[-2000:]


def test_hostile_common_pt_runs_nothing(converted, tmp_path):
    hf, mcore = converted
    ckpt, marker = _hostile_common(mcore, tmp_path)
    r = _run_entry_point("load_megatron_model", ckpt, hf, tmp_path)
    assert not marker.exists() and r.returncode != 0
    assert "common.pt: refused, it is not a plain data pickle" in r.stderr, r.stderr[-2000:]


def test_the_unpickler_reads_real_metadata_and_refuses_the_payloads(converted, tmp_path):
    from conversion.errors import ConversionError
    from conversion.safe_pickle import check_dist_checkpoint, load_dcp_metadata

    _, mcore = converted
    check_dist_checkpoint(mcore / "release")  # the real checkpoint passes
    assert load_dcp_metadata(mcore / "release" / ".metadata").state_dict_metadata
    (tmp_path / "set.metadata").write_bytes(pickle.dumps({1, 2}))  # allowed classes, not a Metadata
    with pytest.raises(ConversionError, match=r"not valid torch.distributed.checkpoint metadata \(a set, not a Metadata\)"):
        load_dcp_metadata(tmp_path / "set.metadata")
    for payload in (stack_global_payload, global_payload):
        path = tmp_path / f"{payload.__name__}.metadata"
        path.write_bytes(payload(f"touch {tmp_path / 'ran'}"))
        with pytest.raises(ConversionError, match="is not allowed"):
            load_dcp_metadata(path)
    assert not (tmp_path / "ran").exists()
