"""`klgrade prepare csv TABLE --out DIR`: a CSV that lists images and grades."""
from __future__ import annotations

from klgrade.commands.prepare import add_split_options


def register(srcs) -> None:
    p = srcs.add_parser(
        "csv", help="a CSV listing images: path, klg [, patient_id, side, visit, split, image_id]",
        description="Ingest a CSV with one row per unilateral knee image. Required columns: path (absolute "
                    "or relative to --root, default the CSV's folder) and klg (0-4). Optional: patient_id "
                    "(default: file stem), side (L/R), visit (months), split, image_id (default: file stem).")
    p.add_argument("table", help="CSV file")
    p.add_argument("--out", required=True, help="dataset dir to write (manifest.csv, rejects.csv)")
    p.add_argument("--root", default=None, help="folder that relative paths are relative to")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset already in --out")
    add_split_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from klgrade.ingest.folders import finalize
    from klgrade.ingest.manifest import refuse_existing, summarize
    from klgrade.ingest.splits import parse_fractions
    from klgrade.ingest.tables import ingest_csv

    refuse_existing(args.out, args.overwrite)  # before any work: never replace a dataset silently
    result = ingest_csv(args.table, args.out, root=args.root)
    df = finalize(result, args.out, parse_fractions(args.split), args.seed, args.resplit)
    print(f"wrote {args.out}/manifest.csv: {len(df)} images, {df['patient_id'].nunique()} patients")
    print(summarize(df))
    if result.stem_patients:
        print(f"note: no patient_id for {result.stem_patients} row(s): each such image is its own patient")
    if result.rejects:
        print(f"rejected {len(result.rejects)} row(s); reasons in {args.out}/rejects.csv")
    return 0
