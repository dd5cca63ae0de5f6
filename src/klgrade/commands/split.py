"""`klgrade split DIR`: (re)make the patient-level, grade-stratified split of a dataset."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("split", help="(re)make a patient-level stratified split of a dataset's manifest",
                       description="Assign every patient (all knees, all visits) to one split, stratified by "
                                   "the patient's most severe grade. Same manifest + seed -> same split.")
    p.add_argument("data", help="dataset dir (with manifest.csv)")
    p.add_argument("--split", default="0.7,0.1,0.2", help="train,val,test fractions (default 0.7,0.1,0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=None, metavar="F",
                   help="instead: move a patient-level fraction F of train into val (keeps other splits)")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="rename a split first, e.g. val=test to keep a dataset's own val for reporting "
                        "and carve model-selection val from train with --holdout")
    p.set_defaults(func=run)


def run(args) -> int:
    from klgrade.errors import UserError
    from klgrade.ingest.manifest import read_manifest, summarize, write_manifest
    from klgrade.ingest.splits import holdout_split, parse_fractions, patient_split

    df = read_manifest(args.data, check_leakage=args.holdout is not None)
    for rule in args.rename:
        old, _, new = rule.partition("=")
        if new not in ("train", "val", "test", ""):
            raise UserError(f"--rename {rule}: the new name must be train, val or test")
        df.loc[df["split"] == old, "split"] = new
    if args.holdout is not None:
        if (df["split"] == "val").any():
            raise UserError(f"{args.data}: already has a val split; --holdout moves train patients into an "
                            "empty val (use --rename val=test to keep the existing val for reporting)")
        df = holdout_split(df, args.holdout, seed=args.seed)
    else:
        df["split"] = patient_split(df, parse_fractions(args.split), seed=args.seed).to_numpy()
    write_manifest(df, args.data)
    print(summarize(df))
    return 0
