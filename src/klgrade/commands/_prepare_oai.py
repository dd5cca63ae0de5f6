"""`klgrade prepare oai --images ROOT --labels PATH... --out DIR`: OAI bilateral films → knee crops."""
from __future__ import annotations

from klgrade.commands.prepare import add_split_options


def register(srcs) -> None:
    p = srcs.add_parser(
        "oai", help="an OAI DICOM tree + kxr_sq_bu label tables → unilateral knee crops",
        description="Find the bilateral PA fixed-flexion knee films of an OAI image tree (via contents.csv "
                    "when given, else each file's SeriesDescription), locate both knee joints, cut a square "
                    "of SIZE x MM_PER_PX mm around each (default 400 px at 0.35 mm/px = 140 mm), flip left "
                    "knees, and write 16-bit PNG crops, manifest.csv (with a patient-level split), "
                    "rejects.csv, summary.json and contact_sheet.png. Re-running skips finished films.")
    p.add_argument("--images", required=True, help="root of the OAI image tree (holding 12m/, 24m/, ...)")
    p.add_argument("--labels", required=True, nargs="+",
                   help="KL label table(s): kxr_sq_buVV.txt (pipe-delimited) or .sas7bdat/.xpt")
    p.add_argument("--contents", nargs="+", default=None,
                   help="contents.csv file(s) of the releases (default: read each file's header)")
    p.add_argument("--visits", default="12,24,36,48,72,96",
                   help="visits to keep, in months (default 12,24,36,48,72,96; 'all' for every visit)")
    p.add_argument("--out", required=True, help="dataset dir to write")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--size", type=int, default=400, help="crop size in px (default 400)")
    p.add_argument("--mm-per-px", type=float, default=0.35, help="crop pixel size in mm (default 0.35)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="localisation confidence below which a knee is rejected (default 0.5)")
    p.add_argument("--series", default=None,
                   help="SeriesDescription of the knee films (default 'Bilateral PA Fixed Flexion Knee')")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_split_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from klgrade.errors import UserError
    from klgrade.ingest.oai import KNEE_SERIES, LabelError, format_summary, prepare_oai
    from klgrade.ingest.roi import MIN_CONFIDENCE
    from klgrade.ingest.splits import parse_fractions

    try:
        visits = None if args.visits.strip().lower() == "all" else [int(v) for v in args.visits.split(",") if v]
    except ValueError:
        raise UserError(f"--visits must be months separated by commas, got {args.visits!r}") from None
    if args.workers < 1 or args.size < 16 or args.mm_per_px <= 0:
        raise UserError("--workers must be >= 1, --size >= 16 and --mm-per-px > 0")
    try:
        fractions = parse_fractions(args.split)
        result = prepare_oai(
            args.images, args.labels, args.out, contents=args.contents, visits=visits, workers=args.workers,
            size=args.size, mm_per_px=args.mm_per_px, fractions=fractions, seed=args.seed,
            description=args.series or KNEE_SERIES,
            min_confidence=MIN_CONFIDENCE if args.min_confidence is None else args.min_confidence,
            progress=not args.no_progress)
    except (LabelError, ValueError) as e:
        raise UserError(str(e)) from e
    print(f"wrote {args.out}/manifest.csv")
    print(format_summary(result.summary))
    if len(result.rejects):
        print(f"reasons per knee/file in {args.out}/rejects.csv; sample crops in {args.out}/contact_sheet.png")
    return 0
