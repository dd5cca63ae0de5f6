"""Synthetic knees, writing datasets: PNG crops with a manifest, and OAI-shaped DICOM trees
(release folders, contents.csv, KL label tables, truth.csv).

Split out of :mod:`klgrade.synthetic` (which re-exports the public names).
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from klgrade import io
from klgrade.synthetic.anatomy import (
    ANATOMY_KEYS,
    DEFAULT_VISITS,
    LABEL_FEATURES,
    VISIT_CODES,
    make_cohort,
    oarsi_grades,
    true_jsw,
)
from klgrade.synthetic.film import (
    KNEE_SERIES,
    OTHER_SERIES,
    _render_other,
    bilateral_dataset,
    render_bilateral,
    render_knee,
    save_dataset,
    to_stored,
)

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

    from klgrade.ingest.manifest import write_manifest
    from klgrade.ingest.splits import patient_split

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
        flags = {"m1": is_m1[j], "cr": is_cr[j], "ps": is_ps[j], "other": is_other[j],
                 "missing": is_missing[2 * j: 2 * j + 2], "dup": is_dup[2 * j: 2 * j + 2]}
        knees = (by_key[(pid, v, "R")], by_key[(pid, v, "L")])
        rows, knee_truths, knee_labels = _write_visit(out, rng, nb, seed, pid, v, knees, flags, spacing_range,
                                                      shape, other_series_shape)
        contents[v] += rows
        truth += knee_truths
        labels[v] += knee_labels
    return _write_tables(out, visits, contents, labels, truth)


def _write_visit(out: Path, rng, barcodes, seed: int, pid: str, v: int, knees: tuple, flags: dict,
                 spacing_range, shape, other_series_shape) -> tuple[list[dict], list[dict], list[dict]]:
    """One participant's visit: its bilateral film (and, when ``flags['other']``, a non-knee
    series). Returns (contents.csv rows, truth rows, label rows)."""
    fake_name, fake_id, birth, base = _identity(seed, pid)
    date = (base + _dt.timedelta(days=int(round(v * 30.44)) + int(rng.integers(-20, 21)))).strftime("%Y%m%d")
    r, lft = knees
    film, vrange = _film_settings(rng, spacing_range, shape, flags["m1"], flags["cr"], flags["ps"])
    film.update(barcode=f"016{next(barcodes):05d}", dicom_patient_name=fake_name, dicom_patient_id=fake_id,
                dicom_birth_date=birth)
    folder = f"{_oai_series_folder(v)}/{pid}/{date}/{film['barcode']}"
    rel = f"{_release_dir(v)}/{folder}/001"
    tr = _write_film(out / rel, rng, r, lft, film, vrange, date, f"{seed}-{pid}-{v}")
    rows = [{"Folder": folder, "ParticipantID": pid, "StudyDate": date, "Barcode": film["barcode"],
             "StudyDescription": "OAI knee x-ray", "SeriesDescription": KNEE_SERIES}]
    truth, labels = [], []
    for k, (side, row) in enumerate((("R", r), ("L", lft))):
        knee_truth, knee_labels = _knee_rows(rel, pid, v, side, row, tr[side], film, bool(flags["missing"][k]),
                                             bool(flags["dup"][k]), rng)
        truth.append(knee_truth)
        labels += knee_labels
    if flags["other"]:
        rows.append(_other_series(out, rng, f"016{next(barcodes):05d}", pid, v, film, date, seed, other_series_shape))
    return rows, truth, labels


def _film_settings(rng, spacing_range, shape, monochrome1: bool, cr: bool,
                   pixelspacing_only: bool) -> tuple[dict, float]:
    """One film's acquisition (spacing, photometric, modality, spacing tag, rescale: drawn in this
    order) and the stored value range."""
    spacing = float(np.round(rng.uniform(*spacing_range), 4))
    spacing_tag = "PixelSpacing" if pixelspacing_only else ("both" if rng.uniform() < 0.3 else "ImagerPixelSpacing")
    rescale, vrange = [((1.0, 0.0), 3950.0), ((2.0, 0.0), 7900.0), ((1.0, -1024.0), 3000.0)][
        int(rng.choice(3, p=[0.6, 0.2, 0.2]))]
    return {"spacing_mm": spacing, "photometric": "MONOCHROME1" if monochrome1 else "MONOCHROME2",
            "modality": "CR" if cr else "DX", "spacing_tag": spacing_tag, "rescale_slope": rescale[0],
            "rescale_intercept": rescale[1], "rows": shape[0], "cols": shape[1]}, vrange


def _write_film(path: Path, rng, right, left, film: dict, vrange: float, date: str, uid_seed: str) -> dict:
    """Render one bilateral film and write it at ``path``; returns the knees' truth per side."""
    img, tr = render_bilateral(int(right.klg), int(left.klg), rng, spacing_mm=film["spacing_mm"],
                               shape=(film["rows"], film["cols"]),
                               anatomy_right={k: getattr(right, k) for k in ANATOMY_KEYS},
                               anatomy_left={k: getattr(left, k) for k in ANATOMY_KEYS})
    rescale = (film["rescale_slope"], film["rescale_intercept"])
    stored = to_stored(img, film["photometric"], 12, rescale, vrange)
    ds = bilateral_dataset(stored, film["spacing_mm"], film["photometric"], modality=film["modality"],
                           rescale=rescale, spacing_tag=film["spacing_tag"], patient_name=film["dicom_patient_name"],
                           patient_id=film["dicom_patient_id"], birth_date=film["dicom_birth_date"], study_date=date,
                           participant_id=right.patient_id, barcode=film["barcode"], uid_seed=uid_seed)
    save_dataset(ds, path)
    return tr


def _knee_rows(rel: str, pid, v: int, side: str, row, centre, film: dict, missing: bool, duplicate: bool,
               rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """One knee's truth.csv row and its KL label rows (a second reading project's when ``duplicate``)."""
    anat = {k: getattr(row, k) for k in ANATOMY_KEYS}
    truth = {"path": rel, "patient_id": pid, "visit": v, "side": side, "klg": int(row.klg),
             "klg_label": pd.NA if missing else int(row.klg),
             "x": round(centre[0], 2), "y": round(centre[1], 2), **film, **true_jsw(int(row.klg), anat)}
    labels = [_label_row(pid, side, int(row.klg), anat, v, missing, readprj=15)]
    if duplicate:
        # another reading project read the same knee (maybe disagreeing); studies keep 15
        other = int(np.clip(row.klg + rng.choice([-1, 0, 1]), 0, 4))
        labels.append(_label_row(pid, side, other, anat, v, False, readprj=37))
    return truth, labels


def _write_tables(out: Path, visits, contents: dict, labels: dict, truth: list[dict]) -> pd.DataFrame:
    """Each release's contents.csv, the BU reads per visit and truth.csv; the truth table."""
    for v in visits:
        io.write_csv(out / _release_dir(v) / "contents.csv", pd.DataFrame(contents[v]))
        lab = pd.DataFrame(labels[v])
        lab = lab.sort_values(["ID", "SIDE", "READPRJ"], kind="stable")
        io.write_text(out / f"kxr_sq_bu{VISIT_CODES[v]}.txt", lab.to_csv(sep="|", index=False))
    truth_df = pd.DataFrame(truth)
    truth_df["klg_label"] = truth_df["klg_label"].astype("Int64")
    io.write_csv(out / "truth.csv", truth_df)
    return truth_df


def _identity(seed: int, pid) -> tuple[str, str, str, _dt.date]:
    """A patient's made-up name, ID, birth date and first visit date (per-patient constants)."""
    prng = np.random.default_rng([seed, 3, int(pid)])
    fake_name = f"SYNTH^PATIENT{prng.integers(10**6):06d}"
    fake_id = f"SYN{prng.integers(10**8):08d}"
    birth = f"19{prng.integers(30, 60)}{prng.integers(1, 13):02d}{prng.integers(1, 29):02d}"
    return fake_name, fake_id, birth, _dt.date(2004, 2, 1) + _dt.timedelta(days=int(prng.integers(0, 700)))


def _other_series(out: Path, rng: np.random.Generator, barcode: str, pid, v: int, film: dict, date: str,
                  seed: int, shape: tuple[int, int]) -> dict:
    """Write a non-knee series (hand, lateral knee, ...) of patient ``pid``'s visit ``v`` beside its
    knee ``film`` (truth fields); its contents row."""
    desc = OTHER_SERIES[int(rng.integers(len(OTHER_SERIES)))]
    folder = f"{_oai_series_folder(v)}/{pid}/{date}/{barcode}"
    hand = _render_other(rng, shape)
    ds = bilateral_dataset(to_stored(hand, "MONOCHROME2"), film["spacing_mm"], "MONOCHROME2",
                           modality=film["modality"], series_description=desc,
                           body_part="HAND" if "Hand" in desc else "KNEE",
                           view_position="LAT" if "Lateral" in desc else "PA",
                           patient_name=film["dicom_patient_name"], patient_id=film["dicom_patient_id"],
                           birth_date=film["dicom_birth_date"], study_date=date, participant_id=pid,
                           barcode=barcode, uid_seed=f"{seed}-{pid}-{v}-{desc}")
    save_dataset(ds, out / _release_dir(v) / folder / "001")
    return {"Folder": folder, "ParticipantID": pid, "StudyDate": date, "Barcode": barcode,
            "StudyDescription": "OAI x-ray", "SeriesDescription": desc}


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

