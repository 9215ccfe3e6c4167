"""Macro-F1 computed here gives scikit-learn's float exactly (sklearn is only a test dependency)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from nmoe_models.metrics import f1_macro, score


@st.composite
def predictions(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    classes = draw(st.integers(1, 12))
    n = draw(st.integers(1, 300))
    labels = st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)
    return np.array(draw(labels)), np.array(draw(labels)), classes


@settings(max_examples=300, deadline=None)
@given(predictions())
def test_f1_macro_is_sklearns_float(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    pred, y, classes = case
    want = float(f1_score(y, pred, labels=list(range(classes)), average="macro", zero_division=0))
    assert f1_macro(pred, y, classes) == want


def test_classes_nobody_has_score_zero() -> None:
    # classes 2 and 3 never occur: they count as 0 in the mean, as sklearn's zero_division=0 does
    assert f1_macro(np.array([0, 1]), np.array([0, 1]), 4) == 0.5
    s = score(np.array([0, 1, 1]), np.array([0, 1, 0]), 2)
    assert s.accuracy == pytest.approx(2 / 3) and s.samples == 3


def test_labels_outside_the_classes_are_refused() -> None:
    with pytest.raises(ValueError, match="outside 0..2"):
        f1_macro(np.array([0, 3]), np.array([0, 1]), 3)
