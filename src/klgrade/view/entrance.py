"""The one entrance to the model's input: a file -> the canonical view of each knee in it.

Training, evaluation, embedding (through the decode cache), predict, serve, export and robustness
all make views here, so one file gives one view whichever command reads it::

    layout, knees = film_knees("film.dcm", 224)        # 'bilateral' -> [right knee, left knee]
    view = load_view("film.dcm", 224, side="L")         # the same left-knee view, for the cache

A file is read once (DICOM through klgrade.ingest.dicom, with its pixel spacing and laterality),
a film much finer than the view is area-reduced first (``reduce_for_view``), a bilateral film
(klgrade.ingest.roi.bilateral_cut) is split once and each knee viewed; anything else is one
knee, a left one (DICOM laterality) mirrored into the canonical orientation. The image-level
function is ``make_view`` (klgrade.view.canonical.canonical_view); a change to what it returns
bumps klgrade.view.cache.CACHE_VERSION.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from klgrade.ingest.roi import bilateral_cut
from klgrade.view.canonical import FOV_MM, ViewInfo, canonical_view, recut_view

SIDE_NAMES = {"R": "right", "L": "left", "U": "unknown"}
# A film is area-reduced before cropping while it stays this much finer than the views (see
# reduce_for_view).
VIEW_OVERSAMPLE = 1.2


class ViewError(ValueError):
    """A file that cannot be made into a view; the message names the file and the reason."""


@dataclass
class Knee:
    """One knee ready for the model: ``view`` uint8 (S, S) in canonical orientation."""

    side: str  # "R", "L" or "U" (unknown: a PNG/JPEG crop, or a DICOM without laterality)
    view: np.ndarray | None
    flipped: bool = False  # mirrored into the canonical orientation (a left knee)
    location: dict | None = None  # joint centre in the source image (px), how the scale was set
    note: str = ""  # e.g. the joint was not found and a centred crop was graded
    error: str = ""  # a knee of a bilateral film that could not be located is reported, not guessed
    source: tuple | None = field(default=None, repr=False)  # (image, spacing, side) to redraw it larger or measure it
    info: ViewInfo | None = field(default=None, repr=False)  # how the view was made
    jsw: object = None  # klgrade.measure.JSW, when the caller measured it
    measured_on: Knee | None = field(default=None, repr=False)  # the knee ``jsw``'s points refer to


def make_view(image: np.ndarray, size: int, spacing_mm=None, side: str | None = None,
              **known) -> tuple[np.ndarray, ViewInfo]:
    """The model's uint8 ``size`` x ``size`` view of a 2-D float image and how it was made."""
    return canonical_view(image, size, spacing_mm=spacing_mm, side=side, **known)


def view_at(knee: Knee, size: int) -> np.ndarray:
    """The knee's view at ``size`` px: its own when it is that size, else cut again from its source
    on the joint its view was framed on (``recut_view``: the view at that size, not located again)."""
    if knee.view is not None and knee.view.shape[0] == size:
        return knee.view
    img, spacing, _ = knee.source
    return recut_view(img, size, knee.info, spacing)


def square_view(img: np.ndarray, size: int, spacing_mm=None) -> np.ndarray:
    """``make_view`` without its ViewInfo."""
    return make_view(img, size, spacing_mm=spacing_mm)[0]


class Film(NamedTuple):
    pixels: np.ndarray  # 2-D float [0, 1]
    spacing: object  # mm/px (float or (row, col)) or None
    laterality: str  # 'R', 'L' or ''
    joint: tuple[float, float] | None = None  # the joint centre a prepared crop states (px)
    inverted: bool = False  # stored with bone dark (no polarity stated): read inverted


def read_film(path: str | Path, display: str | None = None, mm_per_px: float | None = None) -> Film:
    """An image file's pixels, spacing, laterality and stated joint (see ``Film``); ViewError
    naming ``display`` (default: the path) when it cannot be read. ``mm_per_px``: the pixel size
    of a file that states none (a spacing the file states wins)."""
    film = _read_film(path, display)
    return film._replace(spacing=float(mm_per_px)) if film.spacing is None and mm_per_px is not None else film


def _read_film(path: str | Path, display: str | None) -> Film:
    from klgrade.ingest.dicom import DicomError, radiograph_from_dataset, read_dataset
    from klgrade.ingest.images import ImageReadError, is_dicom, read_image_stated

    path = Path(path)
    name = display or str(path)
    if not path.is_file():
        raise ViewError(f"{name}: no such file")
    try:
        if is_dicom(path):
            ds = read_dataset(path)
            rad = radiograph_from_dataset(ds, name)
            # Laterality is technical (which knee), not identifying; nothing else is read.
            lat = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")).strip().upper()
            return Film(rad.pixels, rad.spacing_mm, lat if lat in ("R", "L") else "")
        stated = read_image_stated(path)  # a prepared crop states spacing and joint
        return Film(stated.pixels, stated.spacing, "", stated.joint, stated.inverted)
    except (DicomError, ImageReadError) as e:
        raise ViewError(_rename(str(e), path, name)) from e
    except (OSError, ValueError) as e:
        raise ViewError(f"{name}: cannot read ({type(e).__name__}: {_rename(str(e), path, name)})") from e


def film_knees(path: str | Path, size: int, display: str | None = None,
               sides: tuple[str, ...] = ("R", "L"), mm_per_px: float | None = None) -> tuple[str, list[Knee]]:
    """Read an image file and make the view of each knee in it: (layout, knees).

    A bilateral film gives the knees of ``sides`` (default: right, then left); anything else one
    knee, whose side comes from the DICOM's (Image)Laterality when present. ``mm_per_px``: see
    ``read_film``. Raises ViewError naming ``display`` (default: the path).
    """
    return film_views(read_film(path, display, mm_per_px), size, display or str(path), sides)


def film_views(film: Film, size: int, name: str, sides: tuple[str, ...] = ("R", "L")) -> tuple[str, list[Knee]]:
    """``film_knees`` of a film already read (``name``: the file, for the ViewError)."""
    import cv2

    try:
        layout, knees = _film_views(film, size, sides)
    except (ValueError, ArithmeticError, IndexError, cv2.error) as e:  # degenerate images (flat, tiny)
        raise ViewError(f"{name}: cannot make a knee view ({type(e).__name__}: {e})") from e
    if film.inverted:
        from klgrade.ingest.polarity import NOTE

        for k in knees:
            k.note = "; ".join(filter(None, [k.note, NOTE]))  # after the view's own: pacs reads how it starts
    return layout, knees


def at_locate_scale(film: Film, size: int) -> bool:
    """Are the ``size`` views of ``film`` cut from the array prepare oai locates (the film reduced
    by locate_factor)? False when a large view needs finer pixels."""
    from klgrade.ingest.roi import locate_factor

    shape = film.pixels.shape
    return view_factor(shape, film.spacing, size) == locate_factor(film.spacing, shape)


def _film_views(film: Film, size: int, sides: tuple[str, ...]) -> tuple[str, list[Knee]]:
    img, spacing, laterality, joint, _ = film
    img, spacing, factor = reduce_for_view(img, spacing, size)
    if joint is not None:  # stated in the file's pixels: in the reduced image's
        joint = ((joint[0] + 0.5) / factor - 0.5, (joint[1] + 0.5) / factor - 0.5)
    cut = bilateral_cut(img, spacing)
    if cut is not None:
        # One knee after the other: in two threads the many small NumPy calls contend for the
        # GIL, which cost ~4 ms more CPU a film than it saved in wall time (~1 ms).
        return "bilateral", [_knee(img, spacing, side, size, factor, cut) for side in sides]
    side = laterality or "U"
    if side == "L":  # a single left knee: mirrored into the canonical (right-knee) orientation
        img = np.ascontiguousarray(img[:, ::-1])
    return "unilateral", [_knee(img, spacing, side, size, factor, joint=joint)]


def view_file(path: str | Path, size: int, side: str | None = None) -> tuple[np.ndarray, ViewInfo]:
    """The view of one knee of a file and how it was made. ``side`` ('R'/'L', e.g. a manifest's
    ``side`` column) picks the knee of a bilateral film (default: the patient's right, as
    canonical_view); other files have one knee and ignore it."""
    side = str(side or "").strip().upper()
    _, knees = film_knees(path, size, sides=(side if side in ("R", "L") else "R",))
    knee = knees[0]
    if knee.view is None:
        raise ViewError(f"{path}: {knee.error}")
    return knee.view, knee.info


def load_view(path: str | Path, size: int, side: str | None = None) -> np.ndarray:
    """The uint8 ``size`` x ``size`` view the models consume (see ``view_file``)."""
    return view_file(path, size, side)[0]


def view_factor(shape: tuple[int, int], spacing, img_size: int) -> int:
    """The area-reduction factor ``reduce_for_view`` applies to a film of ``shape`` (1: none)."""
    from klgrade.ingest.roi import locate_factor

    if spacing is None:
        return 1
    sy, sx = (float(spacing), float(spacing)) if np.isscalar(spacing) else (float(spacing[0]), float(spacing[1]))
    factor = min(locate_factor((sy, sx), shape), int(FOV_MM / img_size / (VIEW_OVERSAMPLE * max(sy, sx))))
    return factor if factor >= 2 else 1


def reduce_for_view(img: np.ndarray, spacing, img_size: int) -> tuple[np.ndarray, object, int]:
    """Area-average a film that is much finer than the views made from it: (image, spacing, factor).

    An OAI film has 0.14 mm pixels; a 224-px view of the canonical ~94 mm field has 0.42 mm ones,
    so locating and cropping at full resolution costs more than the model's forward pass, for
    nothing. The factor is ingest's ``locate_factor`` (so the view locates the very array prepare
    oai located), lowered when a large view needs finer pixels (``VIEW_OVERSAMPLE`` x finer than
    the view's). Films without spacing are left alone.
    """
    from klgrade.filters import area_reduce

    factor = view_factor(img.shape, spacing, img_size)
    if factor < 2:
        return img, spacing, 1
    sy, sx = (float(spacing), float(spacing)) if np.isscalar(spacing) else (float(spacing[0]), float(spacing[1]))
    return area_reduce(img, factor), (sy * factor, sx * factor), factor


def _rename(msg: str, path: Path, name: str) -> str:
    return msg.replace(str(path), name) if name != str(path) else msg


def _knee(img: np.ndarray, spacing, side: str, size: int, factor: int = 1, cut: int | None = None,
          joint: tuple[float, float] | None = None) -> Knee:
    """The view of one knee of ``img`` (reduced ``factor`` x from the film: the reported centre is
    in the film's own pixels); ``cut``: where a bilateral film splits (None: not bilateral);
    ``joint``: a centre the file states (a prepared crop), used instead of locating it again."""
    bilateral = cut is not None
    view_side = side if bilateral else None
    view, info = make_view(img, size, spacing_mm=spacing, side=view_side, bilateral=bilateral, legs_cut=cut,
                           joint=joint)
    cx, cy = info.centre
    if not bilateral and side == "L":  # report the centre in the film's own coordinates
        cx = img.shape[1] - 1 - cx
    cx, cy = (cx + 0.5) * factor - 0.5, (cy + 0.5) * factor - 0.5
    loc = {"x": round(float(cx), 1), "y": round(float(cy), 1), "scale": info.scale_source}
    flipped = info.flipped if bilateral else side == "L"
    if not info.ok and bilateral:  # half a film cropped at random is not a knee: refuse rather than guess
        return Knee(side=side, view=None, location=loc, flipped=flipped, info=info, source=(img, spacing, view_side),
                    error=f"{SIDE_NAMES[side]} knee not located: {info.reason}")
    note = info.reason if info.ok else f"joint not located ({info.reason}); graded a centred crop of the image"
    return Knee(side=side, view=view, flipped=flipped, location=loc, source=(img, spacing, view_side),
                note=note, info=info)
