"""Shared helpers of the examples (generate.py, finetune.py, pretrain.py): quiet imports, loading the
Megatron model through the bridge, token-id parsing, the inputs of the Omni model and the checkpoint's
transformers processor (with torch-only stand-ins for its torchvision-backed image and video processors)."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional, TypedDict

import torch
from transformers import NemotronH_Omni_Reasoning_V3Processor
from transformers.image_processing_base import ImageProcessingMixin
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import VideoProcessorMixin

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python examples/x.py` from a checkout without installing
    sys.path.insert(0, str(REPO))

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
    from bridge.ranks import world

    return world()[0]


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


def _load_tensor(path: Path, as_float: bool = True):
    """The tensor of a `.npy` / `.pt` file, as float32 (`as_float`) or as stored (a `.npy` stays a numpy array)."""
    if path.suffix == ".npy":
        import numpy as np

        array = np.load(str(path))
        return torch.from_numpy(array).float() if as_float else array
    if path.suffix == ".pt":
        t = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise SystemExit(f"error: {path}: expected a single tensor")
        return t.float() if as_float else t
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


def load_video(path: Path, patch: int, downsample_ratio: float, temporal_patch_dim: int, asset_dirs) -> dict:
    """`pixel_values_videos` (and `num_frames`) of one video.

    * `.npy` / `.pt` float tensor `[frames, 3, H, W]`: frames already normalised as the model's
      processor would (H and W multiples of 2 x patch size), passed as they are: the model packs them
      into tubelets of `temporal_patch_dim` frames (the last frame repeated to fill the last one).
    * `.npy` / `.pt` uint8 array `[frames, H, W, 3]` (or `[frames, 3, H, W]`) of RGB frames, or any
      other file, a video decoded by transformers' `load_video` (`read_video`): preprocessed by the
      video processor of the checkpoint's `processor_config.json` / `preprocessor_config.json`
      (`load_video_processor`: frames sampled if its config asks, resized to one tile, normalised,
      packed into tubelets), giving `[1, tubelets, T*3, H', W']` and `num_frames`.
    """
    path = Path(path)
    frames = None
    if path.suffix in (".npy", ".pt"):
        frames = _load_tensor(path, as_float=False)
        if not _is_uint8(frames):
            frames = torch.as_tensor(frames).float()
            if frames.dim() != 4 or frames.shape[1] != 3:
                raise SystemExit(f"error: {path}: expected a float [frames, 3, H, W] tensor of normalised frames "
                                 f"(or a uint8 [frames, H, W, 3] array of RGB frames), got {tuple(frames.shape)}")
            step = patch * round(1 / downsample_ratio)
            if frames.shape[2] % step or frames.shape[3] % step:
                raise SystemExit(f"error: {path}: H and W must be multiples of {step} (patch {patch} x pixel shuffle), "
                                 f"got {tuple(frames.shape[2:])}")
            return dict(pixel_values_videos=frames)
    config = find_file(asset_dirs, PROCESSOR_CONFIGS)
    if config is None:
        raise SystemExit(f"error: {path}: the checkpoint has no processor config to preprocess video frames with; "
                         "pass a .npy/.pt float [frames, 3, H, W] tensor of normalised frames instead")
    video_processor = load_video_processor(config.parent)
    temporal = check_video_processor(video_processor, config, temporal_patch_dim)
    frames, metadata = read_video(path if frames is None else frames, video_processor, name=path)
    out = video_processor(videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                          temporal_patch_size=temporal, return_tensors="pt")
    return dict(pixel_values_videos=out["pixel_values_videos"], num_frames=torch.as_tensor(out["num_frames"]))


def _is_uint8(array) -> bool:
    return str(array.dtype) in ("uint8", "torch.uint8")  # a numpy array or a torch tensor


def video_token_count(pixel_values_videos: torch.Tensor, patch: int, downsample_ratio: float,
                      temporal_patch_dim: int) -> int:
    """Image-token placeholders the video fills: tubelets x (H/p) x (W/p) / merge^2, for the 5-D
    tubelets of transformers' video processor or the 4-D frames of one video (packed by the model)."""
    v = pixel_values_videos
    tubelets = v.shape[0] * v.shape[1] if v.dim() == 5 else -(-v.shape[0] // temporal_patch_dim)
    return tubelets * (v.shape[-2] // patch) * (v.shape[-1] // patch) // round(1 / downsample_ratio) ** 2


VIDEO_BACKENDS = ("torchcodec", "pyav", "decord", "opencv", "torchvision")  # transformers' load_video backends


def video_backend() -> Optional[str]:
    """The first of transformers' video decoding backends that works here, or None (torchcodec first,
    as transformers' video processors prefer it; torchvision only up to 0.25, which still decodes)."""
    from transformers.utils import is_av_available, is_cv2_available, is_decord_available
    from transformers.utils.import_utils import is_torchcodec_usable
    from transformers.video_utils import is_torchvision_video_decoding_available

    usable = {"torchcodec": lambda: is_torchcodec_usable(decode="video"), "pyav": is_av_available,
              "decord": is_decord_available, "opencv": is_cv2_available,
              "torchvision": is_torchvision_video_decoding_available}
    return next((b for b in VIDEO_BACKENDS if usable[b]()), None)


def read_video(source, video_processor, name=None):
    """(frames, `VideoMetadata`) of one video, sampled as the video processor's `do_sample_frames`
    asks (its `sample_frames` on the metadata, as transformers' video processors sample), ready for
    `video_processor(videos=[frames], video_metadata=[metadata], do_sample_frames=False)`.

    `source`: a uint8 array / tensor of RGB frames (`[frames, H, W, 3]` or `[frames, 3, H, W]`), a
    `.npy` / `.pt` file holding one, or a video file decoded by transformers' `load_video` with the
    first backend installed (`video_backend`; the metadata then carries the frame rate, and the
    processor labels the frames with their timestamps)."""
    from transformers.video_utils import load_video as hf_load_video
    from transformers.video_utils import make_batched_metadata

    name = name if name is not None else source
    sample = video_processor.sample_frames if getattr(video_processor, "do_sample_frames", None) else None
    if isinstance(source, (str, Path)) and Path(source).suffix in (".npy", ".pt"):
        source = _load_tensor(Path(source), as_float=False)
    if not isinstance(source, (str, Path)):
        if not _is_uint8(source) or source.ndim != 4:
            raise SystemExit(f"error: {name}: expected a uint8 [frames, H, W, 3] array of RGB frames, "
                             f"got {source.dtype} {tuple(source.shape)}")
        metadata = make_batched_metadata([source], None)[0]
        if sample is not None:
            metadata.frames_indices = sample(metadata=metadata)
            source = source[metadata.frames_indices]
        return source, metadata
    backend = video_backend()
    if backend is None:
        raise SystemExit(f"error: {name}: decoding a video file needs one of transformers' video backends "
                         "(torchcodec, av, decord, opencv-python); none is installed. Install one (pip install av), "
                         "or pass the frames as a uint8 .npy [frames, H, W, 3] array")
    try:
        return hf_load_video(str(source), backend=backend, sample_indices_fn=sample)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's
        raise SystemExit(f"error: {name}: {backend} cannot decode it ({type(e).__name__}: {e})") from None


def check_video_processor(video_processor, config_path, temporal_patch_dim: Optional[int] = None) -> int:
    """The processor's temporal patch size (`video_temporal_patch_dim` of the processor config, which
    the processor hands its video processor), after checking that the video processor can run (it
    normalises with `norm_mean` / `norm_std`, which have no default) and, when given, that the model
    packs tubelets of as many frames."""
    if video_processor is None:
        raise SystemExit(f"error: {config_path}: the processor config has no video processor")
    if getattr(video_processor, "norm_mean", None) is None or getattr(video_processor, "norm_std", None) is None:
        raise SystemExit(f"error: {config_path}: the video processor has no norm_mean / norm_std "
                         "(the normalisation of the frames)")
    config, _ = NemotronH_Omni_Reasoning_V3Processor.get_processor_dict(str(Path(config_path).parent))
    temporal = config.get("video_temporal_patch_dim", 2)  # the processor's default
    if temporal_patch_dim is not None and temporal != temporal_patch_dim:
        raise SystemExit(f"error: {config_path}: video_temporal_patch_dim is {temporal}, the model's temporal "
                         f"patch size is {temporal_patch_dim}")
    return temporal


# ---------------------------------------------------------------------------- Omni processor

def load_processor(hf_dir, torch_only: bool = False):
    """transformers' `NemotronH_Omni_Reasoning_V3Processor` of a checkpoint (tokenizer and chat template,
    image and video processors, Parakeet feature extractor, from its `processor_config.json` /
    `preprocessor_config.json`), or None when the checkpoint has no processor config.

    With torchvision installed this is `AutoProcessor.from_pretrained`. Without it (or with
    `torch_only`), the same processor class is built with `OmniImageProcessor` and
    `OmniVideoProcessor` (below) as its image and video processors: transformers' Omni image and video
    processors are torchvision-backed and cannot be loaded without it, and the torchvision wheels on
    PyPI are CUDA builds that do not load next to a CPU-only torch. Everything else (placeholder
    expansion, frame labels, tokenisation, audio features and their token counts) is transformers' own
    code."""
    from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    if find_file([hf_dir], PROCESSOR_CONFIGS) is None:
        return None
    if is_torchvision_available() and not torch_only:
        return AutoProcessor.from_pretrained(str(hf_dir))
    config, _ = NemotronH_Omni_Reasoning_V3Processor.get_processor_dict(str(hf_dir))
    return OmniProcessorWithoutTorchvision(
        image_processor=load_image_processor(hf_dir, torch_only=True),
        video_processor=load_video_processor(hf_dir, torch_only=True, required=False),
        tokenizer=AutoTokenizer.from_pretrained(str(hf_dir)),
        feature_extractor=AutoFeatureExtractor.from_pretrained(str(hf_dir)),
        chat_template=config.get("chat_template"),
        **{k: v for k, v in config.items() if k.startswith(("audio_", "video_temporal"))})


def load_image_processor(hf_dir, torch_only: bool = False):
    """The checkpoint's Omni image processor: transformers' with torchvision, else `OmniImageProcessor`."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available() and not torch_only:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(hf_dir))
    config, _ = ImageProcessingMixin.get_image_processor_dict(str(hf_dir))
    return OmniImageProcessor(**config)


def load_video_processor(hf_dir, torch_only: bool = False, required: bool = True):
    """The checkpoint's Omni video processor: transformers' with torchvision, else `OmniVideoProcessor`
    (from the same config: the `video_processor` entry of `processor_config.json`, else
    `video_preprocessor_config.json`, else the image processor's config, as transformers looks it up).
    None when there is no such config and not `required`."""
    from transformers.utils import is_torchvision_available

    try:
        if is_torchvision_available() and not torch_only:
            from transformers import AutoVideoProcessor

            return AutoVideoProcessor.from_pretrained(str(hf_dir))
        config, _ = OmniVideoProcessor.get_video_processor_dict(str(hf_dir))
    except OSError:
        if required:
            raise SystemExit(f"error: {hf_dir}: no video processor config (processor_config.json / "
                             "video_preprocessor_config.json)") from None
        return None
    return OmniVideoProcessor(**config)


class OmniProcessorWithoutTorchvision(NemotronH_Omni_Reasoning_V3Processor):
    """transformers' Omni processor with the torch-only image / video processors below; everything else
    is inherited. A checkpoint without a video processor config gets none (videos are refused then).
    transformers checks the video processor's class by looking `VideoProcessorMixin` up in its top-level
    namespace, where it is missing without torchvision: `OmniVideoProcessor` is accepted here instead."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and (argument is None or isinstance(argument, OmniVideoProcessor)):
            return OmniVideoProcessor
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


# transformers' `NemotronH_Omni_Reasoning_V3VideoProcessorInitKwargs`: the video processor's config fields
# (the functional form keeps the annotations real types, which transformers validates the call's kwargs with)
OmniVideoProcessorKwargs = TypedDict("OmniVideoProcessorKwargs", {
    **VideosKwargs.__annotations__, "norm_mean": Optional[List[float]], "norm_std": Optional[List[float]],
    "patch_size": int, "downsample_ratio": float, "video_target_num_patches": int,
    "video_maintain_aspect_ratio": bool, "temporal_patch_size": int}, total=False)


class OmniVideoProcessor(VideoProcessorMixin):
    """transformers' `NemotronH_Omni_Reasoning_V3VideoProcessor` in plain torch (see `load_processor` for
    why), configured by the same fields. transformers' own `VideoProcessorMixin.preprocess` runs the
    call (kwargs and their defaults, frame sampling, metadata); the torchvision-backed pieces of
    `BaseVideoProcessor` it calls are copied below (decoding / sampling, channels-first uint8 tensors,
    optional RGB conversion: grayscale repeated, transparency composited on white), and so is the
    Omni class's `_preprocess`: every frame of a video resized in float32 to one aspect-preserving tile
    near `video_target_num_patches` patches by torch's antialiased bicubic `interpolate` (not when
    already that size), `(x / 255 - norm_mean) / norm_std`, every `temporal_patch_size` frames packed
    into a tubelet (the last frame repeated to fill the last one). Output: `pixel_values_videos`
    `[videos, tubelets, T*3, H, W]`, `num_frames` (real frames per video) and, when asked
    (the processor does), `video_metadata` for the frame labels of its `replace_video_token`.
    Bit-identical to transformers' class (`tests/test_examples_video.py`, where torchvision imports).
    """

    valid_kwargs = OmniVideoProcessorKwargs
    model_input_names = ["pixel_values_videos"]

    norm_mean = None
    norm_std = None
    patch_size = 16
    downsample_ratio = 0.5
    video_target_num_patches = 1024
    video_maintain_aspect_ratio = True
    temporal_patch_size = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for key in self.valid_kwargs.__annotations__:  # every field an attribute, as transformers' backends set them
            if not hasattr(self, key):
                setattr(self, key, None)

    # ------------------------------------------------ BaseVideoProcessor's torchvision-backed steps
    def convert_to_rgb(self, video: torch.Tensor) -> torch.Tensor:
        from transformers.image_utils import ChannelDimension
        from transformers.video_utils import convert_to_rgb

        if video.shape[-3] == 1:  # torchvision's grayscale_to_rgb
            video = video.repeat(*[1] * (video.dim() - 3), 3, 1, 1)
        return convert_to_rgb(video, input_data_format=ChannelDimension.FIRST)

    def sample_frames(self, metadata, num_frames=None, fps=None, **kwargs):
        from transformers.video_utils import default_sample_indices_fn

        if fps is not None and num_frames is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
        num_frames = num_frames if num_frames is not None else self.num_frames
        fps = fps if fps is not None else self.fps
        return default_sample_indices_fn(metadata=metadata, num_frames=num_frames, fps=fps, **kwargs)

    def _decode_and_sample_videos(self, videos, video_metadata, do_sample_frames=None, sample_indices_fn=None):
        from transformers.video_utils import is_valid_video, make_batched_metadata, make_batched_videos

        videos = make_batched_videos(videos)
        video_metadata = make_batched_metadata(videos, video_metadata=video_metadata)
        if is_valid_video(videos[0]) and do_sample_frames:
            sampled_videos, sampled_metadata = [], []
            for video, metadata in zip(videos, video_metadata):
                indices = sample_indices_fn(metadata=metadata)
                metadata.frames_indices = indices
                sampled_videos.append(video[indices])
                sampled_metadata.append(metadata)
            videos, video_metadata = sampled_videos, sampled_metadata
        elif not is_valid_video(videos[0]):
            if isinstance(videos[0], list):
                raise ValueError("videos given as lists of image files are not supported here; pass the frames")
            videos, video_metadata = self.fetch_videos(videos, sample_indices_fn=sample_indices_fn)
        return videos, video_metadata

    def _prepare_input_videos(self, videos, do_convert_rgb=None, input_data_format=None, device=None):
        import numpy as np
        from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

        processed_videos = []
        for video in videos:
            if isinstance(video, np.ndarray):
                video = torch.from_numpy(video).contiguous()
            if input_data_format is None:
                input_data_format = infer_channel_dimension_format(video)
            if input_data_format == ChannelDimension.LAST:
                video = video.permute(0, 3, 1, 2).contiguous()
            if do_convert_rgb:
                video = self.convert_to_rgb(video)
            if device is not None:
                video = video.to(device)
            processed_videos.append(video)
        return processed_videos

    # ------------------------------------------------ NemotronH_Omni_Reasoning_V3VideoProcessor's own
    @property
    def _downsample_factor(self) -> int:
        return int(round(1.0 / self.downsample_ratio))

    def _compute_target_patches(self, height: int, width: int):
        """An aspect-preserving `(w_patches, h_patches)` tile near `video_target_num_patches` (verbatim)."""
        target = self.video_target_num_patches
        divisor = self._downsample_factor
        if self.video_maintain_aspect_ratio:
            aspect_wh = width / max(height, 1)
            ph = max(round(math.sqrt(target / aspect_wh)), 1)
            pw = max(round(math.sqrt(target * aspect_wh)), 1)
            if divisor > 1:
                rem_h = ph % divisor
                rem_w = pw % divisor
                ph_up = ph + (divisor - rem_h if rem_h else 0)
                ph_down = ph - rem_h
                pw_up = pw + (divisor - rem_w if rem_w else 0)
                pw_down = pw - rem_w
                if ph_up * pw_up <= target:
                    ph, pw = ph_up, pw_up
                else:
                    ph = max(divisor, ph_down)
                    pw = max(divisor, pw_down)
        else:
            side = int(math.sqrt(target))
            side = max(divisor, (side // divisor) * divisor)
            ph = pw = side
        return pw, ph

    def _preprocess(self, videos, temporal_patch_size=None, return_tensors=None, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.video_utils import group_videos_by_shape, reorder_videos

        temporal_patch_size = temporal_patch_size or self.temporal_patch_size
        norm_mean = torch.tensor(self.norm_mean).view(1, 3, 1, 1)
        norm_std = torch.tensor(self.norm_std).view(1, 3, 1, 1)
        # the frames of one video share a size: each group of equally shaped videos resizes in one call
        grouped_videos, grouped_videos_index = group_videos_by_shape(videos)
        resized_grouped = {}
        for shape, stacked_videos in grouped_videos.items():
            height, width = stacked_videos.shape[-2:]
            wp, hp = self._compute_target_patches(height, width)
            target_h, target_w = hp * self.patch_size, wp * self.patch_size
            num_videos, num_frames = stacked_videos.shape[:2]
            frames = stacked_videos.flatten(0, 1).to(dtype=torch.float32)
            if frames.shape[-2] != target_h or frames.shape[-1] != target_w:
                frames = torch.nn.functional.interpolate(
                    frames, size=(target_h, target_w), mode="bicubic", align_corners=False, antialias=True)
            frames = (frames / 255.0 - norm_mean) / norm_std
            resized_grouped[shape] = frames.view(num_videos, num_frames, *frames.shape[1:])
        resized_videos = reorder_videos(resized_grouped, grouped_videos_index)

        tubelets, frame_counts = [], []
        for video in resized_videos:
            frames, channels, height, width = video.shape
            if frames % temporal_patch_size:
                padding = video[-1:].expand(temporal_patch_size - frames % temporal_patch_size, -1, -1, -1)
                video = torch.cat([video, padding])
            tubelets.append(video.reshape(-1, temporal_patch_size * channels, height, width))
            frame_counts.append(frames)
        if len({video.shape for video in tubelets}) > 1:
            raise ValueError(
                "All videos of one call must have the same number of tubelets and frame size to be stacked, but got "
                f"{sorted({tuple(video.shape) for video in tubelets})}; process them separately.")
        return BatchFeature(data={"pixel_values_videos": torch.stack(tubelets), "num_frames": frame_counts},
                            tensor_type=return_tensors)
