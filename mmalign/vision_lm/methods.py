"""Preference-pair builders of the three VLM methods: Re-Align, BDHS and RRPO's phrase alignment.

* Re-Align (Xing et al. 2025): retrieve visually similar images, mask object/attribute words of the chosen answer and
  let the model fill them while looking at a retrieved image; keep the first fill whose similarity to the chosen
  answer is below 0.95, together with the image that produced it (the visual pair).
* BDHS (Amirloo et al. 2024): the model itself writes the rejected answer with image tokens hidden from attention
  (keep-fraction 1 - rho), continuing each chosen sentence from a random cut point; yes/no answers are flipped with
  probability 0.5; resampled while similarity > 0.97, at most 5 tries, the last one unguided.
* RRPO (Sarkar & Etemad 2025): differing phrases of chosen and rejected, from a token diff or from ``<MASK>`` tags,
  as 1-based segment ids (0 outside phrases) for :func:`mmalign.core.losses.rrpo.rrpo_loss`.

Sentence similarity is pluggable (``similarity_fn(a, b) -> float``); the offline default is the bag-of-words
cosine :func:`bow_cosine` (the papers use SentenceTransformer models, which cannot be downloaded here).
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from mmalign.vision_lm.adapter import VLExample, VLMAdapter

__all__ = [
    "bow_cosine", "diff_segments", "tagged_segments", "ImageIndex", "vision_embeddings", "RealignBuilder",
    "RealignPair", "bdhs_rejected", "split_sentences",
]

Similarity = Callable[[str, str], float]
_YESNO = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)


def bow_cosine(a: str, b: str) -> float:
    """Cosine similarity of whitespace bag-of-words counts (1.0 for identical word multisets, 0 for disjoint)."""
    ca, cb = Counter(a.split()), Counter(b.split())
    dot = sum(ca[w] * cb[w] for w in ca)
    norm = math.sqrt(sum(v * v for v in ca.values()) * sum(v * v for v in cb.values()))
    return dot / norm if norm else float(a == b)


# ------------------------------------------------------------------------------------------------ RRPO phrases
def diff_segments(chosen: Sequence[int], rejected: Sequence[int]) -> tuple[list[int], list[int]]:
    """Segment ids (0 outside, i for the i-th differing phrase) of two token sequences, from a diff.

    Each non-equal opcode of ``difflib.SequenceMatcher`` is one phrase. An insertion or deletion has an empty side;
    both sides are then widened by one neighbouring equal token so that phrase i exists in both responses (RRPO pairs
    phrase i of y+ with phrase i of y-).
    """
    seg_c, seg_r = [0] * len(chosen), [0] * len(rejected)
    ops = [op for op in difflib.SequenceMatcher(a=list(chosen), b=list(rejected), autojunk=False).get_opcodes()
           if op[0] != "equal"]
    for k, (_, i1, i2, j1, j2) in enumerate(ops, start=1):
        if i1 == i2 or j1 == j2:  # widen an empty side by the equal token after (or, at the end, before) it
            if i2 < len(chosen) and j2 < len(rejected):
                i2, j2 = i2 + 1, j2 + 1
            elif i1 > 0 and j1 > 0:
                i1, j1 = i1 - 1, j1 - 1
        for i in range(i1, i2):
            seg_c[i] = seg_c[i] or k
        for j in range(j1, j2):
            seg_r[j] = seg_r[j] or k
    # Widening can make an adjacent phrase swallow this one's only token; renumber so ids stay 1..N on both sides.
    kept = sorted(set(seg_c) & set(seg_r) - {0})
    remap = {old: new for new, old in enumerate(kept, start=1)}
    return [remap.get(s, 0) for s in seg_c], [remap.get(s, 0) for s in seg_r]


def tagged_segments(text: str, tokenizer: Any, open_tag: str = "<MASK>", close_tag: str = "</MASK>"
                    ) -> tuple[str, list[int]]:
    """Strip ``<MASK> ... </MASK>`` tags; return the plain text and per-token segment ids of its tokenization.

    Raises ``ValueError`` when tags are unbalanced or when tokenizing piece by piece differs from tokenizing the
    plain text (the official RRPO data pipeline skips such samples).
    """
    pattern = re.compile(re.escape(open_tag) + r"(.*?)" + re.escape(close_tag), re.DOTALL)
    pieces, ids, pos, k = [], [], 0, 0
    for m in pattern.finditer(text):
        pieces.append((text[pos:m.start()], 0))
        k += 1
        pieces.append((m.group(1), k))
        pos = m.end()
    pieces.append((text[pos:], 0))
    plain = " ".join(" ".join(p.split()) for p, _ in pieces if p.strip())
    if open_tag in plain or close_tag in plain:
        raise ValueError(f"unbalanced {open_tag}/{close_tag} tags in {text!r}")
    toks: list[int] = []
    for piece, seg in pieces:
        if piece.strip():
            t = tokenizer(piece.strip(), add_special_tokens=False)["input_ids"]
            toks += list(t)
            ids += [seg] * len(t)
    if toks != list(tokenizer(plain, add_special_tokens=False)["input_ids"]):
        raise ValueError(f"tag boundaries of {text!r} split tokens: piecewise tokenization differs from the plain text")
    return plain, ids


# ------------------------------------------------------------------------------------------------ Re-Align
@torch.no_grad()
def vision_embeddings(adapter: VLMAdapter, images: Sequence[Any], batch_size: int = 64) -> Tensor:
    """Mean-pooled, L2-normalised image features of the VLM's own vision tower + projector, ``(N, D)``.

    Pooled over every placeholder feature of an image: all patches (LLaVA), base view + AnyRes tiles + row newlines
    (LLaVA-NeXT), all split tiles + the global view (Idefics3 / SmolVLM). Runs in eval mode (no dropout), restoring
    the model's previous mode afterwards.
    """
    model = adapter.base_model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dev = next(base.parameters()).device
    with adapter.eval_mode():
        return _vision_embeddings(adapter, base, images, batch_size, dev)


def _vision_embeddings(adapter: VLMAdapter, base: Any, images: Sequence[Any], batch_size: int,
                       dev: torch.device) -> Tensor:
    out = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        # Idefics-style processors stack all images of one example (a flat list would be ONE example): nest them.
        nested = getattr(base.config, "model_type", None) in ("idefics2", "idefics3", "smolvlm")
        pix = adapter.processor.image_processor([[im] for im in chunk] if nested else chunk, return_tensors="pt")
        feats = base.get_image_features(**{k: v.to(dev) for k, v in pix.items()})
        feats = getattr(feats, "pooler_output", feats)
        if isinstance(feats, (list, tuple)):
            feats = torch.stack([f.reshape(-1, f.shape[-1]).mean(0) for f in feats])
        elif feats.ndim == 3:
            feats = feats.mean(1)
        out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out)


class ImageIndex:
    """Cosine top-k retrieval over image embeddings (the VLM's vision tower, or open_clip features)."""

    def __init__(self, embeddings: Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] < 2:
            raise ValueError(f"embeddings must be (N >= 2, D), got shape {tuple(embeddings.shape)}")
        self.emb = torch.nn.functional.normalize(embeddings.float(), dim=-1)

    @classmethod
    def from_open_clip(cls, images: Sequence[Any], model_name: str, pretrained: str) -> "ImageIndex":
        """Index built with an open_clip image encoder; ``pretrained`` must be a local checkpoint file (offline)."""
        import open_clip
        from PIL import Image

        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        model.eval()
        with torch.no_grad():
            pix = torch.stack([preprocess(Image.fromarray(np.asarray(im))) for im in images])
            return cls(model.encode_image(pix))

    def topk(self, query: int, k: int) -> list[int]:
        """Indices of the ``k`` most similar images to image ``query`` (itself excluded), most similar first."""
        if not 0 <= query < self.emb.shape[0]:
            raise ValueError(f"query must index one of {self.emb.shape[0]} images, got {query}")
        sims = self.emb @ self.emb[query]
        sims[query] = -math.inf
        return sims.topk(min(k, self.emb.shape[0] - 1)).indices.tolist()


@dataclass
class RealignPair:
    index: int
    chosen: str
    rejected: str
    retrieved: int  # index of the retrieved image v_l that produced ``rejected``
    similarity: float
    tries: int


class RealignBuilder:
    """Re-Align's rejected answers: mask object/attribute words, fill them while the model sees a retrieved image.

    ``maskable`` maps each maskable word to its category; a masked slot is filled with the model's most likely word
    of the same category (the closed-vocabulary form of "strategic masking"; the paper uses an LLM to mask and the
    VLM to complete). The first fill with ``similarity_fn(chosen, fill) < threshold`` is kept (else the next image).
    """

    def __init__(self, adapter: VLMAdapter, index: ImageIndex, maskable: dict[str, str], top_k: int = 5,
                 threshold: float = 0.95, similarity_fn: Similarity = bow_cosine) -> None:
        if top_k <= 0:
            raise ValueError(f"top_k must be > 0, got {top_k}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.adapter, self.index, self.top_k, self.threshold = adapter, index, top_k, threshold
        self.similarity_fn = similarity_fn
        self.maskable = maskable
        tok = adapter.tokenizer
        self._category_ids: dict[str, list[int]] = {}
        for word, cat in maskable.items():
            self._category_ids.setdefault(cat, []).append(tok.convert_tokens_to_ids(word))

    def fill(self, prompt: str, words: list[str], image: Any) -> str:
        """Fill every maskable word of ``words`` left to right, conditioned on ``image`` and the text so far."""
        out: list[str] = []
        for word in words:
            cat = self.maskable.get(word)
            if cat is None:
                out.append(word)
                continue
            logits = self.adapter.next_token_logits([VLExample(prompt, " ".join(out), [image])])[0]
            cand = self._category_ids[cat]
            best = cand[int(logits[cand].argmax())]
            out.append(self.adapter.tokenizer.convert_ids_to_tokens(best))
        return " ".join(out)

    def build(self, prompts: Sequence[str], chosen: Sequence[str], images: Sequence[Any]) -> list[RealignPair]:
        """One pair per example that found an accepted fill among its top-k retrieved images (others are dropped)."""
        pairs = []
        for i, (prompt, answer) in enumerate(zip(prompts, chosen)):
            words = answer.split()
            if not any(w in self.maskable for w in words):
                continue
            for tries, j in enumerate(self.index.topk(i, self.top_k), start=1):
                filled = self.fill(prompt, words, images[j])
                sim = self.similarity_fn(answer, filled)
                if sim < self.threshold:
                    pairs.append(RealignPair(i, answer, filled, j, sim, tries))
                    break
        return pairs


# ------------------------------------------------------------------------------------------------ BDHS
def split_sentences(text: str) -> list[str]:
    """Split after '.', '?' or '!' tokens (kept with their sentence)."""
    out, cur = [], []
    for w in text.split():
        cur.append(w)
        if w in (".", "?", "!") or w[-1:] in (".", "?", "!"):
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


def _flip_yes_no(sentence: str) -> str:
    m = _YESNO.match(sentence)
    assert m is not None
    word = m.group(1)
    flipped = {"yes": "no", "no": "yes"}[word.lower()]
    flipped = flipped.capitalize() if word[0].isupper() else flipped
    return sentence[: m.start(1)] + flipped + sentence[m.end(1):]


def bdhs_rejected(
    adapter: VLMAdapter, examples: Sequence[VLExample], *, rho: float = 0.99, threshold: float = 0.97,
    max_tries: int = 5, flip_prob: float = 0.5, max_new_tokens: int = 24, temperature: float = 1.0,
    rng: np.random.Generator, generator: torch.Generator | None = None, similarity_fn: Similarity = bow_cosine,
) -> tuple[list[str], dict[str, float]]:
    """BDHS rejected answers for ``examples`` (their ``response`` = the chosen answer), generated by the model.

    Per sentence of the chosen answer: a yes/no sentence is flipped with probability ``flip_prob``; otherwise the
    sentence is cut at a random word and continued by the model with image tokens hidden (keep-fraction
    ``1 - rho``), conditioned on the ground-truth previous sentences and the sentence prefix. Answers with
    similarity > ``threshold`` are resampled (new mask, new cuts) up to ``max_tries`` times; the last try is an
    unguided full generation from the masked image and is kept regardless. Returns the answers and statistics.
    """
    if not 0 <= rho <= 1:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    n = len(examples)
    result: list[str | None] = [None] * n
    tries_used = [0] * n
    for attempt in range(1, max_tries + 1):
        todo = [i for i in range(n) if result[i] is None]
        if not todo:
            break
        last = attempt == max_tries
        # Each pending example becomes a list of sentences; each sentence is fixed, flipped or to be continued.
        plans: list[list[str | None]] = []
        jobs: list[tuple[int, int, str]] = []  # (example, sentence index, text prefix to continue)
        for i in todo:
            sentences = split_sentences(examples[i].response)
            if last:
                plans.append([None])
                jobs.append((i, 0, ""))
                continue
            plan: list[str | None] = []
            for s_idx, sent in enumerate(sentences):
                words = sent.split()
                if _YESNO.match(sent) and rng.random() < flip_prob:
                    plan.append(_flip_yes_no(sent))
                    continue
                cut = int(rng.integers(0, len(words)))  # keep words[:cut], regenerate the rest
                context = " ".join(sentences[:s_idx] + [" ".join(words[:cut])]).strip()
                plan.append(None)
                jobs.append((i, s_idx, context))
            plans.append(plan)
        if jobs:
            conts = adapter.generate(
                [VLExample(examples[i].prompt, ctx, examples[i].images) for i, _, ctx in jobs],
                max_new_tokens=max_new_tokens, rho=rho, generator=generator, temperature=temperature,
                stop_words=(".", "?", "!") if not last else (),
            )
            plan_of = dict(zip(todo, plans))
            for (i, s_idx, ctx), cont in zip(jobs, conts):
                prefix = ctx.split()[len(" ".join(split_sentences(examples[i].response)[:s_idx]).split()):]
                plan_of[i][s_idx] = " ".join(prefix + cont.split())
        for i, plan in zip(todo, plans):
            text = " ".join(p for p in plan if p)
            tries_used[i] = attempt
            if last or similarity_fn(examples[i].response, text) <= threshold:
                result[i] = text
    stats = {"bdhs/mean_tries": float(np.mean(tries_used)) if n else 0.0,
             "bdhs/unguided_fraction": float(np.mean([t == max_tries for t in tries_used])) if n else 0.0}
    return [r or "" for r in result], stats
