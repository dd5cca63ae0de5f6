"""The canonical view: one square crop of a fixed anatomical field of view centred on the knee joint.

Every image the models see (training, evaluation, embedding, predict) goes through
:func:`canonical_view`, so a knee framed, scaled or exposed differently by another site ends up
looking like the crops the model was trained on. Steps:

1. **Locate** the knee with the one locator, ``klgrade.ingest.roi`` (prepare oai cuts its crops
   with it too): a bilateral film is split and one knee taken (the patient's right by default;
   left knees are mirrored into the canonical orientation); the joint line is the dominant thin
   dark band between bright bone, and the outer edges of the plateau and condyles give the joint
   centre and the plateau width.
2. **Scale**: adult knee widths vary far less than image framing does, so the field of view is a
   fixed multiple of the plateau width. When a DICOM pixel spacing is given it sets the field of
   view in mm instead (``FOV_MM``).
3. **Crop** a square of that field of view around the centre with the joint line at
   ``JOINT_ROW`` of the height (parts beyond the image continue its edge), resample to ``size``.
4. **Intensity**: a robust percentile window, then (default ``intensity='match'``) a monotone
   remapping of the crop's histogram onto a fixed reference, which removes gamma/contrast curves
   and bit-depth differences; optional CLAHE.

The constants are calibrated so that the view is a near no-op on kneeKL224 crops (OAI-derived,
224 px, already centred): there the plateau spans ~0.81 of the width and the joint line sits at
~0.585 of the height. When the joint or its edges cannot be found the view says so
(``ViewInfo.ok=False`` and a reason) and falls back to a centred square crop -- never a silent guess.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from klgrade.filters import percentile, resize_image
from klgrade.ingest.anatomy import TYPICAL_KNEE_WIDTH_MM
from klgrade.ingest.roi import bilateral_cut, is_bilateral, leg_half, locate_joint, split_legs

__all__ = ["FOV_MM", "FOV_PER_WIDTH", "JOINT_ROW", "STATS_BOX", "ViewInfo", "canonical_view", "is_bilateral",
           "standardise"]

# Calibrated on kneeKL224 train (see module docstring): field of view = FOV_PER_WIDTH x the
# plateau width; joint line at JOINT_ROW of the view's height.
FOV_PER_WIDTH = 1.235
JOINT_ROW = 0.585
TYPICAL_WIDTH_MM = TYPICAL_KNEE_WIDTH_MM  # its old name here
FOV_MM = FOV_PER_WIDTH * TYPICAL_KNEE_WIDTH_MM  # the field of view when spacing is known
# Intensity statistics come from this joint-centred box of the view (x0, x1, y0, y1 as fractions of
# its side), not from the whole frame: every framing in the robustness table (30% tighter, 15%
# off-centre, 1.85:1 or 1:1.4) still holds it, so a knee gets the same grey levels however a site
# framed it. Whole-frame statistics darkened a 30%-tighter frame's joint by ~23/255 and raised its
# predicted grades (docs/robustness.md).
STATS_BOX = (0.2, 0.8, 0.25, 0.85)
MIN_BOX_VALID = 0.5  # below this fraction of the box inside the image, fall back to all valid pixels
# Reference quantile function for intensity='match': mean quantiles (at _REF_Q) of the STATS_BOX of
# 300 canonical views of kneeKL224 train, each windowed on its whole frame as before
# (reference_quantiles()). Values beyond the box's range are extrapolated, so soft tissue outside
# the box keeps its contrast instead of being clipped.
_REF_Q = np.concatenate([[0.005], np.linspace(0.05, 0.95, 19), [0.995]])
_REF_V = np.array([0.466, 0.559, 0.605, 0.639, 0.662, 0.681, 0.697, 0.713, 0.729, 0.745, 0.762, 0.779, 0.797,
                   0.814, 0.832, 0.85, 0.869, 0.891, 0.914, 0.943, 0.991])


@dataclass
class ViewInfo:
    """How a canonical view was made, in the input image's pixel coordinates.

    ``centre``: (x, y) of the joint centre; ``fov_px``: side of the square crop (input px);
    ``scale_source``: 'spacing' (DICOM pixel spacing), 'anatomy' (plateau width) or 'fallback'
    (the frame itself); ``ok``: False when the joint could not be established (``reason`` says why).
    """

    centre: tuple[float, float]
    fov_px: float
    scale_source: str
    ok: bool
    reason: str = ""
    width_px: float = float("nan")
    side: str = ""  # 'R'/'L' when taken from a bilateral film
    flipped: bool = False
    # framed on the joint and spacing a prepared crop states (not located: width_px is unknown); such
    # crops are in the canonical orientation (a left knee mirrored), so the medial side is known
    joint_stated: bool = False
    legs_cut: int | None = None  # a bilateral film's knee: the column its legs were split at

    def as_dict(self) -> dict:
        d = asdict(self)
        d["centre"] = [float(v) for v in self.centre]
        return d


def _spacing(spacing_mm) -> float | tuple[float, float] | None:
    if spacing_mm is None:
        return None
    if isinstance(spacing_mm, int | float):
        return float(spacing_mm)
    sy, sx = spacing_mm
    return float(sy), float(sx)


def _crop(img: np.ndarray, cx: float, cy: float, fov: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square of side ``fov`` with (cx, cy) at (0.5, JOINT_ROW) of it, resampled to ``size``;
    beyond the image the edge continues. Also returns the mask of pixels inside the image."""
    import cv2

    s = size / fov  # output px per input px
    x0 = cx - 0.5 * fov
    y0 = cy - JOINT_ROW * fov
    src = np.ascontiguousarray(img, np.float32)
    # output pixel j (centre) -> input x = x0 + (j + 0.5) / s - 0.5
    m = np.array([[1 / s, 0, x0 + 0.5 / s - 0.5], [0, 1 / s, y0 + 0.5 / s - 0.5]], np.float64)
    if s < 1.0:  # antialias before shrinking (sigma ~0.45 per decimation step)
        sig = 0.45 * (1.0 / s - 1.0)
        src = _blur_read_part(src, sig, m, size) if sig > 0.1 else src
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    out = cv2.warpAffine(src, m, (size, size), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    (xa, xb), (ya, yb) = _read_span(m, size)
    h, w = img.shape
    if xa >= 0 and ya >= 0 and xb <= w and yb <= h:  # every pixel read lies in the image
        return out, np.ones((size, size), bool)
    ones = np.ones(img.shape, np.float32)
    inside = cv2.warpAffine(ones, m, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out, inside > 0.5


def _read_span(m: np.ndarray, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Columns [xa, xb) and rows [ya, yb) of the input that the axis-aligned warp ``m`` to
    ``size`` x ``size`` reads, one pixel wider on each side than its bilinear taps reach."""
    lo = m[:, 2] - 1.0
    hi = m[:, 2] + m[:, 0:2].sum(axis=1) * (size - 1) + 1.0
    return ((int(np.floor(lo[0])), int(np.ceil(hi[0])) + 1),
            (int(np.floor(lo[1])), int(np.ceil(hi[1])) + 1))


def _blur_read_part(src: np.ndarray, sigma: float, m: np.ndarray, size: int) -> np.ndarray:
    """``src`` Gaussian-blurred (replicated border) where the warp by ``m`` to ``size`` reads it:
    a film's leg is ~4x the crop, and blurring all of it cost more than the rest of the view. The
    part is blurred with the kernel's reach plus two pixels around it, so every pixel read is
    the very number a whole-image blur gives (where it meets the image's edge, the same replicated
    border); pixels never read stay 0."""
    import cv2

    h, w = src.shape
    reach = int(round(sigma * 8 + 1)) // 2 + 2  # OpenCV's float kernel radius (ksize = 8 sigma + 1, odd) + 2
    (xa, xb), (ya, yb) = _read_span(m, size)
    xa, xb, ya, yb = max(0, xa - reach), min(w, xb + reach), max(0, ya - reach), min(h, yb + reach)
    if xb - xa < 2 or yb - ya < 2 or (xb - xa) * (yb - ya) > 0.7 * h * w:  # mostly outside, or most of it
        return cv2.GaussianBlur(src, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    out = np.zeros(src.shape, src.dtype)  # calloc: pages never written are never touched
    out[ya:yb, xa:xb] = cv2.GaussianBlur(np.ascontiguousarray(src[ya:yb, xa:xb]), (0, 0), sigma,
                                         borderType=cv2.BORDER_REPLICATE)
    return out


def _stats_mask(shape: tuple[int, int], valid: np.ndarray | None) -> np.ndarray | None:
    """Pixels the intensity statistics use: STATS_BOX inside the image, else all valid pixels."""
    h, w = shape
    x0, x1, y0, y1 = STATS_BOX
    box = np.zeros(shape, bool)
    box[int(round(y0 * h)):int(round(y1 * h)), int(round(x0 * w)):int(round(x1 * w))] = True
    if valid is not None:
        inside = box & valid
        if inside.sum() < MIN_BOX_VALID * box.sum():
            return valid if valid.sum() > 64 else None
        return inside
    return box


def _map_quantiles(view: np.ndarray, q: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Monotone map sending quantiles ``q`` to ``ref``, linear beyond both ends (with the overall
    slope, so a flat end segment cannot blow up) instead of clamping."""
    out = np.interp(view, q, ref)
    slope = (ref[-1] - ref[0]) / max(q[-1] - q[0], 1e-6)
    lo, hi = view < q[0], view > q[-1]
    out[lo] = ref[0] + (view[lo] - q[0]) * slope
    out[hi] = ref[-1] + (view[hi] - q[-1]) * slope
    return out


def standardise(view: np.ndarray, valid: np.ndarray | None = None, intensity: str = "match",
                clahe: bool = False) -> np.ndarray:
    """Float view -> uint8. ``'match'`` (default): a monotone map of the quantiles of the view's
    joint-centred STATS_BOX onto the reference (undoes gamma/contrast curves and bit depth);
    ``'window'``: the box's 0.5-99.5 percentile window; ``'none'``: as is. ``valid``: pixels inside
    the image (the continued edge beyond it never enters the statistics)."""
    mask = _stats_mask(view.shape, valid)
    vals = view[mask] if mask is not None else view.ravel()
    if intensity == "match":
        q = percentile(vals, _REF_Q * 100)
        q = q + np.arange(len(q)) * 1e-6  # strictly increasing even for flat images
        out = _map_quantiles(view, q, _REF_V)
    elif intensity == "window":
        lo, hi = percentile(vals, (0.5, 99.5))
        out = (view - lo) / max(hi - lo, 1e-6)
    elif intensity == "none":
        out = view
    else:
        raise ValueError(f"intensity must be match, window or none, got {intensity!r}")
    u8 = np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if clahe:
        import cv2

        u8 = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(u8)
    return u8


def _unilateral(img: np.ndarray, spacing: float | None) -> tuple[float, float, float, str, bool, str, float]:
    """(cx, cy, fov_px, scale_source, ok, reason, width_px) for one knee, located by the one
    locator (klgrade.ingest.roi.locate_joint) that prepare oai also cuts its crops with."""
    h, w = img.shape
    loc = locate_joint(img, spacing)
    if not loc.ok:
        return (w - 1) / 2, (h - 1) / 2, float(min(h, w)), "fallback", False, loc.reason, float("nan")
    if spacing is not None:
        return loc.x, loc.y, FOV_MM / spacing, "spacing", True, loc.note, loc.width_px
    return loc.x, loc.y, FOV_PER_WIDTH * loc.width_px, "anatomy", True, loc.note, loc.width_px


def canonical_view(img: np.ndarray, size: int, spacing_mm=None, side: str | None = None,
                   intensity: str = "match", clahe: bool = False, bilateral: bool | None = None,
                   legs_cut: int | None = None, joint: tuple[float, float] | None = None) -> tuple[np.ndarray, ViewInfo]:
    """The model's input view of a knee image: (uint8 ``size`` x ``size``, :class:`ViewInfo`).

    ``img``: 2-D float [0,1] (klgrade.ingest.images.read_image), a bilateral film, a unilateral
    radiograph or an already-cropped joint of any framing/aspect. ``spacing_mm``: pixel spacing
    (mm/px) when known (DICOM); else the scale comes from the anatomy. ``side``: which knee of a
    bilateral film ('R' = patient's right = image left, the default; 'L' is mirrored into the
    canonical orientation). When the joint cannot be established the view is a centred square crop
    and ``ok`` is False with the reason. ``bilateral`` / ``legs_cut``: what the caller already knows
    of this very image (bilateral_cut), so a film's two views detect and split it once.
    ``joint``: the (x, y) centre of a one-knee image with a spacing, already located (a crop
    prepare oai cut around the joint it found): the view is framed on it, not located again.
    """
    img, spacing = _square_pixels(img, spacing_mm)
    h, w = img.shape
    if bilateral is None:
        legs_cut = bilateral_cut(img, spacing)
        bilateral = legs_cut is not None
    if bilateral:
        side = (side or "R").upper()
        if side not in ("R", "L"):
            raise ValueError(f"side must be 'R' or 'L', got {side!r}")
        cut = split_legs(img, spacing) if legs_cut is None else legs_cut
        part, a = leg_half(img, side, cut)
        cx, cy, fov, src, ok, reason, width = _unilateral(part, spacing)
        view, valid = _crop(part, cx, cy, fov, size)
        cx = a + (cx if side == "R" else part.shape[1] - 1 - cx)
        info = ViewInfo((float(cx), float(cy)), float(fov), src, ok, reason, float(width), side, side == "L",
                        legs_cut=int(cut))
        return standardise(view, valid, intensity, clahe), info
    if joint is not None and spacing is not None:
        cx, cy, fov, src, ok, reason, width = *joint, FOV_MM / spacing, "spacing", True, "", float("nan")
    else:
        cx, cy, fov, src, ok, reason, width = _unilateral(img, spacing)
    view, valid = _crop(img, cx, cy, fov, size) if ok else _centred_crop(img, size)
    return standardise(view, valid, intensity, clahe), ViewInfo((float(cx), float(cy)), float(fov), src, ok,
                                                                 reason, float(width),
                                                                 joint_stated=joint is not None and spacing is not None)


def _square_pixels(img, spacing_mm) -> tuple[np.ndarray, float | None]:
    """The 2-D float32 image with square pixels (rows resampled when they are not) and its spacing."""
    img = np.asarray(img, np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    spacing = _spacing(spacing_mm)
    if isinstance(spacing, tuple):
        sy, sx = spacing
        if not math.isclose(sy, sx, rel_tol=0.01):  # non-square pixels: resample rows to square ones
            img = resize_image(img, (max(16, round(img.shape[0] * sy / sx)), img.shape[1]))
        spacing = sx
    return img, spacing


def _centred_crop(img: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A joint that could not be established: the centred square crop, joint row not assumed."""
    h, w = img.shape
    s = min(h, w)
    return _crop(img, (w - 1) / 2, (h - 1) / 2 - (0.5 - JOINT_ROW) * s, float(s), size)


def recut_view(img: np.ndarray, size: int, info: ViewInfo, spacing_mm=None, intensity: str = "match",
               clahe: bool = False) -> np.ndarray:
    """The view ``info`` describes, cut again at another ``size`` from the same image (a display
    crop, an overlay): framed on the joint already located, which does not depend on the size, so it
    is ``canonical_view``'s view at that size without locating the knee again."""
    img, _ = _square_pixels(img, spacing_mm)
    cx, cy = info.centre
    if info.legs_cut is not None:  # a bilateral film's knee: its leg, as canonical_view cut it
        part, a = leg_half(img, info.side, info.legs_cut)
        cx = cx - a if info.side == "R" else part.shape[1] - 1 - (cx - a)
        view, valid = _crop(part, cx, cy, info.fov_px, size)
    elif info.ok:
        view, valid = _crop(img, cx, cy, info.fov_px, size)
    else:
        view, valid = _centred_crop(img, size)
    return standardise(view, valid, intensity, clahe)


def reference_quantiles(views: np.ndarray, valids: np.ndarray | None = None) -> np.ndarray:
    """How ``_REF_V`` was made: the mean quantile function (at ``_REF_Q``) of the STATS_BOX of
    float views, each windowed (0.5-99.5 percentiles) on its whole valid frame."""
    qs = []
    for i, v in enumerate(views):
        v = np.asarray(v, np.float32)
        valid = None if valids is None else valids[i]
        vals = v[valid] if valid is not None and valid.sum() > 64 else v.ravel()
        lo, hi = np.percentile(vals, (0.5, 99.5))
        w = (v - lo) / max(hi - lo, 1e-6)
        mask = _stats_mask(v.shape, valid)
        qs.append(np.clip(np.percentile(w[mask], _REF_Q * 100), 0, 1))
    return np.mean(qs, axis=0)
