"""Phrase alignment (RRPO), Re-Align retrieval and filling, BDHS sampling on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmalign.vision_lm import methods as M
from mmalign.vision_lm import scenes as S
from mmalign.vision_lm.adapter import VLExample


def test_diff_segments_replace_insert_delete():
    c, r = M.diff_segments([1, 2, 3, 4, 5], [1, 9, 3, 4, 5])
    assert (c, r) == ([0, 1, 0, 0, 0], [0, 1, 0, 0, 0])
    c, r = M.diff_segments([1, 2, 3, 4], [1, 7, 8, 3, 4, 6])  # replace 2->7 8, insert 6 at the end
    assert c == [0, 1, 0, 2] and r == [0, 1, 1, 0, 2, 2]
    c, r = M.diff_segments([1, 2, 3], [1, 3])  # deletion widened by the next equal token
    assert c == [0, 1, 1] and r == [0, 1]
    assert M.diff_segments([1, 2], [1, 2]) == ([0, 0], [0, 0])


def test_tagged_segments(llava):
    plain, seg = M.tagged_segments("a <MASK> big red </MASK> circle and a <MASK> bar </MASK> .", llava.tokenizer)
    assert plain == "a big red circle and a bar ."
    assert seg == [0, 1, 1, 0, 0, 0, 2, 0]
    with pytest.raises(ValueError, match="unbalanced"):
        M.tagged_segments("a <MASK> big red circle", llava.tokenizer)


def test_bow_cosine():
    assert M.bow_cosine("a b c", "c b a") == pytest.approx(1.0)
    assert M.bow_cosine("a b", "c d") == 0.0
    assert M.bow_cosine("a big red circle .", "a big blue circle .") == pytest.approx(0.8)


def test_image_index_topk_excludes_query():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]])
    idx = M.ImageIndex(emb)
    assert idx.topk(0, 2) == [1, 3]
    assert idx.topk(2, 1) == [3]
    with pytest.raises(ValueError, match="query"):
        idx.topk(4, 1)


def test_realign_builder_fills_masked_words_under_retrieved_image(llava, images):
    scenes, imgs = images
    emb = M.vision_embeddings(llava, imgs)
    assert emb.shape[0] == len(imgs) and torch.allclose(emb.norm(dim=1), torch.ones(len(imgs)), atol=1e-5)
    maskable = {**{w: "shape" for w in S.SHAPES}, **{w: "color" for w in S.COLORS}}
    builder = M.RealignBuilder(llava, M.ImageIndex(emb), maskable, top_k=3)
    chosen = [S.caption(s) for s in scenes]
    pairs = builder.build(["<image> describe :"] * len(scenes), chosen, imgs)
    assert pairs
    for p in pairs:
        assert p.similarity < 0.95 and p.retrieved != p.index and 1 <= p.tries <= 3
        cw, rw = p.chosen.split(), p.rejected.split()
        assert len(cw) == len(rw)
        for a, b in zip(cw, rw):  # only maskable words change, within their category
            assert a == b or maskable[a] == maskable[b]


def test_bdhs_flips_yes_no_and_continues_from_a_cut(llava, images):
    scenes, imgs = images
    yn = [VLExample("<image> is there a circle ?", "yes", [imgs[0]]), VLExample("<image> is there a bar ?", "no",
                                                                              [imgs[1]])]
    out, _ = M.bdhs_rejected(llava, yn, rng=np.random.default_rng(0), flip_prob=1.0, max_tries=2)
    assert out == ["no", "yes"]
    caps = [VLExample("<image> describe :", S.caption(s), [im]) for s, im in zip(scenes[:3], imgs[:3])]
    out, stats = M.bdhs_rejected(llava, caps, rng=np.random.default_rng(0), generator=torch.Generator().manual_seed(0),
                                 max_new_tokens=8)
    assert len(out) == 3 and 1 <= stats["bdhs/mean_tries"] <= 5
    for ex, rej in zip(caps, out):
        assert rej != ex.response
    with pytest.raises(ValueError, match="rho"):
        M.bdhs_rejected(llava, caps, rng=np.random.default_rng(0), rho=2.0)


def test_split_sentences():
    assert M.split_sentences("a b . c d ? e") == ["a b .", "c d ?", "e"]
