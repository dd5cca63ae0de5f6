"""Ingest image trees laid out ``<split>/<grade>/<file>`` (kneeKL224) or ``<grade>/<file>``."""
from __future__ import annotations

import logging
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from klgrade.grades import GRADES
from klgrade.ingest.images import IMAGE_SUFFIXES, ImageReadError, is_dicom, read_image
from klgrade.ingest.manifest import REJECTS_NAME, SPLITS, ManifestError, write_manifest, write_rejects

log = logging.getLogger(__name__)

# OAI participant ids are 7 digits starting with 9; kneeKL224 appends the side: 9001695L.png
OAI_NAME = re.compile(r"^(?P<patient>9\d{6})(?P<side>[LR])$")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "auto_test": "test"}


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    rejects: list[dict]
    stem_patients: int  # files whose name did not parse as <OAI id><side>


def parse_name(stem: str) -> tuple[str, str, bool]:
    """(patient_id, side, parsed_as_oai). Unparsed names become their own patient."""
    m = OAI_NAME.match(stem)
    if m:
        return m["patient"], m["side"], True
    return stem, "", False


def _scan(root: Path) -> tuple[list[tuple[Path, str, int]], list[dict]]:
    """Find (file, split, grade) triples; anything else that is not hidden is a reject with a reason."""
    from klgrade.ingest.oai_series import broken_link

    found, rejects = [], []
    for f in sorted(root.rglob("*")):
        if f.name.startswith("."):
            continue
        link = broken_link(f)
        if link:
            rejects.append({"path": str(f), "reason": link})
            continue
        if not f.is_file():
            continue
        parts = f.relative_to(root).parts
        if len(parts) == 3 and parts[0].lower() in SPLIT_ALIASES and parts[1].isdigit():
            split, grade = SPLIT_ALIASES[parts[0].lower()], int(parts[1])
        elif len(parts) == 2 and parts[0].isdigit():
            split, grade = "", int(parts[0])
        else:
            kind = "image" if f.suffix.lower() in IMAGE_SUFFIXES else "not an image file"
            rejects.append({"path": str(f), "reason": f"{kind} outside the <split>/<grade>/ or <grade>/ layout"})
            continue
        if grade not in GRADES:
            rejects.append({"path": str(f), "reason": f"grade folder '{parts[-2]}' is not a KL grade 0-4"})
            continue
        found.append((f, split, grade))
    return found, rejects


def _check(path: Path) -> str | None:
    if not is_utf8_name(path):
        return "file name is not valid UTF-8: rename the file (manifest.csv is UTF-8)"
    if path.suffix.lower() not in IMAGE_SUFFIXES and not is_dicom(path):
        return f"not an image file (suffix '{path.suffix}')"
    try:
        read_image(path)
    except (ImageReadError, ValueError, OSError) as e:
        return str(e).removeprefix(f"{path}: ")
    return None


def is_utf8_name(path: Path) -> bool:
    """False for a name with bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def ingest_folders(root: str | Path, out: str | Path, copy: bool = False, workers: int = 4,
                   source: str | None = None) -> IngestResult:
    root, out = Path(root).resolve(), Path(out).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    found, rejects = _scan(root)
    if not found:
        raise FileNotFoundError(f"{root}: no images under <split>/<grade>/<file> or <grade>/<file>")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(tqdm(pool.map(_check, [f for f, _, _ in found]), total=len(found),
                             desc="checking images", unit="img"))
    rows, stem_patients = [], 0
    out.mkdir(parents=True, exist_ok=True)
    for (f, split, grade), problem in zip(found, problems):
        if problem:
            rejects.append({"path": str(f), "reason": problem})
            continue
        patient, side, parsed = parse_name(f.stem)
        stem_patients += not parsed
        rel = f.relative_to(root)
        if copy:
            dst = out / "images" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                tmp = dst.with_name(f".{dst.name}.tmp")
                shutil.copy2(f, tmp)
                tmp.replace(dst)
            path = str(dst.relative_to(out))
        else:
            path = str(f)
        rows.append({"image_id": f.stem, "rel": rel.with_suffix("").as_posix(), "path": path, "patient_id": patient, "visit": pd.NA,
                     "side": side, "klg": grade, "split": split, "source": source or root.name})
    if not rows:
        write_rejects(rejects, out)
        raise ManifestError(f"{root}: no usable images ({len(rejects)} rejected; reasons in {out / REJECTS_NAME})")
    df = pd.DataFrame(rows)
    # equal file names in two folders stay distinct by keeping their folders in the id
    dups = df["image_id"].duplicated(keep=False)
    df.loc[dups, "image_id"] = df.loc[dups, "rel"]
    df = df.drop(columns="rel")
    df.attrs["root"] = str(out)
    return IngestResult(manifest=df, rejects=rejects, stem_patients=stem_patients)


def finalize(result: IngestResult, out: str | Path, fractions, seed: int, resplit: bool) -> pd.DataFrame:
    """Split when needed (or asked), check for leakage, and write manifest.csv + rejects.csv."""
    from klgrade.ingest.manifest import LeakageError, check_no_leakage
    from klgrade.ingest.splits import patient_split

    df = result.manifest
    has_split = (df["split"] != "").all() and set(df["split"]) <= set(SPLITS)
    if resplit or not has_split:
        df["split"] = patient_split(df, fractions, seed=seed).to_numpy()
    try:
        check_no_leakage(df, where=str(out))
    except LeakageError as e:
        raise LeakageError(f"{e}. The source's own split is not patient-level: use --resplit") from None
    write_manifest(df, out)
    write_rejects(result.rejects, out)
    return df
