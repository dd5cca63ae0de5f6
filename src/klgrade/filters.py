"""scipy.ndimage's Gaussian filters on 2-D float images, computed by OpenCV, numpy's percentiles
of such images, computed faster, and the two resamplings the locator and the view share.

The locator and the JSW measurement filter small images (~200 x 150 and ~320 x 230 px) many times
per knee; there ``cv2.sepFilter2D`` is ~4x faster than ``ndimage.gaussian_filter`` with the same
kernels (radius 4 sigma) and borders, and agrees to ~1e-6 of the result's range (float32 sums).
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

_BORDERS = {"nearest": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT}


@functools.lru_cache(maxsize=64)
def gaussian_kernel(sigma: float, order: int = 0) -> np.ndarray:
    """The correlation kernel ``ndimage.gaussian_filter1d`` applies: a Gaussian of radius
    int(4 sigma + 0.5), or its first or second derivative. Cached (the locator asks for the same
    few many times per knee): read-only, do not modify it."""
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * x * x / (sigma * sigma))
    k /= k.sum()
    if order == 1:
        k = k * x / (sigma * sigma)  # correlating with +x/s^2 phi = convolving with phi'
    elif order == 2:
        k = k * (x * x / sigma ** 4 - 1 / sigma ** 2)
    elif order != 0:
        raise ValueError(f"derivative order {order} (0, 1 or 2)")
    k.setflags(write=False)
    return k


def gaussian_filter(img: np.ndarray, sigma_rows: float, sigma_cols: float, order_rows: int = 0,
                    mode: str = "nearest", rows: tuple[int, int] | None = None) -> np.ndarray:
    """``ndimage.gaussian_filter(img, (sigma_rows, sigma_cols), order=(order_rows, 0), mode=mode)``
    for a 2-D float32/float64 image, in its own float type. ``rows`` (lo, hi): only rows lo:hi are
    filtered, each to the very numbers the whole image's filter gives (the block filtered reaches a
    kernel radius beyond them, or the image's own border); the other rows are 0."""
    depth = cv2.CV_64F if img.dtype == np.float64 else cv2.CV_32F
    kx, ky = gaussian_kernel(sigma_cols), gaussian_kernel(sigma_rows, order_rows)
    if rows is None:
        return cv2.sepFilter2D(np.ascontiguousarray(img), depth, kx, ky, borderType=_BORDERS[mode])
    h = img.shape[0]
    lo, hi = max(0, rows[0]), min(h, rows[1])
    reach = len(ky) // 2
    a, b = max(0, lo - reach), min(h, hi + reach)
    out = np.zeros(img.shape, img.dtype)  # calloc: rows never written are never touched
    if hi > lo:
        block = cv2.sepFilter2D(np.ascontiguousarray(img[a:b]), depth, kx, ky, borderType=_BORDERS[mode])
        out[lo:hi] = block[lo - a: hi - a]
    return out


def percentile(values: np.ndarray, q):
    """``np.percentile(values, q)``, the very same numbers, ~2-3x faster on the 10^4-10^5 pixels of
    a view or a locator's work image: numpy's SIMD sort plus a selection on sorted data beat its
    introselect, the more so the more quantiles are asked (a percentile is a function of the
    sorted values alone)."""
    return np.percentile(np.sort(values, axis=None), q)


def median(values: np.ndarray) -> float:
    """``np.median(values)`` (the same number), on sorted data as ``percentile``."""
    return float(np.median(np.sort(values, axis=None)))


def resize_image(img: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """float32 copy of ``img`` at ``shape_hw`` (rows, cols): area-averaged when shrinking, bilinear
    when growing."""
    h, w = shape_hw
    interp = cv2.INTER_AREA if h < img.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(img, np.float32), (w, h), interpolation=interp)


def area_reduce(img: np.ndarray, factor: int, factor_x: int | None = None) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (rows x columns: ``factor`` x ``factor_x`` when
    given; OpenCV's area resize, a partial last block is cut)."""
    fy, fx = factor, factor if factor_x is None else factor_x
    if fy < 2 and fx < 2:
        return img
    h, w = img.shape[0] // fy, img.shape[1] // fx
    # OpenCV reads a row-strided view as it is: no copy of the part it keeps
    return cv2.resize(np.asarray(img, np.float32)[: h * fy, : w * fx], (w, h), interpolation=cv2.INTER_AREA)
