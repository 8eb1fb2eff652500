"""examples/finetune.py on a JSONL of conversations with real image (PNG) and audio (WAV) files, on a
tiny Omni checkpoint that carries a tokenizer, a chat template and a processor config, all built here
offline (no download).

* The samples the reader builds are checked against what they must be, computed independently: the
  token ids by hand (the test tokenizer is byte-level: one token per byte, id = 20 + byte, plus the
  special tokens below), the placeholder runs from the image grids and from the reference model's
  sound encoder, the loss mask on the answer's tokens, the pixel values of an image that needs no
  resizing by hand, the mel features from transformers' feature extractor on the waveform the test
  wrote.
* The script trains 3 steps on them, and its step-1 loss (global batch 4 = the 4 records, micro-batches
  of 2, so media of two samples are batched and audio features padded) equals the loss of transformers'
  reference model on the same samples.
* The torch-only image processor of the examples (what runs where torchvision is missing: it does not
  import beside this project's CPU torch build) is bit-identical to transformers' torchvision-backed
  one on downscaled, upscaled, unresized, RGBA, grayscale and palette images and the released
  model's default config (`test_image_processor_matches_transformers`: skipped without torchvision,
  failed instead when BRIDGE_TEST_REQUIRE_TORCHVISION=1, as on CI's leg with torchvision).
* generate.py's `--image` / `--audio` file loaders give the same inputs as the processor.

Needs Pillow (to write and read the PNG files): a test dependency (`pip install -e ".[test]"`).
"""

import json
import math
import sys
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bridge.tiny_models import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, build_hf_omni_model, save_hf_model

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

# special tokens: ids 0..13 (the placeholders at the tiny config's ids), then byte b -> 20 + b
SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "<image>": IMAGE_TOKEN, "<video>": VIDEO_TOKEN,
           "<so_embedding>": AUDIO_TOKEN, "<img>": 8, "</img>": 9, "<so_start>": 10, "<so_end>": 11,
           "<|im_start|>": 12, "<|im_end|>": 13}
BYTE0 = 20
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGE_PROCESSOR = {"image_processor_type": "NemotronH_Omni_Reasoning_V3ImageProcessor", "patch_size": 4,
                   "downsample_ratio": 0.5, "min_num_patches": 16, "max_num_patches": 64, "max_model_len": 64,
                   "do_convert_rgb": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3}
# the fields transformers' NemotronH_Omni_Reasoning_V3VideoProcessor.to_dict writes; 24 patches: 16x24 px frames
VIDEO_PROCESSOR = {"video_processor_type": "NemotronH_Omni_Reasoning_V3VideoProcessor", "patch_size": 4,
                   "downsample_ratio": 0.5, "norm_mean": CLIP_MEAN, "norm_std": CLIP_STD, "rescale_factor": 1 / 255,
                   "return_metadata": False, "video_target_num_patches": 24, "video_maintain_aspect_ratio": True,
                   "temporal_patch_size": 2}
RATE = 16000


def require_torchvision():
    """Skip a test that compares with transformers' torchvision-backed processors where torchvision does
    not import, unless BRIDGE_TEST_REQUIRE_TORCHVISION=1 (CI's leg with torchvision): then it fails."""
    import os

    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        if os.environ.get("BRIDGE_TEST_REQUIRE_TORCHVISION") == "1":
            pytest.fail("BRIDGE_TEST_REQUIRE_TORCHVISION=1 but torchvision does not import")
        pytest.skip("needs torchvision (transformers' own image / video processors)")


def byte_level_tokenizer():
    """A `PreTrainedTokenizerFast`: byte-level BPE without merges, the special tokens above, ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))  # GPT-2's byte -> unicode map
    byte_chars = {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}
    vocab = dict(SPECIAL, **{byte_chars[b]: BYTE0 + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=list(SPECIAL)[5:],
                                   chat_template=CHAT_TEMPLATE)


def write_checkpoint(hf_dir: Path) -> None:
    save_hf_model(build_hf_omni_model(seed=1), hf_dir)
    byte_level_tokenizer().save_pretrained(str(hf_dir))
    # what transformers 5.x's NemotronH_Omni_Reasoning_V3Processor.save_pretrained writes (checked by hand
    # with torchvision): the sub-processors' configs nested in processor_config.json
    (hf_dir / "processor_config.json").write_text(json.dumps({
        "processor_class": "NemotronH_Omni_Reasoning_V3Processor", "audio_sampling_rate": RATE,
        "audio_subsampling_factor": 8, "audio_hop_length": 160, "video_temporal_patch_dim": 2,
        "image_processor": IMAGE_PROCESSOR,
        "feature_extractor": {"feature_extractor_type": "ParakeetFeatureExtractor", "feature_size": 16,
                              "sampling_rate": RATE, "hop_length": 160, "n_fft": 512, "win_length": 400,
                              "preemphasis": 0.97, "padding_side": "right", "padding_value": 0.0,
                              "return_attention_mask": True},
        "video_processor": VIDEO_PROCESSOR}, indent=1))


def write_wav(path: Path, samples: np.ndarray, channels: int = 1, width: int = 2) -> np.ndarray:
    """`samples` in [-1, 1] as PCM; returns the float waveform a reader must get back (mono)."""
    scale = 2 ** (8 * width - 1)
    ints = np.clip(np.round(samples * scale), -scale, scale - 1).astype(np.int64)
    raw = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :width] if width > 2 else ints.astype(f"<i{width}")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels), f.setsampwidth(width), f.setframerate(RATE)
        f.writeframes(np.ascontiguousarray(raw).tobytes())
    # what libsndfile returns (ints / 2^(bits-1), float32), averaged over channels
    back = (ints.astype(np.float64) / scale).astype(np.float32).reshape(-1, channels)
    return back.mean(axis=1) if channels > 1 else back[:, 0]


def ids(text: str):
    return [BYTE0 + b for b in text.encode()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    work = tmp_path_factory.mktemp("jsonl")
    write_checkpoint(work / "hf")
    g = np.random.default_rng(0)
    media = work / "media"
    media.mkdir()
    # 16x32 RGBA (half transparent): no resize (4x8 patches of 4 px -> 8 image tokens)
    rgba = g.integers(0, 256, (16, 32, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(g.random((16, 32)) < 0.5, 255, 0)
    Image.fromarray(rgba, "RGBA").save(media / "cat.png")
    Image.fromarray(g.integers(0, 256, (13, 21, 3), dtype=np.uint8), "RGB").save(media / "dog.png")  # -> 4x6
    waves = {"hello.wav": write_wav(media / "hello.wav", 0.5 * np.sin(np.arange(4800) * 0.05)),
             "noise.wav": write_wav(media / "noise.wav", g.uniform(-0.8, 0.8, 2 * 3200), channels=2),
             "tone24.wav": write_wav(media / "tone24.wav", 0.3 * np.cos(np.arange(2400) * 0.2), width=3)}
    records = [
        {"messages": [{"role": "user", "content": "<image><so_embedding>Hi?"},
                      {"role": "assistant", "content": "A cat."}],
         "images": ["media/cat.png"], "audios": ["media/hello.wav"]},
        {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "Dog"}],
         "images": ["media/dog.png"]},
        {"messages": [{"role": "user", "content": "<so_embedding><so_embedding>?"},
                      {"role": "assistant", "content": "Rain"}], "audios": ["media/noise.wav", "media/tone24.wav"]},
        {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "3+3"}, {"role": "assistant", "content": "6"}]},
    ]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return SimpleNamespace(work=work, hf=work / "hf", jsonl=work / "train.jsonl", media=media, waves=waves)


@pytest.fixture(scope="module")
def samples(data):
    import finetune
    from bridge import AutoBridge

    provider = AutoBridge.from_hf_pretrained(data.hf).to_megatron_provider()
    samples = finetune.jsonl_samples(str(data.jsonl), str(data.hf), SimpleNamespace(seq_length=64), provider)
    return SimpleNamespace(list=samples, padded_vocab=provider.padded_vocab_size())


def audio_tokens(hf_model, features, mask):
    """How many embeddings the reference model's sound encoder gives for each clip."""
    with torch.no_grad():
        out = hf_model.get_audio_features(features, mask).pooler_output
    lengths = hf_model.audio_tower._get_subsampling_output_length(mask.sum(-1) + 1)
    assert out.shape[0] == int(lengths.sum())
    return lengths.tolist()


def check_tokens(sample, expected, answer_from):
    """tokens / labels / loss_mask of a 64-token sample against the expected ids (the answer starts at
    index `answer_from`)."""
    n = len(expected)
    padded = expected + [SPECIAL["<pad>"]] * (65 - n)
    assert sample["tokens"].tolist() == padded[:64]
    assert sample["labels"].tolist() == padded[1:65]
    assert sample["loss_mask"].tolist() == [float(answer_from - 1 <= i < n - 1) for i in range(64)]


def test_samples_are_what_the_processor_must_give(data, samples):
    from transformers import NemotronH_Omni_Reasoning_V3
    from transformers.models.parakeet import ParakeetFeatureExtractor

    hf_model = NemotronH_Omni_Reasoning_V3.from_pretrained(str(data.hf), dtype=torch.float32).eval()
    fe = ParakeetFeatureExtractor(feature_size=16)
    S = SPECIAL
    a, b, c, d = samples.list

    # 1: RGBA image (no resize) + 16-bit mono clip
    assert a["image_grid_hw"].tolist() == [[4, 8]]
    rgba = np.array(Image.open(data.media / "cat.png")).astype(np.float64)
    rgb = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)  # on white
    norm = (rgb / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)  # [16, 32, 3]
    patches = torch.from_numpy(norm).permute(2, 0, 1).reshape(3, 4, 4, 8, 4).permute(1, 3, 0, 2, 4).reshape(32, 48)
    torch.testing.assert_close(a["pixel_values"].double(), patches, rtol=0, atol=1e-5)
    ref = fe([data.waves["hello.wav"]], sampling_rate=RATE, return_tensors="pt")
    assert torch.equal(a["input_features"], ref["input_features"])
    assert torch.equal(a["input_features_mask"], ref["attention_mask"])
    (n_audio,) = audio_tokens(hf_model, a["input_features"], a["input_features_mask"])
    assert n_audio == 4
    prompt = ([S["<|im_start|>"]] + ids("user\n") + [S["<img>"]] + [IMAGE_TOKEN] * 8 + [S["</img>"]]
              + [S["<so_start>"]] + [AUDIO_TOKEN] * n_audio + [S["<so_end>"]] + ids("Hi?") + [S["<|im_end|>"]]
              + ids("\n") + [S["<|im_start|>"]] + ids("assistant\n"))
    check_tokens(a, prompt + ids("A cat.") + [S["<|im_end|>"]] + ids("\n"), len(prompt))

    # 2: RGB image resized to a 4x6 grid (its pixels: test_image_processor_matches_transformers)
    assert b["image_grid_hw"].tolist() == [[4, 6]] and b["pixel_values"].shape == (24, 48)
    assert "input_features" not in b
    prompt = ([S["<|im_start|>"]] + ids("user\n") + [S["<img>"]] + [IMAGE_TOKEN] * 6 + [S["</img>"]]
              + [S["<|im_end|>"]] + ids("\n") + [S["<|im_start|>"]] + ids("assistant\n"))
    check_tokens(b, prompt + ids("Dog") + [S["<|im_end|>"]] + ids("\n"), len(prompt))

    # 3: two clips (16-bit stereo, 24-bit mono), padded together by the feature extractor
    ref = fe([data.waves["noise.wav"], data.waves["tone24.wav"]], sampling_rate=RATE, return_tensors="pt")
    assert torch.equal(c["input_features"], ref["input_features"])
    assert torch.equal(c["input_features_mask"], ref["attention_mask"])
    counts = audio_tokens(hf_model, c["input_features"], c["input_features_mask"])
    assert counts == [3, 2]
    prompt = ([S["<|im_start|>"]] + ids("user\n") + [S["<so_start>"]] + [AUDIO_TOKEN] * counts[0] + [S["<so_end>"]]
              + [S["<so_start>"]] + [AUDIO_TOKEN] * counts[1] + [S["<so_end>"]] + ids("?") + [S["<|im_end|>"]]
              + ids("\n") + [S["<|im_start|>"]] + ids("assistant\n"))
    check_tokens(c, prompt + ids("Rain") + [S["<|im_end|>"]] + ids("\n"), len(prompt))

    # 4: text only, two turns: the loss is on the last answer only
    turn = lambda role, text: [S["<|im_start|>"]] + ids(f"{role}\n{text}") + [S["<|im_end|>"]] + ids("\n")  # noqa: E731
    prompt = (turn("user", "2+2") + turn("assistant", "4") + turn("user", "3+3") + [S["<|im_start|>"]]
              + ids("assistant\n"))
    check_tokens(d, prompt + ids("6") + [S["<|im_end|>"]] + ids("\n"), len(prompt))
    assert set(d) == {"tokens", "labels", "loss_mask"}


def test_finetune_script_trains_on_the_jsonl_and_starts_at_the_reference_loss(data, samples):
    from tests.test_examples_finetune import losses, run

    # the sound encoder frozen: it then stays in eval mode, so that its batch norm uses the running
    # statistics as the reference model in eval mode does (in training mode it normalises by the batch's)
    out = run(["--hf-path", data.hf, "--data", data.jsonl, "--steps", 3, "--lr", "1e-3", "--global-batch-size", 4,
               "--micro-batch-size", 2, "--seq-length", 64, "--freeze-sound-encoder"])
    loss = losses(out)
    assert sorted(loss) == [1, 2, 3] and all(math.isfinite(v) for v in loss.values()), out
    assert loss[3] < loss[1]

    # step 1 (the checkpoint's weights) = transformers' model on the same 4 samples, one at a time. The
    # Megatron model's vocab is padded (300 -> 384 rows, zero weights, as Megatron-LM pads it) and its
    # loss is over the padded vocab: the reference appends those zero logits (the real checkpoint's
    # vocab, 131072, is a multiple of 128 and is not padded).
    reference = transformers_loss(data.hf, samples)
    print(f"step 1 loss {loss[1]:.4f}, transformers {reference:.4f}; step 3 {loss[3]:.4f}")
    assert abs(loss[1] - reference) < 2e-4, (loss[1], reference)


def transformers_loss(hf_dir, samples, not_model_inputs=("tokens", "labels", "loss_mask")) -> float:
    """The loss-mask-weighted mean cross entropy of transformers' model (fp32, eval) on `samples`, one
    at a time, over the Megatron model's padded vocab (the padding appended as zero logits)."""
    from transformers import NemotronH_Omni_Reasoning_V3

    hf_model = NemotronH_Omni_Reasoning_V3.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for s in samples.list:
            media = {k: v for k, v in s.items() if k not in not_model_inputs}
            logits = hf_model(input_ids=s["tokens"][None], use_cache=False, **media).logits[0].float()
            logits = torch.nn.functional.pad(logits, (0, samples.padded_vocab - logits.shape[-1]))
            per_token = torch.nn.functional.cross_entropy(logits, s["labels"], reduction="none")
            total += float((per_token * s["loss_mask"]).sum())
            count += float(s["loss_mask"].sum())
    return total / count


@pytest.mark.parametrize("config", ["test", "released-defaults"])
def test_image_processor_matches_transformers(data, config):
    """`_common.OmniImageProcessor` = transformers' `NemotronH_Omni_Reasoning_V3ImageProcessor`, bit for bit,
    one image at a time and all in one call (one patch budget for the call)."""
    require_torchvision()
    from transformers import NemotronH_Omni_Reasoning_V3ImageProcessor

    from _common import OmniImageProcessor

    fields = {k: v for k, v in IMAGE_PROCESSOR.items() if k != "image_processor_type"}
    if config == "released-defaults":
        fields = {}  # patch 16, 1024..13312 patches, CLIP statistics
    ours, theirs = OmniImageProcessor(**fields), NemotronH_Omni_Reasoning_V3ImageProcessor(**fields)
    g = np.random.default_rng(5)
    images = [Image.open(data.media / "cat.png"), Image.open(data.media / "dog.png"),  # RGBA unresized, RGB
              Image.fromarray(g.integers(0, 256, (90, 50, 3), dtype=np.uint8), "RGB"),  # downscaled
              Image.fromarray(g.integers(0, 256, (7, 9), dtype=np.uint8), "L"),  # grayscale, upscaled
              Image.fromarray(g.integers(0, 256, (30, 40), dtype=np.uint8), "L").convert("P")]  # palette
    for batch in [[im] for im in images] + [images]:
        a, b = ours(images=batch, return_tensors="pt"), theirs(images=batch, return_tensors="pt")
        assert torch.equal(a["image_grid_hw"], b["image_grid_hw"])
        assert a["pixel_values"].dtype == b["pixel_values"].dtype and torch.equal(a["pixel_values"], b["pixel_values"])


def test_generate_file_loaders_give_the_processor_inputs(data, samples):
    """`_common.load_image` / `load_audio` (generate.py's `--image` / `--audio` files) give the
    processor's inputs of the same files."""
    from _common import load_audio, load_image

    a, c = samples.list[0], samples.list[2]
    image = load_image(data.media / "cat.png", 4, 0.5, [data.hf])
    assert torch.equal(image["pixel_values"], a["pixel_values"])
    assert torch.equal(image["image_grid_hw"], a["image_grid_hw"])
    audio = load_audio(data.media / "hello.wav", [data.hf])
    assert torch.equal(audio["input_features"], a["input_features"])
    assert torch.equal(audio["input_features_mask"], a["input_features_mask"])
    audio = load_audio(data.media / "tone24.wav", [data.hf])  # the second clip of record 3, unpadded
    frames = int(audio["input_features_mask"].sum())
    assert frames == int(c["input_features_mask"][1].sum())
    torch.testing.assert_close(audio["input_features"][0, :frames], c["input_features"][1, :frames], rtol=0, atol=1e-5)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Cat"}],
      "images": ["media/cat.png"]}, "1 media file(s) but 0 <image> placeholder(s)"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<so_embedding>"}],
      "audios": ["media/hello.wav"]}, "in a prompt message"),
    ({"messages": [{"role": "user", "content": "<image>" + "x" * 60}, {"role": "assistant", "content": "Cat"}],
      "images": ["media/cat.png"]}, "do not fit in --seq-length 64"),
    ({"messages": [{"role": "assistant", "content": "Cat"}, {"role": "user", "content": "Hi"}]},
     "the last message must be the assistant's answer"),
], ids=["image-without-placeholder", "placeholder-in-answer", "too-long", "no-answer"])
def test_bad_records_are_refused_with_their_line(data, record, message, tmp_path, capsys):
    import finetune

    bad = data.work / f"bad-{tmp_path.name}.jsonl"  # beside media/
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                   + "\n" + json.dumps(record) + "\n")
    with pytest.raises(SystemExit) as e:
        finetune.jsonl_samples(str(bad), str(data.hf), SimpleNamespace(seq_length=64))
    assert f"{bad}:2: " in str(e.value) and message in str(e.value), str(e.value)
