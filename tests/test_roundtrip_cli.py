"""HF -> convert-hf-to-mcore -> convert-mcore-to-hf gives back every tensor bit for bit, and the
Megatron checkpoint the CLI wrote computes the transformers logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import NemotronH_Omni_Reasoning_V3, NemotronHForCausalLM

from bridge import AutoBridge
from bridge.checkpoint import META_NAME, TRACKER_NAME
from bridge.tiny_models import (AUDIO_TOKEN, IMAGE_TOKEN, build_hf_model, build_hf_omni_model, save_hf_model,
                                tiny_config, use_released_field_names)
from tests.cli_helpers import read_all
from tests.parity import hf_logits, max_error, megatron_logits, tolerance

# (model, dtype, config naming): the text model, and the Omni model in both config namings.
CASES = [("text", torch.float32, "transformers"), ("text", torch.bfloat16, "transformers"),
         ("omni", torch.float32, "transformers"), ("omni", torch.bfloat16, "released")]

BIN = Path(sys.executable).parent


def run_cli(name, *args):
    proc = subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


_CACHE = {}


def _convert(tmp_path_factory, case):
    """HF checkpoint (sharded, with a tokenizer file) -> Megatron -> HF, once per case."""
    if case in _CACHE:
        return _CACHE[case]
    kind, dtype, naming = case
    tmp = tmp_path_factory.mktemp(f"rt_{kind}_{str(dtype).split('.')[-1]}")
    hf_model = build_hf_model(tiny_config(), seed=3) if kind == "text" else build_hf_omni_model(seed=3)
    hf_dir = save_hf_model(hf_model, tmp / "hf", dtype=dtype, max_shard_size="60KB")
    if naming == "released":
        use_released_field_names(hf_dir)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    run_cli("convert-hf-to-mcore", "--hf-path", hf_dir, "--output", tmp / "mcore")
    run_cli("convert-mcore-to-hf", "--mcore-path", tmp / "mcore", "--output", tmp / "hf_back")
    _CACHE[case] = (dtype, hf_model, hf_dir, tmp / "mcore", tmp / "hf_back")
    return _CACHE[case]


@pytest.fixture(scope="module", params=CASES, ids=["-".join((k, str(d).split(".")[-1], n)) for k, d, n in CASES])
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
        assert out_tensor.dtype == tensor.dtype, name
        assert tensor.dtype == dtype or not tensor.dtype.is_floating_point, name  # int: BN counters, summary_idxs
        assert out_tensor.shape == tensor.shape, name
        assert out_tensor.contiguous().view(-1).view(torch.uint8).tolist() == \
            tensor.contiguous().view(-1).view(torch.uint8).tolist(), name
    assert json.loads((back / "model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert (back / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()
    assert (back / "generation_config.json").exists()
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())


def _probe(model_cls, dtype):
    """Inputs that exercise every tower the model has."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 300, (1, 40), generator=g)
    if model_cls is NemotronHForCausalLM:
        return dict(input_ids=ids)
    ids[0, 2:6] = IMAGE_TOKEN  # one 4x4-patch image -> 4 tokens
    features, mask = torch.randn(1, 40, 16, generator=g).to(dtype), torch.ones(1, 40, dtype=torch.long)
    ids[0, 10:15] = AUDIO_TOKEN  # 40 mel frames -> 5 tokens
    return dict(input_ids=ids, pixel_values=torch.randn(16, 48, generator=g).to(dtype),
                image_grid_hw=torch.tensor([[4, 4]]), input_features=features, input_features_mask=mask)


def test_export_loads_in_transformers_with_identical_logits(converted):
    dtype, hf_model, hf_dir, _, back = converted
    cls = type(hf_model)
    a = cls.from_pretrained(str(hf_dir), dtype=dtype).eval()
    b = cls.from_pretrained(str(back), dtype=dtype).eval()
    with torch.no_grad():
        la = a(**_probe(cls, dtype), use_cache=False).logits
        lb = b(**_probe(cls, dtype), use_cache=False).logits
    assert torch.equal(la, lb)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == torch.float32], ids=lambda c: c[0])
def test_cli_checkpoint_has_transformers_logits(parallel_state, tmp_path_factory, case):
    """fp32 parity through a checkpoint the CLI wrote (the bf16 ones are covered bit for bit above)."""
    _, hf_model, _, mcore, _ = _convert(tmp_path_factory, case)
    model = AutoBridge.load_megatron_model(mcore).eval()
    inputs = _probe(type(hf_model), torch.float32)
    with torch.no_grad():
        ref = hf_model.float().eval()(**inputs, use_cache=False).logits
        ids = inputs.pop("input_ids")
        got = model(ids, **inputs) if inputs else megatron_logits(model, ids)
    err = max_error(got.float(), ref)
    print(f"CLI checkpoint parity ({case[0]}): max|dlogit|={err:.3e} tol={tolerance(ref):.3e}")
    assert err <= tolerance(ref)
