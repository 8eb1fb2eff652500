"""The README's first quick-start command runs and reports every check as passing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for modality in ("text", "image", "audio"):
        assert any(line.startswith(modality) and line.endswith("OK") for line in proc.stdout.splitlines()), proc.stdout
    assert "bit-identical: True" in proc.stdout


def _readme_python_api_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    return section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]


@pytest.mark.parametrize("kind", ["text", "omni"])
def test_readme_python_api_snippet_runs_as_written(tmp_path, kind):
    """README's "Python API" block, in a fresh interpreter (no parallel state), on a text and an Omni
    checkpoint: only the placeholder paths are replaced."""
    from bridge.tiny_models import build_hf_model, build_hf_omni_model, save_hf_model
    from tests.cli_helpers import run_cli

    hf_dir = save_hf_model(build_hf_omni_model(seed=3) if kind == "omni" else build_hf_model(seed=3), tmp_path / "hf")
    r = run_cli("convert-hf-to-mcore", "--hf-path", hf_dir, "--output", tmp_path / "mcore_dir", "--quiet")
    assert r.returncode == 0, r.stderr
    snippet = _readme_python_api_snippet().replace('"path/to/hf_dir"', repr(str(hf_dir)))
    proc = subprocess.run([sys.executable, "-c", snippet + "\nprint('snippet ok')"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("snippet ok"), proc.stderr[-3000:]
    assert (tmp_path / "out_hf" / "config.json").is_file()
