"""klgrade.ingest.roi: the one knee locator (ingest and view); klgrade.ingest.crop: the square crop."""
from __future__ import annotations

import numpy as np
import pytest

from klgrade.ingest import crop as crops
from klgrade.ingest import roi
from klgrade.synthetic import render_bilateral, render_knee

SHAPE = (800, 1000)  # small films keep the test fast; spacing scales so the legs fit


@pytest.fixture(scope="module")
def films():
    """Two dozen bilateral films across grades, exposure, noise, gamma and pixel spacing."""
    rng = np.random.default_rng(2024)
    out = []
    for i in range(24):
        sp = 360.0 / SHAPE[1] * rng.uniform(0.85, 1.15)
        img, truth = render_bilateral(i % 5, int(rng.integers(5)), rng, spacing_mm=sp, shape=SHAPE,
                                      exposure=rng.uniform(0.4, 1.3), noise=rng.uniform(0.005, 0.03))
        if i % 3 == 0:
            img = img * rng.uniform(0.2, 0.6)  # under-exposed, low contrast
        out.append((img, truth, sp))
    return out


def test_bilateral_localisation_within_5mm(films):
    errors, wrong_but_ok = [], 0
    for img, truth, sp in films:
        locs = roi.locate_bilateral(img, sp)
        for side in "RL":
            loc = locs[side]
            err = np.hypot(loc.x - truth[side][0], loc.y - truth[side][1]) * sp
            errors.append(err if loc.ok else np.inf)
            wrong_but_ok += loc.ok and err > 10
    errors = np.array(errors)
    assert wrong_but_ok == 0  # never a confident gross error
    assert np.mean(errors <= 5.0) >= 0.98, np.sort(errors)[-5:]
    assert np.median(errors) < 2.0


def test_collimation_borders_and_markers(films):
    """Unexposed collimation borders (white in MONOCHROME2) and lead markers do not pass for bone."""
    rng = np.random.default_rng(3)
    for img, truth, sp in films[:8]:
        img = img.copy()
        t, b, left, right = (int(v) for v in rng.integers(15, 60, size=4))
        img[:t] = img[-b:] = 0.97
        img[:, :left] = img[:, -right:] = 0.97
        y, x = int(rng.integers(80, 200)), int(rng.integers(100, 850))
        img[y: y + 40, x: x + 30] = 1.0  # an "R" marker
        locs = roi.locate_bilateral(img, sp)
        for side in "RL":
            assert locs[side].ok, locs[side].reason
            assert np.hypot(locs[side].x - truth[side][0], locs[side].y - truth[side][1]) * sp <= 5.0


def test_not_a_knee_is_reported_not_guessed():
    rng = np.random.default_rng(1)
    noise = rng.random(SHAPE).astype(np.float32)
    flat = np.full(SHAPE, 0.4, np.float32) + 0.01 * rng.standard_normal(SHAPE).astype(np.float32)
    for img in (noise, flat):
        locs = roi.locate_bilateral(img, 0.36)
        assert not locs["R"].ok and not locs["L"].ok
        assert locs["R"].reason
        with pytest.raises(roi.LocalisationError, match="film.png: knee joint not located"):
            locs["R"].require("film.png")
    # one leg only: the empty side is reported, the other still found
    img, truth = render_bilateral(2, 2, rng, spacing_mm=0.36, shape=SHAPE)
    img[:, : SHAPE[1] // 2] = 0.05 + 0.01 * rng.standard_normal((SHAPE[0], SHAPE[1] // 2))
    locs = roi.locate_bilateral(img, 0.36)
    assert not locs["R"].ok and locs["L"].ok
    assert np.hypot(locs["L"].x - truth["L"][0], locs["L"].y - truth["L"][1]) * 0.36 <= 5.0


def test_unilateral_any_framing_with_and_without_spacing():
    rng = np.random.default_rng(7)
    for _ in range(8):
        size = int(rng.integers(220, 420))
        fov = float(rng.uniform(130, 200))
        img, (cx, cy) = render_knee(int(rng.integers(5)), rng, size_px=size, fov_mm=fov, jitter_mm=12)
        sp = fov / size
        known = roi.locate_joint(img, sp)
        assert known.ok and np.hypot(known.x - cx, known.y - cy) * sp <= 5.0
        blind = roi.locate_joint(img, None)  # no spacing: scale searched, then estimated
        assert blind.ok and blind.spacing_estimated
        assert np.hypot(blind.x - cx, blind.y - cy) * sp <= 6.0
        assert 0.7 < blind.spacing_mm / sp < 1.4


def test_crop_square_geometry_flip_and_padding():
    img = np.zeros((300, 400), np.float32)
    img[148:153, 98:103] = 1.0  # a 5x5 dot centred at (x=100, y=150)
    img[150, 130] = 1.0  # a marker 30 px to the right
    crop = crops.crop_square(img, (100, 150), fov_mm=20.0, spacing_mm=0.2, out_px=50)  # 100 px → 50
    assert crop.shape == (50, 50) and crop.dtype == np.float32
    yy, xx = np.unravel_index(np.argmax(crop), crop.shape)
    assert abs(yy - 24.5) <= 1 and abs(xx - 24.5) <= 1
    assert crop[24:26, 38:41].max() > 0  # the marker, 30 px → 15 px right of centre
    flipped = crops.crop_square(img, (100, 150), 20.0, 0.2, 50, flip=True)
    np.testing.assert_array_equal(flipped, crop[:, ::-1])
    assert flipped[24:26, 9:12].max() > 0  # the marker is now on the left
    # a crop reaching past the image edge is filled, not shifted
    edge = crops.crop_square(img + 0.5, (0, 0), 20.0, 0.2, 50, fill=0.0)
    assert edge[:20, :20].max() == 0.0 and edge[30:, 30:].min() > 0.4
    # non-square pixels: (row, col) spacing gives a square field of view in mm
    tall = crops.crop_square(img, (100, 150), 20.0, (0.1, 0.2), 50)
    yy, xx = np.unravel_index(np.argmax(tall), tall.shape)
    assert abs(yy - 24.5) <= 1 and abs(xx - 24.5) <= 1


def test_to_uint16_uses_full_range():
    rng = np.random.default_rng(0)
    crop = rng.random((64, 64)).astype(np.float32) * 0.2 + 0.3
    out = crops.to_uint16(crop)
    assert out.dtype == np.uint16 and out.min() == 0 and out.max() == 65535
    assert not crops.to_uint16(np.zeros((8, 8), np.float32)).any()


@pytest.mark.parametrize("shape, n_films", [((2000, 2560), 8), ((1000, 1280), 15)])
def test_localisation_across_film_shapes(shape, n_films):
    """The same physical films at OAI size and as a 2x-downsampled export (issue 15: 1000x1280 films
    were drawn 128-250 mm wide, too narrow for two legs): every knee within 5 mm at both."""
    from klgrade.synthetic import film_spacing_range

    lo, hi = film_spacing_range(shape)
    errors = []
    for i in range(n_films):
        rng = np.random.default_rng([15, i])
        sp = float(rng.uniform(lo, hi))
        img, truth = render_bilateral(i % 5, int(rng.integers(5)), rng, spacing_mm=sp, shape=shape)
        locs = roi.locate_bilateral(img, sp)
        for side in "RL":
            err = np.hypot(locs[side].x - truth[side][0], locs[side].y - truth[side][1]) * sp
            errors.append(err if locs[side].ok else np.inf)
    assert max(errors) <= 5.0, np.round(errors, 1)


def test_synth_at_a_smaller_shape_is_a_coarser_export_and_prepares(tmp_path, capsys):
    """`synth --shape 1000x1280` states a spacing that makes the film as wide (mm) as an OAI film,
    and `prepare oai` finds every graded knee on it (issue 15: 20 of 22 were rejected)."""
    import pandas as pd

    from klgrade.cli import main
    from klgrade.synthetic import FILM_WIDTH_MM, film_spacing_range

    assert film_spacing_range((2000, 2560)) == pytest.approx((0.1, 0.2))  # unchanged at the default
    assert film_spacing_range((1000, 1280)) == pytest.approx((0.2, 0.4))
    data, out = tmp_path / "dcm", tmp_path / "prep"
    assert main(["synth", "--patients", "2", "--out", str(data), "--format", "dicom", "--shape", "1000x1280",
                 "--visits", "12", "--seed", "15"]) == 0
    truth = pd.read_csv(data / "truth.csv")
    width_mm = truth["spacing_mm"] * truth["cols"]
    assert width_mm.between(*FILM_WIDTH_MM).all()
    labels = sorted(map(str, data.glob("kxr_sq_bu*.txt")))
    assert main(["prepare", "oai", "--images", str(data), "--labels", *labels, "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    rejects = pd.read_csv(out / "rejects.csv") if (out / "rejects.csv").is_file() else pd.DataFrame(columns=["reason"])
    assert not rejects["reason"].astype(str).str.contains("not located").any(), rejects["reason"].tolist()
    graded = truth["klg_label"].notna().sum()
    assert len(pd.read_csv(out / "manifest.csv")) == graded


def test_view_and_ingest_share_the_locator_and_its_resolution():
    """Issue 15: predict's view of a film is centred where prepare oai located the joint (one
    locator, on the film reduced by the same factor whatever the view size)."""
    from klgrade.view.entrance import _knee, reduce_for_view

    rng = np.random.default_rng(5)
    img, truth = render_bilateral(2, 3, rng, spacing_mm=0.14, shape=(2000, 2560))
    ingest = roi.locate_bilateral(img, 0.14)
    for size in (64, 224):
        small, sp, f = reduce_for_view(img, 0.14, size)
        assert f == roi.locate_factor(0.14, img.shape) == 2
        cut = roi.bilateral_cut(small, sp)  # the view's: bilateral or not and where, on one work image
        assert cut == roi.split_legs(small, sp)  # ... the very column ingest splits at
        for side in "RL":
            knee = _knee(small, sp, side, size, f, cut)
            assert (knee.location["x"], knee.location["y"]) == pytest.approx((ingest[side].x, ingest[side].y), abs=0.06)


@pytest.mark.parametrize("text, why", [({"klgrade:pixel_spacing_mm": "abc"}, "is not a pixel spacing"),
                                       ({"klgrade:pixel_spacing_mm": "0.35", "klgrade:joint_xy_px": "5,900"},
                                        "is not a point inside"),
                                       ({"klgrade:pixel_spacing_mm": "nan"}, "is not a pixel spacing")])
def test_a_crops_stated_geometry_is_checked(tmp_path, text, why):
    from PIL import Image, PngImagePlugin

    from klgrade.view.entrance import ViewError, film_knees

    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    path = tmp_path / "crop.png"
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(path, pnginfo=info)
    with pytest.raises(ViewError, match=f"crop.png: .*{why}"):
        film_knees(path, 64)


def test_bilateral_cut_is_split_legs_of_a_bilateral_film_and_none_otherwise(films):
    for img, truth, sp in films[:4]:
        for spacing in (sp, None):
            cut = roi.bilateral_cut(img, spacing)
            assert cut == roi.split_legs(img, spacing) and truth["R"][0] < cut < truth["L"][0]
    img, truth, sp = films[0]
    leg = img[:, : (int(truth["R"][0]) + int(truth["L"][0])) // 2]
    wide = np.zeros((img.shape[0], 2 * leg.shape[1]), np.float32)  # one leg in the middle of a wide film
    wide[:, leg.shape[1] // 2: leg.shape[1] // 2 + leg.shape[1]] = leg
    assert roi.bilateral_cut(wide, sp) is None and roi.bilateral_cut(leg, sp) is None


@pytest.mark.parametrize("band", [0, 1, 4, 9])
def test_flat_margins_stop_at_the_first_textured_line_as_a_full_scan_does(band):
    # the fast path looks at the edge line first; the counts must be those of scanning every line
    rng = np.random.default_rng(band)
    small = rng.random((150, 190)).astype(np.float32)
    small[:, :band + 2] = 0.97  # an unexposed collimation frame on three sides
    small[:band] = 0.97
    small[small.shape[0] - band // 2:] = 0.97
    lo, hi = np.percentile(small[::2, ::2], (1, 99))
    tol = 0.02 * (hi - lo)

    def scan(std):
        nz = np.flatnonzero(std >= tol)
        return int(nz[0]) if len(nz) else len(std)

    rows, cols = small.std(axis=1), small.std(axis=0)
    want = (scan(rows), scan(rows[::-1]), scan(cols), scan(cols[::-1]))
    assert roi._flat_margins(small) == want
    assert roi._flat_margins(small, lo_hi=(lo, hi)) == want
    assert want == (band, band // 2, band + 2, 0)
