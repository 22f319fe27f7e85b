"""Agreement between labellers (Cohen's and Fleiss' kappa) and with reference labels, from stored answers.

Categories are the answer's label ``P(first ≻ second)``: ``1`` (first), ``0`` (second), ``0.5`` (equal); skipped
answers carry no category and are left out.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping

__all__ = ["cohen_kappa", "fleiss_kappa", "progress_report"]

_CATEGORIES = (0.0, 0.5, 1.0)


def cohen_kappa(a: list[float], b: list[float]) -> float:
    """Cohen's kappa of two raters' categories on the same items: ``(p_o - p_e) / (1 - p_e)``.

    ``nan`` with no items, or when chance agreement is 1 (both raters used one and the same category throughout).
    """
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs equally long rating lists, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[c] * cb[c] for c in _CATEGORIES) / (n * n)
    return math.nan if p_e == 1.0 else (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(items: list[list[float]]) -> float:
    """Fleiss' kappa of items each rated by the same number ``m ≥ 2`` of raters (Fleiss 1971):
    ``(P̄ - P̄_e) / (1 - P̄_e)`` with ``P_i = (Σ_j n_ij² - m) / (m (m - 1))`` and ``P̄_e = Σ_j p_j²``."""
    if not items:
        return math.nan
    m = len(items[0])
    if m < 2 or any(len(r) != m for r in items):
        raise ValueError(f"fleiss_kappa needs every item rated by the same m >= 2 raters, got {sorted({len(r) for r in items})}")
    n = len(items)
    counts = [Counter(r) for r in items]
    p_bar = sum((sum(c[k] ** 2 for k in _CATEGORIES) - m) / (m * (m - 1)) for c in counts) / n
    p_j = [sum(c[k] for c in counts) / (n * m) for k in _CATEGORIES]
    p_e = sum(p * p for p in p_j)
    return math.nan if p_e == 1.0 else (p_bar - p_e) / (1.0 - p_e)


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def progress_report(answers: Iterable[Mapping[str, Any]], counts: Mapping[str, int]) -> dict[str, Any]:
    """Answered / skipped per labeller, pairwise Cohen's kappa on shared queries, Fleiss' kappa over queries with
    the most common number of (non-skipped) answers, and each labeller's agreement with reference labels
    (same preferred side, over answers and references that are not ties)."""
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {"answered": 0, "skipped": 0, "ref_n": 0, "ref_agree": 0})
    by_query: dict[int, dict[str, float]] = defaultdict(dict)
    for a in answers:
        row = per[a["labeller"]]
        if a["label"] is None:
            row["skipped"] += 1
            continue
        row["answered"] += 1
        by_query[a["query_id"]][a["labeller"]] = float(a["label"])
        ref = a.get("reference_label")
        if ref is not None and ref != 0.5 and a["label"] != 0.5:
            row["ref_n"] += 1
            row["ref_agree"] += int((ref > 0.5) == (a["label"] > 0.5))
    labellers = {}
    for name, row in sorted(per.items()):
        labellers[name] = {"answered": row["answered"], "skipped": row["skipped"],
                           "reference_agreement": row["ref_agree"] / row["ref_n"] if row["ref_n"] else None,
                           "reference_n": row["ref_n"]}
    pairs = []
    for x, y in itertools.combinations(sorted(per), 2):
        shared = [q for q, r in by_query.items() if x in r and y in r]
        if shared:
            k = cohen_kappa([by_query[q][x] for q in shared], [by_query[q][y] for q in shared])
            pairs.append({"labellers": [x, y], "shared": len(shared), "cohen_kappa": _finite(k)})
    sizes = Counter(len(r) for r in by_query.values() if len(r) >= 2)
    fleiss = {"items": 0, "raters": None, "kappa": None}
    if sizes:
        m = sizes.most_common(1)[0][0]
        rated = [list(r.values()) for r in by_query.values() if len(r) == m]
        fleiss = {"items": len(rated), "raters": m, "kappa": _finite(fleiss_kappa(rated))}
    return {"counts": dict(counts), "labellers": labellers, "cohen": pairs, "fleiss": fleiss}
