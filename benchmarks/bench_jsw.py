"""Joint space width benchmarks (issue 17).

    python benchmarks/bench_jsw.py synthetic --films 100      # accuracy vs the drawn truth, speed
    python benchmarks/bench_jsw.py kneekl224                  # construct validity on real crops

synthetic: full-size bilateral DICOM films (2000x2560, 0.1-0.2 mm/px, MONOCHROME1/2 alternating,
KL 0-4 drawn uniformly per knee) written to a temp dir and read back as `klgrade measure` and
predict read them (the view entrance; JSW on the film reduced as prepare oai locates it);
medial/lateral minimum JSW vs ``synthetic.true_jsw``. Speed: the measurement of one knee given its
joint geometry (what predict adds to the view it already makes), one thread.
kneekl224: medial minimum JSW (percent of plateau width: the crops have no spacing; medial side
from the file name's L/R) vs KL grade: Spearman rho, medians and bone-on-bone flags per grade, for
all crops and per split (val is the reported test split: the method's constants were chosen on
train only), a box plot per grade. Results: benchmarks/results/jsw_*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KNEEKL224 = Path(__file__).resolve().parents[2] / "shared" / "data" / "kneeKL224"


def _summary(err: np.ndarray) -> dict:
    e = np.abs(err[np.isfinite(err)])
    return {"n": int(e.size), "median_abs_mm": round(float(np.median(e)), 3),
            "p95_abs_mm": round(float(np.percentile(e, 95)), 3), "max_abs_mm": round(float(e.max()), 3),
            "bias_mm": round(float(np.median(err[np.isfinite(err)])), 3)}


def synthetic(n_films: int, seed: int) -> dict:
    import cv2
    from tqdm import tqdm

    from klgrade import synthetic as syn
    from klgrade.measure.files import MEASURE_PX, jsw_of
    from klgrade.view.entrance import film_knees

    cv2.setNumThreads(1)
    rng = np.random.default_rng(seed)
    rows, times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in tqdm(range(n_films), desc="synthetic films"):
            kr, kl = (int(v) for v in rng.integers(0, 5, 2))
            sp = float(np.round(rng.uniform(0.1, 0.2), 4))
            phot = "MONOCHROME1" if i % 2 else "MONOCHROME2"
            pat = syn.random_patient(rng)
            ar, al = syn.random_anatomy(rng, pat), syn.random_anatomy(rng, pat)
            img, _ = syn.render_bilateral(kr, kl, rng, spacing_mm=sp, anatomy_right=ar, anatomy_left=al)
            path = Path(tmp) / f"{i}.dcm"
            syn.save_dataset(syn.bilateral_dataset(syn.to_stored(img, phot), sp, phot, uid_seed=i), path)
            _, knees = film_knees(path, MEASURE_PX)  # the knees `klgrade measure` and predict measure
            for knee, (side, k, a) in zip(knees, (("R", kr, ar), ("L", kl, al))):
                truth = syn.true_jsw(k, a)
                t0 = time.perf_counter()
                r = jsw_of(knee)
                times.append(time.perf_counter() - t0)
                rows.append({"film": i, "side": side, "klg": k, "spacing": sp, "photometric": phot,
                             "true_medial": truth["jsw_medial_mm"], "true_lateral": truth["jsw_lateral_mm"],
                             "medial": r.medial.min, "lateral": r.lateral.min, "medial_flag": r.medial.flag,
                             "lateral_flag": r.lateral.flag, "medial_side": r.medial_side, "reason": r.reason})
    import pandas as pd

    df = pd.DataFrame(rows)
    med_err = (df["medial"] - df["true_medial"]).to_numpy(float)
    lat_err = (df["lateral"] - df["true_lateral"]).to_numpy(float)
    out = {"films": n_films, "knees": len(df), "seed": seed,
           "medial_measured": round(float(np.isfinite(med_err).mean()), 4),
           "lateral_measured": round(float(np.isfinite(lat_err).mean()), 4),
           "medial": _summary(med_err), "lateral": _summary(lat_err),
           "medial_side_correct": round(float((df["medial_side"] == np.where(df["side"] == "R", "right", "left")).mean()), 4),
           "medial_by_grade": {int(g): _summary((d["medial"] - d["true_medial"]).to_numpy(float))
                               for g, d in df.groupby("klg")},
           "bone_on_bone_flags": int((df["medial_flag"] == "bone_on_bone").sum()),
           "ms_per_knee_median": round(1000 * float(np.median(times)), 2),
           "ms_per_knee_p95": round(1000 * float(np.percentile(times, 95)), 2),
           "misses": df[~np.isfinite(med_err)][["film", "side", "klg", "reason"]].to_dict("records"),
           "worst": df.assign(err=np.abs(med_err)).nlargest(5, "err")[
               ["film", "side", "klg", "spacing", "true_medial", "medial", "medial_flag"]].to_dict("records")}
    return out


def _construct(df) -> dict:
    """Medial minimum JSW vs KL grade of one set of crops: rho, medians, flags per grade."""
    from scipy.stats import spearmanr

    m = df[np.isfinite(df["medial"].astype(float))]
    rho, pval = spearmanr(m["klg"], m["medial"])
    med = {int(g): round(float(d["medial"].median()), 3) for g, d in m.groupby("klg")}
    return {"images": len(df), "medial_measured": round(len(m) / len(df), 4), "spearman_rho": round(float(rho), 4),
            "p_value": float(pval), "median_by_grade": med,
            "n_by_grade": {int(g): int(len(d)) for g, d in m.groupby("klg")},
            "bone_on_bone_by_grade": {int(g): int((d["medial_flag"] == "bone_on_bone").sum())
                                      for g, d in df.groupby("klg")},
            "bone_on_bone_share_by_grade": {int(g): round(float((d["medial_flag"] == "bone_on_bone").mean()), 4)
                                            for g, d in df.groupby("klg")},
            "medians_decrease_kl2_to_kl4": bool(med[2] > med[3] > med[4])}


def kneekl224(root: Path, per_grade: int | None, seed: int) -> dict:
    import pandas as pd
    from tqdm import tqdm

    from klgrade.ingest.polarity import NOTE as POLARITY_NOTE
    from klgrade.measure.files import MEASURE_PX, knees_from_file

    files = [(split, int(p.parent.name), p) for split in ("train", "val")
             for p in sorted((root / split).glob("[0-4]/*.png"))]
    if per_grade:
        rng = np.random.default_rng(seed)
        by = {g: [f for f in files if f[1] == g] for g in range(5)}
        files = [by[g][i] for g in range(5) for i in rng.permutation(len(by[g]))[:per_grade]]
    rows = []
    for split, g, p in tqdm(files, desc="kneeKL224"):
        # as `klgrade measure` reads them: the crops keep the film's orientation, the file name says
        # which knee (medial side); bone-dark crops are read inverted (klgrade.ingest.polarity)
        (knee,) = knees_from_file(p, MEASURE_PX)[1]
        r = knee.jsw
        rows.append({"split": split, "klg": g, "file": p.name, "inverted": POLARITY_NOTE in knee.note,
                     "medial": r.medial.min, "lateral": r.lateral.min,
                     "medial_flag": r.medial.flag, "medial_side": r.medial_side, "ok": r.ok})
    df = pd.DataFrame(rows)
    _boxplot(df[np.isfinite(df["medial"].astype(float))], RESULTS / "jsw_kneekl224_box.png")
    right = np.where(df["file"].str[-5] == "R", "right", "left")
    return {"unit": "%plateau", "development_split": "train (2,000 random crops); val untouched until the final run",
            "medial_side_from": "file name (L/R), crops in film orientation",
            "read_inverted": int(df["inverted"].sum()),
            **_construct(df), "by_split": {s: _construct(d) for s, d in df.groupby("split")},
            "secondary": _narrowest(df),
            "medial_side_right_share": round(float((df["medial_side"] == "right").mean()), 4),
            "medial_side_matches_name": round(float((df["medial_side"] == right).mean()), 4)}


def _narrowest(df) -> dict:
    """Not the target, which is medial: the knee's narrowest compartment (min of medial and lateral)
    vs KL, and how often the lateral one is the narrower per grade (lateral-compartment OA)."""
    from scipy.stats import spearmanr

    both = df[np.isfinite(df["medial"].astype(float)) & np.isfinite(df["lateral"].astype(float))]
    knee = np.minimum(both["medial"].astype(float), both["lateral"].astype(float))
    lat = both["lateral"].astype(float) < both["medial"].astype(float)
    return {"knee_min_spearman_rho": round(float(spearmanr(knee, both["klg"])[0]), 4),
            "lateral_spearman_rho": round(float(spearmanr(both["lateral"].astype(float), both["klg"])[0]), 4),
            "lateral_narrower_share_by_grade": {int(g): round(float(lat[both["klg"] == g].mean()), 3) for g in range(5)}}


def _boxplot(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.boxplot([df.loc[df["klg"] == g, "medial"] for g in range(5)], showfliers=False)
    ax.set_xticks(range(1, 6), [f"KL{g}" for g in range(5)])
    ax.set_ylabel("medial min JSW (% plateau width)")
    ax.set_title("kneeKL224: medial minimum JSW by KL grade", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=("synthetic", "kneekl224"))
    ap.add_argument("--films", type=int, default=100)
    ap.add_argument("--per-grade", type=int, default=None, help="kneekl224: images per grade (default all)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.which == "synthetic":
        res, name = synthetic(a.films, a.seed), "jsw_synthetic.json"
    else:
        if not (KNEEKL224 / "train").is_dir():
            sys.exit(f"{KNEEKL224}: not found")
        res, name = kneekl224(KNEEKL224, a.per_grade, a.seed), "jsw_kneekl224.json"
    (RESULTS / name).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("misses", "worst")}, indent=2, default=str))


if __name__ == "__main__":
    main()
