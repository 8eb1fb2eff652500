"""Supervised fine-tuning of Nemotron-Omni (or a NemotronH text model) from a Hugging Face checkpoint
with megatron-core's own training machinery.

    python examples/finetune.py --hf-path HF_DIR --synthetic --steps 30 --output ckpt [--export-hf hf_out]
    torchrun --nproc-per-node 2 examples/finetune.py --hf-path HF_DIR --synthetic --tp 2 ...

What runs is megatron-core's, end to end: the model is the bridge's megatron-core model filled with
`AutoBridge.load_hf_weights`, wrapped in megatron-core's `DistributedDataParallel`; the optimizer is
`get_megatron_optimizer` (Transformer Engine's / apex's fused Adam when installed, else
`torch.optim.AdamW`, which is what megatron-core 0.16.1 itself falls back to); every step is one
call of `get_forward_backward_func()` (no pipelining, 1F1B under `--pp`) with
`finalize_model_grads` (data-parallel / sequence-parallel gradient reduction); checkpoints are
megatron-core `dist_checkpointing` (model + optimizer) in Megatron-LM's directory convention:

    OUTPUT/latest_checkpointed_iteration.txt   the last iteration saved (Megatron-LM's tracker)
    OUTPUT/iter_0000030/                       dist_checkpointing files: "model", "optimizer", "iteration"
    OUTPUT/bridge_meta.json, OUTPUT/hf_assets/ the bridge's files (so `AutoBridge.load_megatron_model`,
                                               `convert-mcore-to-hf` and `generate.py --mcore-path` read it)

`--resume` continues from OUTPUT's latest iteration (model and optimizer state) up to `--steps`.
`--export-hf DIR` writes the trained model as an HF checkpoint (`AutoBridge.save_hf_pretrained`).

Data:
* `--synthetic`: a small random multimodal dataset (text, image, video, image+audio, audio and
  video+audio samples in turn, with the placeholder counts their features fill; `--synthetic-samples`
  of them, repeated), so the example runs with no files. Random text avoids every placeholder and
  special id of the checkpoint (`special_token_ids`). The loss is taken on the second half of each
  sequence (the "answer").
* `--data FILE.jsonl`: one conversation per line,

      {"messages": [{"role": "user", "content": "<image><so_embedding>What is this?"},
                    {"role": "assistant", "content": "A cat, purring."}],
       "images": ["media/cat.png"], "audios": ["media/purr.wav"], "videos": []}

  with one `<image>` / `<video>` / `<so_embedding>` placeholder per file, in the prompt, in order (file
  paths relative to the JSONL file; a record has images or videos, not both). Each is turned into
  inputs as transformers' processor does for a chat: the tokenizer's chat template renders the text,
  and the checkpoint's `NemotronH_Omni_Reasoning_V3Processor` (`_common.load_processor`; its image and
  video processors need torchvision, which `_common.OmniImageProcessor` / `OmniVideoProcessor`
  replace where it is missing) expands each placeholder to its run of image / audio tokens (a video:
  one `<img>...</img>` run per tubelet, labelled with its frames), tokenises, and computes
  `pixel_values` / `image_grid_hw` (Pillow opens the images), `pixel_values_videos` (videos: uint8
  `.npy` `[frames, H, W, 3]` arrays, or files decoded by transformers' `load_video`; `num_frames`
  alongside) and the Parakeet mel features (WAV files are read with the standard library at the
  processor's sampling rate, other files with transformers' `load_audio`). The loss covers the last
  assistant message (the tokens after the prompt rendered with the generation prompt). Needs the
  tokenizer in HF_DIR (its chat template when it has one) and, for media, the processor config
  (`processor_config.json`). Checked by `tests/test_examples_jsonl.py` (images, audio) and
  `tests/test_examples_video.py` (videos): tokens, placeholder counts, pixels, features and loss
  mask as expected, and a step-1 loss equal to transformers' model on the same samples.

Freezing: `--freeze-language-model`, `--freeze-vision-model`, `--freeze-vision-projection`,
`--freeze-sound-encoder`, `--freeze-sound-projection` set the provider's fields of the same names
(their parameters get `requires_grad=False`, so DDP and the optimizer never see them).

One line per step is printed (by global rank 0): `step N loss X`, X = mean per-token loss of the
global batch. On a machine without CUDA, the training modules' CUDA-only allocations are redirected
to the CPU (`providers.cpu_compat.apply_cpu_training_patches`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print0, quiet  # noqa: E402
from conversion.dtypes import FLAGS, dtype_from_name  # noqa: E402
from providers.cpu_compat import apply_cpu_training_patches  # noqa: E402

TRACKER = "latest_checkpointed_iteration.txt"
FREEZABLE = ("language_model", "vision_model", "vision_projection", "sound_encoder", "sound_projection")


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with pretrain.py: schedule, batch, layout, checkpointing."""
    p.add_argument("--output", help="Megatron checkpoint directory (saved at the end and every --save-interval)")
    p.add_argument("--save-interval", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --output's latest iteration")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=None, help="cosine decay to this (default: constant lr)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp, as megatron)")
    p.add_argument("--dtype", choices=sorted(FLAGS), default=None, help="default: the checkpoint's dtype")
    p.add_argument("--seed", type=int, default=1234)


def check_training_args(p, args) -> None:
    if not args.output and (args.resume or args.save_interval):
        p.error("--resume / --save-interval need --output")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-path", required=True, help="Hugging Face checkpoint to fine-tune")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--synthetic", action="store_true", help="random multimodal samples (no files)")
    data.add_argument("--data", help="JSONL of conversations (needs the checkpoint's processor)")
    p.add_argument("--synthetic-samples", type=int, default=4, help="distinct synthetic samples (repeated)")
    for name in ("language-model", "vision-model", "vision-projection", "sound-encoder", "sound-projection"):
        p.add_argument(f"--freeze-{name}", action="store_true")
    p.add_argument("--export-hf", help="write the trained model as an HF checkpoint here")
    add_training_args(p)
    args = p.parse_args(argv)
    check_training_args(p, args)
    return args


# ---------------------------------------------------------------------------- parallel setup

def init_parallel(args) -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    from bridge.parallel import ensure_parallel_state
    from bridge.ranks import ensure_process_group

    _, world = ensure_process_group()
    if args.cp > 1 and not torch.cuda.is_available():
        raise SystemExit("error: --cp > 1 needs Transformer Engine's attention (GPU): megatron-core 0.16.1's local "
                         "DotProductAttention, the one the CPU build uses, asserts context_parallel_size == 1")
    if world % (args.tp * args.pp * args.cp):
        raise SystemExit(f"error: world size {world} is not divisible by TP={args.tp} x PP={args.pp} x CP={args.cp}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                     context_parallel_size=args.cp, expert_model_parallel_size=args.ep,
                                     expert_tensor_parallel_size=args.etp)
    ensure_parallel_state(seed=args.seed)  # RNG tracker (CPU patches without CUDA)
    apply_cpu_training_patches()
    dp = ps.get_data_parallel_world_size()
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise SystemExit(f"error: --global-batch-size {args.global_batch_size} is not divisible by "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
    return dict(dp=dp, dp_rank=ps.get_data_parallel_rank(),
                num_microbatches=args.global_batch_size // (args.micro_batch_size * dp))


def configure_provider(provider, args) -> None:
    provider.tensor_model_parallel_size = args.tp
    provider.pipeline_model_parallel_size = args.pp
    provider.expert_model_parallel_size = args.ep
    provider.context_parallel_size = args.cp
    provider.expert_tensor_parallel_size = args.etp
    provider.seq_length = args.seq_length
    if args.pp > 1:
        provider.pipeline_dtype = provider.params_dtype
    if args.tp > 1 and args.seq_length % args.tp:
        raise SystemExit(f"error: --seq-length {args.seq_length} must be divisible by TP={args.tp} (sequence parallel)")


def wrap_and_optimizer(chunks, args):
    """megatron-core DDP around each chunk, `get_megatron_optimizer`, and the model-config hooks
    the schedules call (as Megatron-LM's `setup_model_and_optimizer` / `train` set them)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    ddp = [DistributedDataParallel(config, ddp_config, c) for c in chunks]
    opt_config = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr or args.lr,
                                 weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                                 bf16=config.params_dtype == torch.bfloat16, fp16=config.params_dtype == torch.float16,
                                 params_dtype=config.params_dtype, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    optimizer = get_megatron_optimizer(opt_config, ddp)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp[0].no_sync if len(ddp) == 1 else [m.no_sync for m in ddp]
    return ddp, optimizer


def lr_at(args, step: int) -> float:
    if args.min_lr is None:
        return args.lr
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))


# ---------------------------------------------------------------------------- data

def audio_token_count(frames: int, sound_config: dict) -> int:
    """Sound-encoder output length of `frames` mel frames (Parakeet's conv subsampling)."""
    from transformers import ParakeetEncoderConfig

    cfg = ParakeetEncoderConfig(**{k: v for k, v in sound_config.items() if k != "model_type"})
    k, s = cfg.subsampling_conv_kernel_size, cfg.subsampling_conv_stride
    for _ in range(int(math.log2(cfg.subsampling_factor))):
        frames = (frames + 2 * ((k - 1) // 2) - k) // s + 1
    return frames


def special_token_ids(config: dict, hf_path=None, provider=None) -> set:
    """Every id random text must avoid: the placeholder and special ids of the checkpoint's config
    (any `*token_id(s)` / `*token_index` field at any depth: image / video / audio placeholders, bos, eos,
    pad, in transformers' or the release's field names), the provider's placeholder ids, and, when
    the checkpoint has a tokenizer, its special and added tokens (`<img>`, `</img>`, `<so_start>`, ...)."""
    ids = set()

    def collect(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith(("token_id", "token_ids", "token_index")):
                    values = value if isinstance(value, (list, tuple)) else [value]
                    ids.update(v for v in values if isinstance(v, int))
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(config)
    for field in ("image_token_index", "sound_context_token_id", "img_start_token_id", "img_end_token_id"):
        if getattr(provider, field, None) is not None:
            ids.add(getattr(provider, field))
    if hf_path is not None:
        from _common import load_tokenizer

        tok = load_tokenizer([hf_path])
        if tok is not None:
            ids.update(tok.all_special_ids)
            ids.update(tok.added_tokens_decoder)
    return ids


def synthetic_samples(provider, vocab: int, args, special=frozenset()) -> List[dict]:
    """Random samples of seq_length tokens: text, image, video, image+audio, audio, video+audio (in
    turn). Random text is drawn from [10, vocab) less the `special` ids (`special_token_ids`), so that
    it holds no placeholder; placeholder runs sit at the start; the loss covers the second half."""
    omni = hasattr(provider, "vision_patch_dim")
    g = torch.Generator().manual_seed(args.seed)
    kinds = ["text"]
    if omni:
        kinds += ["image", "video"] + (["image+audio", "audio", "video+audio"] if provider.has_sound else [])
    allowed = torch.tensor([t for t in range(10, vocab) if t not in special])
    samples = []
    for i in range(args.synthetic_samples):
        kind = kinds[i % len(kinds)]
        tokens = allowed[torch.randint(0, len(allowed), (args.seq_length + 1,), generator=g)]
        sample, prefix = {}, []
        merge = round(1 / provider.downsample_ratio) if omni else 1
        if "image" in kind:
            p, grid = provider.vision_patch_dim, (4, 4)  # 4x4 patches -> 4 tokens after the 2x2 pixel shuffle
            sample["pixel_values"] = torch.randn(grid[0] * grid[1], 3 * p * p, generator=g)
            sample["image_grid_hw"] = torch.tensor([grid])
            prefix += [provider.image_token_index] * (grid[0] * grid[1] // merge**2)
        if "video" in kind:  # transformers' video format: 2 tubelets of T frames, 4x4 patches -> 2 x 4 tokens
            p, t, tubelets = provider.vision_patch_dim, getattr(provider, "temporal_patch_dim", 1), 2
            sample["pixel_values_videos"] = torch.randn(1, tubelets, t * 3, 4 * p, 4 * p, generator=g)
            sample["num_frames"] = torch.tensor([tubelets * t])
            prefix += [provider.image_token_index] * (tubelets * 16 // merge**2)
        if "audio" in kind:
            mel = provider.sound_config.get("num_mel_bins", 80)
            frames = 40
            sample["input_features"] = torch.randn(1, frames, mel, generator=g)
            sample["input_features_mask"] = torch.ones(1, frames, dtype=torch.long)
            prefix += [provider.sound_context_token_id] * audio_token_count(frames, provider.sound_config)
        if len(prefix) >= args.seq_length // 2:
            raise SystemExit(f"error: --seq-length {args.seq_length} is too short for {len(prefix)} media tokens")
        tokens[1:1 + len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        loss_mask = torch.zeros(args.seq_length)
        loss_mask[args.seq_length // 2:] = 1
        samples.append(dict(tokens=tokens[:-1], labels=tokens[1:], loss_mask=loss_mask, **sample))
    return samples


def open_image(path: Path):
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit(f"error: {path}: reading image files needs Pillow (pip install pillow)") from None
    with Image.open(path) as image:
        image.load()
        return image


def jsonl_samples(path: str, hf_path: str, args, provider=None) -> List[dict]:
    """Conversations -> samples, the way transformers' processor makes them for a chat (see the module
    docstring). `provider` (when given) is checked against the tokenizer's placeholder ids."""
    from _common import PROCESSOR_CONFIGS, check_video_processor, find_file, load_processor, load_tokenizer
    from _common import read_audio, read_video

    path = Path(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    processor = load_processor(hf_path)  # None: a checkpoint with a tokenizer only (text conversations)
    tok = processor.tokenizer if processor is not None else load_tokenizer([hf_path])
    if tok is None:
        raise SystemExit(f"error: --data needs the tokenizer files (tokenizer.json, ...) in {hf_path}")
    if processor is None and any(r.get("images") or r.get("audios") or r.get("videos") for r in records):
        raise SystemExit(f"error: {path} has images / videos / audio clips but {hf_path} has no processor_config.json "
                         "(image and video processors, feature extractor)")
    if any(r.get("videos") for r in records):  # norm_mean / norm_std present, tubelets as long as the model's
        check_video_processor(processor.video_processor, find_file([hf_path], PROCESSOR_CONFIGS),
                                         getattr(provider, "temporal_patch_dim", None))
    if processor is not None and provider is not None:
        for what, got, want in (("image", processor.image_token_id, getattr(provider, "image_token_index", None)),
                                ("audio", processor.audio_token_id, getattr(provider, "sound_context_token_id", None))):
            if want is not None and got != want:
                raise SystemExit(f"error: the tokenizer's {what} placeholder has id {got}, the model's is {want}")

    def render(messages, generation_prompt):
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if generation_prompt else "")

    def encode(text, images, clips, videos, where):
        # special tokens as the processor's apply_chat_template(tokenize=True) decides: none when the
        # rendered text already starts with the BOS token
        special = not (tok.bos_token and text.startswith(tok.bos_token))
        if processor is None:
            return tok(text, add_special_tokens=special, return_tensors="pt")
        video_kwargs = {}
        if videos:  # frames already sampled by read_video, with their metadata (frame labels)
            video_kwargs = dict(videos=[f for f, _ in videos], video_metadata=[m for _, m in videos],
                                do_sample_frames=False)
        try:
            return processor(text=text, images=images or None, audio=clips or None, add_special_tokens=special,
                             return_tensors="pt", **video_kwargs)
        except ValueError as e:  # e.g. the videos of one record do not stack (frame size / tubelet count)
            raise SystemExit(f"error: {where}: the processor refused it: {e}") from None

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    samples = []
    for line, record in enumerate(records, 1):
        where = f"{path}:{line}"
        messages = record["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise SystemExit(f"error: {where}: the last message must be the assistant's answer (the loss is on it)")
        if record.get("images") and record.get("videos"):
            raise SystemExit(f"error: {where}: images and videos in one record: both fill the image token, and "
                             "transformers' model takes one or the other per forward; put them in separate records")
        # media paths are relative to the JSONL file
        images = [open_image(path.parent / name) for name in record.get("images") or []]
        videos = [read_video(path.parent / name, processor.video_processor, name=f"{where}: {path.parent / name}")
                  for name in record.get("videos") or []]
        clips = [read_audio(path.parent / name, processor.audio_sampling_rate) for name in record.get("audios") or []]
        prompt, full = render(messages[:-1], True), render(messages, False)
        if not full.startswith(prompt):
            raise SystemExit(f"error: {where}: the chat template does not render the prompt as a prefix of the "
                             "whole conversation; cannot tell the answer's tokens")
        if processor is not None:
            for token, items in ((processor.image_token, images), (processor.video_token, videos),
                                 (processor.audio_token, clips)):
                if full.count(token) != len(items) or token in full[len(prompt):]:
                    raise SystemExit(f"error: {where}: {len(items)} media file(s) but {full.count(token)} {token} "
                                     "placeholder(s) in the text (each file needs one, in a prompt message)")
        inputs = encode(full, images, clips, videos, where)
        ids = inputs["input_ids"][0]
        prompt_ids = encode(prompt, images, clips, videos, where)["input_ids"][0]
        if not torch.equal(ids[:len(prompt_ids)], prompt_ids):
            raise SystemExit(f"error: {where}: the prompt's tokens are not a prefix of the conversation's")
        n = min(ids.shape[0], args.seq_length + 1)
        if n <= len(prompt_ids) or (n < ids.shape[0] and (images or clips or videos)):
            raise SystemExit(f"error: {where}: {ids.shape[0]} tokens do not fit in --seq-length {args.seq_length} "
                             "(the answer would be cut off, or media placeholders cut)")
        tokens = torch.full((args.seq_length + 1,), pad, dtype=torch.long)
        tokens[:n] = ids[:n]
        loss_mask = torch.zeros(args.seq_length)
        loss_mask[len(prompt_ids) - 1:n - 1] = 1  # the labels of the answer's tokens (and what follows it)
        sample = dict(tokens=tokens[:-1], labels=tokens[1:], loss_mask=loss_mask)
        for key in ("pixel_values", "image_grid_hw", "pixel_values_videos", "input_features", "input_features_mask"):
            if key in inputs:
                sample[key] = inputs[key]
        if videos:  # the processor keeps only pixel_values_videos; the real frame counts are the sampled frames'
            sample["num_frames"] = torch.tensor([len(f) for f, _ in videos])
        samples.append(sample)
    return samples


def collate(samples: List[dict]) -> dict:
    """One micro-batch. The model fills the image token with all images' features, then all videos',
    in batch order: samples with videos go after the others (no sample has both; the loss is a sum over
    tokens, so the order of the rows does not matter). Videos are stacked into one
    `[videos, tubelets, T*3, H, W]` tensor, as transformers' processor stacks the videos of one call:
    they must share their tubelet count and frame size."""
    samples = sorted(samples, key=lambda s: "pixel_values_videos" in s)  # stable
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask")}
    images = [s for s in samples if "pixel_values" in s]
    if images:
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in images])
        batch["image_grid_hw"] = torch.cat([s["image_grid_hw"] for s in images])
    videos = [s for s in samples if "pixel_values_videos" in s]
    if videos:
        shapes = sorted({tuple(s["pixel_values_videos"].shape[1:]) for s in videos})
        if len(shapes) > 1:
            raise SystemExit(f"error: a micro-batch holds videos of different shapes {shapes} ([tubelets, T*3, H, W]); "
                             "the model takes one stacked video tensor per micro-batch: use --micro-batch-size 1, "
                             "or videos of one frame count and aspect ratio")
        batch["pixel_values_videos"] = torch.cat([s["pixel_values_videos"] for s in videos])
        batch["num_frames"] = torch.cat([s["num_frames"] for s in videos])
    clips = [s for s in samples if "input_features" in s]
    if clips:
        frames = max(s["input_features"].shape[1] for s in clips)
        feats, masks = [], []
        for s in clips:
            pad = frames - s["input_features"].shape[1]
            feats.append(torch.nn.functional.pad(s["input_features"], (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(s["input_features_mask"], (0, pad)))
        batch["input_features"], batch["input_features_mask"] = torch.cat(feats), torch.cat(masks)
    return batch


def step_batches(samples: List[dict], step: int, args, layout) -> List[dict]:
    """The micro-batches of this data-parallel rank for one global batch (samples repeat cyclically)."""
    per_rank = args.micro_batch_size * layout["num_microbatches"]
    start = step * args.global_batch_size + layout["dp_rank"] * per_rank
    picked = [samples[(start + i) % len(samples)] for i in range(per_rank)]
    return [collate(picked[i:i + args.micro_batch_size]) for i in range(0, per_rank, args.micro_batch_size)]


# ---------------------------------------------------------------------------- training step

def forward_step(data_iterator, model):
    """Megatron-LM's forward step: per-token losses from the model, masked mean in the loss func."""
    from megatron.core import parallel_state as ps

    batch = next(data_iterator)
    extra = {k: v for k, v in batch.items() if k not in ("tokens", "labels", "loss_mask")}
    if ps.get_context_parallel_world_size() > 1:  # text only (see main): this rank's sequence chunks
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(dict(batch))
    output = model(batch["tokens"], None, None, labels=batch["labels"], **extra)
    loss_mask = batch["loss_mask"]

    def loss_func(output_tensor):
        losses = output_tensor.float().reshape(-1)
        mask = loss_mask.reshape(-1).float()
        loss = torch.sum(losses * mask)
        num_tokens = mask.sum().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), mask.sum()])}

    return output, loss_func


def train_step(model, optimizer, batches, args, lr: float) -> float:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    for group in optimizer.param_groups:
        group["lr"] = lr
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model, num_microbatches=len(batches),
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise RuntimeError("optimizer step skipped (non-finite gradients)")
    total = torch.zeros(2)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for r in reduced:
            total += r["lm loss"].float()
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


# ---------------------------------------------------------------------------- checkpoints

def _state(chunks, optimizer, iteration, loading=False, layout=None):
    """The converter's checkpoint state (`bridge.checkpoint.sharded_state`, with Megatron-LM's `args`)
    at `iteration`, plus the optimizer's."""
    from bridge import checkpoint

    state = checkpoint.sharded_state(chunks, args=None if loading else checkpoint.megatron_args(chunks, layout))
    state["iteration"] = iteration
    if optimizer is not None:
        model_state = {k: v for key, part in state.items() if key.startswith("model") for k, v in part.items()}
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=loading)
    return state


def save_checkpoint(bridge, chunks, optimizer, iteration: int, output: Path, layout: dict) -> None:
    """Megatron-LM layout: OUTPUT/iter_NNNNNNN (dist_checkpointing) + tracker; bridge_meta.json."""
    from megatron.core import dist_checkpointing

    from bridge import checkpoint
    from bridge.ranks import world
    from providers.megatron_imports import add_common_state_file

    rank = world()[0]
    sub = output / f"iter_{iteration:07d}"
    if rank == 0:
        sub.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_state(chunks, optimizer, iteration, layout=layout), str(sub))
    dist.barrier()
    if rank == 0:  # as the converter's: common.pt for megatron-core 0.16.1, run_config.yaml for Megatron-Bridge
        add_common_state_file(sub)
        (sub / checkpoint.RUN_CONFIG_NAME).write_text(checkpoint.run_config_yaml(layout))
    if rank == 0 and bridge is not None:
        checkpoint.write_bridge_files(output, bridge.megatron_meta(chunks, layout), bridge.assets_dir)
    if rank == 0:
        (output / (TRACKER + ".tmp")).write_text(str(iteration))
        (output / (TRACKER + ".tmp")).replace(output / TRACKER)  # the tracker moves last
    dist.barrier()


def load_checkpoint(chunks, optimizer, output: Path) -> int:
    from megatron.core import dist_checkpointing

    from bridge.weights import model_chunks

    from conversion.errors import ConversionError
    from conversion.safe_pickle import check_dist_checkpoint

    iteration = int((output / TRACKER).read_text().strip())
    try:  # every pickle of the checkpoint read safely before megatron / torch read it
        check_dist_checkpoint(output / f"iter_{iteration:07d}")
    except ConversionError as e:
        raise SystemExit(f"error: {e}") from None
    loaded = dist_checkpointing.load(_state(chunks, optimizer, iteration, loading=True),
                                     str(output / f"iter_{iteration:07d}"))
    inner = model_chunks(chunks)
    for i, c in enumerate(inner):
        c.load_state_dict(loaded["model" if len(inner) == 1 else f"model{i}"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    return iteration


# ---------------------------------------------------------------------------- main

def train(args, bridge, provider, samples, layout) -> int:
    """Build, (resume,) train, save. Shared with pretrain.py (bridge may be None there)."""
    from megatron.core import parallel_state as ps

    from bridge.parallel import build_model

    chunks = build_model(provider)
    if bridge is not None and not args.resume_found:
        bridge.load_hf_weights(chunks)
    model, optimizer = wrap_and_optimizer(chunks, args)
    for m in model:
        m.train()
    for c in chunks:  # frozen towers also stay in eval mode (e.g. Parakeet's batch-norm statistics)
        for name in FREEZABLE:
            module = getattr(c, name, None)
            if getattr(c.config, f"freeze_{name}", False) or getattr(args, f"freeze_{name}", False):
                if module is not None:
                    module.eval()
    start = 0
    output = Path(args.output) if args.output else None
    if args.resume_found:
        start = load_checkpoint(chunks, optimizer, output)
        print0(f"resumed from {output} at iteration {start}")
    sizes = dict(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp or args.tp, cp=args.cp, dp=layout["dp"])
    print0(f"layout {sizes}, {layout['num_microbatches']} micro-batches of {args.micro_batch_size} per step, "
           f"{sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)} trainable parameters "
           f"on rank 0, optimizer {type(optimizer.chained_optimizers[0].optimizer).__name__ if hasattr(optimizer, 'chained_optimizers') else type(optimizer).__name__}")
    t0 = time.time()
    for step in range(start, args.steps):
        loss = train_step(model, optimizer, step_batches(samples, step, args, layout), args, lr_at(args, step))
        print0(f"step {step + 1} loss {loss:.4f}")
        if output and args.save_interval and (step + 1) % args.save_interval == 0 and step + 1 < args.steps:
            save_checkpoint(bridge, chunks, optimizer, step + 1, output, sizes)
    print0(f"{args.steps - start} steps in {time.time() - t0:.1f}s")
    if output and args.steps > start:
        save_checkpoint(bridge, chunks, optimizer, args.steps, output, sizes)
        print0(f"saved {output}/iter_{args.steps:07d}")
    if getattr(args, "export_hf", None):
        bridge.save_hf_pretrained(chunks, args.export_hf)
        print0(f"exported {args.export_hf}")
    dist.barrier()
    ps.destroy_model_parallel()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    layout = init_parallel(args)
    from bridge import AutoBridge

    torch.manual_seed(args.seed)
    bridge = AutoBridge.from_hf_pretrained(args.hf_path)
    provider = bridge.to_megatron_provider(dtype_from_name(args.dtype) if args.dtype else None)
    provider.perform_initialization = False  # every weight comes from the checkpoint
    configure_provider(provider, args)
    for name in FREEZABLE:
        if getattr(args, f"freeze_{name}"):
            if not hasattr(provider, f"freeze_{name}"):
                raise SystemExit(f"error: --freeze-{name.replace('_', '-')} needs a Nemotron-Omni checkpoint")
            setattr(provider, f"freeze_{name}", True)
    if args.cp > 1 and bridge.config.kind != "nemotron_h":
        raise SystemExit("error: --cp > 1 is not supported for the Omni model: its forward merges image/audio "
                         "embeddings into the full sequence but does not yet split the result across "
                         "context-parallel ranks (providers/omni_model.py)")
    vocab = bridge.config.text["vocab_size"]
    if args.synthetic:
        samples = synthetic_samples(provider, vocab, args, special_token_ids(bridge.config.raw, args.hf_path, provider))
    else:
        samples = jsonl_samples(args.data, args.hf_path, args, provider)
    if getattr(provider, "video_pruning_rate", 0) > 0 and any("pixel_values_videos" in s for s in samples):
        raise SystemExit(f"error: {args.hf_path}: video_pruning_rate is {provider.video_pruning_rate}: Efficient Video "
                         "Sampling drops video tokens inside the model's forward, where the loss mask cannot follow; "
                         "set video_pruning_rate to 0 in config.json to fine-tune on videos")
    args.resume_found = bool(args.resume and (Path(args.output) / TRACKER).is_file())
    return train(args, bridge, provider, samples, layout)


if __name__ == "__main__":
    sys.exit(main())
