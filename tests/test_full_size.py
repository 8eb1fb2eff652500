"""The full-size Nemotron-3-Nano-Omni language model (reference config) on the meta device.

No weights are allocated: transformers' NemotronHForCausalLM and the megatron model are both built
on `torch.device("meta")`. The parameter counts must agree, and every HF tensor name the released
checkpoint has (as transformers writes it) must be in the name table, and nothing more.
"""

import json
from pathlib import Path

import torch
from transformers import NemotronHConfig, NemotronHForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from bridge import AutoBridge
from conversion import hf_config

DATA = Path(__file__).parent / "data"
CONFIGS = ("nemotron-3-nano-omni-30b-a3b.config.json",
           "nemotron-3-nano-omni-30b-a3b.released-field-names.config.json")


def _text_only_bridge(tmp_path, raw_text: dict) -> AutoBridge:
    (tmp_path / "config.json").write_text(json.dumps(raw_text))
    return AutoBridge.from_hf_pretrained(tmp_path)


def _hf_on_disk_names(text: dict):
    cfg = NemotronHConfig(**{k: v for k, v in text.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    return revert_weight_conversion(model, model.state_dict()), n_params


def test_both_config_schemes_read_the_same_language_model():
    a, b = (hf_config.parse_config(json.loads((DATA / c).read_text())) for c in CONFIGS)
    assert (a.scheme, b.scheme) == ("transformers", "released")
    assert hf_config.provider_fields(a) == hf_config.provider_fields(b)
    fields = hf_config.provider_fields(a)
    assert fields["hybrid_override_pattern"] == "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    assert (fields["num_layers"], fields["hidden_size"], fields["num_moe_experts"], fields["moe_router_topk"]) == (52, 2688, 128, 6)


def test_full_size_language_model_on_meta(parallel_state, tmp_path):
    text = json.loads((DATA / CONFIGS[0]).read_text())["text_config"]
    text = {**text, "architectures": ["NemotronHForCausalLM"]}
    hf_state, hf_params = _hf_on_disk_names(text)

    bridge = _text_only_bridge(tmp_path, text)
    # Every on-disk HF name is in the table, and the table names nothing else.
    assert sorted(bridge.hf_names()) == sorted(hf_state)
    assert len(hf_state) == 6243

    provider = bridge.to_megatron_provider()
    # the provider's defaults are this model
    from providers import NemotronHModelProvider

    default = NemotronHModelProvider()
    for name, value in bridge.provider_fields().items():
        assert getattr(default, name) == value, name
    provider.perform_initialization = False
    with torch.device("meta"):
        model = provider.provide()
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert model.vocab_size == 131072  # already a multiple of 128: no padding
    assert sum(p.numel() for p in params) == hf_params == 31_577_937_344

    # each megatron tensor has exactly one rule, and its shape is what the rule's HF tensors give
    from bridge import weights as W

    names = W.canonical_names(model)
    rules = {r.megatron: r for r in bridge.mappings()}
    assert sorted(names) == sorted(rules)


def test_full_size_omni_on_meta(parallel_state):
    """The released Omni model (reference config): every HF tensor mapped, and the megatron model's
    parameters (+ the carried RADIO layer-scale vectors, which the megatron ViT layer does not have)
    number exactly transformers' 33,015,628,736."""
    from transformers import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config

    from bridge import weights as W
    from conversion.dtypes import dtype_name

    raw = json.loads((DATA / CONFIGS[0]).read_text())
    raw["architectures"] = ["NemotronH_Omni_Reasoning_V3"]
    with torch.device("meta"):
        hf = NemotronH_Omni_Reasoning_V3(NemotronH_Omni_Reasoning_V3_Config(
            **{k: v for k, v in raw.items() if not k.startswith("_")}))
    hf_params = sum(p.numel() for p in hf.parameters())
    hf_state = revert_weight_conversion(hf, hf.state_dict())
    assert hf_params == 33_015_628_736

    manifest = {n: {"file": "model.safetensors", "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
                for n, t in hf_state.items()}
    bridge = AutoBridge(hf_config.parse_config(raw), manifest=manifest)
    assert sorted(bridge.hf_names()) == sorted(hf_state)

    provider = bridge.to_megatron_provider()
    assert provider.has_sound and provider.separate_video_embedder and provider.temporal_patch_dim == 2
    provider.perform_initialization = False
    with torch.device("meta"):
        model = provider.provide()
    assert all(p.device.type == "meta" for p in model.parameters())
    layer_scales = sum(b.numel() for n, b in model.hf_extras.named_buffers() if "layer_scale" in n)
    assert layer_scales == 32 * 2 * 1280
    assert sum(p.numel() for p in model.parameters()) + layer_scales == hf_params
    assert sorted(bridge._chunk_tensors(model)) == sorted(r.megatron for r in bridge.mappings())
