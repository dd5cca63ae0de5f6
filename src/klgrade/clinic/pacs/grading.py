"""One DICOM instance -> knee grades, through the clinic's ``Grader`` (the code behind ``predict``).

``grade_instance`` adds only what a result going back into a patient's record needs on top of
``Grader.knees`` + ``Grader.grade`` (exactly what ``Grader.predict_file`` runs):

- header checks a PACS needs and a file on disk does not: the instance must be labelled a knee
  and must not be a lateral view (the models grade PA/AP films);
- a knee whose joint the locator could not find is refused, not graded as a centred crop
  (``predict`` grades that crop with a note; a stored result must not guess);
- the film as graded and each knee's measured joint space drawn on its view (for the Secondary
  Capture), and the model's identity (for both results).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Views of the knee the models were not trained on (PS3.3 C.8.11.5.1.1 ViewPosition; vendors' LAT).
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
NOT_LOCATED = "joint not located"


@dataclass(frozen=True)
class ModelInfo:
    """What every result says about the model that made it (no paths: they may name sites)."""

    name: str  # run name
    description: str  # e.g. "resnet18 (timm) CNN"
    version: str  # klgrade version
    fingerprint: str  # sha1 of the weights the grades came from
    tta: str = "none"

    @property
    def short(self) -> str:
        """12 hex digits: enough to tell runs apart, short enough for a SeriesDescription."""
        return self.fingerprint[:12]


def model_info(grader) -> ModelInfo:
    """Name, version and weights fingerprint of a loaded ``Grader``.

    The fingerprint hashes the module actually grading (for a head run: frozen backbone + head),
    the same ``state_fingerprint`` embedding stores record; tree heads hash their checkpoint file.
    """
    import torch

    from klgrade import __version__
    from klgrade.embed.embedders import state_fingerprint

    if isinstance(grader.model, torch.nn.Module):
        fp = state_fingerprint(grader.model)
    else:
        fp = hashlib.sha1(Path(grader.run_dir, "checkpoint.pt").read_bytes()).hexdigest()
    return ModelInfo(name=grader.name, description=grader.description, version=__version__,
                     fingerprint=fp, tta=grader.tta)


@dataclass
class InstanceResult:
    """The grading of one source instance (``header``: the source without its pixel data)."""

    header: object  # pydicom Dataset
    layout: str = ""
    knees: list[dict] = field(default_factory=list)  # Grader.grade dicts (heatmaps as _heatmap_png)
    film: np.ndarray | None = None  # the film as graded: float [0, 1], film orientation, maybe reduced
    film_scale: float = 1.0  # film px per source px (knee locations are in source px)
    # per knee (same order): RGB view with the measured JSW lines, film orientation; None: not measured
    jsw_overlays: list = field(default_factory=list)
    reason: str = ""  # why nothing was graded

    @property
    def graded(self) -> list[dict]:
        return [k for k in self.knees if k.get("klg") is not None]


def not_knee_reason(ds) -> str:
    """Why an instance or series is not labelled a knee ('' = it is): BodyPartExamined, else
    the series description or protocol name."""
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body:
        return "" if "KNEE" in body else f"not a knee (BodyPartExamined {body})"
    series = " ".join(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName")).lower()
    return "" if "knee" in series else "not a knee (no BodyPartExamined; the series description does not say knee)"


def skip_reason(ds) -> str:
    """Why a CR/DX instance is not for this model, from its header alone ('' = go ahead)."""
    reason = not_knee_reason(ds)
    if reason:
        return reason
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    series = " ".join(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName")).lower()
    if view in LATERAL_VIEWS or re.search(r"\blateral\b", series):  # not "bilateral"
        return f"lateral view (ViewPosition {view or 'missing'}); the model grades PA/AP films"
    return ""


def grade_instance(grader, path: str | Path, header, display: str = "instance") -> InstanceResult:
    """Grade the DICOM file ``path`` (whose header is ``header``) with Grad-CAM for the SC.

    Never raises for an ungradable image: the result's ``reason`` (or a knee's ``error``) says why.
    """
    from klgrade.clinic.grader import ClinicError

    res = InstanceResult(header=header)
    res.reason = skip_reason(header)
    if res.reason:
        return res
    try:
        res.layout, knees = grader.knees(path, display)
    except ClinicError as e:
        res.reason = str(e).removeprefix(f"{display}: ")
        return res
    for k in knees:
        if k.view is not None and k.note.startswith(NOT_LOCATED):
            k.view, k.error = None, f"{k.note.split(';')[0]}; not graded"
    res.knees = grader.grade(knees, heatmaps=True, jsw_overlay=True)
    res.jsw_overlays = [r.pop("_jsw_overlay", None) for r in res.knees]  # the lines serve's page draws
    if not res.graded:
        res.reason = "; ".join(k.get("error", "") for k in res.knees) or "no knee found"
    res.film, res.film_scale = _film(knees, header)
    return res


def _film(knees, header) -> tuple[np.ndarray | None, float]:
    """The (area-reduced) film the clinic cropped the knees from, back in the film's orientation."""
    for k in knees:
        if k.source is None or k.view is None:
            continue
        img = k.source[0]
        if k.side == "L" and k.source[2] is None:  # a single left knee was mirrored before cropping
            img = img[:, ::-1]
        cols = int(header.get("Columns", 0) or img.shape[1])
        return np.ascontiguousarray(img), img.shape[1] / cols
    return None, 1.0


def derived_uid(*parts: str) -> str:
    """A UID determined by its inputs (pydicom's root + hash): rerunning the same model on the
    same study makes the same UIDs, so a store that is repeated is a duplicate, not a copy."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])
