"""Moving weights between HF tensors and the parameters of a megatron model on this rank.

The path of one tensor, HF -> Megatron:
  mapping = table[canonical megatron name]       (conversion/registry.py: names, shapes, kind)
  full = mapping.to_megatron(hf tensors)         (shapes checked; e.g. q, k, v -> fused QKV)
  local = mapping.kind.shard(full, rank, size)   (this TP / expert-TP rank's slice)
  parameter.copy_(local)
Export runs the same steps backwards, then brings each full tensor to the writing rank: the lowest
global rank holding it (`owners`: pipeline stage, expert-parallel rank) sends it to rank 0
(`move_full_tensor`), in name-table order on every rank. "Canonical" names are the megatron names with the *global*
layer index and global expert index (see `canonical_names`), so the table never depends on the
parallel layout.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from bridge.ranks import gather, world
from conversion.errors import ConversionError
from conversion.nemotron_h import canonical_expert_name
from conversion.mappings import MappingKind
from providers.megatron_imports import checkpoint_name

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module style wrappers (they hold the real model in `.module`)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def model_chunks(model) -> List[torch.nn.Module]:
    return [unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def canonical_names(lm: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """canonical megatron name -> this rank's tensor (parameters and persistent buffers).

    Local layer indices become global ones (`layer.layer_number - 1`); local expert indices become
    global ones (EP rank x local experts); a state-dict name megatron-core checkpoints under
    another key (0.19.2's Mamba `mixer.conv1d_weight`, key `mixer.conv1d.weight`) becomes that key
    (`providers.megatron_imports.checkpoint_name`), so the names are the same on every megatron-core
    version. Transformer Engine's `_extra_state` entries carry no weights and are skipped.
    """
    out: Dict[str, torch.Tensor] = {}
    num_experts = getattr(lm.config, "num_moe_experts", None) or 0
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    first_expert = parallel_state.get_expert_model_parallel_rank() * (num_experts // max(ep_size, 1))
    for name, tensor in lm.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        name = checkpoint_name(name)
        m = _LAYER.match(name)
        if m:
            layer = lm.decoder.layers[int(m[1])]
            name = f"decoder.layers.{layer.layer_number - 1}.{m[2]}"
        out[canonical_expert_name(name, first_expert)] = tensor
    return out


def tp_group_for(kind: MappingKind):
    """(rank, size, group) of the tensor-parallel group that shards tensors of this kind."""
    if kind.group == "etp":
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_group(check_initialized=False))
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group(check_initialized=False))


def load_into(tensor: torch.Tensor, kind: MappingKind, full: torch.Tensor, dims, what: str) -> None:
    """Copy this rank's slice of the full megatron tensor `full` into `tensor`."""
    rank, size, _ = tp_group_for(kind)
    local = kind.shard(full, rank, size, dims)
    if tuple(local.shape) != tuple(tensor.shape):
        raise ConversionError(f"{what}: shape {tuple(full.shape)} gives a slice of {tuple(local.shape)} "
                              f"on this rank, but the megatron parameter is {tuple(tensor.shape)}")
    with torch.no_grad():
        tensor.copy_(local)


def gather_full(tensor: torch.Tensor, kind: MappingKind, dims) -> torch.Tensor:
    """The full megatron tensor from this rank's slice (all-gather over TP / expert-TP)."""
    rank, size, group = tp_group_for(kind)
    if size == 1 or kind.group is None:
        return tensor.detach()
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=group)
    return kind.unshard(shards, dims)


# ---------------------------------------------------------------------------- export across ranks

def local_tensors(chunks_lms: List[torch.nn.Module]) -> Dict[str, torch.Tensor]:
    """Canonical name -> tensor over all model chunks (virtual pipeline stages) of this rank."""
    out: Dict[str, torch.Tensor] = {}
    for lm in chunks_lms:
        out.update(canonical_names(lm))
    return out


def owners(local: Dict[str, torch.Tensor]) -> Dict[str, Tuple[int, torch.dtype]]:
    """Canonical name -> (the lowest global rank that holds it, its dtype); the same on all ranks.

    A tensor lives on one pipeline stage (and, for a routed expert, on one expert-parallel rank)
    and is replicated over data-parallel ranks and sliced over its TP / expert-TP group, so the
    lowest holder is a well-defined source for the gathered full tensor.
    """
    gathered = gather({name: str(t.dtype).split(".")[-1] for name, t in local.items()})
    out: Dict[str, Tuple[int, torch.dtype]] = {}
    for r in range(len(gathered) - 1, -1, -1):
        for name, dtype in gathered[r].items():
            out[name] = (r, getattr(torch, dtype))
    return out


def _comm_device(like: Optional[torch.Tensor] = None) -> torch.device:
    if like is not None:
        return like.device
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_MAX_DIMS = 8


def move_full_tensor(full: Optional[torch.Tensor], owner: int, dtype: torch.dtype, to_all: bool,
                     writer: int = 0) -> Optional[torch.Tensor]:
    """Bring the full tensor held by global rank `owner` to the writer rank (or to every rank).

    Point-to-point owner -> writer (a broadcast over all ranks when `to_all`): the shape goes first
    in a small int64 tensor, then the data. Ranks that do not receive return None. All ranks must
    call this for the same tensors in the same order (export walks the registry in order).
    """
    rank, size = world()
    if size == 1:
        return full
    if owner == writer and not to_all:
        return full if rank == writer else None
    header = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64, device=_comm_device(full if rank == owner else None))
    if rank == owner:
        assert full is not None and full.dim() <= _MAX_DIMS
        header[0] = full.dim()
        header[1:1 + full.dim()] = torch.tensor(full.shape, dtype=torch.int64)
        full = full.detach().contiguous()
    if to_all:
        dist.broadcast(header, src=owner)
    elif rank == owner:
        dist.send(header, dst=writer)
    elif rank == writer:
        dist.recv(header, src=owner)
    else:
        return None
    if rank != owner:
        shape = header[1:1 + int(header[0])].tolist()
        full = torch.empty(shape, dtype=dtype, device=header.device)
    if to_all:
        dist.broadcast(full, src=owner)
        return full
    if rank == owner:
        dist.send(full, dst=writer)
        return None
    dist.recv(full, src=owner)
    return full
