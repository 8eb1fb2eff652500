"""examples/generate.py, run as a script: its greedy tokens equal transformers' generate(do_sample=False)
on the same tiny checkpoint (text model; Omni text-only from HF; Omni image + audio from a Megatron
checkpoint; on a checkpoint with the released placeholder ids, image + audio and video + audio; a video
of uint8 frames through the checkpoint's video processor). A video file is decoded by one of
transformers' `load_video` backends where one is installed, else refused with one `error:` line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bridge.tiny_models import (
    AUDIO_TOKEN, IMAGE_TOKEN, RELEASED_AUDIO_TOKEN, RELEASED_IMAGE_TOKEN, build_hf_model, build_hf_omni_model,
    save_hf_model, tiny_omni_config,
)

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


def error_line(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    return err.strip().splitlines()[-1]


def hf_generate(model, ids, new=NEW, **kwargs):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, **kwargs)
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



def tubelets(frames, t=2):
    """[frames, 3, H, W] -> [1, tubelets, t*3, H, W] as transformers' video processor packs them (the last
    frame repeated to fill the last tubelet)."""
    pad = -frames.shape[0] % t
    frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    return frames.reshape(1, -1, t * 3, *frames.shape[-2:])


def test_generate_on_the_released_placeholder_ids_with_video(tmp_path):
    """A checkpoint with the release's image (18) and audio (27) ids, inside the range prompts draw from:
    image + audio, and a video of normalised frames (3 frames: 2 tubelets of 4x6 patches, the model
    repeats the last frame) + audio. This random model emits the audio id itself (video+audio, new token
    8): later steps must embed it as text, as transformers' generate does (its first forward alone sees
    the media), not count it as a placeholder."""
    new = 16
    omni = build_hf_omni_model(tiny_omni_config(released_token_ids=True), seed=2)
    save_hf_model(omni, tmp_path / "omni")
    g = torch.Generator().manual_seed(1)
    pixels, frames = torch.randn(3, 16, 24, generator=g), torch.randn(3, 3, 16, 24, generator=g)
    mel = torch.randn(40, 16, generator=g)
    np.save(tmp_path / "image.npy", pixels.numpy())
    np.save(tmp_path / "frames.npy", frames.numpy())
    torch.save(mel, tmp_path / "mel.pt")
    ids = ",".join(map(str, PROMPT))
    procs = [start("--hf-path", tmp_path / "omni", "--prompt-ids", ids, "--max-new-tokens", new,
                   "--image", tmp_path / "image.npy", "--audio", tmp_path / "mel.pt"),
             start("--hf-path", tmp_path / "omni", "--prompt-ids", ids, "--max-new-tokens", new,
                   "--video", tmp_path / "frames.npy", "--audio", tmp_path / "mel.pt")]
    patches = pixels.reshape(3, 4, 4, 6, 4).permute(1, 3, 0, 2, 4).reshape(24, 48)
    audio = dict(input_features=mel.unsqueeze(0), input_features_mask=torch.ones(1, 40, dtype=torch.long))
    expected = [
        hf_generate(omni, [RELEASED_IMAGE_TOKEN] * 6 + [RELEASED_AUDIO_TOKEN] * 5 + PROMPT, new,
                    pixel_values=patches, image_grid_hw=torch.tensor([[4, 6]]), **audio),
        hf_generate(omni, [RELEASED_IMAGE_TOKEN] * 12 + [RELEASED_AUDIO_TOKEN] * 5 + PROMPT, new,
                    pixel_values_videos=tubelets(frames), **audio),
    ]
    assert RELEASED_AUDIO_TOKEN in expected[1][:-1]  # the case above: a generated placeholder id, then more tokens
    for label, p, b in zip(("image+audio", "video+audio"), procs, expected):
        a = finish(p)
        print(f"released ids, {label}: megatron {a} transformers {b}")
        assert a == b, label


def test_generate_video_through_the_checkpoints_processor(tmp_path):
    """uint8 frames (`.npy` [frames, H, W, 3]) preprocessed by the checkpoint's video processor (transformers'
    with torchvision, `_common.OmniVideoProcessor` without; their equality: tests/test_examples_video.py):
    the ids equal transformers' generate on that processor's `pixel_values_videos`. A video file: decoded
    where a backend is installed (checked against the processor on transformers' own `load_video`), else
    refused with one `error:` line."""
    sys.path.insert(0, str(REPO / "examples"))
    from _common import load_processor, video_backend

    from tests.test_examples_jsonl import write_checkpoint

    write_checkpoint(tmp_path / "hf")
    frames = np.random.default_rng(3).integers(0, 256, (5, 13, 21, 3), dtype=np.uint8)  # -> 3 tubelets of 16x24
    np.save(tmp_path / "frames.npy", frames)
    ids = ",".join(map(str, PROMPT))
    proc = start("--hf-path", tmp_path / "hf", "--prompt-ids", ids, "--max-new-tokens", NEW,
                 "--video", tmp_path / "frames.npy")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not decoded: no backend")
    backend = video_backend()
    if backend is not None:
        av = pytest.importorskip("av", reason="writing the test video needs PyAV")
        with av.open(str(clip), "w") as out:
            stream = out.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 24, 16, "yuv420p"
            for f in np.random.default_rng(4).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(stream.encode())
    file_proc = start("--hf-path", tmp_path / "hf", "--prompt-ids", ids, "--max-new-tokens", NEW, "--video", clip)

    from transformers import NemotronH_Omni_Reasoning_V3

    omni = NemotronH_Omni_Reasoning_V3.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    processor = load_processor(tmp_path / "hf")
    videos = processor.video_processor(videos=[frames], temporal_patch_size=2, return_tensors="pt")
    assert videos["pixel_values_videos"].shape == (1, 3, 6, 16, 24) and videos["num_frames"].tolist() == [5]
    expected = hf_generate(omni, [IMAGE_TOKEN] * 18 + PROMPT, pixel_values_videos=videos["pixel_values_videos"])
    got = finish(proc)
    print(f"uint8 frames through the processor: megatron {got} transformers {expected}")
    assert got == expected

    if backend is None:
        line = error_line(file_proc)
        print(line)
        assert line.startswith(f"error: {clip}: decoding a video file needs one of transformers' video backends")
    else:
        from transformers.video_utils import load_video as hf_load_video

        decoded, metadata = hf_load_video(str(clip), backend=backend)
        videos = processor.video_processor(videos=[decoded], video_metadata=[metadata], temporal_patch_size=2,
                                           return_tensors="pt")
        expected = hf_generate(omni, [IMAGE_TOKEN] * 18 + PROMPT, pixel_values_videos=videos["pixel_values_videos"])
        got = finish(file_proc)
        print(f"video file ({backend}): megatron {got} transformers {expected}")
        assert got == expected
