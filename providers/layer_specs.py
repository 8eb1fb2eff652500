"""Layer specs for megatron-core's hybrid Mamba stack: the TE spec, and a CPU spec with its names.

`get_mamba_stack_spec(use_te=True, ...)` is megatron's own ``mamba_stack_spec``
(megatron/core/models/mamba/mamba_layer_specs.py) with the MoE submodule rebuilt for the requested
grouped-GEMM setting. `get_mamba_stack_spec(use_te=False, ...)` builds the same layer structure from
megatron-core's non-TE modules (``ColumnParallelLinear``, ``RowParallelLinear``,
``DotProductAttention``, ``SequentialMLP``) plus the smallest subclasses needed to reproduce the TE
parameter names, so ``state_dict()`` / ``named_parameters()`` / ``sharded_state_dict()`` keys are
the TE build's:

* `LayerNormColumnParallelLinear`: TE's ``TELayerNormColumnParallelLinear`` fuses the pre-norm
  into the linear (``layer_norm_weight`` [+ ``layer_norm_bias``] next to ``weight``). Here it is a
  ``ColumnParallelLinear`` that normalises its input first; the norm parameters are replicated
  across TP in ``sharded_state_dict`` (as in TE: only ``weight``/``bias`` get a TP axis).
* `DotProductAttention`: megatron's local attention plus an ``_extra_state`` state-dict entry, as
  TE's ``TEDotProductAttention`` has (it is not part of either build's sharded state dict), that
  builds its causal mask on its inputs' device (megatron's softmax builds it on CUDA).
* ``providers.cpu_compat.TorchNorm`` in place of ``TENorm``: the MoE layer's ``pre_mlp_layernorm``
  (a spec slot) and the stack's ``final_norm`` (hard-wired to TENorm in megatron's stack; built by
  the stack subclass `CpuHybridStack`).
* `cpu_mamba_mixer`: megatron's ``MambaMixer`` where mamba-ssm is not installed, its methods
  reading the pure-torch gated norm and SSD scan of ``providers.cpu_compat`` instead of mamba-ssm's.

The non-TE spec needs ``providers.cpu_compat.apply_cpu_patches()`` on a machine without CUDA (it is
called here; a no-op with CUDA). With TE grouped GEMM the experts are ``TEGroupedMLP``, whose
parameters are ``mlp.experts.linear_fc1.weight{e}``; the CPU spec always uses ``SequentialMLP``
(``mlp.experts.local_experts.{e}.linear_fc1.weight``), the TE spec with ``moe_grouped_gemm=False``
too. Both expert modules emit the same dist-checkpoint (sharded) keys.
"""

from __future__ import annotations

import functools
import types
from dataclasses import replace

import torch
from torch import nn

from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.dot_product_attention import (
    DotProductAttention as _LocalDotProductAttention,
)

from providers import cpu_compat
from providers.megatron_imports import HybridStack, HybridStackSubmodules, mlp_spec

# Any positive number: the expert module classes do not depend on it.
_SPEC_NUM_EXPERTS = 8


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` with a fused input norm, named like TE's LayerNormLinear.

    Norm: ``config.normalization`` (RMSNorm or LayerNorm), eps ``config.layernorm_epsilon``,
    ``config.layernorm_zero_centered_gamma``; computed in fp32. Parameters ``layer_norm_weight``
    (and ``layer_norm_bias`` for LayerNorm) are replicated across TP in sharded_state_dict
    (ColumnParallelLinear only shards ``weight``/``bias`` on axis 0), as in TE. With sequence
    parallelism the norm runs on the local sequence shard before the all-gather, as in TE.
    """

    def __init__(self, input_size: int, output_size: int, *, config, gather_output: bool = False,
                 is_expert: bool = False, **kwargs):
        # kwargs: ColumnParallelLinear's (init_method, bias, skip_bias_add, tp_group, stride, ...;
        # megatron-core 0.19.2 also passes `name`), forwarded as they come.
        if gather_output:
            raise ValueError("LayerNormColumnParallelLinear (as TE's) needs gather_output=False")
        if is_expert:
            raise ValueError("LayerNormColumnParallelLinear (as TE's) is not an expert layer")
        super().__init__(input_size, output_size, config=config, gather_output=gather_output,
                         is_expert=is_expert, **kwargs)
        self.normalization = config.normalization
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"Unsupported normalization {config.normalization!r}")
        self.eps = config.layernorm_epsilon
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        device = self.weight.device if self.weight is not None else None
        self.layer_norm_weight = nn.Parameter(
            torch.empty(input_size, dtype=config.params_dtype, device=device)
        )
        if self.normalization == "LayerNorm":
            self.layer_norm_bias = nn.Parameter(
                torch.empty(input_size, dtype=config.params_dtype, device=device)
            )
        else:
            self.layer_norm_bias = None
        with torch.no_grad():
            self.layer_norm_weight.fill_(0.0 if self.zero_centered_gamma else 1.0)
            if self.layer_norm_bias is not None:
                self.layer_norm_bias.zero_()
        for p in (self.layer_norm_weight, self.layer_norm_bias):
            if p is not None:
                setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        normed = cpu_compat.apply_norm(
            input_,
            self.layer_norm_weight,
            self.layer_norm_bias,
            self.eps,
            self.normalization,
            self.zero_centered_gamma,
        )
        return super().forward(normed, weight=weight, runtime_gather_output=runtime_gather_output)


class DotProductAttention(_LocalDotProductAttention):
    """megatron's local attention with TE's ``_extra_state`` state-dict entry (None), building its
    causal / sliding-window mask on the device of its inputs.

    Without an attention mask, megatron's unfused softmax (`FusedScaleMaskSoftmax`) builds the
    causal mask (and, with ``config.window_size``, the sliding-window mask) with a literal
    ``device="cuda"`` (megatron.core.transformer.utils, 0.16.1 and 0.19.2). This attention hands the
    softmax the same boolean mask (True = masked, the formulas of megatron's
    ``get_default_causal_mask`` / ``get_sliding_window_causal_mask``) built on the query's device,
    so megatron never builds one: the same scores, no CUDA.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_load_state_dict_pre_hook(cpu_compat._ignore_missing_extra_state_hook)
        softmax = self.scale_mask_softmax
        if not hasattr(softmax, "window_size"):
            raise RuntimeError("providers.layer_specs.DotProductAttention: megatron-core's FusedScaleMaskSoftmax "
                               "has no `window_size` (checked with megatron-core 0.16.1 and 0.19.2)")
        # The sliding window moves here: the softmax would build its mask on CUDA.
        self.window_size, softmax.window_size = softmax.window_size, None

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        sq, sk = query.shape[0], key.shape[0]  # [s, b, heads, dim]
        if self.window_size is not None:  # as megatron: the window replaces any given mask
            attention_mask = cpu_compat.sliding_window_causal_mask(sq, sk, self.window_size, query.device)
        elif attention_mask is None and self.attn_mask_type == AttnMaskType.causal and sq > 1:
            attention_mask = cpu_compat.causal_mask(sq, sk, query.device)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)

    def get_extra_state(self):
        """Mirror TEDotProductAttention's `_extra_state` key (no FP8 metadata here)."""
        return None

    def set_extra_state(self, state):
        """TE extra state (FP8 metadata) is ignored."""


class CpuHybridStack(HybridStack):
    """megatron's hybrid stack (0.16.1 `MambaStack`, 0.19.2 `HybridStack`) with `TorchNorm` as its
    final norm instead of the Transformer Engine `TENorm` the stack hard-wires.

    The stack is built without its final norm (``post_layer_norm=False``: the TENorm it would build
    needs TE), then `TorchNorm` becomes ``final_norm`` with TENorm's arguments and
    ``post_layer_norm`` is restored: megatron's forward applies ``final_norm`` exactly when
    ``post_process and post_layer_norm``. Same module order and names as the TE build.
    """

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = cpu_compat.TorchNorm(
                config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)


def _mamba_ssm_stand_ins() -> dict:
    """The globals of megatron's mixer module that stand for mamba-ssm (False, a norm built on a
    ``MagicMock``, and no kernels where it is not installed), as `cpu_mamba_mixer` reads them."""
    return {
        "HAVE_MAMBA_SSM": True,  # MambaMixer.__init__ refuses to build when False
        "ExtendedRMSNorm": cpu_compat.ExtendedRMSNorm,  # mixer.norm
        "mamba_chunk_scan_combined": cpu_compat.mamba_chunk_scan_combined,  # _ssm_prefill's scan
        # _ssm_training (use_mamba_mem_eff_path=True): an error that names the config field
        "mamba_split_conv1d_scan_combined": cpu_compat.mamba_split_conv1d_scan_combined_unavailable,
    }


def _reading_globals(function: types.FunctionType, namespace: dict) -> types.FunctionType:
    """`function` (its code, defaults and closure, so a zero-argument ``super()`` still means its own
    class) looking its globals up in `namespace`."""
    rebound = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                                 function.__closure__)
    rebound.__kwdefaults__ = function.__kwdefaults__
    return functools.update_wrapper(rebound, function)


@functools.lru_cache(maxsize=None)
def cpu_mamba_mixer():
    """megatron-core's `MambaMixer`, built and run without mamba-ssm (itself where it is installed).

    Without mamba-ssm megatron's mixer module sets ``HAVE_MAMBA_SSM = False`` (``__init__`` refuses
    to build), derives its ``ExtendedRMSNorm`` from a ``MagicMock`` and has no SSD scan. Former patch
    7 set those module globals (``HAVE_MAMBA_SSM = True`` told every user of the module that
    mamba-ssm was there). This subclass changes nothing in megatron's module: each method of
    ``MambaMixer`` that reads one of `_mamba_ssm_stand_ins` is megatron's own function (code,
    defaults, closure) looking its globals up in a copy of the module's namespace with those names
    replaced (cpu_compat's `ExtendedRMSNorm` and `mamba_chunk_scan_combined`). No subclass method
    written here could do that without copying megatron's ``__init__`` and ``_ssm_prefill``
    (hundreds of lines, which differ between 0.16.1 and 0.19.2), and swapping the module globals
    while the mixer builds would not be thread-safe. The copy is taken once, after
    ``cpu_compat.apply_cpu_patches()`` (its ``torch`` is patch 2's proxy, as in the module). Raises
    RuntimeError (megatron-core version, name) when megatron's mixer no longer reads one of the
    names (checked on megatron-core `cpu_compat.CHECKED_ON`)."""
    cpu_compat.apply_cpu_patches()  # the triton stand-in before the mixer module is imported
    from megatron.core.ssm import mamba_mixer

    mixer = mamba_mixer.MambaMixer
    if mamba_mixer.HAVE_MAMBA_SSM:
        return mixer
    stand_ins = _mamba_ssm_stand_ins()
    cpu_compat._require_global_uses(mamba_mixer, stand_ins, mixer)
    namespace = {**vars(mamba_mixer), **stand_ins}
    methods = {name: _reading_globals(f, namespace) for name, f in vars(mixer).items()
               if isinstance(f, types.FunctionType) and cpu_compat.code_names(f.__code__) & stand_ins.keys()}
    return type("CpuMambaMixer", (mixer,), {"__module__": __name__, "__qualname__": "CpuMambaMixer",
                                            "__doc__": cpu_mamba_mixer.__doc__, **methods})


def config_eps_mamba_mixer(cpu: bool = False):
    """megatron-core's `MambaMixer` (`cpu_mamba_mixer()` with `cpu`) whose gated RMSNorm
    (`mixer.norm`) uses `config.layernorm_epsilon`.

    megatron-core (0.16.1 and 0.19.2) builds that norm with a literal `eps=1e-5`, while transformers'
    NemotronH uses the config's `layer_norm_epsilon` there as in every other norm: with another eps
    the logits differed by 0.1 (1e-6) to 2.2 (1e-2). Both norms megatron may build (mamba-ssm's
    `RMSNorm` and the CPU build's `GatedRMSNorm`) read `self.eps` at every call. Made on first use:
    on a CPU, importing the mixer needs the CPU accommodations in place."""
    if cpu:
        return _config_eps_mixer(cpu_mamba_mixer())
    from megatron.core.ssm.mamba_mixer import MambaMixer

    return _config_eps_mixer(MambaMixer)


@functools.lru_cache(maxsize=None)
def _config_eps_mixer(base):
    """`config_eps_mamba_mixer` on `base` (one class per base)."""

    class ConfigEpsMambaMixer(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            if getattr(self, "norm", None) is not None:
                self.norm.eps = config.layernorm_epsilon

    return ConfigEpsMambaMixer


def _with_config_eps_mixer(stack_spec):
    """`stack_spec` with its Mamba layers' mixer made by `config_eps_mamba_mixer()` (shallow copies)."""
    layer = stack_spec.submodules.mamba_layer
    mixer = replace(layer.submodules.mixer, module=config_eps_mamba_mixer())
    layer = replace(layer, submodules=replace(layer.submodules, mixer=mixer))
    return replace(stack_spec, submodules=replace(stack_spec.submodules, mamba_layer=layer))


def _te_stack_spec(moe_grouped_gemm: bool):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

    # (moe_use_legacy_grouped_gemm, gone in 0.19.2, defaults to False in 0.16.1.)
    moe = get_moe_module_spec(use_te=True, num_experts=_SPEC_NUM_EXPERTS, moe_grouped_gemm=moe_grouped_gemm)
    # Shallow copies along the path to the MoE submodule: megatron's module-level spec object is
    # left untouched, everything else is shared with it.
    moe_layer = mamba_stack_spec.submodules.moe_layer
    moe_layer = replace(moe_layer, submodules=replace(moe_layer.submodules, mlp=moe))
    return _with_config_eps_mixer(replace(
        mamba_stack_spec, submodules=replace(mamba_stack_spec.submodules, moe_layer=moe_layer)
    ))


def _cpu_stack_spec():
    cpu_compat.apply_cpu_patches()  # no-op with CUDA

    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    ln_linear, attention = LayerNormColumnParallelLinear, DotProductAttention
    # Local backend, SequentialMLP experts (ColumnParallelLinear / RowParallelLinear), shared
    # experts ColumnParallelLinear / RowParallelLinear: same names as the TE backend's.
    moe = get_moe_module_spec(use_te=False, num_experts=_SPEC_NUM_EXPERTS, moe_grouped_gemm=False)
    return ModuleSpec(
        module=CpuHybridStack,
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    mixer=ModuleSpec(
                        module=config_eps_mamba_mixer(cpu=True),
                        submodules=MambaMixerSubmodules(
                            in_proj=ln_linear, out_proj=RowParallelLinear
                        ),
                    ),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=ln_linear,
                            core_attention=attention,
                            linear_proj=RowParallelLinear,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    mlp=mlp_spec(
                        MLPSubmodules(linear_fc1=ln_linear, linear_fc2=RowParallelLinear)
                    ),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=cpu_compat.TorchNorm,
                    mlp=moe,
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
        ),
    )


def get_mamba_stack_spec(use_te: bool, moe_grouped_gemm: bool):
    """The ``MambaStack`` spec: TE (megatron's ``mamba_stack_spec``) or the CPU equivalent.

    use_te=True: megatron's TE spec, MoE experts ``TEGroupedMLP`` if ``moe_grouped_gemm`` else
    ``SequentialMLP`` of TE linears. use_te=False: the CPU spec (``SequentialMLP`` experts);
    ``moe_grouped_gemm=True`` is refused there (megatron's non-TE grouped MLP is the legacy
    ``GroupedMLP`` with different parameter names and the ``grouped_gemm`` CUDA package).
    """
    if use_te:
        return _te_stack_spec(moe_grouped_gemm)
    if moe_grouped_gemm:
        raise ValueError(
            "The non-TE (CPU) Mamba spec has no grouped-GEMM experts; set moe_grouped_gemm=False."
        )
    return _cpu_stack_spec()


def _linear_classes(use_te: bool):
    """(norm-fused column linear, row linear, core attention) of the TE or the CPU build."""
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        return TELayerNormColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    cpu_compat.apply_cpu_patches()
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    return LayerNormColumnParallelLinear, RowParallelLinear, DotProductAttention


def get_vit_layer_spec(use_te: bool):
    """RADIO ViT layer: pre-LN attention (bidirectional: no mask) and pre-LN MLP, TE names."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    ln_linear, row_linear, attention = _linear_classes(use_te)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ln_linear, core_attention=attention, linear_proj=row_linear),
            ),
            self_attn_bda=get_bias_dropout_add,
            mlp=mlp_spec(MLPSubmodules(linear_fc1=ln_linear, linear_fc2=row_linear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_projector_mlp_submodules(use_te: bool):
    """Projector MLP (norm fused into fc1, as TE names it): `linear_fc1.layer_norm_weight`, ..."""
    from megatron.core.transformer.mlp import MLPSubmodules

    ln_linear, row_linear, _ = _linear_classes(use_te)
    return MLPSubmodules(linear_fc1=ln_linear, linear_fc2=row_linear)
