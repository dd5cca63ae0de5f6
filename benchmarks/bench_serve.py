"""Benchmark: `klgrade serve` under a bounded loopback load test (20 concurrent clients).

Starts `klgrade serve` in a subprocess on 127.0.0.1 (a free port), waits for /healthz, then
``--clients`` asyncio httpx clients POST the same bilateral radiograph to /predict until
``--requests`` uploads in total have been answered (bounded: the test always ends). Reports
errors, throughput and latency percentiles. Nothing leaves this machine.

    .venv/bin/python benchmarks/bench_serve.py --run RUN [--clients 20] [--requests 100] [--no-heatmaps]

Without --run a tiny test_resnet run is trained on synthetic knees first (seconds).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(root: Path) -> Path:
    from klgrade.synthetic import write_png_dataset

    data = write_png_dataset(root / "data", n_patients=30, seed=0, size=64, visits_per_patient=1, progress=False)
    run = root / "tiny"
    subprocess.run([sys.executable, "-m", "klgrade.cli", "train", "--data", str(data), "--model", "test_resnet",
                    "--weights", "none", "--img-size", "64", "--epochs", "1", "--out", str(run)],
                   check=True, capture_output=True)
    return run


def make_film(path: Path) -> Path:
    from klgrade.synthetic import bilateral_dataset, render_bilateral, save_dataset, to_stored

    img, _ = render_bilateral(2, 3, np.random.default_rng(0), spacing_mm=0.14, shape=(2000, 2560))
    save_dataset(bilateral_dataset(to_stored(img), 0.14), path)
    return path


async def load_test(url: str, payload: bytes, clients: int, total: int, heatmaps: bool) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    issued = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < total:
            issued += 1
            t = time.perf_counter()
            try:
                r = await c.post(f"{url}/predict", params={"heatmaps": str(heatmaps).lower()},
                                 files={"file": ("film.dcm", payload, "application/dicom")})
                if r.status_code != 200 or len(r.json()["knees"]) != 2:
                    errors.append(f"HTTP {r.status_code}: {r.text[:100]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "first_errors": errors[:3],
            "wall_s": wall, "throughput_rps": len(lat) / wall, "heatmaps": heatmaps,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "max_s": float(lat.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run dir (default: train a tiny one)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--no-heatmaps", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = Path(args.run) if args.run else make_run(tmp)
        payload = make_film(tmp / "film.dcm").read_bytes()
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "klgrade.cli", "serve", "--run", str(run), "--host",
                                   "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            import httpx

            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
            info = httpx.get(f"{url}/info").json()
            res = asyncio.run(load_test(url, payload, args.clients, args.requests, not args.no_heatmaps))
        finally:
            server.terminate()
            server.wait(timeout=30)
    res.update(model=info["model"], img_size=info["img_size"], upload_mb=round(len(payload) / 2**20, 1),
               cpus=os.cpu_count())
    print(f"{res['model']} @ {res['img_size']} px, {res['upload_mb']} MB bilateral DICOM, heatmaps {res['heatmaps']}, "
          f"{res['cpus']} cpus")
    print(f"  {res['clients']} clients, {res['requests']} requests, {res['errors']} errors, "
          f"{res['throughput_rps']:.2f} req/s")
    print(f"  latency p50 {res['p50_s']:.2f} s  p95 {res['p95_s']:.2f} s  max {res['max_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
