"""The OAI image tree: which files are the bilateral knee films, and whose visit each one is.

Two ways to find them: the releases' ``contents.csv`` (``series_from_contents``) or each file's own
header (``series_from_headers``). A file that cannot be a usable film (unreadable, cut short before
its pixel data, a broken or self-looping link) is a reject with a reason, never a silent skip.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from klgrade.ingest.oai_labels import MONTHS_VISIT, VISIT_MONTHS, LabelError

KNEE_SERIES = "Bilateral PA Fixed Flexion Knee"
# <V>.C.2 / <V>.E.1 release folders; their leading number is the visit (1 = V01 = 12 months).
_RELEASE_DIR = re.compile(r"^(\d{1,2})\.[A-Z]\.\d+$")
_MONTHS_DIR = re.compile(r"^(\d{1,3})m$")
_PARTICIPANT = re.compile(r"^\d{7}$")


def _norm(text) -> str:
    return " ".join(str(text).split()).lower()


def parse_oai_path(path: str | Path) -> tuple[str | None, int | None]:
    """(participant id, visit months) from an OAI path such as
    ``12m/1.E.1/9000099/20060713/01653203/001``; None where a part is not recognisable."""
    parts = Path(path).parts
    visit = pid = None
    for i, part in enumerate(parts):
        m = _MONTHS_DIR.match(part)
        if m and int(m.group(1)) in MONTHS_VISIT:
            visit = int(m.group(1))
        m = _RELEASE_DIR.match(part)
        if m:
            code = f"V{int(m.group(1)):02d}"
            if visit is None and code in VISIT_MONTHS:
                visit = VISIT_MONTHS[code]
            if i + 1 < len(parts) and _PARTICIPANT.match(parts[i + 1]):
                pid = parts[i + 1]
    if pid is None:
        pid = next((p for p in parts if _PARTICIPANT.match(p)), None)
    return pid, visit


def _series_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        return []
    # broken links stay in: reading them gives the reject its reason
    return sorted(p for p in folder.iterdir() if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))


def series_from_contents(contents: list[str | Path], images: str | Path,
                         description: str = KNEE_SERIES) -> tuple[pd.DataFrame, list[dict], dict]:
    """Knee series listed in OAI ``contents.csv`` files. ``Folder`` is relative to the csv's folder
    (a release dir like ``12m/``) or to ``images``. Returns (series, rejects, counts)."""
    images = Path(images)
    rows, rejects, counts = [], [], {"other_series": 0}
    for c in contents:
        c = Path(c)
        if not c.is_file():
            raise FileNotFoundError(f"{c}: no such contents file")
        try:
            df = pd.read_csv(c, dtype=str, keep_default_na=False)
        except Exception as e:  # noqa: BLE001
            raise LabelError(f"{c}: cannot be read as CSV ({type(e).__name__}: {e})") from e
        cols = {col.strip().lower(): col for col in df.columns}
        need = [k for k in ("folder", "seriesdescription") if k not in cols]
        if need:
            raise LabelError(f"{c}: missing column(s) {need} (have {list(df.columns)})")
        want = _norm(description)
        for r in df.to_dict("records"):
            if _norm(r[cols["seriesdescription"]]) != want:
                counts["other_series"] += 1
                continue
            folder = r[cols["folder"]].strip()
            cand = [c.parent / folder, images / folder]
            base = next((p for p in cand if p.exists()), cand[0])
            pid, visit = parse_oai_path(base.relative_to(images) if base.is_relative_to(images) else base)
            if "participantid" in cols and str(r[cols["participantid"]]).strip():
                pid = str(r[cols["participantid"]]).strip()
            if visit is None:
                _, visit = parse_oai_path(c.parent.name + "/" + folder)
            files = _series_files(base)
            if not files:
                rejects.append({"path": str(base), "reason": f"listed in {c.name} but not found",
                                "patient_id": pid or "", "visit": visit, "side": ""})
                continue
            for f in files:
                rows.append({"path": str(f), "patient_id": pid, "visit": visit, "found_by": "contents"})
    return pd.DataFrame(rows, columns=["path", "patient_id", "visit", "found_by"]), rejects, counts


def broken_link(p: Path) -> str | None:
    """Why ``p`` is a link that leads to no file (a loop, or a missing target), else None."""
    if not p.is_symlink():
        return None
    try:
        p.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return "symbolic link loop"
    except OSError as e:
        return "symbolic link loop" if e.errno == 40 else "broken symbolic link (target missing)"
    return None


def _candidates(images: Path) -> tuple[list[Path], list[Path]]:
    """(files that may be DICOM, links that lead nowhere), hidden names left out."""
    files, broken = [], []
    for p in images.rglob("*"):
        if p.name.startswith(".") or not (p.suffix == "" or p.suffix.lower() in (".dcm", ".dicom")):
            continue
        if broken_link(p):
            broken.append(p)
        elif p.is_file():
            files.append(p)
    return sorted(files), sorted(broken)


def series_from_headers(images: str | Path, description: str = KNEE_SERIES,
                        progress: bool = True) -> tuple[pd.DataFrame, list[dict], dict]:
    """Walk ``images`` and keep DICOM files whose SeriesDescription is the knee series (header
    only, pixel data skipped). Unreadable candidates, files cut short before their pixel data and
    links that lead nowhere are rejects; other series are counted and skipped."""
    from tqdm import tqdm

    from klgrade.ingest.dicom import DicomError, read_dataset
    from klgrade.ingest.images import is_dicom

    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: no such image folder")
    files, broken = _candidates(images)
    rows, rejects, counts = [], [], {"other_series": 0, "not_dicom": 0}

    def reject(f: Path, reason: str, pid, visit) -> None:
        rejects.append({"path": str(f), "reason": reason, "patient_id": pid or "", "visit": visit, "side": ""})

    for f in broken:
        reject(f, broken_link(f), *parse_oai_path(f.relative_to(images)))
    want = _norm(description)
    for f in tqdm(files, desc="scan headers", unit="file", disable=not progress):
        pid, visit = parse_oai_path(f.relative_to(images))
        if not is_dicom(f):
            counts["not_dicom"] += 1
            if pid is not None and visit is not None:  # in the OAI layout: a broken image file
                reject(f, "not a DICOM file (no DICM preamble)", pid, visit)
            continue
        try:
            # defer_size: the whole header is parsed but pixel values are not loaded, so a file cut
            # short before its pixel data shows (pydicom returns the partial header without error)
            ds = read_dataset(f, defer_size=1024)
        except DicomError as e:
            reject(f, e.reason, pid, visit)
            continue
        described = _norm(ds.get("SeriesDescription", ""))
        if "PixelData" not in ds and want.startswith(described):  # "" or the name cut short too
            reject(f, "no pixel data: the file is cut short (or is not an image)", pid, visit)
            continue
        if described != want:
            counts["other_series"] += 1
            continue
        rows.append({"path": str(f), "patient_id": pid, "visit": visit, "found_by": "header"})
    return pd.DataFrame(rows, columns=["path", "patient_id", "visit", "found_by"]), rejects, counts
