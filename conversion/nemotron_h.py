"""Name table of the NemotronH language model: HF tensor names <-> Megatron parameter names.

This table is the single source of truth for both directions. Each rule names a Megatron
parameter (relative to the language model module: `embedding.*`, `decoder.*`, `output_layer.*`),
the HF tensor(s) it is made from (relative to the language-model prefix: `backbone.*`,
`lm_head.*`) with the shape formula of each, and its kind (`conversion.mappings.Kind`), which fixes
the layout transform and the TP sharding.

Routed experts use a canonical Megatron name with the *global* expert index,
`mlp.experts.local_experts.{e}.*` (SequentialMLP's spelling); `localise_expert_name` turns it into
the name on an expert-parallel rank, for SequentialMLP or for Transformer Engine's grouped GEMM.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

from conversion.mappings import Kind, Mapping, config_shape

# Per-layer rules by hybrid-pattern symbol: (megatron suffix, ((hf suffix, HF shape formula), ...), kind).
# The shape formulas are over the text config's fields (`conversion.mappings.config_shape`); `{e}`
# marks a routed expert; the HF per-layer pre-norm (`norm.weight`) lands in the fused norm of the
# first Megatron linear of the layer, as in the Transformer Engine build.
D_IN = "mamba_num_heads*mamba_head_dim"
CONV = f"{D_IN} + 2*n_groups*ssm_state_size"
NORM = (("norm.weight", "hidden_size"),)
LAYER_RULES: Dict[str, Tuple[Tuple[str, Tuple[Tuple[str, str], ...], object], ...]] = {
    "M": (  # Mamba2 mixer
        ("mixer.in_proj.layer_norm_weight", NORM, Kind.REPLICATED),
        ("mixer.in_proj.weight", (("mixer.in_proj.weight", f"2*{D_IN} + 2*n_groups*ssm_state_size + mamba_num_heads, "
                                   "hidden_size"),), Kind.MAMBA_IN_PROJ),
        ("mixer.conv1d.weight", (("mixer.conv1d.weight", f"{CONV}, 1, conv_kernel"),), Kind.MAMBA_CONV1D),
        ("mixer.conv1d.bias", (("mixer.conv1d.bias", CONV),), Kind.MAMBA_CONV1D),
        ("mixer.A_log", (("mixer.A_log", "mamba_num_heads"),), Kind.COLUMN),
        ("mixer.D", (("mixer.D", "mamba_num_heads"),), Kind.COLUMN),
        ("mixer.dt_bias", (("mixer.dt_bias", "mamba_num_heads"),), Kind.COLUMN),
        ("mixer.norm.weight", (("mixer.norm.weight", D_IN),), Kind.COLUMN),
        ("mixer.out_proj.weight", (("mixer.out_proj.weight", f"hidden_size, {D_IN}"),), Kind.ROW),
    ),
    "*": (  # attention (GQA, no bias, no position embedding)
        ("self_attention.linear_qkv.layer_norm_weight", NORM, Kind.REPLICATED),
        ("self_attention.linear_qkv.weight", (("mixer.q_proj.weight", "num_attention_heads*head_dim, hidden_size"),
                                              ("mixer.k_proj.weight", "num_key_value_heads*head_dim, hidden_size"),
                                              ("mixer.v_proj.weight", "num_key_value_heads*head_dim, hidden_size")),
         Kind.QKV),
        ("self_attention.linear_proj.weight", (("mixer.o_proj.weight", "hidden_size, num_attention_heads*head_dim"),),
         Kind.ROW),
    ),
    "-": (  # dense squared-ReLU MLP
        ("mlp.linear_fc1.layer_norm_weight", NORM, Kind.REPLICATED),
        ("mlp.linear_fc1.weight", (("mixer.up_proj.weight", "intermediate_size, hidden_size"),), Kind.COLUMN),
        ("mlp.linear_fc2.weight", (("mixer.down_proj.weight", "hidden_size, intermediate_size"),), Kind.ROW),
    ),
    "E": (  # MoE: sigmoid router with correction bias, routed experts, one shared expert
        ("pre_mlp_layernorm.weight", NORM, Kind.REPLICATED),
        ("mlp.router.weight", (("mixer.gate.weight", "n_routed_experts, hidden_size"),), Kind.REPLICATED),
        ("mlp.router.expert_bias", (("mixer.gate.e_score_correction_bias", "n_routed_experts"),), Kind.REPLICATED),
        ("mlp.experts.local_experts.{e}.linear_fc1.weight",
         (("mixer.experts.{e}.up_proj.weight", "moe_intermediate_size, hidden_size"),), Kind.EXPERT_COLUMN),
        ("mlp.experts.local_experts.{e}.linear_fc2.weight",
         (("mixer.experts.{e}.down_proj.weight", "hidden_size, moe_intermediate_size"),), Kind.EXPERT_ROW),
        ("mlp.shared_experts.linear_fc1.weight",
         (("mixer.shared_experts.up_proj.weight", "moe_shared_expert_intermediate_size, hidden_size"),), Kind.COLUMN),
        ("mlp.shared_experts.linear_fc2.weight",
         (("mixer.shared_experts.down_proj.weight", "hidden_size, moe_shared_expert_intermediate_size"),), Kind.ROW),
    ),
}

EMBEDDING_RULE = ("embedding.word_embeddings.weight", (("backbone.embeddings.weight", "vocab_size, hidden_size"),),
                  Kind.VOCAB)
FINAL_NORM_RULE = ("decoder.final_norm.weight", (("backbone.norm_f.weight", "hidden_size"),), Kind.REPLICATED)
OUTPUT_RULE = ("output_layer.weight", (("lm_head.weight", "vocab_size, hidden_size"),), Kind.VOCAB)
LAYER_PREFIX_MEGATRON = "decoder.layers.{i}."
LAYER_PREFIX_HF = "backbone.layers.{i}."


def language_model_mappings(text: Dict) -> List[Mapping]:
    """Every mapping of a NemotronH language model, in HF file order, shapes from the normalised
    text config (`HFModelConfig.text`: `_pattern`, the sizes, `tie_word_embeddings`)."""
    values = {"conv_kernel": 4, **{k: v for k, v in text.items() if v is not None}}

    def mapping(megatron, hf, kind):
        return Mapping(megatron, tuple(h for h, _ in hf), kind, tuple((config_shape(f, values), f) for _, f in hf))

    out = [mapping(*EMBEDDING_RULE)]
    for i, symbol in enumerate(text["_pattern"]):
        for megatron, hf, kind in LAYER_RULES[symbol]:
            experts = range(text.get("n_routed_experts") or 0) if "{e}" in megatron else [None]
            for e in experts:
                out.append(mapping(LAYER_PREFIX_MEGATRON.format(i=i) + megatron.replace("{e}", str(e)),
                                   [(LAYER_PREFIX_HF.format(i=i) + h.replace("{e}", str(e)), f) for h, f in hf],
                                   kind))
    out.append(mapping(*FINAL_NORM_RULE))
    if not text.get("tie_word_embeddings"):
        out.append(mapping(*OUTPUT_RULE))
    return out


_LOCAL_EXPERT = re.compile(r"^(?P<pre>.*\.mlp\.experts\.)local_experts\.(?P<e>\d+)\.(?P<post>linear_fc[12])\.weight$")
_GROUPED_EXPERT = re.compile(r"^(?P<pre>.*\.mlp\.experts\.)(?P<post>linear_fc[12])\.weight(?P<e>\d+)$")


def localise_expert_name(name: str, first_local_expert: int, grouped_gemm: bool) -> str:
    """Canonical (global-index, SequentialMLP) expert name -> the name on this EP rank's module."""
    m = _LOCAL_EXPERT.match(name)
    if not m:
        return name
    local = int(m["e"]) - first_local_expert
    if grouped_gemm:
        return f"{m['pre']}{m['post']}.weight{local}"
    return f"{m['pre']}local_experts.{local}.{m['post']}.weight"


def canonical_expert_name(name: str, first_local_expert: int) -> str:
    """Inverse of `localise_expert_name`: a rank's expert parameter name -> canonical global name."""
    m = _LOCAL_EXPERT.match(name) or _GROUPED_EXPERT.match(name)
    if not m:
        return name
    return f"{m['pre']}local_experts.{int(m['e']) + first_local_expert}.{m['post']}.weight"
