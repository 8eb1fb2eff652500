"""Mappings: one Megatron tensor and the HF tensor(s) it is made of, and the kinds that move them.

A `Mapping` is one entry of the registry (`conversion.registry.mappings`): the Megatron name, the
HF name(s), the HF shape(s) the config implies (with the formula, for messages), the dtype class
(the checkpoint's floating-point dtype, or int64 for counters / index buffers) and its kind.

A mapping kind owns everything about *how* the tensor moves, and nothing about names:
- `to_megatron` / `to_hf`: the full (unsharded) Megatron tensor from the HF tensor(s) and back
  (e.g. q, k, v -> Megatron's per-group fused QKV; vocab padding);
- `group` / `shard` / `unshard`: which tensor-parallel group slices it (TP, expert-TP, or none)
  and how a rank's slice is cut from the full tensor and put back.
The Megatron checkpoint files (megatron-core's sharded state, see `bridge/streaming.py`) are laid
out by megatron itself; the kinds' slicing is what a rank's *parameter* holds, and the two agree
(tests/test_parallel_layouts.py loads one through the other at every layout).

Every path (preflight, in-memory load / export, both streaming directions, bridge-verify) goes
through `Mapping.to_megatron` / `Mapping.to_hf`, which check exact shapes against the config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Mapping as MappingType, Optional, Sequence, Tuple

import torch

from conversion.errors import ConversionError

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Dims:
    """Model sizes the layout transforms need."""

    vocab_size: int = 0
    padded_vocab_size: int = 0
    num_attention_heads: int = 0
    num_query_groups: int = 0
    kv_channels: int = 0
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    mamba_num_groups: int = 0
    mamba_state_dim: int = 0
    vision_num_heads: int = 0        # ViT attention heads (MHA)


# ---------------------------------------------------------------------------- mapping kinds

class MappingKind:
    """The HF tensor is the Megatron tensor; TP ranks hold slices along `dim` (the base kind is
    COLUMN: output features / heads along dim 0)."""

    group: Optional[str] = "tp"  # "tp": tensor-parallel; "etp": expert-tensor-parallel; None: every rank whole
    dim = 0

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Kind.{self.name.upper()}"

    def to_megatron(self, hf: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
        (tensor,) = hf
        return tensor

    def to_hf(self, full: torch.Tensor, dims: Dims) -> List[torch.Tensor]:
        return [full]

    def megatron_shape(self, hf_shapes: Sequence[Shape], dims: Dims) -> Shape:
        """The full Megatron tensor's shape given the HF tensors' (fused kinds stack along dim 0)."""
        first = tuple(hf_shapes[0])
        return (sum(s[0] for s in hf_shapes), *first[1:]) if first else first

    def shard(self, full: torch.Tensor, rank: int, size: int, dims: Dims) -> torch.Tensor:
        """The slice of `full` that TP (or expert-TP) rank `rank` of `size` holds."""
        if size == 1 or self.group is None:
            return full
        return full.chunk(size, dim=self.dim)[rank]

    def unshard(self, shards: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
        """Inverse of `shard`: the full tensor from the slices of all ranks, in rank order."""
        if len(shards) == 1 or self.group is None:
            return shards[0]
        return torch.cat(list(shards), dim=self.dim)


class Replicated(MappingKind):
    group = None  # norms, router, biases after a row-parallel linear


class Row(MappingKind):
    dim = 1  # input features


class ExpertColumn(MappingKind):
    group = "etp"  # one routed expert's fc1


class ExpertRow(Row):
    group = "etp"  # one routed expert's fc2


class Vocab(MappingKind):
    """Embedding / output layer: Megatron pads the vocab rows (to a multiple of TP x divisor)."""

    def to_megatron(self, hf, dims):
        (weight,) = hf
        extra = dims.padded_vocab_size - weight.shape[0]
        return weight if extra == 0 else torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)

    def to_hf(self, full, dims):
        return [full[: dims.vocab_size]]

    def megatron_shape(self, hf_shapes, dims):
        return (dims.padded_vocab_size, *hf_shapes[0][1:])


class GroupedQKV(MappingKind):
    """q, k, v -> Megatron's fused QKV: for each KV group, its H/G query heads, its key, its value."""

    def to_megatron(self, hf, dims):
        q, k, v = hf
        groups, d = dims.num_query_groups, dims.kv_channels
        per_group, hidden = dims.num_attention_heads // groups, q.shape[-1]
        return torch.cat([q.reshape(groups, per_group * d, hidden), k.reshape(groups, d, hidden),
                          v.reshape(groups, d, hidden)], dim=1).reshape(-1, hidden)

    def to_hf(self, full, dims):
        groups, d = dims.num_query_groups, dims.kv_channels
        per_group, hidden = dims.num_attention_heads // groups, full.shape[-1]
        q, k, v = torch.split(full.reshape(groups, (per_group + 2) * d, hidden), [per_group * d, d, d], dim=1)
        return [q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)]


class PackedQKV(MappingKind):
    """One HF ViT [Q; K; V] (weight or bias) -> Megatron's per-head [q_h, k_h, v_h] interleave (MHA)."""

    def to_megatron(self, hf, dims):
        (qkv,) = hf
        return qkv.reshape(3, dims.vision_num_heads, -1, *qkv.shape[1:]).transpose(0, 1).reshape(qkv.shape)

    def to_hf(self, full, dims):
        return [full.reshape(dims.vision_num_heads, 3, -1, *full.shape[1:]).transpose(0, 1).reshape(full.shape)]


class Stacked(MappingKind):
    """Several components stacked along dim 0, each split over TP on its own (megatron's Mamba
    mixer: in_proj rows [z | x | B | C | dt], conv1d channels [x | B | C])."""

    def __init__(self, name: str, components: str):
        super().__init__(name)
        self.components = components

    def sizes(self, dims: Dims) -> List[int]:
        d_in = dims.mamba_num_heads * dims.mamba_head_dim
        gn = dims.mamba_num_groups * dims.mamba_state_dim
        size = {"z": d_in, "x": d_in, "B": gn, "C": gn, "dt": dims.mamba_num_heads}
        return [size[c] for c in self.components.split()]

    def shard(self, full, rank, size, dims):
        if size == 1:
            return full
        return torch.cat([c.chunk(size, dim=0)[rank] for c in torch.split(full, self.sizes(dims), dim=0)], dim=0)

    def unshard(self, shards, dims):
        if len(shards) == 1:
            return shards[0]
        local = [c // len(shards) for c in self.sizes(dims)]
        pieces = [torch.split(s, local, dim=0) for s in shards]
        return torch.cat([torch.cat([p[i] for p in pieces], dim=0) for i in range(len(local))], dim=0)


class Kind:
    """The mapping kinds, by name (the tables in conversion/nemotron_h.py and conversion/omni.py use these)."""

    REPLICATED = Replicated("replicated")
    COLUMN = MappingKind("column")
    ROW = Row("row")
    VOCAB = Vocab("vocab")
    QKV = GroupedQKV("qkv")
    PACKED_QKV = PackedQKV("packed_qkv")
    MAMBA_IN_PROJ = Stacked("mamba_in_proj", "z x B C dt")
    MAMBA_CONV1D = Stacked("mamba_conv1d", "x B C")
    EXPERT_COLUMN = ExpertColumn("expert_column")
    EXPERT_ROW = ExpertRow("expert_row")


# ---------------------------------------------------------------------------- shapes from the config

def config_shape(formula: str, values: MappingType[str, object]) -> Shape:
    """The shape a formula of config fields gives, e.g. "num_attention_heads*head_dim, hidden_size".

    The formulas are this package's own constant strings (the tables), evaluated over the config's
    integer values only, with no builtins: the formula is both the computation and what the error
    message shows, so the two cannot drift apart."""
    if not formula.strip():
        return ()  # a scalar (a batch-norm counter)
    names = {k: v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}
    return tuple(int(d) for d in eval(f"({formula},)", {"__builtins__": {}}, names))  # noqa: S307 - see above


def fmt_shape(shape) -> str:
    return str(tuple(int(d) for d in shape))


@dataclass(frozen=True)
class Mapping:
    """One Megatron tensor <-> its HF tensor(s), with the HF shapes the config gives."""

    megatron: str
    hf: Tuple[str, ...]
    kind: MappingKind
    shapes: Tuple[Tuple[Shape, str], ...]  # per HF tensor: (shape, the config formula that gives it)
    integer: bool = False         # int64 (batch-norm counters, RADIO summary_idxs), not a float weight

    def renamed(self, megatron_prefix: str, hf_prefix: str) -> "Mapping":
        return replace(self, megatron=megatron_prefix + self.megatron, hf=tuple(hf_prefix + h for h in self.hf))

    def check_hf(self, name: str, shape: Shape, where: str = "tensor") -> None:
        """Raise naming the tensor, both shapes and the config formula when `shape` is not the one."""
        expected, formula = self.shapes[self.hf.index(name)]
        if tuple(shape) != tuple(expected):
            raise ConversionError(f"{where} {name!r} has shape {fmt_shape(shape)}, but config.json gives "
                                  f"{fmt_shape(expected)} = [{formula}]")

    def to_megatron(self, tensors: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
        """The full Megatron tensor from the HF tensors (in `hf` order), their shapes checked first."""
        for name, tensor in zip(self.hf, tensors):
            self.check_hf(name, tensor.shape)
        return self.kind.to_megatron(tensors, dims)

    def megatron_shape(self, dims: Dims) -> Shape:
        """The full Megatron tensor's shape, from the HF shapes (no second shape table)."""
        return self.kind.megatron_shape([s for s, _ in self.shapes], dims)

    def to_hf(self, full: torch.Tensor, dims: Dims) -> List[Tuple[str, torch.Tensor]]:
        """(HF name, tensor) pairs from the full Megatron tensor, whose shape is checked first."""
        expected = self.megatron_shape(dims)
        if tuple(full.shape) != expected:
            raise ConversionError(f"Megatron tensor {self.megatron!r} has shape {fmt_shape(full.shape)}, but "
                                  f"config.json gives {fmt_shape(expected)} (from {', '.join(self.hf)})")
        return list(zip(self.hf, self.kind.to_hf(full, dims)))


def expected_hf(mappings: Sequence[Mapping]) -> Dict[str, Tuple[Shape, str]]:
    """HF name -> (shape, formula) over the mappings, in their order."""
    return {name: shape for m in mappings for name, shape in zip(m.hf, m.shapes)}
