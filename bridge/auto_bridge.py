"""`AutoBridge`: the public entry point (HF directory <-> megatron model <-> Megatron checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from conversion import hf_config
from conversion.errors import ConversionError
from conversion.nemotron_h import Rule, language_model_rules
from conversion.safetensors_io import (
    INDEX_NAME, PICKLE_NAMES, HFCheckpoint, atomic_output_dir, dtype_from_name, dtype_name, plan_shards,
    write_hf_weights,
)
from conversion.transforms import Dims, to_hf, to_megatron
from bridge import weights as W
from bridge.parallel import ensure_parallel_state

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_SHARD_BYTES = 5 * 1024**3


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name == INDEX_NAME or name in PICKLE_NAMES


class AutoBridge:
    """Bridge for one HF model: its config, its weights (read lazily) and its non-weight assets."""

    def __init__(self, config: hf_config.HFModelConfig, hf_dir: Optional[Path] = None,
                 manifest: Optional[Dict[str, dict]] = None, assets_dir: Optional[Path] = None):
        self.config = config
        self.hf_dir = hf_dir
        self.assets_dir = assets_dir if assets_dir is not None else hf_dir
        self._checkpoint: Optional[HFCheckpoint] = None
        self._manifest = manifest

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_pretrained(cls, path: str | Path) -> "AutoBridge":
        path = Path(path)
        if not path.exists():
            raise ConversionError(f"{path}: input path does not exist (expected a local Hugging Face model directory)")
        return cls(hf_config.load_config(path), hf_dir=path)

    @property
    def checkpoint(self) -> HFCheckpoint:
        if self._checkpoint is None:
            if self.hf_dir is None:
                raise ConversionError("this bridge has no HF weights (it was made from a Megatron checkpoint)")
            self._checkpoint = HFCheckpoint(self.hf_dir)
            self._check_names(self._checkpoint.keys())
        return self._checkpoint

    @property
    def manifest(self) -> Dict[str, dict]:
        """name -> {file, dtype, shape} of the source HF checkpoint."""
        if self._manifest is None:
            self._manifest = self.checkpoint.manifest()
        return self._manifest

    # ------------------------------------------------------------------ tables
    def rules(self) -> List[Rule]:
        text = self.config.text
        return language_model_rules(text["_pattern"], text.get("n_routed_experts"),
                                    bool(text.get("tie_word_embeddings")))

    def hf_names(self) -> List[str]:
        p = self.config.lm_prefix
        return [p + h for rule in self.rules() for h in rule.hf]

    def _check_names(self, names) -> None:
        """Strictness before any work: every HF tensor maps somewhere, every mapped tensor exists."""
        expected = self.hf_names()
        present = set(names)
        missing = [n for n in expected if n not in present]
        if missing:
            raise ConversionError(f"{self.hf_dir}: missing tensor {missing[0]!r}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unexpected = sorted(present - set(expected))
        if unexpected:
            raise ConversionError(f"{self.hf_dir}: unexpected tensor {unexpected[0]!r} maps to no Megatron parameter"
                                  + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))

    # ------------------------------------------------------------------ provider
    def default_dtype(self) -> torch.dtype:
        """The dtype of the HF weights (embedding), else the config's `dtype`, else bf16."""
        has_weights = self._manifest is not None or (
            self.hf_dir is not None and any(self.hf_dir.glob("*.safetensors")))
        if has_weights:
            return dtype_from_name(self.manifest[self.hf_names()[0]]["dtype"])
        name = self.config.text.get("dtype") or self.config.text.get("torch_dtype") or "bfloat16"
        return DTYPES.get(name, torch.bfloat16)

    def provider_fields(self) -> Dict[str, Any]:
        return hf_config.provider_fields(self.config)

    def to_megatron_provider(self, dtype: Optional[torch.dtype] = None):
        from providers import NemotronHModelProvider

        if self.config.kind != "nemotron_h":
            raise ConversionError("Nemotron-Omni checkpoints are not supported yet (text-only NemotronH is)")
        dtype = dtype or self.default_dtype()
        provider = NemotronHModelProvider(**self.provider_fields())
        provider.params_dtype = dtype
        provider.bf16 = dtype == torch.bfloat16
        provider.fp16 = dtype == torch.float16
        return provider

    # ------------------------------------------------------------------ HF -> megatron
    @staticmethod
    def _language_model(chunk: torch.nn.Module) -> torch.nn.Module:
        return getattr(chunk, "language_model", chunk)

    def _dims(self, lm: torch.nn.Module) -> Dims:
        c = lm.config
        return Dims(
            vocab_size=self.config.text["vocab_size"], padded_vocab_size=lm.vocab_size,
            num_attention_heads=c.num_attention_heads, num_query_groups=c.num_query_groups or c.num_attention_heads,
            kv_channels=c.kv_channels, mamba_num_heads=c.mamba_num_heads or 0, mamba_head_dim=c.mamba_head_dim,
            mamba_num_groups=c.mamba_num_groups, mamba_state_dim=c.mamba_state_dim,
        )

    def load_hf_weights(self, model) -> None:
        """Fill every parameter of `model` (this rank's part) from the HF checkpoint. Strict."""
        checkpoint = self.checkpoint
        rules = {r.megatron: r for r in self.rules()}
        tied = bool(self.config.text.get("tie_word_embeddings"))
        p = self.config.lm_prefix
        for chunk in W.model_chunks(model):
            lm = self._language_model(chunk)
            dims = self._dims(lm)
            for name, tensor in W.canonical_names(lm).items():
                if tied and name == "output_layer.weight":  # last-stage copy of the tied embedding
                    name = "embedding.word_embeddings.weight"
                rule = rules.get(name)
                if rule is None:
                    raise ConversionError(f"megatron parameter {name!r} has no HF source in the name table")
                hf_names = [p + h for h in rule.hf]
                try:
                    full = to_megatron(rule.kind, [checkpoint.get(n) for n in hf_names], dims)
                except ConversionError:
                    raise
                except Exception as e:  # noqa: BLE001 - reshape errors from wrong shapes
                    shapes = [tuple(checkpoint.shape(n)) for n in hf_names]
                    raise ConversionError(f"{', '.join(hf_names)}: shapes {shapes} do not fit the config ({e})") from None
                W.load_into(tensor, rule.kind, full, dims, ", ".join(hf_names))

    # ------------------------------------------------------------------ megatron -> HF
    def export_hf_weights(self, model, cast_to_hf_dtype: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield (HF name, full tensor) for every tensor of the HF checkpoint, in table order.

        Tensors are gathered over tensor / expert-tensor parallel ranks. Dtypes are those of the
        source HF checkpoint when known (so a round trip is bit-exact), else the parameters' own.
        """
        chunks = W.model_chunks(model)
        if len(chunks) > 1 or parallel_state.get_pipeline_model_parallel_world_size() > 1 \
                or parallel_state.get_expert_model_parallel_world_size() > 1:
            raise NotImplementedError("export under pipeline or expert parallelism is not implemented yet")
        lm = self._language_model(chunks[0])
        dims = self._dims(lm)
        local = W.canonical_names(lm)
        tied = bool(self.config.text.get("tie_word_embeddings"))
        manifest = self._manifest_or_none()
        p = self.config.lm_prefix
        for rule in self.rules():
            tensor = local.get(rule.megatron)
            if tensor is None:
                raise ConversionError(f"megatron model has no parameter {rule.megatron!r} to export")
            full = W.gather_full(tensor, rule.kind, dims)
            for name, out in zip(rule.hf, to_hf(rule.kind, full, dims)):
                name = p + name
                if cast_to_hf_dtype and manifest and name in manifest:
                    out = out.to(dtype_from_name(manifest[name]["dtype"]))
                yield name, out

    def _manifest_or_none(self) -> Optional[Dict[str, dict]]:
        if self._manifest is not None:
            return self._manifest
        return self.manifest if self.hf_dir is not None else None

    def export_config(self, model) -> Dict[str, Any]:
        """config.json for `model` in the scheme the source used, values taken from the model."""
        lm = self._language_model(W.model_chunks(model)[0])
        c = lm.config
        fields = {name: getattr(c, name) for _, name in hf_config.TEXT_FIELDS if hasattr(c, name)}
        fields["hybrid_override_pattern"] = c.hybrid_override_pattern
        fields["vocab_size"] = self.config.text["vocab_size"]
        # Only the fields this model kind has (a dense model carries no MoE sizes).
        fields = {k: v for k, v in fields.items() if k in self.provider_fields()}
        return hf_config.export_config(self.config, fields)

    def save_hf_pretrained(self, model, path: str | Path, overwrite: bool = False) -> None:
        """Write config.json, the safetensors weights (+ index) and the non-weight assets."""
        path = Path(path)
        tensors = self.export_hf_weights(model)
        if dist.is_initialized() and dist.get_rank() != 0:
            for _ in tensors:  # take part in the collectives, write nothing
                pass
            return
        manifest = self._manifest_or_none()
        if manifest:
            weight_map = {n: manifest[n]["file"] for n in self.hf_names()}
        else:
            weight_map = None
        with atomic_output_dir(path, overwrite=overwrite) as tmp:
            self._copy_assets(tmp)
            (tmp / "config.json").write_text(json.dumps(self.export_config(model), indent=2) + "\n")
            if weight_map is None:
                materialised = list(tensors)
                weight_map = plan_shards([(n, t.numel() * t.element_size()) for n, t in materialised], MAX_SHARD_BYTES)
                tensors = iter(materialised)
            write_hf_weights(tmp, tensors, weight_map)

    def _copy_assets(self, dest: Path) -> None:
        """Copy the non-weight files of the source (tokenizer, generation config, ...)."""
        if self.assets_dir is None:
            return
        for src in sorted(self.assets_dir.rglob("*")):
            rel = src.relative_to(self.assets_dir)
            if src.is_dir() or _is_weight_file(src.name) or rel.as_posix() == "config.json":
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)

    # ------------------------------------------------------------------ Megatron checkpoints
    def save_megatron_model(self, model, path: str | Path, layout: Optional[Dict[str, Any]] = None,
                            overwrite: bool = False) -> None:
        from bridge import checkpoint

        meta = {
            "hf_config": self.config.raw,
            "provider_fields": self.provider_fields(),
            "params_dtype": dtype_name(W.model_chunks(model)[0].config.params_dtype),
            "hf_manifest": self.manifest,
            "layout": layout or {},
        }
        checkpoint.save(model, Path(path), meta, self.assets_dir, overwrite=overwrite,
                        is_asset=lambda p: not _is_weight_file(p.name))

    @classmethod
    def from_megatron_checkpoint(cls, path: str | Path) -> "AutoBridge":
        from bridge import checkpoint

        path = Path(path)
        meta = checkpoint.read_meta(path)
        cfg = hf_config.parse_config(meta["hf_config"], f"{path}/{checkpoint.META_NAME}: hf_config")
        return cls(cfg, hf_dir=None, manifest=meta["hf_manifest"], assets_dir=path / checkpoint.ASSETS_DIR)

    @staticmethod
    def load_megatron_model(path: str | Path, **layout):
        """Rebuild the model recorded in a converted checkpoint and load its weights."""
        from bridge import checkpoint

        path = Path(path)
        bridge = AutoBridge.from_megatron_checkpoint(path)
        meta = checkpoint.read_meta(path)
        ensure_parallel_state(**layout)
        provider = bridge.to_megatron_provider(dtype=dtype_from_name(meta["params_dtype"]))
        model = provider.provide()
        checkpoint.load(model, path)
        return model
