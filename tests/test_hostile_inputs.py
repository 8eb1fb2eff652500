"""Broken and hostile inputs, interruptions and integrity, through the real console scripts.

Each case feeds a broken input to `convert-hf-to-mcore` / `convert-mcore-to-hf` in a subprocess and
checks: the exit code, ONE `error:` line on stderr naming the file / tensor / field, no traceback,
and no output directory (nor hidden temporary) left behind. The cases that fail before megatron
is imported run concurrently (a few seconds each); the kill / Ctrl-C tests interrupt a real
conversion at a known point with the pause hook that tests/hooked_cli.py installs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest
import torch

from conversion import hf_config, registry
from conversion.errors import ConversionError
from conversion.mappings import expected_hf
from conversion.safetensors_io import HFCheckpoint, read_safetensors_header
from tests.cli_helpers import (
    assert_clean_failure, cli_command, copy_dir, edit_config, edit_index, edit_tensors, hidden_siblings, run_cli,
    shard_of, shards, tiny_converted,
)

H2M, M2H = "convert-hf-to-mcore", "convert-mcore-to-hf"
A_LOG = "backbone.layers.0.mixer.A_log"
O_PROJ = "backbone.layers.1.mixer.o_proj.weight"


# ---------------------------------------------------------------------------- broken HF inputs
# name -> (prepare(hf_dir, work) -> extra CLI args or None, expected fragments of the error line)

def _truncate(hf, work):
    path = shards(hf)[1]
    path.write_bytes(path.read_bytes()[:-100])
    return {"fragments": [path.name, "truncated"]}


def _corrupt_header(hf, work):
    path = shards(hf)[0]
    data = bytearray(path.read_bytes())
    data[8:14] = b"\x00garb"[:6].ljust(6, b"!")
    path.write_bytes(bytes(data))
    return {"fragments": [path.name, "corrupt safetensors header"]}


def _huge_header_length(hf, work):
    path = shards(hf)[0]
    data = bytearray(path.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return {"fragments": [path.name, "header length"]}


def _index_missing_shard(hf, work):
    victim = shards(hf)[2]
    victim.unlink()
    return {"fragments": ["model.safetensors.index.json", victim.name, "does not exist"]}


def _index_escapes_dotdot(hf, work):
    (hf.parent / "outside.safetensors").write_bytes(shards(hf)[0].read_bytes())
    edit_index(hf, lambda m: m.__setitem__(A_LOG, "../outside.safetensors"))
    return {"fragments": ["'../outside.safetensors'", "escapes the checkpoint directory"]}


def _index_escapes_absolute(hf, work):
    edit_index(hf, lambda m: m.__setitem__(A_LOG, str(shards(hf)[0].resolve())))
    return {"fragments": ["must be a relative file name"]}


def _config_missing_field(hf, work):
    edit_config(hf, lambda c: c.pop("hidden_size"))
    return {"fragments": ["config.json", "missing required field 'hidden_size'"]}


def _config_size_mismatch(hf, work):
    edit_config(hf, lambda c: c.__setitem__("hidden_size", 80))
    return {"fragments": ["'backbone.embeddings.weight'", "(300, 64)", "(300, 80)", "hidden_size"]}


def _unknown_architecture(hf, work):
    edit_config(hf, lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"))
    return {"fragments": ["config.json", "unknown architecture", "LlamaForCausalLM"]}


def _missing_tensor(hf, work):
    edit_tensors(hf, O_PROJ, lambda s: (s.pop(O_PROJ), None)[1])
    edit_index(hf, lambda m: m.pop(O_PROJ))
    return {"fragments": ["missing tensor", O_PROJ]}


def _unexpected_tensor(hf, work):
    name = "backbone.layers.0.mixer.extra.weight"
    edit_tensors(hf, A_LOG, lambda s: s.__setitem__(name, torch.zeros(3)))
    edit_index(hf, lambda m: m.__setitem__(name, shard_of(hf, A_LOG).name))
    return {"fragments": ["unexpected tensor", name]}


def _int32_tensor(hf, work):
    edit_tensors(hf, A_LOG, lambda s: s.__setitem__(A_LOG, s[A_LOG].to(torch.int32)))
    return {"fragments": [A_LOG, "dtype int32", "expected float32"]}


def _fp16_tensor(hf, work):
    edit_tensors(hf, O_PROJ, lambda s: s.__setitem__(O_PROJ, s[O_PROJ].to(torch.float16)))
    return {"fragments": [O_PROJ, "dtype float16", "expected float32"]}


def _wrong_shape(hf, work):
    edit_tensors(hf, A_LOG, lambda s: s.__setitem__(A_LOG, torch.zeros(9)))
    return {"fragments": [A_LOG, "(9,)", "(8,)", "mamba_num_heads"]}


def _pickle_only(hf, work):
    for p in shards(hf):
        p.unlink()
    (hf / "model.safetensors.index.json").unlink()
    (hf / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    return {"fragments": ["pytorch_model.bin", "safetensors is required"]}


def _input_missing(hf, work):
    return {"hf": work / "no_such_dir", "fragments": ["no_such_dir", "input path does not exist"]}


def _output_not_empty(hf, work):
    out = work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return {"out": out, "output_existed": True, "fragments": ["output path exists and is not empty", "--overwrite"]}


def _output_inside_input(hf, work):
    return {"out": hf / "mcore", "fragments": ["must be outside the input"]}


def _no_disk_space(hf, work):
    return {"hooks": ["--free-bytes", "1000"], "fragments": ["not enough free disk space", "1000 B"]}


def _bad_layout(hf, work):  # the one HF case that imports megatron (the layout check lives in bridge.parallel)
    return {"args": ["--tp", "3", "--pp", "3", "--ep", "3"],
            "fragments": ["TP=3", "PP=3", "EP=3", "heads", "experts", "layers"]}


HF_CASES = {f.__name__.lstrip("_"): f for f in [
    _truncate, _corrupt_header, _huge_header_length, _index_missing_shard, _index_escapes_dotdot,
    _index_escapes_absolute, _config_missing_field, _config_size_mismatch, _unknown_architecture,
    _missing_tensor, _unexpected_tensor, _int32_tensor, _fp16_tensor, _wrong_shape, _pickle_only,
    _input_missing, _output_not_empty, _output_inside_input, _no_disk_space, _bad_layout,
]}


# ---------------------------------------------------------------------------- broken Megatron inputs

def _flip_release_byte(src, work):
    mc = copy_dir(src, work / "mc")
    victim = sorted((mc / "release").glob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    return {"mc": mc, "fragments": [f"release/{victim.name}", "corrupt", "xxh3_128"]}


def _truncate_release(src, work):
    mc = copy_dir(src, work / "mc")
    victim = sorted((mc / "release").glob("*.distcp"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    return {"mc": mc, "fragments": [f"release/{victim.name}", "bytes", "truncated"]}


def _meta_edited(src, work):
    mc = copy_dir(src, work / "mc")
    meta = json.loads((mc / "bridge_meta.json").read_text())
    meta["params_dtype"] = "bfloat16"
    (mc / "bridge_meta.json").write_text(json.dumps(meta, indent=1))
    return {"mc": mc, "fragments": ["bridge_meta.json"]}


def _checksums_deleted(src, work):
    mc = copy_dir(src, work / "mc")
    (mc / "bridge_checksums.json").unlink()
    return {"mc": mc, "fragments": ["bridge_checksums.json", "missing"]}


def _not_a_checkpoint(src, work):
    (work / "plain").mkdir()
    return {"mc": work / "plain", "fragments": ["plain", "not a Megatron checkpoint", "latest_checkpointed_iteration.txt"]}


def _mcore_missing(src, work):
    return {"mc": work / "nothing_here", "fragments": ["nothing_here", "does not exist"]}


def _mcore_output_not_empty(src, work):
    out = work / "out"
    out.mkdir()
    (out / "x").write_text("x")
    return {"out": out, "output_existed": True, "fragments": ["exists and is not empty"]}


def _mcore_no_disk_space(src, work):
    return {"hooks": ["--free-bytes", "5"], "fragments": ["not enough free disk space"]}


MCORE_CASES = {f.__name__.lstrip("_"): f for f in [
    _flip_release_byte, _truncate_release, _meta_edited, _checksums_deleted, _not_a_checkpoint,
    _mcore_missing, _mcore_output_not_empty, _mcore_no_disk_space,
]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return tiny_converted(tmp_path_factory)


@pytest.fixture(scope="module")
def failures(converted, tmp_path_factory):
    """Prepare every broken input, then run all the CLIs concurrently: name -> (proc, spec)."""
    hf_src, mc_src = converted
    jobs = {}
    for name, prepare in HF_CASES.items():
        work = tmp_path_factory.mktemp(name)
        hf = copy_dir(hf_src, work / "hf")
        spec = {"hf": hf, "out": work / "out", "args": [], "hooks": [], "output_existed": False, **prepare(hf, work)}
        jobs[name] = ([H2M, "--hf-path", spec["hf"], "--output", spec["out"], *spec["args"]], spec)
    for name, prepare in MCORE_CASES.items():
        work = tmp_path_factory.mktemp(name)
        spec = {"mc": mc_src, "out": work / "out", "args": [], "hooks": [], "output_existed": False, **prepare(mc_src, work)}
        jobs[name] = ([M2H, "--mcore-path", spec["mc"], "--output", spec["out"], *spec["args"]], spec)

    def run(item):
        name, (cmd, spec) = item
        start = time.time()
        proc = run_cli(*cmd, hooks=spec["hooks"])
        return name, (proc, spec, time.time() - start)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, jobs.items()))


@pytest.mark.parametrize("case", list(HF_CASES) + list(MCORE_CASES))
def test_broken_input_fails_cleanly(failures, case):
    proc, spec, seconds = failures[case]
    line = assert_clean_failure(proc, spec["out"], *spec["fragments"], output_existed=spec["output_existed"])
    print(f"{case} ({seconds:.1f}s): {line}")
    if spec["output_existed"]:
        assert sorted(p.name for p in Path(spec["out"]).iterdir()) in (["keep.txt"], ["x"])  # untouched


def test_index_and_shards_that_disagree(tmp_path, converted):
    """A shard holding a tensor its index assigns elsewhere (or does not list) is refused at open time."""
    hf = copy_dir(converted[0], tmp_path / "hf")
    first, second = shards(hf)[:2]
    name = next(iter(read_safetensors_header(second)))
    edit_index(hf, lambda m: m.__setitem__(name, first.name))
    with pytest.raises(ConversionError, match="the shards and the index disagree|listed in the index is missing"):
        HFCheckpoint(hf)


# ---------------------------------------------------------------------------- interruptions

def _start_paused(cmd, point: str, marker: Path, timeout: float = 240, go: Optional[Path] = None):
    argv, env = cli_command(*cmd, hooks=["--pause", f"{point}:{marker}" + (f":{go}" if go else "")])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited before pausing: {proc.returncode} {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, "never reached the pause point"
        time.sleep(0.1)
    return proc


def test_sigkill_half_way_leaves_nothing_and_the_rerun_succeeds(tmp_path, converted):
    hf, _ = converted
    out = tmp_path / "mcore"
    proc = _start_paused([H2M, "--hf-path", hf, "--output", out, "--quiet"], "before-rename", tmp_path / "m1")
    stale = hidden_siblings(out)
    assert len(stale) == 1 and stale[0].startswith(".mcore.tmp-")  # complete data, not yet renamed
    assert (tmp_path / stale[0] / "release").is_dir()
    proc.kill()
    proc.wait(30)
    assert not out.exists()  # nothing at the output path
    # The killed run's temporary is never mistaken for a checkpoint ...
    failed = run_cli(M2H, "--mcore-path", out, "--output", tmp_path / "hf_back")
    assert_clean_failure(failed, tmp_path / "hf_back", "does not exist")
    # ... and the next run into the same output starts clean (removing it) and succeeds.
    rerun = run_cli(H2M, "--hf-path", hf, "--output", out, "--quiet")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (out / "release").is_dir() and (out / "bridge_meta.json").is_file()
    assert hidden_siblings(out) == []


def test_sigkill_during_export_leaves_nothing(tmp_path, converted):
    _, mc = converted
    out = tmp_path / "hf_back"
    proc = _start_paused([M2H, "--mcore-path", mc, "--output", out], "mid-export", tmp_path / "m2")
    tmp = tmp_path / hidden_siblings(out)[0]
    assert list(tmp.glob("*.safetensors")) and not (tmp / "config.json").exists()  # half-way: one tensor written
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not out.exists()


def test_ctrl_c_stops_promptly_and_removes_temporaries(tmp_path, converted):
    hf, _ = converted
    out = tmp_path / "mcore"
    proc = _start_paused([H2M, "--hf-path", hf, "--output", out, "--quiet"], "before-rename", tmp_path / "m3")
    assert len(hidden_siblings(out)) == 1
    start = time.time()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert time.time() - start < 10
    assert proc.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), stderr[-3000:]
    assert not out.exists() and hidden_siblings(out) == []


def test_two_runs_into_one_output_one_fails_the_other_is_kept(tmp_path, converted):
    """Run A pauses with its output complete but not yet renamed; run B converts into the same
    output and finishes; A resumes: it must fail with one line (its result discarded), and the
    output is B's, whole."""
    hf, _ = converted
    out, go = tmp_path / "mcore", tmp_path / "go"
    first = _start_paused([H2M, "--hf-path", hf, "--output", out, "--quiet"], "before-rename", tmp_path / "m4", go=go)
    second = run_cli(H2M, "--hf-path", hf, "--output", out, "--quiet")
    assert second.returncode == 0, second.stderr[-3000:]
    meta = (out / "bridge_meta.json").read_bytes()
    go.touch()
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 2, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0] == (f"error: {out}: another run completed this output while this one was "
                                            "running; this run's result was discarded (pass --overwrite to replace it)")
    assert (out / "bridge_meta.json").read_bytes() == meta and hidden_siblings(out) == []
    back = run_cli(M2H, "--mcore-path", out, "--output", tmp_path / "hf_back", "--quiet")
    assert back.returncode == 0, back.stderr[-3000:]  # B's checkpoint, whole (checksums verified)


def test_overwrite_swaps_the_outputs_atomically(tmp_path):
    """--overwrite exchanges the new and the old output with one renameat2(RENAME_EXCHANGE): there
    is no moment without a complete output at the path; the old one is removed afterwards."""
    from bridge.output import output_transaction
    from conversion.output_dir import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "y").write_text("b")
    assert _exchange(a, b)  # the file systems CI runs on support it; elsewhere the fallback renames twice
    assert (a / "y").read_text() == "b" and (b / "x").read_text() == "a"
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with output_transaction(out, "writing", overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"] and hidden_siblings(out) == []


# ---------------------------------------------------------------------------- pure pieces (in-process)

@pytest.mark.parametrize("kw", [dict(), dict(pattern="EM-*M", num_kv_heads=1, n_routed_experts=6, num_experts_per_tok=3,
                                             vocab_size=259)])
def test_expected_shapes_are_transformers_shapes(kw):
    from transformers.core_model_loading import revert_weight_conversion

    from bridge.tiny_models import build_hf_model, tiny_config

    model = build_hf_model(tiny_config(**kw))
    state = revert_weight_conversion(model, model.state_dict())
    cfg = hf_config.parse_config(model.config.to_dict())
    expected = expected_hf(registry.mappings(cfg))
    assert {n: tuple(t.shape) for n, t in state.items()} == {n: s for n, (s, _) in expected.items()}


@pytest.mark.parametrize("kw,audio", [(dict(), {}), (dict(has_sound=False), {}), (dict(scheme_text_pattern="E*M-"), {}),
                                      (dict(), dict(attention_bias=True, convolution_bias=False, subsampling_factor=4,
                                                    subsampling_conv_kernel_size=5, conv_kernel_size=7))])
def test_omni_registry_shapes_are_transformers_shapes(kw, audio):
    """The whole Omni registry (RADIO, projectors, carried tensors, Parakeet), made from config.json
    alone, names exactly transformers' on-disk tensors with their shapes and integer dtypes."""
    from transformers.core_model_loading import revert_weight_conversion

    from bridge.tiny_models import build_hf_omni_model, tiny_omni_config

    config = tiny_omni_config(**kw)
    for field, value in audio.items():
        setattr(config.audio_config, field, value)
    model = build_hf_omni_model(config)  # with the released checkpoint's input conditioner
    state = revert_weight_conversion(model, model.state_dict())
    cfg = hf_config.parse_config(model.config.to_dict())
    mappings = registry.mappings(cfg, present=state)
    assert {n: tuple(t.shape) for n, t in state.items()} == {n: s for n, (s, _) in expected_hf(mappings).items()}
    integer = {h for m in mappings if m.integer for h in m.hf}
    assert integer == {n for n, t in state.items() if not t.is_floating_point()}
    # layer scales and input conditioner are optional (transformers' Omni has no conditioner, and loads
    # without layer scales): absent from the source, absent from the registry
    without = [n for n in state if "layer_scale" not in n and "input_conditioner" not in n]
    assert sorted(expected_hf(registry.mappings(cfg, present=without))) == sorted(without)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from conversion import output_dir as sio

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = sio._host()
    stale = tmp_path / f".out.tmp-{host}-{dead.pid}-abc"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-abc"
    other_host = tmp_path / f".out.tmp-elsewhere-{dead.pid}-abc"
    for d in (stale, live, other_host):
        d.mkdir()
    assert sio.remove_stale_temporaries(tmp_path / "out") == [stale]
    assert not stale.exists() and live.exists() and other_host.exists()


def test_output_checks(tmp_path, monkeypatch):
    from bridge.output import output_transaction
    from conversion import output_dir as sio

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match="not a directory"):
        sio.check_output_path(tmp_path / "file")
    with pytest.raises(ConversionError, match="outside the input"):
        sio.check_output_path(tmp_path, inputs=[tmp_path / "sub"])
    assert sio.free_bytes(tmp_path / "a" / "b") == sio.free_bytes(tmp_path)  # the nearest existing ancestor
    sio.check_free_space(tmp_path / "out", 11)
    monkeypatch.setattr(sio.hooks, "free_bytes", lambda directory: 10)
    with pytest.raises(ConversionError, match="not enough free disk space"):
        sio.check_free_space(tmp_path / "out", 11)
    # a failed block removes its temporary and the parents it created
    with pytest.raises(RuntimeError):
        with output_transaction(tmp_path / "new" / "deeper" / "out", "writing"):
            raise RuntimeError
    assert not (tmp_path / "new").exists()


def test_the_cli_leaves_no_process_group_behind(tmp_path, converted):
    """Both converters tear megatron's groups and the process group down before returning: left to
    interpreter shutdown, gloo's threads were sometimes destroyed still joinable under torchrun
    (rank aborted with "terminate called without an active exception", exit -6, after success)."""
    hf, mc = converted
    code = f"""
import torch.distributed as dist
from bridge.cli import hf_to_mcore_main, mcore_to_hf_main
assert hf_to_mcore_main(["--hf-path", {str(hf)!r}, "--output", {str(tmp_path / 'm')!r}, "--quiet"]) == 0
assert not dist.is_initialized()
from megatron.core import parallel_state
assert not parallel_state.model_parallel_is_initialized()
assert mcore_to_hf_main(["--mcore-path", {str(mc)!r}, "--output", {str(tmp_path / 'h')!r}, "--quiet"]) == 0
assert not dist.is_initialized()
print("clean")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "clean", r.stderr[-3000:]


def test_a_radio_layer_scale_other_than_one_is_refused_before_streaming(tmp_path):
    """Checked in the preflight (the vectors are tiny): one error line naming the tensor, exit 2,
    nothing written — before, a writer thread printed ~200 lines and the run exited 0 with the
    checkpoint written."""
    from bridge.tiny_models import build_hf_omni_model, save_hf_model, tiny_omni_config

    hf = build_hf_omni_model(tiny_omni_config(has_sound=False), seed=5)
    with torch.no_grad():
        hf.vision_model.encoder.layer[1].layer_scale2.lambda1.mul_(1.5)
    hf_dir = save_hf_model(hf, tmp_path / "hf")
    proc = run_cli(H2M, "--hf-path", hf_dir, "--output", tmp_path / "out")  # progress bar on: it must not start
    assert_clean_failure(proc, tmp_path / "out", "vision_model.radio_model.model.blocks.1.layer_scale2.lambda1: "
                         "RADIO layer scale must be all ones")
    assert "hf -> megatron" not in proc.stderr  # refused before the streaming started


def test_a_failure_inside_a_writer_thread_is_one_error_and_leaves_nothing(tmp_path, converted, capfd):
    """A tensor that cannot be made while torch's writer threads stream (injected here: what the
    preflight cannot see, e.g. a source file changed under the run) ends the conversion with a
    ConversionError naming it, no thread traceback, no output."""
    from bridge import AutoBridge
    from bridge import streaming
    from conversion.errors import ConversionError

    hf, _ = converted
    bridge = AutoBridge.from_hf_pretrained(hf)
    real = bridge.megatron_tensor

    def failing(rule, dims):
        if rule.megatron.endswith("layers.0.mixer.in_proj.weight"):
            raise OSError(5, "Input/output error")
        return real(rule, dims)

    bridge.megatron_tensor = failing
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"Megatron checkpoint tensor 'decoder\.layers\.0\.mixer\.in_proj\.weight[.a-z]*': "
                                              r"OSError: \[Errno 5\] Input/output error"):
        streaming.convert_hf_to_megatron(bridge, out, quiet=True, threads=4)
    assert "Traceback" not in capfd.readouterr().err
    assert not out.exists() and hidden_siblings(out) == []
