"""`klgrade evaluate`: predictions and metrics of a trained run on any split of any dataset.

    klgrade evaluate --run runs/resnet18 --split test                  # the run's own dataset
    klgrade evaluate --run runs/resnet18 --data other_data --split test --tta flip --out eval/other

Writes predictions_<split>.csv and metrics_<split>.json into the run (or --out). Every run kind
(CNN runs, embedding-head runs) is graded the same way (klgrade.runs.load_run) on the same views,
with every option honoured: what predict gives for a file, evaluate gives for it too.
Existing results are never replaced silently: re-evaluating a run on its own dataset refreshes its
own files, anything else that would replace a predictions file needs --overwrite (another dataset's
predictions written into the run dir would otherwise be taken by `compare` as the run's own).
Every image must be readable: an unreadable one is reported (file and reason) and nothing is written.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="predictions + metrics of a run on a dataset split",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir (config.yaml + checkpoint.pt)")
    p.add_argument("--data", help="dataset dir with manifest.csv (default: the run's own data)")
    p.add_argument("--split", default="test", help="train | val | test | all (default test)")
    p.add_argument("--tta", choices=["none", "flip"], default=None,
                   help="test-time augmentation (default: the run's setting)")
    p.add_argument("--out", help="write here instead of into the run dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing predictions/metrics of this split (see above)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--cache-dir", help="decode cache dir (default $KLGRADE_CACHE or ~/.cache/klgrade)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from klgrade.evaluate.split import evaluate_run
    from klgrade.rundir import read_config, run_dataset

    cfg = read_config(args.run)
    data = run_dataset(args.run, args.data)
    out = Path(args.out) if args.out else Path(args.run)
    _refuse_overwrite(args, cfg, data, out)
    metrics = evaluate_run(args.run, data, args.split, out, tta=args.tta, device=args.device,
                           batch_size=args.batch_size, workers=args.workers, cache_dir=args.cache_dir)
    if metrics:
        print(f"{args.split}: QWK {metrics['qwk']:.4f}  adjacent {metrics['adjacent_accuracy']:.4f}  "
              f"accuracy {metrics['accuracy']:.4f}  F1 per grade {[round(f, 3) for f in metrics['f1']]}")
    print(f"wrote {out}/predictions_{args.split}.csv and metrics_{args.split}.json")
    return 0


def _same_path(a, b) -> bool:
    from pathlib import Path

    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _refuse_overwrite(args, cfg: dict, data: str, out) -> None:
    """Refuse to replace an existing predictions file unless it is the run's own evaluation on its
    own dataset (what train wrote and evaluate refreshes) or --overwrite was given."""
    from klgrade.errors import UserError

    target = out / f"predictions_{args.split}.csv"
    if args.overwrite or not target.exists():
        return
    own = _same_path(out, args.run) and _same_path(data, cfg.get("data"))
    if not own:
        where = "the run's own" if _same_path(out, args.run) else "existing"
        raise UserError(f"{target}: would replace {where} predictions with those on {data}; "
                        f"pass --out DIR to write elsewhere, or --overwrite to replace them")
