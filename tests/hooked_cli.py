"""Run one of the project's console scripts with the tests' hooks installed.

    python -m tests.hooked_cli [--pause POINT:MARKER[:GO]] [--free-bytes N] CLI [ARGS...]

The library only calls its hooks (`conversion.output_dir.hooks`) and reads no test setting from the
environment; this entry point replaces them, then runs the console script CLI (its entry point, as
installed: `convert-hf-to-mcore`, ...) with ARGS, exactly as the script would.

`--pause POINT:MARKER[:GO]`: at POINT (`before-rename`: the output is complete in its temporary
directory; `mid-export`: the export has written its first tensor) create the file MARKER (holding
the pid) and wait, up to 10 minutes or until the file GO exists, so that the test can kill or
interrupt the process there, or run another one meanwhile. `--free-bytes N`: the disk-space check
sees N free bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Optional


def pause_at(spec: str) -> Callable[[str], None]:
    """The pause hook of `--pause POINT:MARKER[:GO]`."""
    point, marker, go = (spec.split(":", 2) + [""])[:3]

    def pause(at: str) -> None:
        if at != point:
            return
        Path(marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not (go and Path(go).exists()):
            time.sleep(0.05)

    return pause


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.hooked_cli")
    p.add_argument("--pause", metavar="POINT:MARKER[:GO]")
    p.add_argument("--free-bytes", type=int, metavar="N")
    p.add_argument("cli", help="console script name, e.g. convert-hf-to-mcore")
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)

    from conversion.output_dir import hooks

    if args.pause:
        hooks.pause = pause_at(args.pause)
    if args.free_bytes is not None:
        hooks.free_bytes = lambda directory: args.free_bytes
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == args.cli]
    return script.load()(args.args)


if __name__ == "__main__":
    sys.exit(main())
