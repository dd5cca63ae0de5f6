"""Patient-level, grade-stratified, seeded splits.

Every image of one patient (both knees, all visits) lands in one split. Patients are stratified by
their most severe grade, the grade that is rare and clinically decisive, then allocated to splits by
largest remainder so small strata are split as evenly as the fractions allow.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from klgrade.ingest.manifest import SPLITS


def parse_fractions(text: str | tuple | list) -> tuple[float, ...]:
    vals = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if not vals or any(v < 0 for v in vals) or abs(sum(vals) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {text!r}")
    return tuple(vals)


def patient_split(
    df: pd.DataFrame,
    fractions=(0.7, 0.1, 0.2),
    seed: int = 0,
    names: tuple[str, ...] = SPLITS,
) -> pd.Series:
    """Return a split name per row of ``df`` (needs ``patient_id`` and ``klg``). Deterministic."""
    fractions = parse_fractions(fractions)
    if len(fractions) > len(names):
        raise ValueError(f"{len(fractions)} fractions given but only {len(names)} split names")
    names = names[: len(fractions)]
    patient_grade = df.groupby("patient_id")["klg"].max().sort_index()
    rng = np.random.default_rng(seed)
    assign: dict[str, str] = {}
    for grade in sorted(patient_grade.unique()):
        pats = patient_grade.index[patient_grade == grade].to_numpy(copy=True)
        rng.shuffle(pats)
        counts = _largest_remainder(len(pats), fractions)
        start = 0
        for name, c in zip(names, counts):
            for p in pats[start : start + c]:
                assign[p] = name
            start += c
    _fill_empty(assign, patient_grade, fractions, names, rng)
    return df["patient_id"].map(assign).rename("split")


def _fill_empty(assign: dict, patient_grade: pd.Series, fractions, names, rng) -> None:
    """Rounding stratum by stratum can leave a split empty that the fractions give a patient (10%
    of 9 patients in five grades is 0 in every grade): move one there from the largest split, out
    of its most common grade. Datasets with every split filled are left exactly as they were."""
    want = dict(zip(names, _largest_remainder(len(patient_grade), fractions)))
    for name in names:
        if want[name] == 0 or name in assign.values():
            continue
        sizes = pd.Series(assign).value_counts()
        if sizes.iloc[0] < 2:  # nobody to spare
            return
        donor = sizes.index[0]
        pats = [p for p, s in assign.items() if s == donor]
        grades = patient_grade.loc[pats]
        common = grades.value_counts().sort_index(kind="stable").idxmax()
        pool = sorted(grades.index[grades == common])
        assign[pool[int(rng.integers(len(pool)))]] = name


def _largest_remainder(n: int, fractions) -> list[int]:
    raw = np.array(fractions) * n
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    for i in order[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def holdout_split(df: pd.DataFrame, fraction: float = 0.1, seed: int = 0,
                  source: str = "train", target: str = "val") -> pd.DataFrame:
    """Move a patient-level, stratified ``fraction`` of ``source`` into ``target`` (for model
    selection when a dataset's own val split is kept for reporting)."""
    out = df.copy()
    m = out["split"] == source
    sub = patient_split(out[m], (1 - fraction, fraction), seed=seed, names=(source, target))
    out.loc[m, "split"] = sub.to_numpy()
    return out
