"""OAI KL label tables: reading ``kxr_sq_bu`` tables into one tidy frame of graded knees.

Label tables are the Boston University central reads ``kxr_sq_buVV.txt`` (pipe-delimited) or
``.sas7bdat``: one row per knee and reading, columns ``ID``, ``SIDE``, ``READPRJ``, ``VERSION`` and
``VVVXR*`` (``VVVXRKL`` the KL grade, then the OARSI features). ``read_labels`` turns any number of
them into one tidy frame, one reading per (patient, visit, side).

Duplicate rule (documented, deterministic): when one knee at one visit has several readings, keep
the one with READPRJ 15 (the central BU project most studies use), then one that carries a KL
grade, then the highest VERSION (compared number by number), then the last row of the last file.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from klgrade.grades import GRADES

log = logging.getLogger(__name__)

# OAI visit codes → months since enrolment.
VISIT_MONTHS = {"V00": 0, "V01": 12, "V03": 24, "V05": 36, "V06": 48, "V08": 72, "V10": 96}
MONTHS_VISIT = {m: v for v, m in VISIT_MONTHS.items()}
STUDY_VISITS = (12, 24, 36, 48, 72, 96)
PREFERRED_READPRJ = 15
# VVVXR<suffix> → tidy column. Other XR columns are kept as xr_<suffix> numbers.
FEATURES = {
    "KL": "klg",
    "JSM": "jsn_medial", "JSL": "jsn_lateral",
    "OSFM": "ost_femur_medial", "OSFL": "ost_femur_lateral",
    "OSTM": "ost_tibia_medial", "OSTL": "ost_tibia_lateral",
    "SCFM": "scl_femur_medial", "SCFL": "scl_femur_lateral",
    "SCTM": "scl_tibia_medial", "SCTL": "scl_tibia_lateral",
    "ATTM": "att_medial", "ATTL": "att_lateral",
}
LABEL_COLUMNS = ["patient_id", "visit", "side", "klg", "readprj", "version", *list(FEATURES.values())[1:]]
_XR_COL = re.compile(r"^(V\d\d)XR([A-Z0-9]+)$")
_NUMBER = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(?::.*)?$")


class LabelError(ValueError):
    """A label table that cannot be read; the message names the file and the reason."""


@dataclass
class Labels:
    """``table``: one graded reading per (patient_id, visit, side); ``dropped``: knees that carry no
    usable grade (patient_id, visit, side, reason, file); ``duplicates``: readings set aside by the
    duplicate rule."""

    table: pd.DataFrame
    dropped: pd.DataFrame
    duplicates: int = 0

    def lookup(self) -> dict[tuple[str, int, str], dict]:
        return {(r.patient_id, int(r.visit), r.side): r._asdict() for r in self.table.itertuples(index=False)}


def parse_code(value) -> float:
    """``2: 2`` → 2.0, ``1.5`` → 1.5, missing codes (``.M``, ``.T: Missing``, blank) → NaN."""
    if value is None:
        return np.nan
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    m = _NUMBER.match(str(value))
    return float(m.group(1)) if m else np.nan


def missing_code(value) -> str:
    """The code of a missing value, for the reject reason: ``.T: Total knee`` → ``.T``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "blank"
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    s = str(value).strip()
    return (s.split(":")[0].strip() or "blank") if s else "blank"


def parse_side(value) -> str | None:
    """``1: Right`` / ``1`` / ``R`` / ``Right`` → 'R'; the same for left; else None."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    s = str(value).strip().upper()
    if s in ("1", "1.0", "R", "RIGHT") or s.startswith("1:") or s.endswith("RIGHT"):
        return "R"
    if s in ("2", "2.0", "L", "LEFT") or s.startswith("2:") or s.endswith("LEFT"):
        return "L"
    return None


def _patient_id(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _version_key(v) -> tuple:
    """'2.3.10' > '2.3.9': compare dotted versions number by number; junk sorts first."""
    nums = re.findall(r"\d+", str(v)) if v is not None and str(v) not in ("", "nan") else []
    return tuple(int(n) for n in nums)


def _read_raw(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such label table")
    suffix = path.suffix.lower()
    try:
        if suffix in (".sas7bdat", ".xpt"):
            df = _read_sas(path, suffix)
        else:
            df = pd.read_csv(path, sep="|", dtype=str, keep_default_na=False, na_values=[""],
                             skipinitialspace=True, encoding="latin-1")
    except Exception as e:  # noqa: BLE001 - any parser failure is one clear message
        raise LabelError(f"{path}: cannot be read as a label table ({type(e).__name__}: {e})") from e
    df.columns = [str(c).strip().upper() for c in df.columns]
    return df


def _read_sas(path: Path, suffix: str) -> pd.DataFrame:
    """SAS tables: pyreadstat when installed (the `sas` extra; reads both SAS formats and decodes
    strings), else pandas. SAS special missing values (.M, .T, ...) arrive as NaN either way."""
    try:
        import pyreadstat
    except ImportError:
        return pd.read_sas(path, format="sas7bdat" if suffix == ".sas7bdat" else "xport",
                           encoding="latin-1")
    reader = pyreadstat.read_sas7bdat if suffix == ".sas7bdat" else pyreadstat.read_xport
    df, _ = reader(str(path))
    return df


def read_label_table(path: str | Path) -> pd.DataFrame:
    """One kxr_sq_bu table (txt or sas7bdat) → tidy rows, ungraded ones included (klg NaN) with the
    raw missing code in ``klg_code``. A table holding several visits' columns yields each visit."""
    path = Path(path)
    raw = _read_raw(path)
    for need in ("ID", "SIDE"):
        if need not in raw.columns:
            raise LabelError(f"{path}: no {need} column (columns: {', '.join(raw.columns[:12])})")
    by_visit: dict[str, dict[str, str]] = {}
    for c in raw.columns:
        m = _XR_COL.match(c)
        if m:
            by_visit.setdefault(m.group(1), {})[m.group(2)] = c
    visits = {v: cols for v, cols in by_visit.items() if "KL" in cols}
    if not visits:
        raise LabelError(f"{path}: no VVVXRKL column (expected e.g. V01XRKL for the KL grade)")
    unknown = sorted(set(visits) - set(VISIT_MONTHS))
    if unknown:
        raise LabelError(f"{path}: unknown visit code(s) {unknown}; known: {sorted(VISIT_MONTHS)}")
    base = pd.DataFrame({
        "patient_id": raw["ID"].map(_patient_id),
        "side": raw["SIDE"].map(parse_side),
        "readprj": raw["READPRJ"].map(parse_code) if "READPRJ" in raw else np.nan,
        "version": raw["VERSION"].astype(str).str.strip() if "VERSION" in raw else "",
        "file": path.name,
        "row": np.arange(len(raw)) + 2,  # the line number in a txt file (header is line 1)
    })
    parts = []
    for vcode, cols in sorted(visits.items()):
        part = base.copy()
        part["visit"] = VISIT_MONTHS[vcode]
        part["klg_code"] = raw[cols["KL"]].map(missing_code)
        for suffix, col in cols.items():
            name = FEATURES.get(suffix, f"xr_{suffix.lower()}")
            part[name] = raw[col].map(parse_code)
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    for name in FEATURES.values():
        if name not in out:
            out[name] = np.nan
    out["readprj"] = out["readprj"].astype("Int64") if out["readprj"].notna().any() else pd.NA
    return out


def read_labels(paths, visits=None) -> Labels:
    """Read label tables into one reading per (patient, visit, side) with a KL grade 0-4.

    Rows without a side or a grade (missing codes, a replaced knee, a grade outside 0-4) are
    dropped and listed in ``Labels.dropped`` with the reason. ``visits``: months to keep.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
    if not paths:
        raise LabelError("no label table given")
    frames = [read_label_table(p) for p in paths]
    df = pd.concat(frames, ignore_index=True)
    if visits is not None:
        df = df[df["visit"].isin([int(v) for v in visits])]
    dropped = []
    no_side = df["side"].isna()
    for r in df[no_side].itertuples(index=False):
        dropped.append({"patient_id": r.patient_id, "visit": r.visit, "side": "", "file": r.file,
                        "reason": f"{r.file} line {r.row}: SIDE not 1: Right / 2: Left"})
    df = df[~no_side]
    # Duplicate rule (see module docstring): sort so the preferred reading comes last, keep last.
    df = df.assign(
        _prj=(df["readprj"] == PREFERRED_READPRJ).fillna(False).astype(int),
        _graded=df["klg"].notna().astype(int),
        _ver=df["version"].map(_version_key),
        _order=np.arange(len(df)),
    ).sort_values(["_prj", "_graded", "_ver", "_order"], kind="stable")
    key = ["patient_id", "visit", "side"]
    keep = ~df.duplicated(key, keep="last")
    duplicates = int((~keep).sum())
    df = df[keep]
    bad = df["klg"].isna() | ~df["klg"].isin(GRADES)
    for r in df[bad].itertuples(index=False):
        code = "empty" if r.klg_code == "blank" else f"missing code {r.klg_code}"
        why = (f"no KL grade ({code})" if pd.isna(r.klg)
               else f"KL grade {r.klg:g} is not 0-4")
        dropped.append({"patient_id": r.patient_id, "visit": r.visit, "side": r.side, "file": r.file,
                        "reason": why})
    table = df[~bad].drop(columns=["_prj", "_graded", "_ver", "_order", "row", "klg_code"])
    table["klg"] = table["klg"].astype(int)
    table["visit"] = table["visit"].astype(int)
    table = table.sort_values(key, kind="stable").reset_index(drop=True)
    front = [c for c in LABEL_COLUMNS if c in table.columns]
    table = table[front + [c for c in table.columns if c not in front]]
    dropped_df = pd.DataFrame(dropped, columns=["patient_id", "visit", "side", "file", "reason"])
    if duplicates:
        log.info("label tables: %d duplicate reading(s) set aside (READPRJ 15, graded, latest VERSION kept)",
                 duplicates)
    return Labels(table=table, dropped=dropped_df, duplicates=duplicates)

