"""Shared helpers of the examples (generate.py, finetune.py, pretrain.py): quiet imports, loading the
Megatron model through the bridge, token-id parsing and the inputs of the Omni model."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python examples/x.py` from a checkout without installing
    sys.path.insert(0, str(REPO))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def quiet() -> None:
    """Silence import-time notes of megatron-core / transformers about missing GPU packages."""
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def print0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def parse_ids(text: str) -> List[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"error: --prompt-ids must be comma-separated integers, got {text!r}") from None


def language_model(model):
    from bridge.weights import unwrap

    m = unwrap(model)
    return getattr(m, "language_model", m)


def forward_logits(model, ids: torch.Tensor, **mm) -> torch.Tensor:
    """[batch, seq, padded_vocab] logits of a megatron NemotronH / Omni model (one process)."""
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, position_ids, attention_mask=None, **mm)


def find_file(dirs, names) -> Optional[Path]:
    for d in dirs:
        if d is None:
            continue
        for n in names:
            if (Path(d) / n).is_file():
                return Path(d) / n
    return None


def load_tokenizer(dirs):
    """transformers' tokenizer from the first directory that has one, else None."""
    if find_file(dirs, ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")) is None:
        return None
    from transformers import AutoTokenizer

    for d in dirs:
        if d is not None and find_file([d], ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return AutoTokenizer.from_pretrained(str(d))
    return None


# ---------------------------------------------------------------------------- Omni inputs

def image_patches(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[3, H, W] -> [(H/p)*(W/p), 3*p*p] in the order of transformers' Omni image processor
    (row-major patches, each laid out channel-major)."""
    c, h, w = pixels.shape
    x = pixels.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 0, 2, 4)
    return x.reshape((h // patch) * (w // patch), c * patch * patch)


def _load_tensor(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(str(path))).float()
    if path.suffix == ".pt":
        t = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise SystemExit(f"error: {path}: expected a single tensor")
        return t.float()
    raise ValueError(path.suffix)


def load_image(path: Path, patch: int, downsample_ratio: float, asset_dirs) -> dict:
    """`pixel_values` / `image_grid_hw` of one image.

    * `.npy` / `.pt`: a `[3, H, W]` float tensor of pixel values already normalised as the model's
      processor would (H and W multiples of 2 x patch size); it is only cut into patches here.
    * any other file: decoded with PIL and preprocessed by transformers' Omni image processor
      (resize, normalisation) configured from the checkpoint's `preprocessor_config.json`; both
      must be present (the tiny test checkpoints have neither, so the tests use tensors).
    """
    path = Path(path)
    if path.suffix in (".npy", ".pt"):
        pixels = _load_tensor(path)
        if pixels.dim() != 3 or pixels.shape[0] != 3:
            raise SystemExit(f"error: {path}: expected a [3, H, W] tensor, got {tuple(pixels.shape)}")
        step = patch * round(1 / downsample_ratio)
        if pixels.shape[1] % step or pixels.shape[2] % step:
            raise SystemExit(f"error: {path}: H and W must be multiples of {step} (patch {patch} x pixel shuffle), "
                             f"got {tuple(pixels.shape[1:])}")
        grid = torch.tensor([[pixels.shape[1] // patch, pixels.shape[2] // patch]])
        return dict(pixel_values=image_patches(pixels, patch), image_grid_hw=grid)
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit(f"error: {path}: decoding image files needs Pillow (pip install pillow); "
                         "or pass a .npy/.pt [3, H, W] tensor of normalised pixel values") from None
    if find_file(asset_dirs, ("preprocessor_config.json",)) is None:
        raise SystemExit(f"error: {path}: the checkpoint has no preprocessor_config.json to preprocess images with; "
                         "pass a .npy/.pt [3, H, W] tensor of normalised pixel values instead")
    from transformers import AutoImageProcessor

    d = find_file(asset_dirs, ("preprocessor_config.json",)).parent
    out = AutoImageProcessor.from_pretrained(str(d))(images=[Image.open(path).convert("RGB")], return_tensors="pt")
    return dict(pixel_values=out["pixel_values"], image_grid_hw=out["image_grid_hw"])


def load_audio(path: Path, asset_dirs) -> dict:
    """`input_features` / `input_features_mask` of one clip.

    * `.npy` / `.pt`: a `[frames, mel_bins]` tensor of mel features (the feature extractor's output).
    * any other file: a waveform read with transformers' `load_audio` and turned into mel features by
      the feature extractor of the checkpoint's `preprocessor_config.json` (both must be available).
    """
    path = Path(path)
    if path.suffix in (".npy", ".pt"):
        feats = _load_tensor(path)
        if feats.dim() == 3 and feats.shape[0] == 1:
            feats = feats[0]
        if feats.dim() != 2:
            raise SystemExit(f"error: {path}: expected a [frames, mel_bins] tensor, got {tuple(feats.shape)}")
        return dict(input_features=feats.unsqueeze(0), input_features_mask=torch.ones(1, feats.shape[0], dtype=torch.long))
    cfg = find_file(asset_dirs, ("preprocessor_config.json",))
    if cfg is None:
        raise SystemExit(f"error: {path}: the checkpoint has no preprocessor_config.json (feature extractor); "
                         "pass a .npy/.pt [frames, mel_bins] tensor of mel features instead")
    from transformers import AutoFeatureExtractor
    from transformers.audio_utils import load_audio as hf_load_audio

    fe = AutoFeatureExtractor.from_pretrained(str(cfg.parent))
    wave = hf_load_audio(str(path), sampling_rate=fe.sampling_rate)
    out = fe([wave], sampling_rate=fe.sampling_rate, return_tensors="pt")
    mask = out.get("attention_mask")
    if mask is None:
        mask = torch.ones(out["input_features"].shape[:2], dtype=torch.long)
    return dict(input_features=out["input_features"], input_features_mask=mask)


# ---------------------------------------------------------------------------- training on CPU

