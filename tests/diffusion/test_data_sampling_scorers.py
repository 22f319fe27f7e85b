"""Image-pair loading, cached pair datasets, sampling, the exact pixel scorers and the open_clip CLIP scorer."""

from __future__ import annotations

import pytest
import torch

from mmalign.diffusion.data import CachedPairDataset, load_image_pair, load_pair_cache, save_pair_cache, sdxl_time_ids
from mmalign.diffusion.sampling import sample, sampling_scheduler
from mmalign.diffusion.scorers import (
    ClipScorer, HueScorer, ShapeFidelityScorer, circular_mean_hue, clip_preprocess, hue_distance, shape_hue,
)
from mmalign.diffusion.shapes import SHAPES, build_tiny_unet, class_embeddings, render, shape_masks

from diffusion_fixtures import ddpm


def _png(path, w, h, color=(200, 30, 30)):
    from PIL import Image

    Image.new("RGB", (w, h), color).save(path)
    return path


def test_image_pair_loading_and_clear_errors(tmp_path):
    a, b = _png(tmp_path / "a.png", 8, 8), _png(tmp_path / "b.png", 8, 8, (0, 0, 0))
    w, l_ = load_image_pair(a, b)
    assert w.shape == l_.shape == (3, 8, 8)
    assert w[0, 0, 0].item() == pytest.approx(200 / 127.5 - 1) and l_.min().item() == -1.0
    c = _png(tmp_path / "c.png", 12, 8)
    with pytest.raises(ValueError, match=r"image pair sizes differ.*\(8, 12\)"):
        load_image_pair(a, c)
    assert load_image_pair(a, c, resolution=16)[1].shape == (3, 16, 16)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(ValueError, match="corrupt.png.*corrupt or not an image"):
        load_image_pair(a, bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_image_pair(a, tmp_path / "missing.png")


def test_cached_pair_dataset_labels_ties_and_errors(tmp_path):
    chosen, rejected = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    data = {"chosen": chosen, "rejected": rejected, "encoder_hidden_states": torch.zeros(3, 1, 8),
            "labels": torch.tensor([1.0, 0.0, 0.5])}
    ds = CachedPairDataset(data)
    assert len(ds) == 2  # the tie is dropped
    assert ds[0]["chosen"].sum() == 0 and ds[1]["chosen"].sum() == 16  # label 0 swaps the pair
    path = tmp_path / "pairs.safetensors"
    save_pair_cache(path, data)
    assert len(load_pair_cache(path)) == 2
    with pytest.raises(ValueError, match="rejected must have the shape of chosen"):
        CachedPairDataset({"chosen": chosen, "rejected": torch.ones(3, 4, 4, 4), "encoder_hidden_states": data["encoder_hidden_states"]})
    corrupt = chosen.clone()
    corrupt[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[1\] hold non-finite"):
        CachedPairDataset({"chosen": corrupt, "rejected": rejected, "encoder_hidden_states": data["encoder_hidden_states"]})
    with pytest.raises(ValueError, match="labels must be"):
        CachedPairDataset({**data, "labels": torch.tensor([1.5, 0.0, 0.0])})
    assert sdxl_time_ids((1024, 1024)).tolist() == [1024, 1024, 0, 0, 1024, 1024]


@pytest.mark.parametrize("kind", ["ddim", "euler"])
def test_sampling_produces_images_of_the_right_shape(kind):
    torch.manual_seed(0)
    unet = build_tiny_unet(size=8, channels=(8, 16), cross_attention_dim=8)
    emb = torch.randn(3, 2, 8)
    sched = sampling_scheduler(ddpm(), kind)
    out = sample(unet, sched, emb, (3, 8, 8), num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 8, 8) and torch.isfinite(out).all()
    again = sample(unet, sched, emb, (3, 8, 8), num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                   batch_size=2)
    torch.testing.assert_close(out, again, atol=1e-3, rtol=1e-3)  # batched vs unbatched kernels
    cfg = sample(unet, sched, emb, (3, 8, 8), num_inference_steps=2, guidance_scale=3.0,
                 uncond_hidden_states=torch.zeros(1, 2, 8))
    assert cfg.shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="uncond_hidden_states"):
        sample(unet, sched, emb, (3, 8, 8), guidance_scale=2.0)


def _tiny_unet():
    torch.manual_seed(0)
    return build_tiny_unet(size=8, channels=(8, 16), cross_attention_dim=8).eval()


def test_pair_cache_keys_always_load_the_labels(tmp_path):
    """Reading a subset of keys still applies the labels column: label 0 swaps the pair, ties are dropped."""
    chosen, rejected = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    path = tmp_path / "pairs.safetensors"
    save_pair_cache(path, {"chosen": chosen, "rejected": rejected, "encoder_hidden_states": torch.zeros(3, 1, 4),
                           "labels": torch.tensor([0.0, 1.0, 0.5]), "extra": torch.zeros(3)})
    ds = load_pair_cache(path, keys=["chosen", "rejected", "encoder_hidden_states"])
    assert len(ds) == 2 and set(ds[0]) == {"chosen", "rejected", "encoder_hidden_states"}
    assert ds[0]["chosen"].sum() == 4 and ds[1]["chosen"].sum() == 0  # row 0 (label 0) swapped
    with pytest.raises(ValueError, match=r"pair cache .*keys \['text_embeds'\] are not in the cache, which holds"):
        load_pair_cache(path, keys=["chosen", "rejected", "encoder_hidden_states", "text_embeds"])


def test_euler_sampling_does_not_depend_on_batch_size():
    """init_noise_sigma is read after set_timesteps: every chunk starts at the schedule's own sigma_max."""
    from diffusers import EulerDiscreteScheduler

    unet, emb = _tiny_unet(), torch.randn(3, 2, 8)
    train = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    runs = [sample(unet, sampling_scheduler(train, "euler"), emb, (3, 8, 8), num_inference_steps=5,
                   generator=torch.Generator().manual_seed(0), batch_size=bs) for bs in (1, 2, 3)]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], atol=1e-4, rtol=1e-4)  # batched vs unbatched kernels only
    sched = sampling_scheduler(train, "euler")
    sched.set_timesteps(5)  # the start the pipelines use: noise * init_noise_sigma after set_timesteps
    assert float(sched.init_noise_sigma) < float(sampling_scheduler(train, "euler").init_noise_sigma)


def test_sampling_with_per_row_uncond_embeddings_in_chunks():
    """Per-sample unconditional embeddings [N, L, D] are sliced per chunk (N > batch_size), [1, L, D] expanded."""
    unet, emb = _tiny_unet(), torch.randn(5, 2, 8)
    sched = sampling_scheduler(ddpm(), "ddim")
    un = torch.randn(5, 2, 8)
    kw = {"num_inference_steps": 2, "guidance_scale": 3.0}
    chunked = sample(unet, sched, emb, (3, 8, 8), uncond_hidden_states=un, batch_size=2,
                     generator=torch.Generator().manual_seed(0), **kw)
    whole = sample(unet, sched, emb, (3, 8, 8), uncond_hidden_states=un, batch_size=5,
                   generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)  # row i is guided against un[i]
    swapped = sample(unet, sched, emb, (3, 8, 8), uncond_hidden_states=un.flip(0), batch_size=2,
                     generator=torch.Generator().manual_seed(0), **kw)
    assert not torch.allclose(swapped, chunked, atol=1e-3)  # the per-row embeddings matter
    shared = sample(unet, sched, emb, (3, 8, 8), uncond_hidden_states=un[:1], batch_size=2,
                    generator=torch.Generator().manual_seed(0), **kw)
    expanded = sample(unet, sched, emb, (3, 8, 8), uncond_hidden_states=un[:1].expand(5, -1, -1).clone(),
                      batch_size=2, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(shared, expanded)
    with pytest.raises(ValueError, match=r"uncond_hidden_states must have 3 dimensions and 5 rows.*\(3, 2, 8\)"):
        sample(unet, sched, emb, (3, 8, 8), uncond_hidden_states=un[:3], **kw)


def test_sdxl_guidance_uses_the_unconditional_added_conditioning(sdxl_unet):
    """With CFG the unconditional forward gets the negative pooled text_embeds (per chunk), never the prompt's."""
    from diffusers import DDIMScheduler

    seen = []
    sdxl_unet.eval().register_forward_pre_hook(
        lambda m, a, kw: seen.append({k: v.clone() for k, v in kw["added_cond_kwargs"].items()}), with_kwargs=True)
    n, time_ids = 3, torch.tensor([[16.0, 16, 0, 0, 16, 16]])
    pooled, neg_pooled = torch.randn(n, 32), torch.zeros(n, 32)
    added = {"text_embeds": pooled, "time_ids": time_ids.expand(n, -1)}
    uncond_added = {"text_embeds": neg_pooled, "time_ids": time_ids}  # one shared time_ids row
    out = sample(sdxl_unet, DDIMScheduler(), torch.randn(n, 4, 64), (4, 8, 8), num_inference_steps=1,
                 guidance_scale=5.0, uncond_hidden_states=torch.zeros(1, 4, 64), added_cond_kwargs=added,
                 uncond_added_cond_kwargs=uncond_added, batch_size=2)
    assert out.shape == (n, 4, 8, 8) and len(seen) == 4  # 2 chunks x (cond, uncond)
    torch.testing.assert_close(seen[0]["text_embeds"], pooled[:2])
    torch.testing.assert_close(seen[1]["text_embeds"], neg_pooled[:2])
    torch.testing.assert_close(seen[2]["text_embeds"], pooled[2:])
    torch.testing.assert_close(seen[3]["text_embeds"], neg_pooled[2:])
    torch.testing.assert_close(seen[3]["time_ids"], time_ids)
    with pytest.raises(ValueError, match="needs uncond_added_cond_kwargs"):
        sample(sdxl_unet, DDIMScheduler(), torch.randn(n, 4, 64), (4, 8, 8), guidance_scale=5.0,
               uncond_hidden_states=torch.zeros(1, 4, 64), added_cond_kwargs=added)
    with pytest.raises(ValueError, match=r"uncond_added_cond_kwargs must have the keys.*\['text_embeds'\]"):
        sample(sdxl_unet, DDIMScheduler(), torch.randn(n, 4, 64), (4, 8, 8), guidance_scale=5.0,
               uncond_hidden_states=torch.zeros(1, 4, 64), added_cond_kwargs=added,
               uncond_added_cond_kwargs={"text_embeds": neg_pooled})


def test_ddpm_sampling_is_reproducible_from_the_generator():
    """DDPM's step draws noise: from the given generator, so one seed gives one result."""
    unet, emb = _tiny_unet(), torch.randn(2, 2, 8)
    runs = [sample(unet, sampling_scheduler(ddpm(), "ddpm"), emb, (3, 8, 8), num_inference_steps=3,
                   generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    assert not torch.allclose(runs[0], runs[2])


def test_pixel_scorers_are_exact_on_rendered_images():
    g = torch.Generator().manual_seed(0)
    cls = torch.arange(4).repeat(2)
    hues = torch.tensor([0.0, 45.0, 90.0, 180.0, 300.0, 10.0, 200.0, 120.0])
    imgs = render(cls, hues, 16, g, noise=0.0)
    mean_hue, strength = circular_mean_hue(imgs)
    assert hue_distance(mean_hue, hues).max().item() < 1.0
    assert (strength > 0.99).all()
    assert HueScorer(45.0, 20.0)(imgs).tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert HueScorer(45.0, 20.0)(imgs, classes=cls).tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    noisy = imgs.clone()
    noisy[:, :, 0, 0] = torch.tensor([-1.0, 1.0, -1.0])  # a saturated green corner pixel outside the shape
    torch.testing.assert_close(shape_hue(noisy, cls), shape_hue(imgs, cls))
    fid = ShapeFidelityScorer(16)
    torch.testing.assert_close(fid(imgs, classes=cls), torch.ones(8))
    assert fid.correct(imgs, cls).all()
    blank = torch.full((2, 3, 16, 16), -0.6)
    assert fid(blank, classes=torch.tensor([0, 1])).max().item() == 0.0
    assert shape_masks(16).shape == (len(SHAPES), 16, 16)
    with pytest.raises(ValueError, match="tolerance"):
        HueScorer(0.0, 0.0)


def test_clip_scorer_with_a_tiny_random_open_clip_model():
    pytest.importorskip("open_clip")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    scorer = ClipScorer(model_cfg=cfg)
    imgs = torch.rand(2, 3, 16, 16) * 2 - 1
    s = scorer(imgs, captions=["a red circle", "a green square"])
    assert s.shape == (2,) and torch.isfinite(s).all() and (s >= 0).all() and (s <= 100).all()
    with pytest.raises(ValueError, match="one entry per image"):
        scorer(imgs, captions=["one"])
    with pytest.raises(ValueError, match="local weights file"):
        ClipScorer(pretrained="/nonexistent/clip.safetensors")


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_clip_preprocess_crops_the_centre_like_open_clip():
    """Shortest side to the model size, then a centre crop: a wide image loses its sides, never gets squashed."""
    pytest.importorskip("open_clip")
    import numpy as np
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    img = torch.zeros(1, 3, 16, 32)  # grey centre (0 in [-1, 1]), a red band left and a blue band right
    img[:, :, :, :8] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    img[:, :, :, 24:] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]
    out = clip_preprocess(img, 16, mean, std)
    grey = (0.5 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out, grey[None, :, None, None].expand(1, 3, 16, 16), atol=1e-5, rtol=0)
    # open_clip's own evaluation transform on the same (8-bit) images, for each resize mode
    g = torch.Generator().manual_seed(0)
    for mode in ("shortest", "longest", "squash"):
        for h, w in ((24, 40), (40, 24), (64, 64)):
            u8 = torch.randint(0, 256, (1, 3, h, w), generator=g, dtype=torch.uint8)
            pil = Image.fromarray(np.ascontiguousarray(u8[0].permute(1, 2, 0).numpy()))
            ref = image_transform_v2(PreprocessCfg(size=16, mean=mean, std=std, resize_mode=mode), is_train=False)(pil)
            ours = clip_preprocess(u8.float() / 127.5 - 1.0, 16, mean, std, resize_mode=mode)[0]
            assert ours.shape == ref.shape == (3, 16, 16)
            assert (ours - ref).abs().mean().item() < 0.02, (mode, h, w)  # PIL vs antialiased torch resampling
    with pytest.raises(ValueError, match="resize_mode must be one of"):
        clip_preprocess(img, 16, resize_mode="crop")


def test_clip_scorer_reads_the_model_preprocess_config(tmp_path):
    """mean/std/size come from open_clip's preprocess config of the model; OpenAI CLIP's constants otherwise."""
    pytest.importorskip("open_clip")
    import json

    from mmalign.diffusion.scorers import OPENAI_CLIP_MEAN

    plain = ClipScorer(model_cfg=TINY_CLIP)
    assert plain.preprocess_cfg["mean"] == OPENAI_CLIP_MEAN and plain.preprocess_cfg["size"] == 32
    own = ClipScorer(model_cfg={**TINY_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    assert own.preprocess_cfg["mean"] == [0.5] * 3 and own.preprocess_cfg["std"] == [0.5] * 3
    # through open_clip.create_model: a local model folder whose config carries its preprocessing (no weights)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}}))
    torch.manual_seed(0)
    local = ClipScorer(f"local-dir:{tmp_path}")
    assert local.preprocess_cfg["std"] == [0.5] * 3 and local.preprocess_cfg["interpolation"] == "bilinear"
    assert tuple(local.preprocess_cfg["size"]) == (32, 32)
    forced = ClipScorer(model_cfg=TINY_CLIP, preprocess_cfg={"resize_mode": "squash"})
    assert forced.preprocess_cfg["resize_mode"] == "squash"
    imgs = torch.rand(2, 3, 16, 24) * 2 - 1
    seen = []
    own.model.encode_image = lambda x, _f=own.model.encode_image: seen.append(x) or _f(x)
    own(imgs, captions=["a", "b"])
    torch.testing.assert_close(seen[0], clip_preprocess(imgs, 32, [0.5] * 3, [0.5] * 3))
    with pytest.raises(ValueError, match=r"preprocess_cfg keys .*unknown \['crop'\]"):
        ClipScorer(model_cfg=TINY_CLIP, preprocess_cfg={"crop": True})


def test_class_embeddings_are_fixed():
    state = torch.get_rng_state()
    emb = class_embeddings(4, 2, 8, seed=3)
    assert emb.shape == (4, 2, 8) and torch.equal(torch.get_rng_state(), state)  # own generator, global RNG untouched
    torch.testing.assert_close(emb, class_embeddings(4, 2, 8, seed=3))
    assert not torch.allclose(emb, class_embeddings(4, 2, 8, seed=4))  # the seed is used
