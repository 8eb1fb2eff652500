"""`bridge-verify`: passes on a faithful conversion, fails (exit 3) when one tensor differs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bridge.tiny_models import build_hf_model, save_hf_model, tiny_config
from tests.cli_helpers import copy_dir, run_cli, swap_experts, tiny_converted


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    hf, mc = tiny_converted(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("verify")
    swapped = copy_dir(hf, tmp / "hf_swapped")
    swap_experts(swapped, layer=3)  # pattern M*-EM*E-: layer 3 is MoE; expert 0 <-> 1 up_proj
    other = save_hf_model(build_hf_model(tiny_config(), seed=8), tmp / "hf_other_seed", dtype=torch.float32,
                          max_shard_size="100KB")
    cases = {"same": (hf, mc), "swapped": (swapped, mc), "other_seed": (other, mc)}
    with ThreadPoolExecutor(3) as pool:
        futures = {k: pool.submit(run_cli, "bridge-verify", "--hf-path", h, "--mcore-path", m) for k, (h, m) in cases.items()}
        return {k: f.result() for k, f in futures.items()}


def _rows(stdout: str) -> dict:
    """modality -> {column: value} of bridge-verify's table (the probe column holds spaces: the
    other columns are read from the right)."""
    lines = stdout.splitlines()
    header = next(line.split() for line in lines if line.startswith("modality "))
    tail = header[2:]
    rows = {}
    for line in lines:
        cells = line.split()
        if cells and cells[0] in ("text", "image", "video", "audio") and len(cells) >= len(header):
            rows[cells[0]] = dict(zip(tail, cells[-len(tail):]))
    return rows


def _row(stdout: str):
    rows = _rows(stdout)
    assert list(rows) == ["text"], stdout
    return rows["text"]


def test_faithful_conversion_passes(runs):
    proc = runs["same"]
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = _row(proc.stdout)
    assert row["result"] == "ok" and float(row["max|dlogit|"]) <= float(row["tolerance"])
    assert float(row["as-shipped"]) <= float(row["tolerance"])  # random dt_bias: the clamp does not bite


@pytest.mark.parametrize("case", ["swapped", "other_seed"])
def test_a_different_tensor_fails(runs, case):
    proc = runs[case]
    print(proc.stdout)
    assert proc.returncode == 3, proc.stderr[-3000:]
    row = _row(proc.stdout)
    assert row["result"] == "FAIL" and float(row["max|dlogit|"]) > 100 * float(row["tolerance"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "above tolerance for text" in lines[0], proc.stderr
    if case == "swapped":  # experts of layer 3 swapped: the first three layers agree
        assert "text: language-model layer 3 (MoE) is the first whose output differs" in lines[0], lines[0]
    else:  # another model altogether: the embeddings already differ
        assert "text: the language model's input (embeddings" in lines[0], lines[0]


def test_bad_input_is_one_line(tmp_path):
    proc = run_cli("bridge-verify", "--hf-path", tmp_path / "missing", "--mcore-path", tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing" in lines[0] and "does not exist" in lines[0]


def test_omni_every_modality_and_a_swapped_vision_tensor(tmp_path):
    """Omni: text, image, video and audio rows; swapping two RADIO blocks' MLPs fails image and video only."""
    from safetensors.torch import load_file, save_file

    from bridge.tiny_models import build_hf_omni_model

    hf = save_hf_model(build_hf_omni_model(seed=6), tmp_path / "hf")
    mc = tmp_path / "mcore"
    assert run_cli("convert-hf-to-mcore", "--hf-path", hf, "--output", mc).returncode == 0
    swapped = copy_dir(hf, tmp_path / "hf_swapped")
    tensors = load_file(str(swapped / "model.safetensors"))
    a, b = (f"vision_model.radio_model.model.blocks.{i}.mlp.fc1.weight" for i in (0, 1))
    tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, str(swapped / "model.safetensors"), metadata={"format": "pt"})
    with ThreadPoolExecutor(2) as pool:
        good, bad = pool.map(lambda h: run_cli("bridge-verify", "--hf-path", h, "--mcore-path", mc), (hf, swapped))
    print(good.stdout, bad.stdout)
    assert good.returncode == 0, good.stderr[-3000:]
    results = {m: row["result"] for m, row in _rows(good.stdout).items()}
    assert results == {"text": "ok", "image": "ok", "video": "ok", "audio": "ok"}
    assert bad.returncode == 3
    results = {m: row["result"] for m, row in _rows(bad.stdout).items()}
    assert results == {"text": "ok", "image": "FAIL", "video": "FAIL", "audio": "ok"}
    # the vision tower feeds the language model's input: that is where the two part
    assert "image: the language model's input (embeddings" in bad.stderr, bad.stderr


def test_a_time_step_below_time_step_min_does_not_fail_a_correct_conversion(tmp_path):
    """transformers clamps the Mamba time step at time_step_min (0.001), megatron-core does not: with
    dt_bias low enough that softplus(dt + dt_bias) falls below it, transformers as shipped and the
    converted model differ, yet the conversion is exact. bridge-verify compares with the clamp lifted
    (and reports the shipped difference beside it)."""
    hf = build_hf_model(tiny_config(), seed=9)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("mixer.dt_bias"):
                p.fill_(-8.0)  # softplus(-8) = 3.4e-4 < time_step_min
    hf_dir = save_hf_model(hf, tmp_path / "hf")
    assert run_cli("convert-hf-to-mcore", "--hf-path", hf_dir, "--output", tmp_path / "mc").returncode == 0
    proc = run_cli("bridge-verify", "--hf-path", hf_dir, "--mcore-path", tmp_path / "mc")
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    row = _row(proc.stdout)
    assert float(row["max|dlogit|"]) <= float(row["tolerance"]) < float(row["as-shipped"])
