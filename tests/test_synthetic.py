"""Synthetic knee radiographs: cohort logic, rendering, PNG dataset, OAI-shaped DICOM tree, CLI."""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from klgrade import synthetic as syn

SMALL = (500, 640)  # bilateral shape for fast DICOM tests (rows, cols) ...
SMALL_SPACING = (0.5, 0.56)  # ... with coarse pixels so the field of view stays ~250x330 mm


# ----------------------------------------------------------------------------- cohort

def test_cohort_grades_never_decrease_and_mix_is_oai_like():
    df = syn.make_cohort(400, seed=3)
    assert set(df["visit"]) == set(syn.DEFAULT_VISITS)
    assert set(df["side"]) == {"R", "L"}
    assert len(df) == 400 * len(syn.DEFAULT_VISITS) * 2
    assert df["patient_id"].str.fullmatch(r"9\d{6}").all()
    assert df["patient_id"].nunique() == 400
    for _, knee in df.groupby(["patient_id", "side"]):
        g = knee.sort_values("visit")["klg"].to_numpy()
        assert (np.diff(g) >= 0).all(), g
    share = df["klg"].value_counts(normalize=True).reindex(range(5), fill_value=0).to_numpy()
    target = np.array([0.40, 0.18, 0.26, 0.13, 0.03])
    assert np.abs(share - target).max() < 0.06, share
    # progression happens, and both knees of a patient are correlated
    first, last = df[df.visit == 12], df[df.visit == 96]
    assert last["klg"].mean() > first["klg"].mean()
    wide = first.pivot(index="patient_id", columns="side", values="klg")
    assert np.corrcoef(wide["R"], wide["L"])[0, 1] > 0.4
    # anatomy columns ride along and are constant over a knee's visits
    assert set(syn.ANATOMY_KEYS) <= set(df.columns)
    assert (df.groupby(["patient_id", "side"])["jsw_medial_mm"].nunique() == 1).all()


def test_cohort_visits_per_patient_and_determinism():
    a = syn.make_cohort(30, seed=1, visits=(12, 24, 36), visits_per_patient=2)
    b = syn.make_cohort(30, seed=1, visits=(12, 24, 36), visits_per_patient=2)
    pd.testing.assert_frame_equal(a, b)
    assert (a.groupby("patient_id")["visit"].nunique() == 2).all()
    assert not a.equals(syn.make_cohort(30, seed=2, visits=(12, 24, 36), visits_per_patient=2))
    with pytest.raises(ValueError, match="unknown visit"):
        syn.make_cohort(3, visits=(13,))


# ----------------------------------------------------------------------------- rendering

def test_render_knee_shape_range_and_determinism():
    img, (cx, cy) = syn.render_knee(2, np.random.default_rng(7), size_px=96)
    assert img.shape == (96, 96) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    assert abs(cx - 47.5) < 96 * 3 / 140 + 0.5 and abs(cy - 47.5) < 96 * 3 / 140 + 0.5
    img2, c2 = syn.render_knee(2, np.random.default_rng(7), size_px=96)
    np.testing.assert_array_equal(img, img2)
    assert c2 == (cx, cy)
    with pytest.raises(ValueError, match="klg"):
        syn.render_knee(5, np.random.default_rng(0))


def test_render_knee_anatomy_joint_space_and_fibula():
    """Joint gap is a dark band at the centre row; the fibula is lateral (image left)."""
    rng = np.random.default_rng(0)
    anat = syn.random_anatomy(rng)
    img, (cx, cy) = syn.render_knee(0, rng, size_px=280, anatomy=anat, jitter_mm=0, noise=0.0)
    px = 140 / 280  # mm per px
    col = img[:, int(round(cx)) + int(20 / px)]  # through the medial compartment
    r = int(round(cy))
    gap = col[r - 3 : r + 4].min()
    assert gap < col[r - int(12 / px)] - 0.05 and gap < col[r + int(12 / px)] - 0.05
    # fibular head sits ~36 mm lateral, ~22 mm below the joint: brighter than the medial mirror point
    yf = r + int(22 / px)
    lat, med = img[yf, int(cx - 40 / px) : int(cx - 32 / px)].mean(), img[yf, int(cx + 32 / px) : int(cx + 40 / px)].mean()
    assert lat > med + 0.03


def test_narrowing_and_osteophytes_grow_with_grade():
    """Same knee, same rng: medial joint space shrinks and margins gain bone as KL rises."""
    anat = syn.random_anatomy(np.random.default_rng(1))
    gaps, margin = [], []
    for k in range(5):
        img, (cx, cy) = syn.render_knee(k, np.random.default_rng(5), size_px=280, anatomy=anat,
                                        jitter_mm=0, noise=0.0, exposure=0.8)
        x = int(round(cx + 22 / 0.5))
        col = img[int(cy) - 12 : int(cy) + 13, x]
        gaps.append(float((col < col.max() - 0.5 * (col.max() - col.min())).sum()))
        margin.append(float(img[int(cy) - 16 : int(cy) + 16, int(cx - 52 / 0.5) : int(cx - 38 / 0.5)].mean()
                            + img[int(cy) - 16 : int(cy) + 16, int(cx + 38 / 0.5) : int(cx + 52 / 0.5)].mean()))
    assert gaps[4] < gaps[3] < gaps[0], gaps
    assert margin[4] > margin[2] > margin[0], margin


def test_render_bilateral_layout_and_speed():
    rng = np.random.default_rng(0)
    syn.render_bilateral(0, 0, rng, shape=(200, 256), spacing_mm=1.4)  # warm-up
    t = time.process_time()  # CPU time: robust to other jobs sharing the cores
    img, truth = syn.render_bilateral(1, 3, rng)
    elapsed = time.process_time() - t
    assert img.shape == (2000, 2560) and img.dtype == np.float32
    assert 0 <= img.min() and img.max() <= 1
    (xr, yr), (xl, yl) = truth["R"], truth["L"]
    assert xr < 1280 < xl  # patient's right knee on the image's left
    assert 0 < yr < 2000 and 0 < yl < 2000
    assert truth["klg"] == {"R": 1, "L": 3} and truth["spacing_mm"] == 0.14
    assert elapsed < 1.0, f"render_bilateral took {elapsed:.2f} s of CPU"  # ~0.25 s measured
    # mirror symmetry of the layout: the fibula (lateral) is on the outer side of each knee
    s = truth["spacing_mm"]
    yf = int(yr + 22 / s)
    out_r = img[yf, int(xr - 40 / s) : int(xr - 32 / s)].mean()
    in_r = img[yf, int(xr + 32 / s) : int(xr + 40 / s)].mean()
    out_l = img[int(yl + 22 / s), int(xl + 32 / s) : int(xl + 40 / s)].mean()
    in_l = img[int(yl + 22 / s), int(xl - 40 / s) : int(xl - 32 / s)].mean()
    assert out_r > in_r and out_l > in_l


def test_learnable_but_kl0_kl1_hardest():
    """Grade is learnable from pixels (logistic regression, cross-validated QWK well above chance)
    while KL0 vs KL1 is the least separable adjacent pair, as in real data."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from klgrade.evaluate.metrics import qwk

    rng = np.random.default_rng(0)
    n, size = 40, 48
    X, y = [], []
    for k in range(5):
        for _ in range(n):
            img, _ = syn.render_knee(k, rng, size_px=size)
            X.append(img[size // 4 : 3 * size // 4].ravel())  # the joint's rows
            y.append(k)
    X, y = np.array(X), np.array(y)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    clf = make_pipeline(StandardScaler(), PCA(30, random_state=0), LogisticRegression(C=0.1, max_iter=500))
    pred = cross_val_predict(clf, X, y, cv=cv)
    score = qwk(y, pred)
    assert 0.5 < score < 0.98, score
    auc = {}
    for a in range(4):
        m = (y == a) | (y == a + 1)
        p = cross_val_predict(clf, X[m], y[m], cv=cv, method="predict_proba")[:, 1]
        auc[a] = roc_auc_score(y[m] == a + 1, p)
    assert auc[0] == min(auc.values()), auc
    assert auc[0] < 0.8 and auc[3] > 0.85, auc


# ----------------------------------------------------------------------------- PNG dataset

def test_png_dataset_manifest_valid(tmp_path):
    from PIL import Image

    from klgrade.ingest.manifest import COLUMNS, image_paths, read_manifest

    t = time.perf_counter()
    path = syn.write_png_dataset(tmp_path / "ds", n_patients=24, seed=0, size=64)
    assert time.perf_counter() - t < 15
    df = read_manifest(path)  # validates columns, grades, files, leakage
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert len(df) == 24 * 2 * 2 and df["patient_id"].nunique() == 24
    assert set(df["source"]) == {"synthetic"} and set(df["split"]) <= {"train", "val", "test"}
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    with Image.open(image_paths(df)[0]) as im:
        assert im.mode == "L" and im.size == (64, 64)
    # same seed -> identical files and manifest
    syn.write_png_dataset(tmp_path / "ds2", n_patients=24, seed=0, size=64)
    assert (tmp_path / "ds" / "manifest.csv").read_bytes() == (tmp_path / "ds2" / "manifest.csv").read_bytes()
    for rel in df["path"][:5]:
        assert (tmp_path / "ds" / rel).read_bytes() == (tmp_path / "ds2" / rel).read_bytes()


# ----------------------------------------------------------------------------- DICOM tree

PATH_RE = re.compile(r"^(\d+)m/(\d+)\.C\.2/(9\d{6})/(\d{8})/(\d{8})/001$")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_tree")
    truth = syn.write_dicom_tree(out, n_patients=5, seed=4, shape=SMALL, visits=(12, 24), spacing_range=SMALL_SPACING,
                                 missing_label_frac=0.15, duplicate_read_frac=0.2, other_series_frac=0.5)
    return out, truth


def test_dicom_tree_layout_and_headers(tree):
    import pydicom

    out, truth = tree
    assert (out / "truth.csv").is_file()
    assert len(truth) == 5 * 2 * 2
    photometrics = set()
    for rel, grp in truth.groupby("path"):
        m = PATH_RE.match(rel)
        assert m, rel
        assert int(m.group(1)) in (12, 24) and m.group(3) == grp["patient_id"].iloc[0]
        f = out / rel
        assert f.is_file() and f.suffix == ""
        ds = pydicom.dcmread(f)
        assert ds.SeriesDescription == syn.KNEE_SERIES
        assert ds.Modality in ("DX", "CR") and ds.BitsStored == 12 and ds.BitsAllocated == 16
        assert (ds.Rows, ds.Columns) == SMALL
        sp = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
        assert SMALL_SPACING[0] <= float(sp[0]) <= SMALL_SPACING[1] and float(sp[0]) == pytest.approx(grp["spacing_mm"].iloc[0])
        assert ds.PhotometricInterpretation == grp["photometric"].iloc[0]
        photometrics.add(ds.PhotometricInterpretation)
        assert str(ds.PatientName).startswith("SYNTH^") and ds.PatientID.startswith("SYN")
        arr = ds.pixel_array
        assert arr.dtype == np.uint16 and arr.max() <= 4095
        # joint centres: the knee is bright (bone) around them after undoing MONOCHROME1
        v = arr.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            v = v.max() - v
        for r in grp.itertuples():
            assert 0 <= r.x < SMALL[1] and 0 <= r.y < SMALL[0]
            patch = v[int(r.y) - 40 : int(r.y) - 10, int(r.x) - 20 : int(r.x) + 20]  # femoral condyles
            assert patch.mean() > np.percentile(v, 60)
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    # every variant is present even in a tiny tree (exact shares, at least one each)
    per_image = truth.drop_duplicates("path")
    assert set(per_image["modality"]) == {"DX", "CR"}
    assert "PixelSpacing" in set(per_image["spacing_tag"])
    assert set(per_image["rescale_slope"]) >= {1.0}


def test_dicom_tree_contents_and_other_series(tree):
    import pydicom

    out, truth = tree
    for visit in (12, 24):
        c = pd.read_csv(out / f"{visit}m" / "contents.csv", dtype=str)
        assert {"Folder", "ParticipantID", "StudyDate", "Barcode", "SeriesDescription"} <= set(c.columns)
        for row in c.itertuples():
            f = out / f"{visit}m" / row.Folder / "001"
            assert f.is_file(), f
            assert row.Folder.split("/")[1] == row.ParticipantID and row.Folder.endswith(row.Barcode)
        knees = c[c.SeriesDescription == syn.KNEE_SERIES]
        assert len(knees) == 5
        others = c[c.SeriesDescription != syn.KNEE_SERIES]
        assert len(others) >= 1 and set(others.SeriesDescription) <= set(syn.OTHER_SERIES)
        ds = pydicom.dcmread(out / f"{visit}m" / others.Folder.iloc[0] / "001")
        assert ds.SeriesDescription != syn.KNEE_SERIES
    assert not truth["path"].isin([f"{v}m/{f}/001" for v in (12, 24)
                                   for f in pd.read_csv(out / f"{v}m" / "contents.csv", dtype=str)
                                   .query("SeriesDescription != @syn.KNEE_SERIES").Folder]).any()


def test_label_tables_parse_and_match_truth(tree):
    out, truth = tree
    for visit, code in ((12, "01"), (24, "03")):
        lab = pd.read_csv(out / f"kxr_sq_bu{code}.txt", sep="|", dtype=str)
        vv = f"V{code}"
        expect = ["ID", "SIDE", "READPRJ", "VERSION"] + [f"{vv}{f}" for f in syn.LABEL_FEATURES]
        assert list(lab.columns) == expect
        assert set(lab["SIDE"]) <= {"1: Right", "2: Left"}
        assert set(lab["READPRJ"]) <= {"15", "37"}
        main = lab[lab.READPRJ == "15"]
        assert not main.duplicated(["ID", "SIDE"]).any()
        t = truth[truth.visit == visit].assign(
            SIDE=lambda d: d.side.map({"R": "1: Right", "L": "2: Left"}), ID=lambda d: d.patient_id)
        merged = t.merge(main, on=["ID", "SIDE"], validate="one_to_one")
        assert len(merged) == len(t)
        kl = merged[f"{vv}XRKL"]
        missing = kl == ".M"
        assert (merged.loc[missing, "klg_label"].isna()).all()
        parsed = kl[~missing].str.split(":").str[0].astype(int)
        assert (parsed.to_numpy() == merged.loc[~missing, "klg"].to_numpy()).all()
        assert kl[~missing].str.fullmatch(r"\d: \d").all()
    all_labels = pd.concat(pd.read_csv(p, sep="|", dtype=str) for p in sorted(out.glob("kxr_sq_bu*.txt")))
    assert (all_labels.READPRJ == "37").any()  # duplicate reads to drop
    assert truth["klg_label"].isna().any()  # and missing codes


def test_bilateral_dataset_helper_roundtrip(tmp_path):
    import pydicom

    rng = np.random.default_rng(0)
    img, _ = syn.render_bilateral(2, 2, rng, shape=(200, 256), spacing_mm=1.4)
    stored = syn.to_stored(img, "MONOCHROME1", rescale=(2.0, 0.0), value_range=7900)
    ds = syn.bilateral_dataset(stored, 0.15, "MONOCHROME1", modality="CR", rescale=(2.0, 0.0),
                               spacing_tag="PixelSpacing", uid_seed="x")
    f = syn.save_dataset(ds, tmp_path / "a" / "001")
    back = pydicom.dcmread(f)
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert "ImagerPixelSpacing" not in back and float(back.PixelSpacing[0]) == 0.15
    np.testing.assert_array_equal(back.pixel_array, stored)
    # MONOCHROME1 stores bone dark: stored values anti-correlate with the [0,1] image
    assert np.corrcoef(stored.ravel(), img.ravel())[0, 1] < -0.99
    assert syn.bilateral_dataset(stored, 0.15, uid_seed="x").SOPInstanceUID == ds.SOPInstanceUID
    with pytest.raises(ValueError, match="photometric"):
        syn.bilateral_dataset(stored, 0.15, "RGB")


# ----------------------------------------------------------------------------- CLI

def test_cli_synth_png_and_dicom(tmp_path, capsys):
    from klgrade.cli import main
    from klgrade.ingest.manifest import read_manifest

    assert main(["synth", "--patients", "4", "--out", str(tmp_path / "png"), "--size", "32", "--seed", "1"]) == 0
    df = read_manifest(tmp_path / "png")
    assert len(df) == 16 and "wrote 16 PNG crops" in capsys.readouterr().out
    assert main(["synth", "--patients", "1", "--out", str(tmp_path / "dcm"), "--format", "dicom",
                 "--visits", "12", "--shape", "300x400"]) == 0
    assert len(list(Path(tmp_path / "dcm").glob("12m/*/9*/*/*/001"))) >= 1
    assert (tmp_path / "dcm" / "kxr_sq_bu01.txt").is_file()
    assert main(["synth", "--patients", "0", "--out", str(tmp_path / "x")]) == 1
    assert "--patients must be >= 1" in capsys.readouterr().err
