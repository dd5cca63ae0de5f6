import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    mean_absolute_error,
    precision_score,
    recall_score,
)

from klgrade.evaluate import metrics as M


@pytest.fixture
def random_preds():
    rng = np.random.default_rng(3)
    t = rng.integers(0, 5, 400)
    p = np.clip(t + rng.integers(-2, 3, 400), 0, 4)
    return t, p


def test_metrics_match_sklearn(random_preds):
    t, p = random_preds
    m = M.compute_metrics(t, p)
    labels = [0, 1, 2, 3, 4]
    assert m["qwk"] == pytest.approx(cohen_kappa_score(t, p, weights="quadratic", labels=labels))
    assert m["accuracy"] == pytest.approx(accuracy_score(t, p))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(t, p))
    assert m["mae"] == pytest.approx(mean_absolute_error(t, p))
    assert m["precision"] == pytest.approx(precision_score(t, p, average=None, labels=labels, zero_division=0).tolist())
    assert m["recall"] == pytest.approx(recall_score(t, p, average=None, labels=labels, zero_division=0).tolist())
    assert m["f1"] == pytest.approx(f1_score(t, p, average=None, labels=labels, zero_division=0).tolist())
    assert np.array(m["confusion"]).sum() == len(t)


def test_qwk_by_hand():
    # Independent computation of quadratic kappa from its definition.
    t = np.array([0, 0, 1, 2, 3, 4, 4, 2])
    p = np.array([0, 1, 1, 3, 3, 2, 4, 2])
    o = np.zeros((5, 5))
    for a, b in zip(t, p):
        o[a, b] += 1
    w = np.array([[(i - j) ** 2 / 16 for j in range(5)] for i in range(5)])
    e = np.outer(o.sum(1), o.sum(0)) / o.sum()
    expected = 1 - (w * o).sum() / (w * e).sum()
    assert M.qwk(t, p) == pytest.approx(expected)


def test_adjacent_accuracy_by_hand():
    t = [0, 1, 2, 3, 4]
    p = [1, 3, 2, 1, 4]  # diffs 1, 2, 0, 2, 0 -> 3 of 5 within one grade
    assert M.adjacent_accuracy(t, p) == pytest.approx(0.6)
    assert M.mae(t, p) == pytest.approx(1.0)


def test_grade_never_predicted_gets_zero_f1_not_error():
    # Like the study's embedding model, which never predicted KL1.
    t = [0, 1, 1, 2, 3, 4]
    p = [0, 0, 2, 2, 3, 4]
    m = M.compute_metrics(t, p)
    assert m["precision"][1] == 0.0 and m["recall"][1] == 0.0 and m["f1"][1] == 0.0
    assert m["f1"][0] == pytest.approx(2 / 3)  # precision 0.5, recall 1
    assert m["confusion"][1] == [1, 0, 1, 0, 0]


def test_labels_always_passed_even_when_grades_absent():
    # Only grades 0 and 4 present: kappa must still use the 0..4 weight scale.
    t, p = [0, 0, 4, 4], [0, 4, 4, 4]
    assert M.qwk(t, p) == pytest.approx(cohen_kappa_score(t, p, weights="quadratic", labels=[0, 1, 2, 3, 4]))
    assert np.array(M.confusion(t, p)).shape == (5, 5)


def test_out_of_range_grades_refused():
    with pytest.raises(ValueError, match="0..4"):
        M.qwk([0, 5], [0, 1])


def test_probability_metrics():
    t = np.array([0, 1, 2])
    probs = np.eye(5)[[0, 1, 2]] * 0.9 + 0.02
    m = M.compute_metrics(t, probs.argmax(1), probs)
    assert m["log_loss"] == pytest.approx(-np.log(0.92))
    assert 0 <= m["ece"] <= 1
    rb = M.reliability_bins(probs.max(1), np.ones(3))
    assert sum(rb["count"]) == 3
