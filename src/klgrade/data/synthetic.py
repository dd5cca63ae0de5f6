"""Synthetic knee radiographs: the built-in data of the demo and the tests.

The model is a projection radiograph drawn from implicit shapes in millimetres: soft-tissue
envelope, femur with medial/lateral condyles and intercondylar notch, tibia with plateau and
spines, fibular head (lateral), faint patella, trabecular texture and cortical rims. Kellgren-
Lawrence findings are a deterministic function of the grade and a few per-knee "phenotype"
quantiles (so one knee looks consistent across visits), plus small per-image jitter:

* KL1: doubtful tiny osteophytic lipping at one or two margins (overlaps KL0 on purpose);
* KL2: definite osteophytes, possible slight medial narrowing, peaked tibial spines;
* KL3: multiple moderate osteophytes, definite narrowing, some subchondral sclerosis;
* KL4: large osteophytes, marked narrowing, severe sclerosis, varus tilt and plateau attrition.

Canonical orientation (``render_knee``): a RIGHT knee as seen on a PA radiograph, i.e. the lateral
side (fibula) on the image's left; left knees are its mirror image. ``render_bilateral`` puts the
patient's right knee on the image's left, as on OAI bilateral PA fixed-flexion films.
"""
from __future__ import annotations

import datetime as _dt
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from scipy.special import expit, ndtri

from klgrade import io
from klgrade.grades import GRADES  # noqa: F401 - re-exported (synthetic.GRADES)

# Visit (months) -> OAI visit code (V01 = 12 m ...). V00 (baseline) is not used by the study.
VISIT_CODES = {0: "00", 12: "01", 24: "03", 36: "05", 48: "06", 72: "08", 96: "10"}
DEFAULT_VISITS = (12, 24, 36, 48, 72, 96)
KNEE_SERIES = "Bilateral PA Fixed Flexion Knee"
OTHER_SERIES = ("PA Hand", "PA Right Hand", "Lateral Left Knee")

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

    # ---- soft tissue: thigh wider than calf; thickness of an elliptic cylinder (fat + muscle)
    w_st = float(anat["soft_tissue_mm"]) / s * (1.0 + 0.18 * expit(-(yr + 40) / 25) - 0.08 * expit((yr - 40) / 25))
    u = xr / w_st
    u2 = u * u
    # subcutaneous fat attenuates less than muscle, so the skin edge ramps up rather than steps
    att = (0.45 * np.clip(1.0 - u2, 0, None) ** 0.8 + 0.3 * np.sqrt(np.clip(1.0 - u2 * 1.8, 0, None))) * (
        w_st * (1.0 / 58.0))

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
        rs, cs = win
        xr_, yr_, xt_, yt_ = xr[rs, cs], yr[rs, cs], xt[rs, cs], yt[rs, cs]
        # osteophytes: spurs growing out of the joint margins, outwards and towards the joint line
        yc = y0 - b + b * float((1 - 0.9 ** 2) ** 0.38)
        ys_l, ys_m = y0 + jsw_l + 1.6, y0 + jsw_m + 1.6 + 0.5 * f["attrition_mm"]

        def tib_w(y, lat):
            return 13.0 + (25.0 if lat else 25.5) * float(expit((45.0 - y) / 16.0))

        sites = (  # (base x, base y, angle (y down), on tibia?)
            (-19.0 - 19.0 * 0.9, yc, np.pi - 0.6, False),      # femur lateral, points out and down
            (19.5 + 20.0 * 0.9, yc, 0.6, False),               # femur medial
            (-tib_w(ys_l, True), ys_l, np.pi + 0.55, True),    # tibia lateral, points out and up
            (tib_w(ys_m, False), ys_m, -0.55, True),           # tibia medial
        )
        sizes = f["osteophyte_mm"] / s * spur_jitter
        for size, (bx, by, ang, on_tibia) in zip(sizes, sites):
            if size <= 0.05:
                continue
            size = float(size)
            if on_tibia:
                d_tib[rs, cs] = _smax(d_tib[rs, cs], _spur(xt_, yt_, bx, by, ang, size, 0.35 * size + 1.0))
            else:
                d_fem[rs, cs] = _smax(d_fem[rs, cs], _spur(xr_, yr_, bx, by, ang, size, 0.35 * size + 1.0))

    def bone(d, cw, tex=tex):
        inside = _sig(d, e)
        core = np.sqrt(np.clip(d, 0, 30.0) * (1.0 / 30.0))  # projected thickness of a rounded bone
        cortex = np.exp(-(((d - cw * 0.5) / cw) ** 2))
        return inside * (0.5 * core * (1.0 + 0.12 * tex) + 0.35 + 0.4 * cortex)

    att_bone = bone(d_fem, cw_f) + bone(d_tib, cw_t)

    if win is not None:
        top_, bot_, dt_, df_ = top[rs, cs], bottom[rs, cs], d_tib[rs, cs], d_fem[rs, cs]
        add = np.zeros(xr_.shape, np.float32)
        # intercondylar notch: less bone overlaps there
        add -= 0.3 * _sig(_ellipse_in(xr_, yr_, 0.0, -10.0, 8.0, 11.0), 1.5) * _sig(df_, e)
        # anterior/posterior tibial rims: a faint second plateau line (the knee is flexed)
        rim = np.exp(-(((yt_ - top_ - 3.0) * (1 / 0.7)) ** 2)) * _sig(dt_ + 3.0, e)
        add += 0.12 * rim * (np.abs(xt_) < 34)
        # patella: faint overlay over the distal femur
        d_pat = _ellipse_in(xr_, yr_, anat["patella_dx_mm"], -24.0 + anat["patella_dy_mm"], 21.0, 24.0)
        add += 0.22 * _sig(d_pat, 2.5) * (1 + 0.5 * np.sqrt(np.clip(d_pat, 0, 20) * (1 / 20)))
        # subchondral sclerosis, mostly medial
        sc = f["sclerosis"]
        if sc > 0:
            med = expit((xt_ - 4.0) * (1 / 3.0))
            band_t = np.exp(-np.clip(yt_ - top_, 0, None) * (1 / 5.0)) * _sig(dt_, e)
            band_f = np.exp(-np.clip(bot_ - yr_, 0, None) * (1 / 4.0)) * _sig(df_, e)
            add += sc * (med * (band_t + 0.6 * band_f) + 0.3 * (1 - med) * band_t)
        att_bone[rs, cs] += add
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
        att_bone[rs, cs] += 0.6 * bone(_smax(d_head, d_shaft, 2.0), 1.2, tex[rs, cs])

    return att + float(anat["bone_density"]) * np.clip(att_bone, 0, None)


def _texture(shape, rng: np.random.Generator, px_mm: float) -> np.ndarray:
    """Trabecular-like texture: anisotropic band-passed noise, unit variance, mostly vertical."""
    n = rng.standard_normal(shape, dtype=np.float32)
    sy, sx = max(0.5, 1.3 / px_mm), max(0.4, 0.55 / px_mm)
    a = ndimage.gaussian_filter(n, (sy, sx), mode="nearest")
    a -= ndimage.gaussian_filter(a, (3 * sy, 3 * sx), mode="nearest")
    sd = float(a.std()) or 1.0
    return a / sd


def _expose(att: np.ndarray, rng: np.random.Generator, px_mm: float, exposure: float | None = None,
            noise: float | None = None) -> np.ndarray:
    """Attenuation -> detector image in [0, 1] (bone bright), with exposure, scatter and noise."""
    # draw every parameter even when given, so the random stream does not depend on the arguments
    k_r, sigma_r, gamma = rng.uniform(0.65, 0.95), rng.uniform(0.008, 0.025), rng.uniform(0.8, 1.25)
    lo, hi = rng.uniform(0.02, 0.08), rng.uniform(0.88, 0.98)
    k = float(exposure if exposure is not None else k_r)
    img = 1.0 - np.exp(-k * att)
    # scatter / veiling glare: a wide blur (done at 1/8 size, it is smooth) lowers contrast a little
    small = img[::8, ::8]
    glare = ndimage.zoom(ndimage.gaussian_filter(small, max(1.0, 1.5 / px_mm), mode="nearest"),
                         (img.shape[0] / small.shape[0], img.shape[1] / small.shape[1]), order=1)
    img = 0.9 * img + 0.1 * glare[: img.shape[0], : img.shape[1]]
    sigma = float(noise if noise is not None else sigma_r)
    if sigma > 0:  # quantum noise grows with the signal
        img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32) * np.sqrt(0.3 + img)
    img = lo + (hi - lo) * np.clip(img, 0, 1) ** gamma
    return np.clip(img, 0, 1).astype(np.float32)


def _resize(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    if img.shape == (h, w):
        return img
    resample = Image.Resampling.BILINEAR if h > img.shape[0] else Image.Resampling.BOX
    return np.array(Image.fromarray(img.astype(np.float32), mode="F").resize((w, h), resample),
                    dtype=np.float32)


def render_knee(
    klg: int,
    rng: np.random.Generator,
    size_px: int = 224,
    spacing_mm: float | None = None,
    anatomy: dict | None = None,
    fov_mm: float = 140.0,
    jitter_mm: float = 3.0,
    exposure: float | None = None,
    noise: float | None = None,
) -> tuple[np.ndarray, tuple[float, float]]:
    """One unilateral knee in canonical orientation (right knee: lateral/fibula on the image left).

    The square image spans ``fov_mm`` (140 mm by default, i.e. ``spacing_mm = fov_mm / size_px``)
    around the joint centre, displaced by up to ``jitter_mm`` like an imperfect crop; a given
    ``spacing_mm`` overrides ``fov_mm``. ``anatomy``: a :func:`random_anatomy` dict (or the
    ``ANATOMY_KEYS`` of a :func:`make_cohort` row); random when None. ``exposure``/``noise`` fix
    those image parameters; the random stream is consumed the same way whatever the grade or these
    arguments, so one knee drawn with the same seed at two grades differs only by its findings.
    Returns (float32 image in [0, 1], joint centre (x, y) in px).
    """
    if spacing_mm is None:
        spacing_mm = fov_mm / size_px
    anatomy = anatomy if anatomy is not None else random_anatomy(rng)
    # Draw at <= 0.5 mm/px (at most 2x supersampled) then box-downsample, so thin cortices and spurs do not alias.
    factor = min(2, max(1, int(np.ceil(spacing_mm / 0.5))))
    n = size_px * factor
    px = spacing_mm / factor
    off = rng.uniform(-jitter_mm, jitter_mm, size=2)
    coords = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(px)
    att = _knee_attenuation(coords + np.float32(off[0]), coords + np.float32(off[1]), klg, anatomy, rng, px)
    img = _expose(att, rng, px, exposure, noise)
    img = _resize(img, (size_px, size_px))
    centre = ((size_px - 1) / 2.0 - off[0] / spacing_mm, (size_px - 1) / 2.0 - off[1] / spacing_mm)
    return np.clip(img, 0, 1).astype(np.float32), (float(centre[0]), float(centre[1]))


def render_bilateral(
    klg_right: int,
    klg_left: int,
    rng: np.random.Generator,
    spacing_mm: float = 0.14,
    shape: tuple[int, int] = (2000, 2560),
    anatomy_right: dict | None = None,
    anatomy_left: dict | None = None,
    exposure: float | None = None,
    noise: float | None = None,
) -> tuple[np.ndarray, dict]:
    """A bilateral PA fixed-flexion radiograph (patient's RIGHT knee on the image's LEFT).

    Returns (float32 image in [0, 1] of ``shape`` (rows, cols), truth) where truth holds
    'R' and 'L' joint centres (x, y) in px, 'spacing_mm' and the grades.
    """
    rows, cols = shape
    if rows < 32 or cols < 64:
        raise ValueError(f"shape {shape} too small for a bilateral image")
    patient = random_patient(rng)
    ar = anatomy_right if anatomy_right is not None else random_anatomy(rng, patient)
    al = anatomy_left if anatomy_left is not None else random_anatomy(rng, patient)
    # Work on a coarse grid (~0.4 mm/px, about the crop resolution pipelines use) and upsample.
    px = max(spacing_mm, 0.4)
    ch, cw = int(np.ceil(rows * spacing_mm / px)), int(np.ceil(cols * spacing_mm / px))
    width_mm, height_mm = cols * spacing_mm, rows * spacing_mm
    # Legs side by side with a 5-45 mm gap between the skins (knee centres ~130-190 mm apart).
    # On a narrow detector the knees move together, but stay >= 60 mm from the outer edges
    # (a 140 mm crop may then run a little off the film, as with tight real framing).
    legs = {"R": ar["soft_tissue_mm"] * ar["scale"], "L": al["soft_tissue_mm"] * al["scale"]}
    sep = legs["R"] + legs["L"] + rng.uniform(5.0, 45.0)
    sep = float(np.clip(sep, 115.0, max(115.0, width_mm - 120.0)))
    slack_x = max(0.0, (width_mm - sep) / 2 - 72.0)
    slack_y = max(0.0, height_mm / 2 - 75.0)
    mid_x = width_mm / 2 + rng.uniform(-1, 1) * min(slack_x, 0.04 * width_mm)
    mid_y = height_mm / 2 + rng.uniform(-1, 1) * min(slack_y, 0.06 * height_mm)
    centres_mm = {"R": (mid_x - sep / 2, mid_y + rng.normal(0, 2.0)),
                  "L": (mid_x + sep / 2, mid_y + rng.normal(0, 2.0))}
    xs = (np.arange(cw, dtype=np.float32) + 0.5) * px
    ys = (np.arange(ch, dtype=np.float32) + 0.5) * px
    att = np.zeros((ch, cw), np.float32)
    for side, klg, anat in (("R", klg_right, ar), ("L", klg_left, al)):
        cx, cy = centres_mm[side]
        half = 1.25 * legs[side] + 5.0  # the thigh is wider than the knee; beyond it there is only air
        c0 = int(np.clip(np.floor((cx - half) / px), 0, cw))
        c1 = int(np.clip(np.ceil((cx + half) / px) + 1, 0, cw))
        if c1 <= c0:
            continue
        xv = xs[c0:c1] - np.float32(cx)
        if side == "L":
            xv = -xv  # canonical = right knee (lateral on the image left); the left knee is its mirror
        att[:, c0:c1] += _knee_attenuation(xv, ys - np.float32(cy), klg, anat, rng, px)
    # exposure + noise: structure at coarse resolution, quantum noise at full resolution
    img = _expose(att, rng, px, exposure, noise=0.0)
    img = _resize(img, (rows, cols))
    sigma_r = rng.uniform(0.006, 0.02)
    sigma = float(noise if noise is not None else sigma_r)
    img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    np.clip(img, 0, 1, out=img)
    # the centre of pixel i is at (i + 0.5) * spacing mm
    truth = {side: (cx / spacing_mm - 0.5, cy / spacing_mm - 0.5) for side, (cx, cy) in centres_mm.items()}
    truth.update({"spacing_mm": float(spacing_mm), "klg": {"R": int(klg_right), "L": int(klg_left)}})
    return img, truth


# --------------------------------------------------------------------------- PNG dataset

def write_png_dataset(
    out_dir: str | Path,
    n_patients: int = 200,
    seed: int = 0,
    size: int = 224,
    visits: Sequence[int] = DEFAULT_VISITS,
    visits_per_patient: int | None = 2,
    split: str | Sequence[float] = "0.7,0.1,0.2",
    progress: bool | None = None,
) -> Path:
    """Unilateral synthetic crops as 8-bit PNG (canonical orientation, i.e. left knees already
    flipped) under ``out_dir/images/`` plus ``manifest.csv`` with a patient-level split (stratified
    by grade, seeded). Returns the dataset dir (what ``read_manifest`` takes)."""
    from tqdm.auto import tqdm

    from klgrade.data.manifest import write_manifest
    from klgrade.data.splits import patient_split

    out = Path(out_dir)
    cohort = make_cohort(n_patients, seed=seed, visits=visits, visits_per_patient=visits_per_patient)
    rng = np.random.default_rng([seed, 1])
    rows = []
    for r in tqdm(cohort.itertuples(index=False), total=len(cohort), desc="synth png",
                  disable=None if progress is None else not progress):
        anat = {k: getattr(r, k) for k in ANATOMY_KEYS}
        img, _ = render_knee(r.klg, rng, size_px=size, anatomy=anat)
        image_id = f"{r.patient_id}_{r.visit:02d}m_{r.side}"
        rel = f"images/{image_id}.png"
        with io.atomic_path(out / rel) as tmp:
            Image.fromarray(np.round(img * 255.0).astype(np.uint8)).save(tmp, format="PNG")
        rows.append({"image_id": image_id, "path": rel, "patient_id": r.patient_id, "visit": r.visit,
                     "side": r.side, "klg": r.klg, "source": "synthetic"})
    df = pd.DataFrame(rows)
    df["split"] = patient_split(df, split, seed=seed).to_numpy()
    write_manifest(df, out)
    return out


# --------------------------------------------------------------------------- DICOM

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"    # Computed Radiography Image Storage


def to_stored(img: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
              rescale: tuple[float, float] = (1.0, 0.0), value_range: float | None = None) -> np.ndarray:
    """Map a [0, 1] image (bone bright) to stored uint16 pixel values.

    ``value_range``: span of the modality (rescaled) values; the stored value ``raw`` satisfies
    ``slope * raw + intercept = value``. MONOCHROME1 stores the inverted values (bone dark).
    """
    slope, intercept = rescale
    top = 2**bits_stored - 1
    if value_range is None:
        value_range = (top * slope + intercept) * 0.97
    v = np.clip(img, 0, 1) * value_range
    if photometric == "MONOCHROME1":
        v = value_range - v
    raw = np.round((v - intercept) / slope)
    return np.clip(raw, 0, top).astype(np.uint16)


def bilateral_dataset(
    pixels: np.ndarray,
    spacing_mm: float | tuple[float, float],
    photometric: str = "MONOCHROME2",
    *,
    modality: str = "DX",
    series_description: str = KNEE_SERIES,
    bits_stored: int = 12,
    rescale: tuple[float, float] = (1.0, 0.0),
    window: tuple[float, float] | None = None,
    spacing_tag: str = "ImagerPixelSpacing",
    patient_name: str = "SYNTH^ANONYMOUS",
    patient_id: str = "SYN00000000",
    birth_date: str = "19500101",
    study_date: str = "20050101",
    participant_id: str | None = None,
    barcode: str | None = None,
    body_part: str = "KNEE",
    view_position: str = "PA",
    uid_seed: str | int | None = None,
):
    """A pydicom Dataset for one radiograph, ready for ``ds.save_as(path, enforce_file_format=True)``.

    ``pixels``: 2-D uint16 *stored* values (see :func:`to_stored`), written uncompressed as
    Explicit VR Little Endian. ``uid_seed`` makes the UIDs deterministic. ``spacing_tag`` picks ImagerPixelSpacing, PixelSpacing, both, or
    none (``"both"``/``"none"``) to let tests exercise the readers' fall-backs. The patient fields
    are fake and distinctive so tests can check they never leak.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {pixels.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    sop_class = CR_SOP_CLASS if modality == "CR" else DX_SOP_CLASS
    entropy = None if uid_seed is None else [str(uid_seed)]

    def uid(tag):
        return generate_uid(entropy_srcs=None if entropy is None else entropy + [tag])

    sop_uid = uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = modality
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.StudyDescription = "Bilateral knee" if "Knee" in series_description else "X-ray"
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.Manufacturer = "klgrade synthetic"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "O"
    if participant_id is not None:
        ds.OtherPatientIDs = participant_id  # like OAI exports, which carry the participant id
    if barcode is not None:
        ds.AccessionNumber = barcode
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    sp = (spacing_mm, spacing_mm) if np.isscalar(spacing_mm) else tuple(spacing_mm)
    sp = [f"{float(v):.6g}" for v in sp]
    if spacing_tag in ("ImagerPixelSpacing", "both"):
        ds.ImagerPixelSpacing = sp
    if spacing_tag in ("PixelSpacing", "both"):
        ds.PixelSpacing = sp
    ds.RescaleSlope = f"{rescale[0]:g}"
    ds.RescaleIntercept = f"{rescale[1]:g}"
    ds.RescaleType = "US"
    if window is None:
        vals = pixels[::4, ::4].astype(np.float64) * rescale[0] + rescale[1]
        lo, hi = np.percentile(vals, [1, 99.5])
        window = ((lo + hi) / 2, max(hi - lo, 1.0))
    ds.WindowCenter = f"{window[0]:.1f}"
    ds.WindowWidth = f"{window[1]:.1f}"
    ds.PixelData = pixels.tobytes()
    return ds


def save_dataset(ds, path: str | Path) -> Path:
    """Write a Dataset atomically as a DICOM Part-10 file (preamble + 'DICM')."""
    path = Path(path)
    with io.atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _release_dir(visit: int) -> str:
    return f"{visit}m"


def _oai_series_folder(visit: int) -> str:
    # e.g. 12m/1.C.2/...: visit number (no zero pad), C = clinical release, release version
    return f"{int(VISIT_CODES[visit])}.C.2"


# Physical film widths (mm) of the bilateral films write_dicom_tree draws: OAI's 2560-column films
# at 0.1-0.2 mm/px. Anatomy is drawn in mm, so the film must hold two legs at any pixel count.
FILM_WIDTH_MM = (256.0, 512.0)


def film_spacing_range(shape: tuple[int, int]) -> tuple[float, float]:
    """Pixel spacing range (mm/px) that makes a film of ``shape`` (rows, cols) FILM_WIDTH_MM wide:
    (0.1, 0.2) at 2000x2560, (0.2, 0.4) at 1000x1280 (a 2x-downsampled export of the same films)."""
    cols = int(shape[1])
    return FILM_WIDTH_MM[0] / cols, FILM_WIDTH_MM[1] / cols


def write_dicom_tree(
    out_dir: str | Path,
    n_patients: int = 6,
    seed: int = 0,
    shape: tuple[int, int] = (2000, 2560),
    visits: Sequence[int] = (12, 24),
    *,
    spacing_range: tuple[float, float] | None = None,
    monochrome1_frac: float = 0.25,
    cr_frac: float = 0.3,
    pixelspacing_only_frac: float = 0.1,
    other_series_frac: float = 0.34,
    missing_label_frac: float = 0.05,
    duplicate_read_frac: float = 0.08,
    other_series_shape: tuple[int, int] = (480, 400),
    progress: bool | None = None,
) -> pd.DataFrame:
    """An OAI-shaped DICOM tree of bilateral PA fixed-flexion knee radiographs.

    Layout (mirrors OAI): ``<visit>m/<V>.C.2/<ParticipantID>/<YYYYMMDD>/<barcode>/001`` (no
    extension), a ``<visit>m/contents.csv`` per release, KL label tables ``kxr_sq_buVV.txt``
    (pipe-delimited, BU reads) at ``out_dir``, and ``out_dir/truth.csv`` (one row per knee:
    path relative to ``out_dir``, patient_id, visit, side, klg, klg_label, joint centre x/y in px,
    spacing, photometric, ..., true minimum JSW ``jsw_medial_mm``/``jsw_lateral_mm``). Some visits also get a non-knee series (to be skipped).
    Variation knobs are keyword arguments; each ``*_frac`` gives an exact share (at least one item
    when > 0, so a tiny tree still has MONOCHROME1, CR, PixelSpacing-only, a non-knee series, a
    missing ``.M`` grade and a duplicate READPRJ row). Returns the truth table.
    ``spacing_range`` (mm/px) defaults to :func:`film_spacing_range` of ``shape``: the same physical
    films at any pixel count, so a smaller shape is a coarser export of the same knees.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    spacing_range = spacing_range or film_spacing_range(shape)
    visits = tuple(sorted(int(v) for v in visits))
    cohort = make_cohort(n_patients, seed=seed, visits=visits)
    rng = np.random.default_rng([seed, 2])
    patients = cohort["patient_id"].unique().tolist()
    contents: dict[int, list[dict]] = {v: [] for v in visits}
    truth = []
    labels: dict[int, list[dict]] = {v: [] for v in visits}
    barcode_pool = rng.choice(90_000, size=len(patients) * len(visits) * 2 + 10, replace=False)
    nb = iter(barcode_pool)
    by_key = {(r.patient_id, r.visit, r.side): r for r in cohort.itertuples(index=False)}
    jobs = [(pid, v) for pid in patients for v in visits]
    # Exact counts (at least one when the fraction is > 0) so even a tiny tree has every variant.
    n_img, n_knee = len(jobs), 2 * len(jobs)
    is_m1 = _pick(n_img, monochrome1_frac, rng)
    is_cr = _pick(n_img, cr_frac, rng)
    is_ps = _pick(n_img, pixelspacing_only_frac, rng)
    is_other = _pick(n_img, other_series_frac, rng)
    is_missing = _pick(n_knee, missing_label_frac, rng)
    is_dup = _pick(n_knee, duplicate_read_frac, rng)
    for j, (pid, v) in enumerate(tqdm(jobs, desc="synth dicom", disable=None if progress is None else not progress)):
        prng = np.random.default_rng([seed, 3, int(pid)])  # per-patient constants (identity, dates)
        fake_name = f"SYNTH^PATIENT{prng.integers(10**6):06d}"
        fake_id = f"SYN{prng.integers(10**8):08d}"
        birth = f"19{prng.integers(30, 60)}{prng.integers(1, 13):02d}{prng.integers(1, 29):02d}"
        base = _dt.date(2004, 2, 1) + _dt.timedelta(days=int(prng.integers(0, 700)))
        date = (base + _dt.timedelta(days=int(round(v * 30.44)) + int(rng.integers(-20, 21)))).strftime("%Y%m%d")
        r, lft = by_key[(pid, v, "R")], by_key[(pid, v, "L")]
        spacing = float(np.round(rng.uniform(*spacing_range), 4))
        photometric = "MONOCHROME1" if is_m1[j] else "MONOCHROME2"
        modality = "CR" if is_cr[j] else "DX"
        spacing_tag = "PixelSpacing" if is_ps[j] else ("both" if rng.uniform() < 0.3 else "ImagerPixelSpacing")
        rescale, vrange = [((1.0, 0.0), 3950.0), ((2.0, 0.0), 7900.0), ((1.0, -1024.0), 3000.0)][
            int(rng.choice(3, p=[0.6, 0.2, 0.2]))]
        img, tr = render_bilateral(int(r.klg), int(lft.klg), rng, spacing_mm=spacing, shape=shape,
                                   anatomy_right={k: getattr(r, k) for k in ANATOMY_KEYS},
                                   anatomy_left={k: getattr(lft, k) for k in ANATOMY_KEYS})
        stored = to_stored(img, photometric, 12, rescale, vrange)
        barcode = f"016{next(nb):05d}"
        folder = f"{_oai_series_folder(v)}/{pid}/{date}/{barcode}"
        rel = f"{_release_dir(v)}/{folder}/001"
        ds = bilateral_dataset(stored, spacing, photometric, modality=modality, rescale=rescale,
                               spacing_tag=spacing_tag, patient_name=fake_name, patient_id=fake_id,
                               birth_date=birth, study_date=date, participant_id=pid, barcode=barcode,
                               uid_seed=f"{seed}-{pid}-{v}")
        save_dataset(ds, out / rel)
        contents[v].append({"Folder": folder, "ParticipantID": pid, "StudyDate": date, "Barcode": barcode,
                            "StudyDescription": "OAI knee x-ray", "SeriesDescription": KNEE_SERIES})
        for k, (side, row) in enumerate((("R", r), ("L", lft))):
            anat = {k: getattr(row, k) for k in ANATOMY_KEYS}
            missing = bool(is_missing[2 * j + k])
            truth.append({"path": rel, "patient_id": pid, "visit": v, "side": side, "klg": int(row.klg),
                          "klg_label": pd.NA if missing else int(row.klg),
                          "x": round(tr[side][0], 2), "y": round(tr[side][1], 2), "spacing_mm": spacing,
                          "photometric": photometric, "modality": modality, "spacing_tag": spacing_tag,
                          "rescale_slope": rescale[0], "rescale_intercept": rescale[1],
                          "rows": shape[0], "cols": shape[1], "barcode": barcode,
                          "dicom_patient_name": fake_name, "dicom_patient_id": fake_id,
                          "dicom_birth_date": birth, **true_jsw(int(row.klg), anat)})
            labels[v].append(_label_row(pid, side, int(row.klg), anat, v, missing, readprj=15))
            if is_dup[2 * j + k]:
                # another reading project read the same knee (maybe disagreeing); studies keep 15
                other = int(np.clip(row.klg + rng.choice([-1, 0, 1]), 0, 4))
                labels[v].append(_label_row(pid, side, other, anat, v, False, readprj=37))
        if is_other[j]:
            desc = OTHER_SERIES[int(rng.integers(len(OTHER_SERIES)))]
            ob = f"016{next(nb):05d}"
            ofolder = f"{_oai_series_folder(v)}/{pid}/{date}/{ob}"
            hand = _render_other(rng, other_series_shape)
            ds = bilateral_dataset(to_stored(hand, "MONOCHROME2"), spacing, "MONOCHROME2", modality=modality,
                                   series_description=desc, body_part="HAND" if "Hand" in desc else "KNEE",
                                   view_position="LAT" if "Lateral" in desc else "PA",
                                   patient_name=fake_name, patient_id=fake_id, birth_date=birth,
                                   study_date=date, participant_id=pid, barcode=ob,
                                   uid_seed=f"{seed}-{pid}-{v}-{desc}")
            save_dataset(ds, out / _release_dir(v) / ofolder / "001")
            contents[v].append({"Folder": ofolder, "ParticipantID": pid, "StudyDate": date, "Barcode": ob,
                                "StudyDescription": "OAI x-ray", "SeriesDescription": desc})
    for v in visits:
        io.write_csv(out / _release_dir(v) / "contents.csv", pd.DataFrame(contents[v]))
        code = VISIT_CODES[v]
        lab = pd.DataFrame(labels[v])
        lab = lab.sort_values(["ID", "SIDE", "READPRJ"], kind="stable")
        io.write_text(out / f"kxr_sq_bu{code}.txt", lab.to_csv(sep="|", index=False))
    truth_df = pd.DataFrame(truth)
    truth_df["klg_label"] = truth_df["klg_label"].astype("Int64")
    io.write_csv(out / "truth.csv", truth_df)
    return truth_df


def _pick(n: int, frac: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask with round(frac * n) True entries (at least one if frac > 0), at random."""
    k = 0 if frac <= 0 else min(n, max(1, int(round(frac * n))))
    mask = np.zeros(n, bool)
    mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def _label_row(pid: str, side: str, klg: int, anat: dict, visit: int, missing: bool, readprj: int) -> dict:
    vv = f"V{VISIT_CODES[visit]}"
    row = {"ID": pid, "SIDE": "1: Right" if side == "R" else "2: Left", "READPRJ": readprj,
           "VERSION": f"{vv[1:]}.2"}
    feats = {"XRKL": klg, **oarsi_grades(klg, anat)}
    for name in LABEL_FEATURES:
        val = feats[name]
        row[f"{vv}{name}"] = ".M" if missing else f"{val}: {val}"
    return row


def _render_other(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A crude non-knee radiograph (hand-like: palm and five fingers) for series to be skipped."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx, yy = xx / w, yy / h
    att = 0.6 * _sig(0.22 - np.hypot((xx - 0.5) / 1.2, (yy - 0.72) / 1.0), 0.01)
    for i in range(5):
        cx = 0.22 + 0.14 * i + rng.normal(0, 0.01)
        top = 0.15 + 0.1 * abs(i - 2) + rng.normal(0, 0.02)
        d = np.minimum(0.035 - np.abs(xx - cx), yy - top)
        att += 0.9 * _sig(d, 0.005) * (yy < 0.75)
    img = 1.0 - np.exp(-att)
    img += 0.02 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 1).astype(np.float32)
