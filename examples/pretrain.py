"""Pretraining of the NemotronH language model from scratch (no HF checkpoint), from the bridge's
provider, with megatron-core's training machinery (the same loop as finetune.py).

    python examples/pretrain.py --preset tiny --synthetic --steps 30
    python examples/pretrain.py --preset tiny --data-path data/my_corpus_text_document --steps 100 --output ckpt
    torchrun --nproc-per-node 2 examples/pretrain.py --preset tiny --synthetic --tp 2

Model: `NemotronHModelProvider` (a megatron-core `TransformerConfig`), sizes from `--preset`
(`tiny`: the 8-layer `M*-EM*E-` model of the tests, 64 hidden, 4 experts, vocab 300;
`nemotron-3-nano-30b-a3b`: the provider's defaults, the released language model) and any size flag
(`--hybrid-override-pattern`, `--hidden-size`, ...), randomly initialised by megatron-core.

Data: `--synthetic` (`--synthetic-samples` random sequences, repeated: the model memorises them)
or `--data-path PREFIX`, a megatron-core indexed dataset (`PREFIX.bin` / `PREFIX.idx`, as written by
Megatron-LM's `tools/preprocess_data.py` or `IndexedDatasetBuilder`): the documents are read in
order as one token stream cut into `--seq-length + 1` windows (no shuffling, no blending, no EOD
handling: Megatron-LM's `GPTDataset` does those for real runs). The loss covers every token.

Training: megatron-core DDP + `get_megatron_optimizer` + `get_forward_backward_func` +
`finalize_model_grads`; checkpoints in Megatron-LM's layout (`OUTPUT/iter_NNNNNNN`, tracker file) with
model and optimizer state, `--resume`. One line per step: `step N loss X`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet  # noqa: E402
from conversion.dtypes import dtype_from_name  # noqa: E402
from finetune import TRACKER, add_training_args, check_training_args, configure_provider, init_parallel, train  # noqa: E402

PRESETS = {
    "tiny": dict(hybrid_override_pattern="M*-EM*E-", hidden_size=64, vocab_size=300, ffn_hidden_size=96,
                 num_attention_heads=4, num_query_groups=2, kv_channels=16, mamba_num_heads=8, mamba_head_dim=8,
                 mamba_num_groups=2, mamba_state_dim=16, num_moe_experts=4, moe_router_topk=2,
                 moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=48,
                 moe_router_topk_scaling_factor=2.5),
    "nemotron-3-nano-30b-a3b": {},  # the provider's defaults
}
SIZE_FLAGS = {  # flag -> (provider field, type)
    "hybrid-override-pattern": str, "hidden-size": int, "ffn-hidden-size": int, "num-attention-heads": int,
    "num-query-groups": int, "kv-channels": int, "mamba-num-heads": int, "mamba-head-dim": int,
    "mamba-num-groups": int, "mamba-state-dim": int, "num-moe-experts": int, "moe-router-topk": int,
    "moe-ffn-hidden-size": int, "moe-shared-expert-intermediate-size": int, "vocab-size": int,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for flag, kind in SIZE_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, default=None)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--synthetic", action="store_true", help="random token sequences (no files)")
    data.add_argument("--data-path", help="megatron-core indexed dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--synthetic-samples", type=int, default=8)
    add_training_args(p)
    args = p.parse_args(argv)
    check_training_args(p, args)
    return args


def build_provider(args):
    from providers import NemotronHModelProvider

    fields = dict(PRESETS[args.preset])
    for flag in SIZE_FLAGS:
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            fields[flag.replace("-", "_")] = value
    if "hybrid_override_pattern" in fields:
        fields["num_layers"] = len(fields["hybrid_override_pattern"])
    provider = NemotronHModelProvider(**fields)
    dtype = dtype_from_name(args.dtype) if args.dtype else (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    provider.params_dtype = dtype
    provider.bf16, provider.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    configure_provider(provider, args)
    return provider


def _sample(tokens: torch.Tensor) -> dict:
    return dict(tokens=tokens[:-1], labels=tokens[1:], loss_mask=torch.ones(tokens.shape[0] - 1))


class IndexedTokenWindows:
    """Windows of seq_length+1 tokens over the documents of an indexed dataset, in order (each window
    overlaps the next by one token, as Megatron-LM's GPTDataset samples)."""

    def __init__(self, prefix: str, seq_length: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.data = IndexedDataset(prefix)
        self.seq = seq_length
        self.starts = np.concatenate([[0], np.cumsum(self.data.sequence_lengths)])
        self.total = int(self.starts[-1])
        if self.total < seq_length + 1:
            raise SystemExit(f"error: {prefix}: {self.total} tokens, fewer than --seq-length + 1 = {seq_length + 1}")

    def __len__(self):
        return (self.total - 1) // self.seq

    def __getitem__(self, i: int) -> dict:
        begin, end, parts = i * self.seq, i * self.seq + self.seq + 1, []
        doc = int(np.searchsorted(self.starts, begin, side="right")) - 1
        while begin < end:
            offset = begin - int(self.starts[doc])
            take = min(end - begin, int(self.data.sequence_lengths[doc]) - offset)
            parts.append(self.data.get(doc, offset=offset, length=take))
            begin += take
            doc += 1
        return _sample(torch.from_numpy(np.concatenate(parts).astype(np.int64)))


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    layout = init_parallel(args)
    torch.manual_seed(args.seed)
    provider = build_provider(args)
    if args.synthetic:
        g = torch.Generator().manual_seed(args.seed)
        samples = [_sample(torch.randint(0, provider.vocab_size, (args.seq_length + 1,), generator=g))
                   for _ in range(args.synthetic_samples)]
    else:
        samples = IndexedTokenWindows(args.data_path, args.seq_length)
    args.resume_found = bool(args.resume and (Path(args.output) / TRACKER).is_file())
    return train(args, None, provider, samples, layout)


if __name__ == "__main__":
    sys.exit(main())
