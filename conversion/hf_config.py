"""`config.json` of NemotronH / Nemotron-Omni checkpoints <-> provider fields.

Three layouts are read:
- a bare NemotronH language model (`model_type: nemotron_h`), weights under `backbone.*` / `lm_head.*`;
- the released Omni checkpoint (`llm_config` with `hybrid_override_pattern`, `sound_config`, ...);
- transformers' Omni naming (`text_config` with `layers_block_type`, `audio_config`, ...).
In both Omni layouts the language-model weights live under `language_model.`.

`TEXT_FIELDS` is the single table between HF text-config fields and megatron provider fields; the
export direction is derived from it. Export starts from the source config (so fields Megatron has no
notion of, e.g. `time_step_min` or token ids, survive) and overwrites every mapped field with the
provider's value, so a changed model exports a correct config.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from conversion.errors import ConversionError

# HF layer type <-> megatron hybrid pattern letter.
LAYER_TYPE_TO_SYMBOL = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
SYMBOL_TO_LAYER_TYPE = {v: k for k, v in LAYER_TYPE_TO_SYMBOL.items()}

# (hf text-config field, provider field). One table; both directions use it.
TEXT_FIELDS = (
    ("hidden_size", "hidden_size"),
    ("vocab_size", "vocab_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_query_groups"),
    ("head_dim", "kv_channels"),
    ("layer_norm_epsilon", "layernorm_epsilon"),
    ("max_position_embeddings", "seq_length"),
    ("mamba_num_heads", "mamba_num_heads"),
    ("mamba_head_dim", "mamba_head_dim"),
    ("n_groups", "mamba_num_groups"),
    ("ssm_state_size", "mamba_state_dim"),
    ("n_routed_experts", "num_moe_experts"),
    ("num_experts_per_tok", "moe_router_topk"),
    ("moe_intermediate_size", "moe_ffn_hidden_size"),
    ("moe_shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),
    ("routed_scaling_factor", "moe_router_topk_scaling_factor"),
    ("tie_word_embeddings", "share_embeddings_and_output_weights"),
)

MOE_PROVIDER_FIELDS = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
                       "moe_shared_expert_intermediate_size", "moe_router_topk_scaling_factor")

# Older NemotronH configs spell some Mamba fields differently (transformers accepts both).
FIELD_ALIASES = {
    "n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "chunk_size": "mamba_chunk_size",
    "use_conv_bias": "mamba_conv_bias", "expand": "mamba_expand",
}

# Fields a layer kind needs; a config whose pattern uses the kind must have them.
REQUIRED_BY_SYMBOL = {
    "M": ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size"),
    "*": ("num_attention_heads", "num_key_value_heads", "head_dim"),
    "-": ("intermediate_size",),
    "E": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
          "moe_shared_expert_intermediate_size"),
}
# Defaults of transformers' NemotronHConfig for the optional fields we map.
OPTIONAL_DEFAULTS = {
    "layer_norm_epsilon": 1e-5, "max_position_embeddings": 4096, "routed_scaling_factor": 1.0,
    "tie_word_embeddings": False,
}

# (field, value the megatron model computes): anything else is refused rather than silently wrong.
SUPPORTED_VALUES = (
    ("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu"), ("use_bias", False), ("mlp_bias", False),
    ("attention_bias", False), ("mamba_proj_bias", False), ("use_conv_bias", True), ("conv_kernel", 4),
    ("moe_latent_size", None), ("n_group", 1), ("norm_topk_prob", True), ("num_nextn_predict_layers", 0),
    ("n_shared_experts", 1),
    # transformers applies it in training; the provider's attention dropout is 0 (the vision tower shares it)
    ("attention_dropout", 0.0),
)

OMNI_ARCHITECTURES = ("NemotronH_Nano_Omni_Reasoning_V3", "NemotronH_Omni_Reasoning_V3")
TEXT_ARCHITECTURES = ("NemotronHForCausalLM",)


@dataclass
class HFModelConfig:
    """What the bridge needs to know about an HF config.json."""

    raw: Dict[str, Any]          # the whole config.json as read
    kind: str                    # "nemotron_h" (text only) or "nemotron_omni"
    scheme: str                  # "bare", "released" (llm_config) or "transformers" (text_config)
    text: Dict[str, Any]         # the language-model config (HF field names)
    lm_prefix: str               # prefix of the language-model weights in the safetensors files

    @property
    def text_key(self) -> Optional[str]:
        return {"bare": None, "released": "llm_config", "transformers": "text_config"}[self.scheme]


def load_config(hf_dir: str | Path) -> HFModelConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: missing (every Hugging Face model directory needs a config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    return parse_config(raw, str(path))


def parse_config(raw: Dict[str, Any], where: str = "config.json") -> HFModelConfig:
    if not isinstance(raw, dict):
        raise ConversionError(f"{where}: expected a JSON object")
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if "llm_config" in raw:
        scheme, text = "released", raw["llm_config"]
    elif "text_config" in raw and (model_type != "nemotron_h"):
        scheme, text = "transformers", raw["text_config"]
    elif model_type == "nemotron_h" or any(a in TEXT_ARCHITECTURES for a in archs):
        scheme, text = "bare", raw
    else:
        raise ConversionError(
            f"{where}: unknown architecture {archs or model_type!r}; expected NemotronHForCausalLM "
            f"(model_type nemotron_h) or one of {list(OMNI_ARCHITECTURES)}")
    if scheme != "bare" and archs and not any(a in OMNI_ARCHITECTURES for a in archs):
        raise ConversionError(f"{where}: unknown architecture {archs!r}; expected one of {list(OMNI_ARCHITECTURES)}")
    if not isinstance(text, dict):
        raise ConversionError(f"{where}: field {'llm_config' if scheme == 'released' else 'text_config'!r} must be an object")
    kind = "nemotron_h" if scheme == "bare" else "nemotron_omni"
    sub = "" if scheme == "bare" else f"{'llm_config' if scheme == 'released' else 'text_config'}."
    text = _normalised_text(text, f"{where}: {sub}")
    return HFModelConfig(raw=raw, kind=kind, scheme=scheme, text=text,
                         lm_prefix="" if scheme == "bare" else "language_model.")


def _normalised_text(text: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Copy of the text config with aliases resolved and the layer pattern as `hybrid_override_pattern`."""
    text = dict(text)
    for name, alias in FIELD_ALIASES.items():
        if name not in text and alias in text:
            text[name] = text[alias]
    if "layers_block_type" in text and text["layers_block_type"] is not None:
        types = text["layers_block_type"]
        bad = [t for t in types if t not in LAYER_TYPE_TO_SYMBOL] if isinstance(types, list) else [types]
        if bad:
            raise ConversionError(f"{where}layers_block_type has unknown layer type {bad[0]!r}; expected one of {list(LAYER_TYPE_TO_SYMBOL)}")
        pattern = "".join(LAYER_TYPE_TO_SYMBOL[t] for t in types)
    elif isinstance(text.get("hybrid_override_pattern"), str):
        pattern = text["hybrid_override_pattern"]
        bad = [c for c in pattern if c not in SYMBOL_TO_LAYER_TYPE]
        if bad:
            raise ConversionError(f"{where}hybrid_override_pattern has unknown symbol {bad[0]!r}; expected M, *, - or E")
    else:
        raise ConversionError(f"{where}missing required field 'layers_block_type' (or 'hybrid_override_pattern')")
    if not pattern:
        raise ConversionError(f"{where}the layer pattern is empty")
    text["_pattern"] = pattern
    required = ["hidden_size", "vocab_size"] + [f for s in sorted(set(pattern)) for f in REQUIRED_BY_SYMBOL[s]]
    for field in required:
        value = text.get(field)
        if value is None:
            raise ConversionError(f"{where}missing required field {field!r} (needed by layer pattern {pattern!r})")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConversionError(f"{where}field {field!r} must be a positive integer, got {value!r}")
    for field, default in OPTIONAL_DEFAULTS.items():
        if text.get(field) is None:
            text[field] = default
    for field, expected in SUPPORTED_VALUES:
        if field in text and text[field] != expected:
            raise ConversionError(f"{where}field {field!r} = {text[field]!r} is not supported (the Megatron model computes {expected!r})")
    if "E" in pattern and text["num_experts_per_tok"] == 1:
        # transformers renormalises a single top-1 weight to 1.0, megatron keeps sigmoid(logit).
        raise ConversionError(f"{where}field 'num_experts_per_tok' = 1 is not supported with norm_topk_prob (need >= 2)")
    return text


def provider_fields(cfg: HFModelConfig) -> Dict[str, Any]:
    """Provider fields (megatron names) that the HF text config determines."""
    text = cfg.text
    pattern = text["_pattern"]
    fields: Dict[str, Any] = {"hybrid_override_pattern": pattern, "num_layers": len(pattern)}
    for hf_name, provider_name in TEXT_FIELDS:
        if text.get(hf_name) is not None:
            fields[provider_name] = text[hf_name]
    if "E" not in pattern:  # a dense model: MoE fields a config may carry as defaults mean nothing
        for name in MOE_PROVIDER_FIELDS:
            fields.pop(name, None)
    return fields


def export_text_config(source_text: Dict[str, Any], fields: Dict[str, Any]) -> Dict[str, Any]:
    """The HF text config for a provider's `fields`, in the naming of `source_text`."""
    text = {k: copy.deepcopy(v) for k, v in source_text.items() if k != "_pattern"}
    for hf_name, provider_name in TEXT_FIELDS:
        if provider_name in fields and fields[provider_name] is not None:
            text[hf_name] = fields[provider_name]
    pattern = fields["hybrid_override_pattern"]
    if "hybrid_override_pattern" in source_text and "layers_block_type" not in source_text:
        text["hybrid_override_pattern"] = pattern
    else:
        text["layers_block_type"] = [SYMBOL_TO_LAYER_TYPE[c] for c in pattern]
        text.pop("hybrid_override_pattern", None)
    if "num_hidden_layers" in text:
        text["num_hidden_layers"] = len(pattern)
    # Aliased spellings are written back under the name the source used.
    for name, alias in FIELD_ALIASES.items():
        if alias in source_text and name not in source_text and name in text:
            text[alias] = text.pop(name)
    return text


def export_config(cfg: HFModelConfig, fields: Dict[str, Any]) -> Dict[str, Any]:
    """The whole config.json for `fields`, in the scheme `cfg` was read in."""
    text = export_text_config(cfg.raw if cfg.scheme == "bare" else cfg.raw[cfg.text_key], fields)
    if cfg.scheme == "bare":
        return text
    out = copy.deepcopy(cfg.raw)
    out[cfg.text_key] = text
    return out
