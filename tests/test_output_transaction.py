"""The one output transaction (bridge/output.py) and the rank agreement under it (bridge/ranks.py),
on 2 torchrun ranks (gloo, CPU; no megatron): every rank writes its part, the output appears only
when every rank succeeded, and a failure on any rank (rank 0's refused output path included) is
raised on every rank — the failing rank's own error there, the others naming it — and leaves
nothing at or beside the output path."""

import json
import os
import subprocess
from pathlib import Path

from tests.cli_helpers import BIN, hidden_siblings

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_agree_on_every_outcome(tmp_path):
    (tmp_path / "not_empty").mkdir()
    (tmp_path / "not_empty" / "keep").write_text("mine")
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "dist" / "transaction_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"results{r}.json").read_text()) for r in (0, 1))

    assert r0["ok"] == r1["ok"] == "ok"
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["rank0", "rank1"]

    assert r1["rank1_fails"] == "ValueError: rank 1 cannot write"
    assert r0["rank1_fails"] == "ConversionError: writing rank1_fails failed on rank 1: ValueError: rank 1 cannot write"
    assert r0["rank0_fails"] == "ValueError: rank 0 cannot write"
    assert r1["rank0_fails"] == "ConversionError: writing rank0_fails failed on rank 0: ValueError: rank 0 cannot write"

    refused = f"{tmp_path / 'not_empty'}: output path exists and is not empty (pass --overwrite to replace it)"
    assert r0["refused"] == f"ConversionError: {refused}"
    assert r1["refused"] == f"ConversionError: writing not_empty failed on rank 0: {refused}"
    assert sorted(p.name for p in (tmp_path / "not_empty").iterdir()) == ["keep"]

    for name in ("ok", "rank1_fails", "rank0_fails", "not_empty"):
        assert hidden_siblings(tmp_path / name) == [], name
    assert not (tmp_path / "rank1_fails").exists() and not (tmp_path / "rank0_fails").exists()
    assert r0["every_rank"] == r1["every_rank"] == [0, 10]
