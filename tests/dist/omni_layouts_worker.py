"""torchrun worker: the tiny Nemotron-Omni model loaded / run / exported at parallel layouts.

    torchrun --nproc-per-node 2 tests/dist/omni_layouts_worker.py --hf HF_DIR --out OUT_DIR --cases JSON

Like `layouts_worker.py` (one launch, megatron's parallel state rebuilt between cases), for the
Omni model. The inputs are two micro-batches: one sample with two images of different grids AND an
audio clip (padded, with its mask), and one text-only sample. For each case:

* the model is built at the case's layout, filled from the HF directory (`load_hf_weights`) or from
  a Megatron checkpoint (`AutoBridge.load_megatron_model`);
* where the encoders live is recorded: on the first pipeline stage the vision encoder, vision
  projection, sound encoder and sound projection exist, on later stages the attributes are None and
  the chunk holds none of their tensors;
* fp32 logits go through megatron-core's pipeline schedule (forward_only); the forward step passes
  the multimodal inputs to the first-stage chunk only; logits are gathered over TP on the last stage
  and compared with transformers' `NemotronH_Omni_Reasoning_V3` loaded from the same HF directory;
* optionally `save_hf_pretrained` (rank 0 writes) and a bit-for-bit comparison with the source HF
  directory (rank 0), and/or `save_megatron_model` (every rank writes its shards).

Rank 0 writes OUT_DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
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
from tests.dist.layouts_worker import compare_export  # noqa: E402

SEQ = 48  # even: sequence parallel splits it over TP=2
ENCODERS = ("vision_model", "vision_projection", "sound_encoder", "sound_projection")
FIRST_STAGE_PREFIXES = ENCODERS + ("hf_extras",)
SHAPES_OF = ("vision_model.decoder.layers.0.self_attention.linear_qkv.weight", "vision_model.embedder.weight",
             "vision_projection.encoder.linear_fc1.weight", "sound_projection.encoder.linear_fc2.weight")


def build_inputs(hf_model):
    """Two micro-batches: [images of grids 4x4 and 6x4 + one padded audio clip], [text only]."""
    from bridge.tiny_models import AUDIO_TOKEN, IMAGE_TOKEN

    g = torch.Generator().manual_seed(5)
    vocab = hf_model.config.text_config.vocab_size
    grid = torch.tensor([[4, 4], [6, 4]])  # patches; 4 + 6 tokens after the 2x2 pixel shuffle
    patch = hf_model.config.vision_config.patch_size
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * patch * patch, generator=g)
    features = torch.randn(1, 40, hf_model.config.audio_config.num_mel_bins, generator=g)
    mask = torch.ones(1, 40, dtype=torch.long)
    mask[0, 30:] = 0  # padded clip
    with torch.no_grad():
        audio_count = hf_model.get_audio_features(features, mask).pooler_output.shape[0]
    image_count = int((grid.prod(-1) // 4).sum())
    ids = torch.randint(10, vocab, (2, SEQ), generator=g)
    ids[0, 3:3 + image_count] = IMAGE_TOKEN
    ids[0, 20:20 + audio_count] = AUDIO_TOKEN
    kwargs = dict(pixel_values=pixels, image_grid_hw=grid, input_features=features, input_features_mask=mask)
    return [(ids[0:1], kwargs), (ids[1:2], {})], {"image_tokens": image_count, "audio_tokens": audio_count}


def reference_logits(hf_model, micro):
    """transformers' logits of the micro-batches, and how far the multimodal sample's logits move when
    its images and audio are left out (so a model that ignored them could not pass)."""
    with torch.no_grad():
        ref = torch.cat([hf_model(input_ids=ids, use_cache=False, **kw).logits.float() for ids, kw in micro])
        text_only = hf_model(input_ids=micro[0][0], use_cache=False).logits.float()
    return ref, (ref[0:1] - text_only).abs().max().item()


def logits_via_schedule(chunks, micro):
    """Full-vocab logits [b, s, v_padded] on last-stage ranks (None elsewhere), via megatron's schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for c in chunks:
        c.eval()
    passed = []  # (pre_process of the chunk, multimodal kwargs given) per forward step

    def forward_step(data_iterator, model):
        ids, kwargs = next(data_iterator)
        position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
        first = bool(model.pre_process)
        mm = kwargs if first else {}  # the encoders exist on the first stage only
        passed.append((first, sorted(mm)))
        output = model(ids, position_ids, attention_mask=None, **mm)

        def collect(output_tensor, non_loss_data=False):
            return tensor_parallel.gather_from_tensor_model_parallel_region(output_tensor).float()

        return output, collect

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    data = [iter(micro) for _ in range(vpp)] if vpp else iter(micro)
    seq = micro[0][0].shape[1]
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=chunks, num_microbatches=len(micro),
            seq_length=seq, micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None, passed
    return torch.cat(out, dim=0), passed


def placement(bridge, chunks) -> dict:
    """Where the encoders / projections are on this rank."""
    from megatron.core import parallel_state as ps

    modules = {name: any(getattr(c, name, None) is not None for c in chunks) for name in ENCODERS}
    tensors = [k for c in chunks for k in bridge._chunk_tensors(c) if k.startswith(FIRST_STAGE_PREFIXES)]
    return {"pp_rank": ps.get_pipeline_model_parallel_rank(),
            "first_stage": ps.is_pipeline_first_stage(ignore_virtual=True),
            "pre_process": [bool(c.pre_process) for c in chunks], "modules": modules,
            "encoder_tensors": len(tensors),
            # local shapes: the vision tower and the projections are tensor-parallel like the LM
            "local_shapes": {k: list(v.shape) for c in chunks for k, v in bridge._chunk_tensors(c).items()
                             if k in SHAPES_OF}}


def run_case(case: dict, hf_dir: Path, out_dir: Path, micro, ref: torch.Tensor) -> dict:
    from megatron.core import parallel_state as ps

    from bridge import AutoBridge
    from bridge import weights as W
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
              "padded_vocab": chunks[0].language_model.vocab_size}
    # encoders: on the first stage only; the lowest rank holding each of their tensors is a first-stage rank
    places = [None] * dist.get_world_size()
    dist.all_gather_object(places, placement(bridge, chunks))
    result["placement"] = places
    where = W.owners({k: v for c in chunks for k, v in bridge._chunk_tensors(c).items()})
    first_stage_ranks = {r for r, p in enumerate(places) if p["first_stage"]}
    result["encoder_owner_ranks"] = sorted({where[k][0] for k in where if k.startswith(FIRST_STAGE_PREFIXES)})
    result["encoder_owners_on_first_stage"] = set(result["encoder_owner_ranks"]) <= first_stage_ranks
    got, passed = logits_via_schedule(chunks, micro)
    passes = [None] * dist.get_world_size()
    dist.all_gather_object(passes, passed)
    result["forward_steps"] = passes  # per rank: (first stage?, multimodal kwargs given)
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
            result["source_tensors"] = len(read_all(hf_dir))
    if case.get("save_mcore"):  # every rank writes its shards
        bridge.save_megatron_model(chunks, out_dir / case["save_mcore"],
                                   layout={k: v for k, v in sizes.items() if v is not None},
                                   target=case.get("target", "bridge"))
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

    from transformers import NemotronH_Omni_Reasoning_V3

    from bridge.ranks import ensure_process_group

    ensure_process_group()
    hf_model = NemotronH_Omni_Reasoning_V3.from_pretrained(str(args.hf), dtype=torch.float32).eval()
    micro, counts = build_inputs(hf_model)
    ref, counts["multimodal_effect"] = reference_logits(hf_model, micro)
    del hf_model
    results = []
    for case in json.loads(args.cases):
        try:
            results.append({**run_case(case, args.hf, args.out, micro, ref), **counts})
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
