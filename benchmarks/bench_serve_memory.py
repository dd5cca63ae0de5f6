"""Peak memory of `klgrade serve` under concurrent uploads of the largest allowed image (issue 18).

    nice -n 15 .venv/bin/python benchmarks/bench_serve_memory.py [--clients 30] [--megapixels 49]

Starts `klgrade serve` on a tiny CNN run (the one benchmarks/fuzz_deep.py makes), uploads a 16-bit
PNG just under the pixel budget once alone (the cost of one image) and then from N clients at once,
sampling the server's RSS every 20 ms. The stated bound is the server's idle RSS plus
``max_decodes`` (2) times the cost of one image, +10 %: serve decodes at most that many uploads at
once and the others wait with their bytes on disk. Writes benchmarks/results/serve_memory.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "serve_memory"
RESULT = ROOT / "benchmarks" / "results" / "serve_memory.json"
MAX_DECODES = 2  # klgrade.clinic.serve.DEFAULT_MAX_DECODES


def big_png(mp: float) -> Path:
    """A smooth 16-bit knee-like PNG of ``mp`` megapixels (small on disk, full size decoded)."""
    import numpy as np
    from PIL import Image

    side = int((mp * 1e6) ** 0.5)
    path = WORK / f"big_{side}.png"
    if not path.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        y = np.linspace(-1, 1, side, dtype=np.float32)[:, None]
        x = np.linspace(-1, 1, side, dtype=np.float32)[None, :]
        img = 0.3 + 0.5 * (np.abs(x) < 0.6) * (np.abs(y) > 0.05)
        Image.fromarray((img * 60000).astype(np.uint16)).save(path, compress_level=9)
    return path


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)


def upload(url: str, path: Path) -> int:
    import httpx

    with open(path, "rb") as f:
        r = httpx.post(url, files={"file": ("knee.png", f)}, params={"heatmaps": "false"}, timeout=900)
    return r.status_code


def phase(pid: int, url: str, path: Path, clients: int) -> dict:
    s = Sampler(pid)
    s.start()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        codes = list(pool.map(lambda _: upload(url, path), range(clients)))
    s.stop.set()
    s.join()
    return {"clients": clients, "status": {str(c): codes.count(c) for c in sorted(set(codes))},
            "peak_rss_mb": round(s.peak, 1), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=30)
    ap.add_argument("--megapixels", type=float, default=49.0, help="image size, just under the 50 MP budget")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fuzz_deep import setup  # the tiny run

    run, _ = setup()
    path = big_png(args.megapixels)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    srv = subprocess.Popen([str(ROOT / ".venv" / "bin" / "klgrade"), "serve", "--run", str(run), "--port", str(port),
                            "--log-level", "warning", "--no-heatmaps"], env=env)
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        idle = rss_mb(srv.pid)
        single = phase(srv.pid, f"{base}/predict", path, 1)
        per_image = single["peak_rss_mb"] - idle
        bound = idle + MAX_DECODES * per_image * 1.1
        burst = phase(srv.pid, f"{base}/predict", path, args.clients)
    finally:
        srv.terminate()
        srv.wait(30)
    out = {"image": {"megapixels": args.megapixels, "bits": 16, "file_mb": round(path.stat().st_size / 2**20, 2)},
           "idle_rss_mb": round(idle, 1), "one_upload": single, "per_image_mb": round(per_image, 1),
           "stated_bound_mb": round(bound, 1), "concurrent": burst,
           "within_bound": burst["peak_rss_mb"] <= bound, "max_decodes": MAX_DECODES}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if out["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
