"""Patient-level bootstrap, paired comparisons, McNemar and alignment (klgrade.evaluate.stats)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from klgrade.evaluate import metrics as M
from klgrade.evaluate import stats as S
from klgrade.rundir import predictions_frame


def _noisy(rng, y, acc):
    """Predictions equal to y with probability acc, else one or two grades off."""
    off = np.clip(y + rng.choice([-2, -1, 1, 2], len(y)), 0, 4)
    return np.where(rng.random(len(y)) < acc, y, off)


def _probs(rng, pred):
    pr = rng.dirichlet(np.ones(5), len(pred)) * 0.5
    pr[np.arange(len(pred)), pred] += 0.5
    return pr


def _aligned(n_patients=60, per_patient=4, accs=(0.8, 0.5), seed=0) -> S.Aligned:
    rng = np.random.default_rng(seed)
    pid = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
    y = np.repeat(rng.integers(0, 5, n_patients), per_patient)
    al = S.Aligned(image_id=np.array([f"i{k}" for k in range(len(y))]), patient_id=pid, y_true=y)
    for j, acc in enumerate(accs):
        pred = _noisy(rng, y, acc)
        al.preds[f"run{j}"] = pred
        al.probs[f"run{j}"] = _probs(rng, pred)
    return al


# --- metrics derived from confusion matrices equal the metrics module -------------------------
@pytest.mark.parametrize("seed", range(12))
def test_metrics_from_confusion_equals_compute_metrics(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    y = rng.integers(0, 5, n)
    pred = _noisy(rng, y, 0.6)
    if seed % 4 == 0:
        pred = np.full(n, seed % 5)  # a grader that predicts one grade: undefined kappa, zero precision
    if seed % 4 == 1:
        y = np.where(y == 1, 2, y)  # a grade absent from the truth
    ref = M.compute_metrics(y, pred, _probs(rng, pred))
    got = M.metrics_from_confusion(M.confusion(y, pred))
    for key in ("qwk", "adjacent_accuracy", "accuracy", "balanced_accuracy", "mae", "macro_f1",
                "precision", "recall", "f1", "support"):
        np.testing.assert_allclose(got[key], ref[key], atol=1e-12, err_msg=key)


def test_per_patient_sums_reproduce_probability_metrics():
    al = _aligned(n_patients=30, per_patient=3)
    codes, n_pat = S.patient_codes(al.patient_id)
    table = S.per_patient_stats(al.y_true, al.preds["run0"], al.probs["run0"], codes, n_pat)
    assert table.shape == (30, S.N_STATS)
    got = S.metrics_from_stats(table.sum(axis=0))
    ref = M.compute_metrics(al.y_true, al.preds["run0"], al.probs["run0"])
    for key in ("qwk", "accuracy", "log_loss", "brier", "ece"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def test_metrics_from_confusion_is_vectorised():
    rng = np.random.default_rng(0)
    cms = rng.integers(0, 20, size=(7, 5, 5))
    batch = M.metrics_from_confusion(cms)
    assert batch["qwk"].shape == (7,) and batch["f1"].shape == (7, 5)
    for i in range(7):
        assert batch["qwk"][i] == pytest.approx(float(M.metrics_from_confusion(cms[i])["qwk"]))


# --- bootstrap CIs -------------------------------------------------------------------------------
def test_ci_contains_estimate_and_widens_with_fewer_patients():
    big = S.analyse(_aligned(n_patients=400, seed=1), n_boot=500, seed=0, progress=False)["intervals"]["run0"]
    small = S.analyse(_aligned(n_patients=25, seed=1), n_boot=500, seed=0, progress=False)["intervals"]["run0"]
    for iv in (big, small):
        for key in ("qwk", "accuracy", "adjacent_accuracy", "mae", "macro_f1", "ece"):
            assert iv[key]["low"] <= iv[key]["estimate"] <= iv[key]["high"], key
    for key in ("qwk", "accuracy", "adjacent_accuracy"):
        assert (small[key]["high"] - small[key]["low"]) > 2 * (big[key]["high"] - big[key]["low"]), key


def test_bootstrap_resamples_patients_not_images():
    # 40 patients x 20 images; every image of a patient is right or every one is wrong. The
    # independent evidence is 40 patients, so the accuracy CI must be about binomial(40)-wide
    # (~0.3); an image-level bootstrap sees 800 "independent" images and gives ~0.07.
    rng = np.random.default_rng(0)
    n_pat, per = 40, 20
    pid = np.repeat([f"p{i}" for i in range(n_pat)], per)
    y = np.repeat(rng.integers(0, 5, n_pat), per)
    right = np.repeat(np.arange(n_pat) % 2 == 0, per)
    pred = np.where(right, y, (y + 2) % 5)
    al = S.Aligned(image_id=np.array([f"i{k}" for k in range(len(y))]), patient_id=pid, y_true=y,
                   preds={"a": pred}, probs={"a": _probs(rng, pred)})
    reps = S.bootstrap_replicates(al, n_boot=1000, seed=0, progress=False)
    lo, hi = S.percentile_ci(reps["a"]["accuracy"])
    patient_width = hi - lo
    img = S.bootstrap_replicates(al, n_boot=1000, seed=0, progress=False, unit_ids=al.image_id)
    lo_i, hi_i = S.percentile_ci(img["a"]["accuracy"])
    assert patient_width > 0.22
    assert patient_width > 3 * (hi_i - lo_i)


def test_bootstrap_is_reproducible_and_seeded():
    al = _aligned()
    a = S.bootstrap_replicates(al, n_boot=300, seed=7, progress=False)
    b = S.bootstrap_replicates(al, n_boot=300, seed=7, progress=False)
    c = S.bootstrap_replicates(al, n_boot=300, seed=8, progress=False)
    np.testing.assert_array_equal(a["run0"]["qwk"], b["run0"]["qwk"])
    assert not np.array_equal(a["run0"]["qwk"], c["run0"]["qwk"])
    assert len(a["run0"]["qwk"]) == 300


def test_replicate_metrics_match_metrics_module_on_the_resample():
    # One replicate rebuilt by hand: draw patients, take all their images, run compute_metrics.
    al = _aligned(n_patients=20, per_patient=3)
    codes, n_pat = S.patient_codes(al.patient_id)
    counts = S._draw_counts(np.random.default_rng(3), 1, n_pat)[0]
    take = np.concatenate([np.flatnonzero(codes == p).repeat(int(c)) for p, c in enumerate(counts)])
    table = S.per_patient_stats(al.y_true, al.preds["run0"], al.probs["run0"], codes, n_pat)
    got = S.metrics_from_stats(counts @ table)
    ref = M.compute_metrics(al.y_true[take], al.preds["run0"][take], al.probs["run0"][take])
    for key in ("qwk", "accuracy", "adjacent_accuracy", "balanced_accuracy", "ece", "brier"):
        assert float(got[key]) == pytest.approx(ref[key], abs=1e-12), key


# --- paired comparisons and McNemar ---------------------------------------------------------------
def test_identical_runs_give_p_one():
    al = _aligned(accs=(0.7,))
    al.preds["copy"], al.probs["copy"] = al.preds["run0"].copy(), al.probs["run0"].copy()
    res = S.analyse(al, n_boot=300, seed=0, progress=False)
    (pair,) = res["pairwise"]
    for key, d in pair["differences"].items():
        assert d["difference"] == 0.0 and d["low"] == 0.0 and d["high"] == 0.0, key
        assert d["p_value"] == 1.0, key
    assert pair["mcnemar"]["p_value"] == 1.0


def test_clearly_different_runs_give_small_p():
    res = S.analyse(_aligned(n_patients=150, accs=(0.9, 0.3)), n_boot=500, seed=0, progress=False)
    (pair,) = res["pairwise"]
    for key in S.PAIRED_METRICS:
        d = pair["differences"][key]
        assert d["difference"] > 0 and d["low"] > 0, key
        assert d["p_value"] < 0.01, key
    assert pair["mcnemar"]["p_value"] < 1e-6
    assert pair["mcnemar"]["method"].startswith("chi-square")


def test_bootstrap_p_value_never_zero_and_symmetric():
    assert S.bootstrap_p_value(np.ones(999)) == pytest.approx(2 / 1000)
    assert S.bootstrap_p_value(-np.ones(999)) == pytest.approx(2 / 1000)
    assert S.bootstrap_p_value(np.r_[np.ones(500), -np.ones(500)]) == 1.0


def test_mcnemar_exact_and_chi_square():
    # 7 vs 1 discordant: exact two-sided binomial.
    a = np.array([True] * 7 + [False] * 1 + [True] * 10)
    b = np.array([False] * 7 + [True] * 1 + [True] * 10)
    m = S.mcnemar(a, b)
    assert m["method"] == "exact binomial"
    assert m["p_value"] == pytest.approx(binomtest(7, 8, 0.5).pvalue) == pytest.approx(18 / 256)
    # 60 vs 30 discordant: chi-square with continuity correction, (|60-30|-1)^2/90.
    a = np.array([True] * 60 + [False] * 30)
    m = S.mcnemar(a, ~a)
    assert m["method"].startswith("chi-square")
    assert m["statistic"] == pytest.approx(29**2 / 90)
    assert m["p_value"] == pytest.approx(0.002237, abs=1e-5)


# --- alignment ------------------------------------------------------------------------------------
def _frame(ids, pids, y, pred):
    probs = np.eye(5)[np.asarray(pred)] * 0.9 + 0.02
    return predictions_frame(pd.DataFrame({"image_id": ids, "patient_id": pids, "klg": y}), probs)


def test_alignment_reorders_on_image_id():
    a = _frame(["x", "y", "z"], ["p1", "p1", "p2"], [0, 1, 2], [0, 1, 1])
    b = _frame(["z", "x", "y"], ["p2", "p1", "p1"], [2, 0, 1], [2, 0, 0])
    al = S.align_predictions({"A": a, "B": b})
    assert list(al.image_id) == ["x", "y", "z"]
    assert list(al.preds["B"]) == [0, 0, 2] and al.n_patients == 2


def test_alignment_refuses_different_images():
    a = _frame(["x", "y", "z"], ["p1", "p1", "p2"], [0, 1, 2], [0, 1, 1])
    b = _frame(["x", "y"], ["p1", "p1"], [0, 1], [0, 1])
    with pytest.raises(S.AlignmentError, match=r"'A' has 3 images, 'B' has 2.*1 only in 'A' \(z\)"):
        S.align_predictions({"A": a, "B": b})


@pytest.mark.parametrize("field", ["klg", "patient_id"])
def test_alignment_refuses_disagreeing_truth_or_patient(field):
    a = _frame(["x", "y"], ["p1", "p2"], [0, 1], [0, 1])
    b = a.copy()
    b.loc[1, field] = 3 if field == "klg" else "p9"
    with pytest.raises(S.AlignmentError, match=f"disagree about {field} on 1 of 2 images"):
        S.align_predictions({"A": a, "B": b})


def test_alignment_refuses_duplicate_image_ids():
    a = _frame(["x", "x"], ["p1", "p1"], [0, 0], [0, 0])
    with pytest.raises(S.AlignmentError, match="duplicated image_id"):
        S.align_predictions({"A": a})
