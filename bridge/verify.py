"""`bridge-verify --hf-path DIR --mcore-path DIR [--tol X]`: does a converted checkpoint compute what
the Hugging Face model computes?

It loads the transformers model from the HF directory, runs every modality the model has on a fixed
probe input (fixed seed), frees it, loads the Megatron checkpoint with
`AutoBridge.load_megatron_model` (which verifies the checkpoint's checksums first), runs the same probes
and prints a table of max |delta logit| per modality. Exit codes: 0 every modality within tolerance,
3 a modality above it, 2 bad input (one line on stderr, as the converters), 1 anything unexpected.

Both models compute in float32 by default (`--dtype fp32`): the checkpoint's weights are upcast
exactly (bf16 -> fp32 is lossless), so the comparison sees only the two implementations'
arithmetic, not bf16 rounding, and routing ties of the MoE router cannot flip. Tolerance:
  fp32 (default): 1e-4 * max(1, max|logit|). The tests' CPU parity is ~3e-6 on tiny models; GPU
                  kernels differ more; a wrong tensor differs by O(max|logit|).
`--dtype checkpoint` computes in the checkpoint's dtype (half the memory for a bf16 checkpoint:
the fp32 default needs 4 bytes per parameter for each model, loaded one after the other). It is a
coarse check: in bf16 two correct implementations already differ by up to ~0.25 * max|logit| on
random weights (a top-k routing decision near a tie flips), so its tolerance only catches gross
errors: bf16 0.3, fp16 0.1, times max(1, max|logit|).
`--tol X` replaces the default with an absolute bound X.

Modalities are a table keyed by model kind (`PROBES`): text-only NemotronH has `text`; the Omni
model has `text`, `image`, `video` and `audio` probes with their encoders' inputs.
"""

from __future__ import annotations

import argparse
import gc
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from conversion.errors import ConversionError

DEFAULT_REL_TOL = {"float32": 1e-4, "bfloat16": 0.3, "float16": 0.1}
EXIT_MISMATCH = 3


@dataclass(frozen=True)
class Probe:
    """One modality's fixed probe: how to make its input and run each model on it."""

    modality: str
    describe: Callable[[Dict], str]
    make_inputs: Callable[[object, "argparse.Namespace"], Dict]  # (HFModelConfig, args) -> inputs
    hf_logits: Callable[[object, Dict], "object"]               # (transformers model, inputs) -> [b, s, vocab]
    megatron_logits: Callable[[object, Dict], "object"]         # (megatron model, inputs) -> [b, s, padded vocab]


def _text_inputs(cfg, args) -> Dict:
    import torch

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.text["vocab_size"], (args.batch, args.seq_len), generator=g)
    return {"input_ids": ids}


def _device_of(model):
    return next(model.parameters()).device


def _hf_text(model, inputs):
    import torch

    with torch.no_grad():
        return model(input_ids=inputs["input_ids"].to(_device_of(model)), use_cache=False).logits.float().cpu()


def _megatron_text(model, inputs):
    import torch

    ids = inputs["input_ids"].to(_device_of(model))
    position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, position_ids, attention_mask=None).float().cpu()


TEXT = Probe("text", lambda i: f"{i['input_ids'].shape[0]} x {i['input_ids'].shape[1]} random token ids",
             _text_inputs, _hf_text, _megatron_text)

# ------------------------------------------------------------------ Omni probes
# One sample of `--seq-len` random text tokens (avoiding the special ids) with the modality's
# placeholders at the front: a 4x4-patch image (4 tokens after the 2x2 pixel shuffle), a video of 2
# tubelets of 4x4 patches in the format of transformers' video processor, one clip of 40 mel frames.

def _omni_inputs(modality: str):
    def make(cfg, args) -> Dict:
        import torch

        from conversion.omni import omni_provider_fields

        raw, g = cfg.raw, torch.Generator().manual_seed(args.seed)
        fields = omni_provider_fields(raw, cfg.scheme, "config.json")
        special = {fields.get("image_token_index"), fields.get("sound_context_token_id")}
        ids = torch.randint(0, cfg.text["vocab_size"], (1, max(args.seq_len, 32)), generator=g)
        for token in special - {None}:
            ids[ids == token] = (token + 1) % cfg.text["vocab_size"]
        p = fields.get("vision_patch_dim", 16)
        inputs = {"input_ids": ids, "image_token": fields.get("image_token_index"),
                  "audio_token": fields.get("sound_context_token_id")}
        if modality == "image":
            inputs.update(pixel_values=torch.randn(16, 3 * p * p, generator=g), image_grid_hw=torch.tensor([[4, 4]]))
            ids[0, 1:5] = inputs["image_token"]
        elif modality == "video":
            t = fields.get("temporal_patch_dim", 1)
            inputs["pixel_values_videos"] = torch.randn(1, 2, t * 3, 4 * p, 4 * p, generator=g)
        elif modality == "audio":
            mel = (raw.get("audio_config") or raw.get("sound_config"))["num_mel_bins"]
            inputs.update(input_features=torch.randn(1, 40, mel, generator=g),
                          input_features_mask=torch.ones(1, 40, dtype=torch.long))
        return inputs
    return make


_OMNI_KWARGS = ("pixel_values", "image_grid_hw", "pixel_values_videos", "input_features", "input_features_mask")


def _omni_kwargs(inputs, device, dtype=None):
    out = {}
    for k in _OMNI_KWARGS:
        if k in inputs:
            v = inputs[k].to(device)
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def _hf_omni(model, inputs):
    """transformers' forward. Placeholder counts the encoders decide (video, audio) are written into
    `inputs["input_ids"]` first."""
    import torch

    device, dtype = _device_of(model), next(model.parameters()).dtype
    kwargs = _omni_kwargs(inputs, device, dtype)
    ids = inputs["input_ids"].to(device)
    with torch.no_grad():
        if "pixel_values_videos" in kwargs:
            n = sum(len(v) for v in model.get_video_features(kwargs["pixel_values_videos"]).pooler_output)
            ids[0, 1:1 + n] = inputs["image_token"]
        if "input_features" in kwargs:
            n = model.get_audio_features(kwargs["input_features"], kwargs["input_features_mask"]).pooler_output.shape[0]
            ids[0, 1:1 + n] = inputs["audio_token"]
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    inputs["input_ids"] = ids.cpu()
    return logits.float().cpu()


def _megatron_omni(model, inputs):
    import torch

    device = _device_of(model)
    with torch.no_grad():
        return model(inputs["input_ids"].to(device), **_omni_kwargs(inputs, device)).float().cpu()


def _omni_probe(modality: str, what: str) -> Probe:
    return Probe(modality, lambda i: what, _omni_inputs(modality), _hf_omni, _megatron_omni)


# model kind (conversion.hf_config.HFModelConfig.kind) -> its modalities, in table order.
PROBES: Dict[str, List[Probe]] = {
    "nemotron_h": [TEXT],
    "nemotron_omni": [_omni_probe("text", "random token ids"),
                      _omni_probe("image", "one 4x4-patch image"),
                      _omni_probe("video", "2 tubelets of 4x4 patches"),
                      _omni_probe("audio", "one clip of 40 mel frames")],
}


# ------------------------------------------------------------------ reference semantics, layer probes

@contextmanager
def clamp_lifted(model):
    """transformers' Mamba mixers clamp the time step from below at `time_step_min`
    (`time_step_limit = (time_step_min, inf)`); megatron-core and mamba-ssm, which the model trains
    with, do not. Within this block the transformers model computes without the clamp."""
    mixers = [m for m in model.modules() if isinstance(getattr(m, "time_step_limit", None), tuple)]
    saved = [m.time_step_limit for m in mixers]
    for m in mixers:
        m.time_step_limit = (0.0, float("inf"))
    try:
        yield
    finally:
        for m, limit in zip(mixers, saved):
            m.time_step_limit = limit


def _hf_layers(model):
    lm = getattr(model, "language_model", model)
    inner = getattr(lm, "model", None) or getattr(lm, "backbone")
    return inner.layers


def _megatron_layers(model):
    return getattr(model, "language_model", model).decoder.layers


@contextmanager
def recorded_layers(layers, seq_first: bool, out: List):
    """Append (input of layer 0, then every layer's output) as [batch, seq, hidden] fp32 CPU tensors
    to `out` while the block runs (one forward)."""
    def as_bsh(t):
        t = t[0] if isinstance(t, (tuple, list)) else t
        return (t.transpose(0, 1) if seq_first else t).detach().float().cpu()

    handles = [layers[0].register_forward_pre_hook(lambda m, args, kwargs: out.append(
        as_bsh(args[0] if args else kwargs.get("hidden_states"))), with_kwargs=True)]
    handles += [layer.register_forward_hook(lambda m, args, output: out.append(as_bsh(output))) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def first_divergence(hf_states: List, megatron_states: List, pattern: str, rel_tol: float) -> str:
    """Where the two models part: the language model's input, or its first layer whose output
    differs by more than rel_tol * max(1, max|hidden|) — or neither (the final norm / output layer)."""
    kinds = {"M": "Mamba", "*": "attention", "-": "MLP", "E": "MoE"}
    for i, (ref, got) in enumerate(zip(hf_states, megatron_states)):
        if ref.shape != got.shape:
            return f"layer shapes differ at step {i}: {tuple(got.shape)} vs {tuple(ref.shape)}"
        err = (got - ref).abs().max().item()
        if not err <= rel_tol * max(1.0, ref.abs().max().item()):
            if i == 0:
                return f"the language model's input (embeddings, and any encoder features in it) already differs " \
                       f"(max|dhidden| {err:.3e})"
            kind = kinds.get(pattern[i - 1], "?") if i - 1 < len(pattern) else "?"
            return f"language-model layer {i - 1} ({kind}) is the first whose output differs (max|dhidden| {err:.3e})"
    return "every language-model layer agrees: the difference is in the final norm or the output layer"


def default_tolerance(dtype_name: str, max_abs_logit: float) -> float:
    return DEFAULT_REL_TOL.get(dtype_name, DEFAULT_REL_TOL["bfloat16"]) * max(1.0, max_abs_logit)


def _load_hf_model(hf_path: Path, kind: str, dtype, device, quiet: bool = True):
    import transformers
    from transformers import AutoModelForCausalLM

    if quiet:  # progress bars and kernel-fallback notices are noise next to the table
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

    try:
        if kind == "nemotron_omni":
            from transformers import NemotronH_Omni_Reasoning_V3

            model = NemotronH_Omni_Reasoning_V3.from_pretrained(str(hf_path), dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(hf_path), dtype=dtype)
    except Exception as e:  # noqa: BLE001 - transformers' own message, in one line
        raise ConversionError(f"{hf_path}: transformers cannot load the model ({type(e).__name__}: {e})") from None
    return model.to(device).eval()


def _preflight(args):
    """Both inputs exist and describe the same model (config, tensor names and shapes); no megatron."""
    from conversion import hf_config, integrity
    from conversion.hf_paths import resolve_hf_path
    from conversion.safetensors_io import HFCheckpoint

    args.hf_path = resolve_hf_path(args.hf_path, "a Hugging Face model directory")  # or a hub id in the cache
    if not Path(args.mcore_path).is_dir():
        raise ConversionError(f"{args.mcore_path}: input path does not exist or is not a directory "
                              "(expected a Megatron checkpoint written by convert-hf-to-mcore)")
    hf, mcore = Path(args.hf_path), Path(args.mcore_path)
    cfg = hf_config.load_config(hf)
    meta = integrity.read_meta(mcore)
    if cfg.kind not in PROBES:
        raise ConversionError(f"{hf}/config.json: bridge-verify has no probes for model kind {cfg.kind!r} yet")
    ckpt = HFCheckpoint(hf)
    recorded = meta["hf_manifest"]
    for name in recorded:
        if name not in ckpt:
            raise ConversionError(f"{hf}: has no tensor {name!r}, which the Megatron checkpoint {mcore} has "
                                  "(not the model it was converted from)")
        if tuple(ckpt.shape(name)) != tuple(recorded[name]["shape"]):
            raise ConversionError(f"{hf}: tensor {name!r} has shape {tuple(ckpt.shape(name))}, the Megatron "
                                  f"checkpoint's is {tuple(recorded[name]['shape'])} (not the model it was converted from)")
    extra = [n for n in ckpt.keys() if n not in recorded]
    if extra:
        raise ConversionError(f"{hf}: tensor {extra[0]!r} is not in the Megatron checkpoint {mcore}")
    return cfg, meta


def _verify(args: argparse.Namespace) -> int:
    cfg, meta = _preflight(args)
    import torch

    from conversion.integrity import verify_megatron_checkpoint
    from conversion.dtypes import dtype_from_name, dtype_name

    verify_megatron_checkpoint(Path(args.mcore_path), meta)  # before loading anything heavy
    dtype = torch.float32 if args.dtype == "fp32" else dtype_from_name(meta["params_dtype"])
    dtype_label = dtype_name(dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    probes = PROBES[cfg.kind]
    inputs = {p.modality: p.make_inputs(cfg, args) for p in probes}

    hf_model = _load_hf_model(Path(args.hf_path), cfg.kind, dtype, device, quiet=not args.debug)
    shipped, reference, hf_states = {}, {}, {}
    for p in probes:
        shipped[p.modality] = p.hf_logits(hf_model, inputs[p.modality])
        hf_states[p.modality] = []
        with clamp_lifted(hf_model), recorded_layers(_hf_layers(hf_model), False, hf_states[p.modality]):
            reference[p.modality] = p.hf_logits(hf_model, inputs[p.modality])
    del hf_model
    gc.collect()

    from bridge import AutoBridge

    model = AutoBridge.load_megatron_model(args.mcore_path, dtype=dtype)
    if isinstance(model, list):
        raise ConversionError("bridge-verify runs one model chunk (no virtual pipeline stages)")
    model.eval()
    rows, failed, where = [], [], {}
    rel_tol = DEFAULT_REL_TOL.get(dtype_label, DEFAULT_REL_TOL["bfloat16"])
    for p in probes:
        ref = reference[p.modality]
        states: List = []
        with recorded_layers(_megatron_layers(model), True, states):
            got = p.megatron_logits(model, inputs[p.modality])[..., : ref.shape[-1]]
        if got.shape != ref.shape:
            raise ConversionError(f"{p.modality}: Megatron logits have shape {tuple(got.shape)}, transformers' "
                                  f"{tuple(ref.shape)}")
        err = (got - ref).abs().max().item()
        err_shipped = (got - shipped[p.modality]).abs().max().item()
        top = ref.abs().max().item()
        tol = args.tol if args.tol is not None else default_tolerance(dtype_label, top)
        ok = err <= tol  # NaN compares False: a NaN fails
        if not ok:
            failed.append(p.modality)
            where[p.modality] = first_divergence(hf_states[p.modality], states, cfg.text["_pattern"], rel_tol)
        rows.append((p.modality, p.describe(inputs[p.modality]), f"{err:.3e}", f"{err_shipped:.3e}", f"{top:.3f}",
                     f"{tol:.3e}", "ok" if ok else "FAIL"))
    header = ("modality", "probe", "max|dlogit|", "as-shipped", "max|logit|", "tolerance", "result")
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    print(f"bridge-verify: {args.hf_path} (transformers) vs {args.mcore_path} (Megatron), "
          f"checkpoint {meta['params_dtype']}, computed in {dtype_label} on {device.type}, seed {args.seed}")
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("max|dlogit|: against transformers without its Mamba time-step clamp (time_step_min), the semantics "
          "megatron-core trains with; as-shipped: against transformers as released (clamp on), for information")
    for modality, text in where.items():
        print(f"{modality}: {text}")
    if failed:
        print(f"error: max |delta logit| above tolerance for {', '.join(failed)}: the checkpoints differ; "
              + "; ".join(f"{m}: {where[m]}" for m in failed), file=sys.stderr)
        return EXIT_MISMATCH
    print("ok: every modality within tolerance")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from bridge.cli import _run

    p = argparse.ArgumentParser(prog="bridge-verify",
                                description="Compare a converted Megatron checkpoint with its Hugging Face source on fixed probe inputs.")
    p.add_argument("--hf-path", required=True, help="Hugging Face model directory")
    p.add_argument("--mcore-path", required=True, help="Megatron checkpoint directory written by convert-hf-to-mcore")
    p.add_argument("--tol", type=float, default=None,
                   help="absolute bound on max |delta logit| (default: 1e-4 x max(1, max|logit|) in fp32; "
                        "bf16 0.3x, fp16 0.1x with --dtype checkpoint)")
    p.add_argument("--dtype", choices=["fp32", "checkpoint"], default="fp32",
                   help="compute dtype of both models (default fp32: exact upcast, sharp comparison)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe inputs")
    p.add_argument("--batch", type=int, default=2, help="probe batch size")
    p.add_argument("--seq-len", type=int, default=64, help="probe sequence length (text tokens)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return _run(_verify, p, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
