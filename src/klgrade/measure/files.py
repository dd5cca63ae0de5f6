"""Measure the knees of an image file: DICOM (pixel spacing -> mm) or PNG/JPEG (relative units)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klgrade.measure.jsw import JSW, failed, measure_knee
from klgrade.measure.overlay import draw

TILE = 192  # overlay tile size (px) of the contact sheet


@dataclass
class KneeJSW:
    side: str  # 'R'/'L' of a bilateral film, else 'U'
    jsw: JSW
    overlay: np.ndarray | None = None  # RGB uint8 tile, canonical orientation, lines drawn


def read(path: str | Path, mm_per_px: float | None = None) -> tuple[np.ndarray, object, bool]:
    """(image, spacing, read inverted?): DICOM spacing from the header; other images
    ``mm_per_px`` (None = unknown), bone-dark ones inverted (klgrade.ingest.polarity). Raises
    ImageReadError/DicomError (naming the file) for an unreadable one."""
    from klgrade.ingest.images import is_dicom, read_image_stated

    stated = read_image_stated(path)
    return stated.pixels, stated.spacing if is_dicom(path) else mm_per_px, stated.inverted


def laterality_from_name(path: str | Path) -> str | None:
    """'R'/'L' from a file name ending in the knee's side (kneeKL224: ``9001695L.png``), else None."""
    last = Path(path).stem[-1:].upper()
    return last if last in ("R", "L") and Path(path).stem[-2:-1].isdigit() else None


def measure_image(img: np.ndarray, spacing=None, overlays: bool = False,
                  laterality: str | None = None) -> list[KneeJSW]:
    """Every knee of ``img``: both of a bilateral film (patient's right first), else the one.
    ``laterality``: 'R'/'L' of a single-knee image in film orientation (see ``measure_knee``)."""
    from klgrade.view.canonical import canonical_view, is_bilateral

    sides = ("R", "L") if is_bilateral(img) else (None,)
    out = []
    for side in sides:
        try:
            view, info = canonical_view(img, TILE, spacing_mm=spacing, side=side)
        except (ValueError, ArithmeticError) as e:  # degenerate images the view refuses
            out.append(KneeJSW(side or "U", failed(f"no knee view ({e})", "mm" if spacing else "%plateau")))
            continue
        jsw = measure_knee(img, spacing, side, info=info, laterality=None if side else laterality)
        out.append(KneeJSW(side or "U", jsw, draw(view, jsw, info) if overlays else None))
    return out
