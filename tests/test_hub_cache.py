"""A checkpoint as the Hugging Face hub cache stores it: `models--ORG--NAME/snapshots/<rev>/`, every
file a symlink to `../../blobs/<hash>` (conversion/hf_paths.py). Sharded, it converts both ways
(before, every shard was refused as escaping the directory); a hub id resolves offline through the
cache; symlinks that point anywhere else and index names that escape are still refused."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from bridge.tiny_models import build_hf_model, save_hf_model
from tests.cli_helpers import assert_same_hf, run_cli

REV = "0123456789abcdef0123456789abcdef01234567"


def _as_hub_cache(src: Path, cache: Path, repo_id: str) -> Path:
    """Lay `src`'s files out as huggingface_hub's cache does; returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REV
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy2(f, repo / "blobs" / digest)
        os.symlink(f"../../blobs/{digest}", snapshot / f.name)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    src = save_hf_model(build_hf_model(seed=6), root / "src", max_shard_size="60KB")
    assert len(list(src.glob("*.safetensors"))) > 2  # sharded, with an index
    return src, root / "cache", _as_hub_cache(src, root / "cache", "org/tiny-nemotron")


def test_sharded_snapshot_converts_both_ways_bit_exact(hub, tmp_path):
    src, _, snapshot = hub
    r = run_cli("convert-hf-to-mcore", "--hf-path", snapshot, "--output", tmp_path / "mcore", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("convert-mcore-to-hf", "--mcore-path", tmp_path / "mcore", "--output", tmp_path / "hf", "--quiet")
    assert r.returncode == 0, r.stderr
    assert_same_hf(src, tmp_path / "hf")
    assert not any(p.is_symlink() for p in (tmp_path / "mcore").rglob("*"))  # assets copied, not linked


def test_hub_id_resolves_offline_through_the_cache(hub, tmp_path):
    src, cache, _ = hub
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = run_cli("convert-hf-to-mcore", "--hf-path", "org/tiny-nemotron", "--output", tmp_path / "mcore", "--quiet",
                env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("bridge-verify", "--hf-path", "org/tiny-nemotron", "--mcore-path", tmp_path / "mcore", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    missing = run_cli("convert-hf-to-mcore", "--hf-path", "org/not-cached", "--output", tmp_path / "m2", env=env)
    assert missing.returncode == 2 and "neither a local directory nor a model in the Hugging Face hub cache" in missing.stderr
    assert not (tmp_path / "m2").exists()


def test_a_symlink_out_of_the_repository_is_refused(hub, tmp_path):
    _, _, snapshot = hub
    copy = tmp_path / "cache" / "models--org--evil" / "snapshots" / REV
    shutil.copytree(snapshot.parents[2] / "models--org--tiny-nemotron", copy.parents[1], symlinks=True)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy2(copy / shard, outside)
    (copy / shard).unlink()
    os.symlink(outside, copy / shard)
    r = run_cli("convert-hf-to-mcore", "--hf-path", copy, "--output", tmp_path / "mcore")
    assert r.returncode == 2 and not (tmp_path / "mcore").exists()
    assert f"shard {shard!r} is a link to {outside}, which lies neither inside the checkpoint directory" in r.stderr


def test_an_index_name_that_escapes_is_still_refused(hub, tmp_path):
    _, _, snapshot = hub
    copy = tmp_path / "cache" / "models--org--escape" / "snapshots" / REV
    shutil.copytree(snapshot.parents[2] / "models--org--tiny-nemotron", copy.parents[1], symlinks=True)
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../blobs/" + os.readlink(copy / index["weight_map"][name]).split("/")[-1]
    index_path.unlink()
    index_path.write_text(json.dumps(index))
    r = run_cli("convert-hf-to-mcore", "--hf-path", copy, "--output", tmp_path / "mcore")
    assert r.returncode == 2 and "escapes the checkpoint directory" in r.stderr
