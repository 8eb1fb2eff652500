"""Which versions of Python and of the packages the bridge relies on were tested, and the one line
said at import when the installed ones differ.

The bridge uses internals of megatron-core (module paths, layer specs, the CPU accommodations of
`providers/cpu_compat.py`), of torch (the distributed-checkpoint writer and planner) and of
transformers (the Parakeet encoder module, the Omni processor). `pyproject.toml` admits the ranges
below; CI runs the exact versions of `constraints/*.txt` (`TESTED`, kept equal to those files by
`tests/test_versions.py`) and the newest versions the ranges admit. At import:

* a version below `MINIMUM` cannot work (the APIs the bridge calls do not exist there): ImportError,
  one line;
* a version not in `TESTED` probably works: one `warning:` line on stderr, once per process (not a
  `warnings.warn`, which the CLIs silence together with megatron's import-time noise);
  `BRIDGE_UNTESTED_VERSIONS=ok` in the environment silences it.

Only `importlib.metadata` is read here: nothing is imported (the CLIs import neither transformers
nor megatron before they need them).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Dict, List, Optional, Tuple

# What CI ran: constraints/py311.txt and constraints/py312.txt.
TESTED: Dict[str, Tuple[str, ...]] = {
    "python": ("3.11", "3.12"),
    "torch": ("2.13.0", "2.14.1"),
    "megatron-core": ("0.16.1", "0.19.2"),
    "transformers": ("5.24.0",),
}

# Below these the bridge cannot work: Python 3.11 syntax and stdlib; megatron-core 0.16 is the first
# with the hybrid model's MoE layers and RADIO ViT the providers build; transformers 5.23 the first
# with the Nemotron-Omni classes; torch 2.6 the first whose distributed checkpoint writer the
# streaming save drives.
MINIMUM: Dict[str, str] = {"python": "3.11", "torch": "2.6", "megatron-core": "0.16.1", "transformers": "5.23"}

# How much of a version must equal a tested one: Python's major.minor (any patch release), the
# packages' full release (their patch releases have changed internals the bridge uses).
_COMPARED = {"python": 2, "torch": 3, "megatron-core": 3, "transformers": 3}

_SAID = False


def _release(version: str) -> Tuple[int, ...]:
    """(major, minor, micro) of a version string ("2.13.0+cpu" -> (2, 13, 0), "0.20.0rc1" -> (0, 20, 0))."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
        if digits != piece:
            break
    return tuple(parts + [0] * (3 - len(parts)))


def installed() -> Dict[str, Optional[str]]:
    """The installed version of each checked package (None when absent) and Python's major.minor."""
    out: Dict[str, Optional[str]] = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for name in ("torch", "megatron-core", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def check(versions: Dict[str, Optional[str]]) -> Tuple[List[str], List[str]]:
    """(errors, warnings) for the given versions: a pure function, see the module docstring."""
    errors, notes = [], []
    for name, version in versions.items():
        if version is None:
            continue
        release = _release(version)
        if release < _release(MINIMUM[name]):
            errors.append(f"{name} {version} is too old: nemotron-omni-bridge needs {name} >= {MINIMUM[name]} "
                          f"(tested: {', '.join(TESTED[name])})")
        elif not any(release[:_COMPARED[name]] == _release(t)[:_COMPARED[name]] for t in TESTED[name]):
            notes.append(f"{name} {version}")
    warnings = []
    if notes:
        tested = "; ".join(f"{n} {', '.join(TESTED[n])}" for n in TESTED)
        warnings.append(f"warning: nemotron-omni-bridge was not tested with {', '.join(notes)} "
                        f"(CI ran {tested}); see README 'Supported versions'")
    return errors, warnings


def check_installed() -> None:
    """Raise ImportError (one line) for a version that cannot work; say untested versions once."""
    global _SAID
    errors, warnings = check(installed())
    if errors:
        raise ImportError("; ".join(errors))
    if warnings and not _SAID and os.environ.get("BRIDGE_UNTESTED_VERSIONS") != "ok":
        print(warnings[0], file=sys.stderr)
    _SAID = True
