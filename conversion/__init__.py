"""Hugging Face side of the bridge: files, configs, name tables and tensor transforms.

Imports torch and safetensors only (never megatron, never providers/), so every piece here is
unit-testable in milliseconds on any CPU box.
"""

from conversion.errors import ConversionError

__all__ = ["ConversionError"]
