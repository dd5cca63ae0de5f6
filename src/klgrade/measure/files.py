"""Measure the knees of an image file: in mm when it states its pixel spacing (DICOM, a `prepare oai`
crop) or one is given, else in relative units."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from klgrade.measure.jsw import JSW, failed, measure_knee
from klgrade.measure.overlay import draw
from klgrade.view.entrance import Knee, at_locate_scale, film_views, read_film, view_at

TILE = 192  # overlay tile size (px) of the contact sheet
# views this size are cut from the array JSW is measured on (view.entrance.at_locate_scale)
MEASURE_PX = TILE


def laterality_from_name(path: str | Path) -> str | None:
    """'R'/'L' from a file name ending in the knee's side (kneeKL224: ``9001695L.png``), else None."""
    last = Path(path).stem[-1:].upper()
    return last if last in ("R", "L") and Path(path).stem[-2:-1].isdigit() else None


def knees_from_file(path: str | Path, img_size: int, display: str | None = None, jsw: bool = True,
                    mm_per_px: float | None = None) -> tuple[str, list[Knee]]:
    """The knees of a file as klgrade.view.entrance.film_knees makes them (the views every command
    uses), each with its joint space width measured when ``jsw``: `klgrade measure`, predict and
    serve all measure here. ``mm_per_px``: the pixel size of a file that states none. The JSW is
    measured at one scale whatever the view size (the film reduced as prepare oai locates it), so
    every command gives a knee the same numbers. Raises ViewError naming the file."""
    name = display or str(path)
    film = read_film(path, display, mm_per_px)
    layout, knees = film_views(film, img_size, name)
    if jsw:
        # a large view is cut from finer pixels: measure on the locator's views of the same film
        on = knees if at_locate_scale(film, img_size) else film_views(film, MEASURE_PX, name)[1]
        named = laterality_from_name(name)
        for k, m in zip(knees, on):
            k.jsw, k.measured_on = jsw_of(m, named), m
    return layout, knees


def jsw_of(k: Knee, named: str | None = None) -> JSW:
    """The JSW of a knee film_knees made. Which side is medial: a bilateral film's half knows; a
    single knee of known side (DICOM laterality) is in the canonical orientation (a left one
    mirrored); a prepared crop says so by its stated joint (``measure_knee``); one of unknown side
    may say it in its file name (``named``, kneeKL224: film orientation); else the fibula decides."""
    img, spacing, view_side = k.source
    if not k.info.ok:  # (a knee of a bilateral film is not graded then either)
        return failed(f"joint not located: {k.info.reason}", "mm" if spacing else "%plateau")
    laterality = None if view_side else "R" if k.side in ("R", "L") else named
    return measure_knee(img, spacing, view_side, info=k.info, laterality=laterality)


def overlay(k: Knee, size: int = TILE, view: np.ndarray | None = None) -> np.ndarray:
    """RGB tile of the knee's view at ``size`` with its measured lines drawn (canonical orientation).
    ``view``: the measured knee's view at ``size`` when the caller has made it already."""
    m = k.measured_on or k
    return draw(view_at(m, size) if view is None else view, k.jsw, m.info)
