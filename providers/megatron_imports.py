"""megatron-core names and APIs that moved between releases, selected in one place.

The two releases the bridge runs on (both checked by the whole test suite on a CPU):

* megatron-core 0.16.1 (the newest for Python 3.11): the hybrid model is
  `megatron.core.models.mamba.MambaModel(mamba_stack_spec=, hybrid_override_pattern=)`; its stack
  `megatron.core.ssm.mamba_block.MambaStack` picks its own layers (an even split over PP; it
  asserts that no virtual pipeline is set) and its transformer layers add their pipeline offset
  to their layer number themselves. A TransformerLayer's `mlp` spec is a `ModuleSpec`.
* megatron-core 0.19.2 (the hybrid package exists from 0.18 on): the hybrid model is
  `megatron.core.models.hybrid.HybridModel(hybrid_stack_spec=, hybrid_layer_pattern=, vp_stage=)`
  (`MambaModel` is a deprecated wrapper that logs a warning per build, `MambaStack` an alias of
  `HybridStack`). The model picks this stage's layers (`select_pipeline_segment`: '|' in the
  pattern separates pipeline segments, and virtual pipeline chunk `v` of rank `r` is segment
  `v * PP + r`) and hands the stack `layer_type_list` and `pp_layer_offset`; every layer gets its
  global layer number. A TransformerLayer's `mlp` is a builder, `partial(MLP.as_mlp_submodule,
  submodules=...)` (a `ModuleSpec` is rewrapped, with a warning per layer).

Selected by feature detection (`HYBRID_PACKAGE`, `MLP_BUILDER`); the version, for messages, is
`providers.cpu_compat.mcore_version()`.
"""

from __future__ import annotations

import re
from functools import partial

from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec


try:  # megatron-core >= 0.18 (0.19.2 checked)
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    HYBRID_PACKAGE = True
except ImportError:  # megatron-core 0.16.1
    from megatron.core.models.mamba.mamba_model import MambaModel as HybridModel
    from megatron.core.ssm.mamba_block import MambaStack as HybridStack
    from megatron.core.ssm.mamba_block import MambaStackSubmodules as HybridStackSubmodules

    HYBRID_PACKAGE = False

# The model class the bridge builds (for annotations and isinstance checks).
MambaModel = HybridModel

# 0.19.2: `MLP.as_mlp_submodule` (the TransformerLayer mlp builder); 0.16.1: none (ModuleSpec).
MLP_BUILDER = hasattr(MLP, "as_mlp_submodule")

try:  # Transformer Engine is an optional (GPU) extra.
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_TE = False


def mlp_spec(submodules):
    """The `mlp` entry of a TransformerLayer spec for megatron's dense `MLP` with `submodules`."""
    if MLP_BUILDER:  # 0.19.2
        return partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)  # 0.16.1


def spec_submodules(spec):
    """The `submodules` of a spec entry: a `ModuleSpec` (both versions) or a `functools.partial`
    builder taking `submodules=` (0.19.2's MLP / MoE entries)."""
    if isinstance(spec, partial):
        return spec.keywords["submodules"]
    return spec.submodules


def pipeline_pattern(pattern: str, segments: int) -> str:
    """`pattern` cut into `segments` equal pipeline segments with '|' (0.19.2's pattern syntax)."""
    if segments <= 1:
        return pattern
    if len(pattern) % segments:
        raise ValueError(f"the hybrid pattern's {len(pattern)} layers do not split into {segments} "
                         "equal pipeline segments")
    step = len(pattern) // segments
    return "|".join(pattern[i:i + step] for i in range(0, len(pattern), step))


def build_hybrid_model(*, config, stack_spec, pattern: str, vp_stage=None, **kwargs):
    """megatron's hybrid language model on this pipeline stage / virtual chunk.

    0.19.2: `HybridModel` with the pattern cut into PP x VPP segments (the segment of chunk `v` of
    pipeline rank `r` is `v * PP + r`, megatron's interleaved order) unless uneven first / last
    stages are set (then megatron's own uneven split of the unsegmented pattern).
    0.16.1: `MambaModel`; the stack picks its layers (see `providers.mamba_provider`'s virtual
    stage stack for VPP) and `vp_stage` is set on the model afterwards, as 0.19.2 does.
    """
    if HYBRID_PACKAGE:
        pp = config.pipeline_model_parallel_size
        vpp = config.virtual_pipeline_model_parallel_size or 1
        uneven = (config.num_layers_in_first_pipeline_stage is not None
                  or config.num_layers_in_last_pipeline_stage is not None)
        if pp > 1 and not uneven:
            pattern = pipeline_pattern(pattern, pp * vpp)
        return HybridModel(config=config, hybrid_stack_spec=stack_spec, hybrid_layer_pattern=pattern,
                           vp_stage=vp_stage, **kwargs)
    model = HybridModel(config=config, mamba_stack_spec=stack_spec, hybrid_override_pattern=pattern, **kwargs)
    if vp_stage is not None:
        model.vp_stage = vp_stage
    return model


# The Mamba mixer's depthwise convolution: 0.16.1 registers an `nn.Conv1d` submodule (state-dict
# names `mixer.conv1d.weight` / `mixer.conv1d.bias`); 0.19.2 registers the parameters
# `mixer.conv1d_weight` / `mixer.conv1d_bias` on the mixer itself, in the TE build as in ours, and
# its `MambaMixer.sharded_state_dict` keeps the checkpoint keys `conv1d.weight` / `conv1d.bias`
# (its `conv_checkpoint_key_map`). The bridge names every tensor by its checkpoint key.
_CONV1D_PARAMETER = re.compile(r"(^|\.)mixer\.conv1d_(weight|bias)$")


def checkpoint_name(state_dict_name: str) -> str:
    """The dist-checkpoint key (without layer renumbering) of a model state-dict name."""
    return _CONV1D_PARAMETER.sub(r"\1mixer.conv1d.\2", state_dict_name)


# ---------------------------------------------------------------------------- dist_checkpointing
# The common (non-tensor) state of a dist_checkpointing checkpoint ({"checkpoint_version", "iteration"}
# for the bridge's checkpoints):
# * 0.16.1 writes it to `common.pt` beside the torch_dist files (metadata.json also names its
#   `common_backend`) and cannot load a checkpoint without that file;
# * 0.19.2 stores it inside the torch_dist files, as the object `common_state` (key
#   `common_state/shard_0_1`), writes no `common.pt`, and loads either form (`common.pt` first).
# The tensors and their keys are the same. So on 0.19.2 the bridge also writes `common.pt`
# (`add_common_state_file`), and on 0.16.1 it reads a checkpoint without one (e.g. written by
# megatron-core 0.19.2's own training loop) through a common-load strategy that takes the state from
# the torch_dist files (`common_load_kwargs`): checkpoints load both ways.
COMMON_STATE_FILE = "common.pt"  # megatron.core.dist_checkpointing.strategies.common.COMMON_STATE_FNAME
_COMMON_STATE_OBJECT = "common_state"


def _load_takes_common_strategy() -> bool:
    import inspect

    from megatron.core import dist_checkpointing

    return "common_strategy" in inspect.signature(dist_checkpointing.load).parameters  # 0.16.1


def common_state_in_torch_dist(checkpoint_dir) -> dict:
    """The common state 0.19.2 keeps in the torch_dist files (its `load_common_state_dict`)."""
    import io
    import os

    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint import FileSystemReader, load

    key = ShardedObject(_COMMON_STATE_OBJECT, None, (1,), (0,)).unique_key
    state = {key: io.BytesIO()}
    reader = FileSystemReader(os.fspath(checkpoint_dir))
    if key not in reader.read_metadata().state_dict_metadata:
        raise FileNotFoundError(f"{checkpoint_dir}: neither {COMMON_STATE_FILE} nor a {_COMMON_STATE_OBJECT!r} object "
                                "in the torch_dist files (not a megatron-core dist_checkpointing checkpoint)")
    load(state, storage_reader=reader, no_dist=True)
    loaded = state[key]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, weights_only=True)
    return loaded[0]  # megatron saves a sharded object's data as [data]


def add_common_state_file(checkpoint_dir) -> None:
    """After `dist_checkpointing.save` (rank 0): write `common.pt` when this megatron-core stored the
    common state only inside the torch_dist files (0.19.2), so that 0.16.1 loads the checkpoint."""
    from pathlib import Path

    import torch

    path = Path(checkpoint_dir) / COMMON_STATE_FILE
    if not path.exists():  # 0.16.1 has written it already
        torch.save(common_state_in_torch_dist(checkpoint_dir), path)


def common_load_kwargs(checkpoint_dir) -> dict:
    """Extra `dist_checkpointing.load` arguments for `checkpoint_dir` on this megatron-core."""
    import os

    if not _load_takes_common_strategy() or os.path.exists(os.path.join(checkpoint_dir, COMMON_STATE_FILE)):
        return {}
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class CommonStateInTorchDist(TorchCommonLoadStrategy):
        """0.16.1's common-load strategy for a checkpoint whose common state is in its torch_dist
        files (written by 0.19.2) instead of `common.pt`."""

        def load_common(self, checkpoint_dir):
            return common_state_in_torch_dist(checkpoint_dir)

    return {"common_strategy": CommonStateInTorchDist()}
