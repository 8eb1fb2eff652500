"""Providers of the Nemotron VL / Omni models (Megatron-Bridge's documented API).

`NemotronVLModelProvider` (abstract) adds the vision fields and the builders of the RADIO ViT-H
vision config and the vision-projection config to the NemotronH language-model provider;
`NemotronOmniModelProvider` adds the Parakeet sound encoder behind `has_sound` and assembles
`providers.omni_model.NemotronOmniModel`. With `has_sound=False` it is the VL model.

The vision encoder and the projections are pinned to the first pipeline stage: their configs use
pipeline size 1 and they are built only where `pre_process` is true.
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.activations import squared_relu
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer import TransformerConfig

from conversion.dtypes import dtype_from_name
from providers.mamba_provider import NemotronHModelProvider, use_transformer_engine


def carried_tensor_module(carried: dict) -> torch.nn.Module:
    """Buffers named like `conversion.omni.carried_megatron_name` ('.' -> '__'), zero-filled."""
    return tensor_tree({name.replace(".", "__"): meta for name, meta in carried.items()})


def tensor_tree(tensors: dict, float_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Nested modules holding a zero buffer at each dotted name of `tensors` (name -> {shape,
    dtype}; floating-point ones in `float_dtype` when given, as `module.to(float_dtype)` would leave
    them): a module's state-dict structure without the module (see `sound_encoder_structure`)."""
    root = torch.nn.Module()
    for name, meta in sorted(tensors.items()):
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        dtype = dtype_from_name(meta["dtype"])
        if float_dtype is not None and dtype.is_floating_point:
            dtype = float_dtype
        module.register_buffer(leaf, torch.zeros(meta["shape"], dtype=dtype))
    return root


def _derived(base, **overrides):
    """A finalized copy of `base` (a provider / TransformerConfig) with `overrides` applied."""
    cfg = copy.copy(base)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    TransformerConfig.__post_init__(cfg)
    return cfg


# An encoder / projection config derived from the language model's: no Mamba pattern, no experts
# (megatron rejects EP > 1 without them), no sequence parallel (the merge happens on the full sequence).
_ENCODER = dict(is_hybrid_model=False, hybrid_override_pattern=None, num_moe_experts=None,
                moe_shared_expert_intermediate_size=None, moe_router_topk_scaling_factor=None,
                moe_ffn_hidden_size=None, first_last_layers_bf16=False, sequence_parallel=False,
                expert_model_parallel_size=1)
# ... and pinned to the first pipeline stage (the Omni provider: its LM trains with PP > 1).
_FIRST_STAGE = dict(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
                    num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None)


@dataclass
class NemotronVLModelProvider(NemotronHModelProvider, abc.ABC):
    """Common vision-language fields; the language model defaults are Nemotron-3-Nano's."""

    # The documented VL defaults that differ from the NemotronH provider's; the others it lists
    # (mamba_num_groups=8, make_vocab_size_divisible_by=128, masked_softmax_fusion, the sigmoid
    # router with fp32 expert bias and seq_aux_loss 1e-4, grouped GEMM, alltoall, ...) are inherited
    # with the same values (tests/test_providers.py checks every one).
    num_query_groups: int = 8
    activation_func: Callable = None  # set to squared ReLU for the language model at build time
    scatter_embedding_sequence_parallel: bool = False

    vision_model_type: str = "radio"
    language_model_type: str = "nemotron5-hybrid-30b-a3b"
    image_token_index: int = 0
    img_start_token_id: int = 0
    img_end_token_id: int = 0
    tokenizer_type: str = "nemotron-h-5p5-reasoning"
    dynamic_resolution: bool = False
    use_vision_backbone_fp8_arch: bool = True
    radio_force_eval_mode: bool = True
    radio_force_cpe_eval_mode: bool = True
    radio_interpolate_only_cpe: bool = True
    radio_cpe_aspect_ratio_select: bool = False
    radio_disable_cpe: bool = False
    vision_proj_ffn_hidden_size: int = 20480
    vision_class_token_len: Optional[int] = None  # None: cls + register tokens of RADIO-H (10)
    freeze_language_model: bool = False
    freeze_vision_model: bool = False
    freeze_vision_projection: bool = False

    # RADIO ViT-H sizes (the HF config's vision_config overrides them).
    vision_num_layers: int = 32
    vision_hidden_size: int = 1280
    vision_num_attention_heads: int = 16
    vision_ffn_hidden_size: int = 5120
    vision_patch_dim: int = 16
    vision_max_img_size: int = 2048
    vision_layernorm_epsilon: float = 1e-6
    downsample_ratio: float = 0.5
    projector_layernorm_epsilon: float = 1e-5
    video_pruning_rate: float = 0.0
    # HF tensors the model computes nothing with but carries for a bit-exact round trip
    # (RADIO summary_idxs, input-conditioner mean/std, layer scales): name -> {shape, dtype}.
    carried_tensors: Optional[dict] = None

    # Overrides every encoder / projection config gets (a class attribute, not a field). The VL base
    # keeps the language model's pipeline settings (the dense VL recipe runs PP=1).
    _encoder_overrides = _ENCODER

    def _build_vision_config(self, language_cfg) -> TransformerConfig:
        """RADIO ViT-H: pre-LayerNorm blocks with biases, GELU MLP, bidirectional attention."""
        return _derived(
            language_cfg, **self._encoder_overrides, num_layers=self.vision_num_layers,
            hidden_size=self.vision_hidden_size, num_attention_heads=self.vision_num_attention_heads,
            num_query_groups=self.vision_num_attention_heads,
            kv_channels=self.vision_hidden_size // self.vision_num_attention_heads,
            ffn_hidden_size=self.vision_ffn_hidden_size, normalization="LayerNorm",
            layernorm_epsilon=self.vision_layernorm_epsilon, add_bias_linear=True, add_qkv_bias=True,
            gated_linear_unit=False, activation_func=F.gelu, bias_activation_fusion=False,
        )

    def _projection_config(self, language_cfg, ffn_hidden_size: int) -> TransformerConfig:
        """RMSNorm -> linear -> squared ReLU -> linear (the transformers reference computes relu2)."""
        return _derived(
            language_cfg, **self._encoder_overrides, num_layers=1, ffn_hidden_size=ffn_hidden_size,
            normalization="RMSNorm", layernorm_epsilon=self.projector_layernorm_epsilon,
            add_bias_linear=False, gated_linear_unit=False, activation_func=squared_relu,
        )

    def _build_vision_projection_config(self, language_cfg) -> TransformerConfig:
        return self._projection_config(language_cfg, self.vision_proj_ffn_hidden_size)

    def provide_language_model(self, pre_process=None, post_process=None, vp_stage=None):
        lm = copy.copy(self)
        if lm.activation_func is None:
            lm.activation_func = squared_relu
        return NemotronHModelProvider.provide(lm, pre_process, post_process, vp_stage)

    def _class_token_len(self) -> int:
        return self.vision_class_token_len if self.vision_class_token_len is not None else 10


@dataclass
class NemotronOmniModelProvider(NemotronVLModelProvider):
    """Nemotron Omni: VL + optional Parakeet sound encoder; defaults are Nano-Omni-30B-A3B's."""

    num_query_groups: int = 2  # the 30B-A3B language model has 2 KV heads
    has_sound: bool = False
    sound_model_type: str = "parakeet"
    sound_hidden_size: int = 1024
    sound_projection_hidden_size: int = 4096
    sound_context_token_id: int = 0
    sound_config: Optional[dict] = None
    # Conversion only: the Parakeet encoder's tensors (name under `encoder.` -> {shape, dtype}); the
    # model then holds just their structure (`tensor_tree`), which is all a checkpoint's layout
    # needs, instead of transformers' module (whose import costs seconds).
    sound_encoder_structure: Optional[dict] = None
    freeze_sound_encoder: bool = False
    freeze_sound_projection: bool = False
    temporal_patch_dim: int = 1
    separate_video_embedder: bool = False
    temporal_ckpt_compat: bool = False  # Megatron-Bridge API field; no checkpoint here needs it (no effect)

    # _build_vision_config / _build_vision_projection_config (inherited) pin to the first stage.
    _encoder_overrides = {**_ENCODER, **_FIRST_STAGE}

    def _build_sound_projection_config(self, language_cfg) -> TransformerConfig:
        return self._projection_config(language_cfg, self.sound_projection_hidden_size)

    def _build_sound_encoder(self, language_cfg):
        from providers.omni_model import SoundEncoder

        if self.sound_encoder_structure is not None:
            return SoundEncoder(language_cfg, tensor_tree(self.sound_encoder_structure, language_cfg.params_dtype))
        if not self.sound_config:
            raise ValueError("has_sound=True needs sound_config (the HF Parakeet encoder config)")
        return SoundEncoder(language_cfg, self.sound_config)

    def provide(self, pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                vp_stage: Optional[int] = None):
        from providers.layer_specs import get_projector_mlp_submodules, get_vit_layer_spec
        from providers.omni_model import NemotronOmniModel, RadioVisionModel

        # The language model is built first: its provider sets up megatron's parallel state when none
        # exists, and decides whether this chunk is the first pipeline stage (the encoders' home).
        language_model = self.provide_language_model(pre_process, post_process, vp_stage)
        pre_process = language_model.pre_process
        lm_cfg = language_model.config
        te = use_transformer_engine()
        parts = {}
        if pre_process:  # encoders and projections live on the first pipeline stage only
            parts["vision_model"] = RadioVisionModel(
                self._build_vision_config(lm_cfg), get_vit_layer_spec(te), patch_dim=self.vision_patch_dim,
                max_img_size=self.vision_max_img_size, class_token_len=self._class_token_len(),
                temporal_patch_dim=self.temporal_patch_dim, separate_video_embedder=self.separate_video_embedder)
            parts["vision_projection"] = MultimodalProjector(
                self._build_vision_projection_config(lm_cfg), get_projector_mlp_submodules(te), "mlp",
                input_size=self.vision_hidden_size * int(1 / self.downsample_ratio) ** 2)
            if self.has_sound:
                parts["sound_encoder"] = self._build_sound_encoder(lm_cfg)
                parts["sound_projection"] = MultimodalProjector(
                    self._build_sound_projection_config(lm_cfg), get_projector_mlp_submodules(te), "mlp",
                    input_size=self.sound_hidden_size)
            if self.carried_tensors:
                parts["hf_extras"] = carried_tensor_module(self.carried_tensors)
        model = NemotronOmniModel(
            lm_cfg, language_model, image_token_index=self.image_token_index,
            sound_context_token_id=self.sound_context_token_id, downsample_ratio=self.downsample_ratio,
            video_pruning_rate=self.video_pruning_rate, **parts)
        self._freeze(model)
        return model

    def _freeze(self, model) -> None:
        for flag, module in ((self.freeze_language_model, model.language_model),
                             (self.freeze_vision_model, model.vision_model),
                             (self.freeze_vision_projection, model.vision_projection),
                             (self.freeze_sound_encoder, model.sound_encoder),
                             (self.freeze_sound_projection, model.sound_projection)):
            if flag and module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)
