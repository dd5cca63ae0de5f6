"""A PNG stored with bone dark (a MONOCHROME1 export) is read bone-bright and says so; upright
files, two-leg films, blank collimator bands and DICOMs are left as they are."""
from __future__ import annotations

import numpy as np
from PIL import Image

from klgrade.ingest.images import read_image_stated
from klgrade.ingest.polarity import NOTE, edge_contrast, stored_inverted
from klgrade.synthetic import bilateral_dataset, render_bilateral, render_knee, save_dataset, to_stored
from klgrade.view.entrance import film_knees


def _png(path, img: np.ndarray):
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


def _knees(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [render_knee(int(rng.integers(0, 5)), rng, size_px=224, fov_mm=float(rng.uniform(90, 260)))[0]
            for _ in range(n)]


def test_an_inverted_png_is_read_upright_and_gives_the_upright_view(tmp_path):
    for i, knee in enumerate(_knees(6)):
        upright = _png(tmp_path / f"up{i}.png", knee)
        stored = np.asarray(Image.open(upright), np.float32) / 255
        inverted = _png(tmp_path / f"inv{i}.png", 1.0 - stored)
        a, b = read_image_stated(upright), read_image_stated(inverted)
        assert not a.inverted and b.inverted
        np.testing.assert_allclose(b.pixels, a.pixels, atol=1e-6)
        (_, [ku]), (_, [ki]) = film_knees(upright, 64), film_knees(inverted, 64)
        assert np.array_equal(ku.view, ki.view)
        assert NOTE in ki.note and NOTE not in ku.note


def test_a_large_image_is_decided_on_a_sample_of_its_pixels():
    img, _ = render_knee(2, np.random.default_rng(5), size_px=1400, fov_mm=160)  # decided every 2nd px
    assert not stored_inverted(img) and stored_inverted(1.0 - img)


def test_upright_images_keep_their_grey_levels(tmp_path):
    rng = np.random.default_rng(1)
    films = [render_bilateral(int(rng.integers(0, 5)), int(rng.integers(0, 5)), rng, spacing_mm=0.5,
                              shape=(400, 512))[0] for _ in range(3)]
    for img in _knees(8, seed=2) + films:
        assert not stored_inverted(img)
    # framed tight on the legs, a two-leg film's middle is the dark gap between them: its layout decides
    legs = films[0][60:340, 40:472]
    assert edge_contrast(legs) < -0.1 and not stored_inverted(legs)
    # a collimator's blank white bands at the edges of an upright knee say nothing of the anatomy
    for img in _knees(4, seed=3):
        banded = img.copy()
        banded[:, :30], banded[:, -24:] = 1.0, 0.97  # the textured columns beyond them still tell
        assert edge_contrast(banded) > 0 and not stored_inverted(banded)
        banded[:, :70], banded[:, -70:] = 1.0, 0.97  # no texture near either edge: no decision
        assert np.isnan(edge_contrast(banded)) and not stored_inverted(banded)
    # flat or featureless frames are never inverted
    for img in (np.zeros((64, 64), np.float32), np.full((80, 50), 0.7, np.float32),
                rng.random((100, 120), np.float32)):
        assert not stored_inverted(img)


def test_a_monochrome1_dicom_is_decided_by_its_header(tmp_path):
    rng = np.random.default_rng(4)
    img, _ = render_bilateral(1, 2, rng, spacing_mm=0.5, shape=(400, 512))
    for phot in ("MONOCHROME1", "MONOCHROME2"):
        path = save_dataset(bilateral_dataset(to_stored(img, phot), 0.5, phot), tmp_path / f"{phot}.dcm")
        stated = read_image_stated(path)
        assert not stated.inverted
        assert edge_contrast(stated.pixels[:, 40:220]) > 0.05  # the right leg: bone bright either way


def test_kneekl224_crops_stored_inverted_are_found(real_data):
    """Seven val patients' crops (14 knees) are stored bone-dark (checked by eye); no other val
    crop is."""
    found = sorted(p.name for p in (real_data / "val").glob("*/*.png") if read_image_stated(p).inverted)
    patients = sorted({name[:-5] for name in found})
    assert patients == ["9558684", "9579255", "9596723", "9599715", "9625187", "9775753", "9790812"]
    assert len(found) == 14
