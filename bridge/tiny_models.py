"""Tiny NemotronH checkpoints built with transformers' own classes (random weights), for the
quick start, the examples and the tests. Never downloads anything."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

# Every layer kind, twice, so that layer indices and kinds both matter.
PATTERN = "M*-EM*E-"


def tiny_config(pattern: str = PATTERN, num_kv_heads: int = 2, vocab_size: int = 300, **overrides) -> NemotronHConfig:
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, layers_block_type=[
            {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}[c] for c in pattern],
        num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16, intermediate_size=96,
        mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16, chunk_size=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return NemotronHConfig(**kwargs)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, including the ones transformers initialises to constants
    (A_log, D, dt_bias, norms, the router correction bias), so a swapped mapping shows in logits."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t, std, mean=0.0):
        t.copy_((torch.randn(t.shape, generator=g) * std + mean).to(t.dtype))

    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("A_log"):
            rnd(p, 0.5, 0.5)
        elif name.endswith(".D"):
            rnd(p, 1.0)
        elif name.endswith("dt_bias"):
            rnd(p, 0.5)
        elif name.endswith("e_score_correction_bias"):
            rnd(p, 0.3)
        elif "norm" in name:
            rnd(p, 0.1, 1.0)
        elif "conv1d" in name:
            rnd(p, 0.3)
        elif p.dtype.is_floating_point:
            rnd(p, 0.08)
    return model


def build_hf_model(config: Optional[NemotronHConfig] = None, seed: int = 0) -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(config or tiny_config()).eval()
    return randomize(model, seed)


def save_hf_model(model, path: Path, dtype: torch.dtype = torch.float32, max_shard_size: Optional[str] = None) -> Path:
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return Path(path)
