"""Streaming conversion between a Hugging Face directory and a Megatron checkpoint, in bounded memory.

Nothing is ever materialised whole: the Megatron model is built on the meta device (no storage) at
TP = PP = EP = 1, and its `sharded_state_dict()` names every tensor of the checkpoint exactly as
megatron-core names it for a real model (keys, global shapes, offsets, the expert axis, the Mamba
in_proj / conv1d split). The torch_dist format reshards on load, so these files serve every
TP / PP / EP / VPP layout.

HF -> Megatron (`convert_hf_to_megatron`), the path of one tensor:
  megatron-core `dist_checkpointing.save` -> torch.distributed.checkpoint's FileSystemWriter (one
  file per writer thread) asks `_OnDemandPlanner.resolve_data` for a chunk ->
  `AutoBridge.megatron_tensor(mapping)` maps the HF tensor(s) (no copy), checks their shapes and
  applies the mapping's transform (e.g. q, k, v -> fused QKV) -> for a sharded factory (Mamba in_proj z/x/B/C/dt) the
  factory's own build function cuts the piece -> the file system (`_HashingFileSystem`) places the
  record so that its data lands at the page offset of the tensor's memory -> torch.save writes it
  through `DirectStream` (O_DIRECT: a mapped HF tensor goes from the source's page cache to the
  disk without a copy) -> its memory is released before the same thread makes its next tensor.
  Each routed expert is its own chunk, read from its own HF tensor.
Megatron -> HF (`convert_megatron_to_hf`): for each mapping of the registry, `DcpReader` reads the
regions of the checkpoint that hold the mapping's parameter (a factory's pieces are merged by the
factory's own merge function), `Mapping.to_hf` splits it into HF tensors (shapes checked) and `SafetensorsWriter` writes
each at its offset in the pre-laid-out files (laid out as the source HF files were, so that mapped
record data and destination share page offsets: O_DIRECT without a copy). Worker threads take different rules, ordered so that
rules running at the same time write to different files (`_interleave_files`).

Memory: `ByteBudget` bounds the bytes of tensors that all threads hold at once (a tensor larger
than the budget runs alone), so the peak is about the budget plus the largest tensor's transform
copy plus the interpreter; it does not depend on the number of layers.

Under torchrun every rank builds the same plan and takes a share of the tensors balanced by bytes
(`assign`): it reads only the HF tensors / checkpoint regions of its share and writes them (HF ->
Megatron: as the main replica in megatron's dedup; Megatron -> HF: at their offsets in the shared
safetensors files, which rank 0 laid out).
"""

from __future__ import annotations

import heapq
import io
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import WriteItemType
from torch.overrides import TorchFunctionMode

from bridge.output import output_transaction
from bridge.ranks import ensure_process_group, gather, on_rank0
from conversion import direct_io, integrity
from conversion.direct_io import PAGE, DirectStream, buffer_address
from conversion.errors import ConversionError
from conversion.hf_writer import MAX_SHARD_BYTES, plan_shards
from conversion.mappings import Mapping
from conversion.megatron_ckpt import MegatronCheckpoint, open_checkpoint
from conversion.naming import CARRIED_FILE, DEFAULT_TARGET, TARGETS
from conversion.omni import CARRIED_PREFIX, SOUND_ENCODER_PREFIX
from conversion.safe_pickle import data_file, load_dcp_metadata
from conversion.safetensors_io import OpenFiles, drop_pages, map_bytes, nbytes_of
from conversion.split import assign
from providers.megatron_imports import checkpoint_name

DEFAULT_BUDGET = 768 * 1024**2  # bytes of tensors in flight across all threads (the largest runs alone)


def default_threads() -> int:
    """8 worker threads (2 when the machine has 1 core): the writes are direct (O_DIRECT), so a
    thread mostly waits for the disk, and more writes in flight keep it busy (measured on 2 cores,
    9 GiB, warm, 3 alternating rounds: 13.5 s with 8 threads against 14.0 s with 4 for
    convert-hf-to-mcore, 12.9 s against 13.9 s for convert-mcore-to-hf). The byte budget, not the
    thread count, bounds the memory."""
    return 8 if (os.cpu_count() or 1) > 1 else 2


# ---------------------------------------------------------------------------- shared pieces

class ByteBudget:
    """At most `limit` bytes held at once across threads; a request above the limit waits for an
    empty budget and then runs alone."""

    def __init__(self, limit: int = DEFAULT_BUDGET):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> int:
        n = min(nbytes, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    @contextmanager
    def hold(self, nbytes: int):
        n = self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(n)


class Progress:
    """A tqdm bar in bytes with the tensor count and rate beside it (thread-safe); silent when quiet."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, quiet: bool):
        self.bar = None
        self.tensors = 0
        self.total_tensors = total_tensors
        self._lock = threading.Lock()
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, nbytes: int) -> None:
        if self.bar is None:
            return
        with self._lock:
            self.tensors += 1
            elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
            self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors, {self.tensors / elapsed:.0f} tensors/s",
                                     refresh=False)
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def meta_model(bridge, dtype: torch.dtype, padded_vocab: Optional[int] = None):
    """The megatron model of `bridge` on the meta device at TP = PP = EP = 1 (no storage)."""
    from bridge.parallel import current_sizes, ensure_parallel_state

    ensure_parallel_state()
    sizes = current_sizes()
    if any(sizes[k] not in (None, 1) for k in ("tp", "pp", "ep", "vpp")):
        raise ConversionError(f"streaming conversion builds the model at TP=PP=EP=1 (the checkpoint files do not "
                              f"depend on the layout); megatron's parallel state is already initialised with {sizes}")
    provider = bridge.to_megatron_provider(dtype=dtype)
    provider.perform_initialization = False
    provider.init_model_with_meta_device = True  # megatron's own: Transformer Engine modules on "meta"
    if getattr(provider, "has_sound", False):  # the checkpoint's layout needs the names, not transformers
        provider.sound_encoder_structure = {name[len(SOUND_ENCODER_PREFIX):]: structure for name, structure in
                                            bridge.tensor_structure(SOUND_ENCODER_PREFIX, dtype).items()}
    if padded_vocab:
        provider.padded_vocab = padded_vocab
    with torch.device("meta"), _MetaMathOnCpu():
        return provider.provide()


class _MetaMathOnCpu(TorchFunctionMode):
    """The meta model's build, on every host.

    * Storage: megatron-core allocates some tensors with an explicit
      `device=torch.cuda.current_device()` (the Mamba mixer's conv / dt_bias / A_log / D / norm, MoE
      router buffers, linears without `use_cpu_initialization`), which overrides
      `torch.device("meta")`: on a GPU host the "meta" model would take GPU memory (about 63 GB in
      bf16 at the released sizes). Every CUDA `device=` argument, and every `.to()` / `.cuda()` of a
      meta tensor to CUDA, is sent to the meta device instead.
    * Element-wise math on meta tensors (megatron's Mamba mixer computes its initial dt_bias and
      A_log whatever `perform_initialization` says, RADIO scales its position embedding) gets its
      result from torch's CPU kernels: the op runs on one-element CPU tensors of the same dtypes and
      ranks (so torch's own type promotion gives the dtype) and the result is a meta tensor of the
      broadcast shape. torch evaluates these ops on meta with Python reference kernels, the first of
      which imports torch._dynamo: 1.5 s of a conversion's start-up, for values a meta tensor does
      not have.
    Other functions run unchanged."""

    _NAMES = frozenset({"add", "sub", "mul", "div", "neg", "exp", "expm1", "log", "log1p", "clamp", "sqrt",
                        "rsqrt", "pow", "abs"})  # broadcasting element-wise ops

    @staticmethod
    def _is_cuda(device) -> bool:
        if isinstance(device, int):  # torch.cuda.current_device()
            return True
        return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "meta"}
        name = getattr(func, "__name__", None)
        if name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            target = kwargs.get("device", args[1] if len(args) > 1 and not isinstance(args[1], torch.dtype) else None)
            dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), args[0].dtype))
            if isinstance(target, torch.Tensor):  # .to(other): other's device and dtype
                target, dtype = target.device, target.dtype
            if name == "cuda" or self._is_cuda(target):
                return args[0] if dtype == args[0].dtype else torch.empty_like(args[0], dtype=dtype)
        if name in self._NAMES:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if tensors and all(t.is_meta for t in tensors):
                def tiny(a):
                    return torch.zeros((1,) * a.dim(), dtype=a.dtype, device="cpu") if isinstance(a, torch.Tensor) else a

                dtype = func(*map(tiny, args), **{k: tiny(v) for k, v in kwargs.items()}).dtype
                return torch.empty(torch.broadcast_shapes(*(t.shape for t in tensors)), dtype=dtype, device="meta")
        return func(*args, **kwargs)


def _param_entries(state: Dict) -> Dict[str, object]:
    """state-dict name -> ShardedTensor / ShardedTensorFactory of one model chunk's sharded state
    (TE `_extra_state` objects carry no weights and are left alone). The registry's Megatron name of a
    state-dict name is `checkpoint_name(name)` (megatron-core 0.19.2's `mixer.conv1d_weight` is
    `mixer.conv1d.weight`, its checkpoint key, as in 0.16.1)."""
    return {k: v for k, v in state.items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))}


def exact_view(tensor: torch.Tensor, shape: Sequence[int], what: str) -> torch.Tensor:
    """`tensor` seen as `shape`, which may differ from its own only by leading axes of size 1
    (megatron's prepended axes, e.g. a routed expert's); any other difference is an error."""
    have, want = tuple(tensor.shape), tuple(shape)
    short, long = sorted((have, want), key=len)
    extra = len(long) - len(short)
    if long[extra:] != short or any(d != 1 for d in long[:extra]):
        raise ConversionError(f"{what}: the tensor made has shape {have}, the checkpoint's is {want}")
    return tensor.view(want)


def _pieces(factory: ShardedTensorFactory, data: torch.Tensor):
    """The factory's ShardedTensors built over `data` (meta for planning, real for writing)."""
    return list(nested_values(factory.build_fn(factory.key, data, factory.replica_id, factory.flattened_range)))


# ---------------------------------------------------------------------------- HF -> Megatron

class PlanEntry:
    """One chunk of the Megatron checkpoint to write: the mapping that makes its parameter from the
    HF tensor(s), the parameter's dtype and size in the model, for a factory which of its pieces,
    and the rank that writes it."""

    def __init__(self, mapping: Mapping, dtype: torch.dtype, nbytes: int, owner: int,
                 factory: Optional[ShardedTensorFactory] = None, piece: int = 0):
        self.mapping, self.dtype, self.nbytes, self.owner = mapping, dtype, nbytes, owner
        self.factory, self.piece = factory, piece


def plan_hf_to_megatron(model_state: Dict, table: Dict[str, Mapping], rank: int, ranks: int):
    """The plan: (checkpoint key, global offset) -> PlanEntry for every chunk megatron's sharded
    state of the meta model names (its layout is megatron's own: keys, offsets, factory pieces),
    each parameter given to a rank balanced by bytes. Every parameter must have a mapping (checked
    here, before anything is written). The state is adjusted in place for the writer: main replica
    on the owning rank, factories expanded into their pieces. Returns (plan, (bytes, chunks) of
    this rank's share)."""
    entries = _param_entries(model_state)
    names = sorted(entries, key=checkpoint_name)  # the same order (and shares) on every megatron-core version
    unmapped = [checkpoint_name(n) for n in names if checkpoint_name(n) not in table]
    if unmapped:
        raise ConversionError(f"megatron parameter {unmapped[0]!r} has no HF source in the registry")
    sizes = [nbytes_of(entries[n].data.shape, entries[n].data.dtype) for n in names]
    owners = assign(sizes, ranks)
    plan: Dict[Tuple[str, Tuple[int, ...]], PlanEntry] = {}
    mine = [0, 0]
    for name, size, owner in zip(names, sizes, owners):
        entry = entries[name]
        mapping = table[checkpoint_name(name)]
        entry.replica_id = 0 if owner == rank else 1
        pieces = _pieces(entry, entry.data) if isinstance(entry, ShardedTensorFactory) else [entry]
        if owner == rank:
            mine[0] += size
            mine[1] += len(pieces)
        if isinstance(entry, ShardedTensorFactory):
            for i, piece in enumerate(pieces):
                plan[(piece.key, tuple(piece.global_offset))] = PlanEntry(mapping, entry.data.dtype, size, owner, entry, i)
            model_state[name] = pieces
        else:
            plan[(entry.key, tuple(entry.global_offset))] = PlanEntry(mapping, entry.data.dtype, size, owner)
    return plan, mine


class _OnDemandPlanner(MCoreSavePlanner):
    """megatron-core's DCP save planner, except that a tensor chunk is made from the HF files only
    when the writer asks for it, and freed before the same writer thread asks for the next one."""

    def __init__(self, make: Callable[[Mapping], torch.Tensor], sources, budget: ByteBudget,
                 progress: Progress):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self.make, self.sources, self.budget, self.progress = make, sources, budget, progress
        self._held = threading.local()
        self.place: Callable[[torch.Tensor], None] = lambda tensor: None  # set by the strategy
        self.failure: Optional[BaseException] = None  # the first tensor that could not be made

    def release_held(self) -> None:
        """Free the tensor this thread made last (written by now): called before the thread makes
        its next one and when it closes a file (a thread that has finished must hold nothing)."""
        held = getattr(self._held, "item", None)
        if held is not None:
            tensor, n = held
            # torch's writer keeps a reference to every tensor of a file until the file is closed;
            # emptying the storage frees the bytes now (the tensor has been written). A tensor the
            # rule did not transform is the HF file's own mapping (HFCheckpoint.get), whose storage
            # cannot be resized: its pages are unmapped instead.
            if tensor.untyped_storage().resizable():
                tensor.untyped_storage().resize_(0)
            else:
                drop_pages(tensor)
            self.budget.release(n)
            self._held.item = None

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        self.release_held()
        key = (write_item.index.fqn, tuple(write_item.index.offset))
        source = self.sources.get(key)
        if source is None:
            raise ConversionError(f"no HF source planned for Megatron checkpoint tensor {key[0]!r} at offset {key[1]}")
        n = self.budget.acquire(source.nbytes)
        try:
            tensor = self.make(source.mapping).to(source.dtype)
            if source.factory is not None:
                tensor = _pieces(source.factory, tensor)[source.piece].data
            tensor = exact_view(tensor, write_item.tensor_data.chunk.sizes, f"Megatron checkpoint tensor {key[0]!r}")
            if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
                tensor = tensor.clone(memory_format=torch.contiguous_format)  # exactly its own storage
        except BaseException as e:
            self.budget.release(n)
            # torch's writer threads print and drop their exceptions: keep the first for the strategy
            if self.failure is None:
                self.failure = e if isinstance(e, ConversionError) else ConversionError(
                    f"Megatron checkpoint tensor {key[0]!r}: {type(e).__name__}: {e}")
            raise self.failure from None
        self._held.item = (tensor, n)
        self.progress.update(tensor.nbytes)
        self.place(tensor)
        return tensor

    def finish_writing(self) -> None:
        self.release_held()


class _HashingStream:
    """A file being written, hashed (XXH3-128) on the way, so that the checksum file needs no
    second pass over the checkpoint."""

    def __init__(self, stream: DirectStream):
        import xxhash

        self.stream, self.hash, self.size = stream, xxhash.xxh3_128(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += memoryview(data).nbytes
        return self.stream.write(data)

    def skip(self, n: int) -> None:
        """Leave `n` bytes (a hole, zeros) before the next record."""
        self.hash.update(bytes(n))
        self.size += n
        self.stream.skip(n)

    def __getattr__(self, name):  # tell, flush, fileno, ...
        return getattr(self.stream, name)


class _PrefixProbe:
    """A file-like sink that counts what torch.save writes before the tensor's own bytes."""

    def __init__(self, tensor: torch.Tensor):
        self.address, self.nbytes, self.count, self.prefix = tensor.data_ptr(), tensor.nbytes, 0, None

    def write(self, data) -> int:
        view = memoryview(data)
        if self.prefix is None and view.nbytes == self.nbytes and buffer_address(view) == self.address:
            self.prefix = self.count
        self.count += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        pass


class _HashingFileSystem(FileSystem):
    """torch.distributed.checkpoint's local file system, writing through `DirectStream` (no page
    cache copy), recording {path: (size, digest)} of every file it writes (renames followed) and
    calling `on_close()` in the writing thread when a file is complete. `place_next(tensor)` puts
    the next record where the tensor's bytes land at their memory's page offset: a tensor mapped
    from its HF file then goes to the disk without being copied (see conversion/direct_io.py)."""

    def __init__(self, on_close: Callable[[], None]):
        super().__init__()
        self.digests: Dict[str, Tuple[int, str]] = {}
        self.on_close = on_close
        self._writing = threading.local()
        self._prefixes: Dict[tuple, Optional[int]] = {}

    @contextmanager
    def create_stream(self, path, mode):
        from torch.utils.serialization import config

        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        hashing = _HashingStream(DirectStream(Path(path)))
        self._writing.stream = hashing
        try:
            # Each chunk is a torch.save record; its zip CRC32 would cost a pass over every byte
            # (4.5 s of CPU for 9 GiB), and XXH3 of the whole file already guards it (torch.load
            # does not need the CRC). torch's config overrides are per thread: this is the writer's.
            with config.patch({"save.compute_crc32": False}):
                yield hashing
        finally:
            self._writing.stream = None
            hashing.stream.close()
        self.digests[str(Path(path).resolve())] = (hashing.size, hashing.hash.hexdigest())
        self.on_close()

    def place_next(self, tensor: torch.Tensor) -> None:
        """Called by the planner in the writing thread just before torch.save writes `tensor` as
        the next record of this thread's file: skip the bytes that make the record's data start
        at the page offset of the tensor's memory (the record's offset and length are what the
        metadata records, so the gap is never read)."""
        stream = getattr(self._writing, "stream", None)
        if stream is None or stream.stream.file.direct is None or tensor.nbytes < direct_io.MIN_DIRECT:
            return
        key = (tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.storage_offset())
        if key not in self._prefixes:
            probe = _PrefixProbe(tensor)
            torch.save(tensor, probe)
            self._prefixes[key] = probe.prefix  # None: torch wrote the data in pieces; no placing
        prefix = self._prefixes[key]
        if prefix is not None:
            stream.skip((tensor.data_ptr() - stream.tell() - prefix) % PAGE)

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        old = self.digests.pop(str(Path(path).resolve()), None)
        if old is not None:
            self.digests[str(Path(new_path).resolve())] = old


class _OnDemandStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's torch_dist save strategy (same files, same metadata.json) with torch's own
    FileSystemWriter, which asks the planner for one tensor at a time (megatron's asynchronous writer
    resolves every tensor of the rank up front). Afterwards `digests` holds {absolute path: (size,
    XXH3-128)} of the files every rank wrote, and `source_sums` the checksums of the source HF files
    that the ranks hashed meanwhile (`source_sums()`: this rank's share), gathered from all ranks."""

    def __init__(self, planner: _OnDemandPlanner, threads: int, source_sums: Callable[[], Dict[str, Dict]]):
        super().__init__("torch_dist", 1, thread_count=threads)
        self.planner = planner
        self.source_sums_of_rank = source_sums
        self.digests: Dict[str, Tuple[int, str]] = {}
        self.source_sums: Dict[str, Dict] = {}

    def async_save(self, sharded_state_dict, checkpoint_dir):  # pragma: no cover - never asked for
        raise NotImplementedError("the streaming conversion saves synchronously")

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        pyt_state = mcore_to_pyt_state_dict(flat, False)
        # per_thread_copy_ahead=0: with one thread on a CUDA host torch's writer would otherwise use its
        # overlapping loader, which resolves tensors ahead of writing them; the planner frees each tensor
        # when its thread asks for the next one, so tensors must be resolved one at a time, when written.
        writer = FileSystemWriter(str(checkpoint_dir), thread_count=self.thread_count, per_thread_copy_ahead=0)
        writer.fs = _HashingFileSystem(on_close=self.planner.release_held)
        self.planner.place = writer.fs.place_next
        default_hook = threading.excepthook

        def hook(args):  # a writer thread's failure is raised below, once, not printed by the thread
            if args.exc_value is not self.planner.failure:
                default_hook(args)

        threading.excepthook = hook
        try:
            dcp.save(pyt_state, storage_writer=writer, planner=self.planner)
        except BaseException:
            if self.planner.failure is None:
                raise
        finally:
            threading.excepthook = default_hook
            self.planner.finish_writing()
        if self.planner.failure is not None:
            raise self.planner.failure
        for digests, source_sums in gather((writer.fs.digests, self.source_sums_of_rank())):
            self.digests.update(digests)
            self.source_sums.update(source_sums)


def convert_hf_to_megatron(bridge, output: Path, dtype: Optional[torch.dtype] = None, layout: Optional[Dict] = None,
                           overwrite: bool = False, quiet: bool = False, threads: Optional[int] = None,
                           budget: int = DEFAULT_BUDGET, source_sums: Optional[Future] = None,
                           target: str = DEFAULT_TARGET) -> None:
    """Write the Megatron checkpoint of `bridge`'s HF directory to `output`, streaming (see module doc),
    laid out for `target` (`conversion.naming`).

    `source_sums`: this rank's share of the source files' checksums, already being computed (the
    CLI starts it before importing megatron, see `integrity.share_checksums_in_background`)."""
    from bridge import checkpoint

    rank, ranks = ensure_process_group()
    chosen = TARGETS[target]
    model = meta_model(bridge, dtype or bridge.default_dtype(),
                       padded_vocab=None if chosen.pad_vocab else bridge.config.text["vocab_size"])
    state = checkpoint.sharded_state(model, chosen, checkpoint.megatron_args(model, layout))
    sources, mine = plan_hf_to_megatron(state["model"], bridge.mapping_table(), rank, ranks)
    progress = Progress(mine[0], mine[1], "hf -> megatron", quiet or rank != 0)
    dims = bridge._dims(bridge._language_model(model))

    def make(mapping: Mapping) -> torch.Tensor:
        return bridge.megatron_tensor(mapping, dims)

    if source_sums is None:  # each rank hashes its share of the source files meanwhile
        source_sums = integrity.share_checksums_in_background(bridge.hf_dir, bridge.source_files(), rank, ranks)
    strategy = _OnDemandStrategy(_OnDemandPlanner(make, sources, ByteBudget(budget), progress),
                                 threads or default_threads(), source_sums.result)
    try:
        bridge.save_megatron_model(model, output, layout=layout, overwrite=overwrite, sharded_state=lambda: state,
                                   strategy=strategy, known_checksums=lambda: strategy.digests,
                                   hf_checksums=lambda: strategy.source_sums, target=target,
                                   carried=lambda: {m.hf[0]: bridge.checkpoint.get(m.hf[0]) for m in bridge.mappings()
                                                    if m.megatron.startswith(CARRIED_PREFIX)})
    finally:
        progress.close()


# ---------------------------------------------------------------------------- Megatron -> HF

class _FileWindow(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a seekable read-only file (os.pread), so
    torch.load reads one record straight into its tensor without a copy of the whole record."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.length - self.pos))
        done = 0
        while done < n:
            got = os.preadv(self.fd, [view[done:n]], self.start + self.pos + done)
            if got == 0:
                raise EOFError("checkpoint file ends early")
            done += got
        self.pos += done
        return done


class DcpReader:
    """Reads any region of any tensor of a torch.distributed.checkpoint directory (the format of
    megatron-core's torch_dist checkpoints), touching only the chunks that overlap it."""

    def __init__(self, ckpt_dir: Path, metadata=None):
        """`metadata`: the directory's `.metadata`, already read (`MegatronCheckpoint.metadata`)."""
        self.dir = Path(ckpt_dir)
        path = self.dir / ".metadata"
        if metadata is None:
            metadata = load_dcp_metadata(path)  # exact-class allow-list: a hostile pickle runs nothing
        try:
            self.tensors = metadata.state_dict_metadata
            self.storage = {(index.fqn, tuple(index.offset or ())): info for index, info in metadata.storage_data.items()}
        except Exception as e:  # noqa: BLE001 - any malformed metadata is one error
            raise ConversionError(f"{path}: not valid torch.distributed.checkpoint metadata ({e})") from None
        self._files = OpenFiles(os.O_RDONLY, lambda relative_path: data_file(self.dir, relative_path))

    def close(self) -> None:
        self._files.close()

    def _chunk(self, fqn: str, chunk) -> torch.Tensor:
        info = self.storage.get((fqn, tuple(chunk.offsets)))
        if info is None:
            raise ConversionError(f"{self.dir}: no data recorded for {fqn!r} at offset {tuple(chunk.offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(f"{self.dir / info.relative_path}: {fqn!r} is stored with transforms "
                                  f"{info.transform_descriptors} (compressed checkpoints are not supported)")
        try:
            tensor = self._load_record(info)
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated / corrupt record
            raise ConversionError(f"{self.dir / info.relative_path}: cannot read {fqn!r} at offset "
                                  f"{tuple(chunk.offsets)} ({type(e).__name__}: {e})") from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(chunk.sizes):
            raise ConversionError(f"{self.dir / info.relative_path}: {fqn!r} at offset {tuple(chunk.offsets)} holds "
                                  f"{getattr(tensor, 'shape', type(tensor).__name__)}, the metadata says {tuple(chunk.sizes)}")
        return tensor

    def _load_record(self, info) -> torch.Tensor:
        """The tensor of one torch.save record, its data mapped from the file (no copy; a private
        mapping). torch.load reads the record's pickle (weights only) with `map_location="meta"`,
        which gives shape, dtype, strides and, as `_checkpoint_offset`, where the storage's bytes
        start in the record; a torch without that attribute reads the record the ordinary way."""
        fd = self._files.fd(info.relative_path)
        meta = torch.load(_FileWindow(fd, info.offset, info.length), map_location="meta", weights_only=True)
        storage = meta.untyped_storage() if isinstance(meta, torch.Tensor) else None
        start = getattr(storage, "_checkpoint_offset", None)
        if start is None:
            return torch.load(_FileWindow(fd, info.offset, info.length), map_location="cpu", weights_only=True)
        nbytes = storage.nbytes()
        if start + nbytes > info.length:
            raise EOFError(f"the record's data ends {start + nbytes - info.length} bytes after the record")
        data = map_bytes(fd, info.offset + start, nbytes)
        return data.view(meta.dtype).as_strided(meta.shape, meta.stride(), meta.storage_offset())

    def read(self, fqn: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The region `offsets` + `sizes` of the global tensor `fqn`."""
        meta = self.tensors.get(fqn)
        if meta is None or not hasattr(meta, "chunks"):
            raise ConversionError(f"{self.dir}: Megatron checkpoint has no tensor {fqn!r}")
        if len(offsets) != len(meta.size) or any(o + s > g for o, s, g in zip(offsets, sizes, meta.size)):
            raise ConversionError(f"{self.dir}: tensor {fqn!r} is {tuple(meta.size)}; the model expects a region "
                                  f"{tuple(sizes)} at {tuple(offsets)} (the checkpoint is of another model size)")
        out, covered = None, 0
        for chunk in meta.chunks:
            lo = [max(a, b) for a, b in zip(chunk.offsets, offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(chunk.offsets, chunk.sizes, offsets, sizes)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)) and len(sizes) > 0:
                continue
            data = self._chunk(fqn, chunk)
            if tuple(chunk.offsets) == tuple(offsets) and tuple(chunk.sizes) == tuple(sizes):
                return data.contiguous()  # the usual case: the region is one chunk
            if out is None:
                out = torch.empty(tuple(sizes), dtype=data.dtype)
            src = data[tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))] = src
            covered += math.prod(h - l for l, h in zip(lo, hi))
        if out is None or covered != math.prod(sizes):
            raise ConversionError(f"{self.dir}: the chunks of {fqn!r} do not cover the region {tuple(sizes)} at "
                                  f"{tuple(offsets)} (the checkpoint is incomplete)")
        return out


def _read_entry(reader: DcpReader, entry) -> torch.Tensor:
    """One parameter of the model (TP = 1) from the checkpoint: a ShardedTensor's region, or a
    factory's pieces merged by the factory's own merge function."""
    if isinstance(entry, ShardedTensorFactory):
        loaded = [_read_entry(reader, piece) for piece in _pieces(entry, entry.data)]
        return entry.merge_fn(loaded)
    sizes = (1,) * entry.prepend_axis_num + tuple(entry.local_shape)
    return exact_view(reader.read(entry.key, entry.global_offset, sizes), entry.local_shape, f"{reader.dir}: {entry.key!r}")


def convert_megatron_to_hf(bridge, src: MegatronCheckpoint | Path, output: Path, overwrite: bool = False,
                           quiet: bool = False, threads: Optional[int] = None, budget: int = DEFAULT_BUDGET,
                           verified: Optional[Future] = None) -> None:
    """Write the HF checkpoint of the Megatron checkpoint `src` to `output`, streaming.

    `bridge` holds the HF side: the converted checkpoint's own (bridge_meta.json), or the base HF
    directory of a checkpoint Megatron-Bridge / Megatron-LM wrote (`--hf-config`). The model is built
    from its config with the checkpoint's parameter dtype and vocab rows, its keys named for the
    checkpoint's target; every HF tensor of the registry must come from the checkpoint, or (carried
    RADIO tensors) from `hf_carried.safetensors` beside it or the base HF directory: what is in none
    of them is refused before anything is written. The HF files are laid out as the source's when
    its manifest is known, else in shards of at most 5 GiB in registry order, each tensor in the
    dtype the checkpoint holds it in.

    A converted checkpoint's files are hashed meanwhile (on rank 0; `verified`: that check already
    running, as the CLI starts it before importing megatron); the output is not renamed into place
    unless they match, and a mismatch is the error reported even when reading failed.

    Inside the output transaction (bridge/output.py: rank 0 creates the hidden output directory,
    renames it into place once every rank succeeded, and any failure is raised on every rank),
    rank 0 lays out the safetensors files; every rank writes its share of the tensors into them;
    rank 0 adds the index, config.json and the assets.
    """
    from bridge import checkpoint
    from conversion.hf_writer import SafetensorsWriter

    rank, ranks = ensure_process_group()
    if not isinstance(src, MegatronCheckpoint):  # a path: the checkpoint the tracker names
        src = open_checkpoint(Path(src))
    if verified is None and rank == 0 and src.meta is not None:
        verified = integrity.in_background(integrity.verify_megatron_checkpoint, src.root, src.meta)
    model = meta_model(bridge, src.params_dtype, src.vocab_rows)
    entries = {checkpoint_name(k): v for k, v in
               _param_entries(checkpoint.sharded_state(model, src.target)["model"]).items()}
    reader = DcpReader(src.directory, src.metadata)
    rules = bridge.mappings()
    carried = _values_kept_elsewhere(bridge, src, [r for r in rules if not _stored(src, entries.get(r.megatron))])
    dims = bridge._dims(bridge._language_model(model))
    specs, origins = bridge.hf_specs(), bridge.hf_origins()
    if specs is None:  # no source manifest: files planned from the registry, dtypes from the checkpoint
        dtype_of = {r.megatron: carried[r.hf[0]].dtype if r.hf[0] in carried else entries[r.megatron].data.dtype
                    for r in rules}
        shapes = {h: (shape, dtype_of[r.megatron]) for r in rules for h, (shape, _) in zip(r.hf, r.shapes)}
        files = plan_shards([(h, nbytes_of(*s)) for h, s in shapes.items()], MAX_SHARD_BYTES)
        specs = {h: (files[h], dtype, shape) for h, (shape, dtype) in shapes.items()}
    sizes = [sum(nbytes_of(specs[h][2], specs[h][1]) for h in r.hf) for r in rules]
    owners = assign(sizes, ranks)
    size_of = dict(zip((r.megatron for r in rules), sizes))
    mine = _interleave_files([r for r, owner in zip(rules, owners) if owner == rank],
                             lambda r: (specs[r.hf[0]][0], size_of[r.megatron]))

    progress = Progress(sum(s for s, o in zip(sizes, owners) if o == rank), sum(len(r.hf) for r in mine),
                        "megatron -> hf", quiet or rank != 0)
    limiter = ByteBudget(budget)

    def convert(rule) -> None:
        if rule.hf[0] in carried:  # not in the checkpoint: beside it, or from the base HF directory
            (name,) = rule.hf
            writer.write(name, carried[name].to(specs[name][1]))
            progress.update(carried[name].nbytes)
            return
        entry = entries[rule.megatron]
        with limiter.hold(nbytes_of(entry.data.shape, entry.data.dtype)):
            full = _read_entry(reader, entry)
            for name, tensor in rule.to_hf(full, dims):
                writer.write(name, tensor.to(specs[name][1]))
                progress.update(tensor.nbytes)

    def convert_share() -> None:
        try:
            _run_all(convert, mine, threads or default_threads())
        except Exception:
            if verified is not None:
                verified.result()  # a corrupt file explains the failure better
            raise
        if verified is not None:
            verified.result()
        writer.close()
        writer.check_complete(h for r in mine for h in r.hf)

    what = f"writing the Hugging Face checkpoint {output}"
    try:
        with output_transaction(output, what, overwrite) as tmp:
            writer = SafetensorsWriter(tmp, specs, origins)
            on_rank0(writer.create, what)  # every file laid out before any rank writes into it
            try:
                convert_share()
            finally:
                writer.close(fsync=False)  # the transaction fsyncs every file before the rename
            if rank == 0:  # its share written: the files only rank 0 writes
                writer.write_index()
                bridge.write_hf_config_and_assets(model, tmp)
    finally:
        reader.close()
        progress.close()


def _stored(src: MegatronCheckpoint, entry) -> bool:
    """Whether the checkpoint holds every key of a model entry (a factory's: every piece's)."""
    if entry is None:
        return False
    pieces = _pieces(entry, entry.data) if isinstance(entry, ShardedTensorFactory) else [entry]
    return all(piece.key in src.tensors for piece in pieces)


def _values_kept_elsewhere(bridge, src: MegatronCheckpoint, absent: List[Mapping]) -> Dict[str, torch.Tensor]:
    """HF name -> value of the mappings the checkpoint does not hold, all checked before anything is
    written: only tensors its target keeps elsewhere (`Target.kept_elsewhere`: the carried RADIO
    tensors, Megatron-Bridge's absent video embedder) may be absent; they come from
    `hf_carried.safetensors` beside it, else the base HF directory's weights. Anything else absent
    is an error naming the HF tensor and the key looked for."""
    for rule in absent:
        if not src.target.kept_elsewhere(rule.megatron):
            raise ConversionError(f"{src.directory}: no tensor {src.target.checkpoint_key(rule.megatron)!r} for HF "
                                  f"tensor {rule.hf[0]!r} (the checkpoint, read as {src.target.name} layout, lacks "
                                  "it: another model, or another config than --hf-config)")
    if not absent:
        return {}
    names = [h for r in absent for h in r.hf]
    side = src.root / CARRIED_FILE
    values = {}
    if side.is_file():
        from safetensors.torch import load_file

        values = load_file(str(side))
    if bridge.hf_dir is not None and any(bridge.hf_dir.glob("*.safetensors")):
        values.update({n: bridge.checkpoint.get(n) for n in names if n not in values and n in bridge.checkpoint})
    missing = [n for n in names if n not in values]
    if missing:
        raise ConversionError(f"{src.root}: HF tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + f" is not in the Megatron checkpoint (its {src.target.name} layout does not store it), "
                              f"nor in {CARRIED_FILE} beside it, nor in the --hf-config directory's weights")
    for rule in absent:
        for name in rule.hf:
            rule.check_hf(name, values[name].shape)
    return {n: values[n] for n in names}


def _interleave_files(rules: List, file_and_bytes: Callable) -> List:
    """`rules` reordered so that consecutive ones write to different files, each file's rules in
    their order, the next rule always from the file with the fewest bytes scheduled so far (so the
    files fill at the same rate and finish together): a file system serialises the writes to one
    file (ext4 takes the file's lock for each), so the threads, which take consecutive rules, write
    in parallel only while those go to different files."""
    queues: Dict[str, List] = {}
    for rule in rules:
        queues.setdefault(file_and_bytes(rule)[0], []).append(rule)
    heap = [(0, name) for name in sorted(queues)]
    position = dict.fromkeys(queues, 0)
    out = []
    while heap:
        scheduled, name = heapq.heappop(heap)
        rule = queues[name][position[name]]
        out.append(rule)
        position[name] += 1
        if position[name] < len(queues[name]):
            heapq.heappush(heap, (scheduled + file_and_bytes(rule)[1], name))
    return out


def _run_all(fn: Callable, items: Sequence, threads: int) -> None:
    """fn(item) for every item on `threads` worker threads. The first failure (or Ctrl-C) cancels
    the items not started yet and is raised once the running ones finish."""
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
