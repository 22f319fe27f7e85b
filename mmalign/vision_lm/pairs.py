"""The user's preference data -> VLM preference pairs, checked before any model is trained.

Rows come from :func:`mmalign.data.load_preference_data` (any source, column mapping, row validation, media paths
confined to the data folder); this module adds what needs the model's processor:

- prompts in the model's chat template with its image tokens (:mod:`mmalign.vision_lm.prompts`);
- labels: a pair with label ``l`` < 0.5 is trained the other way round (chosen and rejected swapped, with their
  images) with label ``1 − l``; soft labels stay soft targets (see :mod:`mmalign.vision_lm.objectives`);
- RRPO phrase tags (``chosen_tagged`` / ``rejected_tagged`` with ``<MASK>…</MASK>``) become segment ids;
- the out-of-vocabulary rate of prompts and responses (tokens the tokenizer maps to its unknown token), refused
  above ``max_oov_rate``;
- over-long pairs (prompt with image tokens + response > ``max_length``) raise naming the row, or are dropped and
  counted with ``skip_invalid``.

Images stay :class:`~mmalign.data.LazyImage` references; the collator decodes them per batch.
"""

from __future__ import annotations

from typing import Any, Sequence

from mmalign.data import DataValidationError, LazyImage, PreferenceDataset
from mmalign.vision_lm.objectives import PairCollator, PrefPair, decoded
from mmalign.vision_lm.prompts import format_prompt, response_text

__all__ = ["pairs_from_data", "oov_rate", "check_lengths"]


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


def oov_rate(pairs: Sequence[PrefPair], tokenizer: Any) -> tuple[float, list[str]]:
    """Fraction of prompt and response tokens that are the tokenizer's unknown token, and up to 10 such words.

    0 for tokenizers without an unknown token (byte-level BPE cannot be out of vocabulary).
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return 0.0, []
    total = unknown = 0
    words: list[str] = []
    for p in pairs:
        for text in (p.prompt, p.chosen, p.rejected):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            total += len(ids)
            n = sum(1 for t in ids if t == unk)
            unknown += n
            if n and len(words) < 10:
                words += [w for w in text.split() if tokenizer.convert_tokens_to_ids(w) == unk][: 10 - len(words)]
    return (unknown / total if total else 0.0), words


def check_lengths(adapter: Any, pairs: list[PrefPair], rows: Sequence[int], *, with_retrieved: bool,
                  skip_invalid: bool, source: str = "") -> tuple[list[PrefPair], list[int], int]:
    """Pairs whose every branch fits ``adapter.max_length`` (encoded one at a time, images decoded per pair).

    ``rows``: each pair's row number in the user's data. Over-long pairs raise :class:`DataValidationError` naming
    every such row, or with ``skip_invalid`` are dropped; returns ``(kept pairs, their rows, number dropped)``.
    """
    probe = PairCollator(adapter, with_retrieved=with_retrieved)
    old, adapter.skip_invalid = adapter.skip_invalid, False
    kept, kept_rows, problems = [], [], []
    try:
        for pair, row in zip(pairs, rows):
            try:
                probe([(0, decoded(pair))])
            except ValueError as err:
                if "max_length" not in str(err):
                    raise
                problems.append((row, "over-long pair: " + str(err).split(": ", 1)[-1]))
                continue
            kept.append(pair)
            kept_rows.append(row)
    finally:
        adapter.skip_invalid = old
    if problems and not skip_invalid:
        raise DataValidationError(problems, len(pairs), source)
    return kept, kept_rows, len(problems)
