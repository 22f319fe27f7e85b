"""Metrics: accuracy with tie half credit, ECE, Pearson/Spearman against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmalign.core.metrics import expected_calibration_error, pearson, preference_accuracy, rankdata, spearman


def test_preference_accuracy_half_credit_for_ties() -> None:
    logits = [1.0, -1.0, 0.0, 2.0, 0.0]
    labels = [1.0, 1.0, 1.0, 0.5, 0.5]
    assert preference_accuracy(logits, labels) == pytest.approx((1 + 0 + 0.5 + 0.5 + 1) / 5)
    nan_skipped = torch.tensor([1.0, float("nan")])
    assert preference_accuracy([1.0, -1.0], nan_skipped, mask=torch.tensor([True, False])) == 1.0
    assert math.isnan(preference_accuracy([], []))
    with pytest.raises(ValueError, match="labels"):
        preference_accuracy([1.0], [1.5])


def test_expected_calibration_error_hand_computed() -> None:
    probs, labels = [0.9, 0.1, 0.6, 0.65], [1.0, 0.0, 0.0, 1.0]
    # bins of width 1/10: 0.9 -> |0.9-1|; 0.1 -> |0.1-0|; {0.6, 0.65} share a bin -> |0.625-0.5|·2
    expected = (0.1 + 0.1 + 2 * 0.125) / 4
    assert expected_calibration_error(probs, labels, num_bins=10) == pytest.approx(expected)
    perfect = expected_calibration_error([0.5] * 4, [1.0, 0.0, 1.0, 0.0])
    assert perfect == pytest.approx(0.0)
    with pytest.raises(ValueError, match="probs"):
        expected_calibration_error([1.2], [1.0])


def test_correlations_match_hand_values() -> None:
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    assert pearson(x, y) == pytest.approx(0.8)
    assert spearman(x, y) == pytest.approx(0.8)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # monotone but non-linear
    assert pearson(x, np.exp(x)) < 1.0
    assert rankdata(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert math.isnan(pearson([1.0, 1.0], [1.0, 2.0]))
    with pytest.raises(ValueError, match="x"):
        pearson([float("inf"), 1.0], [1.0, 2.0])


def test_correlations_of_a_constant_side_are_nan_despite_rounding() -> None:
    # mean([0.1]*3) = 0.10000000000000002, so centring leaves ~1e-17 residues instead of zeros
    assert math.isnan(pearson([0.1] * 3, [1.0, 2.0, 3.0]))
    assert math.isnan(pearson([1.0, 2.0, 4.0, 8.0, 9.0, 10.0, 12.0], [0.1] * 7))


def test_correlation_mask_allows_nan_at_masked_out_items() -> None:
    # like preference_accuracy: NaN at skipped items is fine when the mask removes them
    x, y = [1.0, 2.0, 3.0, float("nan")], [2.0, 4.0, 5.0, 0.0]
    mask = np.array([True, True, True, False])
    # kept points (1,2), (2,4), (3,5): Pearson = 3 / (sqrt(2)·sqrt(14/3)) by hand
    assert pearson(x, y, mask=mask) == pytest.approx(3 / (math.sqrt(2) * math.sqrt(14 / 3)))
    assert spearman(x, y, mask=mask) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="x must be finite"):
        pearson(x, y)
