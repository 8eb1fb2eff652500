"""Providers for megatron-core's hybrid Mamba language model (NemotronH).

A provider is a `TransformerConfig` dataclass plus the fields megatron keeps outside it (vocab,
hybrid pattern, sequence length, ...). Users set parallel sizes on it after construction, so the
config is validated in `finalize()` (called by `provide()`), not in `__post_init__`.

`provide()` builds the Transformer Engine layer specs when TE and a GPU are present; otherwise it
applies the CPU accommodations of `providers.cpu_compat` and builds the CPU spec, whose parameter
names are identical to the TE build's, so one checkpoint format serves both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.activations import squared_relu
from megatron.core.transformer import TransformerConfig

from providers.megatron_imports import HAVE_TE, HYBRID_PACKAGE, MambaModel, build_hybrid_model

# The hybrid pattern of Nemotron-3-Nano-30B-A3B: M = Mamba2, E = MoE, * = attention, - = MLP.
NEMOTRON_3_NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


# The layout policy (agree megatron's parallel state with the provider's fields, check the sizes,
# sequence parallel with TP x MoE) lives with the bridge: `bridge.parallel` registers its
# `setup_for_provider` here on import, so providers never import the bridge. Without it, provide()
# uses megatron's parallel state as the caller initialised it.
PARALLEL_SETUP: Optional[Callable[["MambaModelProvider"], dict]] = None


def _initialised_layout() -> dict:
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron's parallel state is not initialised: initialise it, or import bridge.parallel "
                           "(AutoBridge does) to create it from the provider's fields")
    return {"vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size()}


def use_transformer_engine() -> bool:
    """The TE path needs both the package and a GPU; everything else runs the CPU build."""
    return HAVE_TE and torch.cuda.is_available()


@dataclass
class MambaModelProvider(TransformerConfig):
    """Builds megatron-core's hybrid Mamba model (`MambaModel`) from dataclass fields."""

    # Fields megatron keeps outside TransformerConfig.
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 8192
    hybrid_attention_ratio: float = 0.0
    hybrid_mlp_ratio: float = 0.0
    hybrid_override_pattern: Optional[str] = None
    position_embedding_type: str = "none"
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    seq_len_interpolation_factor: Optional[float] = None
    share_embeddings_and_output_weights: bool = False
    fp16_lm_cross_entropy: bool = False
    parallel_output: bool = True
    scatter_embedding_sequence_parallel: bool = True
    # None: the TE spec where TE and a GPU are present, else the CPU spec (same parameter names).
    mamba_stack_spec: Optional[Callable] = None
    # The padded vocab a Megatron checkpoint was written with (bridge_meta.json), which fixes the
    # embedding / output-layer shape at any load-time TP. None: computed by `padded_vocab_size()`.
    padded_vocab: Optional[int] = None

    # Architecture defaults shared by the Mamba hybrids we build.
    normalization: str = "RMSNorm"
    add_bias_linear: bool = False
    gated_linear_unit: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    is_hybrid_model: bool = True

    def __post_init__(self):
        # Validation is deferred to finalize(): users set TP/PP/EP after construction.
        pass

    def finalize(self) -> None:
        """Run megatron's validation and derived-field logic (TransformerConfig.__post_init__)."""
        if self.num_layers == 0 and self.hybrid_override_pattern:
            self.num_layers = len(self.hybrid_override_pattern)
        TransformerConfig.__post_init__(self)

    # ------------------------------------------------------------------ building
    def padded_vocab_size(self) -> int:
        """The embedding / output-layer rows: the vocab padded so that any TP can split it.

        Megatron-LM pads to a multiple of make_vocab_size_divisible_by x TP, so the same vocab gets
        a different padded size at each TP (300 -> 384 at TP=1, 512 at TP=2) and a checkpoint
        written at one TP does not load at another (dist_checkpointing needs equal global shapes).
        Here the multiple is make_vocab_size_divisible_by alone whenever TP divides it (every TP up
        to 128 with the default divisor), so the padded size does not depend on TP; only a TP that
        does not divide the divisor falls back to divisor x TP. A checkpoint records the size it was
        written with (`padded_vocab`) and a model built from it uses exactly that size.
        """
        tp = self.tensor_model_parallel_size
        if self.padded_vocab is not None:
            if self.padded_vocab < self.vocab_size or self.padded_vocab % tp:
                raise ValueError(f"padded vocab {self.padded_vocab} (recorded in the checkpoint) must be >= the vocab "
                                 f"({self.vocab_size}) and divisible by TP={tp}")
            return self.padded_vocab
        divisor = self.make_vocab_size_divisible_by
        multiple = divisor if divisor % tp == 0 else divisor * tp
        return -(-self.vocab_size // multiple) * multiple

    def build_config(self) -> "MambaModelProvider":
        """A finalized copy of this provider, adapted to the machine (TE/GPU or CPU)."""
        cfg = copy.copy(self)
        if not use_transformer_engine():
            from providers import cpu_compat

            cpu_compat.apply_cpu_patches()
            for name, value in cpu_compat.cpu_config_overrides(cfg).items():
                setattr(cfg, name, value)
        cfg.finalize()
        return cfg

    def stack_spec(self, cfg: "MambaModelProvider"):
        if self.mamba_stack_spec is not None:
            spec = self.mamba_stack_spec
            return spec() if callable(spec) and not hasattr(spec, "module") else spec
        from providers.layer_specs import get_mamba_stack_spec

        return get_mamba_stack_spec(use_te=use_transformer_engine(), moe_grouped_gemm=cfg.moe_grouped_gemm)

    def provide(self, pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                vp_stage: Optional[int] = None) -> MambaModel:
        """Build this rank's model (one virtual-pipeline chunk when `vp_stage` is given).

        The parallel layout is megatron's parallel state when initialised, else this provider's
        fields (the state is then created); it is checked against the sizes first
        (`PARALLEL_SETUP`, which `bridge.parallel` registers). With virtual pipeline stages use
        `bridge.parallel.build_model`, which builds every chunk of the rank.
        """
        if self.vocab_size is None:
            raise ValueError("MambaModelProvider.vocab_size must be set")
        state = PARALLEL_SETUP(self) if PARALLEL_SETUP is not None else _initialised_layout()
        if state["vpp"] is not None and vp_stage is None:
            raise ValueError(f"virtual pipeline stages (VPP={state['vpp']}) are set: build each chunk with "
                             "provide(vp_stage=v) or use bridge.parallel.build_model(provider)")
        cfg = self.build_config()
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        spec = self.stack_spec(cfg)
        if vp_stage is not None and not HYBRID_PACKAGE:  # 0.16.1 (0.19.2: the model picks the chunk's layers)
            spec = virtual_stage_stack_spec(spec, vp_stage)
        return build_hybrid_model(
            config=cfg,
            stack_spec=spec,
            pattern=self.hybrid_override_pattern,
            vp_stage=vp_stage,
            vocab_size=self.padded_vocab_size(),
            max_sequence_length=self.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            hybrid_attention_ratio=self.hybrid_attention_ratio,
            hybrid_mlp_ratio=self.hybrid_mlp_ratio,
            fp16_lm_cross_entropy=self.fp16_lm_cross_entropy,
            parallel_output=self.parallel_output,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            position_embedding_type=self.position_embedding_type,
            rotary_percent=self.rotary_percent,
            rotary_base=self.rotary_base,
            seq_len_interpolation_factor=self.seq_len_interpolation_factor,
            scatter_embedding_sequence_parallel=self.scatter_embedding_sequence_parallel,
        )


# ---------------------------------------------------------------------------- virtual pipeline

class _FlatPipelineGroup:
    """rank()/size() of a pipeline flattened over virtual stages (construction-time view only)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


_VIRTUAL_STAGE_CLASSES: dict = {}


def _virtual_stage_stack_class(base):
    """`base` (megatron-core 0.16.1's MambaStack or a subclass) for one virtual pipeline stage."""
    if base in _VIRTUAL_STAGE_CLASSES:
        return _VIRTUAL_STAGE_CLASSES[base]

    class VirtualStageMambaStack(base):
        """megatron-core 0.16.1's MambaStack for one virtual pipeline stage.

        MambaStack asserts `virtual_pipeline_model_parallel_size is None` when it picks its layers.
        Interleaved stages put chunk `v` of pipeline rank `r` at position `v * PP + r` of a pipeline
        of PP x VPP chunks, which is what megatron's `get_transformer_layer_offset` computes for
        transformer layers. So the stack is built as if the pipeline had PP x VPP ranks and no
        virtual stages (a config copy and a rank()/size() stand-in for the pipeline group, used
        only while building); afterwards it keeps the model's real config and pipeline group.
        Layer numbers are the global ones, so checkpoints and the bridge's names are unchanged.
        (megatron-core 0.19.2 does this itself: '|' segments of the pattern, see
        `providers.megatron_imports.build_hybrid_model`.)
        """

        def __init__(self, config, submodules, vp_stage: int = 0, pg_collection=None, **kwargs):
            pp, vpp = config.pipeline_model_parallel_size, config.virtual_pipeline_model_parallel_size
            flat_cfg = copy.copy(config)
            flat_cfg.pipeline_model_parallel_size = pp * vpp
            flat_cfg.virtual_pipeline_model_parallel_size = None
            flat_pg = copy.copy(pg_collection)
            flat_pg.pp = _FlatPipelineGroup(vp_stage * pp + pg_collection.pp.rank(), pp * vpp)
            super().__init__(flat_cfg, submodules, pg_collection=flat_pg, **kwargs)
            self.config = config
            self.pp_group = pg_collection.pp
            self.vp_stage = vp_stage

    _VIRTUAL_STAGE_CLASSES[base] = VirtualStageMambaStack
    return VirtualStageMambaStack


def virtual_stage_stack_spec(spec, vp_stage: int):
    """The stack spec with its stack class replaced by the virtual-stage variant for chunk
    `vp_stage` (megatron-core 0.16.1 only)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=_virtual_stage_stack_class(spec.module), submodules=spec.submodules,
                      params={**(spec.params or {}), "vp_stage": vp_stage})


@dataclass
class NemotronHModelProvider(MambaModelProvider):
    """NemotronH language model; defaults are Nemotron-3-Nano-30B-A3B with its training settings."""

    # Sizes (the language model of Nemotron-3-Nano-Omni-30B-A3B).
    hybrid_override_pattern: Optional[str] = NEMOTRON_3_NANO_PATTERN
    num_layers: int = len(NEMOTRON_3_NANO_PATTERN)
    hidden_size: int = 2688
    ffn_hidden_size: int = 1856
    num_attention_heads: int = 32
    num_query_groups: int = 2
    kv_channels: int = 128
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    mamba_num_groups: int = 8
    mamba_state_dim: int = 128
    num_moe_experts: Optional[int] = 128
    moe_router_topk: int = 6
    moe_ffn_hidden_size: Optional[int] = 1856
    moe_shared_expert_intermediate_size: Optional[int] = 3712
    moe_router_topk_scaling_factor: Optional[float] = 2.5
    vocab_size: Optional[int] = 131072
    seq_length: int = 4096  # the HF config's max_position_embeddings (no position embedding is used)
    layernorm_epsilon: float = 1e-5

    # Settings the release trains with.
    activation_func: Callable = squared_relu
    make_vocab_size_divisible_by: int = 128
    position_embedding_type: str = "none"
    moe_router_score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    moe_router_dtype: Optional[str] = "fp32"
    moe_router_load_balancing_type: str = "seq_aux_loss"
    moe_aux_loss_coeff: float = 1e-4
    moe_router_pre_softmax: bool = False
    moe_grouped_gemm: bool = True            # TE's grouped GEMM; the CPU build uses sequential experts
    moe_token_dispatcher_type: str = "alltoall"
    moe_permute_fusion: bool = True          # needs TE; off on the CPU build
    moe_shared_expert_overlap: bool = True
    attention_softmax_in_fp32: bool = True
    apply_query_key_layer_scaling: bool = False
    first_last_layers_bf16: bool = True
    persist_layer_norm: bool = True
    masked_softmax_fusion: bool = True
    bias_dropout_fusion: bool = True
    bf16: bool = True
    params_dtype: torch.dtype = torch.bfloat16


# The name Megatron-Bridge users know for the same model.
Nemotron3NanoProvider = NemotronHModelProvider


def provider_field_names(provider_cls) -> set:
    return {f.name for f in fields(provider_cls)}
