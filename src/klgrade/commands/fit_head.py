"""`klgrade fit-head`: fit a classifier head on frozen embeddings into a run dir (same format as a CNN run).

    klgrade fit-head --embeddings emb/biomedclip --data DATA --head mlp --out runs/biomedclip_mlp
    klgrade fit-head --embeddings emb/biomedclip --data DATA --head linear --out runs/biomedclip_lin
    klgrade fit-head --embeddings emb/rad-dino --data DATA --head xgboost --out runs/rad-dino_xgb

Heads: mlp (two hidden layers, dropout, class-balanced loss, early stopping on validation QWK),
linear (logistic-regression probe, C picked on validation QWK), xgboost (gradient-boosted trees;
needs `pip install 'klgrade[xgboost]'`). Features are standardised on train. Without a 'val' split
in the manifest a patient-level hold-out of train is used for early stopping / model selection.
Writes config.yaml (kind: head), checkpoint.pt, history.csv, predictions_/metrics_<val|test>.
"""
from __future__ import annotations

import argparse


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"hidden sizes must be >= 1, got {text!r}")
    return vals


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"C values must be > 0, got {text!r}")
    return vals


def register(sub) -> None:
    from klgrade.config import HEAD_KINDS, HeadConfig  # not klgrade.heads: torch is not needed to list them

    d = HeadConfig()
    p = sub.add_parser("fit-head", help="fit an mlp/linear/xgboost head on an embedding store into a run dir",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, metavar="STORE", help="embedding store made by `klgrade embed`")
    p.add_argument("--data", required=True, help="dataset dir with manifest.csv (labels and splits)")
    p.add_argument("--head", choices=HEAD_KINDS, default="mlp", help="default mlp")
    p.add_argument("--out", required=True, metavar="RUN", help="run dir to create")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--name", help="display name of the run (default: folder name)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-balance", dest="balance", action="store_false",
                   help="plain (unweighted) loss; by default classes are balanced so no grade collapses")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"patient-level hold-out of train when the manifest has no val split (default {d.val_fraction})")
    g = p.add_argument_group("mlp")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"max epochs (default {d.epochs})")
    g.add_argument("--patience", type=int, default=d.patience,
                   help=f"stop after N epochs without better val QWK, 0 = off (default {d.patience})")
    g.add_argument("--hidden", type=_ints, default=d.hidden, help="hidden layer sizes (default 256,64)")
    g.add_argument("--dropout", type=float, default=d.dropout, help=f"default {d.dropout}")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    g.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu: a head is small)")
    g = p.add_argument_group("linear")
    g.add_argument("--C", type=_floats, default=d.C, help="inverse regularisation; several = picked on val QWK "
                                                           "(default 0.01,0.1,1)")
    g.add_argument("--max-iter", type=int, default=d.max_iter, help=f"default {d.max_iter}")
    g = p.add_argument_group("xgboost")
    g.add_argument("--n-estimators", type=int, default=d.n_estimators, help=f"max trees (default {d.n_estimators})")
    g.add_argument("--max-depth", type=int, default=d.max_depth, help=f"default {d.max_depth}")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate, help=f"default {d.learning_rate}")
    p.set_defaults(func=run)


def run(args) -> int:
    from klgrade.embed.store import StoreError
    from klgrade.errors import UserError
    from klgrade.heads import HeadConfig, fit_head
    from klgrade.ingest.manifest import ManifestError

    device = args.device
    if device == "auto":
        from klgrade.embed.embedders import default_device

        device = default_device()
    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be >= 1")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    cfg = HeadConfig(head=args.head, seed=args.seed, balance=args.balance, val_fraction=args.val_fraction,
                     hidden=args.hidden, dropout=args.dropout, epochs=args.epochs, patience=args.patience,
                     batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, device=device,
                     C=args.C, max_iter=args.max_iter, n_estimators=args.n_estimators, max_depth=args.max_depth,
                     learning_rate=args.learning_rate)
    try:
        results = fit_head(args.embeddings, args.data, args.out, cfg, name=args.name, overwrite=args.overwrite)
    except ManifestError:
        raise
    except StoreError as e:
        raise UserError(str(e)) from e
    for split, m in results.items():
        f1 = " ".join(f"{v:.2f}" for v in m["f1"])
        print(f"{args.out} {split}: QWK {m['qwk']:.3f}  adjacent acc {m['adjacent_accuracy']:.3f}  "
              f"accuracy {m['accuracy']:.3f}  F1 per grade [{f1}]")
    return 0
