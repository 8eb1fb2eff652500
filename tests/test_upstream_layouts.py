"""Checkpoints for Megatron-Bridge and Megatron-LM, checked against their own source.

Their loaders cannot run here (Megatron-Bridge 0.6.2 pins transformers <= 5.12 and needs
Transformer Engine; Megatron-LM's training needs CUDA), so the contract is read from their source at
a pinned version, committed under tests/data/upstream/ and parsed with `ast` (nothing of it runs):
- Megatron-Bridge 0.6.2 (PyPI): the Nemotron Omni mapping registry (`nemotron_vl_bridge.py`,
  `nemotron_omni_bridge.py`: every Megatron parameter name and the HF tensor(s) it maps to) and the
  fields of `run_config.yaml` its checkpoint loader reads (`checkpointing_excerpt.py`);
- Megatron-LM main d98e8a6: what its loader reads from `args` in the common state
  (`check_checkpoint_args`, `_maybe_setup_gpt_to_hybrid_load`).
The checkpoints themselves are written by `convert-hf-to-mcore --target ...` from tiny transformers
models and exported back bit for bit.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from bridge.tiny_models import build_hf_model, build_hf_omni_model, save_hf_model, tiny_config, tiny_omni_config
from tests.cli_helpers import (
    as_training_writes_it, assert_cli_export_equals, copy_dir, edit_config, edit_index, edit_tensors, run_cli,
)

UPSTREAM = Path(__file__).parent / "data" / "upstream"
MB = UPSTREAM / "megatron_bridge_0.6.2"
MLM = UPSTREAM / "megatron_lm_d98e8a6"


def _regex(pattern: str) -> re.Pattern:
    """Megatron-Bridge's wildcards (`MegatronMappingRegistry._convert_pattern_to_regex`): `**` any
    path, `*` a layer / expert index."""
    return re.compile(re.escape(pattern).replace(r"\*\*", "(.*)").replace(r"\*", r"(\d+)"))


def megatron_bridge_mappings():
    """(Megatron parameter pattern, HF pattern(s), alias) of Megatron-Bridge 0.6.2's Nemotron Omni
    registry: the dict literals of its `mapping_registry` functions and every mapping constructed with
    `megatron_param=` (and `hf_param=` or `q=` / `k=` / `v=`), then the aliases its
    `MegatronMappingRegistry` adds for separate norm modules (`_SEPARATE_LAYERNORM_REWRITES`: e.g. an
    MoE layer's `pre_mlp_layernorm.weight` from the dense layer's `mlp.linear_fc1.layer_norm_weight`)."""
    out = [(p, hf, False) for p, hf in _declared_mappings()]
    rewrites_source = ast.parse((MB / "mapping_registry_excerpt.py").read_text())
    (rewrites,) = [ast.literal_eval(n.value) for n in rewrites_source.body if isinstance(n, ast.Assign)
                   and n.targets[0].id == "_SEPARATE_LAYERNORM_REWRITES"]
    names = {p for p, _, _ in out}
    for pattern, hf, _ in list(out):
        for old, new in rewrites:  # as `_add_separate_layernorm_mappings` (AutoMapping entries: one HF name)
            if pattern.endswith(f"*.{old}"):
                alias = pattern[: -len(old)] + new
                if alias not in names and len(hf) == 1:
                    out.append((alias, hf, True))
                    names.add(alias)
                break
    return out


def _declared_mappings():
    out = []
    for name in ("nemotron_vl_bridge.py", "nemotron_omni_bridge.py"):
        tree = ast.parse((MB / name).read_text())
        for fn in ast.walk(tree):
            if not (isinstance(fn, ast.FunctionDef) and fn.name == "mapping_registry"):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
                    out += [(k.value, (v.value,)) for k, v in zip(node.keys, node.values)
                            if isinstance(v, ast.Constant) and k.value.startswith("llava_model.")]
                if isinstance(node, ast.Call):
                    kw = {k.arg: k.value for k in node.keywords}
                    if isinstance(kw.get("megatron_param"), ast.Constant):
                        hf = [kw[a].value for a in ("hf_param", "q", "k", "v") if isinstance(kw.get(a), ast.Constant)]
                        out.append((kw["megatron_param"].value, tuple(hf)))
                    elif isinstance(kw.get("megatron_param"), ast.JoinedStr):  # rf"...{sub}" in a loop
                        loop = _enclosing_loop_values(fn, node)
                        for values in loop:
                            out.append((_fill(kw["megatron_param"], values), (_fill(kw["hf_param"], values),)))
    return out


def _enclosing_loop_values(fn, call):
    """The values the f-string names of `call` take in its `for` loop (a list / tuple literal)."""
    for loop in ast.walk(fn):
        if isinstance(loop, ast.For) and any(n is call for n in ast.walk(loop)):
            targets = [t.id for t in (loop.target.elts if isinstance(loop.target, ast.Tuple) else [loop.target])]
            for item in ast.literal_eval(loop.iter):
                yield dict(zip(targets, item if isinstance(item, tuple) else (item,)))


def _fill(joined: ast.JoinedStr, values) -> str:
    return "".join(part.value if isinstance(part, ast.Constant) else values[part.value.id] for part in joined.values)


@pytest.fixture(scope="module")
def omni_hf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upstream_omni")
    config = tiny_omni_config(scheme_text_pattern="M*-E")  # every layer kind
    return save_hf_model(build_hf_omni_model(config, seed=7), tmp / "hf", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def omni_mb(omni_hf):
    out = omni_hf.parent / "mb"
    proc = run_cli("convert-hf-to-mcore", "--hf-path", omni_hf, "--output", out, "--target", "megatron-bridge", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_megatron_bridge_registry_names_every_tensor_of_the_megatron_bridge_target(omni_hf):
    """Each mapping this project writes for `--target megatron-bridge` is one of Megatron-Bridge
    0.6.2's: its Megatron name (renamed for the target; routed experts in the grouped-GEMM module
    naming Megatron-Bridge's TE model has, which megatron-core stores under the same checkpoint key as
    ours) matches a Megatron pattern whose HF pattern(s) match the same HF tensor(s) with the same
    indices. And each mapping Megatron-Bridge declares is used, except two aliases of megatron-core >= 0.18
    module names for the Mamba conv (stored under `conv1d.weight` / `conv1d.bias` as ours)."""
    from bridge import AutoBridge
    from conversion.naming import TARGETS
    from conversion.nemotron_h import localise_expert_name

    declared = megatron_bridge_mappings()
    theirs = [(p, _regex(p), tuple(_regex(h) for h in hf)) for p, hf, _ in declared]
    assert len(theirs) > 40
    target = TARGETS["megatron-bridge"]
    used = set()
    mappings = AutoBridge.from_hf_pretrained(omni_hf).mappings()
    for mapping in mappings:
        name = target.checkpoint_key(mapping.megatron)
        if name is None:
            continue  # a carried tensor: not in their model, kept beside the checkpoint
        name = localise_expert_name(name, 0, grouped_gemm=True)
        matches = []
        for pattern, megatron, hf in theirs:
            m = megatron.fullmatch(name)
            if m and len(hf) == len(mapping.hf) and all(
                    (h := r.fullmatch(n)) and h.groups() == m.groups()[:len(h.groups())] for r, n in zip(hf, mapping.hf)):
                matches.append(pattern)
        assert matches, f"{name} <- {mapping.hf}: no Megatron-Bridge 0.6.2 mapping"
        used.update(matches)
    conv_aliases = {p for p, _, _ in theirs if p.endswith(("mixer.conv1d_weight", "mixer.conv1d_bias"))}
    unused_declared = {p for p, _, alias in declared if not alias} - used
    assert unused_declared == conv_aliases, sorted(unused_declared)


def test_megatron_bridge_target_round_trips_and_is_what_its_loader_reads(parallel_state, omni_hf, omni_mb, tmp_path):
    """Keys under `llava_model.` with `sound_model`, vocab rows = HF's vocab_size (Megatron-Bridge
    does not pad), no carried tensors in the torch_dist files, `run_config.yaml` with every field
    Megatron-Bridge 0.6.2's loader reads; exported back bit for bit (carried tensors from the file
    beside it), and loaded by this project's own loader."""
    import yaml

    from bridge import AutoBridge
    from conversion import hf_config
    from conversion.megatron_ckpt import open_checkpoint

    ckpt = open_checkpoint(omni_mb)
    assert ckpt.target.name == "megatron-bridge"
    assert all(k.startswith("llava_model.") for k in ckpt.tensors), sorted(ckpt.tensors)[:3]
    assert any(k.startswith("llava_model.sound_model.encoder.") for k in ckpt.tensors)
    assert ckpt.vocab_rows == hf_config.load_config(omni_hf).text["vocab_size"]

    source = (MB / "checkpointing_excerpt.py").read_text()
    read = set(re.findall(r'run_config\["(\w+)"\]\["(\w+)"\]', source))
    assert ("model", "tensor_model_parallel_size") in read
    config = yaml.safe_load((omni_mb / "release" / "run_config.yaml").read_text())
    assert all(field in config[section] for section, field in read), read
    assert (omni_mb / "latest_checkpointed_iteration.txt").read_text() == "release"  # read_metadata: release or > 0

    assert_cli_export_equals(omni_mb, omni_hf, tmp_path / "hf")
    model = AutoBridge.load_megatron_model(omni_mb)
    exported = dict(AutoBridge.from_hf_pretrained(omni_hf).export_hf_weights(model))
    from safetensors.torch import load_file

    source_tensors = {k: v for p in sorted(omni_hf.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    assert sorted(exported) == sorted(source_tensors)
    for name, tensor in source_tensors.items():
        assert torch.equal(exported[name], tensor), name


def test_megatron_bridge_target_of_the_text_model(tmp_path):
    """The text model's keys are the same for every target; Megatron-Bridge's leaves the vocab
    unpadded (259 rows here), and the export gives the source back."""
    from conversion.megatron_ckpt import open_checkpoint

    hf = save_hf_model(build_hf_model(tiny_config(vocab_size=259)), tmp_path / "hf", dtype=torch.bfloat16)
    for target, rows in (("megatron-bridge", 259), ("megatron-lm", 384)):
        out = tmp_path / target
        proc = run_cli("convert-hf-to-mcore", "--hf-path", hf, "--output", out, "--target", target, "--quiet")
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = open_checkpoint(out)
        assert ckpt.vocab_rows == rows and "decoder.layers.0.mixer.in_proj.weight.z" in ckpt.tensors
        assert_cli_export_equals(out, hf, tmp_path / f"hf-{target}")


def test_megatron_lm_reads_what_it_needs_from_the_args(omni_mb):
    """Every `args` field Megatron-LM's `check_checkpoint_args` compares without a default is in the
    common state (but those it compares only for runs we do not describe: vocab-file tokenizers,
    data-parallel random init, a phase-transition batch size, checkpoint versions < 3); the hybrid
    pattern its GPT-to-hybrid check looks for is there (without it Megatron-LM >= 0.19 takes the
    checkpoint for a GPT one); and `no_save_optim` keeps a resume from looking for an optimizer."""
    source = (MLM / "checkpointing_excerpt.py").read_text()
    tree = ast.parse(source)
    compared = {c.args[0].value for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "_compare"
                and not any(k.arg == "default" for k in c.keywords)}
    runs_we_do_not_describe = {"tokenizer_type", "data_parallel_random_init", "global_batch_size"}
    pattern_fields = {c.args[1].value for c in ast.walk(tree) if isinstance(c, ast.Call)
                      and getattr(c.func, "id", "") == "getattr" and len(c.args) > 1
                      and isinstance(c.args[1], ast.Constant) and "pattern" in str(c.args[1].value)}
    assert compared >= {"num_layers", "hidden_size", "num_attention_heads"}
    assert pattern_fields == {"hybrid_layer_pattern", "hybrid_override_pattern"}

    from conversion import safe_pickle  # noqa: F401 - allows Megatron-LM's args (argparse.Namespace)
    common = torch.load(omni_mb / "release" / "common.pt", weights_only=True)
    args = vars(common["args"])
    assert common["checkpoint_version"] >= 3.0 and common["iteration"] == 0
    assert (compared - runs_we_do_not_describe) <= set(args), sorted(compared - runs_we_do_not_describe - set(args))
    assert all(args[f] for f in pattern_fields) and args["no_save_optim"] is True


def test_a_checkpoint_megatron_bridge_trained_exports_with_the_hf_side_from_hf_config(omni_hf, tmp_path):
    """Megatron-Bridge 0.6.2 builds the video embedder only when the HF vision config says
    `separate_video_embedder` (the released config does not), and keeps no carried RADIO tensor. A
    checkpoint of such a model, laid out as its training writes it (iter_0000000, tracker "0"), exports
    to the full HF checkpoint: the video embedder and the carried tensors come from --hf-config."""
    video = "vision_model.radio_model.model.patch_generator.video_embedder.weight"
    without_video = copy_dir(omni_hf, tmp_path / "hf_image_only")

    def drop_video_fields(config):
        config.pop("video_temporal_patch_size", None)
        config["vision_config"].pop("video_temporal_patch_size", None)

    edit_config(without_video, drop_video_fields)
    edit_tensors(without_video, video, lambda state: (state.pop(video), None)[1])
    if (without_video / "model.safetensors.index.json").exists():
        edit_index(without_video, lambda weight_map: weight_map.pop(video))
    converted = tmp_path / "mb"
    proc = run_cli("convert-hf-to-mcore", "--hf-path", without_video, "--output", converted,
                   "--target", "megatron-bridge", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = as_training_writes_it(converted, tmp_path / "trained", iteration=0)
    assert_cli_export_equals(trained, omni_hf, tmp_path / "hf", "--hf-config", omni_hf)
    # a config-only --hf-config cannot supply them: one line naming the first
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((omni_hf / "config.json").read_text())
    proc = run_cli("convert-mcore-to-hf", "--mcore-path", trained, "--hf-config", config_only,
                   "--output", tmp_path / "none", "--quiet")
    assert proc.returncode == 2 and "is not in the Megatron checkpoint" in proc.stderr, proc.stderr[-2000:]
