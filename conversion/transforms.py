"""Small pure tensor transforms between HF and Megatron layouts, and how each kind is sharded.

Each weight kind (see `Kind`) knows two things:
- how the full Megatron tensor is made from the HF tensor(s) and back (`to_megatron`/`to_hf`);
- how a rank's shard is cut from the full Megatron tensor and how shards are put back together
  (`shard`/`unshard`) for tensor parallelism (TP, or expert-TP for experts).
Naming lives in the rule tables (`conversion/nemotron_h.py`); these functions never see a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import List, Sequence

import torch


class Kind(str, Enum):
    REPLICATED = "replicated"        # every TP rank holds the whole tensor (norms, router)
    COLUMN = "column"                # split along dim 0 (output features / heads)
    ROW = "row"                      # split along dim 1 (input features)
    VOCAB = "vocab"                  # embedding / output layer: vocab padded, then split along dim 0
    QKV = "qkv"                      # q, k, v -> Megatron's per-group fused QKV, split along dim 0
    PACKED_QKV = "packed_qkv"        # one HF [Q; K; V] tensor (ViT, MHA) -> per-head fused QKV, dim 0
    MAMBA_IN_PROJ = "mamba_in_proj"  # rows [z | x | B | C | dt], each component split along dim 0
    MAMBA_CONV1D = "mamba_conv1d"    # channels [x | B | C], each component split along dim 0
    EXPERT_COLUMN = "expert_column"  # one routed expert's fc1: split along dim 0 over expert-TP
    EXPERT_ROW = "expert_row"        # one routed expert's fc2: split along dim 1 over expert-TP


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

    def mamba_in_proj_sizes(self) -> List[int]:
        d_in = self.mamba_num_heads * self.mamba_head_dim
        gn = self.mamba_num_groups * self.mamba_state_dim
        return [d_in, d_in, gn, gn, self.mamba_num_heads]

    def mamba_conv1d_sizes(self) -> List[int]:
        d_in = self.mamba_num_heads * self.mamba_head_dim
        gn = self.mamba_num_groups * self.mamba_state_dim
        return [d_in, gn, gn]


# ---------------------------------------------------------------------------- HF <-> full Megatron

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: Dims) -> torch.Tensor:
    """[q; k; v] -> Megatron's fused QKV: for each KV group, its H/G query heads, its key, its value."""
    groups, d = dims.num_query_groups, dims.kv_channels
    heads_per_group = dims.num_attention_heads // groups
    hidden = q.shape[-1]
    q = q.reshape(groups, heads_per_group * d, hidden)
    k = k.reshape(groups, d, hidden)
    v = v.reshape(groups, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, dims: Dims) -> List[torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    groups, d = dims.num_query_groups, dims.kv_channels
    heads_per_group = dims.num_attention_heads // groups
    hidden = qkv.shape[-1]
    qkv = qkv.reshape(groups, (heads_per_group + 2) * d, hidden)
    q, k, v = torch.split(qkv, [heads_per_group * d, d, d], dim=1)
    return [q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)]


def fuse_packed_qkv(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """HF ViT [Q; K; V] (weight or bias) -> Megatron's per-head [q_h, k_h, v_h] interleave (MHA)."""
    rest = qkv.shape[1:]
    return qkv.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(qkv.shape)


def split_packed_qkv(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `fuse_packed_qkv`."""
    rest = qkv.shape[1:]
    return qkv.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(qkv.shape)


def pad_vocab(weight: torch.Tensor, dims: Dims) -> torch.Tensor:
    """Append zero rows up to the padded vocab (Megatron pads to a multiple of TP x divisor)."""
    extra = dims.padded_vocab_size - weight.shape[0]
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)


def to_megatron(kind: Kind, hf: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
    """Full (unsharded) Megatron tensor from the HF tensor(s) of one rule."""
    if kind is Kind.QKV:
        return fuse_qkv(*hf, dims)
    (tensor,) = hf
    if kind is Kind.PACKED_QKV:
        return fuse_packed_qkv(tensor, dims.vision_num_heads)
    if kind is Kind.VOCAB:
        return pad_vocab(tensor, dims)
    return tensor


def to_hf(kind: Kind, tensor: torch.Tensor, dims: Dims) -> List[torch.Tensor]:
    """HF tensor(s) of one rule from the full Megatron tensor (inverse of `to_megatron`)."""
    if kind is Kind.QKV:
        return split_qkv(tensor, dims)
    if kind is Kind.PACKED_QKV:
        return [split_packed_qkv(tensor, dims.vision_num_heads)]
    if kind is Kind.VOCAB:
        return [tensor[: dims.vocab_size]]
    return [tensor]


# ---------------------------------------------------------------------------- full <-> rank shards

def _component_sizes(kind: Kind, dims: Dims):
    if kind is Kind.MAMBA_IN_PROJ:
        return dims.mamba_in_proj_sizes()
    if kind is Kind.MAMBA_CONV1D:
        return dims.mamba_conv1d_sizes()
    return None


def shard(kind: Kind, full: torch.Tensor, rank: int, size: int, dims: Dims) -> torch.Tensor:
    """The slice of `full` that TP (or expert-TP) rank `rank` of `size` holds."""
    if size == 1 or kind is Kind.REPLICATED:
        return full
    if kind in (Kind.ROW, Kind.EXPERT_ROW):
        return full.chunk(size, dim=1)[rank]
    components = _component_sizes(kind, dims)
    if components is not None:
        # Megatron's Mamba mixer splits each of z, x, B, C, dt (resp. x, B, C) across TP separately.
        return torch.cat([c.chunk(size, dim=0)[rank] for c in torch.split(full, components, dim=0)], dim=0)
    return full.chunk(size, dim=0)[rank]


def unshard(kind: Kind, shards: Sequence[torch.Tensor], dims: Dims) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from the slices of all ranks, in rank order."""
    if len(shards) == 1 or kind is Kind.REPLICATED:
        return shards[0]
    if kind in (Kind.ROW, Kind.EXPERT_ROW):
        return torch.cat(list(shards), dim=1)
    components = _component_sizes(kind, dims)
    if components is not None:
        local = [c // len(shards) for c in components]
        pieces = [torch.split(s, local, dim=0) for s in shards]
        return torch.cat([torch.cat([p[i] for p in pieces], dim=0) for i in range(len(components))], dim=0)
    return torch.cat(list(shards), dim=0)
