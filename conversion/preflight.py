"""Checks of an HF checkpoint against its config.json, before any heavy work (no megatron).

`check_tensors` compares the safetensors headers with the registry (`conversion.registry.mappings`:
every HF tensor of the model with the shape config.json implies and the formula it is made of):
missing and unexpected tensors, dtypes, shapes. Sizes that disagree with config.json (e.g. an edited
`hidden_size`) are found here, naming the tensor and both shapes, in a second.

Dtype rule (one decision, applied to every tensor): the checkpoint's dtype is the most common
floating-point dtype of its tensors (fp32, bf16 or fp16). Every weight must have that dtype, or
float32 (release checkpoints keep small precision-sensitive tensors such as the router's
`e_score_correction_bias` in fp32, and megatron keeps that one in fp32 too). Anything else is
refused: float64, and a float16 tensor in a bfloat16 checkpoint or the reverse (a mis-assembled
checkpoint; the cast would change its bits). The registry's integer tensors (Parakeet's batch-norm
counters, RADIO's `summary_idxs`) must be int64, and no other tensor may be an integer.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from conversion.dtypes import dtype_name
from conversion.errors import ConversionError
from conversion.mappings import Mapping, fmt_shape

Shape = Tuple[int, ...]
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
                  mappings: Sequence[Mapping], files: Optional[Dict[str, str]] = None) -> Optional[torch.dtype]:
    """Compare a checkpoint's tensors (name -> shape / dtype, from the headers) with the registry.

    Returns the checkpoint dtype. Raises one `ConversionError` for the first problem, in this order:
    missing, unexpected, dtype, shape.
    """
    files = files or {}
    by_name = {name: m for m in mappings for name in m.hf}

    def loc(name):
        return f"{where}/{files[name]}" if name in files else where

    missing = [n for n in by_name if n not in shapes]
    if missing:
        m = by_name[missing[0]]
        raise ConversionError(f"{where}: missing tensor {missing[0]!r} (shape {fmt_shape(m.shapes[m.hf.index(missing[0])][0])} "
                              "expected)" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = [n for n in shapes if n not in by_name]
    if unexpected:
        raise ConversionError(f"{loc(unexpected[0])}: {unexpected_tensor(unexpected)}")
    main = checkpoint_dtype({n: d for n, d in dtypes.items() if not by_name[n].integer})
    for name, dtype in dtypes.items():
        if by_name[name].integer:
            if dtype != torch.int64:
                raise ConversionError(f"{loc(name)}: tensor {name!r} has dtype {dtype_name(dtype)}, expected int64")
        elif main is None or (dtype != main and dtype != torch.float32):
            allowed = ("a floating-point dtype" if main is None else f"{dtype_name(main)} (the checkpoint's dtype)"
                       + (" or float32" if main != torch.float32 else ""))
            raise ConversionError(f"{loc(name)}: tensor {name!r} has dtype {dtype_name(dtype)}, expected {allowed}")
    for name, shape in shapes.items():
        try:
            by_name[name].check_hf(name, shape)
        except ConversionError as e:
            raise ConversionError(f"{loc(name)}: {e}") from None
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
