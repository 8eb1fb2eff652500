"""providers/cpu_compat.py: a patch whose target megatron-core no longer has fails loudly (a
RuntimeError naming the megatron-core version and the target), every patch of the registry is in
effect and was checked on this megatron-core, and the accommodations that are extension points
rather than patches are in place on this megatron-core (and leave megatron's modules alone)."""

import sys
import types

import pytest
import torch

from providers import cpu_compat

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU accommodations apply without CUDA only")


@pytest.fixture(autouse=True)
def _patched():
    cpu_compat.apply_cpu_patches()  # e.g. the triton stand-in, before the Mamba mixer is imported


def _assert_names_version_and(excinfo, *fragments):
    message = str(excinfo.value)
    assert f"megatron-core {cpu_compat.mcore_version()}" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_missing_module_or_attribute_is_an_error():
    with pytest.raises(RuntimeError) as e:
        cpu_compat._target("megatron.core.no_such_module")
    _assert_names_version_and(e, "megatron.core.no_such_module")
    with pytest.raises(RuntimeError) as e:
        cpu_compat._target("megatron.core.ssm.mamba_mixer", "MambaMixer", "no_such_name")
    _assert_names_version_and(e, "megatron.core.ssm.mamba_mixer.no_such_name")


def test_a_module_without_a_global_torch_is_an_error(monkeypatch):
    module = types.ModuleType("megatron_core_stand_in_without_torch")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(RuntimeError) as e:
        cpu_compat._set_module_torch(module.__name__, cpu_compat._CPU_TORCH)
    _assert_names_version_and(e, f"{module.__name__}.torch")


def test_a_global_the_code_no_longer_uses_is_an_error():
    from megatron.core.ssm import mamba_mixer

    cpu_compat._require_global_uses(mamba_mixer, ["mamba_chunk_scan_combined"], mamba_mixer.MambaMixer)
    with pytest.raises(RuntimeError) as e:
        cpu_compat._require_global_uses(mamba_mixer, ["no_such_kernel"], mamba_mixer.MambaMixer)
    _assert_names_version_and(e, "megatron.core.ssm.mamba_mixer.no_such_kernel")


def _patch_id(patch):
    return f"patch{patch.number}"


def _replace_target(monkeypatch, target, value):
    module_name, attribute = target
    if attribute is None:
        monkeypatch.setitem(sys.modules, module_name, value)
    else:
        monkeypatch.setattr(sys.modules[module_name], attribute, value)


@CPU_ONLY
@pytest.mark.parametrize("patch", cpu_compat.PATCHES, ids=_patch_id)
def test_each_patch_is_in_effect(patch, monkeypatch):
    """After `apply_cpu_patches()` (`apply_cpu_training_patches()` for the training ones) every
    registered patch is in effect, and `applied()` looks at each of its targets: with any one of
    them replaced by something else, it says the patch is not in effect."""
    if patch.training:
        cpu_compat.apply_cpu_training_patches()
    assert patch.applied(), f"patch {patch.number} is not in effect on megatron-core {cpu_compat.mcore_version()}"
    for target in patch.targets:
        _replace_target(monkeypatch, target, object())
        assert not patch.applied(), target
        monkeypatch.undo()
    assert patch.applied()


@pytest.mark.parametrize("patch", cpu_compat.PATCHES, ids=_patch_id)
def test_each_patch_was_checked_on_this_megatron_core(patch):
    """A megatron-core release the patches were not checked on fails here (update the registry once
    the patch is checked there, or drop it)."""
    assert cpu_compat.mcore_version() in patch.checked_on, (patch.number, patch.checked_on)
    assert cpu_compat.mcore_version() in cpu_compat.CHECKED_ON  # the extension points of layer_specs too


def _tiny_hybrid_model():
    """A two-layer (Mamba, attention) hybrid model of the CPU spec."""
    from providers.mamba_provider import MambaModelProvider

    provider = MambaModelProvider(
        num_layers=2, hybrid_override_pattern="M*", hidden_size=32, num_attention_heads=4, num_query_groups=2,
        kv_channels=8, mamba_num_heads=4, mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8,
        vocab_size=64, params_dtype=torch.float32)
    return provider.provide()


@CPU_ONLY
def test_the_cpu_mixer_leaves_megatrons_mixer_module_alone(parallel_state):
    """The CPU build's Mamba mixer (`layer_specs.cpu_mamba_mixer`, formerly patch 7) builds with the
    pure-torch norm and scan while megatron's mixer module still tells the truth about mamba-ssm."""
    import importlib.util

    from megatron.core.ssm import mamba_mixer

    from providers.layer_specs import cpu_mamba_mixer

    have_mamba_ssm = importlib.util.find_spec("mamba_ssm") is not None
    assert mamba_mixer.HAVE_MAMBA_SSM is have_mamba_ssm
    mixer = _tiny_hybrid_model().decoder.layers[0].mixer
    assert mamba_mixer.HAVE_MAMBA_SSM is have_mamba_ssm
    if have_mamba_ssm:
        return  # megatron's own mixer, with mamba-ssm's kernels
    assert isinstance(mixer, cpu_mamba_mixer()) and cpu_mamba_mixer() is not mamba_mixer.MambaMixer
    assert type(mixer.norm) is cpu_compat.ExtendedRMSNorm
    assert mamba_mixer.ExtendedRMSNorm is not cpu_compat.ExtendedRMSNorm
    assert getattr(mamba_mixer, "mamba_chunk_scan_combined", None) is not cpu_compat.mamba_chunk_scan_combined


@CPU_ONLY
def test_the_cpu_build_uses_extension_points(parallel_state):
    """The final norm and the causal mask come from the CPU spec's modules, not from patches."""
    from providers.layer_specs import CpuHybridStack, DotProductAttention
    from providers.megatron_imports import HybridStack

    model = _tiny_hybrid_model()
    assert isinstance(model.decoder, CpuHybridStack) and isinstance(model.decoder, HybridStack)
    assert isinstance(model.decoder.final_norm, cpu_compat.TorchNorm)
    attention = model.decoder.layers[1].self_attention.core_attention
    assert isinstance(attention, DotProductAttention) and attention.scale_mask_softmax.window_size is None
    tokens = torch.randint(0, 64, (1, 5))
    logits = model(tokens, torch.arange(5)[None], None)
    assert logits.shape == (1, 5, 128) and torch.isfinite(logits).all()
    # causal: the first position does not see the others
    changed = tokens.clone()
    changed[0, 1:] = (changed[0, 1:] + 1) % 64
    assert torch.equal(model(changed, torch.arange(5)[None], None)[0, 0], logits[0, 0])
