"""Multi-process (torchrun, 2 processes, gloo, CPU) loads and exports at parallel layouts.

One HF checkpoint (tiny NemotronH, every layer kind, sharded with an index, a tokenizer file) and
one Megatron checkpoint converted from it by the CLI in a single process. One torchrun launch of
`tests/dist/layouts_worker.py` then runs every case below (the worker tears megatron's parallel
state down between cases). For each case it checks fp32 logits against transformers (computed in
the worker from the same HF directory), taken on the last pipeline stage through megatron-core's
pipeline schedule and gathered over TP, and, where marked, that `save_hf_pretrained` from that
layout gives back the source HF checkpoint bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.tiny_models import build_hf_model, save_hf_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# name, source ("hf" = load_hf_weights, else a Megatron checkpoint under the output dir), layout, export?
CASES = [
    # from the HF checkpoint (load_hf_weights), exported back (save_hf_pretrained)
    dict(name="tp2_sp", source="hf", tp=2, export=True, save_mcore="mcore_tp2"),  # ETP=TP=2, SP on
    dict(name="pp2", source="hf", pp=2, export=True),
    dict(name="pp2_vpp2", source="hf", pp=2, vpp=2, export=True),
    dict(name="ep2", source="hf", ep=2, export=True),                             # dense parts DP=2
    dict(name="tp2_ep2", source="hf", tp=2, ep=2, etp=1, export=True),
    # the checkpoint the CLI wrote in one process (TP=1 layout), loaded at other layouts
    dict(name="cli_tp1", source="mcore_cli"),                                      # DP=2
    dict(name="cli_tp2", source="mcore_cli", tp=2),
    dict(name="cli_pp2", source="mcore_cli", pp=2),
    dict(name="cli_ep2", source="mcore_cli", ep=2, export=True),
    dict(name="cli_pp2_vpp2", source="mcore_cli", pp=2, vpp=2),
    # the checkpoint written by 2 ranks at TP=2 (first case), loaded at PP=2 and exported
    dict(name="tp2ckpt_pp2", source="mcore_tp2", pp=2, export=True),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    hf_dir = save_hf_model(build_hf_model(tiny_config(), seed=11), tmp / "hf", max_shard_size="60KB")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    out = tmp / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               # megatron's squared_relu is torch.compile'd: ~10 s of compilation per process on CPU
               TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([str(BIN / "convert-hf-to-mcore"), "--hf-path", str(hf_dir), "--output", str(out / "mcore_cli"),
                           "--tp", "2", "--pp", "2", "--ep", "2", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "dist" / "layouts_worker.py"), "--hf", str(hf_dir), "--out", str(out),
                           "--cases", json.dumps(CASES)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert (out / "results.json").exists(), (proc.stdout[-3000:], proc.stderr[-5000:])
    got = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    for r in got.values():
        print(json.dumps(r))
    assert proc.returncode == 0, proc.stderr[-5000:]
    got["_paths"] = {"hf": hf_dir, "out": out}
    return got


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_layout(results, case):
    r = results.get(case["name"])
    assert r is not None, f"case {case['name']} did not run (an earlier case failed)"
    assert "error" not in r, r["error"]
    lay = r["layout"]
    assert (lay["tp"], lay["pp"], lay["ep"]) == (case.get("tp", 1), case.get("pp", 1), case.get("ep", 1))
    assert lay["etp"] == case.get("etp") or (case.get("etp") is None and lay["etp"] == lay["tp"])
    assert r["vpp"] == case.get("vpp") and r["chunks"] == (case.get("vpp") or 1)
    assert r["sequence_parallel"] == (lay["tp"] > 1)  # MoE model: on whenever TP > 1
    assert r["padded_vocab"] == 384  # one padded size at every TP (vocab 300 -> multiple of 128)
    # logits exist only on the last pipeline stage (PP=2: one of the 2 ranks)
    assert r["ranks_with_logits"] == 2 // lay["pp"]
    assert r["max_abs_err"] <= r["tolerance"], r
    if case.get("export"):
        assert r["export_problems"] == [], r["export_problems"]
        assert r["export_tensors"] == 63


def test_cli_exports_the_checkpoint_megatron_wrote_at_tp2(results, tmp_path):
    """convert-mcore-to-hf (streaming, reads chunk regions) on the checkpoint that megatron-core's
    own writer saved from the TP=2 model (2 ranks: TP-sliced chunks, Mamba factory pieces)."""
    from tests.cli_helpers import assert_cli_export_equals

    paths = results["_paths"]
    assert_cli_export_equals(paths["out"] / "mcore_tp2", paths["hf"], tmp_path / "hf")


def test_cli_exports_checkpoints_laid_out_as_megatron_lm_writes_them(results, tmp_path):
    """The TP=2 checkpoint's torch_dist files laid out as Megatron-LM's training writes them (two
    iterations, the tracker naming the later, none of this project's files): exported with the HF
    side from --hf-config, the tracker's iteration and `--iteration N` both give back the source."""
    from tests.cli_helpers import as_training_writes_it, assert_cli_export_equals, run_cli

    paths = results["_paths"]
    mlm = as_training_writes_it(paths["out"] / "mcore_tp2", tmp_path / "mlm", iteration=50)
    as_training_writes_it(paths["out"] / "mcore_tp2", mlm, iteration=100)
    assert_cli_export_equals(mlm, paths["hf"], tmp_path / "hf100", "--hf-config", paths["hf"])
    assert_cli_export_equals(mlm, paths["hf"], tmp_path / "hf50", "--hf-config", paths["hf"], "--iteration", "50")
    proc = run_cli("convert-mcore-to-hf", "--mcore-path", mlm, "--hf-config", paths["hf"], "--iteration", "7",
                   "--output", tmp_path / "none", "--quiet")
    assert proc.returncode == 2 and "no iteration 7" in proc.stderr and "iter_0000050, iter_0000100" in proc.stderr
