"""Pure conversion pieces: transforms, sharding, config parsing (no megatron, milliseconds)."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from conversion import hf_config
from conversion.errors import ConversionError
from conversion.mappings import Dims, Kind
from conversion.nemotron_h import canonical_expert_name, language_model_mappings, localise_expert_name

DATA = Path(__file__).parent / "data"
DIMS = Dims(vocab_size=300, padded_vocab_size=384, num_attention_heads=8, num_query_groups=2, kv_channels=4,
            mamba_num_heads=8, mamba_head_dim=4, mamba_num_groups=4, mamba_state_dim=3)


def test_fused_qkv_groups_queries_then_key_then_value():
    hidden = 5
    q = torch.arange(8 * 4).repeat_interleave(hidden).reshape(32, hidden).float()
    k = -1 - torch.arange(2 * 4).repeat_interleave(hidden).reshape(8, hidden).float()
    v = 1000 + torch.arange(2 * 4).repeat_interleave(hidden).reshape(8, hidden).float()
    qkv = Kind.QKV.to_megatron([q, k, v], DIMS)
    # group 0: query heads 0..3 (rows 0..15), key head 0 (rows 0..3 of k), value head 0
    assert torch.equal(qkv[:16], q[:16]) and torch.equal(qkv[16:20], k[:4]) and torch.equal(qkv[20:24], v[:4])
    assert torch.equal(qkv[24:40], q[16:]) and torch.equal(qkv[40:44], k[4:]) and torch.equal(qkv[44:], v[4:])
    assert all(torch.equal(a, b) for a, b in zip(Kind.QKV.to_hf(qkv, DIMS), (q, k, v)))


@pytest.mark.parametrize("kind,shape", [
    (Kind.COLUMN, (8, 6)), (Kind.ROW, (6, 8)), (Kind.QKV, (48, 5)), (Kind.VOCAB, (384, 5)),
    (Kind.MAMBA_IN_PROJ, (2 * 32 + 2 * 12 + 8, 5)), (Kind.MAMBA_CONV1D, (32 + 24, 1, 4)),
    (Kind.EXPERT_COLUMN, (6, 4)), (Kind.EXPERT_ROW, (4, 6)), (Kind.REPLICATED, (7,)),
])
@pytest.mark.parametrize("size", [1, 2])
def test_shard_unshard_round_trip(kind, shape, size):
    full = torch.randn(shape)
    shards = [kind.shard(full, r, size, DIMS) for r in range(size)]
    assert torch.equal(kind.unshard(shards, DIMS), full)


def test_mamba_in_proj_is_split_per_component():
    sizes = [32, 32, 12, 12, 8]  # z, x, B, C, dt of DIMS
    assert Kind.MAMBA_IN_PROJ.sizes(DIMS) == sizes
    full = torch.cat([torch.full((n, 1), float(i)) for i, n in enumerate(sizes)])
    rank1 = Kind.MAMBA_IN_PROJ.shard(full, 1, 2, DIMS)
    expected = torch.cat([torch.full((n // 2, 1), float(i)) for i, n in enumerate(sizes)])
    assert torch.equal(rank1, expected)


def test_vocab_padding_added_and_removed():
    emb = torch.randn(300, 4)
    padded = Kind.VOCAB.to_megatron([emb], DIMS)
    assert padded.shape == (384, 4) and torch.equal(padded[300:], torch.zeros(84, 4))
    assert torch.equal(Kind.VOCAB.to_hf(padded, DIMS)[0], emb)


def test_expert_names_localise_for_sequential_and_grouped_gemm():
    canonical = "decoder.layers.3.mlp.experts.local_experts.5.linear_fc2.weight"
    assert localise_expert_name(canonical, 4, False) == "decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight"
    assert localise_expert_name(canonical, 4, True) == "decoder.layers.3.mlp.experts.linear_fc2.weight1"
    for grouped in (False, True):
        assert canonical_expert_name(localise_expert_name(canonical, 4, grouped), 4) == canonical


TEXT = dict(hidden_size=6, vocab_size=300, mamba_num_heads=8, mamba_head_dim=4, n_groups=4, ssm_state_size=3,
            num_attention_heads=8, num_key_value_heads=2, head_dim=4, intermediate_size=10, n_routed_experts=3,
            moe_intermediate_size=5, moe_shared_expert_intermediate_size=7)


def test_rules_cover_each_layer_kind_once():
    rules = language_model_mappings({**TEXT, "_pattern": "M*-E"})
    megatron = [r.megatron for r in rules]
    hf = [h for r in rules for h in r.hf]
    assert len(set(megatron)) == len(megatron) and len(set(hf)) == len(hf)
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in megatron
    assert "backbone.layers.3.mixer.experts.2.down_proj.weight" in hf
    assert "lm_head.weight" in hf
    tied = {**TEXT, "_pattern": "M", "n_routed_experts": None, "tie_word_embeddings": True}
    assert "lm_head.weight" not in [h for r in language_model_mappings(tied) for h in r.hf]


def test_mapping_checks_exact_shapes_both_ways():
    """A tensor of the right element count but the wrong shape is refused, naming the formula."""
    (qkv,) = [m for m in language_model_mappings({**TEXT, "_pattern": "*"}) if m.kind is Kind.QKV]
    dims = Dims(num_attention_heads=8, num_query_groups=2, kv_channels=4)
    q, k, v = torch.randn(32, 6), torch.randn(8, 6), torch.randn(8, 6)
    fused = qkv.to_megatron([q, k, v], dims)
    assert [n for n, _ in qkv.to_hf(fused, dims)] == list(qkv.hf)
    with pytest.raises(ConversionError, match=r"q_proj.weight' has shape \(6, 32\), but config.json gives "
                                              r"\(32, 6\) = \[num_attention_heads\*head_dim, hidden_size\]"):
        qkv.to_megatron([q.reshape(6, 32), k, v], dims)
    with pytest.raises(ConversionError, match=r"Megatron tensor 'decoder.layers.0.self_attention.linear_qkv.weight' "
                                              r"has shape \(6, 48\), but config.json gives \(48, 6\)"):
        qkv.to_hf(fused.reshape(6, 48), dims)


def _released():
    return json.loads((DATA / "nemotron-3-nano-omni-30b-a3b.released-field-names.config.json").read_text())


def _transformers():
    return json.loads((DATA / "nemotron-3-nano-omni-30b-a3b.config.json").read_text())


@pytest.mark.parametrize("raw", [_released, _transformers], ids=["released", "transformers"])
def test_export_keeps_the_scheme_and_regenerates_values(raw):
    raw = raw()
    cfg = hf_config.parse_config(raw)
    fields = hf_config.provider_fields(cfg)
    assert hf_config.export_config(cfg, fields) == raw  # unchanged model: same config
    changed = dict(fields, hidden_size=1024, hybrid_override_pattern="M*E", num_layers=3)
    out = hf_config.export_config(cfg, changed)
    text = out[cfg.text_key]
    assert text["hidden_size"] == 1024
    if cfg.scheme == "released":
        assert text["hybrid_override_pattern"] == "M*E" and "layers_block_type" not in text
    else:
        assert text["layers_block_type"] == ["linear_attention", "full_attention", "moe"]


def test_bare_nemotron_h_config_and_old_aliases():
    text = copy.deepcopy(_released()["llm_config"])
    text["mamba_n_groups"] = text.pop("n_groups")
    cfg = hf_config.parse_config(text)
    assert cfg.scheme == "bare" and cfg.lm_prefix == ""
    fields = hf_config.provider_fields(cfg)
    assert fields["mamba_num_groups"] == 8
    out = hf_config.export_config(cfg, fields)
    assert out == text


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.pop("hidden_size"), "missing required field 'hidden_size'"),
    (lambda t: t.pop("hybrid_override_pattern"), "missing required field 'layers_block_type'"),
    (lambda t: t.__setitem__("hybrid_override_pattern", "MX"), "unknown symbol 'X'"),
    (lambda t: t.__setitem__("mlp_hidden_act", "gelu"), "'mlp_hidden_act' = 'gelu' is not supported"),
    (lambda t: t.__setitem__("n_routed_experts", "8"), "'n_routed_experts' must be a positive integer"),
    (lambda t: t.__setitem__("architectures", ["LlamaForCausalLM"]) or t.pop("model_type"), "unknown architecture"),
    (lambda t: t.__setitem__("attention_dropout", 0.1), "'attention_dropout' = 0.1 is not supported"),
])
def test_config_errors_name_the_field(mutate, message):
    text = copy.deepcopy(_released()["llm_config"])
    mutate(text)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("*", r"\*")):
        hf_config.parse_config(text)


def test_hf_tensors_are_mapped_copy_on_write(tmp_path):
    """`HFCheckpoint.get` maps the file instead of copying it: the values are the file's (odd
    offsets, several dtypes, an empty tensor), writing to a tensor never changes the file, and after
    `drop_pages` (the streaming writer's early release) it still reads the file's values."""
    from safetensors.torch import save_file

    from conversion.safetensors_io import HFCheckpoint, drop_pages

    tensors = {"a": torch.arange(3, dtype=torch.int8), "b": torch.randn(300, 700).to(torch.bfloat16),
               "c": torch.randn(5, 3), "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    before = (tmp_path / "model.safetensors").read_bytes()
    ckpt = HFCheckpoint(tmp_path)
    for name, want in tensors.items():
        got = ckpt.get(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    b = ckpt.get("b")
    b.fill_(1)
    drop_pages(b)
    assert torch.equal(ckpt.get("b"), tensors["b"])
    assert (tmp_path / "model.safetensors").read_bytes() == before
    c = ckpt.get("c")
    drop_pages(c)
    assert torch.equal(c, tensors["c"])
    # a mapping holds no file descriptor (torch's checkpoint writer keeps hundreds of tensors alive)
    fds = len(os.listdir("/proc/self/fd"))
    held = [ckpt.get("b") for _ in range(200)]
    assert len(os.listdir("/proc/self/fd")) == fds and torch.equal(held[-1], tensors["b"])


@pytest.mark.parametrize("field", ["drop_path_rate", "attention_probs_dropout_prob"])
def test_vision_training_regularisation_megatron_does_not_apply_is_refused(field):
    from conversion.omni import omni_provider_fields

    raw = copy.deepcopy(_released())
    raw["vision_config"][field] = 0.1
    with pytest.raises(ConversionError, match=f"vision_config.{field} = 0.1 is not supported"):
        omni_provider_fields(raw, "released", "config.json")


def test_a_tied_checkpoint_that_stores_lm_head_is_refused_naming_tie_word_embeddings(tmp_path):
    """transformers 5.24 stores lm_head.weight even with tie_word_embeddings = true."""
    from bridge.tiny_models import build_hf_model, save_hf_model, tiny_config
    from tests.cli_helpers import assert_clean_failure, run_cli

    hf = save_hf_model(build_hf_model(tiny_config(tie_word_embeddings=True), seed=2), tmp_path / "hf")
    proc = run_cli("convert-hf-to-mcore", "--hf-path", hf, "--output", tmp_path / "out")
    assert_clean_failure(proc, tmp_path / "out", "'lm_head.weight' is stored, but config.json says "
                         "tie_word_embeddings = true")
