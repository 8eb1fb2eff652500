"""Quick start: build a tiny NemotronH checkpoint with transformers, convert it to Megatron and back
with the two CLIs, and check the result against transformers.

    python examples/quickstart.py [--workdir DIR]

Prints the logits parity of the converted Megatron model against transformers' NemotronHForCausalLM
and whether HF -> Megatron -> HF gave back every tensor bit for bit. Exits non-zero if not.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open


def _tensors(path: Path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bridge-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("hf", "mcore", "hf_back"):
        shutil.rmtree(work / sub, ignore_errors=True)

    from bridge.tiny_models import build_hf_model, save_hf_model

    hf_model = build_hf_model(seed=0)
    save_hf_model(hf_model, work / "hf", max_shard_size="100KB")
    print(f"built a tiny NemotronH checkpoint (layers {hf_model.config.hybrid_override_pattern}) in {work / 'hf'}")

    bin_dir = Path(sys.executable).parent
    for cmd in (["convert-hf-to-mcore", "--hf-path", work / "hf", "--output", work / "mcore"],
                ["convert-mcore-to-hf", "--mcore-path", work / "mcore", "--output", work / "hf_back"]):
        print("$", " ".join(map(str, cmd)))
        subprocess.run([str(bin_dir / cmd[0]), *map(str, cmd[1:])], check=True)

    from bridge import AutoBridge

    model = AutoBridge.load_megatron_model(work / "mcore")
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, use_cache=False).logits
        got = model.eval()(ids, positions, attention_mask=None)[..., : ref.shape[-1]]
    err = (got - ref).abs().max().item()
    tol = 2e-5 * max(1.0, ref.abs().max().item())
    src, back = _tensors(work / "hf"), _tensors(work / "hf_back")
    identical = src.keys() == back.keys() and all(
        src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]) for k in src)
    print(f"text parity vs transformers: max |dlogit| = {err:.2e} (tolerance {tol:.2e}) -> {'OK' if err <= tol else 'FAIL'}")
    print(f"HF -> Megatron -> HF: {len(src)} tensors, bit-identical: {identical}")
    return 0 if (err <= tol and identical) else 1


if __name__ == "__main__":
    sys.exit(main())
