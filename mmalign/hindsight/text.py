"""Text form of the marketplace: templated seller dialogues, a local word-level tokenizer and a tiny causal LM.

A scenario becomes a prompt (the customer's request with prices, plus the seller's private notes on which item has
the feature, as in RLHS's seller prompt "Additional information that you know but is not available to customers")
and an action becomes the seller's reply. :func:`parse_reply` inverts :func:`render_reply`, so preference pairs
labelled in the tabular market turn into TRL-style ``prompt`` / ``chosen`` / ``rejected`` rows and back. Everything
is built locally (no hub downloads): the vocabulary is the closed set of template words.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from mmalign.hindsight import market as mk

__all__ = [
    "FEATURES",
    "OPTION_NAMES",
    "render_prompt",
    "render_reply",
    "parse_reply",
    "render_dialogue",
    "preference_rows",
    "vocabulary",
    "build_tokenizer",
    "build_tiny_lm",
    "reply_logps",
    "encode_replies",
    "sequence_logps",
    "candidate_logps",
]

FEATURES = (
    "8k resolution",
    "noise cancelling",
    "fast charging",
    "water resistance",
    "voice control",
    "energy saving",
    "touch screen",
    "wireless sync",
)
OPTION_NAMES = ("a", "b", "c", "d", "e")
_CLAIM_TEXT = {mk.CLAIM_HAS: "has the feature", mk.CLAIM_LACKS: "lacks the feature", mk.SILENT: "no comment"}
_PRICE_STEP = 50


def _dollars(price: float) -> str:
    # prices are in units of $1000, binned to $50 so the word-level vocabulary stays small
    return str(int(round(price * 1000 / _PRICE_STEP)) * _PRICE_STEP)


def render_prompt(scen: mk.Scenarios, i: int) -> str:
    """Customer request and prices, then the seller's private notes (hidden status), ending at ``seller :``."""
    m = scen.status.shape[1]
    feature = FEATURES[int(scen.feature[i]) % len(FEATURES)]
    parts = [f"customer : i need a product with {feature} ."]
    parts += [f"option {OPTION_NAMES[j]} costs {_dollars(scen.prices[i, j])} dollars ." for j in range(m)]
    parts.append("which one do you recommend ? notes :")
    parts += [f"option {OPTION_NAMES[j]} {'has' if scen.status[i, j] else 'lacks'} it ." for j in range(m)]
    parts.append("seller :")
    return " ".join(parts)


def render_reply(recommend: int, claims: Sequence[int]) -> str:
    """The seller's reply for one action: the recommendation, then one sentence per item."""
    m = len(claims)
    head = "i recommend none of them ." if recommend >= m else f"i recommend option {OPTION_NAMES[recommend]} ."
    body = [f"option {OPTION_NAMES[j]} {_CLAIM_TEXT[int(c)]} ." for j, c in enumerate(claims)]
    return " ".join([head, *body])


_HEAD = re.compile(r"^i recommend (?:option ([a-e])|none of them) \.")
_BODY = re.compile(r"option ([a-e]) (has the feature|lacks the feature|no comment) \.")


def parse_reply(text: str, n_items: int) -> tuple[int, list[int]]:
    """Invert :func:`render_reply`; raises ``ValueError`` on text that is not a well-formed reply."""
    text = " ".join(text.split())
    head = _HEAD.match(text)
    if head is None:
        raise ValueError(f"text must start with 'i recommend option X .' or 'i recommend none of them .', got {text!r}")
    recommend = n_items if head.group(1) is None else OPTION_NAMES.index(head.group(1))
    found = _BODY.findall(text[head.end() :])
    inverse = {v: k for k, v in _CLAIM_TEXT.items()}
    if head.group(1) is not None and recommend >= n_items:  # an option letter past the last item is not "none"
        raise ValueError(f"text must recommend one of options a..{OPTION_NAMES[n_items - 1]} or none, got {text!r}")
    if [OPTION_NAMES.index(o) for o, _ in found] != list(range(n_items)):
        raise ValueError(f"text must state one claim per option a..{OPTION_NAMES[n_items - 1]} in order, got {text!r}")
    return recommend, [inverse[c] for _, c in found]


def render_dialogue(scen: mk.Scenarios, i: int, recommend: int | None, claims: Sequence[int] | None) -> str:
    """Prompt plus reply (or the prompt alone before the seller has acted), for ``render_mode='ansi'``."""
    prompt = render_prompt(scen, i)
    if recommend is None or claims is None:
        return prompt
    return f"{prompt} {render_reply(int(recommend), list(claims))}"


def preference_rows(
    scen: mk.Scenarios, chosen: tuple[np.ndarray, np.ndarray], rejected: tuple[np.ndarray, np.ndarray]
) -> list[dict[str, str]]:
    """TRL-style rows ``{prompt, chosen, rejected}``; ``chosen``/``rejected`` are (recommend (n,), claims (n, M))."""
    rows = []
    for i in range(len(scen)):
        rows.append(
            {
                "prompt": render_prompt(scen, i),
                "chosen": render_reply(int(chosen[0][i]), chosen[1][i].tolist()),
                "rejected": render_reply(int(rejected[0][i]), rejected[1][i].tolist()),
            }
        )
    return rows


def vocabulary(params: mk.MarketParams) -> list[str]:
    """Every word the templates can produce (prices over the configured ranges included)."""
    words: set[str] = set()
    for f in FEATURES:
        words.update(f.split())
    words.update(OPTION_NAMES[: params.n_items])
    for text in (
        "customer : i need a product with . option costs dollars . which one do you recommend ? notes :",
        "has lacks it . seller : i recommend none of them . the feature no comment",
    ):
        words.update(text.split())
    lo = min(r[0] for r in params.price_ranges)
    hi = max(r[1] for r in params.price_ranges)
    for cents in range(int(np.floor(lo * 1000 / _PRICE_STEP)), int(np.ceil(hi * 1000 / _PRICE_STEP)) + 1):
        words.add(str(cents * _PRICE_STEP))
    return sorted(words)


def build_tokenizer(params: mk.MarketParams) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` (built locally, whitespace split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary(params))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def build_tiny_lm(vocab_size: int, *, seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_positions: int = 128) -> Any:
    """A randomly initialised tiny GPT-2 built from config (no weights downloaded)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=2,
        bos_token_id=2, eos_token_id=3, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def encode_replies(tokenizer: Any, prompts: Sequence[str], replies: Sequence[str], width: int | None = None) -> dict:
    """``<bos> prompt reply <eos>`` right-padded: ``input_ids``, ``attention_mask``, ``target_mask`` ``[N, L]``.

    Prompt and reply are tokenised separately, so ``target_mask`` marks exactly the reply's tokens and ``<eos>``
    (the positions whose log-probabilities :func:`sequence_logps` sums). ``width`` pads to a fixed length.
    """
    import torch

    if len(prompts) != len(replies):
        raise ValueError(f"prompts and replies must have equal length, got {len(prompts)} and {len(replies)}")
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(replies), add_special_tokens=False)["input_ids"]
    seqs = [[tokenizer.bos_token_id, *p, *r, tokenizer.eos_token_id] for p, r in zip(p_ids, r_ids)]
    longest = max(len(x) for x in seqs)
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"width must be >= the longest sequence ({longest} tokens), got {width}")
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    target = torch.zeros((len(seqs), width), dtype=torch.bool)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, (seq, p) in enumerate(zip(seqs, p_ids)):
        ids[k, : len(seq)] = torch.tensor(seq)
        attn[k, : len(seq)] = 1
        target[k, 1 + len(p) : len(seq)] = True
    return {"input_ids": ids, "attention_mask": attn, "target_mask": target}


def sequence_logps(model: Any, input_ids: Any, attention_mask: Any, target_mask: Any) -> Any:
    """Summed log-probability of the ``target_mask`` tokens of each row, shape ``[N]`` (float32)."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * target_mask[:, 1:]).sum(dim=1)


def reply_logps(model: Any, tokenizer: Any, prompts: Sequence[str], replies: Sequence[str]) -> Any:
    """Summed log-probability of each reply (plus ``<eos>``) given its prompt, shape ``[N]``."""
    enc = encode_replies(tokenizer, prompts, replies)
    device = next(model.parameters()).device
    return sequence_logps(model, *(enc[k].to(device) for k in ("input_ids", "attention_mask", "target_mask")))


def candidate_logps(model: Any, tokenizer: Any, prompt: str, replies: Sequence[str]) -> Any:
    """Summed log-probability of every reply to one prompt, shape ``[R]``, sharing the prompt's key/value cache.

    Equal to :func:`reply_logps` with the prompt repeated, ~3x cheaper: the prompt is run once and its cache is
    repeated over the candidates (right padding after ``<eos>`` cannot affect the scored positions).
    """
    import torch

    device = next(model.parameters()).device
    p_ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    out = model(input_ids=torch.tensor([p_ids], device=device), use_cache=True)
    cache, last = out.past_key_values, out.logits[:, -1]
    r_ids = tokenizer(list(replies), add_special_tokens=False)["input_ids"]
    width = max(len(r) for r in r_ids) + 1
    ids = torch.full((len(r_ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(r_ids), width), dtype=torch.bool)
    for k, r in enumerate(r_ids):
        ids[k, : len(r) + 1] = torch.tensor([*r, tokenizer.eos_token_id])
        mask[k, : len(r) + 1] = True
    ids, mask = ids.to(device), mask.to(device)
    cache.batch_repeat_interleave(len(r_ids))
    attn = torch.ones((len(r_ids), len(p_ids) + width), dtype=torch.long, device=device)
    logits = model(input_ids=ids, past_key_values=cache, attention_mask=attn).logits[:, :-1]
    logits = torch.cat([last.expand(len(r_ids), -1)[:, None], logits], dim=1)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, :, None]).squeeze(-1)
    return (logp * mask).sum(dim=1)
