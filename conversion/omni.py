"""Name tables and config fields of the Nemotron-Omni parts around the language model.

HF names are the released checkpoint's (and what transformers' `save_pretrained` writes):
`vision_model.radio_model.*` (RADIO), `mlp1.*` (vision projector), `sound_encoder.encoder.*`
(Parakeet) and `sound_projection.*`. The language model's table is `conversion.nemotron_h` under
the `language_model.` prefix on both sides.

Three kinds of entries, all made from the config by `omni_mappings`:
- `VISION_LAYER_RULES` / `VISION_RULES` / `PROJECTOR_RULES`: renames with a kind and a shape formula,
  as for the LM;
- `parakeet_mappings`: the Megatron model holds transformers' own Parakeet module, so every tensor of
  that module built from the config keeps its name (replicated; batch-norm statistics and counters
  included);
- `CARRIED_RULES` / `LAYER_SCALE_RULE`: tensors the Megatron model computes nothing with but a
  bit-exact round trip must keep (RADIO's `summary_idxs`, input-conditioner mean/std, layer-scale
  vectors). They ride along as buffers of `hf_extras` (see `carried_megatron_name`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Collection, Dict, List, Optional

import torch

from conversion.errors import ConversionError
from conversion.mappings import Kind, Mapping, config_shape
from conversion.naming import CARRIED_PREFIX

VISION_HF = "vision_model.radio_model.model."
H, F = "vision_hidden_size", "vision_ffn_hidden_size"
# (megatron suffix under vision_model.decoder.layers.{i}., hf suffix under blocks.{i}., HF shape formula, kind);
# the formulas are over the provider fields of `omni_provider_fields` (see `omni_mappings`).
VISION_LAYER_RULES = (
    ("self_attention.linear_qkv.layer_norm_weight", "norm1.weight", H, Kind.REPLICATED),
    ("self_attention.linear_qkv.layer_norm_bias", "norm1.bias", H, Kind.REPLICATED),
    ("self_attention.linear_qkv.weight", "attn.qkv.weight", f"3*{H}, {H}", Kind.PACKED_QKV),
    ("self_attention.linear_qkv.bias", "attn.qkv.bias", f"3*{H}", Kind.PACKED_QKV),
    ("self_attention.linear_proj.weight", "attn.proj.weight", f"{H}, {H}", Kind.ROW),
    ("self_attention.linear_proj.bias", "attn.proj.bias", H, Kind.REPLICATED),
    ("mlp.linear_fc1.layer_norm_weight", "norm2.weight", H, Kind.REPLICATED),
    ("mlp.linear_fc1.layer_norm_bias", "norm2.bias", H, Kind.REPLICATED),
    ("mlp.linear_fc1.weight", "mlp.fc1.weight", f"{F}, {H}", Kind.COLUMN),
    ("mlp.linear_fc1.bias", "mlp.fc1.bias", F, Kind.COLUMN),
    ("mlp.linear_fc2.weight", "mlp.fc2.weight", f"{H}, {F}", Kind.ROW),
    ("mlp.linear_fc2.bias", "mlp.fc2.bias", H, Kind.REPLICATED),
)
VISION_RULES = (
    ("vision_model.embedder.weight", VISION_HF + "patch_generator.embedder.weight",
     f"{H}, 3*vision_patch_dim*vision_patch_dim", Kind.COLUMN),
    ("vision_model.position_embeddings", VISION_HF + "patch_generator.pos_embed",
     f"1, (vision_max_img_size//vision_patch_dim)**2, {H}", Kind.REPLICATED),
    ("vision_model.class_token", VISION_HF + "patch_generator.cls_token.token", f"vision_class_token_len, {H}",
     Kind.REPLICATED),
)
VIDEO_EMBEDDER_RULE = ("vision_model.video_embedder.weight", VISION_HF + "patch_generator.video_embedder.weight",
                       f"{H}, temporal_patch_dim*3*vision_patch_dim*vision_patch_dim", Kind.COLUMN)
# megatron module -> (HF name, formula) of its RMSNorm, fc1, fc2 (no biases); the vision projector
# sees the pixel-shuffled features (downsample_ratio 0.5: 4 patches' features side by side).
PROJECTOR_RULES = {
    "vision_projection": (("mlp1.0.weight", f"4*{H}"), ("mlp1.1.weight", f"vision_proj_ffn_hidden_size, 4*{H}"),
                          ("mlp1.3.weight", "hidden_size, vision_proj_ffn_hidden_size")),
    "sound_projection": (("sound_projection.norm.weight", "sound_hidden_size"),
                         ("sound_projection.linear1.weight", "sound_projection_hidden_size, sound_hidden_size"),
                         ("sound_projection.linear2.weight", "hidden_size, sound_projection_hidden_size")),
}
SOUND_ENCODER_PREFIX = "sound_encoder.encoder."
# (HF name, formula, integer, optional): tensors the Megatron model computes nothing with, carried
# for the round trip. Optional ones are present in the export exactly when the source has them:
# transformers' RadioModel lists the layer scales in `_keys_to_ignore_on_load_missing` (C-RADIO has
# none), and its Omni model makes the input conditioner external (the processor normalises), so
# `save_pretrained` writes no mean / std while the released checkpoint stores them.
CARRIED_RULES = (
    ("vision_model.radio_model.summary_idxs", "num_summary_idxs", True, False),
    ("vision_model.radio_model.input_conditioner.norm_mean", "3, 1, 1", False, True),
    ("vision_model.radio_model.input_conditioner.norm_std", "3, 1, 1", False, True),
)
LAYER_SCALE_RULE = (VISION_HF + "blocks.{i}.layer_scale{j}.lambda1", H, False, True)


LAYER_SCALE = re.compile(r"\.layer_scale[12]\.lambda1$")


def check_layer_scale(hf_name: str, tensor: torch.Tensor) -> None:
    """megatron-core's ViT layer has no layer scale: a RADIO layer scale converts exactly only when it
    is all ones (it is then carried for the round trip); any other value is refused."""
    if not bool(torch.all(tensor == 1)):
        raise ConversionError(f"{hf_name}: RADIO layer scale must be all ones (the Megatron vision layer has no "
                              "layer scale); got other values")




def carried_megatron_name(hf_name: str) -> str:
    return CARRIED_PREFIX + hf_name.replace(".", "__")


def omni_mappings(raw: Dict[str, Any], fields: Dict[str, Any], text_hidden_size: int,
                  present: Optional[Collection[str]] = None) -> List[Mapping]:
    """Mappings of everything but the language model, from the Omni config.json `raw` and its
    provider fields (`omni_provider_fields`). `present`: the source's HF tensor names, which decide
    only whether the optional tensors (RADIO layer scales) are there; None: they are not."""
    summary_idxs = raw["vision_config"].get("summary_idxs") or [0, 1]  # RadioConfig's default
    values = {**fields, "hidden_size": text_hidden_size, "num_summary_idxs": len(summary_idxs)}

    def mapping(megatron, hf, formula, kind, integer=False):
        return Mapping(megatron, (hf,), kind, ((config_shape(formula, values), formula),), integer=integer)

    out = [mapping(*rule) for rule in VISION_RULES]
    if fields["separate_video_embedder"]:
        out.append(mapping(*VIDEO_EMBEDDER_RULE))
    for i in range(fields["vision_num_layers"]):
        out += [mapping(f"vision_model.decoder.layers.{i}.{m}", f"{VISION_HF}blocks.{i}.{h}", f, k)
                for m, h, f, k in VISION_LAYER_RULES]
    for module, (norm, fc1, fc2) in PROJECTOR_RULES.items():
        if module == "sound_projection" and not fields["has_sound"]:
            continue
        out += [mapping(f"{module}.encoder.linear_fc1.layer_norm_weight", *norm, Kind.REPLICATED),
                mapping(f"{module}.encoder.linear_fc1.weight", *fc1, Kind.COLUMN),
                mapping(f"{module}.encoder.linear_fc2.weight", *fc2, Kind.ROW)]
    layer_scales = [(LAYER_SCALE_RULE[0].format(i=i, j=j), *LAYER_SCALE_RULE[1:])
                    for i in range(fields["vision_num_layers"]) for j in (1, 2)]
    for name, formula, integer, optional in (*CARRIED_RULES, *layer_scales):
        if not optional or (present is not None and name in present):
            out.append(mapping(carried_megatron_name(name), name, formula, Kind.REPLICATED, integer))
    if fields["has_sound"]:
        out += parakeet_mappings(fields["sound_config"])
    return out


# transformers' ParakeetEncoderConfig defaults, for fields an audio config leaves out
PARAKEET_DEFAULTS = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 8, "intermediate_size": 4096,
                     "attention_bias": True, "convolution_bias": True, "conv_kernel_size": 9, "subsampling_factor": 8,
                     "subsampling_conv_channels": 256, "num_mel_bins": 80, "subsampling_conv_kernel_size": 3,
                     "subsampling_conv_stride": 2}
# transformers' ParakeetEncoder, as (name, formula, condition): its subsampling stem (a strided conv,
# then a depthwise + pointwise pair per further halving, then a linear), then per layer (`layers.{l}.`);
# biases exist when the config's flag says. Formulas are over the audio config's fields plus
# `head_dim` and `mel_out` (the mel bins left after the stem).
PARAKEET_STEM = (
    ("subsampling.layers.0.weight", "subsampling_conv_channels, 1, subsampling_conv_kernel_size, "
                                    "subsampling_conv_kernel_size"),
    ("subsampling.layers.0.bias", "subsampling_conv_channels"),
)
PARAKEET_HALVING = (  # layers {dw} (depthwise) and {pw} (pointwise) of each further halving
    ("subsampling.layers.{dw}.weight", "subsampling_conv_channels, 1, subsampling_conv_kernel_size, "
                                       "subsampling_conv_kernel_size"),
    ("subsampling.layers.{dw}.bias", "subsampling_conv_channels"),
    ("subsampling.layers.{pw}.weight", "subsampling_conv_channels, subsampling_conv_channels, 1, 1"),
    ("subsampling.layers.{pw}.bias", "subsampling_conv_channels"),
)
PARAKEET_LINEAR = (("subsampling.linear.weight", "hidden_size, subsampling_conv_channels*mel_out"),
                   ("subsampling.linear.bias", "hidden_size"))
FEED_FORWARD = (("linear1.weight", "intermediate_size, hidden_size", None),
                ("linear1.bias", "intermediate_size", "attention_bias"),
                ("linear2.weight", "hidden_size, intermediate_size", None),
                ("linear2.bias", "hidden_size", "attention_bias"))
PARAKEET_LAYER = tuple(
    [(f"feed_forward1.{n}", f, flag) for n, f, flag in FEED_FORWARD]
    + [("self_attn.bias_u", "num_attention_heads, head_dim", None),
       ("self_attn.bias_v", "num_attention_heads, head_dim", None)]
    + [(f"self_attn.{p}_proj.{w}", f, "attention_bias" if w == "bias" else None)
       for p in ("q", "k", "v") for w, f in (("weight", "num_attention_heads*head_dim, hidden_size"),
                                              ("bias", "num_attention_heads*head_dim"))]
    + [("self_attn.o_proj.weight", "hidden_size, num_attention_heads*head_dim", None),
       ("self_attn.o_proj.bias", "hidden_size", "attention_bias"),
       ("self_attn.relative_k_proj.weight", "num_attention_heads*head_dim, hidden_size", None),
       ("conv.pointwise_conv1.weight", "2*hidden_size, hidden_size, 1", None),
       ("conv.pointwise_conv1.bias", "2*hidden_size", "convolution_bias"),
       ("conv.depthwise_conv.weight", "hidden_size, 1, conv_kernel_size", None),
       ("conv.depthwise_conv.bias", "hidden_size", "convolution_bias")]
    + [(f"conv.norm.{b}", "hidden_size", None) for b in ("weight", "bias", "running_mean", "running_var")]
    + [("conv.norm.num_batches_tracked", "", None),  # a scalar int64 counter
       ("conv.pointwise_conv2.weight", "hidden_size, hidden_size, 1", None),
       ("conv.pointwise_conv2.bias", "hidden_size", "convolution_bias")]
    + [(f"feed_forward2.{n}", f, flag) for n, f, flag in FEED_FORWARD]
    + [(f"{norm}.{w}", "hidden_size", None) for norm in ("norm_feed_forward1", "norm_self_att", "norm_conv",
                                                        "norm_feed_forward2", "norm_out") for w in ("weight", "bias")]
)


def parakeet_mappings(sound_config: Dict[str, Any]) -> List[Mapping]:
    """The Megatron model holds transformers' own `ParakeetEncoder`, so each of its tensors keeps its
    name on both sides (replicated). Names and shapes from the audio config (checked against
    transformers' module in tests/test_hostile_inputs.py), without importing transformers."""
    values = {**PARAKEET_DEFAULTS, **{k: v for k, v in sound_config.items() if v is not None}}
    halvings = int(math.log2(values["subsampling_factor"]))
    values["head_dim"] = values.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
    values["mel_out"] = values["num_mel_bins"] // values["subsampling_conv_stride"] ** halvings
    names = list(PARAKEET_STEM)
    for i in range(halvings - 1):
        names += [(n.format(dw=2 + 3 * i, pw=3 + 3 * i), f) for n, f in PARAKEET_HALVING]
    names += PARAKEET_LINEAR
    for layer in range(values["num_hidden_layers"]):
        names += [(f"layers.{layer}.{n}", f) for n, f, flag in PARAKEET_LAYER if flag is None or values[flag]]
    return [Mapping(SOUND_ENCODER_PREFIX + n, (SOUND_ENCODER_PREFIX + n,), Kind.REPLICATED,
                    ((config_shape(f, values), f),), integer=n.endswith("num_batches_tracked"))
            for n, f in names]


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
RADIO_DEFAULTS = {"num_hidden_layers": 32, "patch_size": 16, "max_img_size": 2048}  # transformers' RadioConfig
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
    # transformers' defaults (RadioConfig, the Omni config) where the config is silent: the provider's
    # own defaults are the release's sizes, which a config that omits them does not mean
    fields.update({provider: RADIO_DEFAULTS[hf] for hf, provider in VISION_FIELDS if hf in RADIO_DEFAULTS})
    fields.setdefault("vision_proj_ffn_hidden_size", 4096)
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
        if provider_name in fields and (hf_name in vision or fields[provider_name] != RADIO_DEFAULTS.get(hf_name)):
            vision[hf_name] = fields[provider_name]
    vision["hidden_size"] = fields["vision_hidden_size"]
    return out
