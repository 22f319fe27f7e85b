"""The adapter and the preference pipeline across VLM families: LLaVA, LLaVA-NeXT, Idefics3, SmolVLM.

Every family is a random-init tiny model of the real ``transformers`` class with its real processor class, built
offline (:mod:`mmalign.vision_lm.families`). Square 32-px scenes and a 32x64 "wide" image give the families'
different image layouts: LLaVA-NeXT picks another AnyRes grid (more patches, another placeholder count), Idefics3 /
SmolVLM split into another number of tiles (another number of sub-images in ``pixel_values``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmalign.vision_lm import methods as M
from mmalign.vision_lm import scenes as S
from mmalign.vision_lm.adapter import VLExample, VLMAdapter, concat_batches
from mmalign.vision_lm.families import FAMILIES, build_tiny_vlm
from mmalign.vision_lm.objectives import PairCollator, PreferenceObjective, PrefPair

PROMPT = "<image> describe :"


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    model, processor = build_tiny_vlm(request.param, S.vocabulary(), seed=0)
    return request.param, VLMAdapter(model.eval(), processor)


@pytest.fixture(scope="module")
def scene_images():
    rng = np.random.default_rng(0)
    gen = S.SceneGenerator()
    scenes = [gen.sample(rng) for _ in range(4)]
    imgs = [S.render(s, rng=rng) for s in scenes]
    wide = np.concatenate([imgs[0], imgs[1]], axis=1)  # 32 x 64: another AnyRes grid / tiling than 32 x 32
    return scenes, imgs, wide


def _n_image_tokens(ad, ids):
    return int(sum((ids == t).sum() for t in ad.image_token_ids))


def test_logps_match_manual_forward_and_mask_prompt_and_image_tokens(fam, scene_images, manual_response_logps):
    name, ad = fam
    scenes, imgs, wide = scene_images
    exs = [VLExample(PROMPT, S.caption(scenes[0]), [imgs[0]]), VLExample(PROMPT, "a big red circle .", [wide])]
    batch = ad.encode(exs)
    logps, mask, _ = ad.token_logps(batch)
    for i, ex in enumerate(exs):
        manual, n_prompt = manual_response_logps(ad, ex)
        assert int(mask[i].sum()) == len(manual)
        assert logps[i, : len(manual)].tolist() == pytest.approx(manual, abs=1e-5)
        # the response mask covers exactly the response (+ EOS): no image, marker or prompt token
        row = batch.response_mask[i]
        assert int(row.sum()) == len(manual) and not bool(row[:n_prompt].any())
        assert _n_image_tokens(ad, batch.input_ids[i, :n_prompt]) > 0


def test_saved_tiny_model_loads_through_auto_classes(fam, scene_images, tmp_path):
    """``load_vlm`` (AutoModelForImageTextToText / AutoProcessor, local files only) restores the same scores."""
    from mmalign.vision_lm.adapter import load_vlm

    name, ad = fam
    scenes, imgs, _ = scene_images
    ad.model.save_pretrained(tmp_path)
    ad.processor.save_pretrained(tmp_path)
    model, processor = load_vlm(str(tmp_path), device="cpu", dtype="float32")
    assert type(model) is type(ad.model)
    ex = [VLExample(PROMPT, S.caption(scenes[0]), [imgs[0]])]
    loaded = VLMAdapter(model.eval(), processor)
    with torch.no_grad():
        want = ad.sequence_logps(ad.encode(ex))
        assert torch.allclose(loaded.sequence_logps(loaded.encode(ex)), want, atol=1e-6)
    # the bf16 path (the default on a bf16 GPU), run here on the CPU: bf16 weights, float32 log-probs, close
    model16, processor16 = load_vlm(str(tmp_path), device="cpu", dtype="bfloat16")
    assert next(model16.parameters()).dtype == torch.bfloat16
    half = VLMAdapter(model16.eval(), processor16)
    with torch.no_grad():
        got = half.sequence_logps(half.encode(ex))
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-2), (got, want)


def test_family_image_layouts(fam, scene_images):
    name, ad = fam
    _, imgs, wide = scene_images
    sq, wd = ad.encode([VLExample(PROMPT, "a", [imgs[0]])]), ad.encode([VLExample(PROMPT, "a", [wide])])
    n_sq, n_wd = _n_image_tokens(ad, sq.input_ids), _n_image_tokens(ad, wd.input_ids)
    if name == "llava":
        assert sq.vision["pixel_values"].shape == wd.vision["pixel_values"].shape == (1, 3, 32, 32)
        assert n_sq == n_wd == 16  # CLIP resize + crop: every image is one 32x32 view
    elif name == "llava_next":
        assert sq.vision["image_sizes"].tolist() == [[32, 32]] and wd.vision["image_sizes"].tolist() == [[32, 64]]
        assert sq.vision["pixel_values"].shape[1] == 2 and wd.vision["pixel_values"].shape[1] == 3  # base + tiles
        want = ad.processor._get_num_multimodal_tokens(image_sizes=[[32, 32], [32, 64]])["num_image_tokens"]
        assert [n_sq, n_wd] == want == [10, 14]  # base 2x2 + unpadded tiles + one newline per row
    else:
        assert sq.vision["pixel_values"].shape[1] == 5 and wd.vision["pixel_values"].shape[1] == 3  # tiles + global
        assert sq.vision["pixel_attention_mask"].shape == (1, 5, 32, 32)
        seq = ad.processor.image_seq_len
        assert (n_sq, n_wd) == (5 * seq, 3 * seq)
        fake = ad.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
        assert int((sq.input_ids == fake).sum()) == 5 + 1  # one before every sub-image, one closing the global view


def test_mixed_layouts_concatenate_to_the_separate_forwards(fam, scene_images):
    name, ad = fam
    scenes, imgs, wide = scene_images
    a = ad.encode([VLExample(PROMPT, S.caption(scenes[i]), [imgs[i]]) for i in range(2)])
    b = ad.encode([VLExample(PROMPT, "a big red circle .", [wide]), VLExample(PROMPT, "a", [wide])])
    with torch.no_grad():
        (la, _, _), (lb, _, _) = ad.branch_logps([a, b])
        sa, sb = ad.sequence_logps(a), ad.sequence_logps(b)
    assert torch.allclose(la.sum(1), sa, atol=1e-5) and torch.allclose(lb.sum(1), sb, atol=1e-5)
    if name != "llava":  # the sub-image dim was padded with all-zero images, which the model must ignore
        cat = concat_batches([a, b])
        assert cat.vision["pixel_values"].shape[1] == max(a.vision["pixel_values"].shape[1],
                                                          b.vision["pixel_values"].shape[1])


def test_shared_image_features_equal_per_branch_encoding(fam, scene_images):
    _, ad = fam
    scenes, imgs, _ = scene_images
    chosen = ad.encode([VLExample(PROMPT, S.caption(s), [im]) for s, im in zip(scenes[:2], imgs[:2])])
    rejected = ad.encode([VLExample(PROMPT, "a big red circle .", [im]) for im in imgs[:2]])
    assert ad._shared_image_features([chosen, rejected]) is not None
    plain = VLMAdapter(ad.model, ad.processor, share_images=False)
    with torch.no_grad():
        for got, want in zip(ad.branch_logps([chosen, rejected]), plain.branch_logps([chosen, rejected])):
            assert torch.allclose(got[0], want[0], atol=1e-5)


def test_hidden_image_tokens_and_several_images(fam, scene_images):
    _, ad = fam
    scenes, imgs, wide = scene_images
    batch = ad.encode([VLExample(PROMPT, S.caption(scenes[0]), [imgs[0]]), VLExample(PROMPT, "a", [wide])])
    with torch.no_grad():
        plain = ad.sequence_logps(batch)
        assert torch.equal(plain, ad.sequence_logps(batch, rho=0.0))
        assert (ad.sequence_logps(batch, rho=1.0) - plain).abs().min() > 1e-5
        two = "<image> <image> describe :"
        x = ad.sequence_logps(ad.encode([VLExample(two, "a big red circle .", [imgs[0], imgs[1]])]))
        y = ad.sequence_logps(ad.encode([VLExample(two, "a big red circle .", [imgs[0], imgs[2]])]))
    assert abs(float(x - y)) > 1e-6  # the second image is read too


def test_skip_invalid_keeps_the_right_vision_rows(fam, scene_images):
    _, ad = fam
    scenes, imgs, wide = scene_images
    exs = [VLExample(PROMPT, "a", [imgs[0]]), VLExample(PROMPT, S.caption(scenes[1]) * 4, [imgs[1]]),
           VLExample(PROMPT, "a big", [wide])]
    longest_kept = max(len(ad.encode([e]).input_ids[0]) for e in (exs[0], exs[2]))
    short = VLMAdapter(ad.model, ad.processor, max_length=longest_kept, skip_invalid=True)
    batch = short.encode(exs)
    assert short.num_skipped == 1 and batch.index == [0, 2]
    with torch.no_grad():
        alone = torch.cat([ad.sequence_logps(ad.encode([e])) for e in (exs[0], exs[2])])
        assert torch.allclose(ad.sequence_logps(batch), alone, atol=1e-5)


def test_preference_objectives_train_through_lora(fam, scene_images):
    """At LoRA's zero init the policy is the reference (DPO = log 2, Re-Align = 2 log 2, RRPO's KL = 0); a few
    DPO steps then raise the margin, so gradients reach the family's decoder through the image-conditioned path."""
    from peft import LoraConfig, get_peft_model

    from mmalign.vision_lm.benchmark import corrupt_pairs

    name, ad = fam
    scenes, imgs, wide = scene_images
    pairs = corrupt_pairs(scenes, imgs, np.random.default_rng(0))
    pairs = [PrefPair(p.prompt, p.chosen, p.rejected, p.images, retrieved_images=[wide]) for p in pairs]
    items = list(enumerate(pairs))
    model, processor = build_tiny_vlm(name, S.vocabulary(), seed=1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pad = VLMAdapter(model, processor)
    for method, want in (("dpo", math.log(2)), ("realign", 2 * math.log(2)), ("rrpo", math.log(2))):
        col = PairCollator(pad, with_retrieved=method == "realign", with_segments=method == "rrpo")
        loss, m = PreferenceObjective(pad, method)(model, col(items))
        assert loss.item() == pytest.approx(want, abs=1e-5), method
        if method == "rrpo":
            assert abs(float(m["rrpo/token_kl"])) < 1e-6
    objective, batch = PreferenceObjective(pad, "dpo", beta=0.5), PairCollator(pad)(items)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(6):
        loss, m = objective(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    loss, m = objective(model, batch)
    assert loss.item() < math.log(2) - 0.02 and float(m["rewards/margin"]) > 0


def test_bdhs_and_realign_builders_run(fam, scene_images):
    _, ad = fam
    scenes, imgs, _ = scene_images
    caps = [VLExample(PROMPT, S.caption(s), [im]) for s, im in zip(scenes[:2], imgs[:2])]
    out, stats = M.bdhs_rejected(ad, caps, rng=np.random.default_rng(0), generator=torch.Generator().manual_seed(0),
                                 max_new_tokens=6, max_tries=2)
    assert len(out) == 2 and all(r != ex.response for r, ex in zip(out, caps))
    assert 1 <= stats["bdhs/mean_tries"] <= 2
    emb = M.vision_embeddings(ad, imgs)
    assert emb.shape[0] == len(imgs) and torch.allclose(emb.norm(dim=1), torch.ones(len(imgs)), atol=1e-5)
    assert (emb[0] - emb[1]).abs().max() > 1e-4  # one embedding per image, not one for the whole batch
    maskable = {**{w: "shape" for w in S.SHAPES}, **{w: "color" for w in S.COLORS}}
    pairs = M.RealignBuilder(ad, M.ImageIndex(emb), maskable, top_k=2).build(
        [PROMPT] * len(scenes), [S.caption(s) for s in scenes], imgs)
    for p in pairs:
        assert p.similarity < 0.95 and p.retrieved != p.index
        assert len(p.chosen.split()) == len(p.rejected.split())


@pytest.mark.parametrize("family,kw", [
    ("llava_next", {"method": "realign", "pair_source": "realign"}),
    ("idefics3", {"method": "dpo", "pair_source": "bdhs", "bdhs_online_prob": 0.5}),
    ("smolvlm", {"method": "rrpo"}),
])
def test_train_job_runs_on_each_family(family, kw, tmp_path):
    import json

    from mmalign.vision_lm.train import VLMTrainConfig, run

    cfg = VLMTrainConfig.from_dict({
        "family": family, "sft_steps": 0, "n_scenes": 4, "max_length": 96, **kw,
        "trainer": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "progress": False, "plots": False, "cpu": True,
                    "log_every": 1, "lora": {"enabled": True, "r": 4, "alpha": 8.0}}})
    out = run(cfg, tmp_path)
    assert out["step"] == 2 and math.isfinite(out["train/loss"])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margin" in x for x in lines)
    with pytest.raises(ValueError, match="family"):
        VLMTrainConfig.from_dict({"family": "qwen3_vl"})


def test_smolvlm_uses_its_own_processor_with_idefics3_image_prompts(scene_images):
    """SmolVLM is built with ``SmolVLMProcessor`` (needs ``num2words``); for images its prompt strings, token ids and
    pixels equal the Idefics3 processor's, and its video processor is SmolVLM's."""
    from transformers import SmolVLMProcessor, SmolVLMVideoProcessor

    from mmalign.vision_lm.families import family_processor, family_tokenizer, tiny_family_config

    _, imgs, wide = scene_images
    procs = {}
    for name in ("idefics3", "smolvlm"):
        tok = family_tokenizer(name, S.vocabulary())
        procs[name] = family_processor(name, tok, tiny_family_config(name, len(tok)))
    assert type(procs["smolvlm"]) is SmolVLMProcessor
    assert isinstance(procs["smolvlm"].video_processor, SmolVLMVideoProcessor)
    assert type(procs["idefics3"]).__name__ == "Idefics3Processor"
    for im in (imgs[0], wide):
        a, b = (procs[n](images=[[im]], text=[PROMPT], return_tensors="pt") for n in ("smolvlm", "idefics3"))
        assert a["input_ids"].tolist() == b["input_ids"].tolist()
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["pixel_attention_mask"], b["pixel_attention_mask"])


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_image_view_and_vision_pretraining_per_family(family, scene_images):
    """With patch 16 every family's whole-image view has one tower patch per scene grid cell, the view is the image
    itself (up to the family's resampling), and the per-cell pre-training changes the tower the model uses."""
    from mmalign.vision_lm.families import whole_image_patch_features
    from mmalign.vision_lm.testbed import pretrain_vision_tower

    scenes, imgs, _ = scene_images
    model, processor = build_tiny_vlm(family, S.vocabulary(), seed=0, patch_size=16)
    tower, pix, feats = whole_image_patch_features(model, processor, imgs)
    assert pix.shape == (len(imgs), 3, 32, 32)
    # pixels scaled to [-1, 1]: the view is the scene image, not a tile of it
    direct = torch.as_tensor(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (pix - direct).abs().mean() < 0.05
    with torch.no_grad():
        before = feats(pix)
    assert before.shape == (len(imgs), S.GRID * S.GRID, tower.config.hidden_size)
    acc = pretrain_vision_tower(model, scenes, imgs, processor, steps=3, batch_size=4, seed=0)
    assert 0.0 <= acc <= 1.0
    inner = model.model
    assert tower is (inner.vision_model if family in ("idefics3", "smolvlm") else inner.vision_tower)
    with torch.no_grad():
        assert (feats(pix) - before).abs().max() > 1e-4
    # several patches per cell (patch 8: 4 per cell) are labelled by their cell; a patch wider than a cell is refused
    fine, proc = build_tiny_vlm(family, S.vocabulary(), seed=0, patch_size=8)
    assert 0.0 <= pretrain_vision_tower(fine, scenes, imgs, proc, steps=1, batch_size=4) <= 1.0
    if family == "llava":
        from mmalign.vision_lm.tiny import build_tiny_llava

        coarse, proc = build_tiny_llava(S.vocabulary(), seed=0, patch_size=32)
        with pytest.raises(ValueError, match="whole number of patches per grid cell"):
            pretrain_vision_tower(coarse, scenes, imgs, proc, steps=1)
