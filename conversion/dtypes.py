"""The one table of dtypes: torch's names (what bridge_meta.json, the HF manifests and config.json
record: `bfloat16`), the short names of the `--dtype` flags (`bf16`) and the dtype strings of
safetensors headers (`BF16`).

torch is imported only when a torch dtype is asked for: the CLIs list the flags before they import
torch (see bridge/cli.py's start-up).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Dict

from conversion.errors import ConversionError

if TYPE_CHECKING:
    import torch

# torch's name -> safetensors' string: the dtypes checkpoints of this model use, plus ints and bool.
SAFETENSORS = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
# The `--dtype` flags of the CLIs and examples -> torch's name.
FLAGS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

_NAME_OF_SAFETENSORS = {st: name for name, st in SAFETENSORS.items()}


@functools.cache
def _torch_dtypes() -> Dict[str, "torch.dtype"]:
    import torch

    return {name: getattr(torch, name) for name in SAFETENSORS}


@functools.cache
def _names() -> Dict["torch.dtype", str]:
    return {dtype: name for name, dtype in _torch_dtypes().items()}


def dtype_from_name(name: str) -> "torch.dtype":
    """The torch dtype of a name of the table (`bfloat16`) or of a `--dtype` flag (`bf16`)."""
    try:
        return _torch_dtypes()[FLAGS.get(name, name)]
    except KeyError:
        raise ConversionError(f"unknown dtype {name!r}; expected one of {sorted(SAFETENSORS)}") from None


def dtype_name(dtype: "torch.dtype") -> str:
    """torch's name of a dtype of the table (KeyError for any other)."""
    return _names()[dtype]


def safetensors_dtype(dtype: "torch.dtype") -> str:
    """The safetensors header string of a dtype of the table (`BF16`)."""
    return SAFETENSORS[dtype_name(dtype)]


def dtype_from_safetensors(st_dtype: str) -> "torch.dtype":
    """The torch dtype of a safetensors header string (KeyError for one outside the table)."""
    return _torch_dtypes()[_NAME_OF_SAFETENSORS[st_dtype]]
