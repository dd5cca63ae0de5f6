"""`klgrade measure`: minimum joint space width (JSW) per compartment for every knee of a dataset.

    klgrade measure --data data/oai --out jsw/               # a dataset dir (manifest.csv)
    klgrade measure --data films/ --out jsw/                 # or any folder of DICOM/PNG/JPEG files

Writes ``jsw.csv`` (one row per knee: image_id, side, medial_min_mm, lateral_min_mm,
medial_mean_mm, lateral_mean_mm, unit, ok, medial_flag, lateral_flag, reason, note),
``rejects.csv`` (files that could not be read) and ``contact_sheet.png`` (overlays: femoral margin
cyan, tibial margin yellow, minimum red). Values are in mm when the image has a pixel spacing
(DICOM, a `prepare oai` crop, which states its own, or ``--mm-per-px`` for other crops of known
scale); otherwise ``unit`` is ``%plateau``: percent of the tibial plateau width. A collapsed compartment reads 0 with the flag ``bone_on_bone``.
Each knee is measured as `klgrade predict` and `serve` measure it (klgrade.measure.files.knees_from_file):
the same file gives the same numbers in every command.
"""
from __future__ import annotations

import argparse

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ""}


def register(sub) -> None:
    p = sub.add_parser("measure", help="minimum joint space width per compartment (mm) + overlays",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset dir with manifest.csv, or a folder of images")
    p.add_argument("--out", required=True, help="output dir (jsw.csv, rejects.csv, contact_sheet.png)")
    p.add_argument("--mm-per-px", type=float, default=None,
                   help="pixel size of PNG/JPEG images that state none (DICOM files and prepared crops use their own)")
    p.add_argument("--sheet", type=int, default=36, help="knees on the contact sheet (default 36; 0 = none)")
    p.set_defaults(func=run)


def _inputs(data):
    """[(image_id, path, klg or None)] from a manifest, else every image file under ``data``."""
    from klgrade.errors import UserError
    from klgrade.ingest.manifest import image_paths, manifest_path, read_manifest

    if manifest_path(data).is_file():
        df = read_manifest(data)
        return [(str(i), p, int(k)) for i, p, k in zip(df["image_id"], image_paths(df), df["klg"])]
    files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise UserError(f"{data}: no manifest.csv and no image files")
    return [(str(p.relative_to(data).with_suffix("")), p, None) for p in files]


def run(args) -> int:
    from pathlib import Path

    import pandas as pd
    from tqdm.auto import tqdm

    from klgrade import io
    from klgrade.errors import UserError
    from klgrade.ingest.manifest import write_rejects
    from klgrade.ingest.polarity import NOTE as POLARITY_NOTE
    from klgrade.measure.files import MEASURE_PX, knees_from_file, overlay
    from klgrade.measure.overlay import contact_sheet, label
    from klgrade.view.entrance import ViewError

    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise UserError(f"{data}: not a directory")
    if args.mm_per_px is not None and not 0.01 <= args.mm_per_px <= 5:
        raise UserError(f"--mm-per-px must be between 0.01 and 5 mm (got {args.mm_per_px})")
    rows, rejects, tiles, caps = [], [], [], []
    for image_id, path, klg in tqdm(_inputs(data), desc="measure", unit="image"):
        try:  # the knees predict grades, measured as predict measures them
            _, knees = knees_from_file(path, MEASURE_PX, mm_per_px=args.mm_per_px)
        except ViewError as e:
            rejects.append({"path": str(path), "reason": str(e)})
            continue
        for k in knees:
            if POLARITY_NOTE in k.note:
                k.jsw.note = "; ".join(filter(None, [k.jsw.note, POLARITY_NOTE]))
            kid = image_id if len(knees) == 1 else f"{image_id}_{k.side}"
            rows.append({"image_id": kid, "side": k.side, **({"klg": klg} if klg is not None else {}),
                         **k.jsw.row()})
            if len(tiles) < args.sheet and k.view is not None:
                tiles.append(overlay(k))
                caps.append(f"{kid[-14:]} {label(k.jsw)}")
    df = pd.DataFrame(rows)
    io.write_csv(out / "jsw.csv", df)
    write_rejects(rejects, out)
    if tiles:
        contact_sheet(tiles, caps, out / "contact_sheet.png")
    n_ok = int(df["ok"].sum()) if len(df) else 0
    print(f"measured {n_ok}/{len(df)} knee(s) in both compartments; {len(rejects)} file(s) rejected; "
          f"wrote {out / 'jsw.csv'}")
    return 0
