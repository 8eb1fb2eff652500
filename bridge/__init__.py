"""HF <-> Megatron bridge for Nemotron-3-Nano-Omni: public API and command-line tools."""

__all__ = ["AutoBridge"]


def __getattr__(name):
    # Lazy, so that `bridge.cli` can silence megatron's import-time warnings before importing it.
    if name == "AutoBridge":
        from bridge.auto_bridge import AutoBridge

        return AutoBridge
    raise AttributeError(name)
