"""A study's graded instances -> the DICOM objects that go back (SR + one SC per graded film).

Shared by ``klgrade pacs`` (STOW-RS into the study) and ``klgrade predict --dicom-out`` (files).
UIDs are derived from the study, the sources and the weights fingerprint: the same model on the
same images always makes the same UIDs, in series of their own.
"""
from __future__ import annotations

from pathlib import Path

from klgrade.clinic.pacs.grading import InstanceResult, ModelInfo, derived_uid, grade_instance
from klgrade.clinic.pacs.sc import build_sc
from klgrade.clinic.pacs.sr import build_sr

SR_SERIES_NUMBER = 900
SC_SERIES_NUMBER = 901


def study_objects(results: list[InstanceResult], model: ModelInfo) -> list:
    """[SC per graded instance..., SR] for instances of one study (the SR last: it marks the study
    as done, so a run interrupted after the captures stores them again, as duplicates, next time)."""
    study = str(results[0].header.StudyInstanceUID)
    sources = sorted(str(r.header.SOPInstanceUID) for r in results)
    sc_series = derived_uid(study, model.fingerprint, "sc-series")
    out = []
    for n, res in enumerate(r for r in results if r.graded and r.film is not None):
        sop = derived_uid(study, model.fingerprint, "sc", str(res.header.SOPInstanceUID))
        out.append(build_sc(res, model, sc_series, sop, SC_SERIES_NUMBER, n + 1))
    out.append(build_sr(results, model, derived_uid(study, model.fingerprint, "sr-series"),
                        derived_uid(study, model.fingerprint, "sr", *sources), SR_SERIES_NUMBER))
    return out


def write_local(grader, path: str | Path, out_dir: str | Path, model: ModelInfo) -> tuple[InstanceResult, list[Path]]:
    """``predict --dicom-out``: grade one DICOM file, write its SR (+ SC when graded) to ``out_dir``."""
    from klgrade import io
    from klgrade.clinic.grader import ClinicError
    from klgrade.ingest.dicom import DicomError, read_dataset
    from klgrade.ingest.images import is_dicom

    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise ClinicError(f"{path}: no such file")
    if not is_dicom(path):
        raise ClinicError(f"{path}: --dicom-out needs a DICOM input (the SR and SC copy its patient and study)")
    try:
        header = read_dataset(path, stop_before_pixels=True)
    except DicomError as e:
        raise ClinicError(str(e)) from e
    for kw in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not header.get(kw):
            raise ClinicError(f"{path}: no {kw}; cannot write an SR/SC that refers to it")
    res = grade_instance(grader, path, header, display=str(path))
    written = []
    for obj in study_objects([res], model):
        kind = "sr" if obj.Modality == "SR" else "sc"
        # OAI files are all called 001: the source's UID keeps outputs of different films apart
        out = out_dir / f"{path.stem or 'image'}_{_short(header.SOPInstanceUID)}_{kind}.dcm"
        with io.atomic_path(out) as tmp:
            obj.save_as(tmp, enforce_file_format=True)
        written.append(out)
    return res, written


def _short(uid) -> str:
    import hashlib

    return hashlib.sha1(str(uid).encode()).hexdigest()[:8]
