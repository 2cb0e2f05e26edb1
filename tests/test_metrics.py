"""Classification metrics, checked against counts done by hand on a small example."""

from __future__ import annotations

import numpy as np
import pytest

from lora_ft.metrics import classification_report, softmax


def test_classification_report_by_hand():
    names = ["a", "b", "c"]
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 0, 2]
    r = classification_report(y_true, y_pred, names)
    assert r["accuracy"] == pytest.approx(4 / 6)
    # a: tp 1, fp 1, fn 1 -> p = r = f1 = 1/2; b: tp 2, fp 1 -> p 2/3, r 1, f1 0.8; c: tp 1, fn 1 -> p 1, r 1/2, f1 2/3
    assert r["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert r["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and r["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert r["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert r["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert r["confusion_matrix"] == {"labels": names, "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]]}


def test_absent_class_counts_as_zero_not_an_error():
    r = classification_report([0, 0], [0, 0], ["x", "y"])
    assert r["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["confusion_matrix"]["matrix"] == [[2, 0], [0, 0]]


def test_softmax_is_stable_and_normalised():
    z = np.array([[1000.0, 1000.0, -1000.0], [0.0, np.log(3.0), 0.0]])
    p = softmax(z)
    assert np.all(np.isfinite(p))
    assert p.sum(-1) == pytest.approx([1.0, 1.0])
    assert p[0, :2] == pytest.approx([0.5, 0.5]) and p[1] == pytest.approx([0.2, 0.6, 0.2])
