"""POPE's yes/no answer metrics (Li et al. 2023): accuracy, precision, recall, F1 and the yes-ratio."""

from __future__ import annotations

import numpy as np

__all__ = ["pope_metrics", "parse_yes_no"]


def pope_metrics(predicted_yes: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of boolean answers (POPE's definitions)."""
    p, t = np.asarray(predicted_yes, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"predicted_yes and truth must be non-empty with equal shapes, got {p.shape} and {t.shape}")
    tp = float((p & t).sum())
    precision = tp / max(float(p.sum()), 1.0)
    recall = tp / max(float(t.sum()), 1.0)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"acc": float((p == t).mean()), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": float(p.mean())}


def parse_yes_no(text: str) -> bool | None:
    """POPE's answer parsing: True for an answer starting with "yes", False for "no", None otherwise.

    Case and leading punctuation are ignored; "No, there is..." is no, "Yes." is yes, "I think so" is neither.
    """
    words = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()
    if not words:
        return None
    return True if words[0] == "yes" else False if words[0] == "no" else None
