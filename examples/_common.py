"""Shared helpers of the examples (generate.py, finetune.py, pretrain.py): quiet imports, loading the
Megatron model through the bridge, token-id parsing, the inputs of the Omni model and the checkpoint's
transformers processor (with a torch-only stand-in for its torchvision-backed image processor)."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import torch
from transformers import NemotronH_Omni_Reasoning_V3Processor
from transformers.image_processing_base import ImageProcessingMixin

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python examples/x.py` from a checkout without installing
    sys.path.insert(0, str(REPO))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")  # transformers 5 / older layout


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
    * any other file: decoded with Pillow and preprocessed (resize, normalisation) by the image
      processor of the checkpoint's `processor_config.json` / `preprocessor_config.json`
      (`load_image_processor`).
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
    config = find_file(asset_dirs, PROCESSOR_CONFIGS)
    if config is None:
        raise SystemExit(f"error: {path}: the checkpoint has no processor config to preprocess images with; "
                         "pass a .npy/.pt [3, H, W] tensor of normalised pixel values instead")
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit(f"error: {path}: decoding image files needs Pillow (pip install pillow); "
                         "or pass a .npy/.pt [3, H, W] tensor of normalised pixel values") from None
    with Image.open(path) as image:
        out = load_image_processor(config.parent)(images=[image], return_tensors="pt")
    return dict(pixel_values=out["pixel_values"], image_grid_hw=out["image_grid_hw"])


def load_audio(path: Path, asset_dirs) -> dict:
    """`input_features` / `input_features_mask` of one clip.

    * `.npy` / `.pt`: a `[frames, mel_bins]` tensor of mel features (the feature extractor's output).
    * any other file: a waveform (`read_audio`) turned into mel features by the feature extractor of
      the checkpoint's `processor_config.json` / `preprocessor_config.json`.
    """
    path = Path(path)
    if path.suffix in (".npy", ".pt"):
        feats = _load_tensor(path)
        if feats.dim() == 3 and feats.shape[0] == 1:
            feats = feats[0]
        if feats.dim() != 2:
            raise SystemExit(f"error: {path}: expected a [frames, mel_bins] tensor, got {tuple(feats.shape)}")
        mask = torch.ones(1, feats.shape[0], dtype=torch.long)
        return dict(input_features=feats.unsqueeze(0), input_features_mask=mask)
    config = find_file(asset_dirs, PROCESSOR_CONFIGS)
    if config is None:
        raise SystemExit(f"error: {path}: the checkpoint has no processor config (feature extractor); "
                         "pass a .npy/.pt [frames, mel_bins] tensor of mel features instead")
    from transformers import AutoFeatureExtractor

    fe = AutoFeatureExtractor.from_pretrained(str(config.parent))
    out = fe([read_audio(path, fe.sampling_rate)], sampling_rate=fe.sampling_rate, return_tensors="pt")
    mask = out.get("attention_mask")
    if mask is None:
        mask = torch.ones(out["input_features"].shape[:2], dtype=torch.long)
    return dict(input_features=out["input_features"], input_features_mask=mask)


# ---------------------------------------------------------------------------- Omni processor

def load_processor(hf_dir):
    """transformers' `NemotronH_Omni_Reasoning_V3Processor` of a checkpoint (tokenizer and chat template,
    image processor, Parakeet feature extractor, from its `processor_config.json` /
    `preprocessor_config.json`), or None when the checkpoint has no processor config.

    With torchvision installed this is `AutoProcessor.from_pretrained`. Without it, the same processor
    class is built with `OmniImageProcessor` (below) as its image processor and no video processor:
    transformers' Omni image and video processors are torchvision-backed and cannot be loaded without
    it, and the torchvision wheels on PyPI are CUDA builds that do not load next to a CPU-only torch.
    Everything else (placeholder expansion, tokenisation, audio features and their token counts) is
    transformers' own code."""
    from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    if find_file([hf_dir], PROCESSOR_CONFIGS) is None:
        return None
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(str(hf_dir))
    config, _ = NemotronH_Omni_Reasoning_V3Processor.get_processor_dict(str(hf_dir))
    return OmniProcessorWithoutTorchvision(
        image_processor=load_image_processor(hf_dir), video_processor=None,
        tokenizer=AutoTokenizer.from_pretrained(str(hf_dir)),
        feature_extractor=AutoFeatureExtractor.from_pretrained(str(hf_dir)),
        chat_template=config.get("chat_template"),
        **{k: v for k, v in config.items() if k.startswith(("audio_", "video_temporal"))})


def load_image_processor(hf_dir):
    """The checkpoint's Omni image processor: transformers' with torchvision, else `OmniImageProcessor`."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(hf_dir))
    config, _ = ImageProcessingMixin.get_image_processor_dict(str(hf_dir))
    return OmniImageProcessor(**config)


class OmniProcessorWithoutTorchvision(NemotronH_Omni_Reasoning_V3Processor):
    """transformers' Omni processor with no video processor (transformers' is torchvision-backed, and so
    is the check of its class); everything else is inherited. Videos are not supported then."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def read_audio(path, sampling_rate: int):
    """Mono float32 waveform of an audio file at `sampling_rate` (what transformers' `load_audio` returns).

    A PCM WAV file already at that rate is read with the standard library's `wave` module, scaled as
    libsndfile does (signed samples / 2^(bits-1); 8-bit is unsigned) and averaged over channels, like
    transformers' soundfile backend. Other files or rates go to transformers' `load_audio`, which needs
    `soundfile` and `soxr` (or torchcodec)."""
    import wave

    import numpy as np

    try:
        with wave.open(str(path), "rb") as f:
            rate, width, channels = f.getframerate(), f.getsampwidth(), f.getnchannels()
            data = f.readframes(f.getnframes())
    except (wave.Error, EOFError):
        rate = None
    if rate != sampling_rate:
        from transformers.audio_utils import load_audio as hf_load_audio

        return hf_load_audio(str(path), sampling_rate=sampling_rate)
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    if width == 1:
        samples = (raw[:, 0].astype(np.float32) - 128) / 128
    else:  # little-endian signed integers of 2, 3 or 4 bytes, put in the top bytes of an int32
        padded = np.zeros((raw.shape[0], 4), dtype=np.uint8)
        padded[:, 4 - width:] = raw
        samples = padded.view("<i4")[:, 0].astype(np.float64) / 2**31
    samples = samples.astype(np.float32).reshape(-1, channels)
    return samples.mean(axis=1) if channels > 1 else samples[:, 0]


def patch_grid_size(height: int, width: int, patch_size: int, merge_size: int, min_num_patches: int,
                    max_num_patches: int):
    """transformers' `get_patch_grid_size` (image_processing_nemotron_h_omni.py), copied verbatim:
    the patch grid an image is resized to."""
    grid_height = round(height / patch_size + 0.5)
    grid_width = round(width / patch_size + 0.5)
    factor = min(math.sqrt(max_num_patches / (grid_height * grid_width)), 1.0)
    grid_height = math.floor(factor * grid_height)
    grid_width = math.floor(factor * grid_width)
    if max_num_patches > min_num_patches and grid_height * grid_width < min_num_patches:
        factor = math.sqrt(min_num_patches / (grid_height * grid_width))
        grid_height = math.ceil(factor * grid_height)
        grid_width = math.ceil(factor * grid_width)
    if remainder := grid_height % merge_size:
        if (grid_height + merge_size - remainder) * grid_width <= max_num_patches:
            grid_height += merge_size - remainder
        else:
            grid_height = max(merge_size, grid_height - remainder)
    if remainder := grid_width % merge_size:
        if grid_height * (grid_width + merge_size - remainder) <= max_num_patches:
            grid_width += merge_size - remainder
        else:
            grid_width = max(merge_size, grid_width - remainder)
    return grid_height, grid_width


class OmniImageProcessor(ImageProcessingMixin):
    """The preprocessing of transformers' `NemotronH_Omni_Reasoning_V3ImageProcessor` in plain torch (see
    `load_processor` for why), configured by the same fields: RGB conversion (transparency composited
    on white: transformers' `convert_to_rgb`); one patch budget for all images of a call; each image
    resized in float32 to its `patch_grid_size` grid by torch's antialiased bicubic (or bilinear)
    `interpolate`, the kernel torchvision's `resize` runs on float tensors; rescale and normalisation
    fused as transformers does; patches in row-major order, each channel-major. Output:
    `pixel_values` `[total_patches, 3 * patch_size**2]` and `image_grid_hw` `[images, 2]`.
    Bit-identical to transformers' class (`tests/test_examples_jsonl.py`, where torchvision imports).
    """

    model_input_names = ["pixel_values", "image_grid_hw"]
    RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as transformers' configs store them

    def __init__(self, patch_size=16, downsample_ratio=0.5, min_num_patches=1024, max_num_patches=13312,
                 max_model_len=16384, image_mean=None, image_std=None, rescale_factor=1 / 255, do_rescale=True,
                 do_normalize=True, resample=3, **kwargs):
        # released checkpoints store the normalisation statistics as `norm_mean` / `norm_std`; default: CLIP's
        norm_mean, norm_std = kwargs.pop("norm_mean", None), kwargs.pop("norm_std", None)
        image_mean = image_mean or norm_mean or (0.48145466, 0.4578275, 0.40821073)
        image_std = image_std or norm_std or (0.26862954, 0.26130258, 0.27577711)
        if resample not in self.RESAMPLE:
            raise SystemExit(f"error: image processor resample={resample!r}: only bilinear (2) and bicubic (3) "
                             "are implemented here")
        super().__init__(**{k: v for k, v in kwargs.items() if not k.startswith("_")})
        self.patch_size, self.downsample_ratio = patch_size, downsample_ratio
        self.min_num_patches, self.max_num_patches, self.max_model_len = min_num_patches, max_num_patches, max_model_len
        self.image_mean, self.image_std, self.rescale_factor = list(image_mean), list(image_std), rescale_factor
        self.do_rescale, self.do_normalize, self.resample = do_rescale, do_normalize, resample

    def __call__(self, images, **kwargs):
        import numpy as np
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.image_transforms import convert_to_rgb

        images = images if isinstance(images, (list, tuple)) else [images]
        merge = round(1 / self.downsample_ratio)
        budget = max((self.max_model_len - 4) * merge**2, self.min_num_patches * len(images))
        if self.max_num_patches:
            budget = min(budget, self.max_num_patches)
        budget = max(budget, self.min_num_patches)
        mean = torch.tensor(self.image_mean)
        std = torch.tensor(self.image_std)
        if self.do_rescale and self.do_normalize:  # fused, as transformers' rescale_and_normalize
            mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
        pixel_values, grids = [], []
        for image in images:
            x = torch.from_numpy(np.array(convert_to_rgb(image, return_numpy=True))).permute(2, 0, 1)
            rows, cols = patch_grid_size(x.shape[1], x.shape[2], self.patch_size, merge, self.min_num_patches, budget)
            x = x[None].to(torch.float32)
            size = (rows * self.patch_size, cols * self.patch_size)
            if tuple(x.shape[-2:]) != size:
                x = torch.nn.functional.interpolate(x, size=size, mode=self.RESAMPLE[self.resample],
                                                    align_corners=False, antialias=True)
            if self.do_normalize:
                x = (x - mean[:, None, None]) / std[:, None, None]
            elif self.do_rescale:
                x = x * self.rescale_factor
            pixel_values.append(image_patches(x[0], self.patch_size))
            grids.append([rows, cols])
        return BatchFeature({"pixel_values": torch.cat(pixel_values), "image_grid_hw": torch.tensor(grids)},
                            tensor_type=kwargs.get("return_tensors"))
