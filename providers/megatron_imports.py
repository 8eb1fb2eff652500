"""megatron-core names that moved between releases, imported in one place.

In 0.19.x `MambaModel` became a deprecated wrapper of `megatron.core.models.hybrid.HybridModel`; in
0.16.1 (the newest for Python 3.11) only `MambaModel` exists. Both take the same arguments we use.
"""

from megatron.core.models.mamba import MambaModel  # noqa: F401

try:  # Transformer Engine is an optional (GPU) extra.
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_TE = False
