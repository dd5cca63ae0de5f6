"""Benchmark: one bilateral film through a real PACS vs local `predict` on the same file (target <= 1.5x).

Side by side in one process, same model, same film, interleaved per repetition:

- ``predict``            Grader.predict_file (what `klgrade predict FILE` runs per file);
- ``predict_heatmaps``   the same with Grad-CAM (`--heatmaps`);
- ``predict_dicom_out``  `klgrade predict FILE --dicom-out DIR`: grades + Grad-CAM + SR + SC files,
                         the same results the PACS path produces;
- ``pacs_round_trip``    `klgrade pacs --once` cycle for one new study in a real Orthanc (started
                         here, like the tests do): QIDO-RS find, QIDO-RS series, QIDO-RS instances,
                         WADO-RS retrieve, grade, SR + SC, STOW-RS store. Uploading the film and
                         deleting the study afterwards are outside the timing.

    .venv/bin/python benchmarks/bench_pacs.py [--run RUN] [--reps 10] [--json benchmarks/results/bench_pacs.json]

Without --run a ResNet18 run (random weights, 224 px) is made as in bench_predict.py; the film
is bench_predict's synthetic 2,560 x 2,000 12-bit OAI-size film (0.14 mm/px).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' Orthanc launcher

from bench_predict import make_film, make_run  # noqa: E402

from orthanc_util import Orthanc  # noqa: E402


def _fresh_copy(film: Path, rep: int):
    """The film as a new study (new Study/Series/SOP UIDs), so every cycle has one study to grade."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(film)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, kw, generate_uid(entropy_srcs=[kw, str(rep), str(time.time())]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an existing run dir (default: make a ResNet18 one)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from klgrade.clinic.grader import Grader
    from klgrade.clinic.pacs.dicomweb import PacsJob, make_client
    from klgrade.clinic.pacs.grading import model_info
    from klgrade.clinic.pacs.results import write_local

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = Path(args.run) if args.run else make_run(tmp)
        film = make_film(tmp / "bilateral.dcm")
        grader = Grader.from_run(run, device="cpu", tta="none")
        model = model_info(grader)
        server = Orthanc(tmp / "orthanc").start()
        try:
            client = make_client(server.dicomweb, server.env)
            job = PacsJob(client, grader, model, server.dicomweb)
            local = {"predict": lambda: grader.predict_file(film),
                     "predict_heatmaps": lambda: grader.predict_file(film, heatmaps=True),
                     "predict_dicom_out": lambda: write_local(grader, film, tmp / "out", model)}
            times = {k: [] for k in [*local, "pacs_round_trip"]}
            for rep in range(args.reps + 1):  # the first repetition warms up and is dropped
                for name, fn in local.items():
                    times[name].append(_timed(fn))
                ds = _fresh_copy(film, rep)
                client.store_instances([ds])
                t = _timed(job.run_once)
                stored = server.count_instances()
                assert stored == 3, f"expected film + SC + SR in the PACS, found {stored}"
                times["pacs_round_trip"].append(t)
                study = server.request("/tools/lookup", data=str(ds.StudyInstanceUID).encode(), method="POST")
                server.request(f"/studies/{study[0]['ID']}", method="DELETE")
        finally:
            server.stop()
    stats = {k: {"min_s": min(v[1:]), "median_s": statistics.median(v[1:])} for k, v in times.items()}
    trip = stats["pacs_round_trip"]["median_s"]
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                   f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}",
        "model": grader.description, "img_size": grader.img_size, "film": "2560x2000 12-bit DICOM, 0.14 mm/px",
        "pacs": "Orthanc (Debian orthanc + orthanc-dicomweb) on 127.0.0.1, HTTP basic auth",
        "reps": args.reps, "times": stats,
        "ratio_vs_predict_dicom_out": trip / stats["predict_dicom_out"]["median_s"],
        "ratio_vs_predict_heatmaps": trip / stats["predict_heatmaps"]["median_s"],
        "ratio_vs_predict": trip / stats["predict"]["median_s"],
        "target": "pacs_round_trip <= 1.5 x local predict producing the same results (--dicom-out)",
    }
    print(f"{res['model']} @ {res['img_size']} px on {res['machine']}")
    for k, v in stats.items():
        print(f"  {k:<20}{v['min_s'] * 1e3:8.0f} ms min {v['median_s'] * 1e3:8.0f} ms median")
    print(f"  PACS round trip / local predict --dicom-out: {res['ratio_vs_predict_dicom_out']:.2f} (target <= 1.5); "
          f"/ predict --heatmaps: {res['ratio_vs_predict_heatmaps']:.2f}; / plain predict: {res['ratio_vs_predict']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
