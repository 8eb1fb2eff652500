"""The streaming conversion (bridge/streaming.py): work split across torchrun ranks, the memory
budget, the checkpoint reader. (Wall time and peak memory at the real widths are measured by
benchmarks/conversion.py, not here.)

- Under torchrun (2 processes) both CLIs split the work: each rank writes data files of its own
  share, and the results equal the single-process ones bit for bit, in both directions.
- A budget of one byte (every tensor alone) with many threads gives the same files.
- `DcpReader` reads a region that crosses chunk borders (two experts) as the HF tensors hold it,
  and refuses a `.metadata` pickle that would run code, without running it.
- `ByteBudget`: a request above the limit waits for an empty budget and then runs alone.
- Every writer thread writes its records without the zip CRC32; the conversion's meta model takes
  the Parakeet encoder's structure from the manifest and gives transformers' module's checkpoint
  entries (without importing torch._dynamo); the export orders its work so that concurrent threads
  fill different files.
- Direct I/O: with O_DIRECT for every tensor above two pages, HF -> Megatron puts each record's
  data at the page offset its HF tensor has in the source file, and Megatron -> HF gives back the
  source's safetensors files byte for byte, with bytes written directly in both directions.
Checkpoints that megatron-core itself wrote from TP=2 models are exported by the CLI in
tests/test_parallel_layouts.py and tests/test_parallel_omni.py.
"""

import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from bridge.tiny_models import build_hf_omni_model, save_hf_model
from tests.cli_helpers import BIN, assert_cli_export_equals, assert_same_hf, read_all, run_cli

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """A tiny Omni checkpoint (bf16, several shards) and its single-process conversion."""
    tmp = tmp_path_factory.mktemp("streaming")
    hf = save_hf_model(build_hf_omni_model(seed=5), tmp / "hf", dtype=torch.bfloat16, max_shard_size="200KB")
    proc = run_cli("convert-hf-to-mcore", "--hf-path", hf, "--output", tmp / "mcore", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, hf, tmp / "mcore"


def test_torchrun_splits_both_conversions(omni):
    tmp, hf, mcore = omni
    torchrun(BIN / "convert-hf-to-mcore", "--hf-path", hf, "--output", tmp / "mcore_2ranks", "--quiet")
    data = {r: sum(p.stat().st_size for p in (tmp / "mcore_2ranks" / "release").glob(f"__{r}_*.distcp"))
            for r in (0, 1)}
    assert min(data.values()) > 0.3 * sum(data.values()), data  # each rank wrote a fair share

    from bridge.streaming import DcpReader

    one, two = DcpReader(mcore / "release"), DcpReader(tmp / "mcore_2ranks" / "release")
    assert sorted(one.tensors) == sorted(two.tensors)
    for key, meta in one.tensors.items():
        if hasattr(meta, "chunks"):
            whole = ([0] * len(meta.size), list(meta.size))
            assert torch.equal(one.read(key, *whole), two.read(key, *whole)), key

    torchrun(BIN / "convert-mcore-to-hf", "--mcore-path", mcore, "--output", tmp / "hf_2ranks", "--quiet")
    assert_same_hf(hf, tmp / "hf_2ranks")
    assert_cli_export_equals(tmp / "mcore_2ranks", hf, tmp / "hf_from_2ranks")


def test_one_byte_budget_and_many_threads_give_the_same_files(omni):
    tmp, hf, mcore = omni
    script = f"""
import warnings; warnings.filterwarnings("ignore")
from pathlib import Path
from bridge import AutoBridge
from bridge.streaming import convert_hf_to_megatron, convert_megatron_to_hf
convert_hf_to_megatron(AutoBridge.from_hf_pretrained({str(hf)!r}), Path({str(tmp / 'mc_b1')!r}), quiet=True,
                       threads=5, budget=1)
convert_megatron_to_hf(AutoBridge.from_megatron_checkpoint({str(tmp / 'mc_b1')!r}), Path({str(tmp / 'mc_b1')!r}),
                       Path({str(tmp / 'hf_b1')!r}), quiet=True, threads=5, budget=1)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_hf(hf, tmp / "hf_b1")


def test_reader_region_across_chunks(omni):
    _, hf, mcore = omni
    from bridge.streaming import DcpReader

    reader = DcpReader(mcore / "release")
    key = next(k for k in reader.tensors if k.endswith("mlp.experts.experts.linear_fc1.weight"))
    layer = key.split(".")[3]
    meta = reader.tensors[key]
    assert len(meta.chunks) == meta.size[0] > 2  # one chunk per expert
    region = reader.read(key, [1, 3, 0], [2, 5, meta.size[2]])  # experts 1-2, rows 3..7
    source = read_all(hf)
    for i, expert in enumerate((1, 2)):
        want = source[f"language_model.backbone.layers.{layer}.mixer.experts.{expert}.up_proj.weight"][1]
        assert torch.equal(region[i], want[3:8]), expert


def test_reader_refuses_metadata_that_would_run_code(omni, tmp_path):
    _, _, mcore = omni
    from bridge.streaming import DcpReader
    from conversion.errors import ConversionError

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    release = tmp_path / "release"
    shutil.copytree(mcore / "release", release)
    (release / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConversionError, match="system is not allowed"):
        DcpReader(release)
    assert not marker.exists()


def test_byte_budget_admits_a_large_request_alone():
    from bridge.streaming import ByteBudget

    budget = ByteBudget(10)
    small = budget.acquire(4)
    got_large = threading.Event()

    def take_large():
        n = budget.acquire(100)  # above the limit: waits for an empty budget
        got_large.set()
        budget.release(n)

    t = threading.Thread(target=take_large)
    t.start()
    assert not got_large.wait(0.3)
    budget.release(small)
    assert got_large.wait(5)
    t.join(5)
    assert budget.used == 0


def test_dtype_flag_casts_every_parameter(omni, tmp_path):
    """`--dtype fp32` on a bf16 checkpoint: every parameter is fp32 and holds the source values
    exactly (bf16 -> fp32 is exact); the export writes the source's bf16 again, bit for bit."""
    _, hf, _ = omni
    proc = run_cli("convert-hf-to-mcore", "--hf-path", hf, "--output", tmp_path / "mc32", "--dtype", "fp32", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from bridge.streaming import DcpReader

    reader = DcpReader(tmp_path / "mc32" / "release")
    source = read_all(hf)
    # parameters and float buffers in fp32; the carried HF tensors (`hf_extras.*`, kept for the round
    # trip only) keep the source dtype, and integer counters stay integers
    dtypes = {key: meta.properties.dtype for key, meta in reader.tensors.items() if hasattr(meta, "properties")}
    floats = {d for key, d in dtypes.items() if d.is_floating_point and not key.startswith("hf_extras.")}
    assert floats == {torch.float32}, floats
    assert {d for key, d in dtypes.items() if key.startswith("hf_extras.") and d.is_floating_point} == {torch.bfloat16}
    emb = reader.read("language_model.embedding.word_embeddings.weight", [0, 0],
                      list(reader.tensors["language_model.embedding.word_embeddings.weight"].size))
    want = source["language_model.backbone.embeddings.weight"][1]
    assert torch.equal(emb[: want.shape[0]], want.float())
    assert_cli_export_equals(tmp_path / "mc32", hf, tmp_path / "hf16")


def test_every_writer_thread_skips_the_record_crc32(omni):
    """torch's serialization config is per thread: the CRC32 that XXH3 makes redundant must be off
    in each of the writer's threads (one data file each), not only in the calling one."""
    _, _, mcore = omni
    import io
    import zipfile

    from bridge.streaming import DcpReader

    reader = DcpReader(mcore / "release")
    files = {}  # data file -> its largest tensor record
    for (fqn, _), info in reader.storage.items():
        if hasattr(reader.tensors[fqn], "chunks") and info.length > files.get(info.relative_path, (0,))[0]:
            files[info.relative_path] = (info.length, info)
    assert len(files) > 1, files  # several writer threads
    for name, (_, info) in files.items():
        record = os.pread(reader._files.fd(name), info.length, info.offset)
        entries = zipfile.ZipFile(io.BytesIO(record)).infolist()
        data = [e for e in entries if "/data/" in e.filename and e.file_size > 0]
        assert data and all(e.CRC == 0 for e in data), (name, [(e.filename, e.CRC) for e in entries])


def test_conversion_model_takes_the_sound_encoders_structure_from_the_manifest(omni):
    """The conversion's meta model holds the Parakeet encoder as a tree of its tensors' names, shapes
    and dtypes (no transformers import); its checkpoint entries must equal those of transformers'
    own module in the same model, for the source dtype and for a cast (floating tensors follow
    params_dtype, integer counters keep theirs)."""
    _, hf, _ = omni
    script = f"""
import sys, warnings; warnings.filterwarnings("ignore")
import torch
from bridge.cli import _import_megatron
_import_megatron()  # as the CLIs import it (megatron's torch.compile decorators off)
assert "torch._dynamo" not in sys.modules
from bridge import AutoBridge, checkpoint
from bridge.streaming import meta_model, _param_entries

bridge = AutoBridge.from_hf_pretrained({str(hf)!r})
dtypes = (torch.bfloat16, torch.float32)
structures = [_param_entries(checkpoint.sharded_state(meta_model(bridge, dtype))["model"]) for dtype in dtypes]
assert "transformers" not in sys.modules
assert "torch._dynamo" not in sys.modules  # meta math ran on CPU (_MetaMathOnCpu): no 1.5 s import
for dtype, structure in zip(dtypes, structures):
    provider = bridge.to_megatron_provider(dtype=dtype)
    provider.perform_initialization = False
    with torch.device("meta"):
        real = _param_entries(checkpoint.sharded_state(provider.provide())["model"])
    assert sorted(structure) == sorted(real), sorted(set(structure) ^ set(real))
    sound = [k for k in real if k.startswith("sound_encoder.")]
    assert len(sound) > 20 and any(real[k].data.dtype == torch.int64 for k in sound)
    def entry(e):  # a ShardedTensor, or a factory (Mamba in_proj / conv1d) with its key and data
        where = (e.global_shape, e.global_offset, e.allow_shape_mismatch) if hasattr(e, "global_shape") else ()
        return (type(e), e.key, e.data.dtype, tuple(e.data.shape), e.replica_id) + where
    for k in real:
        assert entry(structure[k]) == entry(real[k]), k
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_export_interleaves_output_files_by_bytes():
    from bridge.streaming import _interleave_files

    rules = [("a", 1, 10), ("a", 2, 10), ("a", 3, 10), ("b", 4, 30), ("b", 5, 1), ("c", 6, 5)]
    order = _interleave_files(rules, lambda r: (r[0], r[2]))
    assert sorted(order) == sorted(rules)
    for f in "abc":  # each file's rules keep their order
        assert [r for r in order if r[0] == f] == [r for r in rules if r[0] == f]
    # next from the file with the fewest bytes scheduled: a(0) b(0) c(0) a(10) a(20) b(30)
    assert [r[1] for r in order] == [1, 4, 6, 2, 3, 5]


def test_direct_io_places_tensors_like_the_source_and_round_trips_the_files(omni, tmp_path):
    """With the direct-I/O threshold lowered to two pages (the tiny model's tensors are small), both
    conversions write most bytes with O_DIRECT where the file system allows it (else buffered: the
    layout checks still hold); every record's data sits at its HF source's page offset, and the
    export equals the source files byte for byte (same order, same page offsets: zero-copy both
    ways)."""
    _, hf, _ = omni
    script = f"""
import os, warnings; warnings.filterwarnings("ignore")
from pathlib import Path
from conversion import direct_io
direct_io.MIN_DIRECT = 2 * direct_io.PAGE
written = []
close = direct_io.DirectFile.close
def counting_close(self, fsync=False):
    if self.fd >= 0:
        written.append(self.direct_bytes)
    close(self, fsync)
direct_io.DirectFile.close = counting_close
from bridge import AutoBridge
from bridge.streaming import convert_hf_to_megatron, convert_megatron_to_hf
convert_hf_to_megatron(AutoBridge.from_hf_pretrained({str(hf)!r}), Path({str(tmp_path / 'mc')!r}), quiet=True)
print("h2m", sum(written))
written.clear()
convert_megatron_to_hf(AutoBridge.from_megatron_checkpoint({str(tmp_path / 'mc')!r}), Path({str(tmp_path / 'mc')!r}),
                       Path({str(tmp_path / 'hf')!r}), quiet=True)
print("m2h", sum(written))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    direct = dict(line.split() for line in proc.stdout.split("\n") if line.strip())
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        supported = True
    except OSError:
        supported = False
    if supported:
        assert int(direct["h2m"]) > 0 and int(direct["m2h"]) > 0, direct

    from bridge.streaming import DcpReader, _FileWindow
    from conversion.direct_io import PAGE
    from conversion.safetensors_io import HFCheckpoint

    source = HFCheckpoint(hf)
    origins = {}  # bytes of an HF tensor -> its page offset in the source file
    for name in source.keys():
        if source.nbytes(name) >= 2 * PAGE:
            origins[source.get(name).view(torch.uint8).numpy().tobytes()] = source._header(
                source.weight_map[name])[name][2] % PAGE
    reader = DcpReader(tmp_path / "mc" / "release")
    placed = 0
    for (fqn, offset), info in reader.storage.items():
        if not hasattr(reader.tensors.get(fqn), "chunks"):
            continue
        fd = reader._files.fd(info.relative_path)
        storage = torch.load(_FileWindow(fd, info.offset, info.length), map_location="meta",
                             weights_only=True).untyped_storage()
        position = info.offset + storage._checkpoint_offset
        page = origins.get(os.pread(fd, storage.nbytes(), position))
        if page is not None:  # a record of an HF tensor's own bytes (no transform): placed like it
            assert position % PAGE == page, (fqn, offset, position % PAGE, page)
            placed += 1
    assert placed >= 5, placed  # the tiny model has a handful of tensors above two pages
    files = sorted(p.name for p in Path(hf).glob("*.safetensors"))
    assert len(files) > 1
    for name in files:
        assert (tmp_path / "hf" / name).read_bytes() == (Path(hf) / name).read_bytes(), name


def test_one_thread_on_a_cuda_host_writes_every_tensor_whole(omni, tmp_path, monkeypatch):
    """torch's DCP writer, with one thread on a host where CUDA is available, would resolve tensors
    ahead of writing them (its overlapping loader); the planner frees each tensor when the next is
    asked for, so that must not happen. CUDA is reported present here to the writer alone."""
    import types

    from torch.distributed.checkpoint import filesystem

    from bridge import AutoBridge
    from bridge import streaming

    tmp, hf, _ = omni

    class CudaPresent(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    reported = CudaPresent("torch")
    reported.cuda = types.SimpleNamespace(is_available=lambda: True)
    monkeypatch.setattr(filesystem, "torch", reported)
    streaming.convert_hf_to_megatron(AutoBridge.from_hf_pretrained(hf), tmp_path / "mcore", quiet=True, threads=1)
    monkeypatch.undo()
    assert_cli_export_equals(tmp_path / "mcore", hf, tmp_path / "hf_back")


META_ON_A_CUDA_HOST = """
import sys, importlib, torch
from bridge import AutoBridge
from bridge.parallel import ensure_parallel_state
from bridge.streaming import meta_model
from providers import cpu_compat

ensure_parallel_state()  # gloo, before CUDA is reported
cpu_compat.apply_cpu_patches()  # the imports and the CPU build (no TE, no mamba-ssm) ...
cpu = cpu_compat.cpu_config_overrides()
cpu_compat.cpu_config_overrides = lambda config=None: {k: v for k, v in cpu.items() if config is None or hasattr(config, k)}
for name in cpu_compat._CUDA_PROXY_MODULES:  # ... but megatron's modules see torch.cuda as it is
    if not name.endswith("token_dispatcher"):  # (it makes CUDA streams, no storage: a CPU torch cannot)
        importlib.import_module(name).torch = torch
torch.cuda.is_available = lambda: True  # CUDA reported present: megatron asks for device 0
torch.cuda.current_device = lambda: 0
torch.cuda.device_count = lambda: 1
model = meta_model(AutoBridge.from_hf_pretrained(sys.argv[1]), torch.bfloat16)
print(sorted({t.device.type for t in [*model.parameters(), *model.buffers()]}))
"""


def test_the_meta_model_takes_no_storage_where_cuda_is_present(omni):
    """megatron-core passes device=torch.cuda.current_device() explicitly in places (Mamba mixer,
    router, linears), which overrode torch.device("meta"): on a GPU node the converters' meta model
    would have taken GPU memory. Here megatron sees CUDA reported present (a CPU torch: any CUDA
    allocation raises) and every parameter and buffer must still be on the meta device."""
    _, hf, _ = omni
    r = subprocess.run([sys.executable, "-c", META_ON_A_CUDA_HOST, str(hf)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "['meta']", r.stderr[-3000:]


PARAKEET = "sound_encoder.encoder.layers.0.conv.norm.running_mean"


@pytest.mark.parametrize("edit,fragments", [
    ("drop", ["missing tensor", PARAKEET]),
    ("reshape", [PARAKEET, "(2, 16)", "(32,)", "hidden_size"]),
])
def test_a_parakeet_tensor_is_checked_against_the_config(omni, tmp_path, edit, fragments):
    """The Parakeet entries come from the audio config, not from the input: a missing or reshaped
    encoder tensor is refused by the preflight (exit 2, one line, no output), not on load."""
    from tests.cli_helpers import copy_dir, edit_index, edit_tensors

    _, hf, _ = omni
    broken = copy_dir(hf, tmp_path / "hf")
    if edit == "drop":
        edit_tensors(broken, PARAKEET, lambda s: (s.pop(PARAKEET), None)[1])
        edit_index(broken, lambda m: m.pop(PARAKEET))
    else:
        edit_tensors(broken, PARAKEET, lambda s: s.__setitem__(PARAKEET, s[PARAKEET].reshape(2, 16)))
    proc = run_cli("convert-hf-to-mcore", "--hf-path", broken, "--output", tmp_path / "out", "--quiet")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    assert not (tmp_path / "out").exists()


def test_streaming_never_reshapes_a_tensor_of_the_right_size():
    """Only megatron's prepended singleton axes may differ between a tensor and its checkpoint chunk."""
    from bridge.streaming import exact_view
    from conversion.errors import ConversionError

    assert exact_view(torch.zeros(4, 6), (1, 4, 6), "t").shape == (1, 4, 6)
    assert exact_view(torch.zeros(1, 4, 6), (4, 6), "t").shape == (4, 6)
    for wrong in ((6, 4), (24,), (2, 4, 3), (2, 2, 6)):
        with pytest.raises(ConversionError, match=r"t: the tensor made has shape \(4, 6\)"):
            exact_view(torch.zeros(4, 6), wrong, "t")
