"""The knee locator: ingest (prepare oai) and the model's view (klgrade.view.canonical) share it.

Classical, no learned weights; it relies on what every PA knee radiograph shows (bone bright):

1. **Bilateral films** (two legs side by side): the darkest smoothed column between the legs
   splits the film (image left = patient's right knee); left knees are mirrored into the right
   knee's orientation before they are located, as the view shows them.
2. **Joint line**: the joint space is a thin dark horizontal band with bright bone above (femoral
   condyles) and below (tibial plateau). A scale-normalised vertical second derivative of Gaussian
   at several widths, weighted by how much darker the band is than both of its flanks, is averaged
   along rows on a ~``WORK_PX``-px copy; the best row is the joint line, and it must stand out
   from the typical row (``dominance``) or the knee is reported as not located, never guessed.
3. **Centre and width**: just below the line the tibial plateau (and just above, the condyles)
   are a bright bone band whose outer cortical edges are the strongest horizontal intensity
   steps; their midpoint is the joint centre and the plateau's edges its width.
4. **A closer look**: a knee small in its frame (a film) is located again on a sub-image a few
   plateau widths wide around the first estimate (``CLOSER_LOOK_MM``).

``locate_joint`` takes one knee of any framing (spacing optional), ``locate_bilateral`` a
bilateral film (prepare oai), and ``klgrade.view.canonical`` frames its views on the same
``locate_joint``. Both entrances locate a film reduced to about ``LOCATE_MM`` by the same integer
factor (``locate_factor``), so prepare oai and predict find the same centre on the same film; a
crop prepare oai writes states that centre and its spacing (klgrade.ingest.images.JOINT_KEY),
and its view is framed on them rather than located again.
The square crop around a located joint is klgrade.ingest.crop.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage

from klgrade.filters import area_reduce, gaussian_filter, median, percentile, resize_image
from klgrade.ingest.anatomy import KNEE_WIDTH_MM, TYPICAL_KNEE_WIDTH_MM

WORK_MM = 1.0  # working pixel size for splitting a bilateral film (mm)
# A film finer than this (mm/px) is area-reduced by an integer factor before it is located, by
# ingest and by the view alike, so both locate the same array whatever the view size (OAI's
# 0.14 mm films: factor 2, as a 224-px view reduced them before).
LOCATE_MM = 0.3
WORK_PX = 192  # long side of the working copy used for localisation
MAX_GAP_SHARE = 0.4  # the dark gap between a bilateral film's legs spans at most this share of its width
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
# The closer look's sub-image side in plateau widths. With a known spacing the first estimate's
# width is trusted: 1.6 widths, centred on both bone bands, puts films' knees within 5 mm at
# 0.1-0.4 mm/px, where 2.1 widths centred on the plateau alone missed 3-13% by 5-9 mm
# (tests/test_roi.py). Without a spacing (PNG crops) the width itself may be wrong and the wider
# look stays; kneeKL224 crops (knee >= 0.6 of the frame) rarely take either, so their views are
# unchanged.
CLOSER_LOOK_MM = 1.6
CLOSER_LOOK_BLIND = 1.7 * 1.235  # = 2.1; written as before so the product, and the views, are bit-equal
SMALL_IN_FRAME = 0.6  # a knee narrower than this fraction of its frame's long side gets the closer look
# JointLocation.confidence = 1 - MIN_DOMINANCE / dominance: 0 where the joint line just beats the
# typical row by MIN_DOMINANCE, 0.5 at twice that (knees: dominance > 14, noise ~2).
MIN_CONFIDENCE = 0.5


def _spacing_pair(spacing_mm) -> tuple[float, float] | None:
    if spacing_mm is None:
        return None
    if isinstance(spacing_mm, int | float):
        return float(spacing_mm), float(spacing_mm)
    sy, sx = spacing_mm
    return float(sy), float(sx)


def _flat_margins(small: np.ndarray, rel: float = 0.02, lo_hi=None) -> tuple[int, int, int, int]:
    """Flat rows/columns at the film's edges (collimation borders, white in MONOCHROME2, or masked
    black): (top, bottom, left, right) counts; bright ones would pass for bone and set the contrast
    scale. ``lo_hi``: the image's 1st and 99th percentiles, if known (else from every other pixel)."""
    lo, hi = percentile(small[::2, ::2], (1, 99)) if lo_hi is None else lo_hi
    tol = rel * max(float(hi - lo), 1e-6)

    def run(lines: np.ndarray) -> int:  # flat lines from the first one inward
        if lines[0].std() >= tol:  # most films: no band at this edge, no need to look further
            return 0
        nz = np.flatnonzero(lines.std(axis=1) >= tol)
        return int(nz[0]) if len(nz) else len(lines)

    return run(small), run(small[::-1]), run(small.T), run(small.T[::-1])


def _work_image(img: np.ndarray, sy: float, sx: float, work_mm: float):
    fy, fx = max(1, int(round(work_mm / sy))), max(1, int(round(work_mm / sx)))
    small = area_reduce(img, fy, fx)
    h, w = small.shape
    t, b, left, r = _flat_margins(small)
    trimmed = (t or b or left or r) and t + b < h - 4 and left + r < w - 4
    inner = small[t: h - b, left: w - r] if trimmed else small
    lo, dark, hi = percentile(inner[:: 2, :: 2], (0.5, 1, 99.5))
    small = np.clip((small - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if trimmed:
        # collimation borders become "air" (the film's 1st percentile), which the joint search ignores
        fill = float(np.clip((dark - lo) / max(hi - lo, 1e-6), 0.0, 1.0))
        small[:t], small[h - b:], small[:, :left], small[:, w - r:] = fill, fill, fill, fill
    return small, fy, fx, sy * fy, sx * fx


def _to_input(v: float, f: int) -> float:
    """Work-image coordinate → input coordinate (pixel centres at integers)."""
    return (v + 0.5) * f - 0.5


class LocalisationError(ValueError):
    """A knee joint that could not be located with confidence (see ``JointLocation.require``)."""


@dataclass
class JointLocation:
    """A located joint in the input image's pixel coordinates.

    ``x``, ``y``: joint centre (px, column and row; pixel centres at integers).
    ``confidence``: 0-1 from the joint line's dominance; ``ok`` is False when the joint was not
    found, below ``min_confidence`` or not knee-sized (``reason`` says which). ``width_px``: the
    tibial plateau's width (px; a lower bound when ``truncated``), ``spacing_mm``: mm/px used; when
    the caller gave none it is estimated from ``width_px`` and a typical knee width. ``note``: a
    caveat that does not stop the view (a truncated knee, a doubtful spacing).
    """

    x: float
    y: float
    confidence: float
    ok: bool
    width_px: float = float("nan")
    spacing_mm: float | None = None
    spacing_estimated: bool = False
    dominance: float = 0.0
    truncated: str = ""
    reason: str = ""
    note: str = ""

    def require(self, where: str = "image") -> JointLocation:
        """Return self, or raise LocalisationError naming ``where`` and the reason."""
        if not self.ok:
            raise LocalisationError(f"{where}: knee joint not located ({self.reason})")
        return self

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def _work(img: np.ndarray, film: bool = False) -> tuple[np.ndarray, float]:
    """The ~WORK_PX-px working copy, contrast-normalised on percentiles, and its scale. On a
    ``film`` (a pixel spacing is known) it is float32 and bright flat edge bands (collimation,
    white in MONOCHROME2) are overwritten by the image's own edge, so their borders pass neither
    for bone nor for a joint line; crops keep float64 and no band search (views bit-equal)."""
    h, w = img.shape
    f = WORK_PX / max(h, w)
    small = resize_image(img, (max(8, round(h * f)), max(8, round(w * f))))
    lo, hi = percentile(small, (1, 99))
    bands = _bright_flat_bands(small, (lo, hi)) if film else (0, 0, 0, 0)
    t, b, left, r = bands
    if any(bands):
        inner = small[t: small.shape[0] - b, left: small.shape[1] - r]
        lo, hi = percentile(inner, (1, 99))
        small = np.pad(inner, ((t, b), (left, r)), mode="edge")  # no step where the band was
    if film:  # Python floats keep the image float32 (NEP 50: numpy's float64 scalars promote it)
        lo, hi = float(lo), float(hi)
    return np.clip((small - lo) / max(hi - lo, 1e-6), 0, 1), f


def _bright_flat_bands(small: np.ndarray, lo_hi) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) widths of flat bands brighter than the image's median, each one
    row/column wider (the band's border is half band, half image after the resize); zeros when
    they would leave too little. ``lo_hi``: the image's 1st and 99th percentiles."""
    sh, sw = small.shape
    flat = _flat_margins(small, lo_hi=lo_hi)
    if not any(flat):  # most films: no band, and no median to compute
        return 0, 0, 0, 0
    med = median(small)
    slices = (np.s_[:flat[0]], np.s_[sh - flat[1]:], np.s_[:, :flat[2]], np.s_[:, sw - flat[3]:])
    t, b, left, r = (m + 1 if m and float(small[sl].mean()) > med else 0 for m, sl in zip(flat, slices))
    return (t, b, left, r) if t + b < sh - 4 and left + r < sw - 4 else (0, 0, 0, 0)


@dataclass
class _Joint:
    x: float
    y: float
    width: float
    score: float
    reason: str = ""
    truncated: str = ""  # 'left', 'right', 'both' or ''
    dominance: float = 0.0


def _joint_line(g: np.ndarray) -> tuple[int, int, float, float, float]:
    """Best joint-line row on a work image: (row, column of the peak, sigma, score, dominance)."""
    h, w = g.shape
    best, best_line = (h // 2, w // 2, GAP_SIGMAS[0], 0.0, 0.0), None
    for sig in GAP_SIGMAS:
        if 8 * sig > h / 2:
            break
        valley = gaussian_filter(g, sig, 0.7, order_rows=2)
        valley *= sig * sig
        near, far = int(round(2 * sig)), int(round(6 * sig))
        band = cv2.blur(g, (1, far - near + 1), borderType=cv2.BORDER_REPLICATE)  # a running mean down the columns
        sh = (far + near) // 2
        # darker than both flanks (the running means sh rows above and below) = a gap between
        # bones; rows within sh of the frame have no flank and score 0
        score = np.zeros_like(g)
        inner = score[sh: h - sh]
        np.subtract(np.minimum(band[: h - 2 * sh], band[2 * sh:]), g[sh: h - sh], out=inner)
        np.maximum(inner, 0, out=inner)
        inner *= np.maximum(valley[sh: h - sh], 0)
        line = cv2.blur(score, (max(3, w // 4), 1), borderType=cv2.BORDER_CONSTANT)  # along the rows, zero outside
        iy, ix = np.unravel_index(int(np.argmax(line)), line.shape)
        if line[iy, ix] > best[3]:
            best, best_line = (int(iy), int(ix), sig, float(line[iy, ix]), 0.0), (line, sh, far)
    if best_line is not None:  # only the best scale's dominance is returned: computed for it alone
        line, sh, far = best_line
        best = (*best[:4], _dominance(line, best[0], best[1], sh, far))
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


def _band_gradients(g: np.ndarray, bands: list[tuple[int, int]]) -> list[tuple[np.ndarray, float]]:
    """Per band of rows r0:r1 (2+ rows): the horizontal gradient of its mean row and its bone/soft
    contrast, made once (both bands per filter call) for both centring passes."""
    bands = [(a, b) for a, b in bands if b - a >= 2]
    if not bands:
        return []
    prof = ndimage.gaussian_filter1d(np.stack([g[a:b].mean(axis=0) for a, b in bands]), 1.0, axis=1,
                                     mode="nearest")
    lo, hi = np.percentile(prof, (5, 95), axis=1)
    grads = np.gradient(prof, axis=1)
    return [(grads[i], max(float(hi[i] - lo[i]), 1e-3)) for i in range(len(bands))]


def _bone_edges(grad: np.ndarray, contrast: float, cx: float) -> tuple[float, float, float, float]:
    """Outer bone edges of a band (``_band_gradients``): (left x, right x, left strength, right
    strength), strengths relative to the band's bone/soft contrast."""
    c = int(np.clip(round(cx), 2, len(grad) - 3))
    left = int(np.argmax(grad[:c]))
    right = c + int(np.argmin(grad[c:]))
    # a step of the edge's size spread over ~3 px: strength ~ 3 * gradient / contrast
    return float(left), float(right), 3 * float(grad[left]) / contrast, -3 * float(grad[right]) / contrast


def locate_knee(img: np.ndarray, centre_on_both_bands: bool = False, film: bool = False) -> _Joint:
    """Joint centre and plateau width (input px) of one knee of unknown framing. The centre is the
    plateau's midpoint, or (``centre_on_both_bands``: the closer look) the mean of the plateau's
    and the condyles' midpoints, which an osteophyte on one band moves half as far. ``film``: see
    ``_work``."""
    g, f = _work(np.asarray(img, np.float32), film)
    g = gaussian_filter(g, 0.7, 0.7)
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
    profiles = _band_gradients(g, bands)
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
        x = cx if centre_on_both_bands else 0.5 * (el + er)
    reason = ""
    # a film's knee may be a small part of its frame: there locate_joint checks the width in mm
    if not truncated and not film and not (WIDTH_RANGE[0] * w <= width <= WIDTH_RANGE[1] * w):
        reason = f"plateau width {width / w:.2f} of the image is not a knee's"
    return _Joint(x=(x + 0.5) / f - 0.5, y=(iy + 0.5) / f - 0.5, width=width / f, score=score,
                  reason=reason, truncated=truncated, dominance=dom)


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
    i = int(0.35 * gw) + int(np.argmin(col[int(0.35 * gw): int(0.65 * gw)]))
    valley = col[i]
    lo, spread = float(col.min()), max(float(col.max() - col.min()), 1e-6)
    # two bright legs and, between them, a gap nearly as dark as the darkest column (air) ...
    if not (min(left, right) - valley > 0.5 * spread and valley - lo < 0.3 * spread):
        return False
    # ... and narrower than a knee: a wide crop of one knee in inverted grey levels (a dark knee
    # between bright margins) has the same profile, with the "gap" spanning most of the frame
    runs, _ = ndimage.label(col < 0.5 * (valley + min(left, right)))
    return int(np.count_nonzero(runs == runs[i])) <= MAX_GAP_SHARE * gw


def bilateral_cut(img: np.ndarray, spacing_mm=None) -> int | None:
    """The column that splits a bilateral film's legs (``split_legs``), or None (``is_bilateral``)."""
    img = _as_2d(img)
    return split_legs(img, spacing_mm) if is_bilateral(img) else None


def _closer_look(img: np.ndarray, j: _Joint, spacing_known: bool) -> _Joint:
    """``j`` again on a sub-image a few plateau widths wide around it (a knee small in a large
    frame is located coarsely on the whole frame's work copy); see CLOSER_LOOK_MM."""
    side = (CLOSER_LOOK_MM if spacing_known else CLOSER_LOOK_BLIND) * j.width
    x0 = int(max(0, round(j.x - side / 2)))
    y0 = int(max(0, round(j.y - side / 2)))
    sub = img[y0: int(round(j.y + side / 2)) + 1, x0: int(round(j.x + side / 2)) + 1]
    if min(sub.shape) < 32:
        return j
    j2 = locate_knee(sub, centre_on_both_bands=spacing_known, film=spacing_known)
    if j2.reason:
        return j
    j2.x += x0
    j2.y += y0
    return j2


def locate_joint(img: np.ndarray, spacing_mm=None, min_confidence: float = 0.0,
                 require_knee_width: bool = False) -> JointLocation:
    """Locate the joint of one knee (bone bright, right-knee orientation, any framing).

    ``spacing_mm`` (float or (row, col) mm/px, square pixels assumed as the view does): with it a
    joint that is not knee-sized is noted (``note``), or not located with ``require_knee_width``
    (prepare oai: a crop of fixed size in mm around it would not hold a knee); without it the
    spacing is estimated from the plateau width. ``min_confidence``: below it the knee is not
    located (the view takes any joint line that stands out; prepare oai asks for ``MIN_CONFIDENCE``).
    """
    img = _as_2d(img)
    h, w = img.shape
    pair = _spacing_pair(spacing_mm)
    j = locate_knee(img, film=pair is not None)
    # With a spacing every knee takes the closer look, however it is framed: a film and the crop
    # prepare oai cuts from it are then centred by the same steps.
    if not j.reason and (pair is not None or j.width < SMALL_IN_FRAME * max(h, w)):
        j = _closer_look(img, j, pair is not None)
    conf = float(np.clip(1.0 - MIN_DOMINANCE / j.dominance, 0.0, 1.0)) if j.dominance > 0 else 0.0
    reason = j.reason or (f"low confidence {conf:.2f} < {min_confidence:.2f} (joint line {j.dominance:.1f}x "
                          f"the typical row)" if conf < min_confidence else "")
    note = f"knee extends beyond the {j.truncated} edge(s) of the frame: its width is a lower bound" \
        if j.truncated else ""
    spacing, estimated = (float(np.mean(pair)) if pair else None), pair is None
    if pair is None and not reason and math.isfinite(j.width) and j.width > 0:
        spacing = TYPICAL_KNEE_WIDTH_MM / j.width
    elif pair is not None and not reason and not j.truncated:
        width_mm = j.width * pair[1]
        if not KNEE_WIDTH_MM[0] <= width_mm <= KNEE_WIDTH_MM[1]:
            if require_knee_width:
                reason = f"joint {width_mm:.0f} mm wide, not a knee ({KNEE_WIDTH_MM[0]:.0f}-{KNEE_WIDTH_MM[1]:.0f} mm)"
            else:
                note = f"joint {width_mm:.0f} mm wide at {spacing_mm} mm/px: spacing or localisation doubtful"
    return JointLocation(x=float(j.x), y=float(j.y), confidence=conf, ok=not reason, width_px=float(j.width),
                         spacing_mm=spacing, spacing_estimated=estimated and spacing is not None,
                         dominance=float(j.dominance), truncated=j.truncated, reason=reason, note=note)


def leg_half(img: np.ndarray, side: str, cut: int) -> tuple[np.ndarray, int]:
    """One leg of a bilateral film split at column ``cut``, in the right knee's orientation (a left
    leg mirrored), contiguous, and the film column where it starts."""
    a, b = (0, cut) if side == "R" else (cut, img.shape[1])
    part = img[:, a:b] if side == "R" else img[:, a:b][:, ::-1]
    return np.ascontiguousarray(part), a  # copied once here, not again by each step that reads it


def locate_factor(spacing_mm, shape: tuple[int, int]) -> int:
    """Integer area-reduction factor that brings a film to about ``LOCATE_MM`` (1: none; also
    without a spacing, and never below the smallest usable image, images.MIN_SIDE px)."""
    from klgrade.ingest.images import MIN_SIDE

    pair = _spacing_pair(spacing_mm)
    if pair is None:
        return 1
    return max(1, min(int(LOCATE_MM / max(pair)), min(shape[:2]) // MIN_SIDE))


def locate_bilateral(img: np.ndarray, spacing_mm=None,
                     min_confidence: float = MIN_CONFIDENCE) -> dict[str, JointLocation]:
    """Both joints of a bilateral PA film: {'R': ..., 'L': ...} in the film's pixels, each located
    as the view locates it (reduced by ``locate_factor``, then ``leg_half`` + ``locate_joint``).
    With a spacing, a joint that is not knee-sized is not located: a crop of fixed size in mm
    around it would not hold a knee."""
    img = _as_2d(img)
    f = locate_factor(spacing_mm, img.shape)
    pair = _spacing_pair(spacing_mm)
    img, spacing_mm = area_reduce(img, f), (None if pair is None else (pair[0] * f, pair[1] * f))
    cut = split_legs(img, spacing_mm)
    out = {}
    for side in ("R", "L"):
        part, a = leg_half(img, side, cut)
        if part.shape[1] < 16:
            out[side] = JointLocation(x=float("nan"), y=float("nan"), confidence=0.0, ok=False,
                                      reason="no room for a knee on this side of the film")
            continue
        loc = locate_joint(part, spacing_mm, min_confidence, require_knee_width=pair is not None)
        loc.x = _to_input(a + (loc.x if side == "R" else part.shape[1] - 1 - loc.x), f)
        loc.y, loc.width_px = _to_input(loc.y, f), loc.width_px * f
        loc.spacing_mm = None if pair is None else float(np.mean(pair))
        out[side] = loc
    return out


def _split_work(small: np.ndarray, wx: float) -> int:
    """Work column separating the two legs: the darkest smoothed column in the middle 40% of the
    film (between the legs there is only air or thin soft tissue)."""
    col = ndimage.gaussian_filter1d(small.mean(axis=0), max(1.0, 8.0 / wx), mode="nearest")
    w = len(col)
    lo, hi = int(0.3 * w), int(0.7 * w)
    return lo + int(np.argmin(col[lo:hi]))


def split_legs(img: np.ndarray, spacing_mm=None, work_mm: float = WORK_MM) -> int:
    """Input column that separates the two legs of a bilateral film."""
    img = _as_2d(img)
    pair = _spacing_pair(spacing_mm) or (0.15, 0.15)
    small, fy, fx, wy, wx = _work_image(img, pair[0], pair[1], work_mm)
    return int(round(_to_input(_split_work(small, wx), fx)))


def _as_2d(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    if img.dtype != np.float32:
        img = img.astype(np.float32)
    return img
