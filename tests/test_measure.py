"""Joint space width (klgrade.measure): accuracy on drawn knees, flags, units, the command."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from klgrade import synthetic as syn
from klgrade.measure import measure_knee


def _film(kr: int, kl: int, seed: int, spacing: float = 0.2, shape=(900, 1150), **anat):
    rng = np.random.default_rng(seed)
    pat = syn.random_patient(rng)
    ar, al = syn.random_anatomy(rng, pat), syn.random_anatomy(rng, pat)
    ar.update(anat)
    img, _ = syn.render_bilateral(kr, kl, rng, spacing_mm=spacing, shape=shape, anatomy_right=ar, anatomy_left=al)
    return img, ar, al


@pytest.fixture(scope="module")
def film():
    return _film(1, 3, seed=11)


def test_known_jsw_measured_within_tolerance(film):
    img, ar, al = film
    for side, klg, anat in (("R", 1, ar), ("L", 3, al)):
        truth = syn.true_jsw(klg, anat)
        r = measure_knee(img, 0.2, side)
        assert r.ok and r.unit == "mm" and r.medial_side == ("right" if side == "R" else "left")
        assert abs(r.medial.min - truth["jsw_medial_mm"]) < 0.5, (side, r.medial.min, truth)
        assert abs(r.lateral.min - truth["jsw_lateral_mm"]) < 0.5, (side, r.lateral.min, truth)
        assert r.medial.mean >= r.medial.min
    # narrowing shows: the KL3 knee's medial space is narrower than its own lateral one
    assert measure_knee(img, 0.2, "L").medial.min < measure_knee(img, 0.2, "L").lateral.min


def test_a_rim_line_inside_the_space_is_not_the_tibial_margin(film):
    """A tilted beam projects the tibial plateau's rim as a second bright line inside the joint
    space; the margin is the plateau's floor below it, where the cartilage sits."""
    img, ar, _ = film
    truth = syn.true_jsw(1, ar)["jsw_medial_mm"]
    clean = measure_knee(img, 0.2, "R").medial
    fx, fy = np.array(clean.femur).T
    tx, ty = np.array(clean.tibia).T
    with_rim = img.copy()
    for x in range(int(fx.min()), int(fx.max()) + 1):  # a 2-px line 60% of the way down to the floor
        yf, yt = np.interp(x, fx, fy), np.interp(x, tx, ty)
        y = int(round(yf + 0.6 * (yt - yf)))
        with_rim[y: y + 2, x] = img[int(round(yt)) + 3, x]  # as bright as the plateau's bone
    r = measure_knee(with_rim, 0.2, "R").medial
    assert abs(clean.min - truth) < 0.5 and abs(r.min - truth) < 0.5, (clean.min, r.min, truth)


def test_bone_on_bone_reads_zero_with_a_flag():
    # medial joint space closed: base width 0 and KL4 narrowing (drawn gap clipped to 0.3 mm, and
    # the attrition/varus close it over part of the compartment)
    img, ar, _ = _film(4, 0, seed=6, jsw_medial_mm=0.0, jsn_u=1.0, medial_jsn_share=1.0)
    assert syn.true_jsw(4, ar)["jsw_medial_mm"] == 0
    r = measure_knee(img, 0.2, "R")
    assert r.medial.ok and r.medial.min == 0 and r.medial.flag == "bone_on_bone"
    assert "bone on bone" in r.medial.reason and r.row()["medial_flag"] == "bone_on_bone"
    assert r.lateral.ok and r.lateral.min > 2 and not r.lateral.flag


def test_no_spacing_gives_relative_units_and_says_so(film):
    img, ar, _ = film
    mm = measure_knee(img, 0.2, "R")
    rel = measure_knee(img, None, "R")
    assert rel.unit == "%plateau" and "no pixel spacing" in rel.note
    # same knee: mm = % of the plateau width x plateau width in mm
    assert rel.medial.min * rel.plateau_px * 0.2 / 100 == pytest.approx(mm.medial.min, rel=0.05)


@pytest.mark.parametrize("img, why", [
    (np.zeros((20, 20), np.float32), "too small"),
    (np.full((200, 200), 0.5, np.float32), "joint not located"),
    (np.zeros((4, 50, 50), np.float32), "2-D"),
])
def test_bad_images_get_a_reason(img, why):
    r = measure_knee(img)
    assert not r.ok and why in r.reason and r.row()["medial_min_mm"] is None


def test_small_knee_is_too_small():
    img, _ = syn.render_knee(0, np.random.default_rng(1), size_px=64)
    r = measure_knee(img)
    assert not r.ok and "too small" in r.reason


def test_truth_and_command(tmp_path, film):
    from klgrade.cli import main

    img, _, _ = film
    d = tmp_path / "imgs"
    d.mkdir()
    crop = img[150:750, 0:575]  # the right knee alone, as a PNG (no spacing)
    stored = (crop * 255).astype(np.uint8)
    Image.fromarray(stored).save(d / "knee.png")
    Image.fromarray(255 - stored).save(d / "knee_bone_dark.png")  # a MONOCHROME1 export: read inverted
    (d / "broken.png").write_bytes(b"not a png")
    assert main(["measure", "--data", str(d), "--out", str(tmp_path / "out"), "--sheet", "4"]) == 0
    df = pd.read_csv(tmp_path / "out" / "jsw.csv").set_index("image_id", drop=False)
    assert list(df.columns[:8]) == ["image_id", "side", "medial_min_mm", "lateral_min_mm", "medial_mean_mm",
                                    "lateral_mean_mm", "unit", "ok"]
    assert df.loc["knee", "unit"] == "%plateau" and bool(df.loc["knee", "ok"])
    assert df.loc["knee_bone_dark", "medial_min_mm"] == pytest.approx(df.loc["knee", "medial_min_mm"], abs=0.05)
    assert "read inverted" in df.loc["knee_bone_dark", "note"] and "inverted" not in df.loc["knee", "note"]
    rej = pd.read_csv(tmp_path / "out" / "rejects.csv")
    assert "broken.png" in rej.loc[0, "path"] and "not a readable image" in rej.loc[0, "reason"]
    assert (tmp_path / "out" / "contact_sheet.png").stat().st_size > 1000


def test_real_crops_measured(real_data):
    paths = [sorted((real_data / "val" / g).glob("*.png"))[0] for g in ("0", "4")]
    from klgrade.ingest.images import read_image

    rows = [measure_knee(read_image(p)) for p in paths]
    assert all(r.unit == "%plateau" for r in rows)
    assert all(r.medial.ok or r.medial.reason for r in rows)


def test_json_and_page_fields(bilateral_dicom, tmp_path):
    """predict --json / POST /predict carry the numbers; the page shows them and the drawn lines."""
    import torch
    from fastapi.testclient import TestClient

    from klgrade.clinic.grader import Grader
    from klgrade.clinic.serve import create_app

    path, _ = bilateral_dicom  # right KL0, left KL4, 0.25 mm/px
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5)).eval()
    g = Grader(run_dir=tmp_path, kind="cnn", name="stub", model=model, img_size=224, mean=(0.5,) * 3,
               std=(0.25,) * 3, device=torch.device("cpu"))
    res = g.predict_file(path, include_view=True)
    right, left = res["knees"]
    for k in (right, left):
        assert k["jsw"]["unit"] == "mm" and k["jsw"]["medial"]["min"] is not None, k["jsw"]
        assert k["jsw_view"].startswith("data:image/png;base64,")
    assert left["jsw"]["medial"]["min"] < right["jsw"]["medial"]["min"]  # KL4 narrower than KL0
    with TestClient(create_app(grader=g), base_url="http://localhost") as c:
        page = c.get("/").text
        assert "jswText" in page and "jsw_view" in page
        r = c.post("/predict", files={"file": ("x.dcm", path.read_bytes())}, params={"heatmaps": "false"})
    assert r.status_code == 200
    knee = r.json()["knees"][0]
    assert {"medial", "lateral", "unit", "ok"} <= set(knee["jsw"]) and "jsw_view" in knee


def test_laterality_of_a_single_knee_sets_the_medial_side(film):
    """A crop in film orientation (kneeKL224 style): a right knee's medial side is on the image
    right; the given laterality decides it, and the readings follow the compartments."""
    from klgrade.measure.files import laterality_from_name

    img, ar, _ = film
    crop = img[150:750, 0:575]  # the right knee (KL1) alone, as on the film, no spacing
    truth = syn.true_jsw(1, ar)
    r, flipped = measure_knee(crop, laterality="R"), measure_knee(crop, laterality="L")
    assert r.medial_side == "right" and flipped.medial_side == "left" and "fibula" not in r.note
    mm = r.plateau_px * 0.2 / 100  # % of the plateau width -> mm at the film's 0.2 mm/px
    assert abs(r.medial.min * mm - truth["jsw_medial_mm"]) < 0.5, (r.medial.min * mm, truth)
    assert abs(r.lateral.min * mm - truth["jsw_lateral_mm"]) < 0.5, (r.lateral.min * mm, truth)
    assert flipped.medial.min == pytest.approx(r.lateral.min) and flipped.lateral.min == pytest.approx(r.medial.min)
    assert [laterality_from_name(n) for n in ("9001695L.png", "9003126R.png", "knee.png", "xR.png")] == [
        "L", "R", None, None]


def test_prepared_crops_measure_in_mm_like_their_film(synth_dicom, tmp_path):
    """`prepare oai` crops state their spacing and joint: `measure` and `predict` read them in mm
    (not relative units), with the medial side of the canonical orientation, and each crop reads
    what its film reads for that knee. Before, measure ignored the stated spacing and predict's JSW
    failed on the unlocated (stated) joint."""
    import glob

    import torch

    from klgrade.cli import main
    from klgrade.clinic.grader import Grader, knees_from_file
    from klgrade.ingest.oai import prepare_oai

    ds = tmp_path / "ds"
    prepare_oai(synth_dicom, sorted(glob.glob(str(synth_dicom / "kxr_sq_bu*.txt"))), ds, progress=False)
    assert main(["measure", "--data", str(ds), "--out", str(tmp_path / "out"), "--sheet", "0"]) == 0
    jsw = pd.read_csv(tmp_path / "out" / "jsw.csv").set_index("image_id")
    manifest = pd.read_csv(ds / "manifest.csv").set_index("image_id")
    assert (jsw["unit"] == "mm").all() and (jsw["medial_side"] == "right").all()
    assert jsw["ok"].mean() >= 0.9
    film, rows = next(iter(manifest.groupby("dicom")))
    _, knees = knees_from_file(synth_dicom / film, 64)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5)).eval()
    g = Grader(run_dir=tmp_path, kind="cnn", name="stub", model=model, img_size=64, mean=(0.5,) * 3,
               std=(0.25,) * 3, device=torch.device("cpu"))
    for k in knees:
        crop_id = rows.index[rows["side"] == k.side][0]
        for name in ("medial", "lateral"):
            on_film = getattr(k.jsw, name).min
            assert jsw.loc[crop_id, f"{name}_min_mm"] == pytest.approx(on_film, abs=0.3), (crop_id, name)
        (predicted,) = g.predict_file(ds / manifest.loc[crop_id, "path"])["knees"]
        assert predicted["jsw"]["unit"] == "mm" and predicted["jsw"]["medial_side"] == "right"
        assert predicted["jsw"]["medial"]["min"] == pytest.approx(k.jsw.medial.min, abs=0.3)


def test_predict_reads_the_medial_side_as_measure_does(film, tmp_path):
    """A crop named like kneeKL224's (``…L.png``: a left knee as on the film) gets its medial side
    from the name in `predict` as in `measure`, so the two report the same compartments. The same
    pixels under both names: the name decides, not the drawn fibula (predict let the fibula decide)."""
    import torch

    from klgrade.cli import main
    from klgrade.clinic.grader import Grader

    img, _, _ = film
    d = tmp_path / "crops"
    d.mkdir()
    stored = (img[150:750, 0:575] * 255).astype(np.uint8)  # the right knee, as on the film
    for name in ("9001695R.png", "9001695L.png"):
        Image.fromarray(stored).save(d / name)
    assert main(["measure", "--data", str(d), "--out", str(tmp_path / "out"), "--sheet", "0"]) == 0
    measured = pd.read_csv(tmp_path / "out" / "jsw.csv").set_index("image_id")
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5)).eval()
    g = Grader(run_dir=tmp_path, kind="cnn", name="stub", model=model, img_size=64, mean=(0.5,) * 3,
               std=(0.25,) * 3, device=torch.device("cpu"))
    for stem, medial_side in (("9001695R", "right"), ("9001695L", "left")):
        (knee,) = g.predict_file(d / f"{stem}.png")["knees"]
        assert knee["jsw"]["medial_side"] == measured.loc[stem, "medial_side"] == medial_side
        assert knee["jsw"]["medial"]["min"] == pytest.approx(measured.loc[stem, "medial_min_mm"], abs=1e-3)


def test_measure_and_predict_give_a_film_the_same_jsw(tmp_path):
    """One film, one set of numbers: `klgrade measure` and predict (with a small or a large view,
    which is cut from finer pixels) measure each knee on the same array. Before, measure read the
    film at full resolution and predict at the view's: the same knee differed by up to 0.05 mm."""
    import torch

    from klgrade.cli import main
    from klgrade.clinic.grader import Grader
    from klgrade.measure.files import knees_from_file
    from klgrade.view.entrance import at_locate_scale, read_film

    img, _ = syn.render_bilateral(2, 3, np.random.default_rng(0), spacing_mm=0.14, shape=(2000, 2560))
    d = tmp_path / "films"
    d.mkdir()
    syn.save_dataset(syn.bilateral_dataset(syn.to_stored(img), 0.14), d / "film.dcm")
    assert main(["measure", "--data", str(d), "--out", str(tmp_path / "out"), "--sheet", "0"]) == 0
    measured = pd.read_csv(tmp_path / "out" / "jsw.csv").set_index("image_id")
    assert (measured["unit"] == "mm").all() and measured["ok"].all()
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5)).eval()
    for size, own_pixels in ((64, True), (320, False)):  # 320 px: a view finer than the 2x-reduced film
        assert at_locate_scale(read_film(d / "film.dcm"), size) == own_pixels
        _, knees = knees_from_file(d / "film.dcm", size)
        assert all((k.measured_on is k) == own_pixels for k in knees)
        g = Grader(run_dir=tmp_path, kind="cnn", name="stub", model=model, img_size=size, mean=(0.5,) * 3,
                   std=(0.25,) * 3, device=torch.device("cpu"))
        result = g.predict_file(d / "film.dcm", include_view=True)
        for k, r in zip(knees, result["knees"]):
            assert r["jsw_view"].startswith("data:image/png")
            for name in ("medial", "lateral"):
                row = measured.loc[f"film_{k.side}"]
                assert getattr(k.jsw, name).min == pytest.approx(row[f"{name}_min_mm"], abs=1e-3), (size, k.side)
                assert r["jsw"][name]["min"] == pytest.approx(row[f"{name}_min_mm"], abs=1e-3)


def test_a_compartment_off_the_image_is_not_measured(film):
    """A knee cut by the frame: a compartment mostly beyond the image edge gets a reason, not the
    width of the repeated edge column (a kneeKL224 KL4 crop read 11.8% of the plateau width there).
    The part on the image is measured when most of the compartment is on it."""
    from klgrade.view.canonical import canonical_view

    img, _, al = film
    _, info = canonical_view(img, 64, spacing_mm=0.2, side="R")
    cx, w = info.centre[0], info.width_px
    whole = measure_knee(img[:, : int(cx + 0.8 * w)], 0.2, laterality="R")
    for cut, inside in ((0.35, True), (0.25, False)):  # the lateral side is the image left for a right knee
        r = measure_knee(img[:, int(cx - cut * w): int(cx + 0.8 * w)], 0.2, laterality="R")
        assert r.medial.ok and r.medial.min == pytest.approx(whole.medial.min, abs=0.2)
        if inside:
            assert r.lateral.ok and r.lateral.min == pytest.approx(whole.lateral.min, abs=0.3)
        else:
            assert not r.lateral.ok and np.isnan(r.lateral.min) and "outside the image" in r.lateral.reason
