"""`klgrade robustness`: QWK of a run on the same images re-rendered as other sites would make them.

    klgrade robustness --run runs/resnet18 --data data/kneeKL224 --split val --out robust/r18
    klgrade robustness --run runs/r18 --shifts zoom_in_30,gamma_1.6 --limit 200   # a quick look

Every image is re-rendered from its original file under each shift (zoom_in_30, zoom_out_30,
off_centre, aspect_wide, aspect_tall, gamma_0.6, gamma_1.6, blur, noise, bit16, rgb), read back and
passed through the canonical view the model uses. Writes robustness.csv/.md/.json, robustness.png
and predictions_robustness.csv (default: <run>/robustness_<split>/).
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("robustness", help="QWK under controlled site shifts (framing, contrast, bit depth)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir (CNN or embedding-head run)")
    p.add_argument("--data", help="dataset dir with manifest.csv (default: the run's own data)")
    p.add_argument("--split", default="test", help="train | val | test | all (default test)")
    p.add_argument("--out", help="output dir (default <run>/robustness_<split>)")
    p.add_argument("--shifts", default="all", help="all, or a comma-separated list of shift names")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--tta", choices=["none", "flip"], default=None, help="default: the run's setting")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="threads re-rendering and viewing images")
    p.add_argument("--limit", type=int, help="grade a seeded random subset of this many images")
    p.add_argument("--keep-renders", action="store_true", help="keep the re-rendered files in OUT/renders")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from klgrade.augment.site_shift import shift_names
    from klgrade.errors import UserError
    from klgrade.evaluate.robustness import evaluate_robustness, robustness_table, table_markdown
    from klgrade.rundir import run_dataset

    data = run_dataset(args.run, args.data)
    try:
        shift_names(args.shifts)
    except ValueError as e:
        raise UserError(f"--shifts: {e}") from e
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    out = Path(args.out) if args.out else Path(args.run) / f"robustness_{args.split}"
    res = evaluate_robustness(args.run, data, args.split, args.shifts, out, device=args.device, tta=args.tta,
                              batch_size=args.batch_size, workers=args.workers, limit=args.limit,
                              keep_renders=args.keep_renders)
    for name, r in res["shifts"].items():
        if r["rejects"]:
            print(f"{name}: {len(r['rejects'])} of {res['n']} images gave no view and were not graded "
                  f"(first: {r['rejects'][0]})", file=sys.stderr)
    print(table_markdown(robustness_table(res)), end="")
    print(f"wrote {out}/robustness.csv, .md, .json, .png")
    return 0
