"""Kappa values computed by hand."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("sqlalchemy", reason="the labelling app needs: pip install 'mmalign[label]'")

from mmalign.label.agreement import cohen_kappa, fleiss_kappa, progress_report  # noqa: E402


def test_cohen_kappa_hand_value() -> None:
    # 4 items: agree on 3 -> p_o = 0.75; a uses 1,1,0,0; b uses 1,1,0,1 -> p_e = (2*3 + 2*1)/16 = 0.5
    assert cohen_kappa([1, 1, 0, 0], [1, 1, 0, 1]) == pytest.approx((0.75 - 0.5) / 0.5)
    assert cohen_kappa([1, 0], [1, 0]) == 1.0
    assert math.isnan(cohen_kappa([1, 1], [1, 1])) and math.isnan(cohen_kappa([], []))


def test_fleiss_kappa_hand_value() -> None:
    # 2 items, 3 raters: [1,1,1] -> P=1; [1,0,0] -> P=(1+4-3)/6=1/3; P̄=2/3; p(1)=4/6, p(0)=2/6 -> P̄e=5/9
    assert fleiss_kappa([[1, 1, 1], [1, 0, 0]]) == pytest.approx((2 / 3 - 5 / 9) / (1 - 5 / 9))
    with pytest.raises(ValueError, match="same m"):
        fleiss_kappa([[1, 0], [1]])


def test_progress_report_counts_skips_and_reference_agreement() -> None:
    rows = [
        {"labeller": "a", "query_id": 1, "label": 1.0, "reference_label": 1.0},
        {"labeller": "b", "query_id": 1, "label": 1.0, "reference_label": 1.0},
        {"labeller": "a", "query_id": 2, "label": 0.0, "reference_label": 1.0},
        {"labeller": "b", "query_id": 2, "label": None, "reference_label": 1.0},
    ]
    out = progress_report(rows, {"queries": 2})
    assert out["labellers"]["a"] == {"answered": 2, "skipped": 0, "reference_agreement": 0.5, "reference_n": 2}
    assert out["labellers"]["b"]["skipped"] == 1
    assert out["cohen"] == [{"labellers": ["a", "b"], "shared": 1, "cohen_kappa": None}]
    assert out["fleiss"]["items"] == 1 and out["fleiss"]["raters"] == 2
