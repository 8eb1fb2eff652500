"""Nemotron-Omni: fp32 logits of the converted megatron model = transformers'
NemotronH_Omni_Reasoning_V3, per modality, on the same random weights and inputs."""

import pytest
import torch

from bridge import AutoBridge
from bridge.tiny_models import AUDIO_TOKEN, IMAGE_TOKEN, build_hf_omni_model, save_hf_model, tiny_omni_config
from tests.parity import max_error, tolerance

VOCAB = 300
G = torch.Generator().manual_seed(0)


def _ids(n=48):
    return torch.randint(10, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))


def _place(ids, token, count, start=3):
    ids = ids.clone()
    ids[0, start:start + count] = token
    return ids


@pytest.fixture(scope="module")
def omni(parallel_state, tmp_path_factory):
    hf = build_hf_omni_model(seed=1)
    hf_dir = save_hf_model(hf, tmp_path_factory.mktemp("omni") / "hf")
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    model = bridge.to_megatron_provider().provide()
    bridge.load_hf_weights(model)
    return hf.eval(), model.eval(), bridge


def _check(hf, model, ids, label, hf_kwargs=None, mg_kwargs=None, reference=None):
    with torch.no_grad():
        ref = reference if reference is not None else hf(input_ids=ids, use_cache=False, **(hf_kwargs or {})).logits
        got = model(ids, **(mg_kwargs if mg_kwargs is not None else hf_kwargs or {}))
    err = max_error(got.float(), ref.float())
    print(f"{label}: max|dlogit|={err:.3e} tol={tolerance(ref):.3e}")
    assert err <= tolerance(ref), (label, err)


def test_text_only(omni):
    hf, model, _ = omni
    _check(hf, model, _ids(), "text")


def test_two_images_of_different_grids(omni):
    hf, model, _ = omni
    grid = torch.tensor([[4, 4], [6, 4]])  # patches; 4 and 6 tokens after the 2x2 pixel shuffle
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 4 * 4, generator=G)
    ids = _place(_ids(), IMAGE_TOKEN, int((grid.prod(-1) // 4).sum()))
    _check(hf, model, ids, "images", dict(pixel_values=pixels, image_grid_hw=grid))


def test_video_with_odd_frame_count(omni):
    """transformers 5.23's own forward fails on video, so the reference is assembled from
    `get_video_features` exactly as its forward would (masked_scatter on the image token)."""
    hf, model, _ = omni
    frames = torch.randn(5, 3, 16, 24, generator=G)  # 5 frames, temporal patch 2: last frame repeats
    with torch.no_grad():
        video = hf.get_video_features(frames).pooler_output.reshape(-1, hf.config.text_config.hidden_size)
        ids = _place(_ids(), IMAGE_TOKEN, video.shape[0])
        embeds = hf.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == IMAGE_TOKEN).unsqueeze(-1).expand_as(embeds), video)
        ref = hf.language_model(inputs_embeds=embeds, use_cache=False).logits
    _check(hf, model, ids, "video", mg_kwargs=dict(pixel_values_videos=frames), reference=ref)


def test_padded_audio_clips(omni):
    hf, model, _ = omni
    features = torch.randn(2, 40, 16, generator=G)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0  # the second clip is padded
    with torch.no_grad():
        count = hf.get_audio_features(features, mask).pooler_output.shape[0]
    ids = _place(_ids(), AUDIO_TOKEN, count)
    _check(hf, model, ids, "audio", dict(input_features=features, input_features_mask=mask))


def test_placeholder_count_mismatch_names_both_counts(omni):
    hf, model, _ = omni
    grid = torch.tensor([[4, 4]])
    pixels = torch.randn(16, 48, generator=G)
    ids = _place(_ids(), IMAGE_TOKEN, 3)
    with pytest.raises(ValueError, match="got 4 feature vectors for 3 placeholder tokens"):
        model(ids, pixel_values=pixels, image_grid_hw=grid)


def test_model_without_sound(parallel_state, tmp_path):
    hf = build_hf_omni_model(tiny_omni_config(has_sound=False), seed=2)
    hf_dir = save_hf_model(hf, tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider()
    assert provider.has_sound is False
    model = provider.provide()
    assert model.sound_encoder is None and model.sound_projection is None
    bridge.load_hf_weights(model)
    grid = torch.tensor([[4, 4]])
    pixels = torch.randn(16, 48, generator=G)
    ids = _place(_ids(), IMAGE_TOKEN, 4)
    _check(hf.eval(), model.eval(), ids, "no-sound image", dict(pixel_values=pixels, image_grid_hw=grid))


def _swap_rows(t, a, b, n):
    with torch.no_grad():
        ta = t[a:a + n].clone()
        t[a:a + n] = t[b:b + n]
        t[b:b + n] = ta


def _break_vision_qk(model):
    qkv = model.vision_model.decoder.layers[0].self_attention.linear_qkv.weight  # per head: q, k, v (8 rows each)
    _swap_rows(qkv, 0, 8, 8)


def _break_projector_norm(model):
    w = model.vision_projection.encoder.linear_fc1.layer_norm_weight
    with torch.no_grad():
        w.copy_(w.flip(0))


def _break_audio_attention(model):
    attn = model.sound_encoder.encoder.layers[0].self_attn
    with torch.no_grad():
        q = attn.q_proj.weight.clone()  # query <-> value projections swapped
        attn.q_proj.weight.copy_(attn.v_proj.weight)
        attn.v_proj.weight.copy_(q)


@pytest.mark.parametrize("breakage,inputs", [
    (_break_vision_qk, "image"), (_break_projector_norm, "image"), (_break_audio_attention, "audio")])
def test_parity_catches_a_broken_mapping_in_each_tower(omni, breakage, inputs):
    hf, _, bridge = omni
    model = bridge.to_megatron_provider().provide()
    bridge.load_hf_weights(model)
    model.eval()
    if inputs == "image":
        grid = torch.tensor([[4, 4]])
        kwargs = dict(pixel_values=torch.randn(16, 48, generator=torch.Generator().manual_seed(3)), image_grid_hw=grid)
        ids = _place(_ids(), IMAGE_TOKEN, 4)
    else:
        features, mask = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(3)), torch.ones(1, 40, dtype=torch.long)
        kwargs = dict(input_features=features, input_features_mask=mask)
        ids = _place(_ids(), AUDIO_TOKEN, 5)
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False, **kwargs).logits
        assert max_error(model(ids, **kwargs), ref) <= tolerance(ref)
        breakage(model)
        assert max_error(model(ids, **kwargs), ref) > 100 * tolerance(ref)


def test_freeze_flags_freeze_exactly_their_module(omni):
    _, _, bridge = omni
    for flag, module in (("freeze_language_model", "language_model"), ("freeze_vision_model", "vision_model"),
                         ("freeze_vision_projection", "vision_projection"), ("freeze_sound_encoder", "sound_encoder"),
                         ("freeze_sound_projection", "sound_projection")):
        provider = bridge.to_megatron_provider()
        setattr(provider, flag, True)
        model = provider.provide()
        for name, child in model.named_children():
            grads = {p.requires_grad for p in child.parameters()}
            if not grads:  # hf_extras: buffers only
                continue
            assert grads == ({False} if name == module else {True}), (flag, name)


def test_video_with_efficient_video_sampling(omni):
    """video_pruning_rate > 0: the pruned tokens leave the sequence (reference assembled by hand
    from get_video_features and transformers' own compute_retention_mask)."""
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import compute_retention_mask

    hf, model, _ = omni
    frames = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))  # 3 groups of 2x2 tokens
    rate = 0.5
    with torch.no_grad():
        video = hf.get_video_features(frames).pooler_output.reshape(-1, hf.config.text_config.hidden_size)
        ids = _place(_ids(), IMAGE_TOKEN, video.shape[0])
        embeds = hf.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == IMAGE_TOKEN).unsqueeze(-1).expand_as(embeds), video)
        keep_video = compute_retention_mask(video_embeds=video, thw=(3, 2, 2), spatial_merge_size=1, q=rate)
        assert 0 < int(keep_video.sum()) < video.shape[0]  # something is pruned, something kept
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[ids == IMAGE_TOKEN] = keep_video
        ref = hf.language_model(inputs_embeds=embeds[keep].unsqueeze(0), use_cache=False).logits
    model.video_pruning_rate = rate
    try:
        _check(hf, model, ids, "video+EVS", mg_kwargs=dict(pixel_values_videos=frames), reference=ref)
    finally:
        model.video_pruning_rate = 0.0


def test_radio_layer_scale_other_than_one_is_refused(parallel_state, tmp_path):
    from conversion.errors import ConversionError

    hf = build_hf_omni_model(tiny_omni_config(has_sound=False), seed=5)
    with torch.no_grad():
        hf.vision_model.encoder.layer[1].layer_scale2.lambda1.mul_(1.5)
    bridge = AutoBridge.from_hf_pretrained(save_hf_model(hf, tmp_path / "hf"))
    model = bridge.to_megatron_provider().provide()
    with pytest.raises(ConversionError, match=r"blocks\.1\.layer_scale2\.lambda1: RADIO layer scale must be all ones"):
        bridge.load_hf_weights(model)
