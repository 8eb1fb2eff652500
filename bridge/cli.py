"""`convert-hf-to-mcore` and `convert-mcore-to-hf`.

Both run in one plain process (a one-process gloo group is created) or under torchrun (the given
group is used). Every failure ends with one line on stderr and a non-zero exit; `--debug` shows the
traceback. Outputs are written to a hidden sibling and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from typing import Callable, List, Optional

from conversion.errors import ConversionError


def _run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
         argv: Optional[List[str]]) -> int:
    args = parser.parse_args(argv)
    if not args.debug:  # megatron's import-time and CPU-path warnings are noise for a conversion
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # also in dist_checkpointing's workers
        logging.getLogger("megatron").setLevel(logging.ERROR)
    try:
        main(args)
        return 0
    except ConversionError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _hf_to_mcore(args: argparse.Namespace) -> None:
    from bridge import AutoBridge
    from bridge.auto_bridge import DTYPES
    from bridge.parallel import ensure_parallel_state

    bridge = AutoBridge.from_hf_pretrained(args.hf_path)
    bridge.checkpoint  # open and validate the weights before building anything
    ensure_parallel_state()
    provider = bridge.to_megatron_provider(dtype=DTYPES[args.dtype] if args.dtype else None)
    provider.perform_initialization = False  # every parameter is overwritten from the HF files
    model = provider.provide()
    bridge.load_hf_weights(model)
    layout = {"tp": args.tp, "pp": args.pp, "ep": args.ep, "etp": args.etp, "vpp": args.vpp}
    bridge.save_megatron_model(model, args.output, layout=layout, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote Megatron checkpoint {args.output}")


def _mcore_to_hf(args: argparse.Namespace) -> None:
    from bridge import AutoBridge

    bridge = AutoBridge.from_megatron_checkpoint(args.mcore_path)
    model = AutoBridge.load_megatron_model(args.mcore_path)
    bridge.save_hf_pretrained(model, args.output, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote Hugging Face checkpoint {args.output}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
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
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="parameter dtype of the Megatron checkpoint (default: the HF checkpoint's)")
    return _run(_hf_to_mcore, p, argv)


def mcore_to_hf_main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="convert-mcore-to-hf",
                                description="Convert a checkpoint written by convert-hf-to-mcore back to Hugging Face format.")
    p.add_argument("--mcore-path", required=True, help="Megatron checkpoint directory written by convert-hf-to-mcore")
    _common(p)
    return _run(_mcore_to_hf, p, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(hf_to_mcore_main())
