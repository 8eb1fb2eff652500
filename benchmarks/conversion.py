"""Conversion at the released model's scale: wall time and peak memory of the two CLIs, next to
`cp -r` and a transformers load + save of the same directory.

The benchmark builds a *full-width slice* of Nemotron-3-Nano-Omni from the reference config
(tests/data/nemotron-3-nano-omni-30b-a3b.config.json): every width is the released model's (hidden
2688, 128 experts, vocab 131072, the whole RADIO ViT-H tower, the whole Parakeet encoder, the
projectors) but the language model has only a few layers: one Mamba layer, one attention layer and
`--moe-layers` MoE layers (each 2.42 GiB in bf16; slice 6.52 / 8.94 / 13.92 GiB for 1 / 2 / 4). The slice is written without building the model:
transformers' Omni class is instantiated on the meta device for the tensor names / shapes (the
names `save_pretrained` writes, via `revert_weight_conversion`) and random bf16 data is streamed
into shards of at most 5 GB. The RADIO input-conditioner mean/std are added, as in the released
checkpoint (transformers' Omni model reports them as unexpected on load and drops them on save; the
bridge carries them). The slice is cached in the workdir (regenerated only when its stamp differs).

Each command runs in a fresh process and is timed up to the end of a `sync` (so its bytes are on
disk); its output directory is removed and synced, every other file of the workdir dropped from the
page cache and its input read once (page cache warm: the input and nothing else) before the run,
outside the timing:

  cp -r SLICE OUT
  convert-hf-to-mcore --hf-path SLICE --output MCORE --quiet
  convert-mcore-to-hf --mcore-path MCORE --output HF2 --quiet
  python: AutoModelForImageTextToText.from_pretrained(SLICE, dtype=bfloat16).save_pretrained(OUT)

Memory: "peak RSS" is the largest sum of VmRSS over the command's process tree, sampled every
50 ms from /proc (pages shared by forked workers count once per process: an upper bound); "anon" is
the same for RssAnon only (RSS less file-backed pages, e.g. less the mmapped safetensors that the
page cache can drop); "maxrss" is getrusage(RUSAGE_CHILDREN).ru_maxrss of a fresh wrapper process:
the kernel's exact peak RSS (file-backed pages included) of the largest single process.

Usage (from the repository root, with the venv active):

  python benchmarks/conversion.py --tiny --verify                  # ~100 MB, a minute: smoke test
  python benchmarks/conversion.py --moe-layers 2 --verify          # 8.94 GiB slice
  python benchmarks/conversion.py --moe-layers 4 --verify          # 13.92 GiB slice: is memory flat in depth?
  python benchmarks/conversion.py --moe-layers 2 --commands cp,transformers --json out.json

Before / after a change, in one run: `--baseline DIR` (a checkout of the old commit, e.g.
`git worktree add /tmp/base <commit>`) also runs that tree's converters, interleaved with the new
ones in every round, and prints new / old for wall time and peak RSS.

Other options: --workdir DIR (default /tmp/nemotron-omni-bench), --repeat N (N rounds of the
commands; median wall time, largest peak, each round's ratio to cp -r), --keep (keep the outputs),
--clean (also delete the cached slice at the end), --drop-caches (drop the page cache before every
run; needs root), --generate-only.
Disk needed: about 3x the slice (slice + Megatron checkpoint + HF export).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
REFERENCE_CONFIG = REPO / "tests/data/nemotron-3-nano-omni-30b-a3b.config.json"
ARCHITECTURE = "NemotronH_Omni_Reasoning_V3"
SHARD_BYTES = 5 * 10**9
GENERATOR_VERSION = 2  # bump when the slice's contents change, to invalidate cached slices
GiB = 2**30

# The RADIO input conditioner's mean/std are in the released checkpoint (and carried by the bridge)
# but transformers' Omni model detaches the conditioner, so its load reports them as unexpected
# and its save drops them.
INPUT_CONDITIONER = ("vision_model.radio_model.input_conditioner.norm_mean",
                     "vision_model.radio_model.input_conditioner.norm_std")

TINY = {  # --tiny: the same structure, every width small (~100 MB)
    "text_config": dict(hidden_size=512, vocab_size=32768, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=64, mamba_num_heads=16, mamba_head_dim=32, n_groups=2, ssm_state_size=32,
                        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                        moe_shared_expert_intermediate_size=512, intermediate_size=256),
    "vision_config": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, max_img_size=512),
    "audio_config": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=512, subsampling_conv_channels=64, projection_hidden_size=512),
    "vision_hidden_size": 256,
    "projector_hidden_size": 1024,
}


# ------------------------------------------------------------------ the slice

def layer_pattern(moe_layers: int) -> list:
    """Mamba, MoE, attention, MoE, then (Mamba, MoE) pairs: `moe_layers` MoE layers in all."""
    if moe_layers == 0:
        symbols = "M*"
    else:
        symbols = "ME*" + ("E" if moe_layers > 1 else "") + "ME" * (moe_layers - 2)
    kinds = {"M": "linear_attention", "*": "full_attention", "E": "moe"}
    return [kinds[s] for s in symbols]


def slice_config(moe_layers: int, tiny: bool):
    """transformers' config object of the slice: the reference config, fewer language-model layers."""
    from transformers import NemotronH_Omni_Reasoning_V3_Config

    raw = json.loads(REFERENCE_CONFIG.read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    raw["text_config"]["layers_block_type"] = layer_pattern(moe_layers)
    if tiny:
        for key, value in TINY.items():
            if isinstance(value, dict):
                raw[key].update(value)
            else:
                raw[key] = value
    config = NemotronH_Omni_Reasoning_V3_Config(**raw)
    config.architectures = [ARCHITECTURE]
    config.dtype = "bfloat16"
    return config


def tensor_plan(config):
    """[(name, shape, dtype)] of every tensor `save_pretrained` writes for this config, in its order,
    from the model built on the meta device (nothing is allocated), plus the input conditioner."""
    import torch
    from transformers import NemotronH_Omni_Reasoning_V3
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = NemotronH_Omni_Reasoning_V3(config)
    state = revert_weight_conversion(model, model.state_dict())
    plan = [(n, tuple(t.shape), torch.bfloat16 if t.dtype.is_floating_point else t.dtype) for n, t in state.items()]
    plan += [(n, (3, 1, 1), torch.bfloat16) for n in INPUT_CONDITIONER]
    n_params = sum(p.numel() for p in model.parameters())
    return plan, n_params


def special_values(name: str, shape, dtype, config):
    """The tensors whose values matter (the bridge checks them, or they are counters / statistics);
    None for the others, which get random data."""
    import torch

    vision = config.vision_config
    if "layer_scale" in name:  # the bridge requires RADIO layer scales of 1 (megatron's ViT has none)
        return torch.ones(shape, dtype=dtype)
    if name.endswith("running_var"):  # Parakeet batch-norm statistics
        return torch.ones(shape, dtype=dtype)
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=dtype)
    if name.endswith("summary_idxs"):
        return torch.tensor(vision.summary_idxs, dtype=dtype)
    if name in INPUT_CONDITIONER:
        values = vision.norm_mean if name.endswith("mean") else vision.norm_std
        return torch.tensor(values, dtype=dtype).view(shape)
    if dtype != torch.bfloat16:
        raise ValueError(f"{name}: no rule for a {dtype} tensor")
    return None


def shard(plan):
    """Greedy packing of the plan into shards of at most SHARD_BYTES (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    for entry in plan:
        nbytes = nbytes_of(entry)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    return shards + [current] if current else shards


def nbytes_of(entry) -> int:
    _, shape, dtype = entry
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


ST_DTYPE = {"torch.bfloat16": "BF16", "torch.int64": "I64"}


class RandomBytes:
    """bf16 normals (std 0.02) from one 64 MiB buffer, read at a different offset for each tensor:
    cheap to produce at disk speed; the data need not be unique."""

    def __init__(self, seed: int = 0, mib: int = 64):
        import torch

        g = torch.Generator().manual_seed(seed)
        values = (torch.randn(mib * 2**19, generator=g) * 0.02).to(torch.bfloat16)
        self.buf = memoryview(values.view(torch.uint8).numpy().tobytes())
        self.next_offset = 0

    def write(self, f, nbytes: int) -> None:
        offset = self.next_offset
        self.next_offset = (offset + 2 * 7919 * 131) % len(self.buf)  # even: whole bf16 values
        while nbytes:
            chunk = self.buf[offset:offset + nbytes]
            f.write(chunk)
            nbytes -= len(chunk)
            offset = 0


def write_shard(path: Path, entries, config, rng: RandomBytes) -> None:
    """One safetensors file, written tensor by tensor (header, then data; no tensor held in memory
    but the small special ones)."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry in entries:
        name, shape, dtype = entry
        header[name] = {"dtype": ST_DTYPE[str(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes_of(entry)]}
        offset += nbytes_of(entry)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for entry in entries:
            name, shape, dtype = entry
            values = special_values(name, shape, dtype, config)
            if values is None:
                rng.write(f, nbytes_of(entry))
            else:
                f.write(values.contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def generate_slice(slice_dir: Path, moe_layers: int, tiny: bool) -> dict:
    """Write the slice (cached: nothing is done when its stamp matches). Returns its description."""
    config = slice_config(moe_layers, tiny)
    plan, n_params = tensor_plan(config)
    shards = shard(plan)
    stamp = {"generator": GENERATOR_VERSION, "moe_layers": moe_layers, "tiny": tiny,
             "pattern": config.text_config.layers_block_type,
             "config_sha256": hashlib.sha256(config.to_json_string().encode()).hexdigest(),
             "tensors": len(plan), "bytes": sum(map(nbytes_of, plan)), "parameters": n_params,
             "largest_tensor": max(plan, key=nbytes_of)[0], "largest_tensor_bytes": max(map(nbytes_of, plan)),
             "shards": len(shards)}
    stamp_path = slice_dir.with_name(slice_dir.name + ".stamp.json")
    if slice_dir.is_dir() and stamp_path.is_file():
        old = json.loads(stamp_path.read_text())
        if {k: v for k, v in old.items() if k != "generation_s"} == stamp:
            print(f"slice: cached {slice_dir}", flush=True)
            return old
    print(f"slice: writing {stamp['bytes'] / GiB:.2f} GiB to {slice_dir} ...", flush=True)
    t0 = time.perf_counter()
    remove(slice_dir)
    stamp_path.unlink(missing_ok=True)
    tmp = slice_dir.with_name(slice_dir.name + ".partial")
    remove(tmp)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    rng, weight_map = RandomBytes(), {}
    for i, entries in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        write_shard(tmp / file_name, entries, config, rng)
        weight_map.update({name: file_name for name, _, _ in entries})
    if len(shards) > 1:  # as save_pretrained: an index only for a sharded checkpoint
        index = {"metadata": {"total_parameters": sum(nbytes_of(e) // e[2].itemsize for e in plan),
                              "total_size": stamp["bytes"]},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    subprocess.run(["sync"], check=True)
    tmp.rename(slice_dir)
    stamp["generation_s"] = round(time.perf_counter() - t0, 1)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"slice: written in {stamp['generation_s']} s", flush=True)
    return stamp


def check_names_against_save_pretrained(workdir: Path, moe_layers: int) -> None:
    """--tiny only: the generator's names / shapes / dtypes equal what transformers' save_pretrained
    writes for the same (tiny) config, with the repo's own tiny-model builder."""
    import torch
    from safetensors import safe_open

    sys.path.insert(0, str(REPO))
    from bridge.tiny_models import build_hf_omni_model

    config = slice_config(moe_layers, tiny=True)
    plan, _ = tensor_plan(config)
    out = workdir / "save_pretrained-names"
    remove(out)
    build_hf_omni_model(config).to(torch.bfloat16).save_pretrained(out)
    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    written = {}
    for file_name in files:
        with safe_open(out / file_name, "pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                written[name] = (tuple(s.get_shape()), s.get_dtype())
    ours = {n: (shape, ST_DTYPE[str(dtype)]) for n, shape, dtype in plan}
    remove(out)
    if ours != written:
        diff = sorted(set(ours.items()) ^ set(written.items()))[:10]
        raise SystemExit(f"generator names differ from save_pretrained's: {diff}")
    print(f"names: the generator's {len(ours)} tensors = save_pretrained's (names, shapes, dtypes)", flush=True)


# ------------------------------------------------------------------ measuring

# Runs the command, then `sync`; reports wall time and ru_maxrss of its children (a fresh process
# per run, so the maximum is this run's).
WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
subprocess.call(["sync"])
wall = time.perf_counter() - t0
maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "wall_s": wall, "maxrss_bytes": maxrss}))
"""

TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForImageTextToText
from transformers.utils import logging
logging.set_verbosity_error()  # the load report (checked below) and progress bars
logging.disable_progress_bar()
model, info = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.bfloat16, output_loading_info=True)
expected_unexpected = {"vision_model.input_conditioner.norm_mean", "vision_model.input_conditioner.norm_std"}
if info["missing_keys"] or set(info["unexpected_keys"]) - expected_unexpected or info["mismatched_keys"]:
    sys.exit(f"load report: {info}")
model.save_pretrained(sys.argv[2])
"""


def tree_memory(root_pid: int):
    """(sum of VmRSS, sum of RssAnon) in bytes over the descendants of `root_pid` (not itself)."""
    rss = anon = 0
    stack = children_of(root_pid)
    while stack:
        pid = stack.pop()
        stack += children_of(pid)
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            continue  # exited meanwhile
        rss += kib(fields.get("VmRSS"))
        anon += kib(fields.get("RssAnon"))
    return rss, anon


def children_of(pid: int) -> list:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return out


def kib(value) -> int:
    return int(value.split()[0]) * 1024 if value else 0


def warm_cache(directory: Path) -> None:
    """Read every file of `directory` once (untimed), so that each timed command starts with its
    input in the page cache, whatever ran before it (without this, the first command after a
    different one may read its input from disk: cp -r of the 9 GiB slice took 30.5 s cold and
    14.2 s warm here)."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


def evict_cache(directory: Path, keep: Path) -> None:
    """Drop from the page cache every file under `directory` outside `keep` (posix_fadvise
    DONTNEED; no root needed). The slice, the Megatron checkpoint and an output together exceed
    the RAM of a small machine: a cached file that is not the command's input would otherwise push
    the input out of the cache while the command runs (measured: convert-mcore-to-hf 18-22 s with
    the slice cached too, 15.5-18 s without)."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and keep not in path.parents:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(cmd, output: Path, drop_caches: bool, source: Path, workdir: Path, env=None) -> dict:
    """One run in a fresh wrapper process: wall time (command + sync), peak tree RSS / anon, maxrss."""
    remove(output)
    subprocess.run(["sync"], check=True)
    if drop_caches:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        evict_cache(workdir, keep=source)
        warm_cache(source)
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, result.name, *map(str, cmd)], env=env)
        peak_rss = peak_anon = 0
        while proc.poll() is None:
            rss, anon = tree_memory(proc.pid)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            time.sleep(0.05)
        out = json.loads(Path(result.name).read_text())
    if out["rc"] != 0:
        raise SystemExit(f"command failed with exit code {out['rc']}: {' '.join(map(str, cmd))}")
    return {**out, "peak_rss_bytes": peak_rss, "peak_anon_bytes": peak_anon}


def console_script(name: str) -> str:
    """The repo's console script next to this Python (the venv's), else the one on PATH."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name) or name


def commands(slice_dir: Path, workdir: Path, baseline: Optional[Path] = None) -> dict:
    """name -> (command, output directory, environment or None). With `baseline` (another checkout
    of this repository, e.g. `git worktree add /tmp/base <commit>`), the two converters also run
    from that tree (`base-hf2mcore`, `base-mcore2hf`: the same venv, PYTHONPATH=baseline)."""
    mcore, hf2 = workdir / "out-mcore", workdir / "out-hf"
    out = {
        "cp": (["cp", "-r", slice_dir, workdir / "out-cp"], workdir / "out-cp", None),
        "transformers": ([sys.executable, "-c", TRANSFORMERS, slice_dir, workdir / "out-transformers"],
                         workdir / "out-transformers", None),
        "hf2mcore": ([console_script("convert-hf-to-mcore"), "--hf-path", slice_dir, "--output", mcore, "--quiet"],
                     mcore, None),
        "mcore2hf": ([console_script("convert-mcore-to-hf"), "--mcore-path", mcore, "--output", hf2, "--quiet"],
                     hf2, None),
    }
    if baseline is not None:
        env = {**os.environ, "PYTHONPATH": str(baseline.resolve())}
        for name in ("hf2mcore", "mcore2hf"):
            cmd, output, _ = out[name]
            rename = {mcore: workdir / "base-out-mcore", hf2: workdir / "base-out-hf"}
            out["base-" + name] = ([rename.get(a, a) for a in cmd], rename[output], env)
    return out


LABELS = {"cp": "`cp -r`", "transformers": "transformers load + save",
          "hf2mcore": "`convert-hf-to-mcore`", "mcore2hf": "`convert-mcore-to-hf`",
          "base-hf2mcore": "`convert-hf-to-mcore` (baseline)", "base-mcore2hf": "`convert-mcore-to-hf` (baseline)"}
ORDER = ("cp", "transformers", "base-hf2mcore", "hf2mcore", "base-mcore2hf", "mcore2hf")


# ------------------------------------------------------------------ verification

def tensor_files(d: Path) -> dict:
    """name -> safetensors file of a checkpoint directory (sharded with an index, or not)."""
    from safetensors import safe_open

    index = d / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    out = {}
    for path in sorted(d.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({name: path.name for name in f.keys()})
    return out


def verify_round_trip(slice_dir: Path, hf2: Path) -> int:
    """Every tensor of the export equals the slice's bit for bit (one tensor at a time)."""
    import torch
    from safetensors import safe_open

    src, dst = tensor_files(slice_dir), tensor_files(hf2)
    if set(src) != set(dst):
        raise SystemExit(f"verify: tensor names differ: {sorted(set(src) ^ set(dst))[:10]}")
    by_file = {}
    for name, file_name in src.items():
        by_file.setdefault(file_name, []).append(name)
    for file_name, names in by_file.items():
        with safe_open(slice_dir / file_name, "pt") as a:
            for name in names:
                x = a.get_tensor(name)
                with safe_open(hf2 / dst[name], "pt") as b:
                    y = b.get_tensor(name)
                if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
                        x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
                    raise SystemExit(f"verify: {name} differs ({x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)})")
                del x, y
    return len(src)


# ------------------------------------------------------------------ report

def machine() -> dict:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {"cores": os.cpu_count(), "ram_gib": round(kib(meminfo["MemTotal"]) / GiB, 1), "cpu": cpu}


def table(results: dict) -> str:
    cp = results.get("cp", {}).get("wall_s")
    lines = ["| command | wall s | × `cp -r` | peak RSS GiB (tree) | peak anon GiB (tree) | maxrss GiB (1 process) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ORDER:
        if name in results:
            r = results[name]
            ratio = f"{r['wall_s'] / cp:.1f}" if cp else "–"
            lines.append(f"| {LABELS[name]} | {r['wall_s']:.1f} | {ratio} | {r['peak_rss_bytes'] / GiB:.2f} "
                         f"| {r['peak_anon_bytes'] / GiB:.2f} | {r['maxrss_bytes'] / GiB:.2f} |")
    return "\n".join(lines)


def summary(samples: list) -> dict:
    """Median wall time; the largest of each peak."""
    return {"wall_s": statistics.median(s["wall_s"] for s in samples),
            **{k: max(s[k] for s in samples) for k in ("peak_rss_bytes", "peak_anon_bytes", "maxrss_bytes")},
            "samples": samples}


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moe-layers", type=int, default=2, help="MoE layers of the slice (each ~2.4 GiB; default 2: ~8.9 GiB)")
    p.add_argument("--tiny", action="store_true", help="every width small (~100 MB): a smoke test of the benchmark")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/nemotron-omni-bench"))
    p.add_argument("--commands", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--repeat", type=int, default=1, help="runs per command (median wall time, largest peak)")
    p.add_argument("--verify", action="store_true", help="check the HF export equals the slice bit for bit")
    p.add_argument("--json", type=Path, help="write the results to this file")
    p.add_argument("--keep", action="store_true", help="keep the outputs (the slice is always kept: it is the cache)")
    p.add_argument("--clean", action="store_true", help="also delete the cached slice at the end")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before each run (root)")
    p.add_argument("--generate-only", action="store_true", help="only write (or find) the slice")
    p.add_argument("--baseline", type=Path, help="another checkout of this repository: its converters run too, "
                   "in the same rounds (before / after a change, measured in one run)")
    args = p.parse_args(argv)
    selected = [c for c in args.commands.split(",") if c]
    if args.baseline:
        selected += ["base-" + c for c in selected if c in ("hf2mcore", "mcore2hf")]
    unknown = set(selected) - set(ORDER)
    if unknown or (args.verify and "mcore2hf" not in selected):
        p.error(f"unknown commands {sorted(unknown)}" if unknown else "--verify needs mcore2hf")

    args.workdir.mkdir(parents=True, exist_ok=True)
    slice_dir = args.workdir / (f"slice-moe{args.moe_layers}" + ("-tiny" if args.tiny else ""))
    if args.tiny:
        check_names_against_save_pretrained(args.workdir, args.moe_layers)
    info = generate_slice(slice_dir, args.moe_layers, args.tiny)
    report = {"machine": machine(), "slice": {**info, "path": str(slice_dir)}, "drop_caches": args.drop_caches,
              "repeat": args.repeat, "results": {}}
    print(f"\nmachine: {report['machine']['cores']} cores, {report['machine']['ram_gib']} GiB RAM, {report['machine']['cpu']}")
    print(f"slice: {info['bytes'] / GiB:.2f} GiB, {info['tensors']} tensors in {info['shards']} shards, "
          f"{info['parameters']:,} parameters, layers {''.join({'linear_attention': 'M', 'moe': 'E', 'full_attention': '*'}[t] for t in info['pattern'])}, "
          f"largest tensor {info['largest_tensor']} {info['largest_tensor_bytes'] / GiB:.2f} GiB, "
          f"generated in {info.get('generation_s', '?')} s")
    if args.generate_only:
        return 0

    cmds = commands(slice_dir, args.workdir, args.baseline)
    try:
        # Rounds of every command, not every repeat of one command after the other: the disk of a
        # virtual machine can change speed by 2x within minutes, and the ratios should compare
        # commands that ran under the same conditions.
        names = [c for c in ORDER if c in selected]
        samples = {name: [] for name in names}
        for i in range(args.repeat):
            for name in names:
                cmd, output, env = cmds[name]
                print(f"run: {name} ({i + 1}/{args.repeat}) ...", flush=True)
                source = cmds[name.replace("mcore2hf", "hf2mcore")][1] if name.endswith("mcore2hf") else slice_dir
                samples[name].append(measure(cmd, output, args.drop_caches, source, args.workdir, env))
                print(f"     {samples[name][-1]['wall_s']:.1f} s, peak RSS {samples[name][-1]['peak_rss_bytes'] / GiB:.2f} GiB",
                      flush=True)
                if name in ("cp", "transformers") and not args.keep:
                    remove(output)
        for name in names:
            report["results"][name] = summary(samples[name])
        if args.verify:
            report["verified_tensors"] = verify_round_trip(slice_dir, cmds["mcore2hf"][1])
    finally:
        if not args.keep:
            for _, output, _ in cmds.values():
                remove(output)
        if args.clean:
            remove(slice_dir)
            slice_dir.with_name(slice_dir.name + ".stamp.json").unlink(missing_ok=True)

    print("\n" + table(report["results"]))
    if "cp" in report["results"] and args.repeat > 1:  # each round's own ratio (same conditions)
        cp_runs = [s["wall_s"] for s in report["results"]["cp"]["samples"]]
        for name, result in report["results"].items():
            if name != "cp":
                ratios = [s["wall_s"] / c for s, c in zip(result["samples"], cp_runs)]
                result["round_ratios"] = ratios
                print(f"{LABELS[name]} / `cp -r`, round by round: {', '.join(f'{r:.2f}' for r in ratios)}")
    for name in ("hf2mcore", "mcore2hf"):  # after / before, in the same run
        if "base-" + name in report["results"] and name in report["results"]:
            new, old = report["results"][name], report["results"]["base-" + name]
            report.setdefault("vs_baseline", {})[name] = {k: new[k] / old[k] for k in ("wall_s", "peak_rss_bytes")}
            print(f"{LABELS[name]} / baseline: wall {new['wall_s'] / old['wall_s']:.3f}, "
                  f"peak RSS {new['peak_rss_bytes'] / old['peak_rss_bytes']:.3f}")
    if args.verify:
        print(f"\nround trip: all {report['verified_tensors']} tensors of the export equal the slice bit for bit")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
