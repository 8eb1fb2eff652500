"""The Nemotron-Omni model in megatron-core: RADIO vision + projector, Parakeet sound + projector,
NemotronH language model — LLaVA-style (multimodal embeddings replace placeholder tokens).

- `RadioVisionModel`: megatron-core's `RADIOViTModel` (its embedder, position embeddings, class +
  register tokens and `TransformerBlock`) plus what Nemotron-Omni uses on top: a separate video
  embedder for frames packed `temporal_patch_dim` at a time, and images of different grids in one
  call (dynamic resolution: each image attends only to itself). Position embeddings follow the
  reference's eval-mode CPE: interpolate the stored grid to a square of the larger side, crop,
  interpolate again if the crop is not the grid.
- `SoundEncoder`: megatron-core has no Parakeet / FastConformer encoder, so the Megatron model holds
  transformers' own `ParakeetEncoder` module (weights under `sound_encoder.encoder.*`, exactly the
  released checkpoint's names).
- projectors: megatron-core `MultimodalProjector` MLPs with the RMSNorm fused into `linear_fc1`.
- `NemotronOmniModel.forward` takes the processor-format inputs of transformers'
  `NemotronH_Omni_Reasoning_V3.forward`.
The encoders and projectors exist only on the first pipeline stage (`pre_process`).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.models.vision.radio import RADIOViTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule


class RadioVisionModel(RADIOViTModel):
    """RADIO ViT with a video embedder and per-image (dynamic-resolution) forward."""

    def __init__(self, config, layer_spec, *, patch_dim: int, max_img_size: int, class_token_len: int,
                 temporal_patch_dim: int = 1, separate_video_embedder: bool = False):
        # megatron's RADIO asserts img_h % patch_dim == 0 (img_h/img_w only set its default grid);
        # its position-embedding grid is max_img_size // patch_dim, as transformers' (e.g. 2048 // 14).
        img = max_img_size // patch_dim * patch_dim
        super().__init__(
            config, layer_spec, add_class_token=True, class_token_len=class_token_len, patch_dim=patch_dim,
            img_h=img, img_w=img, max_img_h=max_img_size, max_img_w=max_img_size,
            has_cpe=True, embedder_bias=False,
        )
        self.temporal_patch_dim = temporal_patch_dim
        self.video_embedder = None
        if separate_video_embedder:
            self.video_embedder = ColumnParallelLinear(
                3 * temporal_patch_dim * patch_dim * patch_dim, config.hidden_size, bias=False,
                config=config, gather_output=True, init_method=config.init_method)

    def _position_embedding(self, rows: int, cols: int, dtype) -> torch.Tensor:
        pos = self.position_embeddings.reshape(1, self.max_num_rows, self.max_num_cols, -1).permute(0, 3, 1, 2)
        side = max(rows, cols)
        pos = F.interpolate(pos.float(), size=(side, side), mode="bilinear", align_corners=False).to(dtype)
        pos = pos[..., :rows, :cols]
        if pos.shape[-2:] != (rows, cols):
            pos = F.interpolate(pos.float(), size=(rows, cols), mode="bilinear", align_corners=False).to(dtype)
        return pos.flatten(2).transpose(1, 2)  # [1, rows*cols, hidden]

    def _encode(self, patches: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[n, rows*cols, hidden] embedded patches -> [n, rows*cols, hidden] features (prefix dropped)."""
        x = patches + self._position_embedding(rows, cols, patches.dtype)
        x = torch.cat([self.class_token.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)
        x = self.decoder(x.transpose(0, 1).contiguous(), attention_mask=None)
        return x.transpose(0, 1)[:, self.class_token_len:]

    def forward_images(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> List[torch.Tensor]:
        """Flattened patches of several images (`[total_patches, 3*p*p]`) -> features per image."""
        embedded, _ = self.embedder(pixel_values.to(self.embedder.weight.dtype))
        out = []
        for (rows, cols), patches in zip(image_grid_hw.tolist(), embedded.split(image_grid_hw.prod(-1).tolist())):
            out.append(self._encode(patches.unsqueeze(0), rows, cols)[0])
        return out

    def forward_video(self, tubelets: torch.Tensor) -> torch.Tensor:
        """`[tubelets, T*3, H, W]` (T = temporal_patch_dim consecutive frames stacked along channels)
        -> `[tubelets, (H/p)*(W/p), hidden]`."""
        n, c, h, w = tubelets.shape
        p = self.patch_dim
        rows, cols = h // p, w // p
        patches = tubelets.to(self.embedder.weight.dtype).reshape(n, c, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, rows * cols, c * p * p)
        embedder = self.video_embedder if self.video_embedder is not None else self.embedder
        embedded, _ = embedder(patches)
        return self._encode(embedded, rows, cols)


def video_tubelets(pixel_values_videos: torch.Tensor, temporal_patch_dim: int, num_frames=None) -> torch.Tensor:
    """The video input in transformers' current format, `[videos, tubelets, T*3, H, W]`.

    Accepted: that format (what transformers >= 5.24's video processor returns, with `num_frames`,
    the real frame count of each video before its last tubelet was filled), or the frames of one
    video, `[frames, 3, H, W]` (the format of transformers 5.23, deprecated there and announced for
    removal in 5.28), packed here exactly as transformers packs them: the last frame repeats to fill
    the last tubelet."""
    t = temporal_patch_dim
    if pixel_values_videos.dim() == 4:
        frames = pixel_values_videos
        if frames.shape[1] != 3:
            raise ValueError(f"pixel_values_videos: frames [frames, 3, H, W] expected, got {tuple(frames.shape)}")
        if frames.shape[0] % t:
            frames = torch.cat([frames, frames[-1:].expand(t - frames.shape[0] % t, -1, -1, -1)])
        tubelets = frames.reshape(1, -1, t * 3, *frames.shape[-2:])
    elif pixel_values_videos.dim() == 5:
        tubelets = pixel_values_videos
        if tubelets.shape[2] != t * 3:
            raise ValueError(f"pixel_values_videos: tubelets [videos, tubelets, {t}*3, H, W] expected (temporal patch "
                             f"size {t}), got {tuple(tubelets.shape)}")
    else:
        raise ValueError("pixel_values_videos: expected [videos, tubelets, T*3, H, W] (transformers' video processor) "
                         f"or the [frames, 3, H, W] frames of one video, got {tuple(pixel_values_videos.shape)}")
    if num_frames is not None:
        counts = [int(n) for n in (num_frames.tolist() if isinstance(num_frames, torch.Tensor) else num_frames)]
        if len(counts) != tubelets.shape[0] or any(-(-n // t) != tubelets.shape[1] for n in counts):
            raise ValueError(f"num_frames {counts} does not match pixel_values_videos {tuple(tubelets.shape)}: "
                             f"each video of {tubelets.shape[1]} tubelets of {t} frames holds "
                             f"{(tubelets.shape[1] - 1) * t + 1}..{tubelets.shape[1] * t} frames")
    return tubelets


def pixel_shuffle(features: torch.Tensor, rows: int, cols: int, scale: float = 0.5) -> torch.Tensor:
    """[n, rows*cols, C] -> [n, rows*cols*scale^2, C/scale^2]: the reference's 2x2 space-to-depth."""
    n = features.shape[0]
    x = features.reshape(n, rows, cols, -1)
    x = x.reshape(n, rows, int(cols * scale), int(x.shape[-1] / scale)).transpose(1, 2).contiguous()
    x = x.reshape(n, int(cols * scale), int(rows * scale), int(x.shape[-1] / scale)).transpose(1, 2).contiguous()
    return x.reshape(n, -1, x.shape[-1])


def evs_retention_mask(video: torch.Tensor, num_tubelets: int, pruning_rate: float) -> torch.Tensor:
    """Efficient Video Sampling: which of one video's `num_tubelets * tokens` tokens to keep.

    A token's score is its dissimilarity (1 - cosine similarity) to the same position in the
    previous tubelet; the first tubelet always stays (score 255). The `max(one tubelet,
    num_tubelets*tokens*(1-rate))` highest-scoring tokens are kept (stable order on ties)."""
    x = video.reshape(num_tubelets, -1, video.shape[-1])
    dissimilarity = 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(x[:1, :, 0]), dissimilarity]).reshape(-1)
    keep_count = max(x.shape[1], int(num_tubelets * x.shape[1] * (1 - pruning_rate)))
    order = torch.argsort(dissimilarity, descending=True, stable=True)[:keep_count]
    keep = torch.zeros_like(dissimilarity, dtype=torch.bool)
    keep[order] = True
    return keep


class SoundEncoder(MegatronModule):
    """transformers' Parakeet (FastConformer) encoder, held as `.encoder` (made from the HF
    `sound_config`, or given: the conversion's structure-only stand-in, see
    `NemotronOmniModelProvider.sound_encoder_structure`)."""

    def __init__(self, config, sound_config):
        super().__init__(config=config)
        if isinstance(sound_config, torch.nn.Module):
            self.encoder = sound_config
            return
        from transformers import ParakeetEncoder, ParakeetEncoderConfig

        cfg = {k: v for k, v in sound_config.items() if k != "model_type"}
        cfg = {"attention_bias": False, "scale_input": False, **cfg}
        self.encoder = ParakeetEncoder(ParakeetEncoderConfig(**cfg)).to(config.params_dtype)

    def forward(self, input_features: torch.Tensor, input_features_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Mel features of padded clips -> one row per real (subsampled) frame, clips concatenated."""
        dtype = next(self.encoder.parameters()).dtype
        hidden = self.encoder(input_features=input_features.to(dtype), attention_mask=input_features_mask,
                              return_dict=True).last_hidden_state
        if input_features_mask is None:
            return hidden.reshape(-1, hidden.shape[-1]).to(self.config.params_dtype)
        lengths = self.encoder._get_subsampling_output_length(input_features_mask.sum(-1) + 1)
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None].to(hidden.device)
        return hidden[keep].to(self.config.params_dtype)


def scatter_features(embeddings: torch.Tensor, input_ids: torch.Tensor, token_id: int,
                     features: torch.Tensor, what: str) -> torch.Tensor:
    """Put `features` rows on the placeholder positions (`input_ids == token_id`), in order.

    `embeddings` is megatron's [seq, batch, hidden]; positions are taken batch-major like the
    reference's `masked_scatter` on [batch, seq, hidden]."""
    mask = (input_ids == token_id).transpose(0, 1)  # [seq, batch]
    count = int(mask.sum())
    if count != features.shape[0]:
        raise ValueError(f"{what}: got {features.shape[0]} feature vectors for {count} placeholder tokens (id {token_id})")
    out = embeddings.transpose(0, 1).clone()  # [batch, seq, hidden]
    out[mask.transpose(0, 1)] = features.to(out.dtype)
    return out.transpose(0, 1).contiguous()


class NemotronOmniModel(MegatronModule):
    """RADIO + projector, optional Parakeet + projector, and the NemotronH `MambaModel`."""

    def __init__(self, config, language_model, *, vision_model=None, vision_projection=None,
                 sound_encoder=None, sound_projection=None, hf_extras=None, image_token_index: int = 0,
                 sound_context_token_id: int = 0, downsample_ratio: float = 0.5,
                 video_pruning_rate: float = 0.0):
        super().__init__(config=config)
        self.language_model = language_model
        self.vision_model = vision_model
        self.vision_projection = vision_projection
        self.sound_encoder = sound_encoder
        self.sound_projection = sound_projection
        self.hf_extras = hf_extras  # carried HF tensors (buffers), see conversion/omni.py
        self.image_token_index = image_token_index
        self.sound_context_token_id = sound_context_token_id
        self.downsample_ratio = downsample_ratio
        self.video_pruning_rate = video_pruning_rate
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules

    # megatron's finalize_model_grads asks the outer model about the (tied) embedding, as LLaVAModel has.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    # ------------------------------------------------------------------ encoders
    def image_embeddings(self, pixel_values, image_grid_hw) -> torch.Tensor:
        feats = self.vision_model.forward_images(pixel_values, image_grid_hw)
        shuffled = [pixel_shuffle(f.unsqueeze(0), r, c, self.downsample_ratio)[0]
                    for f, (r, c) in zip(feats, image_grid_hw.tolist())]
        return self.vision_projection(torch.cat(shuffled))

    def video_embeddings(self, pixel_values_videos, num_frames=None):
        """Projected video tokens `[videos*tubelets*tokens, hidden]` (video by video, tubelet by
        tubelet, then positions) and the keep-mask of Efficient Video Sampling, computed per video
        (None when `video_pruning_rate` is 0)."""
        tubelets = video_tubelets(pixel_values_videos, self.vision_model.temporal_patch_dim, num_frames)
        videos, per_video = tubelets.shape[:2]
        feats = self.vision_model.forward_video(tubelets.flatten(0, 1))
        p = self.vision_model.patch_dim
        rows, cols = tubelets.shape[-2] // p, tubelets.shape[-1] // p
        projected = self.vision_projection(pixel_shuffle(feats, rows, cols, self.downsample_ratio))
        video = projected.reshape(videos, -1, projected.shape[-1])
        keep = None
        if self.video_pruning_rate > 0:
            keep = torch.cat([evs_retention_mask(v, per_video, self.video_pruning_rate) for v in video])
        return video.reshape(-1, video.shape[-1]), keep

    def sound_embeddings(self, input_features, input_features_mask) -> torch.Tensor:
        return self.sound_projection(self.sound_encoder(input_features, input_features_mask))

    @staticmethod
    def _prune(keep, embeddings, input_ids, labels):
        """Drop the tokens EVS pruned; every row must keep as many (as transformers requires)."""
        kept = keep.sum(-1)
        if bool((kept != kept[0]).any()):
            raise ValueError(f"Efficient Video Sampling keeps {kept.tolist()} tokens in the rows of the batch; "
                             "the rows must keep equally many (one video prompt per batch, as transformers)")
        b = input_ids.shape[0]
        embeddings = embeddings.transpose(0, 1)[keep].reshape(b, -1, embeddings.shape[-1]).transpose(0, 1)
        labels = labels[keep].reshape(b, -1) if labels is not None else None
        return embeddings.contiguous(), input_ids[keep].reshape(b, -1), labels

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, *, pixel_values=None, image_grid_hw=None,
                pixel_values_videos=None, num_frames=None, input_features=None, input_features_mask=None,
                labels=None, loss_mask=None, packed_seq_params=None, **kwargs):
        """Logits `[batch, seq, padded_vocab]`, or per-token losses when `labels` are given (the
        training loop applies `loss_mask`, as with megatron's GPT/Mamba models)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        decoder_input = None
        if self.pre_process:
            embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
            visual, video_keep = [], None
            if pixel_values is not None:
                if self.vision_model is None:
                    raise ValueError("pixel_values given but this model has no vision encoder")
                visual.append(self.image_embeddings(pixel_values, image_grid_hw))
            if pixel_values_videos is not None:
                if self.vision_model is None:
                    raise ValueError("pixel_values_videos given but this model has no vision encoder")
                video, video_keep = self.video_embeddings(pixel_values_videos, num_frames)
                visual.append(video)
            if visual:  # images and video frames both use the image token, in that order
                embeddings = scatter_features(embeddings, input_ids, self.image_token_index,
                                              torch.cat(visual), "image/video")
            if input_features is not None:
                if self.sound_encoder is None:
                    raise ValueError("input_features given but this model has no sound encoder (has_sound=False)")
                embeddings = scatter_features(embeddings, input_ids, self.sound_context_token_id,
                                              self.sound_embeddings(input_features, input_features_mask), "audio")
            if video_keep is not None:  # EVS: drop the pruned video tokens from the sequence
                keep = torch.ones_like(input_ids, dtype=torch.bool)
                placeholders = (input_ids == self.image_token_index).nonzero()
                keep[tuple(placeholders[len(placeholders) - len(video_keep):].T)] = video_keep
                embeddings, input_ids, labels = self._prune(keep, embeddings, input_ids, labels)
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
            if self.config.sequence_parallel:  # merged on the full sequence, then split across TP
                embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
            decoder_input = embeddings
        return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, packed_seq_params=packed_seq_params)
