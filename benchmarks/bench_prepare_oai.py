"""Benchmark `prepare oai`: localisation accuracy and speed on full-size synthetic OAI films.

    .venv/bin/python benchmarks/bench_prepare_oai.py [--patients 34] [--workers 1,2] [--data DIR]

1. Builds (once, cached in --data) an OAI-shaped tree of bilateral 2560 x 2000 12-bit films with
   known joint centres: MONOCHROME1/2, CR/DX, three rescale variants, spacing 0.1-0.2 mm,
   PixelSpacing-only files, per-film exposure, gamma and noise (klgrade.synthetic).
2. Per-stage time of one film on one core: DICOM read + LUTs, localisation, crops + PNG writes.
3. The whole pipeline with each --workers value (fresh output dir each): films/s, and the joint
   centre error against the truth (share within 5 mm, median, 95th percentile, max).
Not part of the test run. Numbers depend on machine load: the load average is printed. On a
busy machine extra workers cannot show their gain (Linux autogroup scheduling gives each login
session a fair share of the CPU, however many processes it runs), so the run also reports the
parent's serial CPU per film and the Amdahl speed-up it implies on idle cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def build_tree(data: Path, patients: int, visits: tuple[int, ...]) -> pd.DataFrame:
    from klgrade.synthetic import write_dicom_tree

    truth_csv = data / "truth.csv"
    stamp = data / f".built_{patients}_{'-'.join(map(str, visits))}"
    if stamp.is_file() and truth_csv.is_file():
        return pd.read_csv(truth_csv, dtype={"patient_id": str})
    shutil.rmtree(data, ignore_errors=True)
    t = time.perf_counter()
    truth = write_dicom_tree(data, n_patients=patients, seed=11, shape=(2000, 2560), visits=visits,
                             spacing_range=(0.1, 0.2), missing_label_frac=0.0)
    stamp.write_text("ok\n")
    print(f"built {truth['path'].nunique()} films in {time.perf_counter() - t:.0f} s")
    return truth


def stage_times(data: Path, truth: pd.DataFrame, n: int = 12) -> dict:
    from klgrade.ingest.crop import crop_square, to_uint16
    from klgrade.ingest.dicom import read_radiograph
    from klgrade.ingest.oai import write_png16
    from klgrade.ingest.roi import locate_bilateral

    paths = list(dict.fromkeys(truth["path"]))[:n]
    t_read = t_loc = t_crop = cpu = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, rel in enumerate(paths):
            c0 = time.process_time()
            t0 = time.perf_counter()
            rad = read_radiograph(data / rel)
            t1 = time.perf_counter()
            locs = locate_bilateral(rad.pixels, rad.spacing_mm)
            t2 = time.perf_counter()
            for side, loc in locs.items():
                crop = crop_square(rad.pixels, (loc.x, loc.y), 140.0, rad.spacing_mm, 400, flip=side == "L")
                write_png16(Path(tmp) / f"{i}{side}.png", to_uint16(crop))
            t3 = time.perf_counter()
            if i:  # the first film warms caches and imports
                cpu += time.process_time() - c0
                t_read += t1 - t0
                t_loc += t2 - t1
                t_crop += t3 - t2
    k = max(1, len(paths) - 1)
    return {"read_ms": 1000 * t_read / k, "locate_ms": 1000 * t_loc / k, "crop_write_ms": 1000 * t_crop / k,
            "total_ms": 1000 * (t_read + t_loc + t_crop) / k, "cpu_ms": 1000 * cpu / k}


def run_pipeline(data: Path, truth: pd.DataFrame, workers: int) -> dict:
    import resource

    from klgrade.ingest.oai import prepare_oai

    def cpu_s() -> float:
        # the parent's own CPU: with workers it is the serial part (labels, scheduling, manifest);
        # forkserver workers are not our children, so they are not counted here
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    labels = sorted(data.glob("kxr_sq_bu*.txt"))
    contents = sorted(data.glob("*m/contents.csv"))
    with tempfile.TemporaryDirectory() as out:
        t, c = time.perf_counter(), cpu_s()
        res = prepare_oai(data, labels, out, contents=contents, workers=workers, progress=False,
                          sheet_samples=0)
        wall, cpu = time.perf_counter() - t, cpu_s() - c
    m = res.manifest.merge(truth.rename(columns={"path": "dicom"})[["dicom", "side", "x", "y", "spacing_mm"]],
                           on=["dicom", "side"], suffixes=("", "_truth"))
    err = np.hypot(m["joint_x"] - m["x"], m["joint_y"] - m["y"]) * m["spacing_mm_truth"]
    knees = len(truth)
    located = len(m)
    return {"workers": workers, "films": res.summary["films"], "wall_s": wall, "cpu_s": cpu,
            "films_per_s": res.summary["films"] / wall, "knees": knees, "located": located,
            "within_5mm": float((err <= 5).sum() / knees), "median_mm": float(err.median()),
            "p95_mm": float(err.quantile(0.95)), "max_mm": float(err.max()),
            "rejects": res.summary["reject_reasons"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "klgrade_bench_oai"))
    ap.add_argument("--patients", type=int, default=34)
    ap.add_argument("--visits", default="12,24,36")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    data = Path(args.data)
    truth = build_tree(data, args.patients, tuple(int(v) for v in args.visits.split(",")))
    print(f"load average before timing: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    st = stage_times(data, truth)
    print("one film, one core: read {read_ms:.1f} ms + locate {locate_ms:.1f} ms + 2 crops/PNGs "
          "{crop_write_ms:.1f} ms = {total_ms:.1f} ms wall ({rate:.1f} films/s); CPU {cpu_ms:.1f} ms/film "
          "({cpu_rate:.1f} films/s per core)".format(**st, rate=1000 / st["total_ms"], cpu_rate=1000 / st["cpu_ms"]))
    for w in (int(x) for x in args.workers.split(",")):
        r = run_pipeline(data, truth, w)
        print(f"workers={w}: {r['films']} films in {r['wall_s']:.1f} s = {r['films_per_s']:.1f} films/s "
              f"(incl. pool start-up), parent CPU {1000 * r['cpu_s'] / r['films']:.1f} ms/film; localisation: {r['located']}/{r['knees']} knees located, "
              f"{100 * r['within_5mm']:.1f}% within 5 mm, median {r['median_mm']:.2f} mm, "
              f"p95 {r['p95_mm']:.2f} mm, max {r['max_mm']:.2f} mm; rejects {r['rejects']}")
        if w > 1:
            serial = r["cpu_s"] / r["films"] / (r["cpu_s"] / r["films"] + st["cpu_ms"] / 1000)
            print(f"  serial share {100 * serial:.1f}% of the CPU per film -> Amdahl speed-up with {w} idle "
                  f"cores {1 / (serial + (1 - serial) / w):.2f}x")


if __name__ == "__main__":
    main()
