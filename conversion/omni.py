"""Name tables and config fields of the Nemotron-Omni parts around the language model.

HF names are the released checkpoint's (and what transformers' `save_pretrained` writes):
`vision_model.radio_model.*` (RADIO), `mlp1.*` (vision projector), `sound_encoder.encoder.*`
(Parakeet) and `sound_projection.*`. The language model's table is `conversion.nemotron_h` under
the `language_model.` prefix on both sides.

Three kinds of entries:
- `VISION_LAYER_RULES` / `VISION_RULES` / `PROJECTOR_RULES`: renames with a `Kind`, as for the LM;
- `SOUND_ENCODER_PREFIX`: the Megatron model holds transformers' own Parakeet module, so every HF
  tensor under the prefix keeps its name (replicated; batch-norm statistics and counters included);
- `CARRIED`: tensors the Megatron model computes nothing with but a bit-exact round trip must keep
  (RADIO's `summary_idxs`, input-conditioner mean/std, layer-scale vectors). They ride along as
  buffers of `hf_extras` (see `carried_megatron_name`).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

import torch

from conversion.errors import ConversionError
from conversion.nemotron_h import Rule
from conversion.transforms import Kind

VISION_HF = "vision_model.radio_model.model."
VISION_LAYER_RULES = (  # (megatron suffix under vision_model.decoder.layers.{i}., hf suffix under blocks.{i}., kind)
    ("self_attention.linear_qkv.layer_norm_weight", "norm1.weight", Kind.REPLICATED),
    ("self_attention.linear_qkv.layer_norm_bias", "norm1.bias", Kind.REPLICATED),
    ("self_attention.linear_qkv.weight", "attn.qkv.weight", Kind.PACKED_QKV),
    ("self_attention.linear_qkv.bias", "attn.qkv.bias", Kind.PACKED_QKV),
    ("self_attention.linear_proj.weight", "attn.proj.weight", Kind.ROW),
    ("self_attention.linear_proj.bias", "attn.proj.bias", Kind.REPLICATED),
    ("mlp.linear_fc1.layer_norm_weight", "norm2.weight", Kind.REPLICATED),
    ("mlp.linear_fc1.layer_norm_bias", "norm2.bias", Kind.REPLICATED),
    ("mlp.linear_fc1.weight", "mlp.fc1.weight", Kind.COLUMN),
    ("mlp.linear_fc1.bias", "mlp.fc1.bias", Kind.COLUMN),
    ("mlp.linear_fc2.weight", "mlp.fc2.weight", Kind.ROW),
    ("mlp.linear_fc2.bias", "mlp.fc2.bias", Kind.REPLICATED),
)
VISION_RULES = (
    ("vision_model.embedder.weight", VISION_HF + "patch_generator.embedder.weight", Kind.COLUMN),
    ("vision_model.position_embeddings", VISION_HF + "patch_generator.pos_embed", Kind.REPLICATED),
    ("vision_model.class_token", VISION_HF + "patch_generator.cls_token.token", Kind.REPLICATED),
)
VIDEO_EMBEDDER_RULE = ("vision_model.video_embedder.weight", VISION_HF + "patch_generator.video_embedder.weight", Kind.COLUMN)
PROJECTOR_RULES = {  # megatron module -> HF prefix: RMSNorm, fc1, fc2 (no biases)
    "vision_projection": ("mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"),
    "sound_projection": ("sound_projection.norm.weight", "sound_projection.linear1.weight",
                         "sound_projection.linear2.weight"),
}
SOUND_ENCODER_PREFIX = "sound_encoder.encoder."
CARRIED = re.compile(r"^vision_model\.radio_model\.(summary_idxs|input_conditioner\.norm_(mean|std)"
                     r"|model\.blocks\.\d+\.layer_scale[12]\.lambda1)$")


LAYER_SCALE = re.compile(r"\.layer_scale[12]\.lambda1$")


def check_layer_scale(hf_name: str, tensor: torch.Tensor) -> None:
    """megatron-core's ViT layer has no layer scale: a RADIO layer scale converts exactly only when it
    is all ones (it is then carried for the round trip); any other value is refused."""
    if not bool(torch.all(tensor == 1)):
        raise ConversionError(f"{hf_name}: RADIO layer scale must be all ones (the Megatron vision layer has no "
                              "layer scale); got other values")


def carried_megatron_name(hf_name: str) -> str:
    return "hf_extras." + hf_name.replace(".", "__")


def omni_rules(num_vision_layers: int, video_embedder: bool, has_sound: bool,
               carried: List[str]) -> List[Rule]:
    """Rules of everything but the language model and the sound encoder (see SOUND_ENCODER_PREFIX)."""
    rules = [Rule(m, (h,), k) for m, h, k in VISION_RULES]
    if video_embedder:
        megatron, hf, kind = VIDEO_EMBEDDER_RULE
        rules.append(Rule(megatron, (hf,), kind))
    for i in range(num_vision_layers):
        rules += [Rule(f"vision_model.decoder.layers.{i}.{m}", (f"{VISION_HF}blocks.{i}.{h}",), k)
                  for m, h, k in VISION_LAYER_RULES]
    for module, (norm, fc1, fc2) in PROJECTOR_RULES.items():
        if module == "sound_projection" and not has_sound:
            continue
        rules += [Rule(f"{module}.encoder.linear_fc1.layer_norm_weight", (norm,), Kind.REPLICATED),
                  Rule(f"{module}.encoder.linear_fc1.weight", (fc1,), Kind.COLUMN),
                  Rule(f"{module}.encoder.linear_fc2.weight", (fc2,), Kind.ROW)]
    rules += [Rule(carried_megatron_name(n), (n,), Kind.REPLICATED) for n in carried]
    return rules


# ------------------------------------------------------------------ config.json <-> provider fields

# (top-level field in transformers' naming, released naming, provider field)
TOP_FIELDS = (
    ("image_token_id", "img_context_token_id", "image_token_index"),
    ("audio_token_id", "sound_context_token_id", "sound_context_token_id"),
    ("vision_hidden_size", "vit_hidden_size", "vision_hidden_size"),
    ("projector_hidden_size", "projector_hidden_size", "vision_proj_ffn_hidden_size"),
    ("video_temporal_patch_size", "video_temporal_patch_size", "temporal_patch_dim"),
    ("video_pruning_rate", "video_pruning_rate", "video_pruning_rate"),
    ("downsample_ratio", "downsample_ratio", "downsample_ratio"),
)
VISION_FIELDS = (  # (vision_config field, provider field)
    ("num_hidden_layers", "vision_num_layers"),
    ("num_attention_heads", "vision_num_attention_heads"),
    ("patch_size", "vision_patch_dim"),
    ("max_img_size", "vision_max_img_size"),
    ("layer_norm_eps", "vision_layernorm_epsilon"),
)
VISION_SUPPORTED = (("hidden_act", "gelu"), ("use_swiglu_ffn", False), ("qkv_bias", True), ("num_channels", 3),
                    # training-time regularisation megatron's ViT layer does not have / is not given
                    ("drop_path_rate", 0.0), ("attention_probs_dropout_prob", 0.0))


def omni_provider_fields(raw: Dict[str, Any], scheme: str, where: str) -> Dict[str, Any]:
    """Provider fields of the non-LM parts from an Omni config.json (either naming)."""
    fields: Dict[str, Any] = {}
    col = 0 if scheme == "transformers" else 1
    for names in TOP_FIELDS:
        if raw.get(names[col]) is not None:
            fields[names[2]] = raw[names[col]]
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise ConversionError(f"{where}: missing required field 'vision_config'")
    for field, expected in VISION_SUPPORTED:
        if field in vision and vision[field] != expected:
            raise ConversionError(f"{where}: vision_config.{field} = {vision[field]!r} is not supported (expected {expected!r})")
    fields["vision_num_layers"] = 32  # transformers' RadioConfig default, unless the config says
    for hf_name, provider_name in VISION_FIELDS:
        if vision.get(hf_name) is not None:
            fields[provider_name] = vision[hf_name]
    hidden = vision.get("hidden_size", fields.get("vision_hidden_size"))
    if hidden is None:
        raise ConversionError(f"{where}: missing required field 'vision_config.hidden_size'")
    fields["vision_hidden_size"] = hidden
    fields["vision_ffn_hidden_size"] = int(hidden * vision.get("mlp_ratio", 4.0))
    fields["vision_class_token_len"] = vision.get("num_cls_tokens", 3) + vision.get("num_registers", 7)
    temporal = vision.get("video_temporal_patch_size") or fields.get("temporal_patch_dim") or 1
    fields["temporal_patch_dim"] = temporal
    fields["separate_video_embedder"] = vision.get("video_temporal_patch_size") is not None
    fields["dynamic_resolution"] = True  # the processor emits packed patches of any grid (image_grid_hw)
    if fields.get("downsample_ratio", 0.5) != 0.5:
        raise ConversionError(f"{where}: downsample_ratio = {fields['downsample_ratio']} is not supported (expected 0.5)")
    sound = raw.get("audio_config" if scheme == "transformers" else "sound_config")
    fields["has_sound"] = sound is not None
    if sound is not None:
        fields["sound_config"] = dict(sound)
        fields["sound_hidden_size"] = sound.get("hidden_size", 1024)
        fields["sound_projection_hidden_size"] = sound.get("projection_hidden_size", 4096)
        if sound.get("projection_bias"):
            raise ConversionError(f"{where}: sound projection_bias = true is not supported (expected false)")
    return fields


def export_omni_config(raw: Dict[str, Any], scheme: str, fields: Dict[str, Any]) -> Dict[str, Any]:
    """Write provider values back into a copy of the source Omni config (same naming)."""
    import copy

    out = copy.deepcopy(raw)
    col = 0 if scheme == "transformers" else 1
    for names in TOP_FIELDS:
        if names[2] in fields and (names[col] in out or fields[names[2]] is not None):
            out[names[col]] = fields[names[2]]
    vision = out["vision_config"]
    for hf_name, provider_name in VISION_FIELDS:
        if provider_name in fields:
            vision[hf_name] = fields[provider_name]
    vision["hidden_size"] = fields["vision_hidden_size"]
    return out
