"""Ingest a user's CSV that lists knee images and their grades."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from klgrade.errors import UserError
from klgrade.ingest.folders import IngestResult, _check
from klgrade.ingest.manifest import REJECTS_NAME, SPLITS, write_rejects


def ingest_csv(table: str | Path, out: str | Path, root: str | Path | None = None) -> IngestResult:
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no such file")
    try:
        src = pd.read_csv(table, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"{table}: cannot be read as a UTF-8 CSV ({type(e).__name__}: {reason})") from e
    missing = [c for c in ("path", "klg") if c not in src.columns]
    if missing:
        raise UserError(f"{table}: missing column(s) {missing}; need at least path and klg")
    root = Path(root) if root else table.parent
    rows, rejects, stem_patients = [], [], 0
    for i, r in enumerate(src.to_dict("records")):
        row, problem = _row(r, root, table)
        if problem:  # line i + 2: the header is line 1
            rejects.append({"path": row, "reason": f"line {i + 2}: {problem}"})
            continue
        stem_patients += not r.get("patient_id", "")
        rows.append(row)
    if not rows:
        if rejects:
            write_rejects(rejects, out)
        raise UserError(f"{table}: no usable rows ({len(rejects)} rejected; reasons in {Path(out) / REJECTS_NAME})")
    df = pd.DataFrame(rows)
    if df["image_id"].duplicated().any():
        dup = df.loc[df["image_id"].duplicated(), "image_id"].iloc[0]
        raise UserError(f"{table}: image ids must be unique (e.g. '{dup}' repeats); add an image_id column")
    return IngestResult(manifest=df, rejects=rejects, stem_patients=stem_patients)


def _row(r: dict, root: Path, table: Path) -> tuple[dict | str, str | None]:
    """(manifest row, None) for a usable CSV row, else (its path as text, the reason)."""
    try:
        path = Path(r["path"]) if Path(r["path"]).is_absolute() else root / r["path"]
        exists = path.is_file()
    except (ValueError, OSError) as e:  # e.g. a NUL byte in the path
        return str(r["path"]), f"unusable path ({e})"
    try:
        klg = int(float(r["klg"]))
        if str(klg) != r["klg"].strip().split(".")[0] or klg not in range(5):
            raise ValueError
    except (ValueError, OverflowError):
        return str(path), f"klg '{r['klg']}' is not a grade 0-4"
    visit, side = r.get("visit", "").strip(), r.get("side", "").strip().upper()[:1]
    try:
        visit = int(float(visit)) if visit else pd.NA
    except (ValueError, OverflowError):
        return str(path), f"visit '{visit}' is not a number of months"
    if side not in ("", "L", "R"):
        return str(path), f"side '{r.get('side')}' is not L or R"
    if not exists:
        return str(path), "file not found"
    problem = _check(path)
    if problem:
        return str(path), problem
    split = r.get("split", "").strip().lower()
    return {"image_id": r.get("image_id", "") or path.stem, "path": str(path.resolve()),
            "patient_id": r.get("patient_id", "") or path.stem, "visit": visit, "side": side, "klg": klg,
            "split": split if split in SPLITS else "", "source": r.get("source", "") or table.stem}, None
