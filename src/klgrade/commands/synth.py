"""`klgrade synth`: write the built-in synthetic knee radiographs.

--format png   unilateral crops (canonical orientation) + manifest.csv with a patient-level split
--format dicom an OAI-shaped tree of bilateral PA fixed-flexion DICOMs + contents.csv per release,
               kxr_sq_buVV.txt KL label tables and truth.csv (joint centres, grades, true minimum JSW)
"""
from __future__ import annotations

import argparse


def _visits(text: str) -> tuple[int, ...]:
    from klgrade.synthetic import VISIT_CODES

    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--visits must be months like 12,24 (got {text!r})") from e
    bad = [v for v in vals if v not in VISIT_CODES]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"--visits: unknown month(s) {bad or text!r}; known: {sorted(VISIT_CODES)}")
    return vals


def _shape(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--shape must be ROWSxCOLS like 2000x2560 (got {text!r})") from e
    if r < 64 or c < 128:
        raise argparse.ArgumentTypeError(f"--shape {text} is too small (at least 64x128)")
    return r, c


def register(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic knee radiographs (PNG crops or an OAI-style DICOM tree)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, required=True, help="number of patients")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("png", "dicom"), default="png", help="png (default) or dicom")
    p.add_argument("--size", type=int, default=224, help="PNG crop size in px (default 224)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--visits", type=_visits, default=None,
                   help="visit months, e.g. 12,24 (default: png 12..96 with 2 per patient; dicom 12,24)")
    p.add_argument("--visits-per-patient", type=int, default=None,
                   help="png: random visits per patient (default 2; 0 = all)")
    p.add_argument("--split", default="0.7,0.1,0.2", help="png: train,val,test fractions (default 0.7,0.1,0.2)")
    p.add_argument("--shape", type=_shape, default=(2000, 2560), help="dicom: ROWSxCOLS (default 2000x2560); the stated pixel spacing scales with it, so "
                   "a smaller shape is a coarser export of films of the same size in mm")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from klgrade import synthetic as syn
    from klgrade.errors import UserError

    if args.patients < 1:
        raise UserError(f"--patients must be >= 1 (got {args.patients})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if args.format == "png":
        if args.size < 16:
            raise UserError(f"--size must be >= 16 px (got {args.size})")
        visits = args.visits or syn.DEFAULT_VISITS
        vpp = 2 if args.visits_per_patient is None else (args.visits_per_patient or None)
        if vpp is not None:
            vpp = min(vpp, len(visits))
        try:
            path = syn.write_png_dataset(out, n_patients=args.patients, seed=args.seed, size=args.size,
                                         visits=visits, visits_per_patient=vpp, split=args.split)
        except ValueError as e:
            raise UserError(str(e)) from e
        from klgrade.ingest.manifest import read_manifest, summarize

        df = read_manifest(path)
        print(f"wrote {len(df)} PNG crops of {df['patient_id'].nunique()} patients; manifest {path}")
        print(summarize(df))
    else:
        try:
            truth = syn.write_dicom_tree(out, n_patients=args.patients, seed=args.seed, shape=args.shape,
                                         visits=args.visits or (12, 24))
        except ValueError as e:
            raise UserError(str(e)) from e
        n_img = truth["path"].nunique()
        print(f"wrote {n_img} bilateral DICOMs ({len(truth)} knees, {truth['patient_id'].nunique()} patients) "
              f"under {out}; labels {out}/kxr_sq_bu*.txt; truth {out / 'truth.csv'}")
        print("grades:", truth["klg"].value_counts().sort_index().to_dict())
    return 0
