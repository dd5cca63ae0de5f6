"""manifest.csv: one row per unilateral knee image; the contract between every stage.

Columns: image_id, path, patient_id, visit, side, klg, split, source (+ optional extras).
``path`` is relative to the dataset dir (absolute paths are accepted for referenced images).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from klgrade import io
from klgrade.errors import LeakageError, ManifestError  # noqa: F401 - re-exported
from klgrade.grades import GRADES

COLUMNS = ["image_id", "path", "patient_id", "visit", "side", "klg", "split", "source"]
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.csv"
REJECTS_NAME = "rejects.csv"
REJECT_COLUMNS = ["path", "reason"]


def manifest_path(dataset: str | Path) -> Path:
    p = Path(dataset)
    return p if p.suffix == ".csv" else p / MANIFEST_NAME


def _rows(idx, limit: int = 10) -> str:
    # +2: the header is line 1 and pandas counts from 0, so this is the CSV line number.
    lines = [str(i + 2) for i in list(idx)[:limit]]
    more = f" (+{len(idx) - limit} more)" if len(idx) > limit else ""
    return ", ".join(lines) + more


def read_manifest(dataset: str | Path, check_files: bool = True, check_leakage: bool = True) -> pd.DataFrame:
    """Load and validate a manifest; raise ManifestError naming the file and the CSV lines at fault.

    Adds no columns; use :func:`resolve_path` to get an image's absolute path.
    """
    path = manifest_path(dataset)
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest here (run `klgrade prepare ...` first)")
    try:
        df = pd.read_csv(path, dtype={"image_id": str, "patient_id": str, "path": str, "side": str,
                                      "split": str, "source": str}, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is reported the same way
        raise ManifestError(f"{path}: cannot be parsed as CSV ({e})") from e
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; required: {COLUMNS}")
    if df.empty:
        raise ManifestError(f"{path}: no images listed (a header and no rows)")
    problems = []
    klg = pd.to_numeric(df["klg"], errors="coerce")
    bad = df.index[klg.isna() | ~klg.isin(GRADES)]
    if len(bad):
        problems.append(f"klg not an integer grade 0-4 on line(s) {_rows(bad)}")
    dup = df.index[df["image_id"].duplicated(keep=False)]
    if len(dup):
        problems.append(f"duplicate image_id on line(s) {_rows(dup)}")
    empty = df.index[(df["image_id"] == "") | (df["patient_id"] == "") | (df["path"] == "")]
    if len(empty):
        problems.append(f"empty image_id/patient_id/path on line(s) {_rows(empty)}")
    bad_split = df.index[~df["split"].isin(("",) + SPLITS)]
    if len(bad_split):
        problems.append(f"split must be one of {SPLITS} or empty on line(s) {_rows(bad_split)}")
    bad_side = df.index[~df["side"].isin(("", "L", "R"))]
    if len(bad_side):
        problems.append(f"side must be L, R or empty on line(s) {_rows(bad_side)}")
    visit = pd.to_numeric(df["visit"].replace("", pd.NA), errors="coerce")
    bad_visit = df.index[visit.isna() & (df["visit"].astype(str) != "")]
    if len(bad_visit):
        problems.append(f"visit must be months as an integer on line(s) {_rows(bad_visit)}")
    if problems:
        raise ManifestError(f"{path}: " + "; ".join(problems))
    df["klg"] = klg.astype(int)
    df["visit"] = visit.astype("Int64")
    if check_files:
        root = path.parent
        absent = df.index[[not resolve_path(root, p).is_file() for p in df["path"]]]
        if len(absent):
            first = df.loc[absent[0], "path"]
            raise ManifestError(f"{path}: image file missing on line(s) {_rows(absent)} (first: {first})")
    if check_leakage:
        check_no_leakage(df, where=str(path))
    df.attrs["root"] = str(path.parent.resolve())
    return df


def resolve_path(root: str | Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else Path(root) / p


def image_paths(df: pd.DataFrame) -> list[Path]:
    """Absolute paths of a manifest loaded with :func:`read_manifest`."""
    root = df.attrs.get("root")
    if root is None:
        raise ValueError("dataframe has no root; load it with read_manifest()")
    return [resolve_path(root, p) for p in df["path"]]


def image_sides(df: pd.DataFrame) -> list[str]:
    """Each row's knee ('R', 'L' or ''): which knee of a bilateral film the row is (other files have
    one knee and ignore it; klgrade.view.entrance.view_file)."""
    if "side" not in df.columns:
        return [""] * len(df)
    return [s if s in ("R", "L") else "" for s in df["side"].fillna("").astype(str).str.strip().str.upper()]


def check_no_leakage(df: pd.DataFrame, where: str = "manifest") -> None:
    """Fail loudly if one patient's images sit in two splits."""
    assigned = df[df["split"] != ""]
    n = assigned.groupby("patient_id")["split"].nunique()
    leaked = n.index[n > 1].tolist()
    if leaked:
        raise LeakageError(
            f"{where}: {len(leaked)} patient(s) appear in more than one split, e.g. {leaked[:5]}; "
            "splits must be patient-level (re-split with `klgrade split`)"
        )


def select_split(df: pd.DataFrame, split: str) -> pd.DataFrame:
    if split == "all":
        return df
    out = df[df["split"] == split]
    if out.empty:
        have = sorted(set(df["split"]) - {""})
        raise ManifestError(f"{df.attrs.get('root', 'manifest')}: no rows in split '{split}' (splits present: {have})")
    out.attrs.update(df.attrs)
    return out


def write_manifest(df: pd.DataFrame, dataset_dir: str | Path) -> Path:
    """Write manifest.csv atomically with the required columns first, extras after."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing}")
    extras = [c for c in df.columns if c not in COLUMNS]
    out = df[COLUMNS + extras].copy()
    out["visit"] = out["visit"].astype("Int64")
    path = Path(dataset_dir) / MANIFEST_NAME
    io.write_csv(path, out)
    return path


def write_rejects(rejects: list[dict] | pd.DataFrame, dataset_dir: str | Path) -> Path:
    df = pd.DataFrame(rejects)
    for c in REJECT_COLUMNS:
        if c not in df.columns:
            df[c] = pd.Series(dtype=str)
    # a file name that is not UTF-8 is shown with its bad bytes as \xNN escapes, never a crash
    df["path"] = df["path"].map(printable_path)
    path = Path(dataset_dir) / REJECTS_NAME
    io.write_csv(path, df[REJECT_COLUMNS + [c for c in df.columns if c not in REJECT_COLUMNS]])
    return path


def printable_path(p) -> str:
    """``p`` as UTF-8-safe text: undecodable bytes of a file name (surrogate escapes) as \\xNN."""
    if not isinstance(p, str | Path):
        return p
    return os.fsencode(str(p)).decode("utf-8", "backslashreplace")


def refuse_existing(dataset_dir: str | Path, overwrite: bool) -> None:
    """A prepare command never replaces a dataset silently: refuse an existing manifest.csv."""
    path = Path(dataset_dir) / MANIFEST_NAME
    if path.exists() and not overwrite:
        raise ManifestError(f"{path}: already holds a dataset; choose another --out, or pass --overwrite "
                            "to replace it")


def summarize(df: pd.DataFrame) -> str:
    """Counts per split and grade, for the end-of-run summary."""
    tab = pd.crosstab(df["split"].replace("", "(none)"), df["klg"]).reindex(columns=range(5), fill_value=0)
    tab["images"] = tab.sum(axis=1)
    tab["patients"] = df.groupby(df["split"].replace("", "(none)"))["patient_id"].nunique()
    return tab.to_string()
