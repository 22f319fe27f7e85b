"""The adapter's log-probs, image hiding, per-branch images, frames, truncation guard, reference cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmalign.vision_lm import scenes as S
from mmalign.vision_lm.adapter import VLExample, hide_image_tokens
from mmalign.vision_lm.objectives import PairCollator, PrefPair
from mmalign.vision_lm.refcache import reference_cache

PROMPT = "<image> describe :"


def _examples(images, scenes, n=3):
    return [VLExample(PROMPT if i != 1 else "<image> is there a circle ?", S.caption(scenes[i]) if i != 1 else "yes",
                      [images[i]]) for i in range(n)]


def test_logps_match_manual_per_token_computation(llava, images, manual_response_logps):
    scenes, imgs = images
    exs = _examples(imgs, scenes)
    batch = llava.encode(exs)
    logps, mask, _ = llava.token_logps(batch)
    for i, ex in enumerate(exs):
        manual, _ = manual_response_logps(llava, ex)
        assert int(mask[i].sum()) == len(manual)
        assert logps[i, : len(manual)].tolist() == pytest.approx(manual, abs=1e-5)
        assert float(logps[i, len(manual):].abs().sum()) == 0.0
    assert llava.sequence_logps(batch).tolist() == pytest.approx(logps.sum(1).tolist(), abs=1e-6)


def test_concatenated_branches_equal_separate_forwards(llava, images):
    scenes, imgs = images
    a = llava.encode(_examples(imgs, scenes))
    b = llava.encode([VLExample(PROMPT, "a big red circle .", [imgs[3]]), VLExample(PROMPT, "a", [imgs[4]]),
                      VLExample(PROMPT, "a small blue bar and a big red cross .", [imgs[5]])])
    (la, ma, _), (lb, mb, _) = llava.branch_logps([a, b])
    sa, _, _ = llava.token_logps(a)
    sb, _, _ = llava.token_logps(b)
    assert torch.allclose(la, sa, atol=1e-5) and torch.allclose(lb, sb, atol=1e-5)


def test_hidden_image_forward_differs_and_equals_plain_at_rho_zero(llava, images):
    scenes, imgs = images
    batch = llava.encode(_examples(imgs, scenes))
    plain = llava.sequence_logps(batch)
    zero = llava.sequence_logps(batch, rho=0.0, generator=torch.Generator().manual_seed(0))
    hidden = llava.sequence_logps(batch, rho=0.99, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, zero)
    assert (hidden - plain).abs().min() > 1e-4
    again = llava.sequence_logps(batch, rho=0.99, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hidden, again)  # explicit generator: reproducible mask


def test_hide_image_tokens_mask():
    ids = torch.tensor([[4] * 1000 + [5, 6]])
    attn = torch.ones_like(ids)
    out = hide_image_tokens(ids, attn, [4], 0.7, torch.Generator().manual_seed(1))
    assert out[0, -2:].tolist() == [1, 1]  # text tokens are never hidden
    assert 0.25 < out[0, :1000].float().mean().item() < 0.35  # keep-fraction ~ 1 - rho
    assert torch.equal(hide_image_tokens(ids, attn, [4], 0.0), attn)
    assert hide_image_tokens(ids, attn, [4], 1.0)[0, :1000].sum() == 0
    with pytest.raises(ValueError, match="rho"):
        hide_image_tokens(ids, attn, [4], 1.5)


def test_per_branch_images_swap_flips_visual_term(images):
    from peft import LoraConfig, get_peft_model

    from mmalign.core.losses import visual_dpo_loss
    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.tiny import build_tiny_llava

    scenes, imgs = images
    model, proc = build_tiny_llava(S.vocabulary(), seed=1, vision_dim=32, text_dim=32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))  # policy != reference
    ad = VLMAdapter(model.eval(), proc)
    text = S.caption(scenes[0])
    true_img = ad.encode([VLExample(PROMPT, text, [imgs[0]])] * 2)
    other_img = ad.encode([VLExample(PROMPT, text, [imgs[1]]), VLExample(PROMPT, text, [imgs[2]])])

    def margin(v, vl):
        (pv, _, _), (pvl, _, _) = ad.branch_logps([v, vl])
        with ad.reference():
            (rv, _, _), (rvl, _, _) = ad.branch_logps([v, vl])
        _, m = visual_dpo_loss(pv.sum(1), pvl.sum(1), rv.sum(1), rvl.sum(1), beta=0.1)
        return float(m["rewards/margin"])

    forward, swapped = margin(true_img, other_img), margin(other_img, true_img)
    assert abs(forward) > 1e-4
    assert swapped == pytest.approx(-forward, rel=1e-4, abs=1e-6)


def test_several_frames_are_all_used(llava, images):
    _, imgs = images
    prompt = "<image> <image> <image> describe :"
    a = llava.encode([VLExample(prompt, "a big red circle .", [imgs[0], imgs[1], imgs[2]])])
    b = llava.encode([VLExample(prompt, "a big red circle .", [imgs[0], imgs[4], imgs[2]])])
    assert a.vision["pixel_values"].shape[0] == 3
    assert int((a.input_ids == llava.image_token_ids[0]).sum()) == 3 * 16
    assert abs(float(llava.sequence_logps(a) - llava.sequence_logps(b))) > 1e-5


def test_truncation_never_cuts_image_tokens(images):
    from mmalign.vision_lm.adapter import VLMAdapter

    scenes, imgs = images
    from mmalign.vision_lm.tiny import build_tiny_llava

    model, proc = build_tiny_llava(S.vocabulary(), seed=0, vision_dim=32, text_dim=32)
    exs = [VLExample(PROMPT, "a", [imgs[0]]), VLExample(PROMPT, S.caption(scenes[1]) * 3, [imgs[1]]),
           VLExample(PROMPT, "a big", [imgs[2]])]
    with pytest.raises(ValueError, match="image tokens.*max_length=24"):
        VLMAdapter(model, proc, max_length=24).encode(exs)
    ad = VLMAdapter(model, proc, max_length=24, skip_invalid=True)
    batch = ad.encode(exs)
    assert ad.num_skipped == 1 and batch.index == [0, 2]
    assert batch.vision["pixel_values"].shape[0] == 2
    alone = ad.encode([exs[2]])
    assert torch.equal(batch.vision["pixel_values"][1], alone.vision["pixel_values"][0])


def test_reference_cache_roundtrip_and_key(llava, images, tmp_path):
    scenes, imgs = images
    pairs = [PrefPair(PROMPT, S.caption(scenes[i]), "a big red circle .", [imgs[i]]) for i in range(4)]
    col = PairCollator(llava)
    cache, path, hit = reference_cache(col, pairs, tmp_path, "tiny", batch_size=3)
    assert not hit and path.suffix == ".safetensors"
    again, path2, hit2 = reference_cache(col, pairs, tmp_path, "tiny")
    assert hit2 and path2 == path and torch.equal(again["chosen/tokens"], cache["chosen/tokens"])
    direct = llava.sequence_logps(llava.encode([VLExample(p.prompt, p.chosen, p.images) for p in pairs]))
    assert cache["chosen/tokens"].sum(1).tolist() == pytest.approx(direct.tolist(), abs=1e-5)
    changed = pairs[:3] + [PrefPair(PROMPT, pairs[3].chosen, pairs[3].rejected, [imgs[5]])]
    _, path3, hit3 = reference_cache(col, changed, tmp_path, "tiny")
    assert not hit3 and path3 != path  # a different image is a different key
    batch = PairCollator(llava, ref_cache=cache)([(1, pairs[1]), (3, pairs[3])])
    assert torch.equal(batch["ref/chosen/tokens"].sum(1), cache["chosen/tokens"][[1, 3]].sum(1))


def test_qwen2vl_family_scores_and_hides_images(qwen2vl):
    ad = qwen2vl
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    prompt = "<|vision_start|> <|image_pad|> <|vision_end|> describe :"
    batch = ad.encode([VLExample(prompt, "a red circle", [img]), VLExample(prompt, "a blue square", [img[::-1].copy()])])
    assert "image_grid_thw" in batch.vision
    plain = ad.sequence_logps(batch)
    assert torch.equal(plain, ad.sequence_logps(batch, rho=0.0))
    assert (ad.sequence_logps(batch, rho=1.0) - plain).abs().min() > 1e-5
    (c, _, _), (r, _, _) = ad.branch_logps([batch, batch])
    assert torch.allclose(c.sum(1), plain, atol=1e-5)


def test_generate_greedy_is_deterministic_and_stops(llava, images):
    _, imgs = images
    exs = [VLExample(PROMPT, "", [imgs[0]]), VLExample(PROMPT, "a big", [imgs[1]])]
    a = llava.generate(exs, max_new_tokens=6)
    assert a == llava.generate(exs, max_new_tokens=6)
    assert all(len(t.split()) <= 6 for t in a)
    s1 = llava.generate(exs, max_new_tokens=6, rho=0.99, temperature=1.0, generator=torch.Generator().manual_seed(3))
    s2 = llava.generate(exs, max_new_tokens=6, rho=0.99, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert s1 == s2


def test_shared_image_encoding_matches_per_branch_encoding(llava, images):
    from mmalign.vision_lm.adapter import VLMAdapter

    scenes, imgs = images
    chosen = llava.encode([VLExample(PROMPT, S.caption(s), [im]) for s, im in zip(scenes[:3], imgs[:3])])
    rejected = llava.encode([VLExample(PROMPT, "a big red circle .", [im]) for im in imgs[:3]])
    other = llava.encode([VLExample(PROMPT, "a big red circle .", [im]) for im in imgs[3:6]])
    assert llava._shared_image_features([chosen, rejected]) is not None
    assert llava._shared_image_features([chosen, other]) is None  # different images: plain path
    plain = VLMAdapter(llava.model, llava.processor, share_images=False)
    for got, want in zip(llava.branch_logps([chosen, rejected]), plain.branch_logps([chosen, rejected])):
        assert torch.allclose(got[0], want[0], atol=1e-5)


def test_mask_exact_when_the_longest_row_has_a_shorter_response(llava, images):
    """A longer prompt with a shorter response (other prompt text or image layout) must not count a token twice."""
    scenes, imgs = images
    exs = [VLExample("<image> is there a circle ? is there a bar ? is there a cross ?", "yes", [imgs[0]]),
           VLExample("<image> describe :", "a big red circle and a small blue bar .", [imgs[1]])]
    batch = llava.encode(exs)
    assert int(batch.attention_mask[0].sum()) == batch.input_ids.shape[1]  # row 0 is the longest sequence
    logps, mask, _ = llava.token_logps(batch)
    assert mask.sum(1).tolist() == [2, 11]
    alone = torch.cat([llava.sequence_logps(llava.encode([e])) for e in exs])
    assert torch.allclose(logps.sum(1), alone, atol=1e-5)


def test_qwen2vl_skip_invalid_with_two_images_per_example(qwen2vl):
    """Patch rows (pixel_values) and per-image rows (image_grid_thw) of a dropped example are both removed."""
    from mmalign.vision_lm.adapter import VLMAdapter

    rng = np.random.default_rng(1)
    imgs = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(6)]
    slot = "<|vision_start|> <|image_pad|> <|vision_end|>"
    prompt = f"{slot} {slot} describe :"
    exs = [VLExample(prompt, "a red circle", imgs[0:2]), VLExample(prompt, "a red circle " * 6, imgs[2:4]),
           VLExample(prompt, "a blue square", imgs[4:6])]
    limit = qwen2vl.encode([exs[0]]).input_ids.shape[1]
    ad = VLMAdapter(qwen2vl.model, qwen2vl.processor, max_length=limit, skip_invalid=True)
    batch = ad.encode(exs)
    assert batch.index == [0, 2] and batch.vision["image_grid_thw"].shape[0] == 4
    with torch.no_grad():
        alone = torch.cat([qwen2vl.sequence_logps(qwen2vl.encode([e])) for e in (exs[0], exs[2])])
        assert torch.allclose(ad.sequence_logps(batch), alone, atol=1e-5)
