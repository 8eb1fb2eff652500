"""The README's first quick-start command runs and reports every check as passing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for modality in ("text", "image", "audio"):
        assert any(line.startswith(modality) and line.endswith("OK") for line in proc.stdout.splitlines()), proc.stdout
    assert "bit-identical: True" in proc.stdout
