"""Logits of a megatron model vs the transformers reference on the same inputs."""

from __future__ import annotations

import torch


def megatron_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    with torch.no_grad():
        return model(input_ids, position_ids, attention_mask=None).float()


def hf_logits(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    hf_model.eval()
    with torch.no_grad():
        return hf_model(input_ids=input_ids, use_cache=False).logits.float()


def max_error(megatron: torch.Tensor, reference: torch.Tensor) -> float:
    """max |delta| over the real vocab (megatron's logits carry the vocab padding at the end)."""
    assert megatron.shape[:-1] == reference.shape[:-1], (megatron.shape, reference.shape)
    return (megatron[..., : reference.shape[-1]] - reference).abs().max().item()


def tolerance(reference: torch.Tensor) -> float:
    """The project's fp32 parity bound: 2e-5 * max(1, max |logit|)."""
    return 2e-5 * max(1.0, reference.abs().max().item())
