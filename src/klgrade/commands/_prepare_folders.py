"""`klgrade prepare folders ROOT --out DIR`."""
from __future__ import annotations

from klgrade.commands.prepare import add_split_options


def register(srcs) -> None:
    p = srcs.add_parser(
        "folders", help="a tree <split>/<grade>/<file> (kneeKL224) or <grade>/<file>",
        description="Ingest an image tree laid out <split>/<grade>/<file> (the kneeKL224 layout) or "
                    "<grade>/<file>. Names like 9001695L.png give patient 9001695, left knee; other names "
                    "make each file its own patient. Images are referenced in place unless --copy.")
    p.add_argument("root", help="root of the image tree")
    p.add_argument("--out", required=True, help="dataset dir to write (manifest.csv, rejects.csv)")
    p.add_argument("--copy", action="store_true", help="copy images into DIR/images instead of referencing")
    p.add_argument("--workers", type=int, default=4, help="threads for checking images (default 4)")
    p.add_argument("--source", default=None, help="value of the manifest's source column (default: folder name)")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset already in --out")
    add_split_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from klgrade.ingest.folders import finalize, ingest_folders
    from klgrade.ingest.manifest import refuse_existing, summarize
    from klgrade.ingest.splits import parse_fractions

    fractions = parse_fractions(args.split)
    refuse_existing(args.out, args.overwrite)  # before any work: never replace a dataset silently
    result = ingest_folders(args.root, args.out, copy=args.copy, workers=args.workers, source=args.source)
    df = finalize(result, args.out, fractions, args.seed, args.resplit)
    print(f"wrote {args.out}/manifest.csv: {len(df)} images, {df['patient_id'].nunique()} patients")
    print(summarize(df))
    if result.stem_patients:
        print(f"note: {result.stem_patients} file name(s) are not <OAI id><L|R>; each such file was taken "
              "as its own patient (patient_id = file stem), so a patient-level split cannot group them")
    if result.rejects:
        print(f"rejected {len(result.rejects)} file(s); reasons in {args.out}/rejects.csv")
    return 0
