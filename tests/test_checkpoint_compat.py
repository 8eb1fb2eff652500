"""Megatron checkpoints are the same on megatron-core 0.16.1 and 0.19.2 and load with either.

- The torch_dist keys and global shapes of the tiny text and Omni models' checkpoints equal
  `tests/data/tiny_checkpoint_keys.json` (recorded with megatron-core 0.16.1; the suite runs on both
  versions). 0.19.2 renamed the Mamba mixer's conv parameters (`mixer.conv1d_weight`) but keeps
  their checkpoint key (`mixer.conv1d.weight`); its only extra entry is the `common_state` object.
- The common state: 0.16.1 keeps it in `release/common.pt` and needs that file to load; 0.19.2
  keeps it in the torch_dist files (the object `common_state`). The bridge writes `common.pt` on
  both, and loads a checkpoint whose common state is only in the torch_dist files (as megatron-core
  0.19.2's own writer leaves it) on both (`providers.megatron_imports`).
"""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from bridge.tiny_models import build_hf_model, build_hf_omni_model, save_hf_model, tiny_config

GOLDEN = Path(__file__).parent / "data" / "tiny_checkpoint_keys.json"
COMMON_OBJECT = "common_state/shard_0_1"  # 0.19.2's common state inside the torch_dist files


def tensor_keys(release: Path) -> dict:
    """torch_dist key -> global shape of a tensor, or "object" (e.g. a TE `_extra_state`), for every
    entry but 0.19.2's common-state object: the checkpoint's layout, whatever wrote it."""
    md = FileSystemReader(str(release)).read_metadata().state_dict_metadata
    return {k: "object" if isinstance(v, BytesStorageMetadata) else list(v.size)
            for k, v in sorted(md.items()) if k != COMMON_OBJECT}


@pytest.fixture(scope="module")
def saved(parallel_state, tmp_path_factory):
    """{kind: (hf dir, megatron checkpoint dir, model)}: the tiny models saved by the bridge through
    megatron-core's own dist_checkpointing writer."""
    from bridge import AutoBridge

    tmp = tmp_path_factory.mktemp("compat")
    out = {}
    for kind, hf_model in (("text", build_hf_model(tiny_config(), seed=2)), ("omni", build_hf_omni_model(seed=3))):
        hf = save_hf_model(hf_model, tmp / f"hf_{kind}", dtype=torch.float32)
        bridge = AutoBridge.from_hf_pretrained(hf)
        model = bridge.to_megatron_provider().provide()
        bridge.load_hf_weights(model)
        bridge.save_megatron_model(model, tmp / f"mcore_{kind}")
        out[kind] = (hf, tmp / f"mcore_{kind}", model)
    return out


@pytest.mark.parametrize("kind", ["text", "omni"])
def test_checkpoint_keys_are_those_of_megatron_core_0_16_1(saved, kind):
    release = saved[kind][1] / "release"
    golden = json.loads(GOLDEN.read_text())[kind]
    got = tensor_keys(release)
    assert got == golden, (sorted(set(got) ^ set(golden))[:10], [k for k in got if k in golden and got[k] != golden[k]][:10])
    assert any(k.endswith("mixer.conv1d.weight.x") for k in got)  # the Mamba conv under its old key


def _as_0_19_2_writes_it(release: Path, dest: Path) -> None:
    """A copy of `release` whose common state is only the torch_dist object `common_state` (no
    common.pt), as megatron-core 0.19.2's `dist_checkpointing.save` leaves it: every entry is read
    and written again with torch.distributed.checkpoint, plus that object."""
    common = torch.load(release / "common.pt", weights_only=True)
    reader = FileSystemReader(str(release))
    md = reader.read_metadata().state_dict_metadata
    state = {k: io.BytesIO() if isinstance(v, BytesStorageMetadata) else torch.empty(v.size, dtype=v.properties.dtype)
             for k, v in md.items()}
    dcp.load(state, storage_reader=reader, no_dist=True)
    buf = io.BytesIO()
    torch.save([common], buf)  # megatron stores a sharded object's data as [data]
    buf.seek(0)
    state[COMMON_OBJECT] = buf
    dest.mkdir(parents=True)
    dcp.save(state, storage_writer=FileSystemWriter(str(dest)), no_dist=True)
    shutil.copy(release / "metadata.json", dest / "metadata.json")


def test_common_state_file_is_written_and_not_needed(saved, tmp_path):
    from bridge import AutoBridge, checkpoint

    hf, mcore, model = saved["text"]
    from conversion import hf_config

    from conversion import safe_pickle  # noqa: F401 - allows Megatron-LM's args (argparse.Namespace)
    common = torch.load(mcore / "release" / "common.pt", weights_only=True)
    args = common.pop("args")
    assert common == {"checkpoint_version": 3.0, "iteration": 0}
    # Megatron-LM's args: the hybrid pattern (from 0.19 a hybrid checkpoint without it is taken for a
    # GPT one) and the sizes its loader compares, as the HF config gives them
    text = hf_config.load_config(hf).text
    assert args.hybrid_override_pattern == args.hybrid_layer_pattern == text["_pattern"]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (
        len(text["_pattern"]), text["hidden_size"], text["num_attention_heads"])

    copy = tmp_path / "mcore"
    shutil.copytree(mcore, copy, ignore=shutil.ignore_patterns("release"))
    _as_0_19_2_writes_it(mcore / "release", copy / "release")
    assert not (copy / "release" / "common.pt").exists()
    fresh = AutoBridge.from_hf_pretrained(hf).to_megatron_provider().provide()
    checkpoint.load(fresh, copy)  # the bridge's loader, without the checksum check (files changed)
    want, got = model.state_dict(), fresh.state_dict()
    for name, tensor in want.items():
        if not name.endswith("_extra_state"):
            assert torch.equal(got[name], tensor), name
