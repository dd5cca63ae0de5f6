"""`klgrade demo`: the whole study on built-in synthetic knees, offline, in minutes on a laptop CPU.

synthesize a cohort -> prepare (patient-level split) -> train ResNet18 and ConvNeXt -> embed with the
BioMedCLIP architecture -> MLP head -> compare -> report. Every step is the same sub-command a user
runs; the demo only chooses small sizes.
"""
from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole study on built-in synthetic data (minutes, offline)",
                       description=__doc__)
    p.add_argument("--out", default="demo_out", help="folder for the data, runs and report (default demo_out)")
    p.add_argument("--weights", default="none", help="none (random init, default) or auto (pretrained "
                   "weights from the hub or its local cache)")
    p.add_argument("--embed-weights", default=None,
                   help="weights of the embedding backbone if not --weights (e.g. a local hub-layout folder)")
    p.add_argument("--patients", type=int, default=120, help="synthetic patients, one visit each (default 120)")
    p.add_argument("--img-size", type=int, default=64, help="CNN input size in px (default 64)")
    p.add_argument("--epochs", type=int, default=12, help="CNN epochs (default 12)")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap replicates for the CIs (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cnns", default="resnet18,convnext_tiny", help="CNNs to train (comma-separated)")
    p.add_argument("--backbone", default="biomedclip", help="embedding backbone (default biomedclip)")
    p.set_defaults(func=run)


def _step(title: str, argv: list[str]) -> None:
    from klgrade.cli import UserError, main

    print(f"\n== {title}\n$ klgrade {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise UserError(f"demo step '{title}' failed (exit {rc})")
    print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


def run(args) -> int:
    out = Path(args.out)
    data, runs, report = out / "data", out / "runs", out / "report"
    t0 = time.perf_counter()
    seed = str(args.seed)
    _step("synthesize a cohort of knee radiographs (unilateral crops)",
          ["synth", "--patients", str(args.patients), "--out", str(data), "--format", "png",
           "--size", "128", "--visits-per-patient", "1", "--seed", seed])
    _step("patient-level, grade-stratified split", ["split", str(data), "--split", "0.6,0.15,0.25", "--seed", seed])
    run_dirs = []
    for model in [m for m in args.cnns.split(",") if m]:
        rd = runs / model
        _step(f"train {model} end to end",
              ["train", "--data", str(data), "--model", model, "--out", str(rd), "--weights", args.weights,
               "--img-size", str(args.img_size), "--epochs", str(args.epochs), "--seed", seed])
        run_dirs.append(rd)
    store = out / "embeddings" / args.backbone
    _step(f"embed every knee with the frozen {args.backbone} image tower",
          ["embed", "--data", str(data), "--backbone", args.backbone, "--out", str(store),
           "--weights", args.embed_weights or args.weights])
    rd = runs / f"{args.backbone}_mlp"
    _step("fit the MLP head on the embeddings",
          ["fit-head", "--embeddings", str(store), "--data", str(data), "--head", "mlp", "--out", str(rd),
           "--seed", seed])
    run_dirs.append(rd)
    _step("compare the approaches: Table 1, Figure 1, CIs, paired tests",
          ["compare", *map(str, run_dirs), "--split", "test", "--out", str(report), "--n-boot", str(args.n_boot),
           "--seed", seed])
    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s.")
    if args.weights == "none":
        print("NOTE: all models were randomly initialised (--weights none): the numbers check the pipeline; "
              "they are not the study's answer.")
    print(f"Report: {(report / 'report.html').resolve()}")
    print(f"Table 1: {(report / 'table1.md').resolve()}")
    return 0
