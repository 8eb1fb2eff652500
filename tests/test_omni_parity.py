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


def _video_ids(hf, count, rows=1):
    """`rows` samples with `count` image-token placeholders each (the video tokens)."""
    ids = torch.cat([_ids() for _ in range(rows)])
    ids[:, 3:3 + count] = IMAGE_TOKEN
    return ids


def _tubelets(videos, tubelets, h, w, seed):
    """Random videos in transformers' tubelet format [videos, tubelets, 2*3, H, W] (temporal patch 2)."""
    return torch.randn(videos, tubelets, 6, h, w, generator=torch.Generator().manual_seed(seed))


def test_two_tubelet_videos_with_odd_frame_counts(omni):
    """The format of transformers' video processor: several videos, the last tubelet of an odd frame
    count filled by the processor; `num_frames` travels with it. Reference: transformers' forward."""
    hf, model, _ = omni
    videos = _tubelets(2, 3, 16, 24, seed=6)  # 2 videos x 3 tubelets of 4x6 patches -> 6 tokens each
    kwargs = dict(pixel_values_videos=videos, num_frames=[5, 6])
    ids = _video_ids(hf, 2 * 3 * 6)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=videos, use_cache=False).logits
    _check(hf, model, ids, "2 tubelet videos", mg_kwargs=kwargs, reference=ref)


def test_tubelet_videos_across_a_batch(omni):
    """Two prompts of one video each: video tokens fill the placeholders row by row."""
    hf, model, _ = omni
    videos = _tubelets(2, 2, 16, 16, seed=7)  # 2 x 2 tubelets of 2x2 tokens: 8 per video
    ids = _video_ids(hf, 8, rows=2)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=videos, use_cache=False).logits
    _check(hf, model, ids, "video batch", mg_kwargs=dict(pixel_values_videos=videos), reference=ref)


def test_video_frames_in_the_older_4d_format(omni):
    """`[frames, 3, H, W]` of one video (transformers 5.23's format, still accepted by 5.24): packed
    as transformers packs it, the last frame repeated to fill the last tubelet."""
    hf, model, _ = omni
    frames = torch.randn(5, 3, 16, 24, generator=torch.Generator().manual_seed(8))
    tubelets = torch.cat([frames, frames[-1:]]).reshape(1, 3, 6, 16, 24)
    ids = _video_ids(hf, 3 * 6)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=tubelets, use_cache=False).logits
        legacy = hf(input_ids=ids, pixel_values_videos=frames, use_cache=False).logits
    assert torch.equal(ref, legacy)  # transformers packs the 4-D frames the same way
    _check(hf, model, ids, "video 4-D frames", mg_kwargs=dict(pixel_values_videos=frames), reference=ref)


def test_num_frames_that_do_not_fit_the_tubelets_are_refused(omni):
    _, model, _ = omni
    videos = _tubelets(1, 3, 16, 16, seed=9)
    ids = _video_ids(None, 3 * 4)
    with pytest.raises(ValueError, match=r"num_frames \[7\] does not match"):
        model(ids, pixel_values_videos=videos, num_frames=[7])


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


@pytest.mark.parametrize("videos,rows", [(1, 1), (2, 1), (2, 2)])
def test_video_with_efficient_video_sampling(omni, videos, rows):
    """video_pruning_rate > 0: the pruned tokens leave the sequence, chosen per video (videos of 3
    tubelets of 2x2 tokens); reference: transformers' forward with the same rate."""
    hf, model, _ = omni
    tubelets = _tubelets(videos, 3, 16, 16, seed=10 + videos)
    ids = _video_ids(hf, videos * 12 // rows, rows=rows)
    rate = 0.5
    hf.video_pruning_rate = model.video_pruning_rate = rate
    try:
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values_videos=tubelets, use_cache=False).logits
        assert ref.shape[1] < ids.shape[1]  # something is pruned
        _check(hf, model, ids, f"video+EVS {videos} videos / {rows} rows",
               mg_kwargs=dict(pixel_values_videos=tubelets), reference=ref)
    finally:
        hf.video_pruning_rate = model.video_pruning_rate = 0.0


def test_radio_layer_scale_other_than_one_is_refused(parallel_state, tmp_path):
    from conversion.errors import ConversionError

    hf = build_hf_omni_model(tiny_omni_config(has_sound=False), seed=5)
    with torch.no_grad():
        hf.vision_model.encoder.layer[1].layer_scale2.lambda1.mul_(1.5)
    bridge = AutoBridge.from_hf_pretrained(save_hf_model(hf, tmp_path / "hf"))
    model = bridge.to_megatron_provider().provide()
    with pytest.raises(ConversionError, match=r"blocks\.1\.layer_scale2\.lambda1: RADIO layer scale must be all ones"):
        bridge.load_hf_weights(model)


def test_patch_size_that_does_not_divide_max_img_size(parallel_state, tmp_path):
    """RADIO's position grid is max_img_size // patch_size on both sides (the released ViT-H pairs
    patch 14 with max_img_size 2048); megatron's RADIO asserted img_h % patch_dim == 0."""
    config = tiny_omni_config(has_sound=False)
    config.vision_config.max_img_size = 34  # patch 4: 8 x 8 positions, 34 % 4 = 2
    hf = build_hf_omni_model(config, seed=7)
    bridge = AutoBridge.from_hf_pretrained(save_hf_model(hf, tmp_path / "hf"))
    model = bridge.to_megatron_provider().provide()
    bridge.load_hf_weights(model)
    grid = torch.tensor([[4, 6]])
    pixels = torch.randn(24, 48, generator=torch.Generator().manual_seed(7))
    ids = _place(_ids(), IMAGE_TOKEN, 6)
    _check(hf.eval(), model.eval(), ids, "max_img_size 34, patch 4", dict(pixel_values=pixels, image_grid_hw=grid))


def test_videos_made_by_the_video_processor(omni):
    """Two uint8 clips (5 and 6 frames) through the Omni video processor — transformers' own where
    torchvision imports (CI's Python 3.12 leg), else examples/_common.OmniVideoProcessor, its torch-only
    copy proven bit-identical there (tests/test_examples_video.py) — then through both models."""
    from transformers.utils import is_torchvision_available

    config = dict(patch_size=4, downsample_ratio=0.5, norm_mean=[0.48145466, 0.4578275, 0.40821073],
                  norm_std=[0.26862954, 0.26130258, 0.27577711], video_target_num_patches=24,
                  video_maintain_aspect_ratio=True, temporal_patch_size=2)
    if is_torchvision_available():
        from transformers import NemotronH_Omni_Reasoning_V3VideoProcessor as Processor
    else:
        from examples._common import OmniVideoProcessor as Processor
    g = torch.Generator().manual_seed(11)
    clips = [torch.randint(0, 256, (n, 20, 30, 3), generator=g, dtype=torch.uint8).numpy() for n in (6, 6)]
    clips[1] = clips[1][:5]  # an odd frame count: the processor fills the last tubelet
    out = Processor(**config)(videos=clips, return_tensors="pt")
    videos = out["pixel_values_videos"]
    assert videos.dim() == 5 and videos.shape[:3] == (2, 3, 6) and list(out["num_frames"]) == [6, 5]
    hf, model, _ = omni
    tokens = videos.shape[-2] // 4 * videos.shape[-1] // 4 // 4  # per tubelet, after the 2x2 pixel shuffle
    ids = _video_ids(hf, 2 * 3 * tokens)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=videos, use_cache=False).logits
    _check(hf, model, ids, f"processor videos {tuple(videos.shape)}",
           mg_kwargs=dict(pixel_values_videos=videos, num_frames=out["num_frames"]), reference=ref)
