"""`AutoBridge`: the public entry point (HF directory <-> megatron model <-> Megatron checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from conversion import hf_config, omni, registry
from conversion.errors import ConversionError
from conversion.hf_paths import resolve_hf_path
from conversion.dtypes import FLAGS, dtype_from_name, dtype_name
from conversion.hf_writer import MAX_SHARD_BYTES, plan_shards, write_config_and_assets, write_hf_weights
from conversion.mappings import Dims, Mapping
from conversion.naming import DEFAULT_TARGET, TARGETS
from conversion.safetensors_io import HFCheckpoint
from bridge import parallel  # noqa: F401 - registers the parallel-state setup that provide() runs
from bridge import weights as W
from bridge.output import output_transaction
from bridge.ranks import world



class AutoBridge:
    """Bridge for one HF model: its config, its weights (read lazily) and its non-weight assets."""

    def __init__(self, config: hf_config.HFModelConfig, hf_dir: Optional[Path] = None,
                 manifest: Optional[Dict[str, dict]] = None, assets_dir: Optional[Path] = None):
        self.config = config
        self.hf_dir = hf_dir
        self.assets_dir = assets_dir if assets_dir is not None else hf_dir
        self._checkpoint: Optional[HFCheckpoint] = None
        self._manifest = manifest
        self._mappings: Optional[List[Mapping]] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_pretrained(cls, path: str | Path, config: Optional[hf_config.HFModelConfig] = None,
                           checkpoint: Optional[HFCheckpoint] = None) -> "AutoBridge":
        """The bridge of a local HF directory; `config` / `checkpoint`: that directory's, already
        loaded and opened (the CLI's preflight reads them before megatron is imported)."""
        path = resolve_hf_path(path)  # a local directory, or a hub id in the hub cache (offline)
        bridge = cls(config or hf_config.load_config(path), hf_dir=path)
        if checkpoint is not None:
            bridge._checkpoint = checkpoint
            bridge._check_source(checkpoint)
        return bridge

    @property
    def checkpoint(self) -> HFCheckpoint:
        if self._checkpoint is None:
            if self.hf_dir is None:
                raise ConversionError("this bridge has no HF weights (it was made from a Megatron checkpoint)")
            self._checkpoint = HFCheckpoint(self.hf_dir)
            self._check_source(self._checkpoint)
        return self._checkpoint

    @property
    def manifest(self) -> Dict[str, dict]:
        """name -> {file, dtype, shape} of the source HF checkpoint."""
        if self._manifest is None:
            self._manifest = self.checkpoint.manifest()
        return self._manifest

    # ------------------------------------------------------------------ the registry
    def mappings(self) -> List[Mapping]:
        """Every mapping of this model (`conversion.registry`), with full names: HF names as in the
        files, Megatron names relative to a model chunk (`language_model.` first for the Omni model)."""
        if self._mappings is None:
            present = self.manifest if self._has_weights() else None  # decides only the optional tensors
            self._mappings = registry.mappings(self.config, present)
        return self._mappings

    def omni_fields(self) -> Dict[str, Any]:
        return omni.omni_provider_fields(self.config.raw, self.config.scheme, "config.json")

    def _has_weights(self) -> bool:
        return self._manifest is not None or (self.hf_dir is not None and any(self.hf_dir.glob("*.safetensors")))

    def hf_names(self) -> List[str]:
        return [h for m in self.mappings() for h in m.hf]

    def _check_source(self, ckpt: HFCheckpoint) -> None:
        """Strictness before any work: the HF files hold exactly the registry's tensors, with its
        shapes and dtypes (from the headers)."""
        from conversion import preflight

        names = ckpt.keys()
        self._mappings = registry.mappings(self.config, names)
        preflight.check_tensors(str(self.hf_dir), {n: ckpt.shape(n) for n in names}, {n: ckpt.dtype(n) for n in names},
                                self._mappings, files=ckpt.weight_map)

    # ------------------------------------------------------------------ provider
    def default_dtype(self) -> torch.dtype:
        """The dtype of the HF weights (embedding), else the config's `dtype`, else bf16."""
        if self._has_weights():
            return dtype_from_name(self.manifest[self.hf_names()[0]]["dtype"])
        name = self.config.text.get("dtype") or self.config.text.get("torch_dtype") or "bfloat16"
        # a parameter dtype: one a --dtype flag names (else bf16)
        return dtype_from_name(name) if FLAGS.get(name, name) in FLAGS.values() else torch.bfloat16

    def provider_fields(self) -> Dict[str, Any]:
        return hf_config.provider_fields(self.config)

    def to_megatron_provider(self, dtype: Optional[torch.dtype] = None):
        from providers import NemotronHModelProvider
        from providers.omni_provider import NemotronOmniModelProvider

        dtype = dtype or self.default_dtype()
        if self.config.kind == "nemotron_h":
            provider = NemotronHModelProvider(**self.provider_fields())
        else:
            provider = NemotronOmniModelProvider(**self.provider_fields(), **self.omni_fields(),
                                                 carried_tensors=self.tensor_structure(omni.CARRIED_PREFIX, dtype))
        provider.params_dtype = dtype
        provider.bf16 = dtype == torch.bfloat16
        provider.fp16 = dtype == torch.float16
        return provider

    def tensor_structure(self, megatron_prefix: str, dtype: torch.dtype) -> Dict[str, dict]:
        """HF name -> {shape, dtype} of the mappings under `megatron_prefix` (the carried tensors, the
        Parakeet encoder): the registry's shapes; the source's dtypes when known, else int64 for the
        integer tensors and `dtype` for the others."""
        manifest = self._manifest_or_none() or {}
        return {m.hf[0]: {"shape": list(m.shapes[0][0]),
                          "dtype": manifest.get(m.hf[0], {}).get("dtype", "int64" if m.integer else dtype_name(dtype))}
                for m in self.mappings() if m.megatron.startswith(megatron_prefix)}

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
            vision_num_heads=getattr(c, "vision_num_attention_heads", 0),
        )

    def _chunk_tensors(self, chunk: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """canonical name -> tensor of one model chunk: the language model's canonical names
        (global layer / expert indices) under `language_model.` for the Omni model, plus the state
        of the encoders, projections and carried HF tensors on the first stage."""
        lm = self._language_model(chunk)
        if lm is chunk:
            return W.canonical_names(chunk)
        out = {"language_model." + k: v for k, v in W.canonical_names(lm).items()}
        for name, module in chunk.named_children():
            if module is not lm:
                out.update({f"{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()
                            if not k.endswith("_extra_state")})
        return out

    def mapping_table(self) -> Dict[str, Mapping]:
        """Megatron name -> mapping; with tied embeddings the last stage's output layer (megatron's
        copy of the tied embedding) maps to the embedding's."""
        table = {m.megatron: m for m in self.mappings()}
        if self.config.text.get("tie_word_embeddings"):
            lm = registry.OMNI_LM_PREFIX if self.config.kind != "nemotron_h" else ""
            table[lm + "output_layer.weight"] = table[lm + "embedding.word_embeddings.weight"]
        return table

    def megatron_tensor(self, mapping: Mapping, dims: Dims) -> torch.Tensor:
        """The full (unsharded) Megatron tensor of `mapping`, made from its HF tensor(s) (mapped
        from the files, no copy unless the kind transforms), their shapes checked against the config."""
        full = mapping.to_megatron([self.checkpoint.get(n) for n in mapping.hf], dims)
        if omni.LAYER_SCALE.search(mapping.hf[0]):
            omni.check_layer_scale(mapping.hf[0], full)
        return full

    def load_hf_weights(self, model) -> None:
        """Fill every parameter of `model` (this rank's part) from the HF checkpoint. Strict."""
        table = self.mapping_table()
        for chunk in W.model_chunks(model):
            dims = self._dims(self._language_model(chunk))
            for name, tensor in self._chunk_tensors(chunk).items():
                mapping = table.get(name)
                if mapping is None:
                    raise ConversionError(f"megatron parameter {name!r} has no HF source in the registry")
                W.load_into(tensor, mapping.kind, self.megatron_tensor(mapping, dims), dims, ", ".join(mapping.hf))

    # ------------------------------------------------------------------ megatron -> HF
    def export_hf_weights(self, model, cast_to_hf_dtype: bool = True,
                          to_all_ranks: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield (HF name, full tensor) for every tensor of the HF checkpoint, in table order.

        Every rank must iterate it (it runs collectives). Tensors are gathered over tensor /
        expert-tensor parallel ranks, then sent from the stage / expert-parallel rank that holds them
        to global rank 0, which alone yields them (with `to_all_ranks=True` every rank gets every
        tensor, by broadcast). `model` is this rank's model or its list of virtual-stage chunks.
        Dtypes are those of the source HF checkpoint when known (so a round trip is bit-exact), else
        the parameters' own.
        """
        chunks = W.model_chunks(model)
        lms = [self._language_model(c) for c in chunks]
        dims = self._dims(lms[0])
        local = {k: v for c in chunks for k, v in self._chunk_tensors(c).items()}
        where = W.owners(local)
        rank = world()[0]
        receives = to_all_ranks or rank == 0
        manifest = self._manifest_or_none()
        for mapping in self.mappings():
            if mapping.megatron not in where:
                raise ConversionError(f"megatron model has no parameter {mapping.megatron!r} to export "
                                      "(on any rank)")
            owner, dtype = where[mapping.megatron]
            tensor = local.get(mapping.megatron)
            full = W.gather_full(tensor, mapping.kind, dims) if tensor is not None else None
            full = W.move_full_tensor(full, owner, dtype, to_all=to_all_ranks)
            if not receives:
                continue
            for name, out in mapping.to_hf(full, dims):
                if cast_to_hf_dtype and manifest and name in manifest:
                    out = out.to(dtype_from_name(manifest[name]["dtype"]))
                yield name, out

    def _manifest_or_none(self) -> Optional[Dict[str, dict]]:
        """The source manifest; None for a bridge without HF weights (e.g. a config-only --hf-config)."""
        return self.manifest if self._has_weights() else None

    def export_config(self, model) -> Dict[str, Any]:
        """config.json for `model` in the scheme the source used, values taken from the model."""
        lm = self._language_model(W.model_chunks(model)[0])
        c = lm.config
        fields = {name: getattr(c, name) for _, name in hf_config.TEXT_FIELDS if hasattr(c, name)}
        fields["hybrid_override_pattern"] = c.hybrid_override_pattern
        fields["vocab_size"] = self.config.text["vocab_size"]
        # Only the fields this model kind has (a dense model carries no MoE sizes).
        fields = {k: v for k, v in fields.items() if k in self.provider_fields()}
        out = hf_config.export_config(self.config, fields)
        if self.config.kind != "nemotron_h":
            out = omni.export_omni_config(out, self.config.scheme,
                                          {k: getattr(c, k) for k in self.omni_fields() if hasattr(c, k)})
        return out

    def save_hf_pretrained(self, model, path: str | Path, overwrite: bool = False) -> None:
        """Write config.json, the safetensors weights (+ index) and the non-weight assets.

        Under torchrun every rank calls it; the tensors are gathered to global rank 0, which alone
        writes, inside the output transaction (bridge/output.py: a refused output path or a failed
        write is raised on every rank, and nothing is left at the output path).
        """
        source = _Tracked(self.export_hf_weights(model))
        with output_transaction(path, f"writing the Hugging Face checkpoint {path}", overwrite) as tmp:
            if world()[0] == 0:
                try:
                    self._write_hf(model, tmp, source)
                except BaseException:
                    if not source.failed:  # keep the other ranks' collectives matched before failing
                        _drain(source)
                    raise
            else:
                _drain(source)  # take part in the collectives, write nothing

    def _write_hf(self, model, out_dir: Path, tensors) -> None:
        specs = self.hf_specs()
        if specs is None:  # no source checkpoint: files planned from the exported tensors
            materialised = list(tensors)
            files = plan_shards([(n, t.numel() * t.element_size()) for n, t in materialised], MAX_SHARD_BYTES)
            specs = {n: (files[n], t.dtype, tuple(t.shape)) for n, t in materialised}
            tensors = iter(materialised)
        write_hf_weights(out_dir, tensors, specs, self.hf_origins())
        self.write_hf_config_and_assets(model, out_dir)

    def write_hf_config_and_assets(self, model, out_dir: Path) -> None:
        """config.json for `model` and the source's non-weight files (tokenizer, ...): the HF
        output besides its weights, for the in-memory and the streaming export alike."""
        write_config_and_assets(out_dir, self.export_config(model), self.assets_dir)

    def hf_specs(self) -> Optional[Dict[str, Tuple[str, torch.dtype, Tuple[int, ...]]]]:
        """name -> (file, dtype, shape) of every HF tensor, from the source manifest (None without one)."""
        manifest = self._manifest_or_none()
        if not manifest:
            return None
        return {n: (manifest[n]["file"], dtype_from_name(manifest[n]["dtype"]), tuple(manifest[n]["shape"]))
                for n in self.hf_names()}

    def hf_origins(self) -> Dict[str, int]:
        """name -> where the tensor's bytes started in its source file, for the tensors the manifest
        records it for (the export aligns its files like the source: `SafetensorsWriter`)."""
        manifest = self._manifest_or_none() or {}
        return {n: m["offset"] for n, m in manifest.items() if isinstance(m.get("offset"), int)}

    # ------------------------------------------------------------------ Megatron checkpoints
    def source_files(self) -> List[str]:
        """The files of the source HF checkpoint that hold its weights and config (for checksums)."""
        return self.checkpoint.source_files()

    def save_megatron_model(self, model, path: str | Path, layout: Optional[Dict[str, Any]] = None,
                            overwrite: bool = False, sharded_state=None, strategy=None,
                            known_checksums=None, hf_checksums=None, target: str = DEFAULT_TARGET,
                            carried=None) -> None:
        """Write `model` as a Megatron checkpoint (Megatron-LM layout, see bridge/checkpoint.py) for
        `target` (`conversion.naming`: this project's, Megatron-Bridge's or Megatron-LM's key names).

        `sharded_state` / `strategy`: how the tensors are produced and written (default: the
        model's own `sharded_state_dict()` and megatron-core's writer; the streaming conversion
        passes a meta-device model's state and a strategy that makes each tensor on demand).
        `known_checksums()`: {absolute path: (size, XXH3-128)} of files already hashed while being
        written (the rest are hashed at the end). `hf_checksums()`: the source files' checksums
        when the caller took them; by default rank 0 hashes the source files in a background
        thread while the tensors are written. `carried()`: the carried HF tensors by HF name, for a
        target that keeps them beside the checkpoint (default: the model's own `hf_extras` buffers).
        """
        from bridge import checkpoint
        from conversion import integrity

        chosen = TARGETS[target]
        rows, vocab = self._language_model(W.model_chunks(model)[0]).vocab_size, self.config.text["vocab_size"]
        if not chosen.pad_vocab and rows != vocab:
            raise ConversionError(f"target {target!r} stores vocab_size = {vocab} embedding rows; this model has "
                                  f"{rows} (build it with provider.padded_vocab = {vocab})")
        # checksums_file: every file of the checkpoint is hashed into it (conversion/integrity.py)
        meta = {**self.megatron_meta(model, layout), "target": target, "checksums_file": integrity.CHECKSUMS_NAME}
        if carried is None and not chosen.carried_in_checkpoint:
            def carried():
                return self._carried_values(model)
        if hf_checksums is None and self.hf_dir is not None and world()[0] == 0:
            hf_checksums = integrity.in_background(integrity.checksums, self.hf_dir, self.source_files()).result

        def full_meta() -> Dict[str, Any]:
            return {**meta, "hf_checksums": hf_checksums()} if hf_checksums else meta

        def write_checksums(root: Path) -> None:
            known = {}
            for abs_path, (size, digest) in (known_checksums() if known_checksums else {}).items():
                rel = Path(abs_path).relative_to(root.resolve()).as_posix()
                known[rel] = {"size": size, "xxh3_128": digest}
            integrity.write_checksums_file(root, known)

        state = sharded_state or (lambda: checkpoint.sharded_state(model, chosen, checkpoint.megatron_args(model, layout)))
        checkpoint.save(state, Path(path), full_meta, self.assets_dir, overwrite=overwrite, strategy=strategy,
                        finalize=write_checksums, run_config=checkpoint.run_config_yaml(layout),
                        carried=None if chosen.carried_in_checkpoint else carried)

    def _carried_values(self, model) -> Dict[str, torch.Tensor]:
        """HF name -> value of the carried tensors held by `model`'s `hf_extras` buffers (first stage)."""
        buffers = {k: v for c in W.model_chunks(model) for k, v in c.state_dict().items()
                   if k.startswith(omni.CARRIED_PREFIX)}
        return {m.hf[0]: buffers[m.megatron].detach() for m in self.mappings()
                if m.megatron.startswith(omni.CARRIED_PREFIX) and m.megatron in buffers}

    def megatron_meta(self, model, layout: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """What bridge_meta.json records of `model` (checksums aside): the HF config and manifest,
        the provider fields, the parameter dtype, the padded vocab and the parallel `layout`."""
        chunk = W.model_chunks(model)[0]
        return {
            "hf_config": self.config.raw,
            "provider_fields": self.provider_fields(),
            "params_dtype": dtype_name(chunk.config.params_dtype),
            # Embedding / output rows; the model built from this checkpoint uses them at any TP.
            "padded_vocab_size": self._language_model(chunk).vocab_size,
            "hf_manifest": self.manifest,
            "layout": layout or {},
        }

    @classmethod
    def from_megatron_checkpoint(cls, path: str | Path, verify: bool = True) -> "AutoBridge":
        """The bridge of a converted checkpoint (its HF config, manifest and assets). `verify=False`
        skips hashing the files (their sizes are still checked): for callers that verify later."""
        from bridge import checkpoint

        path = Path(path)
        meta = checkpoint.read_meta(path)
        from conversion import integrity

        integrity.verify_megatron_checkpoint(path, meta, hashes=verify)  # remembered once verified
        cfg = hf_config.parse_config(meta["hf_config"], f"{path}/{checkpoint.META_NAME}: hf_config")
        return cls(cfg, hf_dir=None, manifest=meta["hf_manifest"], assets_dir=path / checkpoint.ASSETS_DIR)

    @staticmethod
    def load_megatron_model(path: str | Path, dtype: Optional[torch.dtype] = None, **layout):
        """Rebuild the model recorded in a converted checkpoint and load this rank's weights.

        The layout is megatron's parallel state when initialised, else `layout` (tp=, pp=, ep=,
        etp=, vpp=; default 1 each), checked against the model sizes before anything is built. The
        checkpoint reshards on load (megatron-core dist_checkpointing), so any layout the sizes
        allow works. Returns the model, or the list of chunks with virtual pipeline stages.
        """
        from bridge import checkpoint
        from bridge.parallel import build_model

        unknown = sorted(set(layout) - {"tp", "pp", "ep", "etp", "vpp"})
        if unknown:
            raise TypeError(f"load_megatron_model: unknown layout argument(s) {unknown} (use tp, pp, ep, etp, vpp)")
        path = Path(path)
        bridge = AutoBridge.from_megatron_checkpoint(path)
        meta = checkpoint.read_meta(path)
        provider = bridge.to_megatron_provider(dtype=dtype or dtype_from_name(meta["params_dtype"]))  # dtype: e.g. fp32 for bridge-verify
        provider.padded_vocab = meta.get("padded_vocab_size")
        provider.perform_initialization = False  # every parameter is overwritten from the checkpoint
        for key, field in (("tp", "tensor_model_parallel_size"), ("pp", "pipeline_model_parallel_size"),
                           ("ep", "expert_model_parallel_size"), ("etp", "expert_tensor_parallel_size"),
                           ("vpp", "virtual_pipeline_model_parallel_size")):
            if layout.get(key) is not None:
                setattr(provider, field, layout[key])
        chunks = build_model(provider)
        checkpoint.load(chunks, path, TARGETS[meta.get("target", DEFAULT_TARGET)])
        return chunks[0] if len(chunks) == 1 else chunks


def _drain(tensors) -> None:
    """Run an export to its end, keeping none of its tensors (its collectives need every rank)."""
    for _ in tensors:
        pass


class _Tracked:
    """Iterator wrapper that remembers whether the wrapped generator itself raised."""

    def __init__(self, it):
        self._it = iter(it)
        self.failed = False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException:
            self.failed = True
            raise
