"""Tiny NemotronH checkpoints built with transformers' own classes (random weights), for the
quick start, the examples and the tests. Never downloads anything."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

# Every layer kind, twice, so that layer indices and kinds both matter.
PATTERN = "M*-EM*E-"


def tiny_config(pattern: str = PATTERN, num_kv_heads: int = 2, vocab_size: int = 300, **overrides) -> NemotronHConfig:
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, layers_block_type=[
            {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}[c] for c in pattern],
        num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16, intermediate_size=96,
        mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16, chunk_size=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return NemotronHConfig(**kwargs)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, including the ones transformers initialises to constants
    (A_log, D, dt_bias, norms, the router correction bias), so a swapped mapping shows in logits."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t, std, mean=0.0):
        t.copy_((torch.randn(t.shape, generator=g) * std + mean).to(t.dtype))

    # persistent state only: non-persistent buffers (e.g. Parakeet's rotary inv_freq) are derived
    for name, p in model.state_dict(keep_vars=True).items():
        if name.endswith("A_log"):
            rnd(p, 0.5, 0.5)
        elif name.endswith(".D"):
            rnd(p, 1.0)
        elif name.endswith("dt_bias"):
            rnd(p, 0.5)
        elif name.endswith("e_score_correction_bias"):
            rnd(p, 0.3)
        elif "norm" in name:
            rnd(p, 0.1, 1.0)
        elif "conv1d" in name:
            rnd(p, 0.3)
        elif p.dtype.is_floating_point:
            rnd(p, 0.08)
    return model


def build_hf_model(config: Optional[NemotronHConfig] = None, seed: int = 0) -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(config or tiny_config()).eval()
    return randomize(model, seed)


def save_hf_model(model, path: Path, dtype: torch.dtype = torch.float32, max_shard_size: Optional[str] = None) -> Path:
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return Path(path)


# ------------------------------------------------------------------ Nemotron-Omni

IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN = 5, 6, 7
# The released checkpoint's placeholder ids (tests/data/nemotron-3-nano-omni-30b-a3b.config.json: image /
# video context token, audio token; its bos 1, eos 2 and pad 0 are the tiny text config's already).
# The video id lies past the vocab: video frames fill the image token.
RELEASED_IMAGE_TOKEN, RELEASED_VIDEO_TOKEN, RELEASED_AUDIO_TOKEN = 18, 131081, 27


def tiny_omni_config(has_sound: bool = True, scheme_text_pattern: str = "M*EM", released_token_ids: bool = False):
    """A tiny NemotronH_Omni_Reasoning_V3 config: every tower present, every width small.
    `released_token_ids`: the released checkpoint's placeholder ids (18 / 131081 / 27, inside the
    range random text is drawn from) instead of 5 / 6 / 7."""
    from transformers import NemotronH_Omni_Reasoning_V3_Config

    text = tiny_config(pattern=scheme_text_pattern).to_dict()
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=16,
                  max_img_size=32, num_cls_tokens=2, num_registers=2, video_temporal_patch_size=2,
                  summary_idxs=[0, 1])
    audio = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_mel_bins=16,
                 subsampling_conv_channels=8, projection_hidden_size=48, projection_bias=False,
                 dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, layerdrop=0.0)
    ids = ((RELEASED_IMAGE_TOKEN, RELEASED_VIDEO_TOKEN, RELEASED_AUDIO_TOKEN) if released_token_ids
           else (IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN))
    return NemotronH_Omni_Reasoning_V3_Config(
        text_config=text, vision_config=vision, audio_config=audio if has_sound else None,
        vision_hidden_size=32, projector_hidden_size=48, image_token_id=ids[0], video_token_id=ids[1],
        audio_token_id=ids[2], video_temporal_patch_size=2)


@torch.no_grad()
def build_hf_omni_model(config=None, seed: int = 0, input_conditioner: bool = True):
    """Random-weight Omni model. Layer scales stay 1 (megatron's ViT layer has none); the RADIO
    input conditioner (in the released checkpoint, unused by the forward) is re-attached so that
    `save_pretrained` writes it."""
    from transformers import NemotronH_Omni_Reasoning_V3

    torch.manual_seed(seed)
    model = NemotronH_Omni_Reasoning_V3(config or tiny_omni_config()).eval()
    scales = {n: p.clone() for n, p in model.named_parameters() if "layer_scale" in n}
    randomize(model, seed)
    for n, p in model.named_parameters():
        if n in scales:
            p.copy_(scales[n])
    if input_conditioner:
        model.vision_model.input_conditioner = _StoredInputConditioner(model.config.vision_config)
    return model


def _stored_input_conditioner_class():
    from transformers.models.radio.modeling_radio import RadioInputConditioner

    class StoredInputConditioner(RadioInputConditioner):
        """Holds the mean/std buffers (saved like the released checkpoint's) but, as in the Omni
        model where the processor normalises, leaves pixels unchanged."""

        def forward(self, pixel_values):
            return pixel_values

    return StoredInputConditioner


def _StoredInputConditioner(config):
    return _stored_input_conditioner_class()(config)


RELEASED_NAMES = {"text_config": "llm_config", "audio_config": "sound_config", "vision_hidden_size": "vit_hidden_size",
                  "image_token_id": "img_context_token_id", "video_token_id": "video_context_token_id",
                  "audio_token_id": "sound_context_token_id"}


def use_released_field_names(hf_dir: Path) -> None:
    """Rewrite an Omni config.json saved by transformers into the released checkpoint's naming
    (`llm_config` with `hybrid_override_pattern`, `sound_config`, `img_context_token_id`, ...)."""
    import json

    path = Path(hf_dir) / "config.json"
    cfg = json.loads(path.read_text())
    out = {RELEASED_NAMES.get(k, k): v for k, v in cfg.items()}
    text = out["llm_config"]
    symbols = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
    text["hybrid_override_pattern"] = "".join(symbols[t] for t in text.pop("layers_block_type"))
    path.write_text(json.dumps(out, indent=2))
