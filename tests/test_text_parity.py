"""fp32 logits of the converted megatron NemotronH model equal transformers' NemotronHForCausalLM."""

import pytest
import torch

from bridge import AutoBridge
from bridge.tiny_models import build_hf_model, save_hf_model, tiny_config
from tests.parity import hf_logits, max_error, megatron_logits, tolerance

CONFIGS = {
    # every layer kind (M, *, -, E), GQA 4 heads / 2 KV heads, vocab 300 (not a multiple of 128)
    "gqa": dict(),
    # MQA (one KV head), a different pattern order, experts at a different count
    "mqa": dict(pattern="EM-*M", num_kv_heads=1, n_routed_experts=6, num_experts_per_tok=3, vocab_size=259),
    # a layer_norm_epsilon other than megatron's literal 1e-5 in the Mamba gated norm (it differed by 2.2)
    "eps": dict(pattern="M*M-", layer_norm_epsilon=1e-2),
}
# 19 and 137: not multiples of the HF chunk (8) nor megatron's (128); 137 spans two megatron chunks.
SEQ_LENS = (19, 137)


def convert(tmp_path, name, seed=0):
    hf_model = build_hf_model(tiny_config(**CONFIGS[name]), seed=seed)
    hf_dir = save_hf_model(hf_model, tmp_path / f"hf_{name}")
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    model = bridge.to_megatron_provider().provide()
    bridge.load_hf_weights(model)
    return hf_model, bridge, model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(parallel_state, tmp_path, name):
    hf_model, _, model = convert(tmp_path, name)
    vocab = hf_model.config.vocab_size
    for seq in SEQ_LENS:
        ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seq))
        ref = hf_logits(hf_model, ids)
        got = megatron_logits(model, ids)
        assert got.shape == (2, seq, 384)  # vocab padded to a multiple of 128
        err = max_error(got, ref)
        print(f"{name} seq={seq}: max|dlogit|={err:.3e} (tol {tolerance(ref):.3e}, max|logit|={ref.abs().max():.2f})")
        assert err <= tolerance(ref), (name, seq, err)


def _swap(t: torch.Tensor, a: slice, b: slice) -> None:
    with torch.no_grad():
        ta, tb = t[a].clone(), t[b].clone()
        t[a], t[b] = tb, ta


def _break_experts(model, bridge):
    layer = model.decoder.layers[bridge.config.text["_pattern"].index("E")]
    e0, e1 = layer.mlp.experts.local_experts[0], layer.mlp.experts.local_experts[1]
    with torch.no_grad():
        w0 = e0.linear_fc1.weight.clone()
        e0.linear_fc1.weight.copy_(e1.linear_fc1.weight)
        e1.linear_fc1.weight.copy_(w0)


def _break_in_proj_bc(model, bridge):
    c = model.config
    layer = model.decoder.layers[bridge.config.text["_pattern"].index("M")]
    d_in, gn = c.mamba_num_heads * c.mamba_head_dim, c.mamba_num_groups * c.mamba_state_dim
    b = slice(2 * d_in, 2 * d_in + gn)
    cc = slice(2 * d_in + gn, 2 * d_in + 2 * gn)
    _swap(layer.mixer.in_proj.weight, b, cc)


def _break_qkv_groups(model, bridge):
    layer = model.decoder.layers[bridge.config.text["_pattern"].index("*")]
    w = layer.self_attention.linear_qkv.weight
    half = w.shape[0] // 2
    _swap(w, slice(0, 16), slice(half, half + 16))  # first query head of group 0 <-> of group 1


@pytest.mark.parametrize("breakage", [_break_experts, _break_in_proj_bc, _break_qkv_groups])
def test_parity_catches_a_broken_mapping(parallel_state, tmp_path, breakage):
    """The parity check is sharp: a swapped expert / B-C block / query group makes it fail."""
    hf_model, bridge, model = convert(tmp_path, "gqa")
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf_model, ids)
    assert max_error(megatron_logits(model, ids), ref) <= tolerance(ref)
    breakage(model, bridge)
    assert max_error(megatron_logits(model, ids), ref) > 100 * tolerance(ref)
