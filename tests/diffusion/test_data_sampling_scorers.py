"""Image-pair loading, cached pair datasets, sampling, the exact pixel scorers and the open_clip CLIP scorer."""

from __future__ import annotations

import pytest
import torch

from mmalign.diffusion.data import CachedPairDataset, load_image_pair, load_pair_cache, save_pair_cache, sdxl_time_ids
from mmalign.diffusion.sampling import sample, sampling_scheduler
from mmalign.diffusion.scorers import ClipScorer, HueScorer, ShapeFidelityScorer, circular_mean_hue, hue_distance, shape_hue
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


def test_class_embeddings_are_fixed():
    torch.testing.assert_close(class_embeddings(4, 2, 8, seed=3), class_embeddings(4, 2, 8, seed=3))
