"""The providers' documented fields and defaults (Megatron-Bridge's API for the Omni providers)."""

import torch

VL_DEFAULTS = dict(
    mamba_num_groups=8, num_query_groups=8, make_vocab_size_divisible_by=128, activation_func=None,
    masked_softmax_fusion=True, apply_query_key_layer_scaling=False, persist_layer_norm=True,
    first_last_layers_bf16=True, is_hybrid_model=True, moe_aux_loss_coeff=1e-4, moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True, moe_router_load_balancing_type="seq_aux_loss", moe_router_dtype="fp32",
    moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall", moe_permute_fusion=True,
    moe_shared_expert_overlap=True, scatter_embedding_sequence_parallel=False, attention_softmax_in_fp32=True,
    vision_model_type="radio", image_token_index=0, img_start_token_id=0, img_end_token_id=0,
    dynamic_resolution=False, use_vision_backbone_fp8_arch=True, radio_force_eval_mode=True,
    radio_force_cpe_eval_mode=True, radio_interpolate_only_cpe=True, radio_cpe_aspect_ratio_select=False,
    radio_disable_cpe=False, vision_proj_ffn_hidden_size=20480, vision_class_token_len=None,
    freeze_language_model=False, freeze_vision_model=False, freeze_vision_projection=False,
)
OMNI_DEFAULTS = dict(
    has_sound=False, sound_model_type="parakeet", sound_hidden_size=1024, sound_projection_hidden_size=4096,
    sound_context_token_id=0, sound_config=None, freeze_sound_encoder=False, freeze_sound_projection=False,
    temporal_patch_dim=1, separate_video_embedder=False, temporal_ckpt_compat=False,
)


def test_vl_and_omni_provider_defaults():
    from bridge.models.nemotron_omni.nemotron_omni_provider import (
        NemotronOmniModelProvider, NemotronVLModelProvider)
    from providers import MambaModelProvider

    assert issubclass(NemotronVLModelProvider, MambaModelProvider)
    assert issubclass(NemotronOmniModelProvider, NemotronVLModelProvider)
    vl_fields = NemotronVLModelProvider.__dataclass_fields__
    for name, value in VL_DEFAULTS.items():
        assert vl_fields[name].default == value, name
    assert {"language_model_type", "tokenizer_type"} <= set(vl_fields)
    omni = NemotronOmniModelProvider()
    for name, value in {**VL_DEFAULTS, **OMNI_DEFAULTS}.items():
        if name != "num_query_groups":  # the Omni's 30B-A3B language model has 2 KV heads
            assert getattr(omni, name) == value, name
    for method in ("_build_vision_config", "_build_vision_projection_config", "provide_language_model",
                   "_build_sound_projection_config", "_build_sound_encoder", "provide"):
        assert callable(getattr(omni, method)), method


def test_nemotron_h_provider_release_settings():
    from megatron.core.activations import squared_relu

    from providers import NemotronHModelProvider

    p = NemotronHModelProvider()
    assert p.activation_func is squared_relu and p.normalization == "RMSNorm" and not p.add_bias_linear
    assert p.position_embedding_type == "none" and p.make_vocab_size_divisible_by == 128
    assert (p.moe_router_score_function, p.moe_router_enable_expert_bias, p.moe_router_dtype) == ("sigmoid", True, "fp32")
    assert (p.moe_router_load_balancing_type, p.moe_aux_loss_coeff, p.moe_router_topk_scaling_factor) == ("seq_aux_loss", 1e-4, 2.5)
    assert p.attention_softmax_in_fp32 and p.first_last_layers_bf16 and p.persist_layer_norm and p.masked_softmax_fusion
    assert p.params_dtype == torch.bfloat16
