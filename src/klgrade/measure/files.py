"""Measure the knees of an image file: in mm when it states its pixel spacing (DICOM, a `prepare oai`
crop) or one is given, else in relative units."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from klgrade.measure.jsw import JSW, failed, measure_knee
from klgrade.measure.overlay import draw

TILE = 192  # overlay tile size (px) of the contact sheet


@dataclass
class KneeJSW:
    side: str  # 'R'/'L' of a bilateral film, else 'U'
    jsw: JSW
    overlay: np.ndarray | None = None  # RGB uint8 tile, canonical orientation, lines drawn


class MeasuredFile(NamedTuple):
    pixels: np.ndarray
    spacing: object  # mm/px: the file's own (a DICOM's, a prepared crop's), else --mm-per-px, else None
    inverted: bool  # bone-dark and read inverted (klgrade.ingest.polarity)
    joint: tuple[float, float] | None  # the joint centre a prepared crop states (canonical orientation)


def read(path: str | Path, mm_per_px: float | None = None) -> MeasuredFile:
    """An image file to measure. The spacing a file states (DICOM header, a `prepare oai` crop's
    text chunk) wins over ``mm_per_px``, which gives the scale of files that state none. Raises
    ImageReadError/DicomError (naming the file) for an unreadable one."""
    from klgrade.ingest.images import read_image_stated

    stated = read_image_stated(path)
    spacing = stated.spacing if stated.spacing is not None else mm_per_px
    return MeasuredFile(stated.pixels, spacing, stated.inverted, stated.joint)


def laterality_from_name(path: str | Path) -> str | None:
    """'R'/'L' from a file name ending in the knee's side (kneeKL224: ``9001695L.png``), else None."""
    last = Path(path).stem[-1:].upper()
    return last if last in ("R", "L") and Path(path).stem[-2:-1].isdigit() else None


def measure_image(img: np.ndarray, spacing=None, overlays: bool = False,
                  laterality: str | None = None, joint: tuple[float, float] | None = None) -> list[KneeJSW]:
    """Every knee of ``img``: both of a bilateral film (patient's right first), else the one.
    ``laterality``: 'R'/'L' of a single-knee image in film orientation (see ``measure_knee``);
    ``joint``: the centre a prepared crop states, which frames its view as it frames predict's."""
    from klgrade.view.canonical import canonical_view, is_bilateral

    sides = ("R", "L") if is_bilateral(img) else (None,)
    out = []
    for side in sides:
        try:
            view, info = canonical_view(img, TILE, spacing_mm=spacing, side=side, joint=joint)
        except (ValueError, ArithmeticError) as e:  # degenerate images the view refuses
            out.append(KneeJSW(side or "U", failed(f"no knee view ({e})", "mm" if spacing else "%plateau")))
            continue
        jsw = measure_knee(img, spacing, side, info=info, laterality=None if side else laterality)
        out.append(KneeJSW(side or "U", jsw, draw(view, jsw, info) if overlays else None))
    return out
