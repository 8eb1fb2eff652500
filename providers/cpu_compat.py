"""CPU accommodations for megatron-core's hybrid Mamba model, all in one place.

Checked with megatron-core 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12); see
`providers.megatron_imports` for what moved between them.

`apply_cpu_patches()` lets the hybrid model (0.16.1 `MambaModel`, 0.19.2 `HybridModel`; Mamba2 `M`,
attention `*`, MLP `-` and MoE `E` layers) build and run forward and backward on a machine without
CUDA, Transformer Engine (TE), mamba-ssm, causal-conv1d, triton or apex. It is idempotent and does
nothing at all when `torch.cuda.is_available()`: the GPU path runs megatron-core untouched. Every
patch checks its target first and raises RuntimeError, naming the megatron-core version and the
missing target, when megatron-core no longer has it (nothing is skipped silently).

What the CPU build needs and megatron-core offers an extension point for is not patched but built
by `providers.layer_specs` (layer specs and module subclasses): the TE-named linears and norms, the
attention's causal mask (formerly patch 3), the Mamba mixer without mamba-ssm (formerly patch 7,
which set megatron's module-global ``HAVE_MAMBA_SSM = True``: `providers.layer_specs.cpu_mamba_mixer`
runs megatron's own mixer code with the pure-torch norm and scan of this module, and megatron's
mixer module is left as it is), the stack's final norm (formerly patch 8).

The CPU build uses the spec of `providers.layer_specs.get_mamba_stack_spec(use_te=False, ...)`,
whose parameter names equal the TE spec's, and the model config must set (the provider's job):

* ``use_mamba_mem_eff_path=False``: the memory-efficient training path calls mamba-ssm's fused
  ``mamba_split_conv1d_scan_combined`` (no torch version here); the other path (``_ssm_prefill``)
  uses a torch convolution when causal-conv1d is absent and the pure-torch scan below.
* ``masked_softmax_fusion=False`` (the local ``DotProductAttention`` would otherwise look for
  megatron's fused-softmax CUDA kernels with fp16/bf16 inputs), ``persist_layer_norm=False``,
  ``bias_dropout_fusion=False``, ``apply_rope_fusion=False``, ``gradient_accumulation_fusion=False``.
* ``moe_grouped_gemm=False`` (grouped GEMM needs TE; the CPU spec uses ``SequentialMLP`` experts),
  ``moe_permute_fusion=False`` and ``moe_router_fusion=False`` (TE kernels),
  ``moe_shared_expert_overlap=False`` (CUDA side streams). ``moe_token_dispatcher_type`` may be
  ``"alltoall"`` (as the release) or ``"allgather"``.
* Parallelism: TP=2 (with sequence parallelism, which megatron requires for MoE + TP in training)
  and EP=2 were checked with 2-process gloo groups; a single process is the usual CPU case.

What megatron-core offers no extension point for is patched. Every remaining patch is one entry of
`PATCHES` (what it replaces, why, the megatron-core releases it was checked on, the function that
applies it and the one that tells whether it is in effect); the list at the end of this docstring is
generated from that table. `apply_cpu_patches()` applies the entries not marked ``training``,
`apply_cpu_training_patches()` the others; `tests/test_cpu_compat.py` checks that each one is in
effect and was checked on the installed megatron-core.

Dist-checkpoint saving works through patch 2 (``filesystem_async`` / ``state_dict_saver``) and the
``psutil`` dependency. Not covered: ``moe_utils.track_moe_metrics`` (training-loop logging, literal ``device="cuda"``),
dynamic-batching inference, packed sequences (``seq_idx``/``cu_seqlens``) and the memory-efficient
Mamba path. megatron's ``squared_relu`` is ``torch.compile``d; on CPU that works (inductor + gcc)
but costs ~10 s of compilation on first use.

Patches (numbers as before; 3, 7 and 8 are extension points now, see above):
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import textwrap
import types
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CHECKED_ON",
    "PATCHES",
    "Patch",
    "apply_cpu_patches",
    "apply_cpu_training_patches",
    "cpu_config_overrides",
    "cpu_manual_seed",
    "mamba_chunk_scan_combined",
    "gated_rms_norm",
    "GatedRMSNorm",
    "ExtendedRMSNorm",
    "TorchNorm",
    "apply_norm",
    "causal_mask",
    "sliding_window_causal_mask",
]

# The megatron-core releases every patch below (and the extension points of providers.layer_specs
# that rely on megatron internals) was checked on.
CHECKED_ON = ("0.16.1", "0.19.2")

_APPLIED = False

_TRITON_TENSOR_OPS = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
# The triton kernels the Mamba mixer imports from it.
_TENSOR_OPS_FUNCTIONS = ("tensor_get_slice_after", "tensor_merge", "tensor_masked_update")

# Modules whose `torch.cuda.*` calls (current_device / streams / events) get the CPU proxy, and
# what fails without it (checked by removing each one).
_CUDA_PROXY_MODULES = (
    "megatron.core.ssm.mamba_mixer",  # conv1d / dt_bias / A_log / D / norm allocation
    "megatron.core.transformer.moe.router",  # expert_bias & token-count buffers, weight .to()
    "megatron.core.transformer.moe.token_dispatcher",  # alltoall: torch.cuda.Stream, events
    "megatron.core.tensor_parallel.layers",  # linear/embedding params (no use_cpu_initialization)
    "megatron.core.utils",  # GlobalMemoryBuffer (local attention's score buffer)
    "megatron.core.tensor_parallel.mappings",  # TP > 1 gathers / all-to-all output buffers
    "megatron.core.transformer.dot_product_attention",  # softmax_type off-by-one / learnable
    "megatron.core.transformer.attention",  # static-batching inference KV-cache allocation
    # dist_checkpointing's torch_dist writer: torch.cuda.synchronize() before writing.
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # failure flag all-reduce
    # pipeline schedules' send/recv of activations: shape buffers, torch.cuda.synchronize()
    "megatron.core.pipeline_parallel.p2p_communication",
)


# --------------------------------------------------------------------------- pure-torch kernels
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 (as the CUDA kernels), or fp64 for fp64 inputs (exact reference checks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: out[..., i, j] = sum(x[..., j+1:i+1]) for i >= j, -inf above diagonal."""
    t = x.size(-1)
    x = x[..., None].expand(*x.shape, t)  # [..., i(src k), j]
    mask = torch.tril(torch.ones(t, t, device=x.device, dtype=torch.bool), diagonal=-1)
    x = x.masked_fill(~mask, 0)
    x_segsum = torch.cumsum(x, dim=-2)
    mask = torch.tril(torch.ones(t, t, device=x.device, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    **unused,
):
    """Pure-PyTorch chunked SSD scan with the semantics of mamba-ssm's Triton kernel.

    Shapes: x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n] (h % g == 0), D [h] or [h, p],
    z [b, l, h, p], dt_bias [h], initial_states [b, h, p, n]. Returns y [b, l, h, p] (x's dtype)
    and, with ``return_final_states``, also the final state [b, h, p, n] (fp32).

    dt = softplus(dt + dt_bias) if dt_softplus, clamped to dt_limit only when dt_limit is not the
    default (0, inf) (as the kernel); y_t = C_t . h_t + D * x_t, h_t = exp(dt_t A) h_{t-1} +
    dt_t B_t x_t; with z, y *= silu(z). Computed in fp32 (fp64 for fp64 inputs; the chunked "ssd_minimal" form, so the
    backward is plain autograd). ``seq_idx`` / ``cu_seqlens`` (packed sequences, varlen states) are
    not supported.
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError(
            "The pure-torch mamba_chunk_scan_combined does not support seq_idx / cu_seqlens / "
            "varlen states (packed sequences, dynamic batching)."
        )
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    assert nheads % ngroups == 0, (nheads, ngroups)
    out_dtype = x.dtype
    cdt = _compute_dtype(x)

    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, as the kernel
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])

    xf = x.to(cdt)
    Bf = B.to(cdt).repeat_interleave(nheads // ngroups, dim=2)  # [b, l, h, n]
    Cf = C.to(cdt).repeat_interleave(nheads // ngroups, dim=2)
    A = A.to(cdt)

    pad = (-seqlen) % chunk_size
    if pad:
        # Padded steps have dt = 0: no input and a decay of exp(0) = 1, so the state is unchanged.
        xf_p = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dt_p = F.pad(dt, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    else:
        xf_p, dt_p = xf, dt
    nchunks = (seqlen + pad) // chunk_size

    def chunk(t):
        return t.reshape(batch, nchunks, chunk_size, *t.shape[2:])

    xdt = chunk(xf_p * dt_p[..., None])  # [b, c, l, h, p]
    Bc, Cc = chunk(Bf), chunk(Cf)  # [b, c, l, h, n]
    dA = chunk(dt_p * A).permute(0, 3, 1, 2)  # [b, h, c, l]
    dA_cumsum = torch.cumsum(dA, dim=-1)

    # 1. Intra-chunk (diagonal blocks).
    L = torch.exp(_segsum(dA))  # [b, h, c, l, s]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, L, xdt)

    # 2. State at the end of each chunk (from the chunk's own inputs).
    decay_states = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)  # [b, h, c, l]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_states, xdt)

    # 3. Inter-chunk recurrence.
    if initial_states is None:
        init = torch.zeros_like(states[:, :1])
    else:
        init = initial_states.to(cdt)[:, None]
    states = torch.cat([init, states], dim=1)  # [b, c+1, h, p, n]
    decay_chunk = torch.exp(_segsum(F.pad(dA_cumsum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. State -> output (off-diagonal blocks).
    state_decay_out = torch.exp(dA_cumsum)  # [b, h, c, l]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, state_decay_out)

    y = (y_diag + y_off).reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    if D is not None:
        Df = D.to(cdt)
        y = y + xf * (Df if Df.dim() == 2 else Df[:, None])
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(out_dtype)
    if return_final_states:
        return y, final_state
    return y


def mamba_split_conv1d_scan_combined_unavailable(*args, **kwargs):
    """Stands in for mamba-ssm's fused kernel of the memory-efficient Mamba path (no torch version)."""
    raise RuntimeError(
        "mamba_split_conv1d_scan_combined (the memory-efficient Mamba path) needs mamba-ssm's "
        "Triton kernels; on CPU set TransformerConfig.use_mamba_mem_eff_path=False."
    )


def gated_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """mamba-ssm's ``rmsnorm_fn``: group-wise RMSNorm with an optional silu(z) gate, in fp32.

    norm_before_gate=False: y = rmsnorm_per_group(x * silu(z)) * weight (+ bias);
    norm_before_gate=True:  y = (rmsnorm_per_group(x) * weight (+ bias)) * silu(z).
    Returns x's dtype.
    """
    dtype = x.dtype
    d = x.shape[-1]
    group_size = d if group_size is None else group_size
    assert d % group_size == 0, (d, group_size)
    cdt = _compute_dtype(x)
    xf = x.to(cdt)
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.to(cdt))
    xg = xf.reshape(*xf.shape[:-1], d // group_size, group_size)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    y = xg.reshape(xf.shape) * weight.to(cdt)
    if bias is not None:
        y = y + bias.to(cdt)
    if z is not None and norm_before_gate:
        y = y * F.silu(z.to(cdt))
    return y.to(dtype)


class GatedRMSNorm(nn.Module):
    """Pure-torch ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` (same signature, parameters)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: Optional[int] = None,
        norm_before_gate: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return gated_rms_norm(
            x,
            self.weight,
            self.bias,
            z=z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )


class ExtendedRMSNorm(GatedRMSNorm):
    """`GatedRMSNorm` with megatron's ``ExtendedRMSNorm.sharded_state_dict`` (weight TP axis 0)."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Sharding along axis 0, bias not sharded (as megatron's ExtendedRMSNorm)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if not hasattr(self, "tp_group"):
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


def apply_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    eps: float,
    normalization: str = "RMSNorm",
    zero_centered_gamma: bool = False,
) -> torch.Tensor:
    """RMSNorm / LayerNorm over the last dim, computed in fp32 and cast back to x's dtype."""
    cdt = _compute_dtype(x)
    xf = x.to(cdt)
    w = weight.to(cdt)
    if zero_centered_gamma:
        w = w + 1.0
    if normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w
    elif normalization == "LayerNorm":
        y = F.layer_norm(xf, (xf.shape[-1],), w, None if bias is None else bias.to(cdt), eps)
    else:
        raise ValueError(f"Unsupported normalization {normalization!r} (RMSNorm or LayerNorm)")
    return y.to(x.dtype)


def _ignore_missing_extra_state_hook(state_dict, prefix, *args, **kwargs):
    """Load pre-hook: checkpoints without an `_extra_state` entry load too."""
    state_dict.setdefault(f"{prefix}_extra_state")


class TorchNorm(nn.Module):
    """Drop-in for TE's ``TENorm(config, hidden_size, eps)`` (RMSNorm or LayerNorm by config).

    Parameters ``weight`` (and ``bias`` for LayerNorm) in ``config.params_dtype``, initialised as
    TE does (ones, or zeros with ``layernorm_zero_centered_gamma``). Like TE >= 2 norms it has an
    ``_extra_state`` state-dict entry (None here, ignored on load) so the keys match the TE build.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.normalization = config.normalization
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"Only LayerNorm and RMSNorm are supported, got {config.normalization}")
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        dtype = config.params_dtype
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype))
        if self.normalization == "LayerNorm":
            self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        for p in (self.weight, self.bias):
            if p is not None:
                setattr(p, "sequence_parallel", config.sequence_parallel)
        self._register_load_state_dict_pre_hook(_ignore_missing_extra_state_hook)

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x):
        return apply_norm(
            x, self.weight, self.bias, self.eps, self.normalization, self.zero_centered_gamma
        )

    def get_extra_state(self):
        """Mirror TE's `_extra_state` key (no FP8 metadata on CPU)."""
        return None

    def set_extra_state(self, state):
        """TE extra state (FP8 metadata) is ignored on CPU."""

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}, {self.normalization}"


# --------------------------------------------------------------------------- proxies / stand-ins
class _NullStream:
    """Stand-in for torch.cuda.Stream / Event on CPU: every operation is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, *args):
        return 0.0


_NULL_STREAM = _NullStream()


class _CpuCuda:
    """`torch.cuda` as seen by the patched megatron modules on a machine without CUDA."""

    Stream = _NullStream
    Event = _NullStream

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        # The default device, not a literal "cpu": under `with torch.device("meta")` megatron's
        # explicit `device=torch.cuda.current_device()` then builds on meta (full-size checks).
        return torch.get_default_device()

    @staticmethod
    def current_stream(device=None):
        return _NULL_STREAM

    @staticmethod
    def default_stream(device=None):
        return _NULL_STREAM

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device=None):
        pass


class _CpuTorch(types.ModuleType):
    """Module-level `torch` stand-in: forwards everything to torch except `.cuda`."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()


def _cuda_literal_to_default_device(factory):
    """`factory` (torch.zeros, ...) with a literal ``device="cuda"`` meaning the default device."""

    def on_default_device(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = torch.get_default_device()
        return factory(*args, **kwargs)

    return on_default_device


class _CpuTorchNoCudaLiterals(_CpuTorch):
    """`_CpuTorch` whose tensor factories also map a literal ``device="cuda"`` to the default device
    (the pipeline schedules' token counter, the training modules' buffers)."""

    def __init__(self):
        super().__init__()
        for name in ("tensor", "zeros", "ones", "empty", "full"):
            setattr(self, name, _cuda_literal_to_default_device(getattr(torch, name)))


_CPU_TORCH_NO_CUDA_LITERALS = _CpuTorchNoCudaLiterals()


def _raise_dynamic_inference(*args, **kwargs):
    raise NotImplementedError(
        "Mamba dynamic-batching inference uses triton kernels and is not supported on CPU."
    )


def _install_triton_tensor_ops_stub():
    """Patch 1: stand-in for the triton tensor_ops module, only if the real one cannot import."""
    if _TRITON_TENSOR_OPS in sys.modules:
        return
    try:
        importlib.import_module(_TRITON_TENSOR_OPS)
    except ImportError:
        stub = types.ModuleType(_TRITON_TENSOR_OPS)
        stub.__doc__ = "CPU stand-in (providers.cpu_compat): triton is not installed."
        for name in _TENSOR_OPS_FUNCTIONS:
            setattr(stub, name, _raise_dynamic_inference)
        sys.modules[_TRITON_TENSOR_OPS] = stub


def _triton_tensor_ops_importable() -> bool:
    """Patch 1 in effect: the module the mixer imports its kernels from is there (stand-in or real)."""
    module = sys.modules.get(_TRITON_TENSOR_OPS)
    return all(callable(getattr(module, name, None)) for name in _TENSOR_OPS_FUNCTIONS)


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """megatron's ``get_default_causal_mask`` ([sq, sk] bool, True above the diagonal = masked) on
    `device` (megatron's is built on CUDA); used by `providers.layer_specs.DotProductAttention`."""
    return torch.triu(torch.ones(sq, sk, dtype=torch.bool, device=device), diagonal=1)


def sliding_window_causal_mask(sq: int, skv: int, window_size, device=None) -> torch.Tensor:
    """megatron's ``get_sliding_window_causal_mask`` on `device` (megatron's is built on CUDA)."""
    m = torch.ones(sq, skv, dtype=torch.bool, device=device)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def _maybe_move_tensor_to_cpu_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Patch 6: on CPU, split sizes become host numpy arrays, as megatron's does for CUDA tensors."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    if torch.is_tensor(tensor) and tensor.device.type != "cpu":
        return tensor.cpu()
    return tensor


def _cpu_rng_tracker_installed() -> bool:
    """Patch 4 in effect: megatron's RNG tracker is its inference tracker."""
    tracker = _current(("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER"))
    return getattr(tracker, "is_inference_rng_tracker", False) is True


def _install_cpu_rng_tracker():
    """Patch 4: megatron's inference RNG tracker (no CUDA generator needed). A later
    ``model_parallel_cuda_manual_seed(seed)`` (without ``force_reset_rng``) keeps it and works too
    (``torch.cuda.manual_seed`` is lazy)."""
    mrandom = _target("megatron.core.tensor_parallel.random", "initialize_rng_tracker", "_CUDA_RNG_STATE_TRACKER")
    if not _cpu_rng_tracker_installed():
        mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def cpu_manual_seed(seed: int) -> None:
    """Seed the CPU generator and make sure the CPU RNG tracker is installed."""
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        _install_cpu_rng_tracker()


# Config fields the CPU build needs (TE / CUDA-kernel features off); see the module docstring.
_CPU_CONFIG_OVERRIDES = {
    "use_mamba_mem_eff_path": False,
    "masked_softmax_fusion": False,
    "persist_layer_norm": False,
    "bias_dropout_fusion": False,
    "bias_activation_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
    "cross_entropy_loss_fusion": False,
    "moe_grouped_gemm": False,
    "moe_permute_fusion": False,
    "moe_router_fusion": False,
    "moe_shared_expert_overlap": False,
    "use_te_rng_tracker": False,
}


def cpu_config_overrides(config=None) -> dict:
    """TransformerConfig fields to set for the CPU build ({} when CUDA is available).

    With ``config``, only fields it has are returned. ``moe_token_dispatcher_type`` is left as is
    ("alltoall" and "allgather" both run on CPU).
    """
    if torch.cuda.is_available():
        return {}
    return {
        k: v
        for k, v in _CPU_CONFIG_OVERRIDES.items()
        if config is None or hasattr(config, k)
    }


def mcore_version() -> str:
    """The installed megatron-core release (its distribution version). Not `megatron.core.__version__`:
    megatron-core 0.19.2 appends the `git rev-parse --short HEAD` of whatever repository its
    site-packages directory lies in (a venv inside a checkout gives `0.19.2+<that checkout's commit>`)."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return "unknown"


def _patch_target_missing(what: str, why: str = "not found") -> RuntimeError:
    """The error every patch raises when its target is gone: megatron-core changed under it."""
    return RuntimeError(
        f"providers.cpu_compat: CPU patch target {what} {why} in megatron-core {mcore_version()} "
        f"(the patches were checked with megatron-core {' and '.join(CHECKED_ON)}); the CPU build "
        "cannot run on this megatron-core without updating providers/cpu_compat.py."
    )


def _target_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise _patch_target_missing(f"module {name}", f"cannot be imported ({e})") from e


def _target(module_name: str, *attrs: str):
    """The module `module_name`, after checking that it has every attribute in `attrs`."""
    module = _target_module(module_name)
    for attr in attrs:
        if not hasattr(module, attr):
            raise _patch_target_missing(f"{module_name}.{attr}")
    return module


def _set_module_torch(module_name: str, proxy, allowed=()) -> None:
    """Replace the module-global ``torch`` of `module_name` by `proxy` (loudly if it has none)."""
    module = _target_module(module_name)
    current = getattr(module, "torch", None)
    if current is torch or current is proxy or isinstance(current, allowed):
        module.torch = proxy
    else:
        raise _patch_target_missing(f"{module_name}.torch (the module-global torch it allocates with)",
                                    f"is {current!r}, not the torch module")


def code_names(code: types.CodeType) -> set:
    """The global and attribute names `code` reads, its nested functions' and comprehensions' too."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= code_names(const)
    return names


def _require_global_uses(module, names, *functions) -> None:
    """Each of `names` is a global that one of `functions` (or a method of a class among them)
    looks up: the module globals patched (or, for the CPU Mamba mixer, read differently) are what
    megatron's code actually calls."""
    used = set()
    for f in functions:
        for attr in (vars(f).values() if isinstance(f, type) else (f,)):
            code = getattr(getattr(attr, "__func__", attr), "__code__", None)  # staticmethods too
            if code is not None:
                used |= code_names(code)
    for name in names:
        if name not in used:
            raise _patch_target_missing(f"{module.__name__}.{name}", "is no longer used by the code the patch is for")


# --------------------------------------------------------------------------- the patches
# A patch target: (module name, attribute), or (module name, None) for the module itself in
# sys.modules.
Target = Tuple[str, Optional[str]]
_MISSING = object()


def _current(target: Target):
    """What `target` is now (`_MISSING` if absent); imports nothing."""
    module_name, attribute = target
    module = sys.modules.get(module_name, _MISSING)
    return module if attribute is None else getattr(module, attribute, _MISSING)


@dataclass(frozen=True)
class Patch:
    """One patch of megatron-core that the CPU build still needs."""

    number: int  # as the earlier docs and the README name it
    targets: Tuple[Target, ...]  # what it replaces
    why: str
    apply: Callable[[], None]  # idempotent; RuntimeError (version, target) when a target is gone
    applied: Callable[[], bool]  # whether every target is replaced now (looks at the targets only)
    checked_on: Tuple[str, ...] = CHECKED_ON  # megatron-core releases
    training: bool = False  # applied by apply_cpu_training_patches (the examples), not apply_cpu_patches

    def summary(self) -> str:
        """The entry as the module docstring lists it."""
        targets = ", ".join(m if a is None else f"{m}.{a}" for m, a in self.targets)
        head = f"{self.number}. {'Training only. ' if self.training else ''}Replaces {targets}."
        checked = f"Checked on megatron-core {', '.join(self.checked_on)}."
        return "\n".join(textwrap.fill(text, 100, initial_indent=indent, subsequent_indent="   ")
                         for text, indent in ((head, ""), (f"{self.why} {checked}", "   ")))


def _torch_proxied(module_names, proxy_type) -> bool:
    """Every module of `module_names` allocates with a `proxy_type` instead of torch."""
    return all(isinstance(_current((name, "torch")), proxy_type) for name in module_names)


def _install_cuda_proxies() -> None:
    """Patch 2."""
    for name in _CUDA_PROXY_MODULES:
        _set_module_torch(name, _CPU_TORCH)


_TE_GENERAL_GEMM = ("megatron.core.transformer.moe.moe_utils", "te_general_gemm")


def _bind_te_general_gemm() -> None:
    """Patch 5: 0.16.1 binds the name only when TE imports (0.19.2 binds it to None without TE)."""
    moe_utils = _target(_TE_GENERAL_GEMM[0], "RouterGatingLinearFunction")
    _require_global_uses(moe_utils, ["te_general_gemm"], moe_utils.RouterGatingLinearFunction)
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


_MAYBE_MOVE_TENSOR_TO_CPU = ("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu")


def _install_host_split_sizes() -> None:
    """Patch 6."""
    token_dispatcher = _target(*_MAYBE_MOVE_TENSOR_TO_CPU)
    token_dispatcher.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu_cpu


_SCHEDULES = "megatron.core.pipeline_parallel.schedules"


def _install_schedules_proxy() -> None:
    """Patch 9."""
    _set_module_torch(_SCHEDULES, _CPU_TORCH_NO_CUDA_LITERALS)


# megatron-core modules of the training path (DDP grad buffers, optimizer, grad clipping) that
# allocate with `torch.cuda.current_device()` or a literal `device="cuda"`.
_TRAINING_CUDA_MODULES = (
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad norm without apex / TE)
)
_CLIP_GRAD = ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32")


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 without its `torch.cuda.FloatTensor` assert."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


def _install_training_patches() -> None:
    """Patch 10 (patch 2's proxy of megatron.core.utils is replaced too)."""
    _target(*_CLIP_GRAD).clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    for name in _TRAINING_CUDA_MODULES:
        _set_module_torch(name, _CPU_TORCH_NO_CUDA_LITERALS, allowed=(_CpuTorch,))


def _training_patches_in_effect() -> bool:
    return (_torch_proxied(_TRAINING_CUDA_MODULES, _CpuTorchNoCudaLiterals)
            and _current(_CLIP_GRAD) is _clip_grad_by_total_norm_cpu)


# Every patch that remains, in the order they are applied (patch 1 before anything imports the Mamba
# mixer). 3, 7 and 8 are extension points of providers.layer_specs now.
PATCHES: Tuple[Patch, ...] = (
    Patch(
        number=1,
        targets=((_TRITON_TENSOR_OPS, None),),
        why="The Mamba mixer imports three triton kernels from this module at import time, and "
        "`import triton` fails without triton. A stand-in module whose functions raise "
        "NotImplementedError is registered only when the real import fails (with triton installed, "
        "as beside 0.19.2 here, the real module is used); the kernels serve dynamic-batching "
        "inference only, which the CPU build does not support.",
        apply=_install_triton_tensor_ops_stub,
        applied=_triton_tensor_ops_importable,
    ),
    Patch(
        number=2,
        targets=tuple((name, "torch") for name in _CUDA_PROXY_MODULES),
        why="These modules allocate with `device=torch.cuda.current_device()` (Mamba mixer "
        "parameters, router buffers, tensor-parallel linears and mappings, GlobalMemoryBuffer, "
        "KV caches, softmax offset, pipeline p2p shape buffers) or use CUDA streams, events and "
        "`synchronize` (alltoall dispatcher, dist-checkpoint writer). Their module-global `torch` "
        "becomes a proxy that is torch except that `torch.cuda.current_device()` is the default "
        "device (cpu, or meta under `torch.device('meta')`) and streams, events and synchronize "
        "are no-ops. The global torch.cuda is left alone.",
        apply=_install_cuda_proxies,
        applied=functools.partial(_torch_proxied, _CUDA_PROXY_MODULES, _CpuTorch),
    ),
    Patch(
        number=4,
        targets=(("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER"),),
        why="`model_parallel_cuda_manual_seed` seeds and forks CUDA generators. megatron's own "
        "inference tracker (`initialize_rng_tracker(inference_rng_tracker=True)`: no-op "
        "add/set_states, a null fork) is installed, so parameter init and dropout draw from the "
        "CPU generator (seed it with `torch.manual_seed` or `cpu_manual_seed`).",
        apply=_install_cpu_rng_tracker,
        applied=_cpu_rng_tracker_installed,
    ),
    Patch(
        number=5,
        targets=(_TE_GENERAL_GEMM,),
        why="The router's gating GEMM reads this name, which 0.16.1 binds only when TE imports "
        "(NameError without TE). Bound to None, megatron's own fallback to torch.mm runs; 0.19.2 "
        "binds it to None itself, then nothing is done.",
        apply=_bind_te_general_gemm,
        applied=lambda: _current(_TE_GENERAL_GEMM) is None,
    ),
    Patch(
        number=6,
        targets=(_MAYBE_MOVE_TENSOR_TO_CPU,),
        why="The alltoall dispatcher relies on it to turn the split sizes into host numpy arrays, "
        "but it acts on CUDA tensors only: on CPU `all_to_all_single` (EP > 1) and `.tolist()` "
        "(TP splits) get tensors. The replacement returns numpy where megatron asks for it, for "
        "CPU tensors too (checked with 2-process gloo runs, EP=2 and TP=2 with SP).",
        apply=_install_host_split_sizes,
        applied=lambda: _current(_MAYBE_MOVE_TENSOR_TO_CPU) is _maybe_move_tensor_to_cpu_cpu,
    ),
    Patch(
        number=9,
        targets=((_SCHEDULES, "torch"),),
        why="Every pipeline schedule (no pipelining, 1F1B, interleaved) allocates its token "
        "counter with a literal `torch.zeros([], device='cuda')`. Its module-global `torch` "
        "becomes patch 2's proxy that also maps a literal device='cuda' to the default device; "
        "with patch 2 on p2p_communication the schedules run over gloo (PP=2, and PP=2 x 2 "
        "virtual stages, in tests/test_parallel_layouts.py).",
        apply=_install_schedules_proxy,
        applied=functools.partial(_torch_proxied, (_SCHEDULES,), _CpuTorchNoCudaLiterals),
    ),
    Patch(
        number=10,
        targets=tuple((name, "torch") for name in _TRAINING_CUDA_MODULES) + (_CLIP_GRAD,),
        why="megatron's DDP grad buffers, optimizer, grad norm and grad scaler allocate on the "
        "current CUDA device or a literal device='cuda': patch 9's proxy. "
        "`clip_grad_by_total_norm_fp32` asserts CUDA tensors: a CPU version.",
        apply=_install_training_patches,
        applied=_training_patches_in_effect,
        training=True,
    ),
)


def _apply(training: bool) -> None:
    for patch in PATCHES:
        if patch.training == training:
            patch.apply()


def apply_cpu_patches() -> bool:
    """Apply the patches of `PATCHES` not marked ``training`` (see the module docstring). Idempotent.

    Returns True if the patches are (now) in place, False when CUDA is available (nothing done).
    Raises RuntimeError, naming the megatron-core version and the target, when a patch's target is
    missing from this megatron-core.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if not _APPLIED:
        _apply(training=False)
        _APPLIED = True
    return True


def apply_cpu_training_patches() -> None:
    """On a machine without CUDA, `apply_cpu_patches()` and the training patches of `PATCHES`
    (for the modules of megatron's training path, which the bridge itself never runs). Does nothing
    when CUDA is available. Raises RuntimeError (megatron-core version, target) when a target is
    missing."""
    if apply_cpu_patches():
        _apply(training=True)


if __doc__ is not None:  # (python -OO)
    __doc__ += "\n\n".join(patch.summary() for patch in PATCHES) + "\n"
