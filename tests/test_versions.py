"""Supported and tested versions: the table in conversion/versions.py equals the lock files CI
installs, and importing the package says so (one line) when an installed version is untested, or
refuses (ImportError) when it cannot work. The import checks run in a fresh interpreter that finds
a stand-in distribution's metadata (a `*.dist-info` directory) first on its path, as
`importlib.metadata` would find another installed version."""

import re
import subprocess
import sys
from pathlib import Path

from conversion.versions import MINIMUM, TESTED, check, installed

REPO = Path(__file__).resolve().parents[1]


def _locked(path: Path) -> dict:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_tested_versions_are_the_lock_files():
    locks = {"3.11": _locked(REPO / "constraints/py311.txt"), "3.12": _locked(REPO / "constraints/py312.txt")}
    assert set(TESTED["python"]) == set(locks)
    for name in ("torch", "megatron-core", "transformers"):
        assert {v.split("+")[0] for v in (lock[name] for lock in locks.values())} == set(TESTED[name]), name


def test_this_environment_is_a_tested_one():
    """CI's locked legs run exactly the tested versions (leg 3 runs the newest admitted ones with
    BRIDGE_UNTESTED_VERSIONS=ok and does not run this file)."""
    errors, warnings = check(installed())
    assert errors == [] and warnings == []


def test_pyproject_ranges_admit_the_tested_versions_and_start_at_the_minimum():
    text = (REPO / "pyproject.toml").read_text()
    for name in ("torch", "megatron-core", "transformers"):
        m = re.search(rf'"{name}>=([0-9.]+),<([0-9.]+)"', text)
        assert m, f"{name}: no bounded range in pyproject.toml"
        low, high = m.groups()
        assert low == MINIMUM[name]
        for version in TESTED[name]:
            as_tuple = tuple(int(x) for x in version.split("."))
            assert tuple(int(x) for x in low.split(".")) <= as_tuple < tuple(int(x) for x in high.split("."))


def test_check_is_silent_on_tested_versions_warns_on_others_refuses_too_old():
    tested = {"python": "3.12", "torch": "2.13.0+cpu", "megatron-core": "0.19.2", "transformers": "5.24.0"}
    assert check(tested) == ([], [])
    errors, warnings = check({**tested, "megatron-core": "0.18.0", "python": "3.13"})
    assert errors == [] and len(warnings) == 1
    assert "megatron-core 0.18.0" in warnings[0] and "python 3.13" in warnings[0]
    errors, _ = check({**tested, "transformers": "5.22.1"})
    assert errors == ["transformers 5.22.1 is too old: nemotron-omni-bridge needs transformers >= 5.23 "
                      "(tested: 5.24.0)"]
    assert check({**tested, "megatron-core": None}) == ([], [])  # absent: nothing to say here


def _import_with(tmp_path, dist: str, version: str, env_extra=None):
    site = tmp_path / "site"
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    code = f"import sys; sys.path.insert(0, {str(site)!r}); import conversion; print('imported')"
    env = {"PATH": "/usr/bin:/bin", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)


def test_import_says_one_line_for_an_untested_version(tmp_path):
    r = _import_with(tmp_path, "megatron-core", "0.18.0")
    assert r.returncode == 0 and r.stdout.strip() == "imported"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: nemotron-omni-bridge was not tested with megatron-core 0.18.0")
    quiet = _import_with(tmp_path / "q", "megatron-core", "0.18.0", {"BRIDGE_UNTESTED_VERSIONS": "ok"})
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_import_refuses_a_version_that_cannot_work(tmp_path):
    r = _import_with(tmp_path, "megatron-core", "0.15.0")
    assert r.returncode != 0 and "imported" not in r.stdout
    assert r.stderr.strip().splitlines()[-1] == (
        "ImportError: megatron-core 0.15.0 is too old: nemotron-omni-bridge needs megatron-core >= 0.16.1 "
        f"(tested: {', '.join(TESTED['megatron-core'])})")
