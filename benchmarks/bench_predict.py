"""Benchmark: `klgrade predict` on one bilateral radiograph vs the bare model (target: <= 1.3x).

Baseline = decoding the DICOM (klgrade's reader) + the bare model's forward pass on the two knee
crops (a normalised (2, 3, S, S) tensor, no grad) in the precision and memory format klgrade picked
for this run on this CPU (the layout evaluate and predict use). End to end = ``Grader.predict_file``
on the same file: read + locate both joints + crop + view + normalise + forward + softmax + result
dicts, with and without the joint space width measurement (``jsw``, a second product beside the
grade). All sides run in this process with the same torch threads, interleaved, each timed over
``--reps`` warm runs (CPU time including the call's own OpenMP spin-down, see SETTLE_S); the one-off process start (Python + torch import, model load) is reported apart. Ratios: of the minima, of
the medians, and (``ratio_cpu_paired``) the median over repetitions of each repetition's own
ratio, whose sides ran back to back.

    .venv/bin/python benchmarks/bench_predict.py [--run RUN] [--reps 20] [--json out.json]

Without --run a ResNet18 run dir (random weights, same format and code path as a trained one) is
made with `klgrade train --model resnet18 --weights none --epochs 1` on a tiny synthetic set: its
speed is that of any ResNet18 run. The radiograph is a synthetic 2,560 x 2,000, 12-bit bilateral
PA film (0.14 mm/px), the size of an OAI film.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# torch's OpenMP workers spin-wait ~3-8 ms of CPU after each forward before they sleep: CPU time is
# read this long after a call returns, so each call is charged its own spin, not the next call's.
SETTLE_S = 0.03


def _interleaved(fns: dict, reps: int) -> dict:
    """Time each function ``reps`` times, interleaved (a, b, c, a, b, c, ...) so a busy machine
    slows them alike; returns ({name: (min wall, median wall, min CPU)}, {name: [CPU per rep]}) in
    seconds. CPU time is this process's, all threads, up to SETTLE_S after the call: on a shared
    machine it is the cost least disturbed by other jobs."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
            time.sleep(SETTLE_S)
            cpu[k].append(time.process_time() - c)
    return {k: (min(v), statistics.median(v), min(cpu[k])) for k, v in times.items()}, cpu


def paired(cpu: dict, num: str, *den: str) -> float:
    """Median over repetitions of ``num``'s CPU time / the sum of ``den``'s in the same repetition
    (run back to back, so the machine's drift between repetitions cancels)."""
    return statistics.median(a / sum(cpu[d][i] for d in den) for i, a in enumerate(cpu[num]))


def make_run(root: Path) -> Path:
    from klgrade.synthetic import write_png_dataset

    data = write_png_dataset(root / "data", n_patients=20, seed=0, size=224, visits_per_patient=1, progress=False)
    run = root / "resnet18"
    subprocess.run([sys.executable, "-m", "klgrade.cli", "train", "--data", str(data), "--model", "resnet18",
                    "--weights", "none", "--img-size", "224", "--epochs", "1", "--batch-size", "8",
                    "--out", str(run)], check=True, capture_output=True)
    return run


def make_film(path: Path) -> Path:
    from klgrade.synthetic import bilateral_dataset, render_bilateral, save_dataset, to_stored

    img, _ = render_bilateral(2, 3, np.random.default_rng(0), spacing_mm=0.14, shape=(2000, 2560))
    save_dataset(bilateral_dataset(to_stored(img), 0.14), path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an existing ResNet18 run dir (default: make one)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    from klgrade.clinic.grader import Grader

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = Path(args.run) if args.run else make_run(tmp)
        film = make_film(tmp / "bilateral.dcm")
        t0 = time.perf_counter()
        grader = Grader.from_run(run, device="cpu", tta="none")
        load_s = time.perf_counter() - t0
        t, cpu = _interleaved(sides(grader, film), args.reps)
        cam, _ = _interleaved({"e2e_cam": lambda: grader.predict_file(film, heatmaps=True)}, max(3, args.reps // 4))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "klgrade.cli", "predict", str(film), "--run", str(run),
                        "--tta", "none", "--json"], check=True, capture_output=True)
        cli_s = time.perf_counter() - t0
    res = result(grader, t, cpu, args.reps)
    res.update(predict_with_heatmaps_s=cam["e2e_cam"], model_load_s=load_s, cli_process_s=cli_s)
    report(res, t)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


def sides(grader, film: Path) -> dict:
    """The timed calls: decode, the bare forward (2 and 4 crops, the run's precision and fp32),
    the views, and predict end to end (with and without JSW, flip TTA, an fp32 forward)."""
    from klgrade.clinic.grader import knees_from_file
    from klgrade.ingest.dicom import read_radiograph

    _, knees = knees_from_file(film, grader.img_size)
    fmt = torch.channels_last if grader.channels_last else torch.contiguous_format
    x = torch.from_numpy(np.stack([k.view for k in knees])).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    x = x.contiguous(memory_format=fmt)
    x4 = torch.cat([x, x.flip(3)]).contiguous(memory_format=fmt)
    dtype = grader.amp_dtype

    def bare(inp):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            grader.model(inp)

    def bare_fp32(inp):  # the forward as predict ran it before it used the run's layout
        with torch.no_grad():
            grader.model(inp.contiguous())

    def predict_fp32():
        grader.amp_dtype, grader.channels_last = None, False
        grader.predict_file(film)
        grader.amp_dtype, grader.channels_last = dtype, fmt == torch.channels_last

    def predict_flip():
        grader.tta = "flip"
        grader.predict_file(film)
        grader.tta = "none"

    return {"decode": lambda: read_radiograph(film),
            "views": lambda: knees_from_file(film, grader.img_size, jsw=False), "fwd2": lambda: bare(x),
            "fwd4": lambda: bare(x4), "e2e": lambda: grader.predict_file(film),
            "e2e_nojsw": lambda: grader.predict_file(film, jsw=False),
            "e2e_flip": predict_flip, "fwd2_fp32": lambda: bare_fp32(x), "e2e_fp32": predict_fp32}


def result(grader, t: dict, cpu: dict, reps: int) -> dict:
    base_min, base_med = t["decode"][0] + t["fwd2"][0], t["decode"][1] + t["fwd2"][1]
    base_cpu = t["decode"][2] + t["fwd2"][2]
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                   f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}",
        "model": grader.description, "precision": grader.precision, "img_size": grader.img_size,
        "film": "2560x2000 12-bit DICOM, 0.14 mm/px",
        "reps": reps, "cpu_settle_s": SETTLE_S, "times_min_median_s": t, "baseline_s": [base_min, base_med],
        "ratio_min": t["e2e"][0] / base_min, "ratio_median": t["e2e"][1] / base_med,
        "ratio_cpu": t["e2e"][2] / base_cpu, "ratio_cpu_paired": paired(cpu, "e2e", "decode", "fwd2"),
        "ratio_min_without_jsw": t["e2e_nojsw"][0] / base_min, "ratio_median_without_jsw": t["e2e_nojsw"][1] / base_med,
        "ratio_cpu_without_jsw": t["e2e_nojsw"][2] / base_cpu,
        "ratio_cpu_paired_without_jsw": paired(cpu, "e2e_nojsw", "decode", "fwd2"),
        "before_fp32": {"ratio_min": t["e2e_fp32"][0] / (t["decode"][0] + t["fwd2_fp32"][0]),
                        "ratio_cpu": t["e2e_fp32"][2] / (t["decode"][2] + t["fwd2_fp32"][2]),
                        "ratio_cpu_paired": paired(cpu, "e2e_fp32", "decode", "fwd2_fp32")},
        "ratio_flip_tta_min": t["e2e_flip"][0] / (t["decode"][0] + t["fwd4"][0]),
    }


def report(res: dict, t: dict) -> None:
    def row(label, key):
        print(f"  {label:<26}{t[key][0] * 1e3:8.1f} ms {t[key][1] * 1e3:8.1f} ms {t[key][2] * 1e3:8.1f} ms")

    base_min, base_med = res["baseline_s"]
    base_cpu = t["decode"][2] + t["fwd2"][2]
    print(f"{res['model']} @ {res['img_size']} px, {res['precision']}, on {res['machine']}")
    print(f"  {'':<26}{'wall min':>11} {'wall med':>11} {'CPU min':>11}")
    row("decode DICOM", "decode")
    row("bare forward, 2 crops", "fwd2")
    print(f"  {'baseline (sum)':<26}{base_min * 1e3:8.1f} ms {base_med * 1e3:8.1f} ms {base_cpu * 1e3:8.1f} ms")
    row("decode + locate + views", "views")
    row("predict end to end", "e2e")
    print(f"  ratio {res['ratio_min']:.2f} (wall min) / {res['ratio_median']:.2f} (wall median) / "
          f"{res['ratio_cpu']:.2f} (CPU) / {res['ratio_cpu_paired']:.2f} (CPU, paired)   target <= 1.3")
    row("predict without JSW", "e2e_nojsw")
    print(f"  ratio {res['ratio_min_without_jsw']:.2f} (wall min) / {res['ratio_median_without_jsw']:.2f} (wall median) / "
          f"{res['ratio_cpu_without_jsw']:.2f} (CPU) / {res['ratio_cpu_paired_without_jsw']:.2f} (CPU, paired)")
    row("bare forward fp32, 2 crops", "fwd2_fp32")
    row("predict fp32 (before)", "e2e_fp32")
    print(f"  before (fp32): ratio {res['before_fp32']['ratio_min']:.2f} (wall min) / "
          f"{res['before_fp32']['ratio_cpu']:.2f} (CPU) / {res['before_fp32']['ratio_cpu_paired']:.2f} (CPU, paired)")
    row("bare forward, 4 crops", "fwd4")
    row("predict, flip TTA", "e2e_flip")
    print(f"  flip TTA ratio vs decode + 4-crop forward: {res['ratio_flip_tta_min']:.2f} (min)")
    print(f"  with Grad-CAM heatmaps    {res['predict_with_heatmaps_s'][0] * 1e3:8.1f} ms (min)")
    print(f"  model load (once) {res['model_load_s'] * 1e3:.0f} ms;  whole `klgrade predict` process "
          f"{res['cli_process_s']:.1f} s")


if __name__ == "__main__":
    main()
