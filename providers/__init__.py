"""Dataclass providers that build megatron-core models (no file I/O here)."""

from providers.mamba_provider import MambaModelProvider, NemotronHModelProvider, Nemotron3NanoProvider

__all__ = ["MambaModelProvider", "NemotronHModelProvider", "Nemotron3NanoProvider"]
