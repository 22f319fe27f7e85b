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
    # the same model id with other weights (re-trained or re-initialised reference) is a different key too
    w = next(p for p in llava.base_model.parameters() if p.dim() == 2)
    with torch.no_grad():
        w[0, 0] += 1e-3
    try:
        _, path4, hit4 = reference_cache(col, pairs, tmp_path, "tiny")
    finally:
        with torch.no_grad():
            w[0, 0] -= 1e-3
    assert not hit4 and path4 != path


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


# ------------------------------------------------------------------------------- Qwen2-VL: M-RoPE with BDHS, generate
QWEN_PROMPT = "<|vision_start|> <|image_pad|> <|vision_end|> describe :"


def _qwen_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(n)]


def test_qwen2vl_hiding_image_tokens_keeps_mrope_positions(qwen2vl):
    """BDHS only hides image tokens from attention: Qwen2-VL's 3-D positions (laid out by the model from the
    attention mask) are those of the unhidden sequence for every rho; 0 < rho < 1 runs (it crashed with a shape
    mismatch) and rho = 1 no longer shifts every later token's position."""
    ad = qwen2vl
    imgs = _qwen_images(2)
    batch = ad.encode([VLExample(QWEN_PROMPT, "a red circle", [imgs[0]]), VLExample(QWEN_PROMPT, "a", [imgs[1]])])
    seen = []
    hook = ad.model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            scores = {rho: ad.sequence_logps(batch, rho=rho, generator=torch.Generator().manual_seed(0))
                      for rho in (0.0, 0.5, 1.0)}
            (c, _, _), (r, _, _) = ad.branch_logps([batch, batch], rhos=[0.0, 0.5],
                                                   generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(seen) == 4 and seen[0].shape == (3, 2, batch.input_ids.shape[1])
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])
    assert torch.equal(seen[3], torch.cat([seen[0], seen[0]], dim=1))  # concatenated branches, per-branch rho
    assert (scores[0.5] - scores[0.0]).abs().max() > 1e-6 and (scores[1.0] - scores[0.0]).abs().min() > 1e-6
    assert torch.allclose(c.sum(1), scores[0.0], atol=1e-5)


def test_qwen2vl_generate_batched_equals_alone_and_a_full_recompute(qwen2vl):
    """generate() runs on Qwen2-VL (mm_token_type_ids are passed, left-padded with the ids), and left padding keeps
    the M-RoPE image layout: batched rows equal each row alone, which equals greedy decoding by full forwards where
    the model lays out its positions itself; with the image hidden too (rho = 1 hides every image token)."""
    ad = qwen2vl
    imgs = _qwen_images(3, seed=2)
    exs = [VLExample(QWEN_PROMPT, "", [imgs[0]]), VLExample(QWEN_PROMPT, "a red circle", [imgs[1]]),
           VLExample(QWEN_PROMPT, "a", [imgs[2]])]
    alone = {}
    for rho in (0.0, 1.0):
        batched = ad.generate(exs, max_new_tokens=4, rho=rho)
        alone[rho] = [ad.generate([e], max_new_tokens=4, rho=rho)[0] for e in exs]
        assert batched == alone[rho] and any(t for t in batched)
    tok, pad, eos = ad.tokenizer, ad.tokenizer.pad_token_id, ad.tokenizer.eos_token_id
    for ex, got in zip(exs, alone[0.0]):  # transformers' own generate lays out the positions itself
        b = ad.encode([ex])
        with torch.no_grad():
            ids = ad.model.generate(input_ids=b.input_ids[:, :-1], attention_mask=b.attention_mask[:, :-1],
                                    mm_token_type_ids=b.extra_tokens["mm_token_type_ids"][:, :-1], **b.vision,
                                    max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        new = ids[0, b.input_ids.shape[1] - 1:].tolist()
        out = new[: next((i for i, t in enumerate(new) if t in (pad, eos)), len(new))]
        assert got == tok.decode(out, skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------- eval mode, tokenizers without EOS/pad
def _dropout_llava(p=0.5):
    from transformers import AutoModelForImageTextToText

    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.tiny import build_processor, build_tokenizer, tiny_llava_config

    tok = build_tokenizer(S.vocabulary())
    cfg = tiny_llava_config(len(tok), vision_dim=32, text_dim=32)
    cfg.text_config.attention_dropout = p
    cfg.vision_config.attention_dropout = p
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg)
    return VLMAdapter(model, build_processor(tok, image_size=cfg.vision_config.image_size,
                                             patch_size=cfg.vision_config.patch_size))


def test_scoring_helpers_run_in_eval_mode_and_restore_the_mode(images):
    """next_token_logits (Re-Align filling, POPE) and vision_embeddings (retrieval) are deterministic under dropout
    even when the model is in training mode, equal the eval-mode values, and leave the mode as it was."""
    from mmalign.vision_lm import methods as M

    scenes, imgs = images
    ad = _dropout_llava()
    exs = [VLExample("<image> is there a circle ?", "", [imgs[0]]), VLExample(PROMPT, "a big", [imgs[1]])]
    ad.model.eval()
    want_logits, want_emb = ad.next_token_logits(exs), M.vision_embeddings(ad, imgs[:3])
    assert not ad.model.training
    ad.model.train()
    torch.manual_seed(1)
    a, ea = ad.next_token_logits(exs), M.vision_embeddings(ad, imgs[:3])
    b, eb = ad.next_token_logits(exs), M.vision_embeddings(ad, imgs[:3])
    assert ad.model.training and all(m.training for m in ad.model.modules())
    assert torch.equal(a, b) and torch.equal(a, want_logits)
    assert torch.equal(ea, eb) and torch.equal(ea, want_emb)


def test_generate_and_next_token_logits_without_eos_or_pad_token(images):
    """A tokenizer without EOS: generate() must not drop the last real context token (it stripped one assuming
    encode() had appended EOS) and next_token_logits must predict the token after the response. Without a pad
    token, a generated id 0 is a real token, not the end of the text."""
    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.tiny import build_tiny_llava

    _, imgs = images
    model, proc = build_tiny_llava(S.vocabulary(), seed=0, vision_dim=32, text_dim=32)
    model.eval()
    with_eos = VLMAdapter(model, proc)
    ex = VLExample(PROMPT, "a big", [imgs[0]])
    want_logits = with_eos.next_token_logits([ex])
    _, proc2 = build_tiny_llava(S.vocabulary(), seed=0, vision_dim=32, text_dim=32)
    proc2.tokenizer.eos_token = None
    ad = VLMAdapter(model, proc2)
    assert ad.tokenizer.eos_token_id is None
    first_ids = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: first_ids.append(kwargs["input_ids"].clone()) if not first_ids else None,
        with_kwargs=True)
    try:
        ad.generate([ex], max_new_tokens=2)
    finally:
        hook.remove()
    context = ad.tokenizer("a big", add_special_tokens=False)["input_ids"]
    assert first_ids[0][0, -2:].tolist() == context
    assert torch.allclose(ad.next_token_logits([ex]), want_logits, atol=1e-5)

    proc2.tokenizer.eos_token, proc2.tokenizer.pad_token = "<eos>", None
    ad = VLMAdapter(model, proc2)
    assert ad.tokenizer.pad_token_id is None
    red, eos = ad.tokenizer.convert_tokens_to_ids("red"), ad.tokenizer.eos_token_id
    script = iter([0, red, eos])

    def force(mod, args, kwargs, out):  # the model "generates" id 0, then "red", then EOS
        tok = next(script)
        out.logits[:, -1] = -1e4
        out.logits[:, -1, tok] = 1e4
        return out

    hook = model.register_forward_hook(force, with_kwargs=True)
    try:
        got = ad.generate([ex], max_new_tokens=5)
    finally:
        hook.remove()
    assert got == [ad.tokenizer.decode([0, red], skip_special_tokens=True).strip()] and "red" in got[0]


# ------------------------------------------------------------------------------- RRPO with online BDHS
def test_rrpo_online_regeneration_recomputes_phrase_segments(images):
    """Online BDHS replaces the rejected answer: RRPO must align the phrases of the NEW pair (it used the old
    pair's segments), and the loss equals the offline loss of the regenerated pair; supplied (tagged) segment ids of
    the old rejected answer are dropped for regenerated rows."""
    import mmalign.core.losses.rrpo as R
    from peft import LoraConfig, get_peft_model

    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.objectives import PreferenceObjective, segments_for
    from mmalign.vision_lm.tiny import build_tiny_llava

    _, imgs = images
    model, proc = build_tiny_llava(S.vocabulary(), seed=0, vision_dim=32, text_dim=32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False)).eval()  # policy != reference
    ad = VLMAdapter(model, proc)
    new = "a small red circle ."
    pairs = [PrefPair(PROMPT, "a big red circle .", "a big blue circle .", [imgs[0]]),
             PrefPair(PROMPT, "a big red circle .", "a big red bar .", [imgs[1]],
                      chosen_segments=[0, 0, 0, 1, 0], rejected_segments=[0, 0, 0, 1, 0])]
    batch = PairCollator(ad, with_segments=True, keep_raw=True)(list(enumerate(pairs)))
    seen = []
    orig = R.rrpo_loss

    def spy(*args, **kwargs):
        seen.append((args[4].tolist(), args[5].tolist()))
        return orig(*args, **kwargs)

    R.rrpo_loss = spy
    try:
        online = PreferenceObjective(ad, "rrpo", online=lambda a, ps: [new for _ in ps], online_prob=1.0)
        with torch.no_grad():
            loss, _ = online(model, batch)
            regenerated = [PrefPair(p.prompt, p.chosen, new, p.images) for p in pairs]
            want, _ = PreferenceObjective(ad, "rrpo")(
                model, PairCollator(ad, with_segments=True)(list(enumerate(regenerated))))
    finally:
        R.rrpo_loss = orig
    seg_c, seg_r = segments_for(ad.tokenizer, regenerated[0])
    _, old_r = segments_for(ad.tokenizer, pairs[0])
    assert seg_r == [0, 1, 0, 0, 0] and old_r == [0, 0, 1, 0, 0]  # old pair's phrase on "blue", the new on "small"
    assert seen[0] == ([seg_c + [0]] * 2, [seg_r + [0]] * 2)  # + the EOS slot, for both rows
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
