"""Deep fuzz run of issue 18: thousands of seeded hostile inputs into every entry point.

    nice -n 15 .venv/bin/python benchmarks/fuzz_deep.py --n 5000          # resumes where it stopped

Input i is generated from seed i by tests/hostile_util.py (the same generators as tests/test_fuzz.py)
and goes to read_image, the grader (predict/serve core), serve's POST /predict and, for DICOMs, the
OAI per-film step. Every 50 inputs the last ones also go through `klgrade predict` as one batch and
`klgrade prepare folders` as one tree; every 10, a fuzzed manifest goes to `klgrade evaluate` and a
fuzzed config.yaml to read_config. Counted: results, clear errors, tracebacks (any other exception),
HTTP 500s, lost batches (a file neither graded nor reported; a file neither in manifest.csv nor in
rejects.csv) and the peak RSS. State is saved every 100 inputs, so a killed run resumes.
Writes benchmarks/results/fuzz_deep.json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hostile_util import KINDS, RandChooser, config_text, hostile_file, manifest_text  # noqa: E402

WORK = ROOT / "benchmarks" / "work" / "fuzz_deep"
RESULT = ROOT / "benchmarks" / "results" / "fuzz_deep.json"


def setup() -> tuple[Path, list[str]]:
    """A tiny CNN run and a few good images (made once, kept in WORK)."""
    run, data = WORK / "run", WORK / "data"
    if not (run / "checkpoint.pt").is_file():
        import torch

        from klgrade.config import TrainConfig, apply_overrides
        from klgrade.synthetic import write_png_dataset
        from klgrade.train.loop import train

        torch.set_num_threads(1)
        shutil.rmtree(WORK, ignore_errors=True)
        write_png_dataset(data, n_patients=30, seed=0, size=64, progress=False)
        cfg = apply_overrides(TrainConfig(data=str(data)), dict(
            model="test_resnet", weights="none", img_size=64, epochs=1, batch_size=16, tta="none",
            **{"augment.enabled": False}))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train(cfg, run)
    import pandas as pd

    good = [str(data / p) for p in pd.read_csv(data / "manifest.csv")["path"].head(6)]
    return run, good


class Tally:
    def __init__(self, state: dict):
        self.s = state

    def add(self, key: str, n: int = 1) -> None:
        self.s["counts"][key] = self.s["counts"].get(key, 0) + n

    def unexpected(self, where: str, seed: int, exc: BaseException) -> None:
        self.add("tracebacks")
        if len(self.s["examples"]) < 50:
            tb = traceback.format_exception(exc)[-3:]
            self.s["examples"].append({"where": where, "seed": seed, "error": f"{type(exc).__name__}: {exc}"[:300],
                                       "at": "".join(tb)[-600:]})


def one_input(i: int, t: Tally, grader, client, files_dir: Path) -> Path:
    from klgrade.clinic.grader import ClinicError
    from klgrade.ingest.images import read_image
    from klgrade.ingest.oai import CropParams, process_series

    raw, suffix, kind = hostile_file(RandChooser(i))
    t.add(f"kind_{kind}")
    path = files_dir / f"f{i}{suffix or '.dcm'}"
    path.write_bytes(raw)
    for where, call in (("read_image", lambda: read_image(path)),
                        ("grader", lambda: grader.predict_file(path, heatmaps=i % 10 == 0, display="upload"))):
        try:
            call()
            t.add(f"{where}_result")
        except (ValueError, FileNotFoundError, ClinicError):
            t.add(f"{where}_clear_error")
        except Exception as e:  # noqa: BLE001 - what the run counts
            t.unexpected(where, i, e)
    try:
        r = client.post("/predict", files={"file": (f"x{suffix}", raw)}, params={"heatmaps": "false"})
        t.add(f"http_{r.status_code}")
        if r.status_code >= 500:
            t.add("http_500s")
    except Exception as e:  # noqa: BLE001
        t.add("http_500s")
        t.unexpected("serve", i, e)
    if kind.startswith("dicom"):
        try:
            rec = process_series({"path": str(path), "rel": "x", "patient_id": "9000001", "visit": 12,
                                  "sides": ["R", "L"], "out": str(WORK / "oai_out"),
                                  "params": CropParams(size=32, mm_per_px=2.0).__dict__})
            t.add("oai_film_handled" if all(rec["sides"].values()) else "lost_batches")
        except Exception as e:  # noqa: BLE001
            t.unexpected("oai", i, e)
    return path


def batch_checks(i: int, t: Tally, run: Path, good: list[str], recent: list[Path]) -> None:
    """`klgrade predict` on good + recent + good, and `klgrade prepare folders` on a tree of them."""
    from klgrade.cli import main

    files = [good[0], *map(str, recent), good[1]]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["predict", *files, "--run", str(run), "--json"])
        res = json.loads(out.getvalue())
        seen = sorted([r["file"] for r in res["results"]] + [e["file"] for e in res["errors"]])
        t.add("predict_batches")
        if seen != sorted(files) or not {good[0], good[1]} <= {r["file"] for r in res["results"]}:
            t.add("lost_batches")
    except Exception as e:  # noqa: BLE001
        t.add("lost_batches")
        t.unexpected("predict_batch", i, e)
    tree, ds = WORK / "tree", WORK / "ds"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.rmtree(ds, ignore_errors=True)
    for j, f in enumerate([*good[:2], *map(str, recent)]):
        dst = tree / "train" / str(j % 6) / Path(f).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    try:
        import pandas as pd

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main(["prepare", "folders", str(tree), "--out", str(ds), "--workers", "1"])
        listed = (len(pd.read_csv(ds / "manifest.csv")) if rc == 0 else 0) + len(pd.read_csv(ds / "rejects.csv"))
        t.add("prepare_batches")
        if listed != sum(1 for p in tree.rglob("*") if p.is_file()):
            t.add("lost_batches")
    except Exception as e:  # noqa: BLE001
        t.add("lost_batches")
        t.unexpected("prepare_folders", i, e)


def text_checks(i: int, t: Tally, run: Path, good: list[str]) -> None:
    """A fuzzed manifest through `klgrade evaluate`, a fuzzed config.yaml through read_config."""
    from klgrade.cli import main
    from klgrade.rundir import RunError, read_config

    c = RandChooser(10**7 + i)
    ds = WORK / "ev_data"
    ds.mkdir(parents=True, exist_ok=True)
    (ds / "manifest.csv").write_bytes(manifest_text(c, good).encode("utf-8", "surrogateescape"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main(["evaluate", "--run", str(run), "--data", str(ds), "--split", "all",
                       "--out", str(WORK / "ev_out"), "--overwrite", "--device", "cpu"])
        t.add("evaluate_result" if rc == 0 else "evaluate_clear_error")
    except Exception as e:  # noqa: BLE001
        t.unexpected("evaluate", i, e)
    cfg = WORK / "cfg"
    cfg.mkdir(exist_ok=True)
    (cfg / "config.yaml").write_text(config_text(c) if i % 20 else c.bytes(80).decode("latin-1"))
    try:
        read_config(cfg)
        t.add("config_result")
    except RunError:
        t.add("config_clear_error")
    except Exception as e:  # noqa: BLE001
        t.unexpected("read_config", i, e)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="generated inputs (default 5000)")
    ap.add_argument("--fresh", action="store_true", help="start again instead of resuming")
    args = ap.parse_args()
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from fastapi.testclient import TestClient

    from klgrade.clinic.grader import Grader
    from klgrade.clinic.serve import create_app

    run, good = setup()
    state_path = WORK / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() and not args.fresh else \
        {"next": 0, "counts": {}, "examples": [], "seconds": 0.0}
    t, grader = Tally(state), Grader.from_run(run)
    client = TestClient(create_app(grader=grader, max_upload_mb=8), base_url="http://localhost",
                        raise_server_exceptions=False)
    # RSS of the loaded model and libraries before any input (torch alone is several hundred MB)
    state.setdefault("baseline_rss_mb", _vm("VmRSS"))
    files_dir = WORK / "files"
    recent: list[Path] = []
    t0 = time.perf_counter()
    for i in range(state["next"], args.n):
        files_dir.mkdir(parents=True, exist_ok=True)
        recent.append(one_input(i, t, grader, client, files_dir))
        if i % 10 == 9:
            text_checks(i, t, run, good)
        if len(recent) == 50:
            batch_checks(i, t, run, good, recent[-12:])
            shutil.rmtree(files_dir, ignore_errors=True)
            recent = []
        if i % 100 == 99 or i == args.n - 1:
            state.update(next=i + 1, seconds=state["seconds"] + time.perf_counter() - t0,
                         peak_rss_mb=max(state.get("peak_rss_mb", 0), _vm("VmHWM")))
            t0 = time.perf_counter()
            state_path.write_text(json.dumps(state))
            print(f"{i + 1}/{args.n}: tracebacks {state['counts'].get('tracebacks', 0)}, "
                  f"500s {state['counts'].get('http_500s', 0)}, lost {state['counts'].get('lost_batches', 0)}",
                  flush=True)
    report(state, args.n)
    return 0


def _vm(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def report(state: dict, n: int) -> None:
    from klgrade.ingest.images import max_pixels

    c = state["counts"]
    out = {
        "inputs": state["next"], "target": n, "kinds": {k: c.get(f"kind_{k}", 0) for k in KINDS},
        "tracebacks": c.get("tracebacks", 0), "http_500s": c.get("http_500s", 0),
        "lost_batches": c.get("lost_batches", 0), "baseline_rss_mb": state.get("baseline_rss_mb"),
        "peak_rss_mb": state.get("peak_rss_mb"),
        "pixel_budget_mp": max_pixels() / 1e6, "seconds": round(state["seconds"], 1), "counts": c,
        "examples": state["examples"],
        "note": "single process, inputs <= 48 px plus header-only bombs up to 2^31 px; the RSS bound "
                "for full-budget images is measured by benchmarks/bench_serve_memory.py",
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("counts", "examples")}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
