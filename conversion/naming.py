"""Which program a Megatron checkpoint is laid out for: its key names, its vocab rows, where the
carried HF tensors live.

The registry's Megatron names (`conversion.registry`) are those of this project's model. A target
is a table of prefix renames from those names to the checkpoint's keys, applied to megatron-core's
sharded state on save and load alike (`bridge.checkpoint.sharded_state`), plus whether the vocab
rows are padded, where the carried tensors live and which tensors such a checkpoint may lack:

| target | Omni keys | vocab rows | carried RADIO tensors |
|---|---|---|---|
| `bridge` (default) | `language_model.`, `vision_model.`, `sound_encoder.encoder.`, `hf_extras.` | padded to a multiple of 128 (Megatron-LM's rule at TP 1) | in the checkpoint (`hf_extras.*`) |
| `megatron-bridge` | `llava_model.` + `language_model.`, `vision_model.`, `vision_projection.`, `sound_model.`, `sound_projection.` | HF's `vocab_size` (unpadded) | beside it, `hf_carried.safetensors` |
| `megatron-lm` | as `bridge`, with `sound_model.` | padded to a multiple of 128 | beside it, `hf_carried.safetensors` |

Megatron-Bridge 0.6.x (PyPI, read at v0.6.0 = 0.6.2: `models/nemotron_omni/nemotron_omni_provider.py`)
wraps megatron-core's `LLaVAModel` as `llava_model` and holds transformers' `ParakeetEncoder` as
`sound_model.encoder`; its Omni provider passes `language_vocab_size=vocab_size` (no padding); its
RADIO model has no input-conditioner / summary / layer-scale tensors. Megatron-LM (and Megatron-Bridge
from 0.7, not released) name the Omni parts without the wrapper. The text model's keys are the same
for every target (megatron-core's hybrid model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

CARRIED_PREFIX = "hf_extras."  # this project's module of carried HF tensors (conversion/omni.py)
CARRIED_FILE = "hf_carried.safetensors"  # beside the checkpoint, for targets that do not store them


@dataclass(frozen=True)
class Target:
    name: str
    renames: Tuple[Tuple[str, str], ...]  # (this project's prefix, the checkpoint's), first match wins
    pad_vocab: bool                      # embedding / output rows padded (megatron's make_vocab_size_divisible_by)
    carried_in_checkpoint: bool          # `hf_extras.*` stored in the torch_dist files
    may_lack: Tuple[str, ...] = ()       # this project's prefixes a checkpoint this program wrote may not have

    def kept_elsewhere(self, name: str) -> bool:
        """Whether a checkpoint of this target may lack the registry's Megatron tensor `name` (then it
        comes from beside the checkpoint or from the base HF directory)."""
        return (name.startswith(CARRIED_PREFIX) and not self.carried_in_checkpoint) or name.startswith(self.may_lack)

    def checkpoint_key(self, key: str) -> Optional[str]:
        """The checkpoint's key of one of this project's sharded-state keys; None: not stored there."""
        if key.startswith(CARRIED_PREFIX) and not self.carried_in_checkpoint:
            return None
        for ours, theirs in self.renames:
            if key.startswith(ours):
                return theirs + key[len(ours):]
        return key


_OMNI_PARTS = ("language_model.", "vision_model.", "vision_projection.", "sound_projection.")
TARGETS = {
    "bridge": Target("bridge", (), pad_vocab=True, carried_in_checkpoint=True),
    "megatron-bridge": Target("megatron-bridge",
                              (("sound_encoder.", "llava_model.sound_model."),)
                              + tuple((p, "llava_model." + p) for p in _OMNI_PARTS),
                              pad_vocab=False, carried_in_checkpoint=False,
                              # built only when the HF vision config says `separate_video_embedder`, which
                              # the released config does not: its checkpoints have no video embedder
                              may_lack=("vision_model.video_embedder.",)),
    "megatron-lm": Target("megatron-lm", (("sound_encoder.", "sound_model."),), pad_vocab=True,
                          carried_in_checkpoint=False),
}
DEFAULT_TARGET = "bridge"


def detect(keys: Iterable[str]) -> Target:
    """The target a checkpoint's torch_dist keys were written for (a text model's keys are the same
    for all of them: then `bridge`, which reads the others' text checkpoints as they are)."""
    keys = list(keys)
    if any(k.startswith("llava_model.") for k in keys):
        return TARGETS["megatron-bridge"]
    if any(k.startswith("sound_model.") for k in keys):
        return TARGETS["megatron-lm"]
    if any(k.startswith("language_model.") for k in keys) and not any(k.startswith(CARRIED_PREFIX) for k in keys):
        return TARGETS["megatron-lm"]  # an Omni checkpoint without this project's carried tensors
    return TARGETS["bridge"]
