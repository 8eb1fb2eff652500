"""Checks of an HF checkpoint against its config.json, before any heavy work (no megatron).

`expected_lm_tensors` gives, for the NemotronH language model, every HF tensor name (the same
names as the rule table in `conversion/nemotron_h.py`) with the shape config.json implies and the
config fields that shape is made of; `check_tensors` compares it with the safetensors headers:
missing and unexpected tensors, shapes, dtypes. Sizes that disagree with config.json (e.g. an edited
`hidden_size`) are found here, naming the tensor and both shapes, in a second.

Dtype rule (one decision, applied to every tensor): the checkpoint's dtype is the most common
floating-point dtype of its tensors (fp32, bf16 or fp16). Every tensor must have that dtype, or
float32 (release checkpoints keep small precision-sensitive tensors such as the router's
`e_score_correction_bias` in fp32, and megatron keeps that one in fp32 too). Anything else is
refused: integer / bool tensors (never weights of this model), float64, and a float16 tensor in a
bfloat16 checkpoint or the reverse (a mis-assembled checkpoint; the cast would change its bits).

Extending to a new component (the Omni encoders): add its expected tensors to what the caller
passes; names the caller does not list are checked by the AutoBridge name table instead.
"""

from __future__ import annotations

import re

from typing import Dict, Iterable, List, Optional, Tuple

import torch

from conversion.dtypes import dtype_name
from conversion.errors import ConversionError
from conversion.nemotron_h import LAYER_PREFIX_HF, language_model_rules

Shape = Tuple[int, ...]
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _layer_shapes(t: Dict, symbol: str) -> Dict[str, Tuple[Shape, str]]:
    """HF suffix inside `backbone.layers.{i}.` -> (shape, the config fields it is made of)."""
    h = t["hidden_size"]
    out: Dict[str, Tuple[Shape, str]] = {"norm.weight": ((h,), "[hidden_size]")}
    if symbol == "M":
        heads, hd, g, n = t["mamba_num_heads"], t["mamba_head_dim"], t["n_groups"], t["ssm_state_size"]
        k = t.get("conv_kernel") or 4
        d_in, conv = heads * hd, heads * hd + 2 * g * n
        out.update({
            "mixer.in_proj.weight": ((2 * d_in + 2 * g * n + heads, h),
                                     "[2*mamba_num_heads*mamba_head_dim + 2*n_groups*ssm_state_size + mamba_num_heads, hidden_size]"),
            "mixer.conv1d.weight": ((conv, 1, k), "[mamba_num_heads*mamba_head_dim + 2*n_groups*ssm_state_size, 1, conv_kernel]"),
            "mixer.conv1d.bias": ((conv,), "[mamba_num_heads*mamba_head_dim + 2*n_groups*ssm_state_size]"),
            "mixer.A_log": ((heads,), "[mamba_num_heads]"),
            "mixer.D": ((heads,), "[mamba_num_heads]"),
            "mixer.dt_bias": ((heads,), "[mamba_num_heads]"),
            "mixer.norm.weight": ((d_in,), "[mamba_num_heads*mamba_head_dim]"),
            "mixer.out_proj.weight": ((h, d_in), "[hidden_size, mamba_num_heads*mamba_head_dim]"),
        })
    elif symbol == "*":
        q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
        out.update({
            "mixer.q_proj.weight": ((q, h), "[num_attention_heads*head_dim, hidden_size]"),
            "mixer.k_proj.weight": ((kv, h), "[num_key_value_heads*head_dim, hidden_size]"),
            "mixer.v_proj.weight": ((kv, h), "[num_key_value_heads*head_dim, hidden_size]"),
            "mixer.o_proj.weight": ((h, q), "[hidden_size, num_attention_heads*head_dim]"),
        })
    elif symbol == "-":
        f = t["intermediate_size"]
        out.update({
            "mixer.up_proj.weight": ((f, h), "[intermediate_size, hidden_size]"),
            "mixer.down_proj.weight": ((h, f), "[hidden_size, intermediate_size]"),
        })
    elif symbol == "E":
        e, f, s = t["n_routed_experts"], t["moe_intermediate_size"], t["moe_shared_expert_intermediate_size"]
        out.update({
            "mixer.gate.weight": ((e, h), "[n_routed_experts, hidden_size]"),
            "mixer.gate.e_score_correction_bias": ((e,), "[n_routed_experts]"),
            "mixer.experts.{e}.up_proj.weight": ((f, h), "[moe_intermediate_size, hidden_size]"),
            "mixer.experts.{e}.down_proj.weight": ((h, f), "[hidden_size, moe_intermediate_size]"),
            "mixer.shared_experts.up_proj.weight": ((s, h), "[moe_shared_expert_intermediate_size, hidden_size]"),
            "mixer.shared_experts.down_proj.weight": ((h, s), "[hidden_size, moe_shared_expert_intermediate_size]"),
        })
    return out


def expected_lm_tensors(text: Dict, prefix: str = "") -> Dict[str, Tuple[Shape, str]]:
    """Every HF tensor of the NemotronH language model -> (shape, how config.json makes it).

    `text` is the normalised text config (`HFModelConfig.text`), `prefix` the language-model
    prefix of the weights (`HFModelConfig.lm_prefix`). Names follow the rule table, in its order.
    """
    pattern = text["_pattern"]
    h, v = text["hidden_size"], text["vocab_size"]
    per_symbol = {s: _layer_shapes(text, s) for s in set(pattern)}
    out: Dict[str, Tuple[Shape, str]] = {}
    rules = language_model_rules(pattern, text.get("n_routed_experts"), bool(text.get("tie_word_embeddings")))
    for rule in rules:
        for name in rule.hf:
            if rule.layer is None:
                shape = ((h,), "[hidden_size]") if name.endswith("norm_f.weight") else ((v, h), "[vocab_size, hidden_size]")
            else:
                suffix = name[len(LAYER_PREFIX_HF.format(i=rule.layer)):]
                if rule.expert is not None:
                    suffix = suffix.replace(f"experts.{rule.expert}.", "experts.{e}.", 1)
                shape = per_symbol[pattern[rule.layer]][suffix]
            out[prefix + name] = shape
    return out


def _fmt(shape: Iterable[int]) -> str:
    return str(tuple(int(d) for d in shape))


# Integer buffers a checkpoint legitimately holds (the Omni's Parakeet batch norms, RADIO).
INTEGER_TENSORS = re.compile(r"(\.num_batches_tracked|\.summary_idxs)$")


def checkpoint_dtype(dtypes: Dict[str, torch.dtype]) -> Optional[torch.dtype]:
    """The most common floating-point dtype among the tensors (ties: the wider), None if none."""
    counts: Dict[torch.dtype, int] = {}
    for d in dtypes.values():
        if d in FLOAT_DTYPES:
            counts[d] = counts.get(d, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda d: (counts[d], torch.finfo(d).bits))


def unexpected_tensor(names: List[str]) -> str:
    """The refusal of HF tensors that map to no Megatron parameter (the first one named)."""
    first, more = names[0], (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
    if first.endswith("lm_head.weight"):  # only unexpected when the embeddings are tied
        return (f"tensor {first!r} is stored, but config.json says tie_word_embeddings = true (the output layer "
                "is the embedding, so the Megatron model has no output layer of its own): a tied checkpoint that "
                f"also stores {first!r} is not supported; drop the tensor, or set tie_word_embeddings = false{more}")
    return f"unexpected tensor {first!r} maps to no Megatron parameter{more}"


def check_tensors(where: str, shapes: Dict[str, Shape], dtypes: Dict[str, torch.dtype],
                  expected: Dict[str, Tuple[Shape, str]], complete: bool = True,
                  files: Optional[Dict[str, str]] = None) -> torch.dtype:
    """Compare a checkpoint's tensors (name -> shape / dtype, from the headers) with `expected`.

    `complete`: `expected` lists every tensor of the model, so an extra tensor is an error (else
    tensors it does not list are left to the caller). Returns the checkpoint dtype. Raises one
    `ConversionError` for the first problem, in this order: missing, unexpected, dtype, shape.
    """
    files = files or {}

    def loc(name):
        return f"{where}/{files[name]}" if name in files else where

    missing = [n for n in expected if n not in shapes]
    if missing:
        raise ConversionError(f"{where}: missing tensor {missing[0]!r} (shape {_fmt(expected[missing[0]][0])} expected)"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if complete:
        unexpected = [n for n in shapes if n not in expected]
        if unexpected:
            raise ConversionError(f"{loc(unexpected[0])}: {unexpected_tensor(unexpected)}")
    main = checkpoint_dtype(dtypes)
    for name, dtype in dtypes.items():
        if dtype == torch.int64 and INTEGER_TENSORS.search(name):
            continue  # Omni: batch-norm counters, RADIO summary_idxs
        if main is None or (dtype != main and dtype != torch.float32):
            allowed = ("a floating-point dtype" if main is None else f"{dtype_name(main)} (the checkpoint's dtype)"
                       + (" or float32" if main != torch.float32 else ""))
            raise ConversionError(f"{loc(name)}: tensor {name!r} has dtype {dtype_name(dtype)}, expected {allowed}")
    for name, (shape, formula) in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise ConversionError(f"{loc(name)}: tensor {name!r} has shape {_fmt(shapes[name])}, but config.json "
                                  f"gives {_fmt(shape)} = {formula}")
    return main


def output_bytes(shapes: Dict[str, Shape], dtypes: Dict[str, torch.dtype], target: Optional[torch.dtype] = None) -> int:
    """Bytes of the tensors, each in `target` when given, else in its own dtype (the disk estimate)."""
    total = 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        total += n * torch.empty((), dtype=target or dtypes[name]).element_size()
    return total
