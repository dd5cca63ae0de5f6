"""Ablation: what does the model's input view contribute on kneeKL224? Trains the same recipe with
the view replaced, everything else equal (a short proxy: 128 px, 12 epochs, ~10 min here).

    .venv/bin/python benchmarks/ablate_view_kneekl224.py --data benchmarks/work/kneekl224/data --view raw

--data: a dataset made by benchmarks/train_kneekl224.sh (kneeKL224 val as `test`, hold-out `val`).
--view: canonical (klgrade's view) | raw (the stored crop resized, grey levels as stored) |
        clahe (canonical + CLAHE) | fov<F> (canonical with field of view F x plateau width; 1.235 default)
Each view gets its own cache dir, so an ablation never touches the real cache. Writes
benchmarks/results/ablate_view_<view>_<size>px_<epochs>ep.json. Results: docs/train.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--view", default="canonical")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="run dir (default: a temp dir)")
    args = ap.parse_args()
    # before klgrade reads it: a separate cache per view
    os.environ["KLGRADE_CACHE"] = str(Path(tempfile.gettempdir()) / f"klgrade_ablate_{args.view}")

    import numpy as np
    from PIL import Image

    import klgrade.view.cache as cache
    import klgrade.view.canonical as canonical
    from klgrade import io
    from klgrade.config import TrainConfig
    from klgrade.ingest.images import read_image
    from klgrade.train.loop import train

    if args.view == "raw":
        cache.load_view = lambda path, size: np.asarray(
            Image.open(path).convert("L").resize((size, size), Image.BILINEAR), np.uint8)
    elif args.view == "clahe":
        cache.load_view = lambda path, size: canonical.canonical_view(read_image(path), size, clahe=True)[0]
    elif args.view.startswith("fov"):
        canonical.FOV_PER_WIDTH = float(args.view[3:])
    elif args.view != "canonical":
        sys.exit(f"unknown --view {args.view!r}")

    cfg = TrainConfig(data=args.data, model="resnet18", weights="none", img_size=args.img_size,
                      epochs=args.epochs, batch_size=32, lr=2e-3, seed=args.seed, tta="flip")
    out = Path(args.out or tempfile.mkdtemp(prefix=f"ablate_{args.view}_"))
    train(cfg, out)
    m = io.read_json(out / "metrics_test.json")
    res = {"view": args.view, "img_size": args.img_size, "epochs": args.epochs, "seed": args.seed,
           "qwk": m["qwk"], "adjacent_accuracy": m["adjacent_accuracy"], "accuracy": m["accuracy"],
           "f1_per_grade": m["f1"], "holdout_qwk": io.read_json(out / "metrics_val.json")["qwk"], "run": str(out)}
    dst = HERE / "results" / f"ablate_view_{args.view}_{args.img_size}px_{args.epochs}ep.json"
    io.write_json(dst, res)
    print(f"{args.view}: kneeKL224 val QWK {res['qwk']:.3f}  adjacent {res['adjacent_accuracy']:.3f}  "
          f"accuracy {res['accuracy']:.3f}  (wrote {dst})")


if __name__ == "__main__":
    main()
