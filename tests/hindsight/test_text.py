"""Text form: templated dialogues round-trip, local word-level tokenizer, tiny causal LM trained with the DPO core."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mmalign.core.losses import dpo_loss
from mmalign.hindsight import market as mk
from mmalign.hindsight.text import (
    build_tiny_lm,
    candidate_logps,
    build_tokenizer,
    parse_reply,
    preference_rows,
    render_prompt,
    render_reply,
    reply_logps,
)

PARAMS = mk.MarketParams()


def test_every_action_round_trips() -> None:
    for rec, *claims in itertools.product(range(4), range(3), range(3), range(3)):
        text = render_reply(rec, claims)
        assert parse_reply(text, 3) == (rec, claims)


def test_parse_rejects_malformed() -> None:
    with pytest.raises(ValueError, match="text"):
        parse_reply("buy option a now", 3)
    with pytest.raises(ValueError, match="one claim per option"):
        parse_reply("i recommend option a . option a has the feature .", 3)


def test_parse_rejects_an_option_letter_past_the_last_item() -> None:
    # "option d" with 3 items is malformed, not "recommend none" (index 3 = M is the code of "none")
    claims = " option a no comment . option b no comment . option c no comment ."
    assert parse_reply("i recommend none of them ." + claims, 3) == (3, [2, 2, 2])
    with pytest.raises(ValueError, match="recommend one of options a..c"):
        parse_reply("i recommend option d ." + claims, 3)


def test_prompt_holds_private_notes_and_tokenizer_covers_vocabulary() -> None:
    tok = build_tokenizer(PARAMS)
    sc = mk.sample_scenarios(np.random.default_rng(0), 200, PARAMS)
    for i in range(len(sc)):
        prompt = render_prompt(sc, i)
        assert "notes :" in prompt and prompt.endswith("seller :")
        ids = tok(prompt + " " + render_reply(i % 4, [i % 3, 2, 1]))["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == prompt + " " + render_reply(i % 4, [i % 3, 2, 1])


def test_preference_rows_are_trl_columns() -> None:
    sc = mk.sample_scenarios(np.random.default_rng(1), 3, PARAMS)
    chosen = (np.array([0, 1, 3]), np.array([[0, 1, 2]] * 3))
    rejected = (np.array([2, 2, 2]), np.array([[2, 2, 2]] * 3))
    rows = preference_rows(sc, chosen, rejected)
    assert set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert parse_reply(rows[2]["chosen"], 3) == (3, [0, 1, 2])


def test_tiny_lm_dpo_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    tok = build_tokenizer(PARAMS)
    policy = build_tiny_lm(len(tok), seed=0)
    reference = build_tiny_lm(len(tok), seed=0).eval()
    sc = mk.sample_scenarios(np.random.default_rng(2), 8, PARAMS)
    honest = (np.full(8, 3), np.where(sc.status == 1, mk.CLAIM_HAS, mk.CLAIM_LACKS))
    liar = (np.full(8, 3), np.full((8, 3), mk.CLAIM_HAS))
    rows = preference_rows(sc, honest, liar)
    prompts = [r["prompt"] for r in rows]
    with torch.no_grad():
        ref_w = reply_logps(reference, tok, prompts, [r["chosen"] for r in rows])
        ref_l = reply_logps(reference, tok, prompts, [r["rejected"] for r in rows])
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        pw = reply_logps(policy, tok, prompts, [r["chosen"] for r in rows])
        pl = reply_logps(policy, tok, prompts, [r["rejected"] for r in rows])
        loss, metrics = dpo_loss(pw, pl, ref_w, ref_l, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(float(np.log(2)), abs=1e-4)  # policy == reference at the start
    assert losses[-1] < losses[0] - 0.05


def test_reply_logps_scores_only_the_reply() -> None:
    tok = build_tokenizer(PARAMS)
    lm = build_tiny_lm(len(tok), seed=1).eval()
    sc = mk.sample_scenarios(np.random.default_rng(3), 2, PARAMS)
    reply = render_reply(0, [0, 1, 2])
    with torch.no_grad():
        batch = reply_logps(lm, tok, [render_prompt(sc, 0), render_prompt(sc, 1)], [reply, reply + " option a"])
        single = reply_logps(lm, tok, [render_prompt(sc, 0)], [reply])
    assert batch.shape == (2,) and torch.allclose(batch[0], single[0], atol=1e-5)  # padding does not leak
    with pytest.raises(ValueError, match="equal length"):
        reply_logps(lm, tok, ["a"], [])


def test_candidate_logps_match_full_scoring() -> None:
    tok = build_tokenizer(PARAMS)
    lm = build_tiny_lm(len(tok), seed=2).eval()
    sc = mk.sample_scenarios(np.random.default_rng(4), 1, PARAMS)
    replies = [render_reply(r, c) for r, c in [(0, [0, 1, 2]), (3, [2, 2, 2]), (1, [1, 0, 0])]]
    with torch.no_grad():
        shared = candidate_logps(lm, tok, render_prompt(sc, 0), replies)
        full = reply_logps(lm, tok, [render_prompt(sc, 0)] * 3, replies)
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=0)
