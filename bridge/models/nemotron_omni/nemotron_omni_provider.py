"""Megatron-Bridge's import path for the Omni providers (they live in `providers.omni_provider`)."""

from providers.omni_provider import NemotronOmniModelProvider, NemotronVLModelProvider

__all__ = ["NemotronVLModelProvider", "NemotronOmniModelProvider"]
