"""The user's preference data -> VLM preference pairs, checked before any model is trained.

Rows come from :func:`mmalign.data.load_preference_data` (any source, column mapping, row validation, media paths
confined to the data folder); this module adds what needs the model's processor:

- prompts in the model's chat template with its image tokens (:mod:`mmalign.vision_lm.prompts`);
- labels: a pair with label ``l`` < 0.5 is trained the other way round (chosen and rejected swapped, with their
  images) with label ``1 − l``; soft labels stay soft targets (see :mod:`mmalign.vision_lm.objectives`);
- RRPO phrase tags (``chosen_tagged`` / ``rejected_tagged`` with ``<MASK>…</MASK>``) become segment ids;
- one tokenising pass (:func:`scan_pairs`, once the model's adapter exists) that encodes every pair as training will
  and gives both the length check (over-long pairs raise naming the row, or are dropped and counted with
  ``skip_invalid``) and the out-of-vocabulary rate (tokens the tokenizer maps to its unknown token; the job refuses
  it above ``max_oov_rate``).

Images stay :class:`~mmalign.data.LazyImage` references; the collator decodes them per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from mmalign.data import DataValidationError, LazyImage, PreferenceDataset
from mmalign.vision_lm.objectives import PairCollator, PrefPair, decoded
from mmalign.vision_lm.prompts import format_prompt, response_text

__all__ = ["pairs_from_data", "PairScan", "scan_pairs"]


def _lazy(values: Any, data: PreferenceDataset) -> list[LazyImage] | None:
    if values is None:
        return None
    values = values if isinstance(values, (list, tuple)) else [values]
    return [LazyImage(v, data.base_dir, data.allow_outside) for v in values]


def pairs_from_data(data: PreferenceDataset, processor: Any, *, image_token: str | None = None) -> list[PrefPair]:
    """One :class:`PrefPair` per validated row (labels < 0.5 swapped; see the module docstring)."""
    from mmalign.vision_lm.methods import tagged_segments

    tokenizer = getattr(processor, "tokenizer", processor)
    pairs = []
    for row in data.rows:
        images = _lazy(row.get("images"), data) or []
        prompt = format_prompt(processor, row["prompt"], len(images), image_token)
        chosen, rejected = response_text(row["chosen"]), response_text(row["rejected"])
        cs = rs = None
        if row.get("chosen_tagged") is not None and row.get("rejected_tagged") is not None:
            chosen, cs = tagged_segments(row["chosen_tagged"], tokenizer)
            rejected, rs = tagged_segments(row["rejected_tagged"], tokenizer)
        videos = row.get("videos")
        if videos is not None:
            videos = [_lazy(v, data) if isinstance(v, (list, tuple)) else v for v in videos]
        pair = PrefPair(prompt, chosen, rejected, images, _lazy(row.get("rejected_images"), data),
                        _lazy(row.get("retrieved_images"), data), cs, rs, videos=videos)
        label = 1.0 if row.get("label") is None else float(row["label"])
        if label < 0.5:  # P(chosen ≻ rejected) < 1/2: the rejected answer is the preferred one
            rej_images = pair.rejected_images if pair.rejected_images is not None else pair.images
            # the retrieved images stay: Re-Align scores the preferred answer under them
            pair = PrefPair(prompt, rejected, chosen, rej_images, pair.images if pair.rejected_images is not None
                            else None, pair.retrieved_images, rs, cs, videos=videos)
            label = 1.0 - label
        pair.label = label
        pairs.append(pair)
    return pairs


@dataclass
class PairScan:
    """What :func:`scan_pairs` found: the pairs that fit ``max_length`` (with their row numbers), how many were
    dropped, and the out-of-vocabulary rate of their prompt and response tokens with up to 10 such words."""

    pairs: list[PrefPair]
    rows: list[int]
    dropped: int
    oov_rate: float
    oov_words: list[str]


def _unknown(ids: Any, unk: int | None) -> int:
    return 0 if unk is None else int((ids == unk).sum())


def scan_pairs(adapter: Any, pairs: list[PrefPair], rows: Sequence[int], *, with_retrieved: bool,
               skip_invalid: bool, source: str = "") -> PairScan:
    """The one tokenising pass over the data before training: lengths and unknown tokens of every pair.

    Each pair is encoded as the collator will encode it in training (images decoded, the processor run, responses
    tokenized with EOS, one pair at a time), so the length check is exact: an over-long branch (prompt with its image
    tokens + response > ``adapter.max_length``) raises :class:`DataValidationError` naming every such row (``rows``:
    each pair's row number in the user's data), or with ``skip_invalid`` the pair is dropped and counted. The same
    token ids give the out-of-vocabulary rate: the fraction of prompt and response tokens (image placeholders
    excluded) that are the tokenizer's unknown token, 0 for tokenizers without one (byte-level BPE).
    """
    import torch

    probe = PairCollator(adapter, with_retrieved=with_retrieved)
    tokenizer = adapter.tokenizer
    unk = getattr(tokenizer, "unk_token_id", None)
    old, adapter.skip_invalid = adapter.skip_invalid, False
    kept, kept_rows, problems = [], [], []
    total = unknown = 0
    words: list[str] = []
    try:
        for pair, row in zip(pairs, rows):
            try:
                batch = probe([(0, decoded(pair))])
            except ValueError as err:
                if "max_length" not in str(err):
                    raise
                problems.append((row, "over-long pair: " + str(err).split(": ", 1)[-1]))
                continue
            kept.append(pair)
            kept_rows.append(row)
            chosen, rejected = batch["chosen"], batch["rejected"]
            text = ~torch.isin(chosen.input_ids[0], torch.tensor(adapter.image_token_ids))
            prompt = chosen.input_ids[0][text & ~chosen.response_mask[0] & chosen.attention_mask[0].bool()]
            responses = [b.input_ids[0][b.response_mask[0]] for b in (chosen, rejected)]
            n = _unknown(prompt, unk) + sum(_unknown(r, unk) for r in responses)
            total += len(prompt) + sum(len(r) for r in responses)
            unknown += n
            if n and len(words) < 10:
                words += [w for t in (pair.prompt, pair.chosen, pair.rejected) for w in t.split()
                          if tokenizer.convert_tokens_to_ids(w) == unk][: 10 - len(words)]
    finally:
        adapter.skip_invalid = old
    if problems and not skip_invalid:
        raise DataValidationError(problems, len(pairs), source)
    return PairScan(kept, kept_rows, len(problems), unknown / total if total else 0.0, words[:10])
