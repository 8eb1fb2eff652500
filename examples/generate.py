"""Greedy generation with the Megatron model of a NemotronH / Nemotron-Omni checkpoint.

    python examples/generate.py --hf-path HF_DIR    --prompt-ids 11,22,33 [--max-new-tokens 16]
    python examples/generate.py --mcore-path MCORE_DIR --prompt "Hello" [--image img.npy] [--audio mel.npy]
    python examples/generate.py --hf-path HF_DIR --prompt-ids 11,22 --video frames.npy   # or clip.mp4

The model is megatron-core's (built by the bridge's provider), loaded from a Hugging Face directory
(`AutoBridge.from_hf_pretrained` + `load_hf_weights`) or from a Megatron checkpoint written by
`convert-hf-to-mcore` / `save_megatron_model` (`AutoBridge.load_megatron_model`). One process,
batch 1, no KV cache: every step recomputes the whole sequence (fine for the tiny test models,
slow for the real one). Decoding is greedy (argmax over the real vocab, padding rows excluded) and
stops after `--max-new-tokens` or at an end-of-sequence id of the checkpoint's
`generation_config.json` (as transformers' `generate(do_sample=False)` does).

Prompt: `--prompt-ids 1,2,3`, or `--prompt TEXT` encoded with the checkpoint's tokenizer (no chat
template is applied). Omni checkpoints take `--image FILE`, `--video FILE` and/or `--audio FILE` (see
`examples/_common.py` for the accepted formats: `.npy`/`.pt` tensors of preprocessed pixel values /
normalised video frames `[frames, 3, H, W]` / mel features always; through the checkpoint's processor
config (`processor_config.json` or `preprocessor_config.json`): image files with Pillow, uint8 video
frames `[frames, H, W, 3]` (`.npy`) or video files decoded by transformers' `load_video` (torchcodec,
PyAV, decord or OpenCV, whichever is installed), WAV files with the standard library, other audio
files with transformers' `load_audio`). Video frames fill the image token, after the images. If the
prompt holds no placeholder tokens, the right number of image placeholders (images', then the
video's) and then audio placeholders are put in front of it; a prompt that holds them must hold
exactly as many as the features fill.

Output: the decoded text (when there is a tokenizer), then, as the last line, the generated token
ids (new tokens only), comma-separated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    find_file, forward_logits, load_audio, load_image, load_tokenizer, load_video, parse_ids, quiet,
    video_token_count,
)
from conversion.dtypes import FLAGS, dtype_from_name  # noqa: E402


def load_model(args):
    """(model, bridge, directories with the checkpoint's non-weight files)."""
    from bridge import AutoBridge
    from bridge.parallel import build_model, ensure_parallel_state

    ensure_parallel_state()  # one process: a one-rank gloo group and megatron's parallel state
    dtype = dtype_from_name(args.dtype) if args.dtype else None
    if args.hf_path:
        bridge = AutoBridge.from_hf_pretrained(args.hf_path)
        provider = bridge.to_megatron_provider(dtype)
        provider.perform_initialization = False  # every parameter comes from the checkpoint
        model = build_model(provider)[0]
        bridge.load_hf_weights(model)
        dirs = [Path(args.hf_path)]
    else:
        from conversion.errors import ConversionError

        try:
            model = AutoBridge.load_megatron_model(args.mcore_path, dtype=dtype)
        except ConversionError as e:  # a refused or broken checkpoint: one line
            raise SystemExit(f"error: {e}") from None
        bridge = AutoBridge.from_megatron_checkpoint(args.mcore_path)
        dirs = [Path(args.mcore_path) / "hf_assets"]
    return model.eval(), bridge, dirs


def eos_ids(bridge, dirs) -> set:
    path = find_file(dirs, ("generation_config.json",))
    value = json.loads(path.read_text()).get("eos_token_id") if path else None
    if value is None:
        value = bridge.config.text.get("eos_token_id")
    if value is None:
        return set()
    return set(value) if isinstance(value, list) else {value}


@contextlib.contextmanager
def generated_placeholders_as_text(model, ids: torch.Tensor, prompt_len: int, placeholders: set, vocab: int):
    """The ids to feed the model, in a context where a generated token equal to a placeholder id (the
    model may emit one) is embedded as the text token it is, as transformers' generate embeds every
    generated token (only its first forward sees the media). Every step here recomputes the whole
    sequence, and the Omni model fills every placeholder position with media features; so such a token
    is fed as another id, and a forward hook on the language model's embedding puts the token's own
    embedding back in its row."""
    rows = [i for i in range(prompt_len, ids.shape[1]) if int(ids[0, i]) in placeholders]
    if not rows:
        yield ids
        return
    from _common import language_model

    fed = ids.clone()
    fed[0, rows] = next(t for t in range(vocab) if t not in placeholders)
    embedding, busy = language_model(model).embedding, []

    def hook(module, args, kwargs, output):
        if busy:  # the call below
            return output
        busy.append(True)
        try:
            plain = module(input_ids=ids, position_ids=kwargs["position_ids"])  # [seq, batch, hidden]
        finally:
            busy.clear()
        output = output.clone()
        output[rows, 0] = plain[rows, 0]
        return output

    handle = embedding.register_forward_hook(hook, with_kwargs=True)
    try:
        yield fed
    finally:
        handle.remove()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-path", help="Hugging Face checkpoint directory")
    src.add_argument("--mcore-path", help="Megatron checkpoint directory (convert-hf-to-mcore output)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in the checkpoint directory)")
    parser.add_argument("--image", help="Omni: image (.npy/.pt [3,H,W] normalised pixels, or a file with Pillow)")
    parser.add_argument("--video", help="Omni: video (.npy/.pt float [frames,3,H,W] normalised frames, uint8 .npy "
                                        "[frames,H,W,3] frames, or a video file)")
    parser.add_argument("--audio", help="Omni: audio (.npy/.pt [frames, mel_bins] mel features, or an audio file)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(FLAGS), default=None, help="default: the checkpoint's dtype")
    args = parser.parse_args(argv)
    quiet()

    model, bridge, dirs = load_model(args)
    omni = bridge.config.kind != "nemotron_h"
    tokenizer = load_tokenizer(dirs)
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit("error: --prompt needs a tokenizer in the checkpoint directory; use --prompt-ids")
        ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = parse_ids(args.prompt_ids)
    if (args.image or args.video or args.audio) and not omni:
        raise SystemExit("error: --image / --video / --audio need a Nemotron-Omni checkpoint; this one is a text model")

    mm, prefix = {}, []
    if (args.image or args.video) and model.vision_model is None:
        raise SystemExit("error: this checkpoint has no vision encoder")
    if args.image:
        image = load_image(args.image, model.vision_model.patch_dim, model.downsample_ratio, dirs)
        count = int(image["image_grid_hw"].prod(-1).sum()) // round(1 / model.downsample_ratio) ** 2
        if model.image_token_index not in ids:
            prefix += [model.image_token_index] * count
        mm.update(image)
    if args.video:  # the video's frames fill the image token too, after the image's
        patch, temporal = model.vision_model.patch_dim, model.vision_model.temporal_patch_dim
        video = load_video(args.video, patch, model.downsample_ratio, temporal, dirs)
        if model.image_token_index not in ids:
            prefix += [model.image_token_index] * video_token_count(video["pixel_values_videos"], patch,
                                                                    model.downsample_ratio, temporal)
        mm.update(video)
    if args.audio:
        if model.sound_encoder is None:
            raise SystemExit("error: this checkpoint has no sound encoder (has_sound is false)")
        audio = load_audio(args.audio, dirs)
        with torch.no_grad():
            count = model.sound_encoder(audio["input_features"], audio["input_features_mask"]).shape[0]
        if model.sound_context_token_id not in ids:
            prefix += [model.sound_context_token_id] * count
        mm.update(audio)
    ids = torch.tensor([prefix + ids], dtype=torch.long)

    vocab = bridge.config.text["vocab_size"]
    stop = eos_ids(bridge, dirs)
    placeholders = {model.image_token_index, model.sound_context_token_id} if omni else set()
    prompt_len = ids.shape[1]
    new = []
    with torch.no_grad():
        for _ in range(args.max_new_tokens):
            with generated_placeholders_as_text(model, ids, prompt_len, placeholders, vocab) as fed:
                logits = forward_logits(model, fed, **mm)
            token = int(logits[0, -1, :vocab].float().argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token in stop:
                break
    if tokenizer is not None:
        print(tokenizer.decode(new, skip_special_tokens=True), flush=True)
    print(",".join(map(str, new)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
