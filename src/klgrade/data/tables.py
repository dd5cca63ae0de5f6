"""Ingest a user's CSV that lists knee images and their grades."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from klgrade.cli import UserError
from klgrade.data.folders import IngestResult, _check
from klgrade.data.manifest import SPLITS


def ingest_csv(table: str | Path, out: str | Path, root: str | Path | None = None) -> IngestResult:
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no such file")
    src = pd.read_csv(table, dtype=str, keep_default_na=False)
    missing = [c for c in ("path", "klg") if c not in src.columns]
    if missing:
        raise UserError(f"{table}: missing column(s) {missing}; need at least path and klg")
    root = Path(root) if root else table.parent
    rows, rejects, stem_patients = [], [], 0
    for i, r in src.iterrows():
        line = i + 2  # header is line 1
        path = Path(r["path"]) if Path(r["path"]).is_absolute() else root / r["path"]
        try:
            klg = int(float(r["klg"]))
            if str(klg) != r["klg"].strip().split(".")[0] or klg not in range(5):
                raise ValueError
        except ValueError:
            rejects.append({"path": str(path), "reason": f"line {line}: klg '{r['klg']}' is not a grade 0-4"})
            continue
        if not path.is_file():
            rejects.append({"path": str(path), "reason": f"line {line}: file not found"})
            continue
        problem = _check(path)
        if problem:
            rejects.append({"path": str(path), "reason": f"line {line}: {problem}"})
            continue
        patient = r.get("patient_id", "") or path.stem
        stem_patients += not r.get("patient_id", "")
        split = r.get("split", "").strip().lower()
        visit = r.get("visit", "").strip()
        rows.append({"image_id": r.get("image_id", "") or path.stem, "path": str(path.resolve()),
                     "patient_id": patient, "visit": int(float(visit)) if visit else pd.NA,
                     "side": r.get("side", "").strip().upper()[:1], "klg": klg,
                     "split": split if split in SPLITS else "", "source": r.get("source", "") or table.stem})
    if not rows:
        raise UserError(f"{table}: no usable rows ({len(rejects)} rejected)")
    df = pd.DataFrame(rows)
    if df["image_id"].duplicated().any():
        dup = df.loc[df["image_id"].duplicated(), "image_id"].iloc[0]
        raise UserError(f"{table}: image ids must be unique (e.g. '{dup}' repeats); add an image_id column")
    return IngestResult(manifest=df, rejects=rejects, stem_patients=stem_patients)
