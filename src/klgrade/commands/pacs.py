"""`klgrade pacs`: grade knee studies in a PACS over DICOMweb and store the results back.

    klgrade pacs --run runs/resnet18 --url http://127.0.0.1:8042/dicom-web --once
    KLGRADE_PACS_BASIC=klgrade:secret klgrade pacs --run runs/resnet18 --url https://pacs/dicom-web --poll 60

QIDO-RS finds studies with CR/DX knee radiographs this run (its weights fingerprint) has not
graded; WADO-RS fetches them; every knee is graded by the same code as `klgrade predict`; STOW-RS
stores, into the same study and in new series, a DICOM SR (TID 1500: KL grade per knee with
laterality, the five probabilities, expected grade, model name/version/weights sha1) and a
Secondary Capture per graded film (film + Grad-CAM + grades, NOT FOR PRIMARY DIAGNOSIS). A rerun
adds nothing. Instances it cannot grade (not a knee, lateral view, multi-frame, joint not found)
are logged and listed in the SR as "not graded: <reason>".

Credentials come from the environment, never the command line: KLGRADE_PACS_BASIC=user:password
(HTTP basic) or KLGRADE_PACS_TOKEN=<token> (bearer). The log names studies by a hash of their UID
and prints no patient data. See docs/pacs.md.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("pacs", help="grade knee studies in a PACS (DICOMweb) and store SR + SC back",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir (CNN or embedding-head run)")
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://HOST:8042/dicom-web")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--once", action="store_true", help="one pass over the PACS, then exit")
    mode.add_argument("--poll", type=float, metavar="SECONDS", help="a pass every SECONDS until interrupted")
    p.add_argument("--max-backoff", type=float, default=300.0,
                   help="longest wait between retries while the PACS is unreachable (default 300 s)")
    p.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout per request (default 30 s)")
    p.add_argument("--tta", choices=["none", "flip"], default=None,
                   help="test-time augmentation (default: the run's setting)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from klgrade.clinic.grader import Grader
    from klgrade.clinic.pacs.dicomweb import PacsJob, PacsUnreachable, make_client, poll, summary
    from klgrade.clinic.pacs.grading import model_info
    from klgrade.errors import UserError

    if not args.url.startswith(("http://", "https://")):
        raise UserError(f"--url must be an http(s) DICOMweb root like http://HOST:8042/dicom-web (got {args.url!r})")
    if args.poll is not None and args.poll <= 0:
        raise UserError(f"--poll must be > 0 seconds (got {args.poll})")
    grader = Grader.from_run(args.run, device=args.device, tta=args.tta)
    job = PacsJob(make_client(args.url, os.environ, timeout=args.timeout), grader, model_info(grader), args.url)
    if args.once:
        try:
            rep = job.run_once()
        except PacsUnreachable as e:
            raise UserError(str(e)) from None
        print(summary(rep))
        return 1 if rep.failed else 0
    try:
        poll(job, args.poll, max_backoff=args.max_backoff)
    except KeyboardInterrupt:
        pass
    return 0
