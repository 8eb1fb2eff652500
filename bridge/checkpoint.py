"""Megatron checkpoints on disk, in Megatron-LM's directory convention.

    OUT/
      latest_checkpointed_iteration.txt   "release"  (Megatron-LM's tracker file)
      release/                             megatron-core dist_checkpointing (torch_dist) files, with
                                           run_config.yaml (what Megatron-Bridge's loader reads)
      bridge_meta.json                     HF config, provider fields, dtype, HF tensor manifest, target
      hf_assets/                           non-weight files of the source HF dir (tokenizer, ...)
      hf_carried.safetensors               the carried RADIO tensors, for targets that do not store them

Megatron-LM's `--load` / `--finetune` read the tracker and `release/`, Megatron-Bridge's
`checkpoint.pretrained_checkpoint` the same plus `release/run_config.yaml`; the bridge's own files
sit beside them and never inside what Megatron reads. The model's state is saved under the key
`model` (Megatron-LM's key), with `checkpoint_version` 3.0, `iteration` 0 and Megatron-LM's `args`
beside it (`megatron_args`: Megatron-LM from 0.19 treats a hybrid checkpoint without
`hybrid_override_pattern` in `args` as a GPT one). Key names, vocab rows and where the carried tensors
live follow the checkpoint's target (`conversion.naming`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Dict, Optional

from megatron.core import dist_checkpointing

from bridge.output import output_transaction
from bridge.ranks import world
from conversion.hf_writer import copy_assets
from conversion.integrity import META_FORMAT, META_NAME, read_meta  # noqa: F401 - re-exported
from conversion.megatron_ckpt import RELEASE_DIR, TRACKER_NAME, iteration_dir
from conversion.naming import CARRIED_FILE, DEFAULT_TARGET, TARGETS, Target
from conversion.safe_pickle import check_dist_checkpoint
from providers.megatron_imports import add_common_state_file, common_load_kwargs

ASSETS_DIR = "hf_assets"
RUN_CONFIG_NAME = "run_config.yaml"


def sharded_state(model, target: Target = TARGETS[DEFAULT_TARGET], args: Optional[argparse.Namespace] = None) -> Dict:
    """The state megatron-core saves / loads: each chunk's `sharded_state_dict()` with its keys named
    for `target` (entries the target does not store, the carried tensors, left out), and `args`."""
    from bridge.weights import model_chunks

    chunks = model_chunks(model)
    state = {"checkpoint_version": 3.0, "iteration": 0}
    if args is not None:
        state["args"] = args
    for i, chunk in enumerate(chunks):  # virtual pipeline stages: Megatron-LM's model0, model1, ...
        state["model" if len(chunks) == 1 else f"model{i}"] = _named_for(chunk.sharded_state_dict(), target)
    return state


def _named_for(chunk_state: Dict, target: Target) -> Dict:
    out = {}
    for name, entry in chunk_state.items():
        if hasattr(entry, "key"):  # ShardedTensor / ShardedObject / factory (a factory's pieces derive from it)
            key = target.checkpoint_key(entry.key)
            if key is None:
                continue  # kept beside the checkpoint (CARRIED_FILE)
            entry.key = key
        out[name] = entry
    return out


def megatron_args(model, layout: Optional[Dict] = None) -> argparse.Namespace:
    """Megatron-LM's `args` for the common state (plain values only: it is unpickled with
    `weights_only`). Its loader compares num_layers / hidden_size / num_attention_heads without
    `--finetune`, copies the model fields with `--use-checkpoint-args`, and from 0.19 needs the hybrid
    pattern (else it takes the checkpoint for a GPT one)."""
    from bridge.weights import model_chunks

    chunk = model_chunks(model)[0]
    lm = getattr(chunk, "language_model", chunk)
    c, layout = lm.config, layout or {}
    pattern = c.hybrid_override_pattern
    return argparse.Namespace(
        num_layers=len(pattern.replace("|", "")), hybrid_override_pattern=pattern, hybrid_layer_pattern=pattern,
        is_hybrid_model=True, hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_attention_heads, num_query_groups=c.num_query_groups,
        group_query_attention=c.num_query_groups not in (None, c.num_attention_heads), kv_channels=c.kv_channels,
        mamba_num_heads=c.mamba_num_heads, mamba_head_dim=c.mamba_head_dim, mamba_num_groups=c.mamba_num_groups,
        mamba_state_dim=c.mamba_state_dim, num_experts=c.num_moe_experts, moe_ffn_hidden_size=c.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=c.moe_shared_expert_intermediate_size, moe_router_topk=c.moe_router_topk,
        moe_router_topk_scaling_factor=c.moe_router_topk_scaling_factor, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=bool(c.num_moe_experts), padded_vocab_size=lm.vocab_size,
        make_vocab_size_divisible_by=128, max_position_embeddings=lm.max_sequence_length,
        seq_length=lm.max_sequence_length, position_embedding_type="none",
        add_position_embedding=True,  # Megatron-LM's default (position_embedding_type rules); False trips its checks
        untie_embeddings_and_output_weights=not lm.share_embeddings_and_output_weights, squared_relu=True,
        swiglu=False, normalization="RMSNorm", norm_epsilon=c.layernorm_epsilon, add_bias_linear=False,
        add_qkv_bias=False, moe_grouped_gemm=bool(c.num_moe_experts), tokenizer_type="HuggingFaceTokenizer",
        spec=["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"],
        tensor_model_parallel_size=layout.get("tp") or 1, pipeline_model_parallel_size=layout.get("pp") or 1,
        expert_model_parallel_size=layout.get("ep") or 1, ckpt_format="torch_dist", no_save_optim=True,
        no_save_rng=True, consumed_train_samples=0, consumed_valid_samples=0)


def run_config_yaml(layout: Optional[Dict] = None) -> str:
    """`run_config.yaml` for Megatron-Bridge's loader: a fine-tuning load reads the parallel sizes
    (and the save flags on a resume); the model itself comes from the recipe / the HF config."""
    import yaml

    layout = layout or {}
    config = {"model": {"tensor_model_parallel_size": layout.get("tp") or 1,
                        "pipeline_model_parallel_size": layout.get("pp") or 1},
              "checkpoint": {"save_optim": False, "save_rng": False, "fully_parallel_save": False}}
    return "# written by convert-hf-to-mcore: what Megatron-Bridge's checkpoint loader reads\n" + yaml.safe_dump(config)


def save(state: Callable[[], Dict], path: Path, meta: Callable[[], Dict], assets_dir: Optional[Path],
         overwrite: bool = False, strategy=None, finalize: Optional[Callable[[Path], None]] = None,
         run_config: str = "", carried: Optional[Callable[[], Dict]] = None) -> None:
    """Write a model's sharded state (all ranks take part) and the bridge files (rank 0) into `path`,
    atomically. `state()` gives this rank's sharded state dict (`sharded_state(model)`); `meta()`
    the contents of bridge_meta.json (asked for after the tensors are written); `strategy` is the
    dist_checkpointing save strategy (None: megatron-core's default, torch_dist); `finalize(tmp)`
    runs on rank 0 once every rank has written its part, before the rename (the checksum file);
    `run_config` the text of release/run_config.yaml; `carried()` the HF tensors the target keeps
    beside the checkpoint (`CARRIED_FILE`), if any.

    Every rank writes its shards with `dist_checkpointing.save`; rank 0 writes `common.pt` where
    megatron-core did not (0.19.2: see `providers.megatron_imports.add_common_state_file`, so that
    0.16.1 loads the checkpoint too), the tracker, bridge_meta.json and the assets. The output
    transaction (bridge/output.py) makes it atomic: any failure, on any rank, is raised on every
    rank and leaves no output directory.
    """
    with output_transaction(path, f"writing the Megatron checkpoint {path}", overwrite, finalize) as tmp:
        release = tmp / RELEASE_DIR
        release.mkdir(exist_ok=True)  # on every rank: no rank may start writing before it exists
        dist_checkpointing.save(state(), str(release), sharded_strategy=strategy)
        if world()[0] == 0:
            add_common_state_file(release)
            (release / RUN_CONFIG_NAME).write_text(run_config or run_config_yaml())
            (tmp / TRACKER_NAME).write_text(RELEASE_DIR)
            write_bridge_files(tmp, meta(), assets_dir)
            tensors = carried() if carried is not None else {}
            if tensors:
                from safetensors.torch import save_file

                save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp / CARRIED_FILE))


def write_bridge_files(root: Path, meta: Dict, assets_dir: Optional[Path]) -> None:
    """bridge_meta.json (`meta`, with the format tag) and hf_assets/ (the non-weight files of
    `assets_dir`) of a checkpoint; also the fine-tuning example's checkpoints."""
    (root / META_NAME).write_text(json.dumps({"format": META_FORMAT, **meta}, indent=1) + "\n")
    assets = root / ASSETS_DIR
    assets.mkdir(exist_ok=True)
    copy_assets(assets_dir, assets)


def load(model, path: Path, target: Target = TARGETS[DEFAULT_TARGET]) -> None:
    """Load the weights of a converted checkpoint written for `target` into `model` (any parallel
    layout: it reshards); the carried tensors come from `CARRIED_FILE` when the target keeps them there."""
    from bridge.weights import model_chunks
    from conversion.omni import carried_megatron_name

    state = sharded_state(model, target)
    directory = str(iteration_dir(path))
    check_dist_checkpoint(directory)  # every pickle of it read safely before megatron / torch read it
    # common_load_kwargs: megatron-core 0.16.1 reads a checkpoint without common.pt (0.19.2's format) too
    loaded = dist_checkpointing.load(state, directory, **common_load_kwargs(directory))
    carried = {}
    if (Path(path) / CARRIED_FILE).is_file():
        from safetensors.torch import load_file

        carried = {carried_megatron_name(n): t for n, t in load_file(str(Path(path) / CARRIED_FILE)).items()}
    chunks = model_chunks(model)
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        names = chunk.state_dict().keys() if carried else ()
        chunk_carried = {n: t for n, t in carried.items() if n in names}
        chunk.load_state_dict({**loaded[key], **chunk_carried}, strict=True)
