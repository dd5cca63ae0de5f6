"""Why does a 30% tighter framing raise the grades? Separates localisation, magnification/edges and
intensity standardisation, on kneeKL224 val knees graded by a trained run (see docs/robustness.md).
Measured with view version 4 (whole-frame intensity statistics); from version 5 on, the statistics
come from a joint-centred box, so "view cut before standardising" should match "clean" (the fix).

    .venv/bin/python benchmarks/diagnose_zoom_in.py --run results/study_kneekl224/runs/resnet18 \
        --data results/study_kneekl224/data --split test --n 300
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from klgrade.augment.site_shift import apply_shift
from klgrade.evaluate.metrics import qwk
from klgrade.ingest.images import read_image
from klgrade.ingest.manifest import read_manifest
from klgrade.runs.cnn import load_cnn_run, predict_views
from klgrade.view import canonical as C

ZOOM = 1.3


def _cut(a: np.ndarray, k: int) -> np.ndarray:
    """Continue the edges of the inner part over a k-pixel margin on every side (a tighter frame)."""
    a = a.copy()
    a[:, :k], a[:, -k:] = a[:, k:k + 1], a[:, -k - 1:-k]
    a[:k], a[-k:] = a[k:k + 1], a[-k - 1:-k]
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    run = load_cnn_run(args.run, device="cpu")
    size = run.img_size
    df = read_manifest(args.data)
    df = df[df.split == args.split]
    df = df.sample(min(args.n, len(df)), random_state=args.seed)
    k = int(round((1 - 1 / ZOOM) / 2 * size))  # margin a 1/1.3 frame leaves, in view px
    views: dict[str, list] = {name: [] for name in (
        "clean", "zoom_in_30 through the pipeline", "zoom_in_30 at the true centre and field of view",
        "view cut after standardising", "view cut before standardising")}
    for path in df.path:
        img = read_image(path)
        h, w = img.shape
        clean, info = C.canonical_view(img, size)
        views["clean"].append(clean)
        zoomed = apply_shift(img, "zoom_in_30", str(path))
        views["zoom_in_30 through the pipeline"].append(C.canonical_view(zoomed, size)[0])
        s = (1 / ZOOM) * w / zoomed.shape[1]  # original px per zoomed px
        tx = (info.centre[0] - (w - 1) / 2) / s + (zoomed.shape[1] - 1) / 2
        ty = (info.centre[1] - (h - 1) / 2) / s + (zoomed.shape[0] - 1) / 2
        v, valid = C._crop(zoomed, tx, ty, info.fov_px / s, size)
        views["zoom_in_30 at the true centre and field of view"].append(C.standardise(v, valid))
        v, valid = C._crop(img, info.centre[0], info.centre[1], info.fov_px, size)
        views["view cut after standardising"].append(_cut(C.standardise(v, valid), k))
        inner = np.zeros_like(valid)
        inner[k:-k, k:-k] = valid[k:-k, k:-k]
        views["view cut before standardising"].append(C.standardise(_cut(v, k), inner))
    y = df.klg.to_numpy()
    with torch.no_grad():
        base = predict_views(run, np.stack(views["clean"]), tta="flip").argmax(1)
        rows = []
        for name, vs in views.items():
            p = predict_views(run, np.stack(vs), tta="flip").argmax(1)
            rows.append({"variant": name, "qwk": round(qwk(y, p), 3),
                         "mean grade change": round(float(np.mean(p - base)), 3),
                         "up": int((p > base).sum()), "down": int((p < base).sum())})
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
