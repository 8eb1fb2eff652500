"""Videos in the examples: the torch-only video processor against transformers' own, and finetune.py on
a JSONL of conversations with videos, on the tiny Omni checkpoint of tests/test_examples_jsonl.py
(byte-level tokenizer, chat template, processor config; all built offline).

* `_common.OmniVideoProcessor` (what runs where torchvision is missing) gives transformers'
  `NemotronH_Omni_Reasoning_V3VideoProcessor` outputs bit for bit (pixel values, frame counts,
  metadata) on upscaled, downscaled and unresized frames, numpy channels-last and torch channels-first
  input, grayscale and transparent frames, frame sampling by count and by rate, both tile modes,
  temporal patch sizes 1, 2 and 4, and the released model's patch size and budget; and the whole
  processor built with it gives transformers' `AutoProcessor` token ids (frame labels with
  timestamps included). These tests need torchvision: they skip without it, and fail instead when
  BRIDGE_TEST_REQUIRE_TORCHVISION=1 (CI's leg with torchvision).
* The JSONL reader's video samples are checked against what they must be: the token ids by hand
  (one `<img>` run of image tokens per tubelet, labelled with its frames), the pixel values of
  unresized frames by hand, `num_frames`; generate.py's `--video` loader gives the same inputs.
* The script trains on them (micro-batches of 2 that mix an image sample and a video sample, and a
  sample with two videos and an audio clip) and its step-1 loss equals transformers' model on the same
  samples.
* Refused with one `error:` line: images and videos in one record, a video without its placeholder,
  videos of one record that do not stack, a micro-batch of videos of different shapes, video samples
  with Efficient Video Sampling on.
"""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bridge.tiny_models import AUDIO_TOKEN, IMAGE_TOKEN, build_hf_omni_model, save_hf_model, tiny_omni_config
from tests.test_examples_jsonl import (
    CLIP_MEAN, CLIP_STD, SPECIAL, VIDEO_PROCESSOR, audio_tokens, ids, require_torchvision, transformers_loss,
    write_checkpoint, write_wav,
)

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
SEQ = 160


# ---------------------------------------------------------------------------- the torch-only video processor

def frames(shape, seed, dtype=np.uint8):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(dtype)


CASES = {  # name: (config overrides, videos, call kwargs)
    "upscaled-two-videos": ({}, [frames((3, 13, 21, 3), 0), frames((4, 13, 21, 3), 1)], {}),
    "downscaled": ({}, [frames((5, 50, 70, 3), 2)], {}),
    "unresized": ({}, [frames((3, 16, 24, 3), 3)], {}),
    "torch-channels-first": ({}, [torch.from_numpy(frames((3, 3, 20, 30), 4))], {}),
    "float-frames": ({}, [frames((2, 20, 30, 3), 5, np.float32)], {}),
    "grayscale": ({"do_convert_rgb": True}, [frames((3, 20, 30, 1), 6)], {}),
    "transparent": ({"do_convert_rgb": True}, [frames((3, 20, 30, 4), 7)], {"input_data_format": "channels_last"}),
    "sampled-by-count": ({"do_sample_frames": True, "num_frames": 4}, [frames((9, 20, 30, 3), 8)], {}),
    "sampled-by-rate": ({"do_sample_frames": True, "fps": 2}, [frames((9, 20, 30, 3), 9)],
                        {"video_metadata": [{"total_num_frames": 9, "fps": 6.0, "duration": 1.5}]}),
    "square-tile": ({"video_maintain_aspect_ratio": False}, [frames((3, 20, 40, 3), 10)], {}),
    "temporal-1": ({}, [frames((3, 20, 30, 3), 11)], {"temporal_patch_size": 1}),
    "temporal-4": ({}, [frames((6, 20, 30, 3), 12)], {"temporal_patch_size": 4}),
    "released-patch-and-budget": ({"patch_size": 16, "video_target_num_patches": 1024},
                                  [frames((3, 90, 160, 3), 13)], {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_video_processor_matches_transformers(case):
    require_torchvision()
    from transformers import NemotronH_Omni_Reasoning_V3VideoProcessor

    from _common import OmniVideoProcessor

    overrides, videos, kwargs = CASES[case]
    config = {k: v for k, v in dict(VIDEO_PROCESSOR, **overrides).items() if k != "video_processor_type"}
    ours, theirs = OmniVideoProcessor(**config), NemotronH_Omni_Reasoning_V3VideoProcessor(**config)
    for key in NemotronH_Omni_Reasoning_V3VideoProcessor.valid_kwargs.__annotations__:
        assert getattr(ours, key, None) == getattr(theirs, key, None), key
    kwargs = dict(kwargs, return_metadata=True, return_tensors="pt")
    kwargs.setdefault("temporal_patch_size", 2)
    a = ours(videos=videos, **dict(kwargs))
    b = theirs(videos=videos, **dict(kwargs))
    assert a.keys() == b.keys() == {"pixel_values_videos", "num_frames", "video_metadata"}
    print(case, tuple(a["pixel_values_videos"].shape), a["num_frames"].tolist())
    assert a["pixel_values_videos"].dtype == b["pixel_values_videos"].dtype == torch.float32
    assert torch.equal(a["pixel_values_videos"], b["pixel_values_videos"])  # bit for bit
    assert torch.equal(a["num_frames"], b["num_frames"])
    for m, n in zip(a["video_metadata"], b["video_metadata"]):
        assert {k: np.asarray(v).tolist() for k, v in m.items()} == {k: np.asarray(v).tolist() for k, v in n.items()}


def test_torch_only_processor_gives_transformers_tokens(tmp_path):
    """The whole processor with the torch-only image / video processors = transformers' AutoProcessor:
    a prompt with two videos (frame labels with timestamps from the metadata) and an audio clip, and
    one with an image."""
    require_torchvision()
    from _common import load_processor

    write_checkpoint(tmp_path / "hf")
    ours, theirs = load_processor(tmp_path / "hf", torch_only=True), load_processor(tmp_path / "hf")
    assert type(theirs.video_processor).__name__ == "NemotronH_Omni_Reasoning_V3VideoProcessor"
    assert type(ours.video_processor).__name__ == "OmniVideoProcessor"
    videos = [frames((4, 13, 21, 3), 20), frames((3, 13, 21, 3), 21)]
    metadata = [{"total_num_frames": 8, "fps": 4.0, "frames_indices": [0, 2, 4, 6]},
                {"total_num_frames": 3, "fps": 30.0, "frames_indices": [0, 1, 2]}]
    wave = np.sin(np.arange(3200) * 0.1).astype(np.float32)
    image = Image.fromarray(frames((13, 21, 3), 22), "RGB")
    for call in (dict(text="<video>a<video>b<so_embedding>", videos=videos, video_metadata=metadata, audio=[wave]),
                 dict(text="<image>c", images=[image])):
        a, b = ours(return_tensors="pt", **call), theirs(return_tensors="pt", **call)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    a = ours(text="<video>", videos=videos[:1], video_metadata=metadata[:1], return_tensors="pt")
    decoded = ours.tokenizer.decode(a["input_ids"][0])
    assert decoded.startswith("Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.50 seconds: <img>"), decoded


# ---------------------------------------------------------------------------- JSONL with videos

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    work = tmp_path_factory.mktemp("video_jsonl")
    write_checkpoint(work / "hf")
    media = work / "media"
    media.mkdir()
    np.save(media / "walk.npy", frames((3, 16, 24, 3), 30))   # unresized: 2 tubelets (last frame repeated)
    np.save(media / "run.npy", frames((4, 13, 21, 3), 31))    # resized to 16x24: 2 tubelets
    np.save(media / "jump.npy", frames((3, 26, 42, 3), 32))   # resized to 16x24: 2 tubelets
    Image.fromarray(frames((16, 24, 3), 33), "RGB").save(media / "cat.png")
    wave = write_wav(media / "step.wav", 0.5 * np.sin(np.arange(4800) * 0.05))
    records = [
        {"messages": [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "A walk."}],
         "videos": ["media/walk.npy"]},
        {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "Cat"}],
         "images": ["media/cat.png"]},
        {"messages": [{"role": "user", "content": "<video><video><so_embedding>"},
                      {"role": "assistant", "content": "Run, jump."}],
         "videos": ["media/run.npy", "media/jump.npy"], "audios": ["media/step.wav"]},
        {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]},
    ]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return SimpleNamespace(work=work, hf=work / "hf", jsonl=work / "train.jsonl", media=media, wave=wave)


@pytest.fixture(scope="module")
def samples(data):
    import finetune
    from bridge import AutoBridge

    provider = AutoBridge.from_hf_pretrained(data.hf).to_megatron_provider()
    samples = finetune.jsonl_samples(str(data.jsonl), str(data.hf), SimpleNamespace(seq_length=SEQ), provider)
    return SimpleNamespace(list=samples, padded_vocab=provider.padded_vocab_size())


def video_text(frame_counts, tokens_per_tubelet=6):
    """What the processor puts for one video of `frame_counts` frames (no frame rate: no timestamps)."""
    S, runs = SPECIAL, []
    for first in range(0, frame_counts, 2):
        label = f"Frame {first + 1}" + (f" and frame {first + 2}" if first + 1 < frame_counts else "") + ": "
        runs.append(ids(label) + [S["<img>"]] + [IMAGE_TOKEN] * tokens_per_tubelet + [S["</img>"]])
    return [t for i, run in enumerate(runs) for t in (ids("\n") if i else []) + run]


def check_tokens(sample, expected, answer_from):
    n = len(expected)
    padded = expected + [SPECIAL["<pad>"]] * (SEQ + 1 - n)
    assert sample["tokens"].tolist() == padded[:SEQ]
    assert sample["labels"].tolist() == padded[1:SEQ + 1]
    assert sample["loss_mask"].tolist() == [float(answer_from - 1 <= i < n - 1) for i in range(SEQ)]


def test_video_samples_are_what_the_processor_must_give(data, samples):
    from transformers import NemotronH_Omni_Reasoning_V3

    S = SPECIAL
    a, b, c, d = samples.list
    turn_end = [S["<|im_end|>"]] + ids("\n") + [S["<|im_start|>"]] + ids("assistant\n")

    # 1: one unresized video of 3 frames: 2 tubelets of 4x6 patches (6 tokens each), the last frame repeated
    assert a["pixel_values_videos"].shape == (1, 2, 6, 16, 24) and a["num_frames"].tolist() == [3]
    raw = np.load(data.media / "walk.npy").astype(np.float64)
    norm = torch.from_numpy((raw / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).permute(0, 3, 1, 2)
    packed = torch.cat([norm, norm[-1:]]).reshape(1, 2, 6, 16, 24)
    torch.testing.assert_close(a["pixel_values_videos"].double(), packed, rtol=0, atol=1e-5)
    prompt = [S["<|im_start|>"]] + ids("user\n") + video_text(3) + ids("What?") + turn_end
    check_tokens(a, prompt + ids("A walk.") + [S["<|im_end|>"]] + ids("\n"), len(prompt))
    assert set(a) == {"tokens", "labels", "loss_mask", "pixel_values_videos", "num_frames"}

    # 2: an image (no resize)
    assert b["image_grid_hw"].tolist() == [[4, 6]] and "pixel_values_videos" not in b

    # 3: two videos (4 and 3 frames, both resized to 16x24: 2 tubelets each), stacked, and an audio clip
    assert c["pixel_values_videos"].shape == (2, 2, 6, 16, 24) and c["num_frames"].tolist() == [4, 3]
    hf_model = NemotronH_Omni_Reasoning_V3.from_pretrained(str(data.hf), dtype=torch.float32).eval()
    (n_audio,) = audio_tokens(hf_model, c["input_features"], c["input_features_mask"])
    prompt = ([S["<|im_start|>"]] + ids("user\n") + video_text(4) + video_text(3) + [S["<so_start>"]]
              + [AUDIO_TOKEN] * n_audio + [S["<so_end>"]] + turn_end)
    check_tokens(c, prompt + ids("Run, jump.") + [S["<|im_end|>"]] + ids("\n"), len(prompt))

    # 4: text
    assert set(d) == {"tokens", "labels", "loss_mask"}


def test_generate_video_loader_gives_the_processor_inputs(data, samples):
    """`_common.load_video` (generate.py's `--video`) on a uint8 `.npy` of frames = the JSONL sample's."""
    from _common import load_video

    for name, sample, index in (("walk.npy", samples.list[0], 0), ("jump.npy", samples.list[2], 1)):
        video = load_video(data.media / name, 4, 0.5, 2, [data.hf])
        assert torch.equal(video["pixel_values_videos"][0], sample["pixel_values_videos"][index])
        assert video["num_frames"].tolist() == [int(sample["num_frames"][index])]


def test_finetune_script_on_videos_starts_at_the_reference_loss(data, samples):
    from tests.test_examples_finetune import losses, run

    # micro-batches of 2: [video, image] (the image sample goes first: the model fills the image token
    # with images, then videos) and [two videos + audio, text]
    out = run(["--hf-path", data.hf, "--data", data.jsonl, "--steps", 3, "--lr", "1e-3", "--global-batch-size", 4,
               "--micro-batch-size", 2, "--seq-length", SEQ, "--freeze-sound-encoder"])
    loss = losses(out)
    assert sorted(loss) == [1, 2, 3] and all(math.isfinite(v) for v in loss.values()), out
    assert loss[3] < loss[1]

    # step 1 = transformers' model on the same samples, one at a time (its forward takes no num_frames;
    # the Megatron model's vocab padding appended as zero logits, see test_examples_jsonl.py)
    reference = transformers_loss(data.hf, samples, ("tokens", "labels", "loss_mask", "num_frames"))
    print(f"step 1 loss {loss[1]:.4f}, transformers {reference:.4f}; step 3 {loss[3]:.4f}")
    assert abs(loss[1] - reference) < 2e-4, (loss[1], reference)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "<image><video>"}, {"role": "assistant", "content": "Cat"}],
      "images": ["media/cat.png"], "videos": ["media/walk.npy"]}, "images and videos in one record"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Walk"}],
      "videos": ["media/walk.npy"]}, "1 media file(s) but 0 <video> placeholder(s)"),
    ({"messages": [{"role": "user", "content": "<video><video>"}, {"role": "assistant", "content": "Two"}],
      "videos": ["media/walk.npy", "media/long.npy"]}, "the processor refused it: All videos of one call"),
    ({"messages": [{"role": "user", "content": "<video>"}, {"role": "assistant", "content": "?"}],
      "videos": ["media/cat.png"]}, "media/cat.png: decoding a video file needs"),
], ids=["image-and-video", "video-without-placeholder", "videos-that-do-not-stack", "undecodable"])
def test_bad_video_records_are_refused_with_their_line(data, record, message, tmp_path):
    import finetune
    from _common import video_backend

    if "decoding a video file needs" in message and video_backend() is not None:
        message = "cannot decode it"
    np.save(data.media / "long.npy", frames((5, 16, 24, 3), 34))  # 3 tubelets: does not stack with walk.npy's 2
    bad = data.work / f"bad-{tmp_path.name}.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                   + "\n" + json.dumps(record) + "\n")
    with pytest.raises(SystemExit) as e:
        finetune.jsonl_samples(str(bad), str(data.hf), SimpleNamespace(seq_length=SEQ))
    assert f"{bad}:2: " in str(e.value) and message in str(e.value), str(e.value)


def test_micro_batch_of_videos_of_different_shapes_is_refused(samples):
    import finetune

    a = samples.list[0]
    other = dict(a, pixel_values_videos=torch.zeros(1, 3, 6, 16, 24), num_frames=torch.tensor([5]))
    batch = finetune.collate([a, dict(a)])  # same shapes: stacked
    assert batch["pixel_values_videos"].shape == (2, 2, 6, 16, 24) and batch["num_frames"].tolist() == [3, 3]
    with pytest.raises(SystemExit) as e:
        finetune.collate([a, other])
    assert str(e.value).startswith("error: a micro-batch holds videos of different shapes"), str(e.value)


def test_video_samples_with_efficient_video_sampling_are_refused(tmp_path):
    from tests.test_examples_finetune import SCRIPT, env

    config = tiny_omni_config()
    config.video_pruning_rate = 0.5
    save_hf_model(build_hf_omni_model(config, seed=1), tmp_path / "hf")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--hf-path", str(tmp_path / "hf"), "--synthetic",
                           "--steps", "1"], capture_output=True, text=True, env=env(), cwd=REPO, timeout=400)
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'hf'}: video_pruning_rate is 0.5"), proc.stderr[-2000:]
