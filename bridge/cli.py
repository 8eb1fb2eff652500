"""`convert-hf-to-mcore` and `convert-mcore-to-hf` (and the shared runner of `bridge-verify`).

Both stream (bridge/streaming.py): memory stays bounded by a budget of 768 MiB of tensors in
flight, whatever the model's depth; reading, transforming and writing overlap on `--threads`
threads. They run in one plain process (a one-process gloo group is created) or under torchrun
(the given group is used), where each rank converts its share of the tensors (reads only those).
A tqdm progress bar (bytes, tensors/s) shows on rank 0 unless `--quiet`. Outputs are written to a
hidden sibling and renamed into place only when complete.

Failures: every failure ends with one line on stderr (`error: ...`, naming the file / tensor / field
and what was expected) and a non-zero exit, and leaves no output directory; `--debug` shows the
traceback. Exit codes: 2 bad input (`ConversionError`), 1 anything unexpected, 130 interrupted
(Ctrl-C or SIGTERM: temporaries are removed). Everything that can be checked from file headers and
config.json is checked before megatron is imported and before any tensor is read (see
`_preflight_hf` / `_preflight_mcore`): paths, config, safetensors headers (truncation, corruption),
index, tensor names / shapes / dtypes, free disk space; then the parallel layout, then the work.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, Optional

from conversion import dtypes  # imports no torch: the flags are listed before torch is imported
from conversion.errors import ConversionError
from conversion.naming import DEFAULT_TARGET, TARGETS  # no torch either


def _terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: unwind, remove temporaries, exit 130
    raise KeyboardInterrupt


def _run(main: Callable[[argparse.Namespace], Optional[int]], parser: argparse.ArgumentParser,
         argv: Optional[List[str]]) -> int:
    try:
        return _run_main(main, parser.parse_args(argv))
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter exits. Left to interpreter shutdown,
    gloo's threads were sometimes destroyed while still joinable under torchrun (the process then
    aborted with "terminate called without an active exception", exit -6, after a successful run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:  # megatron holds its subgroups: let go of them first
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _run_main(main: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace) -> int:
    if not args.debug:  # megatron's import-time and CPU-path warnings are noise for a conversion
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # also in dist_checkpointing's workers
        logging.getLogger("megatron").setLevel(logging.ERROR)
        # megatron-core 0.19.2 imports torch.utils.cpp_extension (tensor_parallel/random.py), which
        # on a CUDA build of torch without a CUDA runtime logs "No CUDA runtime is found" (0.16.1 does
        # not import it): noise on stderr, whose only line should be the error.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (called as a library)
        pass
    try:
        return main(args) or 0
    except ConversionError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written (temporary files removed)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


@contextmanager
def _startup():
    """The conversion CLIs' start-up (imports, preflight, the bridge) with Python's cyclic garbage
    collector off: it traversed the millions of objects that importing torch and megatron creates
    again and again (about 3 s on 2 cores, benchmarks/conversion.py). Afterwards those objects are
    frozen out of its sight and it runs again for the conversion."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _input_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConversionError(f"{p}: input path does not exist (expected {what})")
    if not p.is_dir():
        raise ConversionError(f"{p}: input path is not a directory (expected {what})")
    return p


def _preflight_hf(args: argparse.Namespace):
    """Every check of an HF input that needs no megatron and reads no tensor data."""
    from conversion import hf_config, omni, preflight, registry
    from conversion.hf_paths import resolve_hf_path
    from conversion.output_dir import check_free_space, check_output_path, dir_bytes
    from conversion.safetensors_io import HFCheckpoint

    hf = args.hf_path = resolve_hf_path(args.hf_path)  # a local directory, or a hub id in the hub cache
    check_output_path(args.output, args.overwrite, inputs=[hf])
    cfg = hf_config.load_config(hf)
    ckpt = HFCheckpoint(hf)  # headers: truncated / corrupt shards, index, pickle-only directories
    shapes = {n: ckpt.shape(n) for n in ckpt.keys()}
    tensor_dtypes = {n: ckpt.dtype(n) for n in ckpt.keys()}
    # every tensor of the model, its shape from config.json (the registry: conversion/registry.py)
    preflight.check_tensors(str(hf), shapes, tensor_dtypes, registry.mappings(cfg, shapes), files=ckpt.weight_map)
    for name in ckpt.keys():  # values the conversion refuses, while they are cheap to read (tiny vectors)
        if omni.LAYER_SCALE.search(name):
            omni.check_layer_scale(name, ckpt.get(name))
    target = dtypes.dtype_from_name(args.dtype) if args.dtype else None
    weight_files = set(ckpt.weight_map.values())
    needed = preflight.output_bytes(shapes, tensor_dtypes, target) + dir_bytes(hf, keep=lambda p: p.name not in weight_files)
    check_free_space(args.output, needed, "the Megatron checkpoint")
    return cfg, ckpt


def _import_megatron() -> None:
    """Import megatron-core with its `@jit_fuser` (torch.compile) decorators made no-ops: importing
    torch's compiler for them takes about 5 of the 9 seconds megatron's import costs on a small
    machine, and a conversion never runs a fused kernel. Only the conversion CLIs do this."""
    import torch

    compile_ = torch.compile
    torch.compile = lambda model=None, **kwargs: model if model is not None else (lambda fn: fn)
    try:
        import megatron.core.dist_checkpointing  # noqa: F401
        import providers.megatron_imports  # noqa: F401  (the hybrid model and stack of this megatron-core)
    finally:
        torch.compile = compile_


def _hf_to_mcore(args: argparse.Namespace) -> None:
    with _startup():
        from conversion import hf_config, integrity
        from conversion.split import launcher_rank

        cfg, ckpt = _preflight_hf(args)
        # The source files' checksums (bridge_meta.json) are taken while megatron is imported and
        # the tensors are written: each rank hashes its share, in a background thread.
        source_sums = integrity.share_checksums_in_background(ckpt.root, ckpt.source_files(), *launcher_rank())
        _import_megatron()
        from bridge.parallel import check_layout

        check_layout(hf_config.provider_fields(cfg), tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp)

        from bridge import AutoBridge
        from bridge.ranks import world
        from bridge.streaming import convert_hf_to_megatron

        bridge = AutoBridge.from_hf_pretrained(args.hf_path, config=cfg, checkpoint=ckpt)
    layout = {"tp": args.tp, "pp": args.pp, "ep": args.ep, "etp": args.etp, "vpp": args.vpp}
    convert_hf_to_megatron(bridge, Path(args.output), dtype=dtypes.dtype_from_name(args.dtype) if args.dtype else None,
                           layout=layout, overwrite=args.overwrite, quiet=args.quiet, threads=args.threads,
                           source_sums=source_sums, target=args.target)
    if not args.quiet and world()[0] == 0:
        print(f"wrote Megatron checkpoint {args.output}")


def _preflight_mcore(args: argparse.Namespace):
    """Every check of a Megatron checkpoint that needs no megatron: which directory, its keys, the HF
    side (bridge_meta.json, or --hf-config), output, disk, file sizes. Returns (checkpoint, HF config)."""
    from conversion import hf_config, integrity, preflight, registry
    from conversion.mappings import expected_hf
    from conversion.megatron_ckpt import open_checkpoint
    from conversion.output_dir import check_free_space, check_output_path, dir_bytes

    src = _input_dir(args.mcore_path, "a Megatron checkpoint directory")
    if args.hf_config is not None:
        _input_dir(args.hf_config, "the Hugging Face directory the checkpoint's model was made from")
    ckpt = open_checkpoint(src, args.iteration)
    check_output_path(args.output, args.overwrite, inputs=[src])
    if ckpt.meta is None and args.hf_config is None:
        raise ConversionError(f"{src}: no {integrity.META_NAME} (the checkpoint was not written by "
                              "convert-hf-to-mcore): pass --hf-config BASE_HF_DIR, the Hugging Face directory of "
                              "the model it was trained from (config.json, tokenizer; its weights are not read "
                              "except tensors Megatron does not store)")
    if args.hf_config is not None:
        cfg = hf_config.load_config(Path(args.hf_config))
        assets = Path(args.hf_config)
    else:
        cfg = hf_config.parse_config(ckpt.meta["hf_config"], f"{src / integrity.META_NAME}: hf_config")
        assets = src / "hf_assets"
    shapes = {name: shape for name, (shape, _) in expected_hf(registry.mappings(cfg)).items()}
    needed = preflight.output_bytes(shapes, {}, ckpt.params_dtype)
    needed += dir_bytes(assets, keep=lambda p: not p.name.endswith(".safetensors")) if assets.is_dir() else 0
    check_free_space(args.output, needed, "the Hugging Face checkpoint")
    if ckpt.meta is not None:
        integrity.verify_megatron_checkpoint(src, ckpt.meta, hashes=False)  # contents: hashed during the conversion
    return ckpt


def _mcore_to_hf(args: argparse.Namespace) -> None:
    with _startup():
        from conversion import integrity
        from conversion.split import launcher_rank

        ckpt = _preflight_mcore(args)
        # A converted checkpoint's files are hashed (rank 0) while megatron is imported and the
        # tensors are converted; the output is renamed into place only if they all match.
        verified = None
        if ckpt.meta is not None and launcher_rank()[0] == 0:
            verified = integrity.in_background(integrity.verify_megatron_checkpoint, ckpt.root, ckpt.meta)
        _import_megatron()
        from bridge import AutoBridge
        from bridge.ranks import world
        from bridge.streaming import convert_megatron_to_hf

        if args.hf_config is not None:  # the HF side of a checkpoint Megatron-Bridge / Megatron-LM wrote
            bridge = AutoBridge.from_hf_pretrained(args.hf_config)
        else:
            bridge = AutoBridge.from_megatron_checkpoint(args.mcore_path, verify=False)
    convert_megatron_to_hf(bridge, ckpt, Path(args.output), overwrite=args.overwrite, quiet=args.quiet,
                           threads=args.threads, verified=verified)
    if not args.quiet and world()[0] == 0:
        print(f"wrote Hugging Face checkpoint {args.output}")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="reader / writer threads per process (default: 8; 2 on a single core)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def hf_to_mcore_main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="convert-hf-to-mcore",
                                description="Convert a Hugging Face NemotronH / Nemotron-Omni checkpoint to a Megatron checkpoint.")
    p.add_argument("--hf-path", required=True, help="Hugging Face model directory (config.json + safetensors)")
    _common(p)
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size the checkpoint is meant for")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size")
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: TP)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank")
    p.add_argument("--dtype", choices=list(dtypes.FLAGS), default=None,
                   help="parameter dtype of the Megatron checkpoint (default: the HF checkpoint's)")
    p.add_argument("--target", choices=list(TARGETS), default=DEFAULT_TARGET,
                   help="whose layout: this project's (default), Megatron-Bridge's (0.6, PyPI: llava_model. keys, "
                        "unpadded vocab) or Megatron-LM's (Omni: sound_model.); text keys are the same for all")
    return _run(_hf_to_mcore, p, argv)


def mcore_to_hf_main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="convert-mcore-to-hf",
                                description="Convert a checkpoint written by convert-hf-to-mcore back to Hugging Face format.")
    p.add_argument("--mcore-path", required=True,
                   help="Megatron checkpoint: written by convert-hf-to-mcore, Megatron-Bridge or Megatron-LM (the "
                        "root with latest_checkpointed_iteration.txt, or an iter_NNNNNNN / release directory)")
    p.add_argument("--hf-config", default=None,
                   help="Hugging Face directory of the model (config.json, tokenizer, ...): required for a checkpoint "
                        "without bridge_meta.json")
    p.add_argument("--iteration", type=int, default=None,
                   help="export iter_NNNNNNN (default: the one the tracker file names)")
    _common(p)
    return _run(_mcore_to_hf, p, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(hf_to_mcore_main())
