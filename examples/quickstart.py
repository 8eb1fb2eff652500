"""Quick start: build a tiny Nemotron-Omni checkpoint with transformers (random weights, nothing is
downloaded), convert it to Megatron and back with the two CLIs, run the converted Megatron model on
text, an image and audio, and compare with transformers.

    python examples/quickstart.py [--workdir DIR]

Prints max |dlogit| per modality against transformers' NemotronH_Omni_Reasoning_V3 and whether
HF -> Megatron -> HF gave back every tensor bit for bit. Exits non-zero if either check fails.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open


def _tensors(path: Path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _probes(hf_model):
    """(modality, transformers kwargs) with placeholder tokens where the features go."""
    from bridge.tiny_models import AUDIO_TOKEN, IMAGE_TOKEN

    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, hf_model.config.text_config.vocab_size, (1, 40), generator=g)
    image, audio = text.clone(), text.clone()
    image[0, 3:7] = IMAGE_TOKEN  # a 16x16-pixel image: 4x4 patches -> 4 tokens after the 2x2 pixel shuffle
    audio[0, 3:8] = AUDIO_TOKEN  # 40 mel frames -> 5 tokens after 8x subsampling
    return [
        ("text", dict(input_ids=text)),
        ("image", dict(input_ids=image, pixel_values=torch.randn(16, 48, generator=g),
                       image_grid_hw=torch.tensor([[4, 4]]))),
        ("audio", dict(input_ids=audio, input_features=torch.randn(1, 40, 16, generator=g),
                       input_features_mask=torch.ones(1, 40, dtype=torch.long))),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # megatron's import-time notes about missing GPU packages
    logging.getLogger("megatron").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bridge-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("hf", "mcore", "hf_back"):
        shutil.rmtree(work / sub, ignore_errors=True)

    from bridge.tiny_models import build_hf_omni_model, save_hf_model

    hf_model = build_hf_omni_model(seed=0)
    save_hf_model(hf_model, work / "hf", max_shard_size="200KB")
    print(f"built a tiny Nemotron-Omni checkpoint (RADIO + Parakeet + NemotronH "
          f"{hf_model.config.text_config.hybrid_override_pattern}) in {work / 'hf'}")

    bin_dir = Path(sys.executable).parent
    for cmd in (["convert-hf-to-mcore", "--hf-path", work / "hf", "--output", work / "mcore"],
                ["convert-mcore-to-hf", "--mcore-path", work / "mcore", "--output", work / "hf_back"]):
        print("$", " ".join(map(str, cmd)), flush=True)
        subprocess.run([str(bin_dir / cmd[0]), *map(str, cmd[1:])], check=True)

    from bridge import AutoBridge

    model = AutoBridge.load_megatron_model(work / "mcore").eval()
    ok = True
    print(f"\n{'modality':<10}{'max |dlogit|':>14}{'tolerance':>12}")
    for modality, kwargs in _probes(hf_model):
        with torch.no_grad():
            ref = hf_model.eval()(**kwargs, use_cache=False).logits
            inputs = dict(kwargs)
            got = model(inputs.pop("input_ids"), **inputs)[..., : ref.shape[-1]]
        err = (got - ref).abs().max().item()
        tol = 2e-5 * max(1.0, ref.abs().max().item())
        ok &= err <= tol
        print(f"{modality:<10}{err:>14.2e}{tol:>12.2e}  {'OK' if err <= tol else 'FAIL'}")
    src, back = _tensors(work / "hf"), _tensors(work / "hf_back")
    identical = src.keys() == back.keys() and all(
        src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]) for k in src)
    print(f"\nHF -> Megatron -> HF: {len(src)} tensors, bit-identical: {identical}")
    return 0 if (ok and identical) else 1


if __name__ == "__main__":
    sys.exit(main())
