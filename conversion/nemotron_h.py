"""Name table of the NemotronH language model: HF tensor names <-> Megatron parameter names.

This table is the single source of truth for both directions. Each rule names a Megatron
parameter (relative to the language model module: `embedding.*`, `decoder.*`, `output_layer.*`),
the HF tensor(s) it is made from (relative to the language-model prefix: `backbone.*`,
`lm_head.*`), and its `Kind`, which fixes the layout transform and the TP sharding.

Routed experts use a canonical Megatron name with the *global* expert index,
`mlp.experts.local_experts.{e}.*` (SequentialMLP's spelling); `localise_expert_name` turns it into
the name on an expert-parallel rank, for SequentialMLP or for Transformer Engine's grouped GEMM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from conversion.transforms import Kind

# Per-layer rules by hybrid-pattern symbol: (megatron suffix, hf suffixes, kind).
# `{e}` marks a routed expert; the HF per-layer pre-norm (`norm.weight`) lands in the fused norm of
# the first Megatron linear of the layer, as in the Transformer Engine build.
LAYER_RULES: Dict[str, Tuple[Tuple[str, Tuple[str, ...], Kind], ...]] = {
    "M": (  # Mamba2 mixer
        ("mixer.in_proj.layer_norm_weight", ("norm.weight",), Kind.REPLICATED),
        ("mixer.in_proj.weight", ("mixer.in_proj.weight",), Kind.MAMBA_IN_PROJ),
        ("mixer.conv1d.weight", ("mixer.conv1d.weight",), Kind.MAMBA_CONV1D),
        ("mixer.conv1d.bias", ("mixer.conv1d.bias",), Kind.MAMBA_CONV1D),
        ("mixer.A_log", ("mixer.A_log",), Kind.COLUMN),
        ("mixer.D", ("mixer.D",), Kind.COLUMN),
        ("mixer.dt_bias", ("mixer.dt_bias",), Kind.COLUMN),
        ("mixer.norm.weight", ("mixer.norm.weight",), Kind.COLUMN),
        ("mixer.out_proj.weight", ("mixer.out_proj.weight",), Kind.ROW),
    ),
    "*": (  # attention (GQA, no bias, no position embedding)
        ("self_attention.linear_qkv.layer_norm_weight", ("norm.weight",), Kind.REPLICATED),
        ("self_attention.linear_qkv.weight",
         ("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight"), Kind.QKV),
        ("self_attention.linear_proj.weight", ("mixer.o_proj.weight",), Kind.ROW),
    ),
    "-": (  # dense squared-ReLU MLP
        ("mlp.linear_fc1.layer_norm_weight", ("norm.weight",), Kind.REPLICATED),
        ("mlp.linear_fc1.weight", ("mixer.up_proj.weight",), Kind.COLUMN),
        ("mlp.linear_fc2.weight", ("mixer.down_proj.weight",), Kind.ROW),
    ),
    "E": (  # MoE: sigmoid router with correction bias, routed experts, one shared expert
        ("pre_mlp_layernorm.weight", ("norm.weight",), Kind.REPLICATED),
        ("mlp.router.weight", ("mixer.gate.weight",), Kind.REPLICATED),
        ("mlp.router.expert_bias", ("mixer.gate.e_score_correction_bias",), Kind.REPLICATED),
        ("mlp.experts.local_experts.{e}.linear_fc1.weight", ("mixer.experts.{e}.up_proj.weight",), Kind.EXPERT_COLUMN),
        ("mlp.experts.local_experts.{e}.linear_fc2.weight", ("mixer.experts.{e}.down_proj.weight",), Kind.EXPERT_ROW),
        ("mlp.shared_experts.linear_fc1.weight", ("mixer.shared_experts.up_proj.weight",), Kind.COLUMN),
        ("mlp.shared_experts.linear_fc2.weight", ("mixer.shared_experts.down_proj.weight",), Kind.ROW),
    ),
}

EMBEDDING_RULE = ("embedding.word_embeddings.weight", ("backbone.embeddings.weight",), Kind.VOCAB)
FINAL_NORM_RULE = ("decoder.final_norm.weight", ("backbone.norm_f.weight",), Kind.REPLICATED)
OUTPUT_RULE = ("output_layer.weight", ("lm_head.weight",), Kind.VOCAB)
LAYER_PREFIX_MEGATRON = "decoder.layers.{i}."
LAYER_PREFIX_HF = "backbone.layers.{i}."


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensors it is made of (full names, no module prefixes)."""

    megatron: str
    hf: Tuple[str, ...]
    kind: Kind
    layer: Optional[int] = None   # global layer index, None for embedding / final norm / output
    expert: Optional[int] = None  # global routed-expert index


def language_model_rules(pattern: str, num_experts: Optional[int], tied_embeddings: bool) -> List[Rule]:
    """Every rule of a NemotronH language model with the given hybrid pattern, in HF file order."""
    rules = [Rule(*EMBEDDING_RULE)]
    for i, symbol in enumerate(pattern):
        for megatron, hf, kind in LAYER_RULES[symbol]:
            experts = range(num_experts or 0) if "{e}" in megatron else [None]
            for e in experts:
                rules.append(Rule(
                    LAYER_PREFIX_MEGATRON.format(i=i) + megatron.replace("{e}", str(e)),
                    tuple(LAYER_PREFIX_HF.format(i=i) + h.replace("{e}", str(e)) for h in hf),
                    kind, layer=i, expert=e))
    rules.append(Rule(*FINAL_NORM_RULE))
    if not tied_embeddings:
        rules.append(Rule(*OUTPUT_RULE))
    return rules


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
