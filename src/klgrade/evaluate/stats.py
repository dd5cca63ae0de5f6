"""Statistics for comparing graders: patient-level bootstrap CIs, paired differences, McNemar.

Why patients, not images: one person contributes two knees at up to six visits, and those images
share anatomy, acquisition and (mostly) grade, so they are not independent. Resampling images
would pretend the test set holds ~8x more independent evidence than it does and give intervals
that are far too narrow. We resample patient ids with replacement and take all of their images.

Speed: every metric here is a function of per-image sums (the 5x5 confusion matrix, summed
log-loss and Brier terms, per-bin confidence/correctness sums for ECE). We precompute those sums
per patient once; a bootstrap replicate is then "how many times was each patient drawn" (a count
vector) times that per-patient table: one matrix product per chunk of replicates. The metric
formulas from sums live in klgrade.evaluate.metrics (``metrics_from_confusion``), which stays the
reference; tests check the two agree on the full data.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from klgrade.evaluate import metrics as M
from klgrade.rundir import PROB_COLUMNS, RunError

N_BINS = 10  # ECE bins, as in metrics.probability_metrics' default
# per-grade F1 too: where a gap between two approaches sits (KL1? KL2-3?) is part of the answer
PAIRED_METRICS = ("qwk", "adjacent_accuracy", "accuracy", "f1_0", "f1_1", "f1_2", "f1_3", "f1_4")
EXACT_MCNEMAR_BELOW = 25  # discordant pairs under which McNemar uses the exact binomial test
_EPS = 1e-12


class AlignmentError(RunError):
    """Runs that were not evaluated on the same images (or disagree about truth/patient)."""


# ----------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------
@dataclass
class Aligned:
    """Predictions of several runs on one common, identically ordered set of images."""

    image_id: np.ndarray
    patient_id: np.ndarray
    y_true: np.ndarray
    preds: dict[str, np.ndarray] = field(default_factory=dict)
    probs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.preds)

    @property
    def n_images(self) -> int:
        return len(self.image_id)

    @property
    def n_patients(self) -> int:
        return len(np.unique(self.patient_id))


def _examples(ids, k: int = 3) -> str:
    ids = sorted(ids)
    more = f", ... (+{len(ids) - k})" if len(ids) > k else ""
    return ", ".join(map(str, ids[:k])) + more


def align_predictions(frames: Mapping[str, pd.DataFrame]) -> Aligned:
    """Align predictions tables (``klgrade.rundir`` format) on ``image_id``.

    Refuses (AlignmentError) rather than intersecting: a comparison on a silently shrunk test set
    would not be the comparison the user asked for. The order is that of the first run.
    """
    if not frames:
        raise AlignmentError("no runs to compare")
    names = list(frames)
    for name, df in frames.items():
        if len(df) == 0:
            raise AlignmentError(f"run '{name}' has no predictions")
        dup = df["image_id"][df["image_id"].duplicated()]
        if len(dup):
            raise AlignmentError(f"run '{name}' has {len(dup)} duplicated image_id(s): {_examples(set(dup))}")
    ref_name, ref = names[0], frames[names[0]].reset_index(drop=True)
    ref_ids = set(ref["image_id"])
    problems = []
    for name in names[1:]:
        ids = set(frames[name]["image_id"])
        if ids != ref_ids:
            only_ref, only_other = ref_ids - ids, ids - ref_ids
            msg = (f"'{ref_name}' has {len(ref_ids)} images, '{name}' has {len(ids)}; "
                   f"{len(ref_ids & ids)} shared, {len(only_ref)} only in '{ref_name}'")
            if only_ref:
                msg += f" ({_examples(only_ref)})"
            msg += f", {len(only_other)} only in '{name}'"
            if only_other:
                msg += f" ({_examples(only_other)})"
            problems.append(msg)
    if problems:
        raise AlignmentError("runs were evaluated on different images; refusing to compare them "
                             "(re-evaluate them on the same split of the same dataset): " + "; ".join(problems))
    out = Aligned(image_id=ref["image_id"].astype(str).to_numpy(),
                  patient_id=ref["patient_id"].astype(str).to_numpy(),
                  y_true=ref["klg"].astype(int).to_numpy())
    for name in names:
        df = frames[name].set_index("image_id").loc[out.image_id]
        for col, want in (("klg", out.y_true), ("patient_id", out.patient_id)):
            have = df[col].astype(want.dtype).to_numpy()
            bad = have != want
            if bad.any():
                raise AlignmentError(
                    f"runs '{ref_name}' and '{name}' disagree about {col} on {int(bad.sum())} of "
                    f"{len(want)} images ({_examples(out.image_id[bad])}); they were not evaluated on "
                    f"the same labelled data")
        out.preds[name] = df["pred"].astype(int).to_numpy()
        out.probs[name] = df[PROB_COLUMNS].to_numpy(dtype=float)
    return out


# ----------------------------------------------------------------------------------------------
# Per-patient sufficient statistics
# ----------------------------------------------------------------------------------------------
# Layout of one row of the per-patient table for one run.
_CM = slice(0, M.N_GRADES * M.N_GRADES)
_LOGLOSS = _CM.stop
_BRIER = _LOGLOSS + 1
_CONF = slice(_BRIER + 1, _BRIER + 1 + N_BINS)
_CORR = slice(_CONF.stop, _CONF.stop + N_BINS)
N_STATS = _CORR.stop


def patient_codes(patient_id) -> tuple[np.ndarray, int]:
    """Integer code per image (0..P-1, in order of first appearance) and P."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(patient_id)).astype(str))
    return codes.astype(np.int64), len(uniques)


def per_patient_stats(y_true, y_pred, probs, codes, n_patients: int) -> np.ndarray:
    """(P, N_STATS) table of additive per-image sums, one row per patient."""
    t, p = np.asarray(y_true, int), np.asarray(y_pred, int)
    n = len(t)
    rows = np.zeros((n, N_STATS))
    rows[np.arange(n), t * M.N_GRADES + p] = 1.0
    if probs is not None:
        pr = np.asarray(probs, float)
        rows[:, _LOGLOSS] = -np.log(np.clip(pr[np.arange(n), t], _EPS, 1.0))
        rows[:, _BRIER] = np.sum((pr - np.eye(M.N_GRADES)[t]) ** 2, axis=1)
        # Top-label calibration exactly as metrics.probability_metrics defines it (argmax of probs).
        conf, correct = pr.max(axis=1), (pr.argmax(axis=1) == t).astype(float)
        b = np.clip((conf * N_BINS).astype(int), 0, N_BINS - 1)
        rows[np.arange(n), _CONF.start + b] = conf
        rows[np.arange(n), _CORR.start + b] = correct
    out = np.zeros((n_patients, N_STATS))
    np.add.at(out, np.asarray(codes), rows)
    return out


def metrics_from_stats(stats: np.ndarray, with_probs: bool = True) -> dict[str, np.ndarray]:
    """Metrics from (..., N_STATS) summed statistics (per replicate)."""
    cm = stats[..., _CM].reshape(stats.shape[:-1] + (M.N_GRADES, M.N_GRADES))
    out = M.metrics_from_confusion(cm)
    if with_probs:
        n = cm.sum(axis=(-2, -1))
        with np.errstate(divide="ignore", invalid="ignore"):
            out["log_loss"] = stats[..., _LOGLOSS] / n
            out["brier"] = stats[..., _BRIER] / n
            # sum_b n_b/N |acc_b - conf_b| == sum_b |sum correct_b - sum conf_b| / N
            out["ece"] = np.abs(stats[..., _CORR] - stats[..., _CONF]).sum(axis=-1) / n
    return out


def flatten_metrics(m: Mapping) -> dict[str, np.ndarray]:
    """Per-grade arrays split into 'precision_0'..'f1_4' keys; 'support' and 'confusion' dropped."""
    flat = {}
    for key, val in m.items():
        if key in ("support", "confusion", "n"):
            continue
        arr = np.asarray(val, dtype=float)
        if key in ("precision", "recall", "f1"):
            for g in M.GRADES:
                flat[f"{key}_{g}"] = arr[..., g]
        else:
            flat[key] = arr
    return flat


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------
def _draw_counts(rng: np.random.Generator, n_rep: int, n_patients: int) -> np.ndarray:
    """(n_rep, P) counts: how often each patient is drawn in each resample of P patients."""
    idx = rng.integers(0, n_patients, size=(n_rep, n_patients))
    idx += (np.arange(n_rep) * n_patients)[:, None]
    return np.bincount(idx.ravel(), minlength=n_rep * n_patients).reshape(n_rep, n_patients).astype(float)


def bootstrap_replicates(aligned: Aligned, n_boot: int = 2000, seed: int = 0, chunk: int = 250,
                         progress: bool = True, unit_ids=None) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap metric replicates for every run, all runs sharing the same resamples (paired).

    Returns {run: {metric: (n_boot,) array}}. ``unit_ids`` overrides the resampling unit (default:
    patient ids); passing image ids gives the naive image-level bootstrap, useful only to show why
    it is wrong.
    """
    from tqdm.auto import tqdm

    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    codes, n_units = patient_codes(aligned.patient_id if unit_ids is None else unit_ids)
    if len(codes) != aligned.n_images:
        raise ValueError("unit_ids must have one entry per image")
    names = aligned.names
    table = np.concatenate([per_patient_stats(aligned.y_true, aligned.preds[r], aligned.probs.get(r),
                                              codes, n_units) for r in names], axis=1)
    with_probs = all(aligned.probs.get(r) is not None for r in names)
    rng = np.random.default_rng(seed)
    parts: dict[str, dict[str, list]] = {r: {} for r in names}
    with tqdm(total=n_boot, desc=f"bootstrap ({n_units} {'patients' if unit_ids is None else 'units'})",
              unit="rep", disable=not progress, leave=False) as bar:
        for start in range(0, n_boot, chunk):
            k = min(chunk, n_boot - start)
            rep = _draw_counts(rng, k, n_units) @ table  # (k, runs * N_STATS)
            for i, r in enumerate(names):
                flat = flatten_metrics(metrics_from_stats(rep[:, i * N_STATS:(i + 1) * N_STATS], with_probs))
                for key, val in flat.items():
                    parts[r].setdefault(key, []).append(val)
            bar.update(k)
    return {r: {key: np.concatenate(v) for key, v in parts[r].items()} for r in names}


def percentile_ci(samples, ci: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaN replicates, e.g. an empty grade, ignored)."""
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(s, [a, 1.0 - a])
    return float(lo), float(hi)


def bootstrap_p_value(diff_samples) -> float:
    """Two-sided p-value for 'no difference' from paired bootstrap differences.

    Percentile-interval inversion: p is the smallest 1-ci whose interval touches 0, i.e.
    2 x min(share <= 0, share >= 0), with the +1 correction so a finite bootstrap never reports
    p = 0. Consistent with the CI: p < 0.05 (up to quantile interpolation) when the 95%
    percentile interval excludes 0.
    """
    d = np.asarray(diff_samples, float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan")
    b = len(d)
    lower = (np.sum(d <= 0) + 1) / (b + 1)
    upper = (np.sum(d >= 0) + 1) / (b + 1)
    return float(min(1.0, 2.0 * min(lower, upper)))


def point_metrics(aligned: Aligned) -> dict[str, dict]:
    """compute_metrics (the reference) for each run on the aligned images."""
    return {r: M.compute_metrics(aligned.y_true, aligned.preds[r], aligned.probs.get(r)) for r in aligned.names}


def confidence_intervals(point: Mapping[str, Mapping], reps: Mapping[str, Mapping], ci: float = 0.95) -> dict:
    """{run: {metric: {"estimate", "low", "high"}}} with estimates from the reference metrics."""
    out = {}
    for r, m in point.items():
        flat = flatten_metrics(m)
        out[r] = {}
        for key, est in flat.items():
            lo, hi = percentile_ci(reps[r][key], ci) if key in reps[r] else (float("nan"), float("nan"))
            out[r][key] = {"estimate": float(est), "low": lo, "high": hi}
    return out


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test on paired per-image correctness.

    Exact binomial (two-sided) when there are fewer than EXACT_MCNEMAR_BELOW discordant pairs,
    where the chi-square approximation is poor; otherwise chi-square with continuity correction.
    """
    from scipy.stats import binomtest, chi2

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"correctness vectors differ in shape: {a.shape} vs {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n_disc = only_a + only_b
    res = {"a_correct_b_wrong": only_a, "a_wrong_b_correct": only_b, "both_correct": int(np.sum(a & b)),
           "both_wrong": int(np.sum(~a & ~b)), "n": int(len(a))}
    if n_disc == 0:
        res.update(method="none (no discordant pairs)", statistic=0.0, p_value=1.0)
    elif n_disc < EXACT_MCNEMAR_BELOW:
        res.update(method="exact binomial", statistic=float(only_a),
                   p_value=float(binomtest(only_a, n_disc, 0.5).pvalue))
    else:
        stat = (abs(only_a - only_b) - 1.0) ** 2 / n_disc
        res.update(method="chi-square, continuity corrected", statistic=float(stat),
                   p_value=float(chi2.sf(stat, df=1)))
    return res


def paired_comparisons(aligned: Aligned, point: Mapping[str, Mapping], reps: Mapping[str, Mapping],
                       ci: float = 0.95, metrics: Sequence[str] = PAIRED_METRICS) -> list[dict]:
    """For every pair (A, B) in run order: A - B per metric with paired bootstrap CI and p, McNemar."""
    out = []
    flat = {r: flatten_metrics(m) for r, m in point.items()}
    for a, b in combinations(aligned.names, 2):
        entry = {"a": a, "b": b, "differences": {}}
        for key in metrics:
            d = reps[a][key] - reps[b][key]
            lo, hi = percentile_ci(d, ci)
            entry["differences"][key] = {
                "a": float(flat[a][key]), "b": float(flat[b][key]),
                "difference": float(flat[a][key] - flat[b][key]), "low": lo, "high": hi,
                "p_value": bootstrap_p_value(d)}
        entry["mcnemar"] = mcnemar(aligned.preds[a] == aligned.y_true, aligned.preds[b] == aligned.y_true)
        out.append(entry)
    return out


def analyse(aligned: Aligned, n_boot: int = 2000, seed: int = 0, ci: float = 0.95,
            progress: bool = True) -> dict:
    """Point estimates, patient-level bootstrap CIs and pairwise tests for aligned runs."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie strictly between 0 and 1, got {ci}")
    point = point_metrics(aligned)
    reps = bootstrap_replicates(aligned, n_boot=n_boot, seed=seed, progress=progress)
    return {
        "point": point,
        "intervals": confidence_intervals(point, reps, ci),
        "pairwise": paired_comparisons(aligned, point, reps, ci),
    }
