"""How much of a run's QWK is its decision rule? Argmax vs cut-points on the expected grade.

QWK rewards ordinal closeness, and argmax of five probabilities is not the QWK-optimal decision.
For each run this fits four cut-points on the expected grade sum_k k * p_k, maximising QWK on the
run's *hold-out* predictions (``predictions_val.csv``, the patient-level 10% of train the run was
selected on), then applies them unchanged to the reported split (``predictions_test.csv``). The
reported split is never used for fitting. An analysis, not a klgrade feature: predict and evaluate
grade by argmax.

Would the hold-out choose cut-points? Fitted and scored on the same hold-out they always win, so
``holdout_crossfit_gain`` scores them out of sample within it: the hold-out's patients split in two
halves, cut-points fitted on one half and scored against argmax on the other, both ways, over
``REPEATS`` random splits (mean and SD of the QWK gain).

    .venv/bin/python benchmarks/decision_cuts.py RUN [RUN ...] [--json out.json]

A run without hold-out predictions gets them first with
``klgrade evaluate --run RUN --split val --tta flip`` (CNN runs; the run's own TTA).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from klgrade.evaluate.metrics import qwk
from klgrade.grades import N_GRADES


def _load(run: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    d = pd.read_csv(run / f"predictions_{split}.csv")
    return d["klg"].to_numpy(int), d[[f"p{k}" for k in range(N_GRADES)]].to_numpy(float)


def fit_cuts(y: np.ndarray, expected: np.ndarray, rounds: int = 5) -> np.ndarray:
    """Coordinate search of the four cut-points (start: 0.5, 1.5, 2.5, 3.5), each over +-0.5."""
    cuts = np.arange(N_GRADES - 1) + 0.5
    for _ in range(rounds):
        for j in range(len(cuts)):
            grid = np.linspace(cuts[j] - 0.5, cuts[j] + 0.5, 101)
            scores = [qwk(y, np.digitize(expected, np.sort(np.r_[cuts[:j], g, cuts[j + 1:]]))) for g in grid]
            cuts[j] = grid[int(np.argmax(scores))]
    return np.sort(cuts)


REPEATS = 10


def crossfit_gain(run: Path, seed: int = 0) -> tuple[float, float]:
    """Mean and SD of the QWK gain of cut-points over argmax, fitted on one half of the hold-out's
    patients and scored on the other (both ways, REPEATS random halvings)."""
    d = pd.read_csv(run / "predictions_val.csv")
    y, p = d["klg"].to_numpy(int), d[[f"p{k}" for k in range(N_GRADES)]].to_numpy(float)
    expected, patients = p @ np.arange(N_GRADES), d["patient_id"].astype(str)
    rng, gains = np.random.default_rng(seed), []
    for _ in range(REPEATS):
        ids = patients.unique()
        first = patients.isin(rng.permutation(ids)[: len(ids) // 2]).to_numpy()
        for fit, score in ((first, ~first), (~first, first)):
            cuts = fit_cuts(y[fit], expected[fit], rounds=3)
            gains.append(qwk(y[score], np.digitize(expected[score], cuts)) - qwk(y[score], p[score].argmax(1)))
    return float(np.mean(gains)), float(np.std(gains))


def analyse(run: Path) -> dict:
    yv, pv = _load(run, "val")
    yt, pt = _load(run, "test")
    grades = np.arange(N_GRADES)
    cuts = fit_cuts(yv, pv @ grades)
    return {"run": run.name, "holdout_n": len(yv), "test_n": len(yt), "cuts": [round(float(c), 3) for c in cuts],
            "holdout_qwk_argmax": round(qwk(yv, pv.argmax(1)), 4),
            "holdout_qwk_cuts": round(qwk(yv, np.digitize(pv @ grades, cuts)), 4),
            "holdout_crossfit_gain": [round(v, 4) for v in crossfit_gain(run)],
            "test_qwk_argmax": round(qwk(yt, pt.argmax(1)), 4),
            "test_qwk_cuts": round(qwk(yt, np.digitize(pt @ grades, cuts)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = []
    for run in a.runs:
        if not (run / "predictions_val.csv").is_file():
            print(f"{run}: no hold-out predictions (predictions_val.csv); skipped", file=sys.stderr)
            continue
        rows.append(analyse(run))
        r = rows[-1]
        print(f"{r['run']:32s} test QWK argmax {r['test_qwk_argmax']:.4f}  cuts {r['test_qwk_cuts']:.4f}  "
              f"(hold-out {r['holdout_qwk_argmax']:.4f} -> {r['holdout_qwk_cuts']:.4f}, cross-fitted gain "
              f"{r['holdout_crossfit_gain'][0]:+.4f} +- {r['holdout_crossfit_gain'][1]:.4f}; cuts {r['cuts']})")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
