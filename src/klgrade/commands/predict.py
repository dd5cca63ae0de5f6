"""`klgrade predict`: grade new radiographs, knee by knee, and optionally show why.

    klgrade predict knee.dcm --run runs/resnet18                      # bilateral DICOM: both knees
    klgrade predict a.png b.jpg 001 --run runs/resnet18 --heatmaps cams/ --json > grades.json

Accepts a bilateral PA knee film (both joints located and cropped; the patient's right knee is
on the film's left), a unilateral DICOM, or a PNG/JPEG knee image. For each knee: side, KL grade,
the five grade probabilities and the expected grade (sum of g * p_g). ``--heatmaps DIR`` writes a
Grad-CAM overlay PNG per knee (the region that drove the predicted grade). A file that cannot be
graded is reported with the reason and the others are still graded (exit status 1 if any failed).
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("predict", help="grade radiographs (DICOM/PNG/JPEG): KL grade per knee + Grad-CAM",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM, PNG or JPEG files")
    p.add_argument("--run", required=True, help="run dir (CNN or embedding-head run)")
    p.add_argument("--heatmaps", metavar="DIR", help="write Grad-CAM overlay PNGs here")
    p.add_argument("--dicom-out", metavar="DIR",
                   help="DICOM inputs: also write the DICOM SR + Secondary Capture `klgrade pacs` stores (docs/pacs.md)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-jsw", action="store_true",
                   help="skip the joint space width measurement (grades only; ~30%% faster on a CPU)")
    p.add_argument("--tta", choices=["none", "flip"], default=None,
                   help="test-time augmentation (default: the run's setting)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import logging
    import sys
    from pathlib import Path

    from klgrade import io
    from klgrade.clinic.grader import ClinicError, Grader

    grader = Grader.from_run(args.run, device=args.device, tta=args.tta)
    heat_dir = Path(args.heatmaps) if args.heatmaps else None
    dicom_dir = Path(args.dicom_out) if args.dicom_out else None
    model = _model_info(grader) if dicom_dir is not None else None
    results, errors, used_names = [], [], set()
    for f in args.files:
        try:
            if dicom_dir is not None:  # the same grades, plus the SR + SC a PACS would get
                res = _dicom_out(grader, f, dicom_dir, model, keep_heatmaps=heat_dir is not None)
            else:
                res = grader.predict_file(f, heatmaps=heat_dir is not None, jsw=not args.no_jsw)
        except Exception as e:  # noqa: BLE001 - one bad file never loses the rest of the batch
            msg = str(e)
            if not isinstance(e, ClinicError):
                logging.getLogger("klgrade.predict").debug("unexpected failure on %s", f, exc_info=True)
                msg = f"{f}: cannot be graded ({type(e).__name__}: {e})"
            errors.append({"file": str(f), "error": msg})
            print(f"klgrade predict: error: {msg}", file=sys.stderr)
            continue
        for k in res["knees"]:
            png = k.pop("_heatmap_png", None)
            if png is not None:
                out = _unique(heat_dir / f"{_stem(f)}_{k['side_name']}_gradcam.png", used_names)
                io.write_bytes(out, png)
                k["heatmap"] = str(out)
        results.append({"file": str(f), **res})
    if args.json:
        print(json.dumps({"run": grader.name, "model": grader.description, "tta": grader.tta,
                          "results": results, "errors": errors}, indent=2))
    else:
        _print_table(results)
    return 1 if errors else 0


def _stem(f) -> str:
    from pathlib import Path

    p = Path(f)
    return p.stem or p.name or "image"


def _unique(path, used: set):
    """OAI files are all called 001: number repeated names instead of overwriting a heatmap."""
    base, n = path, 2
    while str(path) in used:
        path = base.with_name(f"{base.stem}-{n}{base.suffix}")
        n += 1
    used.add(str(path))
    return path


def _print_table(results: list[dict]) -> None:
    from klgrade.measure.overlay import caption as jsw_caption

    for res in results:
        print(f"{res['file']} ({res['layout']})")
        for k in res["knees"]:
            if k.get("klg") is None:
                print(f"  {k['side_name']:>7} knee: not graded: {k.get('error', '')}")
                continue
            probs = " ".join(f"{p:.2f}" for p in k["probabilities"])
            line = (f"  {k['side_name']:>7} knee: KL {k['klg']}  expected {k['expected_grade']:.2f}  "
                    f"p(KL0..4) [{probs}]")
            if k.get("heatmap"):
                line += f"  heatmap {k['heatmap']}"
            elif k.get("heatmap_unavailable"):
                line += f"  (no heatmap: {k['heatmap_unavailable']})"
            print(line)
            if k.get("jsw"):
                print(f"           JSW: {jsw_caption(k['jsw'])}")
            if k.get("note"):
                print(f"           note: {k['note']}")


def _model_info(grader):
    from klgrade.clinic.pacs.grading import model_info

    return model_info(grader)


def _dicom_out(grader, f, out_dir, model, keep_heatmaps: bool) -> dict:
    """Grade through klgrade.clinic.pacs (Grader.knees + Grader.grade, as predict_file) and write the SR
    (+ SC); a film with nothing gradable still gets its "not graded" SR, then counts as an error."""
    from klgrade.clinic.grader import ClinicError
    from klgrade.clinic.pacs.results import write_local

    res, written = write_local(grader, f, out_dir, model)
    if res.reason:
        raise ClinicError(f"{f}: not graded: {res.reason} (SR written: {written[-1]})")
    for k in res.knees:
        if not keep_heatmaps:
            k.pop("_heatmap_png", None)
    return {"layout": res.layout, "knees": res.knees, "dicom": [str(p) for p in written]}
