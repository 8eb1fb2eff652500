"""The registry: every mapping of a model, made from its config alone.

`mappings(config)` is the one list every path derives from: the preflight (names, shapes and
dtypes of an HF directory against it, `conversion.preflight.check_tensors`), the in-memory load and
export (`bridge.auto_bridge`), both streaming directions (`bridge.streaming`) and bridge-verify.
Its pieces:
  conversion/nemotron_h.py   the NemotronH language model (names, shape formulas, kinds)
  conversion/omni.py         RADIO, the projectors, the carried RADIO tensors, Parakeet
  conversion/mappings.py     what a mapping is, and the kinds (transform + TP / EP sharding)
Another naming target for the Megatron side (Megatron-Bridge's, Megatron-LM's) is a rename of the
`megatron` names of this list; another source format is a reader of tensors by these HF names.
"""

from __future__ import annotations

from typing import Collection, List, Optional

from conversion import omni
from conversion.hf_config import HFModelConfig
from conversion.mappings import Mapping
from conversion.nemotron_h import language_model_mappings

OMNI_LM_PREFIX = "language_model."  # the Megatron Omni model's language model module


def mappings(config: HFModelConfig, present: Optional[Collection[str]] = None) -> List[Mapping]:
    """Every mapping of the model `config` describes, in HF file order: the language model's, then
    (Omni) the encoders', projectors' and carried tensors'. `present`: the HF tensor names of the
    source when known; they decide only the optional tensors (see `conversion.omni.CARRIED_RULES`)."""
    lm = language_model_mappings(config.text)
    if config.kind == "nemotron_h":
        return lm
    fields = omni.omni_provider_fields(config.raw, config.scheme, "config.json")
    return ([m.renamed(OMNI_LM_PREFIX, config.lm_prefix) for m in lm]
            + omni.omni_mappings(config.raw, fields, config.text["hidden_size"], present))
