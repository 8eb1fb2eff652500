"""examples/generate.py, run as a script: its greedy tokens equal transformers' generate(do_sample=False)
on the same tiny checkpoint (text model; Omni text-only from HF; Omni image + audio from a Megatron
checkpoint)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bridge.tiny_models import AUDIO_TOKEN, IMAGE_TOKEN, build_hf_model, build_hf_omni_model, save_hf_model

REPO = Path(__file__).resolve().parents[1]
PROMPT = [11, 22, 33, 44, 55, 66]
NEW = 8


def script_env():
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def start(*args):
    return subprocess.Popen([sys.executable, str(REPO / "examples" / "generate.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(), cwd=REPO)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return [int(t) for t in out.strip().splitlines()[-1].split(",")]


def hf_generate(model, ids, **kwargs):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def test_generate_matches_transformers(parallel_state, tmp_path):
    text = build_hf_model(seed=0)
    omni = build_hf_omni_model(seed=1)
    save_hf_model(text, tmp_path / "text")
    save_hf_model(omni, tmp_path / "omni")

    from bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(tmp_path / "omni")  # Omni as a Megatron checkpoint too
    mg = bridge.to_megatron_provider().provide()
    bridge.load_hf_weights(mg)
    bridge.save_megatron_model(mg, tmp_path / "omni_mcore")

    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 16, 24, generator=g)  # 4x6 patches -> 6 image tokens
    mel = torch.randn(40, 16, generator=g)  # 40 frames -> 5 audio tokens
    np.save(tmp_path / "image.npy", pixels.numpy())
    torch.save(mel, tmp_path / "mel.pt")

    procs = [
        start("--hf-path", tmp_path / "text", "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", NEW),
        start("--hf-path", tmp_path / "omni", "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", NEW),
        start("--mcore-path", tmp_path / "omni_mcore", "--prompt-ids", ",".join(map(str, PROMPT)),
              "--max-new-tokens", NEW, "--image", tmp_path / "image.npy", "--audio", tmp_path / "mel.pt"),
    ]

    patches = pixels.reshape(3, 4, 4, 6, 4).permute(1, 3, 0, 2, 4).reshape(24, 48)
    mm_ids = [IMAGE_TOKEN] * 6 + [AUDIO_TOKEN] * 5 + PROMPT
    expected = [
        hf_generate(text, PROMPT),
        hf_generate(omni, PROMPT),
        hf_generate(omni, mm_ids, pixel_values=patches, image_grid_hw=torch.tensor([[4, 6]]),
                    input_features=mel.unsqueeze(0), input_features_mask=torch.ones(1, 40, dtype=torch.long)),
    ]
    got = [finish(p) for p in procs]  # the scripts ran while transformers generated
    for label, a, b in zip(("text (hf)", "omni text-only (hf)", "omni image+audio (mcore)"), got, expected):
        print(f"{label}: megatron {a} transformers {b}")
        assert a == b, label
        assert len(a) == NEW or a[-1] == text.generation_config.eos_token_id

