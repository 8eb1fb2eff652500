# Verbatim from Megatron-Bridge 0.6.2 (PyPI wheel megatron_bridge-0.6.2-py3-none-any.whl,
# sha256 bcb7274ab9327167c345aa24b96b95790ce5090df1945d883bdc41065d5649e2), file megatron/bridge/models/conversion/mapping_registry.py (an attribute and a method of MegatronMappingRegistry, dedented).
# Copyright (c) NVIDIA CORPORATION & AFFILIATES; Apache License 2.0.
# Test data only: tests/test_upstream_layouts.py parses it (ast), nothing imports or runs it.

# lines 74-84 (class MegatronMappingRegistry)
_SEPARATE_LAYERNORM_REWRITES = [
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("self_attention.linear_q_up_proj.layer_norm_weight", "self_attention.q_layernorm.weight"),
    ("self_attention.linear_q_up_proj.layer_norm_bias", "self_attention.q_layernorm.bias"),
    ("self_attention.linear_kv_up_proj.layer_norm_weight", "self_attention.kv_layernorm.weight"),
    ("self_attention.linear_kv_up_proj.layer_norm_bias", "self_attention.kv_layernorm.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
    ("mixer.in_proj.layer_norm_weight", "norm.weight"),
]


# lines 86-116 (class MegatronMappingRegistry)
def _add_separate_layernorm_mappings(self) -> None:
    """Add mapping aliases for separate LayerNorm module naming.

    Some Megatron implementations keep LayerNorm weights inside fused TE
    linear modules (e.g., `self_attention.linear_qkv.layer_norm_weight`),
    while others expose them as standalone modules (e.g., `input_layernorm.weight`).
    To avoid requiring every bridge to add both names, duplicate any matching
    mapping so both naming conventions resolve to the same HF parameter.
    """
    original_mappings = list(self.mappings)
    existing_names = {mapping.megatron_param for mapping in self.mappings}
    extra_mappings = []

    for mapping in original_mappings:
        for old_name, new_name in self._SEPARATE_LAYERNORM_REWRITES:
            if not mapping.megatron_param.endswith(f"*.{old_name}"):
                continue
            new_megatron_param = mapping.megatron_param[: -len(old_name)] + new_name
            if new_megatron_param in existing_names:
                break
            if isinstance(mapping, AutoMapping):
                new_mapping = AutoMapping(new_megatron_param, mapping.hf_param, mapping.permute_dims)
            else:
                print(f"Unrecognized mapping type for {mapping.megatron_param} -> {mapping.hf_param}")
                break
            extra_mappings.append(new_mapping)
            existing_names.add(new_megatron_param)
            break

    if extra_mappings:
        self.mappings.extend(extra_mappings)
