"""HF <-> Megatron bridge for Nemotron-3-Nano-Omni: public API and command-line tools."""

from bridge.auto_bridge import AutoBridge

__all__ = ["AutoBridge"]
