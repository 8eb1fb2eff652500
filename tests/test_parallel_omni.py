"""Nemotron-Omni at parallel layouts: multi-process (torchrun, 2 processes, gloo, CPU, fp32).

One tiny Omni HF checkpoint (RADIO vision with a video embedder, Parakeet sound, both projectors,
the `M*EM` NemotronH language model with 4 experts; sharded with an index and a tokenizer file), and
one Megatron checkpoint converted from it by the CLI in a single process. One torchrun launch of
`tests/dist/omni_layouts_worker.py` runs every case. Inputs: one sample with two images of different
grids (4x4 and 6x4 patches) and a padded audio clip, and one text-only sample, as two micro-batches
through megatron-core's pipeline schedule; logits are compared with transformers'
`NemotronH_Omni_Reasoning_V3` on the last stage, gathered over TP. Checked as well: the encoders and
projections exist (and are exported from) the first pipeline stage only, the multimodal inputs reach
only the first-stage chunk, and export from each marked layout gives back the source HF checkpoint
bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.tiny_models import build_hf_omni_model, save_hf_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENCODERS = ("vision_model", "vision_projection", "sound_encoder", "sound_projection")
HF_TENSORS = 156  # every tensor of the tiny Omni checkpoint (LM, RADIO, projectors, Parakeet, carried buffers)

CASES = [
    # from the HF checkpoint (load_hf_weights), exported back (save_hf_pretrained)
    dict(name="omni_pp2", source="hf", pp=2, export=True),
    dict(name="omni_tp2_sp", source="hf", tp=2, export=True, save_mcore="mcore_tp2"),  # ETP=2, SP on
    dict(name="omni_pp2_vpp2", source="hf", pp=2, vpp=2, export=True),                # 4 chunks of 1 layer
    dict(name="omni_ep2", source="hf", ep=2, export=True, save_mcore="mcore_ep2_mlm", target="megatron-lm"),
    dict(name="omni_tp2_ep2", source="hf", tp=2, ep=2, etp=1, export=True),
    # the checkpoint the CLI wrote in one process, loaded at PP=2 and at TP=2
    dict(name="omni_cli_pp2", source="mcore_cli", pp=2, export=True),
    dict(name="omni_cli_tp2", source="mcore_cli", tp=2, export=True),
    # the checkpoint written by 2 ranks at TP=2, loaded at PP=2
    dict(name="omni_tp2ckpt_pp2", source="mcore_tp2", pp=2, export=True),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("omni_layouts")
    hf_dir = save_hf_model(build_hf_omni_model(seed=3), tmp / "hf", max_shard_size="60KB")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    out = tmp / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([str(BIN / "convert-hf-to-mcore"), "--hf-path", str(hf_dir), "--output", str(out / "mcore_cli"),
                           "--tp", "2", "--pp", "2", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "dist" / "omni_layouts_worker.py"), "--hf", str(hf_dir), "--out", str(out),
                           "--cases", json.dumps(CASES)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert (out / "results.json").exists(), (proc.stdout[-3000:], proc.stderr[-5000:])
    got = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    for r in got.values():
        print(json.dumps({k: v for k, v in r.items() if k not in ("placement", "forward_steps")}))
    assert proc.returncode == 0, proc.stderr[-5000:]
    got["_paths"] = {"hf": hf_dir, "out": out}
    return got


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_omni_layout(results, case):
    r = results.get(case["name"])
    assert r is not None, f"case {case['name']} did not run (an earlier case failed)"
    assert "error" not in r, r["error"]
    lay = r["layout"]
    tp, pp = case.get("tp", 1), case.get("pp", 1)
    assert (lay["tp"], lay["pp"], lay["ep"]) == (tp, pp, case.get("ep", 1))
    assert r["vpp"] == case.get("vpp") and r["chunks"] == (case.get("vpp") or 1)
    assert r["sequence_parallel"] == (tp > 1)  # MoE language model: on whenever TP > 1
    assert r["padded_vocab"] == 384
    # the inputs: two images (4 + 6 tokens) and an audio clip; leaving them out moves the logits a lot
    assert r["image_tokens"] == 10 and r["audio_tokens"] > 0
    assert r["multimodal_effect"] > 1000 * r["tolerance"]

    # encoders and projections: on the first pipeline stage only, exported from there
    for rank, place in enumerate(r["placement"]):
        if place["first_stage"]:
            assert all(place["modules"][m] for m in ENCODERS), (rank, place)
            assert place["encoder_tensors"] > 0
            # TP shards the vision tower and the projections like the language model
            assert place["local_shapes"]["vision_model.embedder.weight"][0] == 32 // tp
            assert place["local_shapes"]["vision_projection.encoder.linear_fc1.weight"][0] == 48 // tp
        else:
            assert not any(place["modules"][m] for m in ENCODERS), (rank, place)  # attributes are None
            assert place["encoder_tensors"] == 0 and place["local_shapes"] == {}
        assert place["pre_process"][0] == place["first_stage"] and not any(place["pre_process"][1:])
    assert sum(p["first_stage"] for p in r["placement"]) == 2 // pp
    assert r["encoder_owners_on_first_stage"] and r["encoder_owner_ranks"] == [0]
    # the multimodal kwargs were given to the first-stage chunk only (and to it for the first sample)
    for steps in r["forward_steps"]:
        for first, kwargs in steps:
            assert (kwargs != []) <= first
    assert sum(bool(kw) for steps in r["forward_steps"] for _, kw in steps) == 2 // pp

    # logits on the last stage, gathered over TP
    assert r["ranks_with_logits"] == 2 // pp
    assert r["max_abs_err"] <= r["tolerance"], r
    if case.get("export"):
        assert r["export_problems"] == [], r["export_problems"]
        assert r["export_tensors"] == r["source_tensors"] == HF_TENSORS


def test_cli_exports_the_checkpoint_megatron_wrote_at_tp2(results, tmp_path):
    """convert-mcore-to-hf (streaming, reads chunk regions) on the checkpoint that megatron-core's
    own writer saved from the TP=2 model (2 ranks: TP-sliced chunks, Mamba factory pieces)."""
    from tests.cli_helpers import assert_cli_export_equals

    paths = results["_paths"]
    assert_cli_export_equals(paths["out"] / "mcore_tp2", paths["hf"], tmp_path / "hf")


def test_cli_exports_an_omni_checkpoint_laid_out_as_training_writes_it(results, tmp_path):
    """The EP=2 model saved by 2 ranks for Megatron-LM (`sound_model.` keys, no carried tensors in the
    torch_dist files), laid out as Megatron-LM's training writes it (iter_0000100/, no bridge files):
    the export takes config, tokenizer and the carried RADIO tensors from --hf-config and gives back
    the source bit for bit."""
    from tests.cli_helpers import as_training_writes_it, assert_cli_export_equals, run_cli

    paths = results["_paths"]
    mlm = as_training_writes_it(paths["out"] / "mcore_ep2_mlm", tmp_path / "mlm")
    from conversion.megatron_ckpt import open_checkpoint

    keys = open_checkpoint(mlm).tensors
    assert any(k.startswith("sound_model.encoder.") for k in keys)
    assert not any(k.startswith(("sound_encoder.", "hf_extras.")) for k in keys)
    assert_cli_export_equals(mlm, paths["hf"], tmp_path / "hf", "--hf-config", paths["hf"])
    # without the HF side the checkpoint cannot be exported: one line saying what to pass
    proc = run_cli("convert-mcore-to-hf", "--mcore-path", mlm, "--output", tmp_path / "none", "--quiet")
    assert proc.returncode == 2 and "--hf-config" in proc.stderr, proc.stderr[-2000:]
