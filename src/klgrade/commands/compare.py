"""`klgrade compare RUN [RUN ...] --split test --out REPORT`: the study's result.

Aligns the runs' predictions on image_id (runs evaluated on different images are refused), then
writes Table 1 (md/csv/tex, plus a version with 95% CIs), Figure 1 (confusion matrices, PNG+SVG),
Figure 2 (learning curves and reliability diagrams), stats.json and a self-contained report.html.
Confidence intervals and paired tests come from a bootstrap over patients, not images.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def compare_runs(*args, **kwargs) -> dict:
    """See klgrade.evaluate.report.compare_runs (imported lazily: matplotlib is heavy)."""
    from klgrade.evaluate.report import compare_runs as _compare_runs

    return _compare_runs(*args, **kwargs)


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare runs: Table 1, Figure 1, CIs, paired tests, report.html",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run dirs (CNN or embedding-head runs)")
    p.add_argument("--split", default="test", help="which predictions_<split>.csv to compare (default test)")
    p.add_argument("--out", required=True, metavar="REPORT", help="output folder for the report")
    p.add_argument("--names", help="comma-separated display names, one per run (default: config name or folder)")
    p.add_argument("--n-boot", type=int, default=2000, help="patient-level bootstrap replicates (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument("--title", help="report title")
    p.add_argument("--note", action="append", dest="notes", metavar="TEXT",
                   help="a banner line shown prominently in the report (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide the bootstrap progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from klgrade.errors import UserError

    if args.n_boot < 1:
        raise UserError(f"--n-boot must be >= 1, got {args.n_boot}")
    if not 0.0 < args.ci < 1.0:
        raise UserError(f"--ci must lie strictly between 0 and 1, got {args.ci}")
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    if names is not None and (len(names) != len(args.runs) or not all(names)):
        raise UserError(f"--names must give {len(args.runs)} non-empty comma-separated name(s), got {args.names!r}")

    from klgrade.evaluate.report import table1_frame, to_markdown

    result = compare_runs(args.runs, split=args.split, out_dir=args.out, names=names, n_boot=args.n_boot,
                          seed=args.seed, ci=args.ci, title=args.title, notes=args.notes,
                          progress=not args.no_progress)
    print(f"{result['n_images']} images from {result['n_patients']} patients, split '{result['split']}'\n")
    print(to_markdown(table1_frame(result["metrics"])))
    for p in result["pairwise"]:
        d = p["differences"]["qwk"]
        print(f"QWK {p['a']} - {p['b']}: {d['difference']:+.3f} "
              f"({round(result['ci'] * 100)}% CI {d['low']:+.3f} to {d['high']:+.3f}), p = {d['p_value']:.3g}")
    for b in result["banners"]:
        print(f"NOTE: {b}")
    print(f"\nreport: {Path(result['files']['report_html']).resolve()}")
    return 0
