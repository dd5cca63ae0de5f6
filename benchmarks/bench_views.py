"""Benchmark: the CPU cost of a film's views, this code against another checkout's, side by side.

Each round times ``film_views`` (locate, crop and standardise both knees; no decode, no model) on
the synthetic 2,560 x 2,000 OAI-size bilateral DICOM of bench_predict, first in a process that
imports klgrade from ``--against`` (e.g. a ``git worktree`` of an older commit), then in one that
imports this checkout's, so a machine whose speed drifts slows both sides of a round alike. Each
process warms up, then reports the median CPU time of ``--films`` calls. The ratio is the median
over rounds of each round's new/old::

    git worktree add /tmp/old <commit>
    .venv/bin/python benchmarks/bench_views.py --against /tmp/old/src [--rounds 8] [--json out.json]
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
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

_TIMER = """
import statistics, sys, time
from klgrade.view.entrance import film_views, read_film
film = read_film(sys.argv[1])
for _ in range(3):
    film_views(film, 224, "film")
cpu = []
for _ in range(int(sys.argv[2])):
    c = time.process_time()
    film_views(film, 224, "film")
    cpu.append(time.process_time() - c)
print(statistics.median(cpu))
"""


def timed(src: Path, film: Path, films: int) -> float:
    """Median CPU seconds of one film's views, klgrade imported from ``src``."""
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run([sys.executable, "-c", _TIMER, str(film), str(films)], env=env, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="the other checkout's src folder")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--films", type=int, default=40, help="timed calls per process")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_predict import make_film

    old, new = [], []
    with tempfile.TemporaryDirectory() as tmp:
        film = make_film(Path(tmp) / "bilateral.dcm")
        for r in range(args.rounds):
            old.append(timed(Path(args.against), film, args.films))
            new.append(timed(SRC, film, args.films))
            print(f"round {r + 1}: against {old[-1] * 1e3:.1f} ms, this {new[-1] * 1e3:.1f} ms CPU per film")
    ratios = [n / o for n, o in zip(new, old)]
    commits = [subprocess.run(["git", "-C", str(d), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "?" for d in (Path(args.against), SRC)]
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                      f"load average {os.getloadavg()[0]:.1f}",
           "against_commit": commits[0], "this_commit": f"{commits[1]} + working tree",
           "film": "2560x2000 12-bit DICOM, 0.14 mm/px, views at 224 px", "rounds": args.rounds,
           "films_per_process": args.films, "against_ms": [o * 1e3 for o in old], "this_ms": [n * 1e3 for n in new],
           "against_median_ms": statistics.median(old) * 1e3, "this_median_ms": statistics.median(new) * 1e3,
           "paired_ratio": statistics.median(ratios)}
    print(f"views: {res['against_median_ms']:.1f} -> {res['this_median_ms']:.1f} ms CPU per film, "
          f"paired ratio {res['paired_ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
