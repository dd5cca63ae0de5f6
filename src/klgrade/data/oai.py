"""Osteoarthritis Initiative (OAI) ingest: KL label tables, the image tree, and ``prepare oai``.

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

from klgrade.grades import GRADES, N_GRADES

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


# --------------------------------------------------------------------------- image tree

# The tree walk lives in klgrade.data.oai_series; re-exported here, where callers look for it.
from klgrade.data.oai_series import (  # noqa: E402, F401
    KNEE_SERIES,
    parse_oai_path,
    series_from_contents,
    series_from_headers,
)

# --------------------------------------------------------------------------- per-image work

@dataclass(frozen=True)
class CropParams:
    size: int = 400
    mm_per_px: float = 0.35
    min_confidence: float = 0.5

    @property
    def fov_mm(self) -> float:
        return self.size * self.mm_per_px

    def tag(self) -> str:
        return f"{self.size}px@{self.mm_per_px:g}mm/conf{self.min_confidence:g}"


def image_id(patient_id: str, visit: int, side: str) -> str:
    return f"{patient_id}_{int(visit):02d}m_{side}"


def crop_relpath(patient_id: str, visit: int, side: str) -> str:
    return f"images/{int(visit):02d}m/{image_id(patient_id, visit, side)}.png"


def write_png16(path: Path, arr: np.ndarray) -> None:
    """Atomic 16-bit grayscale PNG. zlib level 1: the PNG write is the costliest step of a film, and
    noisy 16-bit radiographs shrink little more at higher levels (~3% at the default 6)."""
    from PIL import Image

    from klgrade import io

    with io.atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint16)).save(tmp, format="PNG", compress_level=1)


def process_series(task: dict) -> dict:
    """Read one bilateral film, locate both joints, write the crops of the graded sides.

    ``task``: path, rel, patient_id, visit, sides (to crop), out, params (CropParams as dict).
    Returns a record {rel, params, sides: {side: {'crop': {...}} | {'reject': reason}}}; never
    raises for a bad image (the reason goes into the record), so one file cannot stop a batch.
    """
    from klgrade.data.dicom import DicomError, read_radiograph
    from klgrade.data.roi import crop_square, locate_bilateral, to_uint16

    params = CropParams(**task["params"])
    rec = {"rel": task["rel"], "params": params.tag(), "sides": {}}

    def reject_all(reason: str) -> dict:
        rec["sides"] = {s: {"reject": reason} for s in task["sides"]}
        return rec

    try:
        rad = read_radiograph(task["path"])
    except DicomError as e:
        return reject_all(f"unreadable DICOM: {e.reason}")
    except (OSError, MemoryError) as e:
        return reject_all(f"unreadable file: {type(e).__name__}: {e}")
    if rad.spacing_mm is None:
        return reject_all("no pixel spacing (neither ImagerPixelSpacing nor PixelSpacing): "
                          "cannot cut a crop of fixed size in mm")
    try:
        locs = locate_bilateral(rad.pixels, rad.spacing_mm, min_confidence=params.min_confidence)
    except Exception as e:  # noqa: BLE001 - an odd film is this film's reject, never the batch's end
        return reject_all(f"knee joints not located ({type(e).__name__}: {e})")
    sy, sx = rad.spacing_mm
    for side in task["sides"]:
        loc = locs[side]
        if not loc.ok:
            rec["sides"][side] = {"reject": f"knee joint not located: {loc.reason}"}
            continue
        # Left knees are mirrored so every crop has the lateral side (fibula) on the image's left.
        crop = crop_square(rad.pixels, (loc.x, loc.y), params.fov_mm, rad.spacing_mm, params.size,
                           flip=(side == "L"))
        rel = crop_relpath(task["patient_id"], task["visit"], side)
        write_png16(Path(task["out"]) / rel, to_uint16(crop))
        rec["sides"][side] = {"crop": {
            "path": rel, "joint_x": round(loc.x, 1), "joint_y": round(loc.y, 1),
            "confidence": round(loc.confidence, 3), "joint_width_mm": round(loc.width_px * sx, 1),
            "spacing_mm": round(float(np.mean((sy, sx))), 5), "spacing_source": rad.spacing_source,
            "photometric": rad.meta["photometric"], "modality": rad.meta["modality"],
            "transfer_syntax": rad.meta["transfer_syntax"], "source_rows": rad.meta["rows"],
            "source_cols": rad.meta["cols"]}}
    return rec


# --------------------------------------------------------------------------- the prepare pipeline

PROGRESS_NAME = "progress.jsonl"
SUMMARY_NAME = "summary.json"
CONTACT_SHEET_NAME = "contact_sheet.png"
LABELS_DROPPED_NAME = "labels_dropped.csv"


@dataclass
class PrepareResult:
    manifest: pd.DataFrame
    rejects: pd.DataFrame
    summary: dict
    out: Path
    processed: int = 0   # films read in this run
    resumed: int = 0     # films skipped because an earlier run finished them


def _read_progress(path: Path) -> dict[str, dict]:
    """Finished films from earlier runs; a line cut short by a kill is ignored (and redone)."""
    import json

    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                done[rec["rel"]] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _is_done(rec: dict | None, task: dict, params: CropParams, out: Path) -> bool:
    if rec is None or rec.get("params") != params.tag():
        return False
    for side in task["sides"]:
        r = rec["sides"].get(side)
        if r is None or ("crop" in r and not (out / r["crop"]["path"]).is_file()):
            return False
    return True


def _reason_kind(reason: str) -> str:
    """The category of a reject reason, for the summary: text before the first ':' or '('."""
    return re.split(r"[:(]", str(reason), maxsplit=1)[0].strip()


def _pool_context():
    """forkserver where available: workers fork from a clean server process that has the reader
    and localiser already imported (no inherited threads or locks, unlike fork; no per-worker
    import of numpy/scipy/pydicom, unlike spawn). Elsewhere spawn."""
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["klgrade.data.oai", "klgrade.data.dicom", "klgrade.data.roi", "pydicom"])
        return ctx
    return mp.get_context("spawn")


def _run_tasks(tasks: list[dict], workers: int, progress_path: Path, progress: bool) -> list[dict]:
    """Process films (in a process pool when workers > 1); each finished film is appended to the
    progress log at once, so a killed run resumes where it stopped."""
    import json

    from tqdm import tqdm

    results = []
    bar = tqdm(total=len(tasks), desc="crop knees", unit="film", disable=not progress)
    with open(progress_path, "a", encoding="utf-8") as log_f:
        def record(rec: dict) -> None:
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            results.append(rec)
            bar.update()

        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                record(process_series(t))
        else:
            with _pool_context().Pool(workers) as pool:
                for rec in pool.imap_unordered(process_series, tasks, chunksize=1):
                    record(rec)
    bar.close()
    return results


def prepare_oai(images, labels, out, contents=None, visits=STUDY_VISITS, workers: int = 1,
                size: int = 400, mm_per_px: float = 0.35, fractions=(0.7, 0.1, 0.2), seed: int = 0,
                description: str = KNEE_SERIES, min_confidence: float = 0.5, progress: bool = True,
                sheet_samples: int = 40) -> PrepareResult:
    """Ingest an OAI image tree + KL label tables into a dataset dir of unilateral knee crops.

    Writes ``images/<VV>m/<id>_<VV>m_<R|L>.png`` (16-bit), ``manifest.csv`` (patient-level split),
    ``rejects.csv``, ``labels_dropped.csv``, ``summary.json``, ``contact_sheet.png`` and the
    resume log ``progress.jsonl``. Re-running with the same crop parameters skips finished films.
    """
    from klgrade.data.manifest import write_manifest, write_rejects
    from klgrade.data.splits import patient_split

    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no such image folder")
    out.mkdir(parents=True, exist_ok=True)
    params = CropParams(size=int(size), mm_per_px=float(mm_per_px), min_confidence=float(min_confidence))
    visits = tuple(int(v) for v in visits) if visits else None
    lab = read_labels(labels, visits)
    graded = lab.lookup()
    dropped = {(r.patient_id, int(r.visit), r.side): r.reason for r in lab.dropped.itertuples(index=False)
               if r.side}
    if contents:
        series, rejects, counts = series_from_contents(list(contents), images, description)
    else:
        series, rejects, counts = series_from_headers(images, description, progress)
    counts["outside_visits"] = 0
    tasks, seen = [], {}
    for r in series.sort_values("path", kind="stable").itertuples(index=False):
        path = Path(r.path)
        rel = path.relative_to(images).as_posix() if path.is_relative_to(images) else str(path)
        if r.patient_id is None or r.visit is None or pd.isna(r.visit):
            rejects.append({"path": str(path), "reason": "cannot tell participant id and visit from the path "
                            "(expected <VV>m/<V>.C.2/<participant>/<date>/<barcode>/001)",
                            "patient_id": r.patient_id or "", "visit": r.visit, "side": ""})
            continue
        pid, visit = str(r.patient_id), int(r.visit)
        if visits is not None and visit not in visits:
            counts["outside_visits"] += 1
            continue
        if (pid, visit) in seen:
            rejects.append({"path": str(path), "reason": f"second knee series for this participant and visit "
                            f"(kept {seen[(pid, visit)]})", "patient_id": pid, "visit": visit, "side": ""})
            continue
        seen[(pid, visit)] = rel
        sides = []
        for side in ("R", "L"):
            if (pid, visit, side) in graded:
                sides.append(side)
            else:
                why = dropped.get((pid, visit, side), "no reading in the label tables")
                rejects.append({"path": str(path), "reason": why, "patient_id": pid, "visit": visit,
                                "side": side})
        if sides:
            tasks.append({"path": str(path), "rel": rel, "patient_id": pid, "visit": visit, "sides": sides,
                          "out": str(out), "params": {"size": params.size, "mm_per_px": params.mm_per_px,
                                                      "min_confidence": params.min_confidence}})
    progress_path = out / PROGRESS_NAME
    done = _read_progress(progress_path)
    pending = [t for t in tasks if not _is_done(done.get(t["rel"]), t, params, out)]
    log.info("%d knee film(s): %d finished earlier, %d to process", len(tasks), len(tasks) - len(pending),
             len(pending))
    for rec in _run_tasks(pending, workers, progress_path, progress):
        done[rec["rel"]] = rec
    rows = []
    for t in tasks:
        rec = done[t["rel"]]
        for side in t["sides"]:
            r = rec["sides"][side]
            if "reject" in r:
                rejects.append({"path": t["path"], "reason": r["reject"], "patient_id": t["patient_id"],
                                "visit": t["visit"], "side": side})
                continue
            key = (t["patient_id"], t["visit"], side)
            label = graded[key]
            row = {"image_id": image_id(*key), "path": r["crop"]["path"], "patient_id": t["patient_id"],
                   "visit": t["visit"], "side": side, "klg": int(label["klg"]), "split": "", "source": "oai",
                   **{k: v for k, v in r["crop"].items() if k != "path"}, "dicom": t["rel"]}
            for feat in list(FEATURES.values())[1:]:
                row[feat] = label.get(feat, np.nan)
            row["readprj"] = label.get("readprj")
            rows.append(row)
    manifest = pd.DataFrame(rows)
    rej = pd.DataFrame(rejects, columns=["path", "reason", "patient_id", "visit", "side"])
    rej["visit"] = rej["visit"].astype("Int64")
    rej = rej.sort_values(["path", "side"], kind="stable").reset_index(drop=True)
    write_rejects(rej, out)
    from klgrade import io

    io.write_csv(out / LABELS_DROPPED_NAME, lab.dropped)
    if manifest.empty:
        raise ValueError(f"{images}: no knee crop was produced ({len(rej)} reject(s), reasons in "
                         f"{out / 'rejects.csv'})")
    manifest = manifest.sort_values(["patient_id", "visit", "side"], kind="stable").reset_index(drop=True)
    manifest["split"] = patient_split(manifest, fractions, seed=seed).to_numpy()
    write_manifest(manifest, out)
    summary = summarize_prepare(manifest, rej, lab, counts, len(tasks), len(tasks) - len(pending))
    io.write_json(out / SUMMARY_NAME, summary)
    if sheet_samples:
        contact_sheet(manifest, out, out / CONTACT_SHEET_NAME, n=sheet_samples, seed=seed)
    return PrepareResult(manifest=manifest, rejects=rej, summary=summary, out=out,
                         processed=len(pending), resumed=len(tasks) - len(pending))


def summarize_prepare(manifest: pd.DataFrame, rejects: pd.DataFrame, labels: Labels, counts: dict,
                      films: int, resumed: int) -> dict:
    """Counts per visit, grade and reject reason (the end-of-run summary, also summary.json)."""
    per_visit = (pd.crosstab(manifest["visit"], manifest["klg"]).reindex(columns=GRADES, fill_value=0))
    return {
        "films": films,
        "films_resumed": resumed,
        "knee_images": int(len(manifest)),
        "patients": int(manifest["patient_id"].nunique()),
        "per_visit": {int(v): int(n) for v, n in manifest["visit"].value_counts().sort_index().items()},
        "per_grade": {int(g): int((manifest["klg"] == g).sum()) for g in GRADES},
        "per_visit_grade": {int(v): [int(x) for x in row] for v, row in per_visit.iterrows()},
        "per_split": {str(s): int(n) for s, n in manifest["split"].value_counts().sort_index().items()},
        "rejects": int(len(rejects)),
        "reject_reasons": {str(k): int(n) for k, n in
                           rejects["reason"].map(_reason_kind).value_counts().sort_index().items()},
        "label_rows_without_grade": int(len(labels.dropped)),
        "duplicate_readings_set_aside": int(labels.duplicates),
        **{k: int(v) for k, v in counts.items()},
    }


def format_summary(summary: dict) -> str:
    lines = [f"{summary['knee_images']} knee crops from {summary['films']} films "
             f"({summary['films_resumed']} finished by an earlier run), {summary['patients']} patients"]
    lines.append("visit (months) x KL grade:")
    lines.append("  visit " + " ".join(f"{f'KL{g}':>6}" for g in GRADES) + f"{'total':>7}")
    for v, row in summary["per_visit_grade"].items():
        lines.append(f"  {v:>5} " + " ".join(f"{x:>6}" for x in row) + f"{sum(row):>7}")
    lines.append("  total " + " ".join(f"{summary['per_grade'][g]:>6}" for g in GRADES)
                 + f"{summary['knee_images']:>7}")
    lines.append("split: " + ", ".join(f"{k} {v}" for k, v in summary["per_split"].items()))
    if summary["rejects"]:
        lines.append(f"rejected {summary['rejects']} knee(s)/file(s):")
        lines += [f"  {n:>6}  {k}" for k, n in summary["reject_reasons"].items()]
    lines.append(f"label rows without a grade: {summary['label_rows_without_grade']}; duplicate readings set "
                 f"aside: {summary['duplicate_readings_set_aside']}; other series skipped: "
                 f"{summary.get('other_series', 0)}")
    return "\n".join(lines)


def contact_sheet(manifest: pd.DataFrame, root: Path, path: Path, n: int = 40, seed: int = 0,
                  tile: int = 160, cols: int = 8) -> Path:
    """A grid of sample crops (stratified by grade, seeded) captioned with grade, side and visit,
    so a person can check the crops at a glance."""
    from PIL import Image, ImageDraw

    from klgrade import io
    from klgrade.data.images import read_image

    rng = np.random.default_rng(seed)
    per = max(1, n // N_GRADES)
    picks = []
    for g in GRADES:
        idx = manifest.index[manifest["klg"] == g].to_numpy()
        if len(idx):
            picks += rng.choice(idx, size=min(per, len(idx)), replace=False).tolist()
    rest = manifest.index.difference(picks).to_numpy()
    if len(picks) < n and len(rest):
        picks += rng.choice(rest, size=min(n - len(picks), len(rest)), replace=False).tolist()
    sel = manifest.loc[sorted(picks, key=lambda i: (manifest.at[i, "klg"], i))]
    rows = int(np.ceil(len(sel) / cols))
    sheet = Image.new("L", (cols * tile, rows * (tile + 14)), 0)
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(sel.itertuples(index=False)):
        img = read_image(Path(root) / r.path)
        im = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)).resize((tile, tile))
        x, y = (k % cols) * tile, (k // cols) * (tile + 14)
        sheet.paste(im, (x, y))
        draw.text((x + 3, y + tile + 1), f"KL{r.klg} {r.side} {int(r.visit)}m {r.patient_id}", fill=255)
    with io.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
