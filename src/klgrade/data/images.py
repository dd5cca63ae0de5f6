"""Reading knee images from disk and turning them into the model's square view.

``read_image`` is the one entry point for image files of any kind (8/16-bit PNG, JPEG, TIFF,
RGB-encoded grayscale, DICOM); ``square_view`` is the one place that makes the model's input view,
used by training, evaluation, embedding and predict alike.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


class ImageReadError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


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
    refused. DICOM goes through klgrade.data.dicom (LUTs, MONOCHROME1, spacing).
    """
    path = Path(path)
    if is_dicom(path):
        from klgrade.data.dicom import read_radiograph

        return read_radiograph(path).pixels
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
            mode = im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    return to_gray_float(arr, mode, path)


def to_gray_float(arr: np.ndarray, mode: str, path: str | Path = "<image>") -> np.ndarray:
    if arr.ndim == 3:
        if arr.shape[2] == 4:  # drop alpha
            arr = arr[..., :3]
        if arr.shape[2] == 3:
            a = arr.astype(np.int32)
            if np.abs(a[..., 0] - a[..., 1]).max() > 2 or np.abs(a[..., 1] - a[..., 2]).max() > 2:
                raise ImageReadError(f"{path}: colour image (channels differ); a radiograph must be grayscale")
            arr = arr[..., 0]
        elif arr.shape[2] == 2:  # LA
            arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageReadError(f"{path}: unsupported image shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype in (np.uint16, np.int32, np.int16, np.uint32) or mode.startswith("I"):
        a = arr.astype(np.float32)
        # 16-bit PNGs often use only 12 bits; scale by the bit depth that holds the data.
        top = float(a.max())
        depth = 16 if top > 4095 else 12 if top > 255 else 8
        out = a / float(2**depth - 1)
    elif arr.dtype == bool:
        out = arr.astype(np.float32)
    else:
        a = arr.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        out = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if min(out.shape) < 16:
        raise ImageReadError(f"{path}: image too small ({out.shape[1]}x{out.shape[0]} px)")
    return np.clip(out, 0.0, 1.0)


def square_view(img: np.ndarray, size: int, spacing_mm=None) -> np.ndarray:
    """The model's uint8 ``size`` x ``size`` view of a 2-D float image: the canonical view
    (klgrade.data.canonical: joint-centred square of a fixed anatomical field of view, standardised
    intensity). Use ``canonical_view`` directly to also get where the joint was found."""
    from klgrade.data.canonical import canonical_view

    return canonical_view(img, size, spacing_mm=spacing_mm)[0]


def load_view(path: str | Path, size: int) -> np.ndarray:
    """read_image + square_view: the uint8 ``size`` x ``size`` view the models consume (DICOM
    pixel spacing, when the file has one, sets the field of view in mm)."""
    spacing = None
    if is_dicom(path):
        from klgrade.data.dicom import read_radiograph

        rad = read_radiograph(path)
        img, spacing = rad.pixels, getattr(rad, "spacing_mm", None)
    else:
        img = read_image(path)
    return square_view(img, size, spacing_mm=spacing)
