"""The canonical view: one square crop of a fixed anatomical field of view centred on the knee joint.

Every image the models see (training, evaluation, embedding, predict) goes through
:func:`canonical_view`, so a knee framed, scaled or exposed differently by another site ends up
looking like the crops the model was trained on. Steps:

1. **Bilateral films** (two legs side by side, a dark gap between them) are split with
   ``klgrade.ingest.roi`` and one knee is taken (the patient's right by default; left knees are
   mirrored into the canonical orientation). The rest works on one knee.
2. **Joint line**: the joint space is a thin dark horizontal band with bright bone above (femoral
   condyles) and below (tibial plateau). A scale-normalised vertical second derivative of Gaussian
   at several widths, weighted by how much darker the band is than both of its flanks, is averaged
   along rows; the best row is the joint line.
3. **Scale and centre**: just below the line the tibial plateau (and just above, the condyles) are
   a bright bone band; its outer cortical edges are the strongest horizontal intensity steps. The
   edges give the joint centre (their midpoint) and the joint width. Adult knee widths vary far
   less than image framing does, so the field of view is a fixed multiple of this width. When a
   DICOM pixel spacing is given it sets the field of view in mm instead (``FOV_MM``).
4. **Crop** a square of that field of view around the centre with the joint line at
   ``JOINT_ROW`` of the height (parts beyond the image continue its edge), resample to ``size``.
5. **Intensity**: a robust percentile window, then (default ``intensity='match'``) a monotone
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
from scipy import ndimage

from klgrade.ingest.anatomy import KNEE_WIDTH_MM, TYPICAL_KNEE_WIDTH_MM

# Calibrated on kneeKL224 train (see module docstring): field of view = FOV_PER_WIDTH x the
# plateau width; joint line at JOINT_ROW of the view's height.
FOV_PER_WIDTH = 1.235
JOINT_ROW = 0.585
TYPICAL_WIDTH_MM = TYPICAL_KNEE_WIDTH_MM  # its old name here
FOV_MM = FOV_PER_WIDTH * TYPICAL_KNEE_WIDTH_MM  # the field of view when spacing is known
WORK_PX = 192  # long side of the working copy used for localisation
GAP_SIGMAS = (1.2, 1.8, 2.7, 4.0)  # joint-space widths tried (work px, Gaussian sigma)
MIN_GAP_SCORE = 0.004  # below: no joint-space-like band at all ...
# ... unless the band is faint but unmistakable: low-contrast films (and wide framings, where the
# joint is small) give scores down to ~0.001 with the line still 12-300x above the typical row.
MIN_FAINT_GAP_SCORE = 0.0006
MIN_FAINT_DOMINANCE = 12.0
MIN_DOMINANCE = 4.0  # the joint line must beat the typical row by this factor (knees: >14, noise: ~2)
MIN_EDGE = 0.06  # a bone edge must be at least this fraction of the bone/soft-tissue contrast
BORDER_FRAC = 0.03  # an edge this close to the frame may be the frame itself (a truncated knee)
WIDTH_RANGE = (0.25, 1.02)  # plausible plateau width as a fraction of the image width
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

    def as_dict(self) -> dict:
        d = asdict(self)
        d["centre"] = [float(v) for v in self.centre]
        return d


def _resize(img: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = shape_hw
    interp = cv2.INTER_AREA if h < img.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(img, np.float32), (w, h), interpolation=interp)


def _work(img: np.ndarray) -> tuple[np.ndarray, float]:
    h, w = img.shape
    f = WORK_PX / max(h, w)
    small = _resize(img, (max(8, round(h * f)), max(8, round(w * f))))
    lo, hi = np.percentile(small, (1, 99))
    return np.clip((small - lo) / max(hi - lo, 1e-6), 0, 1), f


@dataclass
class _Joint:
    x: float
    y: float
    width: float
    score: float
    reason: str = ""
    truncated: str = ""  # 'left', 'right', 'both' or ''


def _joint_line(g: np.ndarray) -> tuple[int, int, float, float, float]:
    """Best joint-line row on a work image: (row, column of the peak, sigma, score, dominance)."""
    h, w = g.shape
    best = (h // 2, w // 2, GAP_SIGMAS[0], 0.0, 0.0)
    for sig in GAP_SIGMAS:
        if 8 * sig > h / 2:
            break
        valley = ndimage.gaussian_filter(g, (sig, 0.7), order=(2, 0), mode="nearest")
        valley *= sig * sig
        near, far = int(round(2 * sig)), int(round(6 * sig))
        band = ndimage.uniform_filter1d(g, far - near + 1, axis=0, mode="nearest")
        sh = (far + near) // 2
        above = np.empty_like(band)
        below = np.empty_like(band)
        above[sh:], above[:sh] = band[:-sh], band[:1]
        below[:-sh], below[-sh:] = band[sh:], band[-1:]
        depth = np.minimum(above, below) - g  # darker than both flanks = a gap between bones
        score = np.clip(valley, 0, None) * np.clip(depth, 0, None)
        score[:sh] = 0
        score[h - sh:] = 0
        line = ndimage.uniform_filter1d(score, max(3, w // 4), axis=1, mode="constant")
        iy, ix = np.unravel_index(int(np.argmax(line)), line.shape)
        if line[iy, ix] > best[3]:  # only the best scale's dominance is returned: skip the others'
            best = (int(iy), int(ix), sig, float(line[iy, ix]), _dominance(line, iy, ix, sh, far))
    return best


def _dominance(line: np.ndarray, iy: int, ix: int, sh: int, far: int) -> float:
    """How far the joint line stands out from the typical row (noise or texture does not).
    Rows within the filter's reach of the line are its own tails, not competitors: in a short
    frame (a wide 1.85:1 crop) they would be most rows and hide a clear line."""
    h = line.shape[0]
    rows = line.max(axis=1)
    others = np.concatenate([rows[sh: max(sh, iy - far)], rows[min(h - sh, iy + far + 1): h - sh]])
    if len(others) < 8:
        others = rows[sh: h - sh]
    return float(line[iy, ix]) / max(float(np.percentile(others, 75)), 1e-9)


def _band_gradient(g: np.ndarray, r0: int, r1: int) -> tuple[np.ndarray, float]:
    """Horizontal intensity gradient of rows r0:r1 (averaged) and the band's bone/soft contrast:
    made once per band, searched for edges on both centring passes."""
    prof = ndimage.gaussian_filter1d(g[r0:r1].mean(axis=0), 1.0, mode="nearest")
    lo, hi = np.percentile(prof, (5, 95))
    return np.gradient(prof), max(float(hi - lo), 1e-3)


def _bone_edges(grad: np.ndarray, contrast: float, cx: float) -> tuple[float, float, float, float]:
    """Outer bone edges of a band (``_band_gradient``): (left x, right x, left strength, right
    strength), strengths relative to the band's bone/soft contrast."""
    c = int(np.clip(round(cx), 2, len(grad) - 3))
    left = int(np.argmax(grad[:c]))
    right = c + int(np.argmin(grad[c:]))
    # a step of the edge's size spread over ~3 px: strength ~ 3 * gradient / contrast
    return float(left), float(right), 3 * float(grad[left]) / contrast, -3 * float(grad[right]) / contrast


def locate_knee(img: np.ndarray) -> _Joint:
    """Joint centre and plateau width (input px) of one knee of unknown framing."""
    g, f = _work(np.asarray(img, np.float32))
    g = ndimage.gaussian_filter(g, 0.7, mode="nearest")
    h, w = g.shape
    iy, ix, sig, score, dom = _joint_line(g)
    if score < MIN_GAP_SCORE and not (score >= MIN_FAINT_GAP_SCORE and dom >= MIN_FAINT_DOMINANCE):
        return _Joint(w / 2 / f, h / 2 / f, float("nan"), score,
                      f"no joint-space-like band found (score {score:.4f} < {MIN_GAP_SCORE})")
    if dom < MIN_DOMINANCE:
        return _Joint(w / 2 / f, h / 2 / f, float("nan"), score,
                      f"no dominant joint line (it beats the typical row only {dom:.1f}x < {MIN_DOMINANCE})")
    d0, d1 = int(round(3 * sig)), max(int(round(3 * sig)) + 3, int(round(9 * sig)))
    bands = [(iy + d0, min(h, iy + d1)), (max(0, iy - d1), iy - d0)]  # plateau, condyles
    cx = w / 2
    edges = []
    profiles = [_band_gradient(g, a, b) for a, b in bands if b - a >= 2]
    for _ in range(2):  # the centre from the first pass splits the search for the second
        edges = [_bone_edges(grad, contrast, cx) for grad, contrast in profiles]
        if not edges:
            break
        lx = float(np.mean([e[0] for e in edges]))
        rx = float(np.mean([e[1] for e in edges]))
        cx = 0.5 * (lx + rx)
    if not edges:
        return _Joint(w / 2 / f, (iy + 0.5) / f - 0.5, float("nan"), score, "joint line too close to the frame")
    el, er, sl, sr = edges[0]  # the plateau band decides; the condyles only helped centring
    border = BORDER_FRAC * w
    cut_l = el <= border or sl < MIN_EDGE
    cut_r = er >= w - 1 - border or sr < MIN_EDGE
    truncated = "both" if cut_l and cut_r else "left" if cut_l else "right" if cut_r else ""
    if truncated:
        # The knee runs off the frame: centre on the intercondylar notch (the dip between the
        # condyles just above the line); the visible bone gives a lower bound on the width.
        lo = el if not cut_l else 0.0
        hi = er if not cut_r else w - 1.0
        notch = _notch(g, bands[1], lo, hi)
        half = max(notch - lo, hi - notch)
        width = max(2 * half, hi - lo)
        if truncated == "both":
            width = max(width, w - 1.0)
        x = notch
    else:
        width = er - el
        x = 0.5 * (el + er)
    reason = ""
    if not truncated and not (WIDTH_RANGE[0] * w <= width <= WIDTH_RANGE[1] * w):
        reason = f"plateau width {width / w:.2f} of the image is not a knee's"
    return _Joint(x=(x + 0.5) / f - 0.5, y=(iy + 0.5) / f - 0.5, width=width / f, score=score,
                  reason=reason, truncated=truncated)


def _notch(g: np.ndarray, band: tuple[int, int], lo: float, hi: float) -> float:
    """Column of the intercondylar notch: the darkest point of the condyle band in the middle
    40% of the visible bone [lo, hi]."""
    a, b = band
    if b - a < 2:
        return 0.5 * (lo + hi)
    prof = ndimage.gaussian_filter1d(g[a:b].mean(axis=0), 2.0, mode="nearest")
    i0, i1 = int(lo + 0.3 * (hi - lo)), int(math.ceil(hi - 0.3 * (hi - lo)))
    if i1 <= i0 + 1:
        return 0.5 * (lo + hi)
    return float(i0 + int(np.argmin(prof[i0:i1])))


def is_bilateral(img: np.ndarray) -> bool:
    """A film with two legs side by side: a dark column band between two bright ones."""
    h, w = img.shape
    if w < 1.1 * h:  # OAI films are ~2560 x 2000
        return False
    g, _ = _work(np.asarray(img, np.float32))
    gh, gw = g.shape
    col = ndimage.gaussian_filter1d(g[int(0.2 * gh): int(0.8 * gh)].mean(axis=0), max(1.0, gw / 60))
    left, right = col[int(0.05 * gw): int(0.45 * gw)].max(), col[int(0.55 * gw): int(0.95 * gw)].max()
    valley = col[int(0.35 * gw): int(0.65 * gw)].min()
    lo, spread = float(col.min()), max(float(col.max() - col.min()), 1e-6)
    # two bright legs and, between them, a gap nearly as dark as the darkest column (air)
    return bool(min(left, right) - valley > 0.5 * spread and valley - lo < 0.3 * spread)


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
    if s < 1.0:  # antialias before shrinking (sigma ~0.45 per decimation step)
        sig = 0.45 * (1.0 / s - 1.0)
        src = cv2.GaussianBlur(src, (0, 0), sig, borderType=cv2.BORDER_REPLICATE) if sig > 0.1 else src
    # output pixel j (centre) -> input x = x0 + (j + 0.5) / s - 0.5
    m = np.array([[1 / s, 0, x0 + 0.5 / s - 0.5], [0, 1 / s, y0 + 0.5 / s - 0.5]], np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    out = cv2.warpAffine(src, m, (size, size), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    ones = np.ones(img.shape, np.float32)
    inside = cv2.warpAffine(ones, m, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out, inside > 0.5


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
        q = np.percentile(vals, _REF_Q * 100)
        q = q + np.arange(len(q)) * 1e-6  # strictly increasing even for flat images
        out = _map_quantiles(view, q, _REF_V)
    elif intensity == "window":
        lo, hi = np.percentile(vals, (0.5, 99.5))
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
    """(cx, cy, fov_px, scale_source, ok, reason, width_px) for one knee."""
    h, w = img.shape
    j = locate_knee(img)
    if not j.reason and j.width < 0.6 * max(h, w):
        # The knee is small in a large frame: look again at a closer sub-image around it.
        side = 1.7 * FOV_PER_WIDTH * j.width
        x0 = int(max(0, round(j.x - side / 2)))
        y0 = int(max(0, round(j.y - side / 2)))
        sub = img[y0: int(round(j.y + side / 2)) + 1, x0: int(round(j.x + side / 2)) + 1]
        if min(sub.shape) >= 32:
            j2 = locate_knee(sub)
            if not j2.reason:
                j2.x += x0
                j2.y += y0
                j = j2
    if j.reason:
        return (w - 1) / 2, (h - 1) / 2, float(min(h, w)), "fallback", False, j.reason, float("nan")
    note = f"knee extends beyond the {j.truncated} edge(s) of the frame: its width is a lower bound" \
        if j.truncated else ""
    if spacing is not None:
        width_mm = j.width * spacing
        if not j.truncated and not KNEE_WIDTH_MM[0] <= width_mm <= KNEE_WIDTH_MM[1]:
            note = f"joint {width_mm:.0f} mm wide at {spacing} mm/px: spacing or localisation doubtful"
        return j.x, j.y, FOV_MM / spacing, "spacing", True, note, j.width
    return j.x, j.y, FOV_PER_WIDTH * j.width, "anatomy", True, note, j.width


def canonical_view(img: np.ndarray, size: int, spacing_mm=None, side: str | None = None,
                   intensity: str = "match", clahe: bool = False, bilateral: bool | None = None,
                   legs_cut: int | None = None) -> tuple[np.ndarray, ViewInfo]:
    """The model's input view of a knee image: (uint8 ``size`` x ``size``, :class:`ViewInfo`).

    ``img``: 2-D float [0,1] (klgrade.ingest.images.read_image), a bilateral film, a unilateral
    radiograph or an already-cropped joint of any framing/aspect. ``spacing_mm``: pixel spacing
    (mm/px) when known (DICOM); else the scale comes from the anatomy. ``side``: which knee of a
    bilateral film ('R' = patient's right = image left, the default; 'L' is mirrored into the
    canonical orientation). When the joint cannot be established the view is a centred square crop
    and ``ok`` is False with the reason. ``bilateral`` / ``legs_cut``: what the caller already knows
    of this very image (is_bilateral, split_legs), so a film's two views detect and split it once.
    """
    img = np.asarray(img, np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    spacing = _spacing(spacing_mm)
    if isinstance(spacing, tuple):
        sy, sx = spacing
        if not math.isclose(sy, sx, rel_tol=0.01):  # non-square pixels: resample rows to square ones
            img = _resize(img, (max(16, round(img.shape[0] * sy / sx)), img.shape[1]))
        spacing = sx
    h, w = img.shape
    if is_bilateral(img) if bilateral is None else bilateral:
        from klgrade.ingest.roi import split_legs

        side = (side or "R").upper()
        if side not in ("R", "L"):
            raise ValueError(f"side must be 'R' or 'L', got {side!r}")
        cut = split_legs(img, spacing) if legs_cut is None else legs_cut
        a, b = (0, cut) if side == "R" else (cut, w)
        part = img[:, a:b]
        if side == "L":
            part = part[:, ::-1]  # a left knee, mirrored: lateral side on the image left like a right one
        part = np.ascontiguousarray(part)  # copied once here, not again by each step that reads it
        cx, cy, fov, src, ok, reason, width = _unilateral(part, spacing)
        view, valid = _crop(part, cx, cy, fov, size)
        cx = a + (cx if side == "R" else part.shape[1] - 1 - cx)
        info = ViewInfo((float(cx), float(cy)), float(fov), src, ok, reason, float(width), side, side == "L")
        return standardise(view, valid, intensity, clahe), info
    cx, cy, fov, src, ok, reason, width = _unilateral(img, spacing)
    if ok:
        view, valid = _crop(img, cx, cy, fov, size)
    else:  # centred square crop, joint row not assumed
        s = min(h, w)
        view, valid = _crop(img, (w - 1) / 2, (h - 1) / 2 - (0.5 - JOINT_ROW) * s, float(s), size)
    return standardise(view, valid, intensity, clahe), ViewInfo((float(cx), float(cy)), float(fov), src, ok,
                                                                 reason, float(width))


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
