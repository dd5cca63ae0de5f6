"""Synthetic knees, the anatomy side: cohort, per-knee anatomy, KL findings, true JSW and the
attenuation map of one knee (condyles, plateau, spines, fibula, patella, osteophytes).

Split out of :mod:`klgrade.synthetic` (which re-exports the public names).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.special import expit, ndtri

from klgrade.grades import GRADES

# Visit (months) -> OAI visit code (V01 = 12 m ...). V00 (baseline) is not used by the study.
VISIT_CODES = {0: "00", 12: "01", 24: "03", 36: "05", 48: "06", 72: "08", 96: "10"}
DEFAULT_VISITS = (12, 24, 36, 48, 72, 96)

# Baseline grade distribution; slow progression over visits lifts it to roughly the OAI mix
# across 12-96 m (KL0 ~40%, KL1 ~18%, KL2 ~26%, KL3 ~13%, KL4 ~3%).
BASELINE_PREVALENCE = (0.43, 0.185, 0.25, 0.11, 0.025)
LABEL_FEATURES = ("XRKL", "XRJSM", "XRJSL", "XROSFM", "XROSFL", "XROSTM", "XROSTL",
                  "XRSCFM", "XRSCTM", "XRATTM", "XRATTL")

# Per-grade finding tables (index = KL grade). Sizes in mm.
_OST_BASE = np.array([0.0, 1.1, 3.6, 5.6, 8.5])      # largest osteophyte
_OST_SPREAD = np.array([0.0, 0.5, 0.9, 1.1, 1.6])
_OST_SITES = np.arange(5)                           # sites with a spur (extra sites get smaller ones)
_JSN_BASE = np.array([0.0, 0.1, 0.7, 2.2, 3.8])       # medial narrowing
_JSN_SPREAD = np.array([0.0, 0.15, 0.5, 0.6, 0.5])
_SCLEROSIS = np.array([0.0, 0.0, 0.08, 0.4, 0.75])
_VARUS_DEG = np.array([0.0, 0.0, 0.3, 1.5, 4.0])
_ATTRITION = np.array([0.0, 0.0, 0.0, 0.5, 1.8])      # medial plateau depression (mm)
_SPINE_PEAK = np.array([0.0, 0.2, 0.9, 1.4, 2.0])     # extra tibial-spine height (mm)
_CONDYLE_FLAT = np.array([1.0, 1.0, 1.0, 0.93, 0.75])  # <1 flattens the medial condyle
_SITE_ORDERS = list(itertools.permutations(range(4)))  # which margins grow spurs first


# --------------------------------------------------------------------------- cohort

def random_anatomy(rng: np.random.Generator, patient: dict | None = None) -> dict:
    """Draw the anatomy and finding phenotype of one knee (``patient`` shares build parameters)."""
    p = patient or random_patient(rng)
    return {
        "scale": float(p["scale"] * rng.normal(1.0, 0.012)),
        "soft_tissue_mm": float(p["soft_tissue_mm"]),
        "bone_density": float(p["bone_density"] * rng.normal(1.0, 0.03)),
        "jsw_medial_mm": float(np.clip(rng.normal(4.8, 0.55), 3.2, 6.5)),
        "jsw_lateral_mm": float(np.clip(rng.normal(5.9, 0.55), 4.2, 7.8)),
        "condyle_height_mm": float(rng.normal(13.0, 0.8)),
        "spine_height_mm": float(rng.normal(6.5, 0.6)),
        "fibula_dx_mm": float(rng.normal(0.0, 1.5)),
        "fibula_dy_mm": float(rng.normal(0.0, 2.0)),
        "patella_dx_mm": float(rng.normal(-3.0, 3.0)),
        "patella_dy_mm": float(rng.normal(0.0, 4.0)),
        "tilt_deg": float(rng.normal(0.0, 2.0)),
        # phenotype quantiles: where in its grade's range this knee sits, and where its spurs grow
        "ost_u": float(rng.uniform()),
        "jsn_u": float(rng.uniform()),
        "site_order": int(rng.integers(0, 24)),
        "medial_jsn_share": float(rng.uniform(0.75, 1.0)),
    }


def random_patient(rng: np.random.Generator) -> dict:
    return {
        "scale": float(np.clip(rng.normal(1.0, 0.06), 0.86, 1.16)),
        "soft_tissue_mm": float(np.clip(rng.normal(64.0, 6.0), 50.0, 80.0)),  # OAI: BMI ~28
        "bone_density": float(np.clip(rng.normal(1.0, 0.08), 0.8, 1.2)),
    }


ANATOMY_KEYS = tuple(random_anatomy(np.random.default_rng(0)).keys())


def _patient_ids(n: int, rng: np.random.Generator) -> list[str]:
    # OAI participant ids are 7 digits starting with 9; these are random, not real ones.
    nums = rng.choice(1_000_000, size=n, replace=False)
    return [f"9{int(k):06d}" for k in nums]


def make_cohort(
    n_patients: int,
    seed: int = 0,
    visits: Sequence[int] = DEFAULT_VISITS,
    visits_per_patient: int | None = None,
) -> pd.DataFrame:
    """A synthetic longitudinal cohort: one row per (patient, visit, side).

    Columns: patient_id, visit (months), side ('R'/'L'), klg, plus the knee's anatomy parameters
    (``ANATOMY_KEYS``). Grades never decrease over visits of a knee; both knees of a patient are
    correlated (shared latent severity); grade mix is roughly OAI's.
    ``visits_per_patient``: None = every visit in ``visits``; k = k random visits per patient.
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    visits = sorted(int(v) for v in visits)
    if not visits:
        raise ValueError("visits must not be empty")
    bad = [v for v in visits if v not in VISIT_CODES]
    if bad:
        raise ValueError(f"unknown visit month(s) {bad}; known: {sorted(VISIT_CODES)}")
    if visits_per_patient is not None and not 1 <= visits_per_patient <= len(visits):
        raise ValueError(f"visits_per_patient must be in 1..{len(visits)}, got {visits_per_patient}")
    rng = np.random.default_rng(seed)
    ids = _patient_ids(n_patients, rng)
    thresholds = ndtri(np.cumsum(BASELINE_PREVALENCE)[:-1])
    rows = []
    for pid in ids:
        patient = random_patient(rng)
        if visits_per_patient is None:
            pv = visits
        else:
            pv = sorted(rng.choice(visits, size=visits_per_patient, replace=False).tolist())
        z_patient = rng.normal()
        for side in ("R", "L"):
            anat = random_anatomy(rng, patient)
            # Latent severity: 65% shared by the two knees; drifts upwards (never down) with time.
            latent0 = 0.806 * z_patient + 0.592 * rng.normal()
            drift = rng.exponential(0.045) * (1.0 + 0.6 * max(latent0, 0.0))
            for v in pv:
                latent = latent0 + drift * (v - visits[0]) / 12.0
                klg = int(np.searchsorted(thresholds, latent))
                rows.append({"patient_id": pid, "visit": int(v), "side": side, "klg": klg, **anat})
    df = pd.DataFrame(rows)
    return df.sort_values(["patient_id", "visit", "side"], kind="stable", ignore_index=True)


# --------------------------------------------------------------------------- findings

def knee_findings(klg: int, anatomy: dict) -> dict:
    """KL-dependent findings (mm, densities) for a knee; deterministic given grade and anatomy."""
    if klg not in GRADES:
        raise ValueError(f"klg must be 0-4, got {klg!r}")
    u, v = anatomy["ost_u"], anatomy["jsn_u"]
    largest = _OST_BASE[klg] + _OST_SPREAD[klg] * (2 * u - 1)
    # site order: a fixed permutation per knee so the same margins grow spurs as the grade rises.
    order = _SITE_ORDERS[int(anatomy["site_order"]) % len(_SITE_ORDERS)]
    sizes = np.zeros(4)
    n_sites = _OST_SITES[klg]
    if klg == 1 and u > 0.6:
        n_sites = 2  # doubtful lipping sometimes at two margins
    for rank, site in enumerate(order[:n_sites]):
        sizes[site] = largest * (1.0, 0.75, 0.6, 0.5)[rank]
    jsn = max(0.0, _JSN_BASE[klg] + _JSN_SPREAD[klg] * (2 * v - 1))
    share = anatomy["medial_jsn_share"]
    return {
        # sites: 0 femur lateral, 1 femur medial, 2 tibia lateral, 3 tibia medial
        "osteophyte_mm": sizes,
        "jsn_medial_mm": jsn * share,
        "jsn_lateral_mm": jsn * (1 - share) * 0.6,
        "sclerosis": float(_SCLEROSIS[klg] * (0.8 + 0.4 * v)),
        "varus_deg": float(_VARUS_DEG[klg] * (0.7 + 0.6 * v)),
        "attrition_mm": float(_ATTRITION[klg] * (0.7 + 0.6 * u)),
        "spine_peak_mm": float(_SPINE_PEAK[klg]),
        "condyle_flat": float(_CONDYLE_FLAT[klg]),
    }


def oarsi_grades(klg: int, anatomy: dict) -> dict:
    """OARSI-style 0-3 feature grades consistent with the rendered findings (for label tables)."""
    f = knee_findings(klg, anatomy)
    jsw_m = anatomy["jsw_medial_mm"]

    def jsn_grade(loss, base):
        frac = loss / base
        return int(np.digitize(frac, [0.12, 0.35, 0.75]))

    def ost_grade(mm):
        return int(np.digitize(mm, [1.5, 3.0, 5.5]))

    o = f["osteophyte_mm"]
    sc = int(np.digitize(f["sclerosis"], [0.05, 0.2, 0.45]))
    att = int(f["attrition_mm"] > 0.8)
    return {"XRJSM": jsn_grade(f["jsn_medial_mm"], jsw_m),
            "XRJSL": jsn_grade(f["jsn_lateral_mm"], anatomy["jsw_lateral_mm"]),
            "XROSFM": ost_grade(o[1]), "XROSFL": ost_grade(o[0]),
            "XROSTM": ost_grade(o[3]), "XROSTL": ost_grade(o[2]),
            "XRSCFM": max(0, sc - 1), "XRSCTM": sc, "XRATTM": att, "XRATTL": 0}


# --------------------------------------------------------------------------- joint space

# Where the true minimum JSW is taken: |x| in the leg frame (mm before scaling), between the
# tibial spines and the marginal osteophytes (klgrade.measure measures 0.2-0.45 of the ~73 mm
# plateau width).
JSW_RANGE_MM = (14.6, 33.0)


def _condyle_bottom(xr, f: dict, b: float, y0: float):
    """Femoral margin (y down) over leg-frame columns ``xr``: two flat-bottomed condyle arcs."""
    condyles = ((-19.0, 19.0, 0.38), (19.5, 20.0, 0.38 * f["condyle_flat"]))  # lateral, medial
    bottom = None
    for cx, a, expo in condyles:
        tt = np.clip(1.0 - ((xr - cx) * (1.0 / a)) ** 2, 0, None)
        arc = (y0 - b) + b * tt ** expo
        bottom = arc if bottom is None else np.maximum(bottom, arc)
    return bottom


def _plateau_top(xt, anat: dict, f: dict, y0: float):
    """Tibial margin (y down) over tibia-frame columns ``xt``, and the medial/lateral base gaps."""
    s = float(anat["scale"])
    jsw_m = max(0.3, anat["jsw_medial_mm"] - f["jsn_medial_mm"]) / s
    jsw_l = max(0.5, anat["jsw_lateral_mm"] - f["jsn_lateral_mm"]) / s
    side = expit(xt * (1.0 / 3.0))  # 0 lateral .. 1 medial
    spine_h = float(anat["spine_height_mm"] + f["spine_peak_mm"])
    spines = spine_h * (np.exp(-((xt + 4.5) * (1 / 3.4)) ** 2) + np.exp(-((xt - 4.0) * (1 / 3.4)) ** 2))
    plateau = side * (0.8 * np.exp(-((xt - 20) * 0.1) ** 2) + f["attrition_mm"] * np.exp(-((xt - 22) * (1 / 12)) ** 2)) \
        - (1 - side) * (0.6 * np.exp(-((xt + 20) * (1 / 12)) ** 2))
    return (y0 + jsw_l) + (jsw_m - jsw_l) * side + plateau - spines, jsw_m, jsw_l


def true_jsw(klg: int, anatomy: dict) -> dict:
    """True minimum joint space width (mm) of a drawn knee, medial and lateral: the vertical gap
    between the condyle and the (varus-rotated) plateau in the leg frame, over ``JSW_RANGE_MM``."""
    f = knee_findings(klg, anatomy)
    xt = np.linspace(-60.0, 60.0, 2401)
    top, _, _ = _plateau_top(xt, anatomy, f, -2.5)
    v = float(np.deg2rad(f["varus_deg"]))
    xr_t, yr_t = np.cos(v) * xt + np.sin(v) * top, -np.sin(v) * xt + np.cos(v) * top  # tibia -> leg frame
    xr = np.linspace(JSW_RANGE_MM[0], JSW_RANGE_MM[1], 226)
    out = {}
    for name, sgn in (("medial", 1.0), ("lateral", -1.0)):
        x = sgn * xr
        gap = np.interp(x, xr_t, yr_t) - _condyle_bottom(x, f, float(anatomy["condyle_height_mm"]), -2.5)
        out[f"jsw_{name}_mm"] = round(float(max(0.0, gap.min()) * anatomy["scale"]), 3)
    return out


# --------------------------------------------------------------------------- drawing

def _sig(d, w: float):
    """Soft inside-indicator of a signed 'distance inside' d (mm); w = edge width in mm."""
    return expit(d * np.float32(1.0 / max(w, 1e-3)))


def _ellipse_in(x, y, cx, cy, a, b, angle=0.0):
    """Approximate signed distance inside a rotated ellipse (positive inside, mm)."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    p = (c * dx + s * dy) * np.float32(1.0 / a)
    q = (-s * dx + c * dy) * np.float32(1.0 / b)
    return (1.0 - np.sqrt(p * p + q * q)) * np.float32(min(a, b))


def _window(xv, yv, x0, x1, y0, y1):
    """Row/column slices of the 1-D grids that fall in [x0, x1] x [y0, y1] (mm, before tilt)."""
    cs = np.flatnonzero((xv >= x0) & (xv <= x1))
    rs = np.flatnonzero((yv >= y0) & (yv <= y1))
    if cs.size == 0 or rs.size == 0:
        return None
    return slice(int(rs[0]), int(rs[-1]) + 1), slice(int(cs[0]), int(cs[-1]) + 1)


class _Frame:
    """Grid coordinates of one knee: image mm -> tilted leg frame (r) and varus tibia frame (t)."""

    def __init__(self, xv, yv, tilt, varus, scale):
        X, Y = xv[None, :], yv[:, None]
        c, s, k = float(np.cos(tilt)), float(np.sin(tilt)), float(1.0 / scale)
        self.xr = (c * k) * X + (s * k) * Y
        self.yr = (-s * k) * X + (c * k) * Y
        cv, sv = float(np.cos(varus)), float(np.sin(varus))
        self.xt = cv * self.xr - sv * self.yr
        self.yt = sv * self.xr + cv * self.yr


def _spur(X, Y, bx, by, ang, length, width):
    """Signed distance inside a tapering spur (osteophyte) rooted 3 mm inside the bone at (bx, by)
    that grows ``length`` mm out along ``ang``; ``width`` is its half-width at the margin."""
    c, s = float(np.cos(ang)), float(np.sin(ang))
    dx, dy = X - np.float32(bx), Y - np.float32(by)
    p = c * dx + s * dy          # along the spur
    q = np.abs(-s * dx + c * dy)  # across it
    taper = width * np.clip(1.0 - p * (1.0 / length), 0.0, 1.3) ** 0.7  # beak-like: blunt base, sharp tip
    return np.minimum(np.minimum(taper - q, p + 3.0), length - p)


def _smax(a, b, k: float = 1.5):
    """Smooth union of two 'distance inside' fields (so a spur blends into the cortex)."""
    h = np.clip(0.5 + 0.5 * (a - b) * (1.0 / k), 0.0, 1.0)
    return b + (a - b) * h + k * h * (1.0 - h)


def _knee_attenuation(xv: np.ndarray, yv: np.ndarray, klg: int, anat: dict, rng: np.random.Generator,
                      px_mm: float) -> np.ndarray:
    """Attenuation (arbitrary units) of one knee and leg on the grid xv (columns) x yv (rows), in
    mm, canonical orientation: origin at the joint centre, y downwards, lateral = negative x.

    The random stream is consumed the same way for every grade, so one knee rendered with the same
    seed at two grades differs only by its findings."""
    xv = np.asarray(xv, np.float32)
    yv = np.asarray(yv, np.float32)
    f = knee_findings(klg, anat)
    s = float(anat["scale"])
    e = max(0.35, 0.5 * px_mm)  # soft edges avoid aliasing at any pixel size
    tilt = float(np.deg2rad(anat["tilt_deg"] + rng.normal(0, 0.4)))
    spur_jitter = rng.uniform(0.85, 1.15, size=4)
    tex = _texture((yv.size, xv.size), rng, px_mm)
    varus = float(np.deg2rad(f["varus_deg"]))
    fr = _Frame(xv, yv, tilt, varus, s)
    xr, yr, xt, yt = fr.xr, fr.yr, fr.xt, fr.yt
    att = _soft_tissue(xr, yr, anat, s)

    # ---- femur: two condyles (flat-bottomed arcs) below a flaring metaphysis and a tubular shaft
    b = float(anat["condyle_height_mm"])
    y0 = -2.5  # lowest point of the femoral condyles; the gap's midline is about y = 0
    bottom = _condyle_bottom(xr, f, b, y0)
    flare = expit((yr + 75.0) * (1.0 / 20.0))  # the metaphysis narrows slowly to the shaft
    d_fem = np.minimum(np.minimum(bottom - yr, xr + (13.5 + 25.0 * flare)), (14.0 + 26.0 * flare) - xr)
    cw_f = 0.9 + 2.6 * expit((-yr - 60.0) * 0.1)  # cortex thickens towards the diaphysis

    # ---- tibia (rotated by the varus deformity about the joint centre)
    top, jsw_m, jsw_l = _plateau_top(xt, anat, f, y0)
    top = top + 6.0 * expit((np.abs(xt + 0.5) - 38.0) * (1 / 1.5))  # rounded plateau corners
    tflare = expit((45.0 - yt) * (1 / 16.0))
    d_tib = np.minimum(np.minimum(yt - top, xt + (13.0 + 25.0 * tflare)), (13.0 + 25.5 * tflare) - xt)
    cw_t = 0.9 + 2.4 * expit((yt - 70.0) * 0.1)

    # Features near the joint are drawn in sub-windows only (most of the grid is shaft/soft tissue).
    win = _window(xv, yv, -75 * s, 75 * s, -60 * s, 60 * s)
    if win is not None:
        yc = y0 - b + b * float((1 - 0.9 ** 2) ** 0.38)
        sizes = f["osteophyte_mm"] / s * spur_jitter
        _osteophytes(fr, win, d_fem, d_tib, sizes, yc, y0 + jsw_l + 1.6, y0 + jsw_m + 1.6 + 0.5 * f["attrition_mm"])
    att_bone = _bone(d_fem, cw_f, tex, e) + _bone(d_tib, cw_t, tex, e)
    if win is not None:
        rs, cs = win
        att_bone[rs, cs] += _joint_overlays(fr, win, top[rs, cs], bottom[rs, cs], d_tib[rs, cs], d_fem[rs, cs],
                                            anat, f["sclerosis"], e)
    # fibula (lateral): head overlapping the tibia's lateral margin, then the shaft down the leg;
    # a thinner bone than the tibia, so fainter in projection
    win = _window(xv, yv, -75 * s, -5 * s, 0.0, np.inf)
    if win is not None:
        rs, cs = win
        xt_, yt_ = xt[rs, cs], yt[rs, cs]
        fx, fy = -34.0 + anat["fibula_dx_mm"], 26.0 + anat["fibula_dy_mm"]  # apex ~1.5 cm below the plateau
        d_head = _ellipse_in(xt_, yt_, fx, fy, 9.5, 11.5, 0.35)
        half = 4.6 + 2.5 * np.exp(-np.clip(yt_ - fy, 0, None) * (1 / 25.0))  # neck tapers to the shaft
        d_shaft = np.minimum(half - np.abs(xt_ - (fx + 1.0 - 0.06 * (yt_ - fy))), yt_ - fy)
        att_bone[rs, cs] += 0.6 * _bone(_smax(d_head, d_shaft, 2.0), 1.2, tex[rs, cs], e)

    return att + float(anat["bone_density"]) * np.clip(att_bone, 0, None)


def _soft_tissue(xr: np.ndarray, yr: np.ndarray, anat: dict, s: float) -> np.ndarray:
    """Thigh wider than calf; the thickness of an elliptic cylinder of fat and muscle."""
    w_st = float(anat["soft_tissue_mm"]) / s * (1.0 + 0.18 * expit(-(yr + 40) / 25) - 0.08 * expit((yr - 40) / 25))
    u = xr / w_st
    u2 = u * u
    # subcutaneous fat attenuates less than muscle, so the skin edge ramps up rather than steps
    return (0.45 * np.clip(1.0 - u2, 0, None) ** 0.8 + 0.3 * np.sqrt(np.clip(1.0 - u2 * 1.8, 0, None))) * (
        w_st * (1.0 / 58.0))


def _bone(d: np.ndarray, cw, tex: np.ndarray, e: float) -> np.ndarray:
    """Projected attenuation of a bone whose signed depth is ``d`` (mm; cortex width ``cw``)."""
    inside = _sig(d, e)
    core = np.sqrt(np.clip(d, 0, 30.0) * (1.0 / 30.0))  # projected thickness of a rounded bone
    cortex = np.exp(-(((d - cw * 0.5) / cw) ** 2))
    return inside * (0.5 * core * (1.0 + 0.12 * tex) + 0.35 + 0.4 * cortex)


def _osteophytes(fr, win, d_fem: np.ndarray, d_tib: np.ndarray, sizes: np.ndarray, yc: float, ys_l: float,
                 ys_m: float) -> None:
    """Spurs growing out of the four joint margins, outwards and towards the joint line, merged
    into the bones' depth maps in place (``yc``: the condyles' spur height; ``ys_*``: the plateau's)."""
    rs, cs = win
    xr_, yr_, xt_, yt_ = fr.xr[rs, cs], fr.yr[rs, cs], fr.xt[rs, cs], fr.yt[rs, cs]

    def tib_w(y, lat):
        return 13.0 + (25.0 if lat else 25.5) * float(expit((45.0 - y) / 16.0))

    sites = (  # (base x, base y, angle (y down), on tibia?)
        (-19.0 - 19.0 * 0.9, yc, np.pi - 0.6, False),      # femur lateral, points out and down
        (19.5 + 20.0 * 0.9, yc, 0.6, False),               # femur medial
        (-tib_w(ys_l, True), ys_l, np.pi + 0.55, True),    # tibia lateral, points out and up
        (tib_w(ys_m, False), ys_m, -0.55, True),           # tibia medial
    )
    for size, (bx, by, ang, on_tibia) in zip(sizes, sites):
        if size <= 0.05:
            continue
        size = float(size)
        if on_tibia:
            d_tib[rs, cs] = _smax(d_tib[rs, cs], _spur(xt_, yt_, bx, by, ang, size, 0.35 * size + 1.0))
        else:
            d_fem[rs, cs] = _smax(d_fem[rs, cs], _spur(xr_, yr_, bx, by, ang, size, 0.35 * size + 1.0))


def _joint_overlays(fr, win, top_, bot_, dt_, df_, anat: dict, sclerosis: float, e: float) -> np.ndarray:
    """What overlaps the bones near the joint (window ``win``): the intercondylar notch, the
    tibial rims, the patella and subchondral sclerosis."""
    rs, cs = win
    xr_, yr_, xt_, yt_ = fr.xr[rs, cs], fr.yr[rs, cs], fr.xt[rs, cs], fr.yt[rs, cs]
    add = np.zeros(xr_.shape, np.float32)
    # intercondylar notch: less bone overlaps there
    add -= 0.3 * _sig(_ellipse_in(xr_, yr_, 0.0, -10.0, 8.0, 11.0), 1.5) * _sig(df_, e)
    # anterior/posterior tibial rims: a faint second plateau line (the knee is flexed)
    rim = np.exp(-(((yt_ - top_ - 3.0) * (1 / 0.7)) ** 2)) * _sig(dt_ + 3.0, e)
    add += 0.12 * rim * (np.abs(xt_) < 34)
    # patella: faint overlay over the distal femur
    d_pat = _ellipse_in(xr_, yr_, anat["patella_dx_mm"], -24.0 + anat["patella_dy_mm"], 21.0, 24.0)
    add += 0.22 * _sig(d_pat, 2.5) * (1 + 0.5 * np.sqrt(np.clip(d_pat, 0, 20) * (1 / 20)))
    if sclerosis > 0:  # subchondral sclerosis, mostly medial
        med = expit((xt_ - 4.0) * (1 / 3.0))
        band_t = np.exp(-np.clip(yt_ - top_, 0, None) * (1 / 5.0)) * _sig(dt_, e)
        band_f = np.exp(-np.clip(bot_ - yr_, 0, None) * (1 / 4.0)) * _sig(df_, e)
        add += sclerosis * (med * (band_t + 0.6 * band_f) + 0.3 * (1 - med) * band_t)
    return add


def _texture(shape, rng: np.random.Generator, px_mm: float) -> np.ndarray:
    """Trabecular-like texture: anisotropic band-passed noise, unit variance, mostly vertical."""
    n = rng.standard_normal(shape, dtype=np.float32)
    sy, sx = max(0.5, 1.3 / px_mm), max(0.4, 0.55 / px_mm)
    a = ndimage.gaussian_filter(n, (sy, sx), mode="nearest")
    a -= ndimage.gaussian_filter(a, (3 * sy, 3 * sx), mode="nearest")
    sd = float(a.std()) or 1.0
    return a / sd

