"""examples/finetune.py, run as a script on a tiny random Omni checkpoint (CPU): the loss falls over 30
steps, frozen towers stay bit-identical, the --export-hf output loads in transformers, --resume
continues exactly, and the same command under torchrun (TP=2, PP=2, EP=2; 2 processes) gives the
single-process losses. The synthetic data (text, image, video, image+audio samples by default) keeps
every placeholder and special id out of its random text, also on a checkpoint with the released
placeholder ids (image 18, audio 27, inside the range random text is drawn from)."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bridge.tiny_models import (
    RELEASED_AUDIO_TOKEN, RELEASED_IMAGE_TOKEN, RELEASED_VIDEO_TOKEN, build_hf_omni_model, save_hf_model,
    tiny_omni_config,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "finetune.py"


def env():
    e = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(args, nproc=1):
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(port), str(SCRIPT)]
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env(), cwd=REPO,
                          timeout=400)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


def losses(stdout):
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+) loss ([\d.]+)$", stdout, re.M)}


def tensors(path):
    out = {}
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("finetune")
    save_hf_model(build_hf_omni_model(seed=1), work / "hf")
    out = run(["--hf-path", work / "hf", "--synthetic", "--steps", 30, "--lr", "1e-3", "--global-batch-size", 4,
               "--seq-length", 64, "--freeze-vision-model", "--freeze-sound-encoder", "--output", work / "ckpt",
               "--save-interval", 28, "--export-hf", work / "hf_out"])
    return work, losses(out)


def test_loss_falls_over_30_steps(trained):
    _, loss = trained
    assert sorted(loss) == list(range(1, 31))
    print(f"loss: step 1 {loss[1]:.4f} -> step 30 {loss[30]:.4f}")
    assert loss[30] < 0.5 * loss[1]
    assert all(loss[i + 5] < loss[i] for i in range(1, 26))


def test_frozen_towers_bit_identical_and_export_loads_in_transformers(trained):
    work, _ = trained
    src, out = tensors(work / "hf"), tensors(work / "hf_out")
    assert src.keys() == out.keys()
    frozen = [k for k in src if k.startswith(("vision_model.", "sound_encoder."))]
    trained_names = [k for k in src if not k.startswith(("vision_model.", "sound_encoder."))]
    assert len(frozen) > 100
    changed = [k for k in frozen if not torch.equal(src[k], out[k])]
    assert not changed, changed[:5]
    # everything trainable moved (projectors, the language model)
    unchanged = [k for k in trained_names if torch.equal(src[k], out[k])]
    assert not unchanged, unchanged[:5]

    from transformers import NemotronH_Omni_Reasoning_V3

    model = NemotronH_Omni_Reasoning_V3.from_pretrained(str(work / "hf_out"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[11, 22, 33]]), use_cache=False).logits
    assert logits.shape == (1, 3, 300) and torch.isfinite(logits).all()


def test_megatron_checkpoint_layout_and_resume(trained):
    work, loss = trained
    ckpt = work / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "30"
    assert (ckpt / "iter_0000028").is_dir() and (ckpt / "iter_0000030").is_dir() and (ckpt / "bridge_meta.json").is_file()
    resumed = work / "ckpt_resume"
    shutil.copytree(ckpt, resumed)
    shutil.rmtree(resumed / "iter_0000030")
    (resumed / "latest_checkpointed_iteration.txt").write_text("28")
    out = run(["--hf-path", work / "hf", "--synthetic", "--steps", 30, "--lr", "1e-3", "--global-batch-size", 4,
               "--seq-length", 64, "--freeze-vision-model", "--freeze-sound-encoder", "--output", resumed, "--resume"])
    assert "resumed from" in out and "at iteration 28" in out
    again = losses(out)
    assert sorted(again) == [29, 30]
    for step in (29, 30):  # model and optimizer state restored: the same losses as the uninterrupted run
        assert abs(again[step] - loss[step]) < 1e-4, (step, again[step], loss[step])


def test_the_examples_checkpoints_export_with_the_converter(trained, tmp_path):
    """`convert-mcore-to-hf` exports the fine-tuning checkpoint (iter_NNNNNNN, the tracker's or
    `--iteration`): at iteration 30 it equals the example's own in-memory export of the same model;
    each iteration carries what Megatron-LM / Megatron-Bridge / megatron-core 0.16.1 read."""
    from conversion import safe_pickle  # noqa: F401 - allows Megatron-LM's args (argparse.Namespace)
    from tests.cli_helpers import assert_cli_export_equals, run_cli

    work, _ = trained
    for it in (28, 30):
        sub = work / "ckpt" / f"iter_{it:07d}"
        assert (sub / "common.pt").is_file() and (sub / "run_config.yaml").is_file()
        assert torch.load(sub / "common.pt", weights_only=True)["args"].hybrid_override_pattern
    assert_cli_export_equals(work / "ckpt", work / "hf_out", tmp_path / "hf30")
    proc = run_cli("convert-mcore-to-hf", "--mcore-path", work / "ckpt", "--iteration", "28", "--output",
                   tmp_path / "hf28", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    at28, at30 = tensors(tmp_path / "hf28"), tensors(work / "hf_out")
    assert at28.keys() == at30.keys() and any(not torch.equal(at28[k], at30[k]) for k in at28)


@pytest.mark.parametrize("layout", [["--tp", 2], ["--pp", 2], ["--ep", 2]], ids=["tp2", "pp2", "ep2"])
def test_torchrun_layouts_give_the_single_process_losses(trained, layout):
    work, loss = trained
    out = run(["--hf-path", work / "hf", "--synthetic", "--steps", 3, "--lr", "1e-3", "--global-batch-size", 4,
               "--seq-length", 64, "--freeze-vision-model", "--freeze-sound-encoder", *layout], nproc=2)
    got = losses(out)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(got[step] - loss[step]) < 1e-3, (layout, step, got[step], loss[step])


def test_jsonl_reader_text_only_with_a_word_level_tokenizer(tmp_path):
    """The JSONL reader in-process, text-only (no image processor / Pillow here): a word-level
    tokenizer built offline with `tokenizers`; the loss covers exactly the assistant's answer."""
    import json
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "user:", "assistant:", "what", "is", "two", "plus", "four", "six", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(str(tmp_path))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "what is two plus four"},
                                             {"role": "assistant", "content": "six"}]}) + "\n")
    sys.path.insert(0, str(REPO / "examples"))
    import finetune

    (sample,) = finetune.jsonl_samples(str(data), str(tmp_path), SimpleNamespace(seq_length=12))
    # "user: what is two plus four assistant: six" -> ids 2 4 5 6 7 8 3 9, padded with 0
    assert sample["tokens"].tolist() == [2, 4, 5, 6, 7, 8, 3, 9, 0, 0, 0, 0]
    assert sample["labels"].tolist() == [4, 5, 6, 7, 8, 3, 9, 0, 0, 0, 0, 0]
    assert [int(t) for t, m in zip(sample["labels"], sample["loss_mask"]) if m] == [9]


def test_synthetic_text_avoids_the_released_placeholder_ids(tmp_path):
    """On a checkpoint with the release's ids the random text used to hold image (18) / audio (27)
    placeholders, and a step failed (`got 4 feature vectors for 5 placeholder tokens (id 18)` with
    --seed 1). Now: every sample holds exactly the placeholders its media fill, no special id of the
    config (bos 1, eos 2, pad 0) or of the tokenizer when there is one, and the script trains."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bridge import AutoBridge

    hf = tmp_path / "hf"
    save_hf_model(build_hf_omni_model(tiny_omni_config(released_token_ids=True), seed=1), hf)
    sys.path.insert(0, str(REPO / "examples"))
    import finetune

    bridge = AutoBridge.from_hf_pretrained(hf)
    provider = bridge.to_megatron_provider()
    args = SimpleNamespace(seed=1, seq_length=64, synthetic_samples=12)
    special = finetune.special_token_ids(bridge.config.raw, hf, provider)
    assert {0, 1, 2, RELEASED_IMAGE_TOKEN, RELEASED_AUDIO_TOKEN, RELEASED_VIDEO_TOKEN} <= special
    kinds = ["text", "image", "video", "image+audio", "audio", "video+audio"]
    want = {"text": (0, 0), "image": (4, 0), "video": (8, 0), "image+audio": (4, 5), "audio": (0, 5),
            "video+audio": (8, 5)}

    def check(samples, avoid):
        for i, s in enumerate(samples):
            ids = torch.cat([s["tokens"], s["labels"][-1:]])
            kind = kinds[i % len(kinds)]
            assert (int((ids == RELEASED_IMAGE_TOKEN).sum()), int((ids == RELEASED_AUDIO_TOKEN).sum())) == want[kind]
            text = torch.cat([ids[:1], ids[1 + sum(want[kind]):]])  # around the placeholder run
            assert not set(text.tolist()) & avoid, (kind, set(text.tolist()) & avoid)
            assert ("pixel_values_videos" in s) == ("video" in kind) and ("pixel_values" in s) == ("image" in kind)

    check(finetune.synthetic_samples(provider, 300, args, special), special)
    # a tokenizer in the checkpoint: its special and added tokens are kept out too
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 300)]
    words[40], words[41], words[250] = "<img>", "</img>", "<so_start>"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            additional_special_tokens=["<img>", "</img>", "<so_start>"]).save_pretrained(str(hf))
    special = finetune.special_token_ids(bridge.config.raw, hf, provider)
    assert {40, 41, 250} <= special
    check(finetune.synthetic_samples(provider, 300, args, special), special)

    out = run(["--hf-path", hf, "--synthetic", "--steps", 2, "--synthetic-samples", 8, "--global-batch-size", 8,
               "--seed", 1, "--seq-length", 64])
    assert sorted(losses(out)) == [1, 2]
