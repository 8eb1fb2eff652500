"""torchrun worker: load / run / export the tiny NemotronH model at several parallel layouts.

    torchrun --nproc-per-node 2 tests/dist/layouts_worker.py --hf HF_DIR --out OUT_DIR --cases JSON

One launch runs every case in turn (megatron's parallel state is torn down and rebuilt between
cases; the gloo group of the launch is kept), which keeps the suite fast. For each case:

* the model is built at the case's layout and filled from the HF directory (`load_hf_weights`) or
  from a Megatron checkpoint (`AutoBridge.load_megatron_model`);
* fp32 logits are computed through megatron-core's pipeline schedule (`get_forward_backward_func`,
  forward_only, 2 micro-batches), gathered over TP on the last stage and compared with transformers'
  `NemotronHForCausalLM` loaded from the same HF directory in this process;
* optionally the model is exported with `save_hf_pretrained` (rank 0 writes) and rank 0 compares
  every tensor of the export with the source HF checkpoint bit for bit, and/or saved as a Megatron
  checkpoint with every rank writing its shards (`save_megatron_model`).

Rank 0 writes OUT_DIR/results.json: one entry per case with the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.cli_helpers import read_all  # noqa: E402

SEQ = 22  # even (sequence parallel splits it over TP=2), not a multiple of the Mamba chunks (8, 128)


def compare_export(src: Path, out: Path) -> list:
    """Differences between two HF directories (names, files, dtypes, bytes, index, config)."""
    a, b = read_all(src), read_all(out)
    problems = []
    if sorted(a) != sorted(b):
        problems.append(f"tensor names differ: missing {sorted(set(a) - set(b))[:3]}, extra {sorted(set(b) - set(a))[:3]}")
    for name in sorted(set(a) & set(b)):
        (fa, ta), (fb, tb) = a[name], b[name]
        if fa != fb or ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(
                ta.contiguous().view(-1).view(torch.uint8), tb.contiguous().view(-1).view(torch.uint8)):
            problems.append(f"{name}: differs ({fa} {ta.dtype} {tuple(ta.shape)} vs {fb} {tb.dtype} {tuple(tb.shape)})")
    if json.loads((src / "config.json").read_text()) != json.loads((out / "config.json").read_text()):
        problems.append("config.json differs")
    index = "model.safetensors.index.json"
    if (src / index).exists() and json.loads((src / index).read_text())["weight_map"] != \
            json.loads((out / index).read_text())["weight_map"]:
        problems.append("index weight_map differs")
    return problems


def logits_via_schedule(chunks, ids: torch.Tensor):
    """Full-vocab logits [b, s, v_padded] on last-stage ranks (None elsewhere), via megatron's schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for c in chunks:
        c.eval()
    micro = [ids[i:i + 1] for i in range(ids.shape[0])]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        position_ids = torch.arange(batch.shape[1]).unsqueeze(0)
        output = model(batch, position_ids, attention_mask=None)

        def collect(output_tensor, non_loss_data=False):
            return tensor_parallel.gather_from_tensor_model_parallel_region(output_tensor).float()

        return output, collect

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    data = [iter(micro) for _ in range(vpp)] if vpp else iter(micro)
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=chunks, num_microbatches=len(micro),
            seq_length=ids.shape[1], micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(out, dim=0)


def run_case(case: dict, hf_dir: Path, out_dir: Path, ids: torch.Tensor, ref: torch.Tensor) -> dict:
    from megatron.core import parallel_state as ps

    from bridge import AutoBridge
    from bridge.parallel import build_model, ensure_parallel_state, layout

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    sizes = {k: case.get(k) for k in ("tp", "pp", "ep", "etp", "vpp")}
    ensure_parallel_state(**{k: (v if v is not None else (1 if k in ("tp", "pp", "ep") else None))
                             for k, v in sizes.items()})
    t0 = time.time()
    if case["source"] == "hf":
        bridge = AutoBridge.from_hf_pretrained(hf_dir)
        provider = bridge.to_megatron_provider()
        provider.perform_initialization = False
        chunks = build_model(provider)
        bridge.load_hf_weights(chunks)
    else:
        src = out_dir / case["source"]
        bridge = AutoBridge.from_megatron_checkpoint(src)
        model = AutoBridge.load_megatron_model(src)
        chunks = model if isinstance(model, list) else [model]
    result = {"name": case["name"], "layout": layout(), "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
              "sequence_parallel": chunks[0].config.sequence_parallel, "chunks": len(chunks),
              "padded_vocab": chunks[0].vocab_size}
    got = logits_via_schedule(chunks, ids)
    err = None
    if got is not None:
        result["logits_shape"] = list(got.shape)
        err = (got[..., :ref.shape[-1]] - ref).abs().max().item()
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, err)
    result["max_abs_err"] = max(e for e in errors if e is not None)
    result["ranks_with_logits"] = sum(e is not None for e in errors)
    result["tolerance"] = 2e-5 * max(1.0, ref.abs().max().item())
    if case.get("export"):
        dest = out_dir / f"export_{case['name']}"
        bridge.save_hf_pretrained(chunks, dest)
        if dist.get_rank() == 0:
            result["export_problems"] = compare_export(hf_dir, dest)
            result["export_tensors"] = len(read_all(dest))
    if case.get("save_mcore"):
        bridge.save_megatron_model(chunks, out_dir / case["save_mcore"],
                                   layout={k: v for k, v in sizes.items() if v is not None})
        result["saved_mcore"] = case["save_mcore"]
    result["seconds"] = round(time.time() - t0, 2)
    dist.barrier()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cases", required=True, help="JSON list of cases")
    args = parser.parse_args()

    from transformers import NemotronHForCausalLM

    from bridge.ranks import ensure_process_group

    ensure_process_group()
    hf_model = NemotronHForCausalLM.from_pretrained(str(args.hf), dtype=torch.float32).eval()
    ids = torch.randint(0, hf_model.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf_model(input_ids=ids, use_cache=False).logits.float()
    results = []
    for case in json.loads(args.cases):
        try:
            results.append(run_case(case, args.hf, args.out, ids, ref))
        except Exception as e:  # noqa: BLE001 - recorded for the test to report
            traceback.print_exc()
            results.append({"name": case["name"], "error": f"{type(e).__name__}: {e}"})
            break  # the ranks may be out of step now
        if dist.get_rank() == 0:
            print(json.dumps(results[-1]), flush=True)
    if dist.get_rank() == 0:
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
