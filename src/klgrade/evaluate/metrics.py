"""The one place where grading metrics are computed.

All functions take integer KL grades (0-4) and always pass the full label set, so a grade that is
never predicted (or absent from the truth) still counts as a row/column of zeros.
"""
from __future__ import annotations

import numpy as np

from klgrade.grades import GRADES, N_GRADES  # noqa: F401 - re-exported (metrics.GRADES)


def _as_int(y) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-d array of grades, got shape {arr.shape}")
    out = arr.astype(int)
    bad = (out < GRADES[0]) | (out > GRADES[-1])
    if bad.any():
        raise ValueError(f"grades must lie in 0..4; got {sorted(set(out[bad].tolist()))}")
    return out


def confusion(y_true, y_pred) -> np.ndarray:
    """5x5 counts; rows = true grade, columns = predicted grade."""
    from sklearn.metrics import confusion_matrix  # scikit-learn imports in ~1 s: only when a metric is asked

    return confusion_matrix(_as_int(y_true), _as_int(y_pred), labels=list(GRADES))


def qwk(y_true, y_pred) -> float:
    """Quadratic weighted Cohen's kappa over grades 0-4 (0.0 when undefined, e.g. a single class)."""
    from sklearn.metrics import cohen_kappa_score

    t, p = _as_int(y_true), _as_int(y_pred)
    if len(t) == 0:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cohen_kappa_score(t, p, weights="quadratic", labels=list(GRADES))
    return 0.0 if np.isnan(k) else float(k)


def accuracy(y_true, y_pred) -> float:
    t, p = _as_int(y_true), _as_int(y_pred)
    return float(np.mean(t == p)) if len(t) else float("nan")


def adjacent_accuracy(y_true, y_pred) -> float:
    """Share of predictions within one grade of the truth (|pred - true| <= 1)."""
    t, p = _as_int(y_true), _as_int(y_pred)
    return float(np.mean(np.abs(t - p) <= 1)) if len(t) else float("nan")


def mae(y_true, y_pred) -> float:
    t, p = _as_int(y_true), _as_int(y_pred)
    return float(np.mean(np.abs(t - p))) if len(t) else float("nan")


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the grades present in the truth (scikit-learn's definition)."""
    cm = confusion(y_true, y_pred)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(cm)[present] / support[present]))


def per_grade(y_true, y_pred) -> dict[str, list[float]]:
    """Precision, recall, F1 and support per grade 0-4; zero division counts as 0."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(
        _as_int(y_true), _as_int(y_pred), labels=list(GRADES), zero_division=0
    )
    return {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": s.tolist()}


SCALAR_METRICS = {
    "qwk": qwk,
    "adjacent_accuracy": adjacent_accuracy,
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "mae": mae,
}


def compute_metrics(y_true, y_pred, probs=None) -> dict:
    """Every metric of the study for one set of predictions, as a JSON-ready dict.

    ``probs`` (n x 5 class probabilities), when given, adds log loss, Brier score and the
    expected calibration error of the top class.
    """
    t, p = _as_int(y_true), _as_int(y_pred)
    out: dict = {"n": int(len(t))}
    for name, fn in SCALAR_METRICS.items():
        out[name] = fn(t, p)
    pg = per_grade(t, p)
    for key in ("precision", "recall", "f1", "support"):
        out[key] = pg[key]
    out["macro_f1"] = float(np.mean(pg["f1"]))
    out["confusion"] = confusion(t, p).tolist()
    if probs is not None:
        out.update(probability_metrics(t, probs))
    return out


def probability_metrics(y_true, probs, n_bins: int = 10) -> dict:
    t = _as_int(y_true)
    pr = np.asarray(probs, dtype=float)
    if pr.shape != (len(t), N_GRADES):
        raise ValueError(f"probs must have shape ({len(t)}, {N_GRADES}); got {pr.shape}")
    eps = 1e-12
    onehot = np.eye(N_GRADES)[t]
    log_loss = float(-np.mean(np.log(np.clip(pr[np.arange(len(t)), t], eps, 1.0))))
    brier = float(np.mean(np.sum((pr - onehot) ** 2, axis=1)))
    conf, correct = pr.max(axis=1), (pr.argmax(axis=1) == t)
    return {"log_loss": log_loss, "brier": brier, "ece": expected_calibration_error(conf, correct, n_bins)}


def expected_calibration_error(confidence, correct, n_bins: int = 10) -> float:
    """Top-label ECE with equal-width confidence bins."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if len(confidence) == 0:
        return float("nan")
    bins = np.clip((confidence * n_bins).astype(int), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return float(ece)


def reliability_bins(confidence, correct, n_bins: int = 10) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count for a reliability diagram."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    bins = np.clip((confidence * n_bins).astype(int), 0, n_bins - 1)
    conf, acc, count = [], [], []
    for b in range(n_bins):
        m = bins == b
        conf.append(float(confidence[m].mean()) if m.any() else float("nan"))
        acc.append(float(correct[m].mean()) if m.any() else float("nan"))
        count.append(int(m.sum()))
    return {"confidence": conf, "accuracy": acc, "count": count, "edges": np.linspace(0, 1, n_bins + 1).tolist()}


def metrics_from_confusion(cm) -> dict[str, np.ndarray]:
    """The confusion-derived metrics of :func:`compute_metrics` from (..., 5, 5) count matrices.

    Vectorised over leading axes so a bootstrap can evaluate thousands of resampled confusion
    matrices at once; on a single matrix it equals ``compute_metrics`` on the underlying labels
    (same zero-division and undefined-kappa conventions). Scalars come back as 0-d arrays,
    per-grade values with a trailing axis of 5.
    """
    cm = np.asarray(cm, dtype=float)
    if cm.shape[-2:] != (N_GRADES, N_GRADES):
        raise ValueError(f"expected (..., {N_GRADES}, {N_GRADES}) confusion matrices, got shape {cm.shape}")
    g = np.arange(N_GRADES)
    dist = np.abs(g[:, None] - g[None, :])
    n = cm.sum(axis=(-2, -1))
    rows, cols = cm.sum(axis=-1), cm.sum(axis=-2)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = tp.sum(axis=-1) / n
        adjacent = (cm * (dist <= 1)).sum(axis=(-2, -1)) / n
        mae_ = (cm * dist).sum(axis=(-2, -1)) / n
        precision = np.where(cols > 0, tp / cols, 0.0)
        recall = np.where(rows > 0, tp / rows, 0.0)
        f1_den = rows + cols  # = 2tp + fp + fn
        f1 = np.where(f1_den > 0, 2 * tp / f1_den, 0.0)
        present = rows > 0
        n_present = present.sum(axis=-1)
        balanced = np.where(n_present > 0, np.where(present, recall, 0.0).sum(axis=-1) / n_present, np.nan)
        # Quadratic-weighted kappa as scikit-learn computes it; 0.0 where undefined, like qwk().
        w = dist.astype(float) ** 2
        expected = rows[..., :, None] * cols[..., None, :] / n[..., None, None]
        num = (w * cm).sum(axis=(-2, -1))
        den = (w * expected).sum(axis=(-2, -1))
        kappa = 1.0 - num / den
    kappa = np.where(np.isfinite(kappa), kappa, 0.0)
    kappa = np.where(n > 0, kappa, np.nan)
    return {
        "qwk": kappa, "adjacent_accuracy": adjacent, "accuracy": accuracy, "balanced_accuracy": balanced,
        "mae": mae_, "precision": precision, "recall": recall, "f1": f1, "support": rows,
        "macro_f1": f1.mean(axis=-1),
    }
