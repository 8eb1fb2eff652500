"""examples/pretrain.py, run as a script: the tiny NemotronH language model, built from the provider
with random weights, trained for 30 steps on a megatron-core indexed dataset (CPU): the loss falls
and the checkpoint is in Megatron-LM's layout."""

import re
import subprocess
import sys

import numpy as np
import torch

from tests.test_examples_finetune import REPO, env


def test_pretrain_loss_falls_on_indexed_data(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "corpus.bin"), dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(6):
        doc = rng.integers(0, 300, size=int(rng.integers(20, 60))).astype(np.int32)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(str(tmp_path / "corpus.idx"))

    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "pretrain.py"), "--preset", "tiny", "--data-path",
         str(tmp_path / "corpus"), "--steps", "30", "--lr", "3e-3", "--seq-length", "32", "--global-batch-size", "4",
         "--output", str(tmp_path / "ckpt")],
        capture_output=True, text=True, env=env(), cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loss = {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+) loss ([\d.]+)$", proc.stdout, re.M)}
    assert sorted(loss) == list(range(1, 31))
    print(f"pretrain loss: step 1 {loss[1]:.4f} -> step 30 {loss[30]:.4f}")
    assert loss[30] < 0.5 * loss[1]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "30"
    assert (tmp_path / "ckpt" / "iter_0000030" / "metadata.json").is_file()
