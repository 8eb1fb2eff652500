"""Layout errors are caught before any work, with a message naming the sizes (in process)."""

import pytest

from bridge.parallel import check_layout, layout_problems
from conversion.errors import ConversionError

# The tiny test model's sizes (bridge/tiny_models.py) as provider fields.
TINY = dict(num_attention_heads=4, num_query_groups=2, mamba_num_heads=8, mamba_num_groups=2, num_moe_experts=4,
            ffn_hidden_size=96, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=48,
            hybrid_override_pattern="M*-EM*E-", num_layers=8)


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), dict(pp=2, vpp=2), dict(ep=2), dict(tp=2, ep=2, etp=1),
                                    dict(tp=2, ep=4, etp=1, pp=2), dict(pp=8), dict(tp=2, etp=2)])
def test_valid_layouts(layout):
    assert layout_problems(TINY, **layout) == []


@pytest.mark.parametrize("layout, words", [
    (dict(tp=4), ["KV heads (query groups) (2) is not divisible by TP=4", "Mamba groups (2) is not divisible by TP=4"]),
    (dict(tp=3), ["attention heads (4)", "Mamba heads (8)", "TP=3"]),
    (dict(ep=3), ["routed experts (4) is not divisible by EP=3"]),
    (dict(pp=3), ["layers (8) are not divisible by PP=3"]),
    (dict(pp=2, vpp=3), ["layers (8) are not divisible by PP=2 x VPP=3 = 6 pipeline chunks"]),
    (dict(vpp=2), ["VPP=2 needs PP >= 2"]),
    (dict(tp=1, etp=3), ["expert hidden size (moe_ffn_hidden_size) (32) is not divisible by ETP=3"]),
    (dict(tp=2, pp=2, world=2), ["world size 2 is not divisible by TP=2 x PP=2"]),
    (dict(tp=0), ["TP=0 must be a positive integer"]),
])
def test_bad_layouts_name_the_sizes(layout, words):
    with pytest.raises(ConversionError) as e:
        check_layout(TINY, **layout)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_dense_model_rejects_ep():
    dense = dict(TINY, hybrid_override_pattern="M*-M*-", num_layers=6, num_moe_experts=None)
    assert "needs a model with MoE layers" in " ".join(layout_problems(dense, ep=2))


def test_padded_vocab_must_split_over_tp():
    assert "padded vocab (384) is not divisible by TP=256" in " ".join(
        layout_problems(dict(TINY, num_attention_heads=256, num_query_groups=256, mamba_num_heads=256,
                             mamba_num_groups=256, ffn_hidden_size=256 * 4, moe_ffn_hidden_size=256,
                             moe_shared_expert_intermediate_size=256), tp=256, padded_vocab_size=384))


def test_provide_checks_the_layout_before_building(parallel_state):
    """A provider whose fields clash with the initialised parallel state, or whose sizes do not
    fit, fails in provide() with the sizes named, before any module is built."""
    from bridge import AutoBridge
    from bridge.tiny_models import build_hf_model, save_hf_model, tiny_config
    import tempfile, pathlib

    with tempfile.TemporaryDirectory() as d:
        hf_dir = save_hf_model(build_hf_model(tiny_config()), pathlib.Path(d) / "hf")
        provider = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    with pytest.raises(ConversionError, match=r"TP: provider 2 vs parallel state 1"):
        provider.provide()


def test_padded_vocab_is_independent_of_tp():
    from providers import NemotronHModelProvider

    p = NemotronHModelProvider(vocab_size=300)
    sizes = set()
    for tp in (1, 2, 4, 8):
        p.tensor_model_parallel_size = tp
        sizes.add(p.padded_vocab_size())
    assert sizes == {384}
    p.tensor_model_parallel_size = 3  # does not divide 128: megatron's divisor x TP
    assert p.padded_vocab_size() == 384
    p.padded_vocab = 512  # recorded by a checkpoint: used as is
    p.tensor_model_parallel_size = 2
    assert p.padded_vocab_size() == 512
