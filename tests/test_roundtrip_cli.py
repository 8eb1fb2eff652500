"""HF -> convert-hf-to-mcore -> convert-mcore-to-hf gives back every tensor bit for bit, and the
Megatron checkpoint the CLI wrote computes the transformers logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import NemotronHForCausalLM

from bridge import AutoBridge
from bridge.checkpoint import META_NAME, TRACKER_NAME
from bridge.tiny_models import build_hf_model, save_hf_model, tiny_config
from tests.parity import hf_logits, max_error, megatron_logits, tolerance

BIN = Path(sys.executable).parent


def run_cli(name, *args):
    proc = subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_all(path: Path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = (f.name, h.get_tensor(k))
    return out


_CACHE = {}


def _convert(tmp_path_factory, dtype):
    """HF checkpoint (sharded, with a tokenizer file) -> Megatron -> HF, once per dtype."""
    if dtype in _CACHE:
        return _CACHE[dtype]
    tmp = tmp_path_factory.mktemp(f"rt_{str(dtype).split('.')[-1]}")
    hf_model = build_hf_model(tiny_config(), seed=3)
    hf_dir = save_hf_model(hf_model, tmp / "hf", dtype=dtype, max_shard_size="60KB")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    run_cli("convert-hf-to-mcore", "--hf-path", hf_dir, "--output", tmp / "mcore")
    run_cli("convert-mcore-to-hf", "--mcore-path", tmp / "mcore", "--output", tmp / "hf_back")
    _CACHE[dtype] = (dtype, hf_model, hf_dir, tmp / "mcore", tmp / "hf_back")
    return _CACHE[dtype]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def converted(request, tmp_path_factory):
    return _convert(tmp_path_factory, request.param)


def test_source_is_sharded_with_index(converted):
    _, _, hf_dir, _, _ = converted
    assert (hf_dir / "model.safetensors.index.json").exists()
    assert len(list(hf_dir.glob("*.safetensors"))) > 2


def test_megatron_checkpoint_layout(converted):
    _, _, _, mcore, _ = converted
    assert (mcore / TRACKER_NAME).read_text() == "release"
    assert (mcore / "release" / "metadata.json").exists()  # megatron-core dist_checkpointing
    assert (mcore / META_NAME).exists()
    assert (mcore / "hf_assets" / "tokenizer_config.json").exists()
    assert not any(p.name.startswith(".") for p in mcore.parent.iterdir())  # no temporaries left


def test_every_tensor_round_trips_bit_for_bit(converted):
    dtype, _, hf_dir, _, back = converted
    src, out = read_all(hf_dir), read_all(back)
    assert sorted(src) == sorted(out)
    for name, (file_name, tensor) in src.items():
        out_file, out_tensor = out[name]
        assert out_file == file_name, name
        assert out_tensor.dtype == tensor.dtype == dtype, name
        assert out_tensor.shape == tensor.shape, name
        assert out_tensor.contiguous().view(-1).view(torch.uint8).tolist() == \
            tensor.contiguous().view(-1).view(torch.uint8).tolist(), name
    assert json.loads((back / "model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert (back / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()
    assert (back / "generation_config.json").exists()
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())


def test_export_loads_in_transformers_with_identical_logits(converted):
    dtype, _, hf_dir, _, back = converted
    a = NemotronHForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    b = NemotronHForCausalLM.from_pretrained(str(back), dtype=dtype).eval()
    ids = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(a, ids), hf_logits(b, ids))


def test_cli_checkpoint_has_transformers_logits(parallel_state, tmp_path_factory):
    """fp32 parity through a checkpoint the CLI wrote (the bf16 one is covered bit for bit above)."""
    _, hf_model, _, mcore, _ = _convert(tmp_path_factory, torch.float32)
    model = AutoBridge.load_megatron_model(mcore)
    ids = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(5))
    ref = hf_logits(hf_model.float(), ids)
    err = max_error(megatron_logits(model, ids), ref)
    print(f"CLI checkpoint parity: max|dlogit|={err:.3e} tol={tolerance(ref):.3e}")
    assert err <= tolerance(ref)
