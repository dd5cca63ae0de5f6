"""Reading image files: ``read_image`` is the one entry point for files of any kind (8/16-bit PNG,
JPEG, TIFF, RGB-encoded grayscale, DICOM via klgrade.ingest.dicom), with one size rule for all.
The model's view of a file is made in klgrade.view.entrance."""
from __future__ import annotations

import os
from pathlib import Path
from struct import error as struct_error
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
# Smallest usable side, for every format alike: below it no joint can be located or cropped.
MIN_SIDE = 16
# Pixel budget: a radiograph is at most ~5k x 5k (25 MP); a header declaring more is refused
# before decoding, since a 69-byte PNG can declare gigapixels. KLGRADE_MAX_PIXELS overrides it.
DEFAULT_MAX_PIXELS = 50_000_000
# Modes handed on as they are; any other (palette, CMYK, YCbCr, ...) is converted to RGB first.
_DIRECT_MODES = {"1", "L", "LA", "I", "F", "RGB", "RGBA"}


class ImageReadError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


# PNG text chunks in which prepare oai records a crop's pixel spacing (mm/px) and the joint centre
# (x,y px) the locator found on the film: the view frames the crop on them instead of locating
# the joint again on a different array (evaluate's view of a crop = predict's view of its film).
SPACING_KEY = "klgrade:pixel_spacing_mm"
JOINT_KEY = "klgrade:joint_xy_px"


def max_pixels() -> int:
    """The pixel budget (rows x columns) of one image: KLGRADE_MAX_PIXELS or DEFAULT_MAX_PIXELS."""
    raw = os.environ.get("KLGRADE_MAX_PIXELS", "").strip()
    try:
        return int(float(raw)) if raw else DEFAULT_MAX_PIXELS
    except ValueError:
        return DEFAULT_MAX_PIXELS


def size_problem(width: int, height: int) -> str | None:
    """Why a ``width`` x ``height`` image cannot be used (too small, over the pixel budget), or None.
    The one size rule for PNG/JPEG/TIFF and DICOM, checked on the header before any decoding."""
    if min(width, height) < MIN_SIDE:
        return f"image too small ({width}x{height} px; at least {MIN_SIDE} px a side)"
    budget = max_pixels()
    if width * height > budget:
        return (f"image too large ({width}x{height} px = {width * height / 1e6:.0f} MP; the pixel budget is "
                f"{budget / 1e6:g} MP, set KLGRADE_MAX_PIXELS to change it)")
    return None


def is_dicom(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as a 2-D float32 array in [0, 1] (grayscale, full bit depth kept).

    RGB files are accepted when the channels are equal (grayscale stored as RGB); real colour is
    refused. DICOM goes through klgrade.ingest.dicom (LUTs, MONOCHROME1, spacing); other files
    stored with bone dark are inverted (``read_image_stated``).
    """
    return read_image_stated(path)[0]


class StatedImage(NamedTuple):
    pixels: np.ndarray  # 2-D float32 [0, 1], bone bright
    spacing: float | None  # mm/px when the file states it
    joint: tuple[float, float] | None  # the joint centre a prepared crop states (px)
    inverted: bool = False  # stored with bone dark and no polarity stated: read inverted


def read_image_stated(path: str | Path) -> StatedImage:
    """``read_image``, the pixel spacing in mm when the file states one (a DICOM's, or a prepared
    crop's ``SPACING_KEY``) and the joint centre a prepared crop states (``JOINT_KEY``); else None.
    A file without a stated polarity (not DICOM) whose bone is dark is read inverted
    (klgrade.ingest.polarity) and says so."""
    path = Path(path)
    if is_dicom(path):
        from klgrade.ingest.dicom import read_radiograph

        rad = read_radiograph(path)
        return StatedImage(rad.pixels, rad.spacing_mm, None)
    try:
        with Image.open(path) as im:
            problem = size_problem(*im.size)  # from the header: nothing decoded yet
            if problem:
                raise ImageReadError(f"{path}: {problem}")
            if im.mode not in _DIRECT_MODES and not im.mode.startswith("I;16"):
                im = im.convert("RGBA" if im.mode in ("PA", "RGBa", "La") else "RGB")
            spacing, joint = _stated_geometry(im, path)
            im.load()
            arr = np.asarray(im)
            mode = im.mode
    except Image.DecompressionBombError as e:  # PIL's own guard, far above our budget
        raise ImageReadError(f"{path}: image too large ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError,
            IndexError, TypeError, struct_error) as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    from klgrade.ingest.polarity import stored_inverted

    pixels = to_gray_float(arr, mode, path)
    inverted = stored_inverted(pixels)
    if inverted:
        np.subtract(1.0, pixels, out=pixels)
    return StatedImage(pixels, spacing, joint, inverted)


def _stated_geometry(im: Image.Image, path: Path) -> tuple[float | None, tuple[float, float] | None]:
    """The ``SPACING_KEY`` (mm/px) and ``JOINT_KEY`` (x,y px inside the image) text chunks,
    validated; None where absent. A joint is only taken with a spacing (prepare oai writes both)."""
    text = getattr(im, "text", None) or {}
    if SPACING_KEY not in text:
        return None, None

    def numbers(key: str, n: int) -> list[float]:
        try:
            values = [float(v) for v in str(text[key]).split(",")]
        except (TypeError, ValueError):
            values = []
        return values if len(values) == n and all(np.isfinite(values)) else []

    spacing = numbers(SPACING_KEY, 1)
    if not spacing or not 0.005 <= spacing[0] <= 5.0:
        raise ImageReadError(f"{path}: its {SPACING_KEY!r} text ({text[SPACING_KEY]!r}) is not a pixel "
                             "spacing in mm (0.005-5)")
    if JOINT_KEY not in text:
        return spacing[0], None
    joint = numbers(JOINT_KEY, 2)
    if not joint or not (0 <= joint[0] < im.size[0] and 0 <= joint[1] < im.size[1]):
        raise ImageReadError(f"{path}: its {JOINT_KEY!r} text ({text[JOINT_KEY]!r}) is not a point "
                             f"inside the {im.size[0]}x{im.size[1]} image")
    return spacing[0], (joint[0], joint[1])


def to_gray_float(arr: np.ndarray, mode: str, path: str | Path = "<image>") -> np.ndarray:
    if arr.ndim == 3:
        if arr.shape[2] == 4:  # drop alpha
            arr = arr[..., :3]
        if arr.shape[2] == 3:
            if not _channels_equal(arr):
                raise ImageReadError(f"{path}: colour image (channels differ); a radiograph must be grayscale")
            arr = arr[..., 0]
        elif arr.shape[2] == 2:  # LA
            arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageReadError(f"{path}: unsupported image shape {arr.shape}")
    # In place from here on: a 50 MP image costs one float32 copy (200 MB), not four.
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32)
        out /= 255.0
    elif arr.dtype in (np.uint16, np.int32, np.int16, np.uint32) or mode.startswith("I"):
        out = arr.astype(np.float32)
        # 16-bit PNGs often use only 12 bits; scale by the bit depth that holds the data.
        top = float(out.max())
        depth = 16 if top > 4095 else 12 if top > 255 else 8
        out /= float(2**depth - 1)
    elif arr.dtype == bool:
        out = arr.astype(np.float32)
    else:
        a = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        out = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    problem = size_problem(out.shape[1], out.shape[0])
    if problem:
        raise ImageReadError(f"{path}: {problem}")
    return np.clip(out, 0.0, 1.0, out=out)


def _channels_equal(arr: np.ndarray, tol: int = 2, rows: int = 256) -> bool:
    """Whether R, G and B differ by at most ``tol`` everywhere (grey stored as RGB), a block of rows
    at a time so a large image needs no int32 copy of all three channels."""
    for y in range(0, arr.shape[0], rows):
        b = arr[y:y + rows].astype(np.int32)
        if np.abs(b[..., 0] - b[..., 1]).max() > tol or np.abs(b[..., 1] - b[..., 2]).max() > tol:
            return False
    return True
