"""Minimum joint space width (JSW) per compartment, from a radiograph and its joint geometry.

The knee locator (``klgrade.ingest.roi``, through the canonical view) gives the joint centre,
the joint line and the tibial plateau width. Around them a region of interest is resampled so the plateau
spans ``WORK_W`` px; there, per compartment:

1. the joint space is the darkest connected path across the compartment (a minimum-cost path,
   ``skimage.graph.MCP``, one row up or down per column);
2. the femoral condyle margin is the strongest bright-to-dark step (vertical Gaussian derivative)
   above that path, the tibial plateau margin the plateau's floor below it (the farthest strong
   dark-to-bright step, see TIBIA_FLOOR), refined to sub-pixel and median-filtered along the
   compartment;
3. JSW(x) = tibial - femoral margin (vertical), the minimum over the compartment and the mean
   over its central band. With a pixel spacing the values are in mm; without, in percent of the
   plateau width (``unit``), which compares knees of any framing.

Compartments span ``COMPARTMENT`` (fractions of the plateau width from the centre: the tibial
spines and the marginal osteophytes are left out). Which side is medial: on a bilateral film
the lateral side is each knee's outer side; a single knee whose patient side is known (``laterality``,
e.g. the L/R of a kneeKL224 file name; such crops keep the film's orientation) has its medial side
toward the film's midline; otherwise it is oriented by its fibular head, which is lateral, a bright
blob beside the tibia below the plateau; when that is not clear, the canonical orientation (lateral
on the image left) is assumed and the note says so. Nothing here raises on a bad image: a
measurement that cannot be made carries ``ok=False`` and a reason; a collapsed compartment is 0
with ``flag='bone_on_bone'``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from klgrade.filters import gaussian_filter, percentile

WORK_W = 320  # plateau width in work px (~0.24 mm/px for a 76 mm plateau)
MIN_PLATEAU_PX = 80  # below: too few pixels across the joint to measure a 1-2 mm gap
# |x - centre| / plateau width measured per compartment. (0.1, 0.4) tracked KL grade slightly better
# on kneeKL224 train (rho -0.302 vs -0.295) but reaches the tibial spines: synthetic error 1.2 mm.
COMPARTMENT = (0.2, 0.45)
CENTRAL_BAND = (0.22, 0.32)  # where the mean JSW is taken
ROI_Y = (-0.22, 0.5)  # rows of the region of interest around the joint line (plateau widths)
# the joint space path stays within this many plateau widths of the joint line: at 0.12 the path
# of a compartment whose columns leave the bone (a plateau width overestimated by the locator)
# ran along the window's edge, and its missing margins were read as bone on bone (3-4% of KL0-2
# on kneeKL224 train; 1-1.5% at 0.08)
SEARCH = 0.08
EDGE_REACH = 0.10  # margins are looked for this far from the path (plateau widths)
# The tibial margin is the plateau's floor: below the path, the farthest local step at least this
# share of the column's strongest. A tilted beam projects the plateau's rim as a second, fainter
# line nearer the condyle; taking the strongest step per column switched between the two along a
# compartment and read healthy knees as narrow (kneeKL224 train, 2,000 crops: KL0's log-spread of
# the medial minimum 0.36 -> 0.22, rho vs KL -0.258 -> -0.286).
TIBIA_FLOOR = 0.4
SIG_Y, SIG_X = 1.0, 2.0  # derivative smoothing (work px): across / along the margins
MIN_EDGE = 0.01  # weakest margin step (normalised intensity per work px) ever taken as a margin
REL_EDGE = 0.4  # ... and at least this share of the knee's typical margin step
NARROW = 0.02  # a space narrower than this (plateau widths, ~1.5 mm) next to lost margins = closing
MIN_VALID = 0.5  # share of a compartment's columns with both margins for a measurement
# share of a compartment that must lie on the image: beyond its edge the resampled region repeats the
# edge column, whose margins would be measured again as if they were the compartment's
MIN_INSIDE = 0.5
COLLAPSE_RUN = 0.05  # a run of columns without a gap this wide (plateau widths) = bone on bone
FIBULA_BOX = (0.44, 0.6, 0.2, 0.45)  # |x| and y (plateau widths) where the fibular head lies
FIBULA_MIN = 0.04  # lateral box brighter than the medial one by this (normalised) = fibula found


@dataclass
class Compartment:
    """One compartment's JSW. ``min``/``mean`` in the result's unit (nan when not measured);
    ``flag``: '' | 'bone_on_bone' | 'not_measured'. Lines are in input-image px (x, y)."""

    name: str
    min: float = float("nan")
    mean: float = float("nan")
    ok: bool = False
    flag: str = "not_measured"
    reason: str = ""
    femur: list = field(default_factory=list, repr=False)  # [(x, y), ...] condyle margin
    tibia: list = field(default_factory=list, repr=False)  # [(x, y), ...] plateau margin
    at: tuple | None = None  # ((x, y_femur), (x, y_tibia)) where the minimum is

    def as_dict(self, lines: bool = True) -> dict:
        d = {"min": _r(self.min), "mean": _r(self.mean), "ok": self.ok, "flag": self.flag or None,
             "reason": self.reason or None}
        if lines:
            d["femur"] = [[round(x, 1), round(y, 1)] for x, y in self.femur]
            d["tibia"] = [[round(x, 1), round(y, 1)] for x, y in self.tibia]
            d["at"] = [[round(x, 1), round(y, 1)] for x, y in self.at] if self.at else None
        return d


@dataclass
class JSW:
    """Both compartments of one knee. ``unit``: 'mm' or '%plateau' (percent of the plateau width,
    when the image has no pixel spacing); ``medial_side``: 'left'/'right' of the input image."""

    medial: Compartment
    lateral: Compartment
    unit: str
    ok: bool
    reason: str = ""
    note: str = ""  # e.g. no pixel spacing (relative units), medial side from the film's convention
    medial_side: str = "right"
    plateau_px: float = float("nan")

    def as_dict(self, lines: bool = True) -> dict:
        return {"unit": self.unit, "ok": self.ok, "reason": self.reason or None, "note": self.note or None,
                "medial_side": self.medial_side,
                "medial": self.medial.as_dict(lines), "lateral": self.lateral.as_dict(lines)}

    def row(self) -> dict:
        """The ``jsw.csv`` fields (values in ``unit``)."""
        return {"medial_min_mm": _r(self.medial.min), "lateral_min_mm": _r(self.lateral.min),
                "medial_mean_mm": _r(self.medial.mean), "lateral_mean_mm": _r(self.lateral.mean),
                "unit": self.unit, "ok": self.ok, "medial_flag": self.medial.flag,
                "lateral_flag": self.lateral.flag, "medial_side": self.medial_side, "reason": self.reason,
                "note": self.note}


def _r(v: float, nd: int = 3):
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


def failed(reason: str, unit: str = "mm") -> JSW:
    """A knee that could not be measured at all."""
    return JSW(Compartment("medial", reason=reason), Compartment("lateral", reason=reason), unit, False, reason)


# ---------------------------------------------------------------------- region of interest

def _roi(img: np.ndarray, cx: float, cy: float, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample the region around (cx, cy) at ``k`` work px per input px: (roi, 2x3 matrix taking
    work (col, row, 1) to input (x, y))."""
    import cv2

    w = int(round(2 * COMPARTMENT[1] * WORK_W + 2 * (FIBULA_BOX[1] - COMPARTMENT[1]) * WORK_W))
    r0, r1 = int(round(ROI_Y[0] * WORK_W)), int(round(ROI_Y[1] * WORK_W))
    # input coordinates of work pixel centres: x = cx + (j - (w-1)/2) / k, y = cy + (i + r0) / k
    m = np.array([[1 / k, 0, cx - (w - 1) / 2 / k], [0, 1 / k, cy + r0 / k]], np.float64)
    # only the needed part of the film is blurred (antialiasing) and warped
    x0 = max(0, int(math.floor(m[0, 2])) - 8)
    y0 = max(0, int(math.floor(m[1, 2])) - 8)
    x1 = min(img.shape[1], int(math.ceil(m[0, 2] + w / k)) + 8)
    y1 = min(img.shape[0], int(math.ceil(m[1, 2] + (r1 - r0) / k)) + 8)
    if x1 - x0 < 4 or y1 - y0 < 4:
        raise ValueError("region of interest outside the image")
    src = np.ascontiguousarray(img[y0:y1, x0:x1], np.float32)
    if k < 1.0:
        sig = 0.45 * (1.0 / k - 1.0)
        if sig > 0.1:
            src = cv2.GaussianBlur(src, (0, 0), sig, borderType=cv2.BORDER_REPLICATE)
    ms = m.copy()
    ms[:, 2] -= (x0, y0)
    roi = cv2.warpAffine(src, ms, (w, r1 - r0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    return roi, m


def _medial_is_right(roi: np.ndarray, jrow: int, prior_right: bool) -> tuple[bool, bool]:
    """(medial on the ROI's right?, decided by the fibula?) from the brighter outer box below the
    plateau (the fibular head is lateral)."""
    h, w = roi.shape
    c = (w - 1) / 2
    a, b, y0, y1 = FIBULA_BOX
    rows = slice(jrow + int(y0 * WORK_W), min(h, jrow + int(y1 * WORK_W)))
    left = roi[rows, max(0, int(c - b * WORK_W)): int(c - a * WORK_W)]
    right = roi[rows, int(c + a * WORK_W): min(w, int(c + b * WORK_W))]
    if left.size == 0 or right.size == 0:
        return prior_right, False
    diff = float(np.median(left) - np.median(right))
    if abs(diff) < FIBULA_MIN:
        return prior_right, False
    return diff > 0, True  # fibula on the left -> lateral left -> medial right


# ---------------------------------------------------------------------- margins

def _gap_path(smooth: np.ndarray) -> np.ndarray:
    """Row of the darkest left-to-right path (one row up/down per column) through ``smooth``."""
    from skimage.graph import MCP

    cost = smooth - float(smooth.min()) + 0.02  # dark joint space = cheap
    mcp = MCP(cost, offsets=[(-1, 1), (0, 1), (1, 1)], fully_connected=False)
    h, w = cost.shape
    # every node's cost (no end list: checking one costs more than the few nodes it saves; the last
    # column's costs and the traceback are the same)
    cum, _ = mcp.find_costs([(r, 0) for r in range(h)])
    end = int(np.argmin(cum[:, -1]))
    path = np.array(mcp.traceback((end, w - 1)))
    rows = np.empty(w, int)
    rows[path[:, 1]] = path[:, 0]
    return rows


def _edges(dy: np.ndarray, path: np.ndarray, cols: np.ndarray, reach: int, sign: int) -> tuple[np.ndarray, np.ndarray]:
    """The margin step of ``sign`` (-1 bright-to-dark = femur, +1 = tibia) within ``reach`` rows
    above (femur) or below (tibia) the path, per column: (sub-pixel row, strength). The femur's is
    its strongest step; the tibia's the farthest step of at least TIBIA_FLOOR of its strongest
    (the plateau's floor, see TIBIA_FLOOR)."""
    h = dy.shape[0]
    steps = np.arange(reach + 1)[:, None]
    rows = np.clip(path[None, :] + (steps if sign > 0 else -steps), 1, h - 2)
    vals = sign * dy[rows, cols[None, :]]
    k = np.argmax(vals, axis=0)
    if sign > 0:
        strongest = vals[k, np.arange(len(cols))]
        near = np.pad(vals, ((1, 1), (0, 0)), constant_values=-np.inf)
        # the threshold never exceeds the strongest step (a column with no rising step at all has a
        # negative one), so the strongest is always among the peaks
        peak = (vals >= near[:-2]) & (vals >= near[2:]) & (vals >= np.minimum(strongest, TIBIA_FLOOR * strongest))
        k = np.where(peak, steps, -1).max(axis=0)
    r = rows[k, np.arange(len(cols))]
    a, b, c = (sign * dy[r - 1, cols], sign * dy[r, cols], sign * dy[r + 1, cols])
    den = a - 2 * b + c
    off = np.where(den < 0, 0.5 * (a - c) / np.where(den < 0, den, -1), 0.0)
    return r + np.clip(off, -0.5, 0.5), vals[k, np.arange(len(cols))]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the True runs of a 1-D mask."""
    d = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _trace(g: np.ndarray, dy: np.ndarray, jrow: int, cols: np.ndarray) -> tuple:
    """Joint-space path and both margins over ``cols``: (path, femur rows, femur strength, tibia
    rows, tibia strength)."""
    s, reach = int(SEARCH * WORK_W), int(EDGE_REACH * WORK_W)
    r0, r1 = max(0, jrow - s), min(g.shape[0], jrow + s)
    path = _gap_path(g[r0:r1, cols]) + r0
    return (path, *_edges(dy, path, cols, reach, -1), *_edges(dy, path, cols, reach, +1))


def _compartment(name: str, trace: tuple, cols: np.ndarray, band: np.ndarray, min_edge: float,
                 scale: float, m: np.ndarray) -> tuple[Compartment, float]:
    """Measure one compartment from its ``trace`` (columns ``cols`` of the ROI; ``band``: which of
    them form the central band). ``scale``: result units per work px. Returns (compartment, share
    of columns with both margins)."""
    path, f, sf, t, st = trace
    valid = (sf >= min_edge) & (st >= min_edge) & (t > f)
    share = float(valid.mean())
    out = Compartment(name)
    if share == 0:
        out.reason = f"{name}: margins not found"
        return out, share
    width = np.full(len(cols), np.nan)
    # a median along the compartment drops single-column misses (texture, a rim line)
    width[valid] = ndimage.median_filter(t[valid] - f[valid], size=7, mode="nearest")
    collapsed = [(a, b) for a, b in _runs(~valid) if b - a >= COLLAPSE_RUN * WORK_W
                 and _narrow_beside(width, a, b)]

    def pt(j, row):
        return (float(m[0, 0] * cols[j] + m[0, 2]), float(m[1, 1] * row + m[1, 2]))

    out.femur = [pt(j, f[j]) for j in np.flatnonzero(valid)[::4]]
    out.tibia = [pt(j, t[j]) for j in np.flatnonzero(valid)[::4]]
    if collapsed:
        a, b = max(collapsed, key=lambda ab: ab[1] - ab[0])
        j = (a + b) // 2
        out.min, out.flag, out.ok = 0.0, "bone_on_bone", True
        out.reason = f"{name}: no joint space over {(b - a) / WORK_W:.0%} of the plateau width (bone on bone)"
        out.at = (pt(j, path[j]), pt(j, path[j]))
        for a, b in collapsed:
            width[a:b] = 0.0
    elif share < MIN_VALID:
        out.reason = f"{name}: margins found in only {share:.0%} of the compartment"
        return out, share
    else:
        j = int(np.nanargmin(width))
        out.min, out.flag, out.ok = float(width[j]) * scale, "", True
        out.at = (pt(j, f[j]), pt(j, t[j]))
    in_band = band & np.isfinite(width)
    out.mean = float(np.mean(width[in_band])) * scale if in_band.sum() >= 0.5 * band.sum() else float("nan")
    return out, share


def _narrow_beside(width: np.ndarray, a: int, b: int) -> bool:
    """Columns a:b lost their margins because the space closes: the measured width next to the run
    (either side, within a few columns) is already narrow. A run between wide spaces is a miss."""
    near = np.r_[width[max(0, a - 6): a], width[b: b + 6]]
    near = near[np.isfinite(near)]
    return near.size > 0 and float(near.min()) < NARROW * WORK_W


# ---------------------------------------------------------------------- one knee

def _spacing(spacing_mm) -> float | None:
    if spacing_mm is None:
        return None
    if np.isscalar(spacing_mm):
        return float(spacing_mm)
    return float(spacing_mm[1])  # column spacing: the plateau width and the ROI's scale are along x


def measure_knee(img: np.ndarray, spacing_mm=None, side: str | None = None, info=None,
                 laterality: str | None = None) -> JSW:
    """JSW of one knee of ``img`` (2-D float, bone bright; what ``canonical_view`` takes, with the
    same ``spacing_mm`` and ``side``). ``info``: the knee's ``ViewInfo`` when already made (else it
    is made here; one framed on a prepared crop's stated joint is located again). ``laterality``:
    'R'/'L', the patient's side of a single-knee image shown as on the film (a right knee's medial
    side on the image right), e.g. from a kneeKL224 file name, or 'R' for a prepared crop (canonical
    orientation); without it the fibular head decides. Never raises for a bad image: the result says why it could not measure."""
    spacing = _spacing(spacing_mm)
    unit = "mm" if spacing else "%plateau"
    img = np.asarray(img, np.float32)
    # a prepared crop's view is framed on the joint it states, unlocated: locate it here for the plateau
    # width; such crops are in the canonical orientation, a right knee's (medial on the image right)
    canonical = bool(info is not None and info.joint_stated)
    info = _located(img, spacing_mm, side, None if canonical else info, unit)
    if isinstance(info, JSW):
        return info
    width = float(info.width_px)
    k = WORK_W / width
    try:
        roi, m = _roi(img, float(info.centre[0]), float(info.centre[1]), k)
    except ValueError as e:
        return failed(str(e), unit)
    jrow = -int(round(ROI_Y[0] * WORK_W))
    c, r = (roi.shape[1] - 1) / 2, int(SEARCH * WORK_W)
    joint = roi[max(0, jrow - r): jrow + r, int(c - COMPARTMENT[1] * WORK_W): int(c + COMPARTMENT[1] * WORK_W)]
    lo, hi = percentile(joint, (2, 98))  # the bones and the space between them, not the air
    if not hi - lo > 1e-3:
        return failed("no contrast around the joint", unit)
    g = np.clip((roi - lo) / (hi - lo), 0, 1)
    if info.side in ("R", "L"):  # a bilateral film: lateral is the outer side of each knee
        medial_right, by_fibula = info.side == "R", True
    elif canonical or laterality in ("R", "L"):  # film orientation: a right knee's medial side on the image right
        medial_right, by_fibula = canonical or laterality == "R", True  # a prepared crop shows a right knee
    else:  # a single knee of unknown orientation; unclipped, so the soft tissue beside the tibia counts
        medial_right, by_fibula = _medial_is_right((roi - lo) / (hi - lo), jrow, True)
    res = _compartments(g, jrow, medial_right, spacing * width / WORK_W if spacing else 100.0 / WORK_W, m,
                        img.shape[1])
    notes = []
    if not spacing:
        notes.append("no pixel spacing: JSW in percent of the tibial plateau width")
    if not by_fibula:
        notes.append("fibula not clear: medial side assumed on the image right (canonical orientation)")
    if info.reason:
        notes.append(info.reason)
    reasons = [c.reason for c in res.values() if c.reason]
    return JSW(res["medial"], res["lateral"], unit, ok=all(c.ok for c in res.values()),
               reason="; ".join(reasons), note="; ".join(notes),
               medial_side="right" if medial_right else "left", plateau_px=width)


def _located(img: np.ndarray, spacing_mm, side, info, unit: str):
    """The knee's ViewInfo (made here when not given), or a failed JSW saying why it cannot be
    measured: not 2-D, too small, joint not located, plateau too narrow in pixels."""
    if img.ndim != 2:
        return failed(f"not a 2-D grayscale image (shape {img.shape})", unit)
    if min(img.shape) < 32:
        return failed(f"image too small ({img.shape[1]}x{img.shape[0]} px)", unit)
    if info is None:
        from klgrade.view.canonical import canonical_view

        try:
            _, info = canonical_view(img, 32, spacing_mm=spacing_mm, side=side)
        except (ValueError, ArithmeticError) as e:
            return failed(f"joint not located ({e})", unit)
    if not info.ok:
        return failed(f"joint not located: {info.reason}", unit)
    width = float(info.width_px)
    if not math.isfinite(width) or width < MIN_PLATEAU_PX:
        return failed(f"image too small: the tibial plateau spans {width:.0f} px (< {MIN_PLATEAU_PX})", unit)
    return info


def _compartments(g: np.ndarray, jrow: int, medial_right: bool, scale: float, m, img_w: int) -> dict:
    """Both compartments of the normalised ROI ``g`` (joint line at row ``jrow``; ``scale``: unit
    per work px; ``m``: work px -> input px; ``img_w``: the input's width, for the columns on it):
    {'medial': Compartment, 'lateral': Compartment}."""
    # only the rows _trace reads are filtered: the path's search band, and its margins' reach
    s, reach = int(SEARCH * WORK_W), int(EDGE_REACH * WORK_W)
    smooth = gaussian_filter(g, 1.5, 1.5, mode="reflect", rows=(jrow - s, jrow + s))
    dy = gaussian_filter(g, SIG_Y, SIG_X, order_rows=1, mode="reflect", rows=(jrow - s - reach - 1, jrow + s + reach + 1))
    x = (np.arange(g.shape[1]) - (g.shape[1] - 1) / 2) / WORK_W
    x_in = m[0, 0] * np.arange(g.shape[1]) + m[0, 2]
    on_image = (x_in >= 0) & (x_in <= img_w - 1)
    parts, off_image = {}, {}
    for name, sgn in (("medial", 1 if medial_right else -1), ("lateral", -1 if medial_right else 1)):
        span = np.flatnonzero((sgn * x >= COMPARTMENT[0]) & (sgn * x <= COMPARTMENT[1]))
        cols = span[on_image[span]]
        if len(cols) < MIN_INSIDE * len(span):  # the knee runs off the frame here
            off_image[name] = Compartment(name, reason=f"{name}: {1 - len(cols) / len(span):.0%} of the "
                                          "compartment lies outside the image")
            continue
        band = (sgn * x[cols] >= CENTRAL_BAND[0]) & (sgn * x[cols] <= CENTRAL_BAND[1])
        parts[name] = (cols, band, _trace(smooth, dy, jrow, cols))
    if not parts:
        return off_image
    # a margin is a step at least REL_EDGE of this knee's typical margin step (films differ in contrast)
    typical = np.percentile(np.concatenate([np.minimum(p[2][2], p[2][4]) for p in parts.values()]), 75)
    min_edge = max(MIN_EDGE, REL_EDGE * float(typical))
    res, shares = {}, {}
    for name, (cols, band, trace) in parts.items():
        res[name], shares[name] = _compartment(name, trace, cols, band, min_edge, scale, m)
    _whole_collapse(res, shares)
    return {**res, **off_image}


def _whole_collapse(res: dict, shares: dict) -> None:
    """A compartment with (almost) no margins beside a measured one is collapsed, not missing."""
    for a, b in (("medial", "lateral"), ("lateral", "medial")):
        if a not in res or b not in res:  # a compartment off the image says nothing of the other
            continue
        if not res[a].ok and shares[a] < 0.15 and res[b].ok and not res[b].flag and shares[b] >= MIN_VALID:
            c = res[a]
            c.min, c.ok, c.flag = 0.0, True, "bone_on_bone"
            c.reason = f"{a}: no joint space found across the compartment (bone on bone)"
