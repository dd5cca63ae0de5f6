"""Does averaging runs help? The mean of the runs' probabilities, graded by argmax, with the same
patient-level bootstrap as `klgrade compare`.

Each run's saved predictions are averaged image by image: its patient-level hold-out
(``predictions_val.csv``, what the runs were selected on) and the reported split
(``predictions_test.csv``, kneeKL224 val in the study). Which runs to average is read off the
hold-out column only; the reported split is never used to choose. An analysis, not a klgrade run
kind: `predict` and `evaluate` grade with one run.

    .venv/bin/python benchmarks/ensemble_runs.py RUN_A RUN_B [RUN ...] [--json out.json]

Prints, per split, QWK (95% CI) of each run and of the ensemble, and ensemble - first run
(paired CI, p).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from klgrade.evaluate import stats as S
from klgrade.rundir import PROB_COLUMNS, read_predictions


def ensemble_frame(frames: list) -> object:
    """The mean of aligned prediction frames' probabilities, graded by argmax."""
    ids = frames[0]["image_id"]
    out = frames[0][["image_id", "patient_id", "klg"]].copy()
    probs = []
    for f in frames:
        f = f.set_index("image_id").loc[ids]  # same images, same order (align_predictions re-checks)
        probs.append(f[PROB_COLUMNS].to_numpy(float))
    mean = np.mean(probs, axis=0)
    out[PROB_COLUMNS] = mean
    out["pred"] = mean.argmax(axis=1)
    return out


def analyse_split(runs: list[Path], split: str, n_boot: int, seed: int) -> dict:
    frames = {r.name: read_predictions(r, split) for r in runs}
    frames["ensemble"] = ensemble_frame(list(frames.values()))
    aligned = S.align_predictions(frames)
    res = S.analyse(aligned, n_boot=n_boot, seed=seed, progress=False)
    first = runs[0].name
    pair = next(p for p in res["pairwise"] if p["a"] == first and p["b"] == "ensemble")
    d = pair["differences"]["qwk"]
    return {
        "n_images": aligned.n_images, "n_patients": aligned.n_patients,
        "qwk": {n: {"value": res["point"][n]["qwk"],
                    "ci": [res["intervals"][n]["qwk"]["low"], res["intervals"][n]["qwk"]["high"]]}
                for n in frames},
        "ensemble_minus_first": {"difference": -d["difference"], "low": -d["high"], "high": -d["low"],
                                 "p_value": d["p_value"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--splits", default="val,test", help="hold-out first, then the reported split")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    out = {"runs": [str(r) for r in a.runs], "n_boot": a.n_boot, "seed": a.seed, "splits": {}}
    for split in a.splits.split(","):
        res = out["splits"][split] = analyse_split(a.runs, split, a.n_boot, a.seed)
        print(f"{split} ({res['n_images']} images, {res['n_patients']} patients)")
        for name, q in res["qwk"].items():
            print(f"  {name:<40} QWK {q['value']:.3f} ({q['ci'][0]:.3f}-{q['ci'][1]:.3f})")
        d = res["ensemble_minus_first"]
        print(f"  ensemble - {a.runs[0].name}: {d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f}), "
              f"p = {d['p_value']:.2f}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
