"""Benchmark: fitting each head on 40,000 x 768 synthetic embeddings (target: mlp and linear < 30 s).

The vectors are synthetic but informative the way frozen embeddings are: a few noisy directions carry
an ordinal KL signal, the rest is noise, and the grade mix follows the OAI cohort (KL4 rare). Timed:
standardisation + fit (with validation-based early stopping / model selection) + predicting val and
test — what `klgrade fit-head` does after loading the store.

    .venv/bin/python benchmarks/bench_fit_head.py [--n 40000] [--dim 768] [--heads mlp,linear,xgboost]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from klgrade import io
from klgrade.evaluate.metrics import compute_metrics
from klgrade.heads import CHECKPOINT_FORMAT, HEADS, HeadConfig, HeadModel

GRADE_MIX = (0.39, 0.18, 0.26, 0.13, 0.04)


def synthetic(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.choice(5, size=n, p=GRADE_MIX)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    dirs = rng.normal(size=(8, dim)).astype(np.float32) / np.sqrt(dim)
    # ordinal signal along a few directions, with per-sample severity noise
    sev = (y + rng.normal(scale=0.6, size=n)).astype(np.float32)
    X += (sev[:, None] * dirs[0] * 6) + (np.sin(sev)[:, None] * dirs[1] * 4)
    return X * rng.uniform(0.5, 2.0, size=dim).astype(np.float32) + 3.0, y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--heads", default="mlp,linear,xgboost")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fit_head.json"))
    args = ap.parse_args()
    X, y = synthetic(args.n, args.dim)
    n_tr, n_va = int(0.8 * args.n), int(0.1 * args.n)
    sl = {"train": slice(0, n_tr), "val": slice(n_tr, n_tr + n_va), "test": slice(n_tr + n_va, None)}
    results = {"n": args.n, "dim": args.dim, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "heads": {}}
    fitters = {name: head.fit for name, head in HEADS.items()}
    for head in args.heads.split(","):
        t0 = time.perf_counter()
        mean, scale = X[sl["train"]].mean(0), X[sl["train"]].std(0)
        Z = ((X - mean) / scale).astype(np.float32)
        ckpt, hist = fitters[head](HeadConfig(head=head), Z[sl["train"]], y[sl["train"]], Z[sl["val"]], y[sl["val"]])
        model = HeadModel({"format": CHECKPOINT_FORMAT, "head": head, "store": {},
                           "scaler_mean": torch.from_numpy(mean), "scaler_scale": torch.from_numpy(scale), **ckpt})
        m = {s: compute_metrics(y[sl[s]], model.predict_proba(X[sl[s]]).argmax(1)) for s in ("val", "test")}
        secs = time.perf_counter() - t0
        results["heads"][head] = {"seconds": round(secs, 2), "rounds_or_epochs": len(hist),
                                  "test_qwk": round(m["test"]["qwk"], 4),
                                  "test_f1": [round(f, 3) for f in m["test"]["f1"]],
                                  "under_30s": secs < 30}
        print(f"{head:8s} {secs:6.1f} s  ({len(hist)} epochs/rounds)  test QWK {m['test']['qwk']:.3f}  "
              f"F1 {[round(f, 2) for f in m['test']['f1']]}", flush=True)
    io.write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
