"""Hugging Face side of the bridge: files, configs and the registry of mappings (names, shapes,
transforms, sharding).

Imports torch and safetensors only (never megatron, never providers/), so every piece here is
unit-testable in milliseconds on any CPU box.
"""

from conversion.versions import check_installed as _check_versions

_check_versions()  # ImportError where an installed version cannot work, one warning line where untested

from conversion.errors import ConversionError  # noqa: E402

__all__ = ["ConversionError"]
