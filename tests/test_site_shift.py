"""Controlled site shifts (evaluation re-renderings) and the SiteShiftAugment training op."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from klgrade.config import AugmentConfig
from klgrade.data.dataset import Augment
from klgrade.data.images import read_image
from klgrade.data.site_shift import SHIFTS, SiteShiftAugment, apply_shift, shift_names, write_shifted
from klgrade.data.synthetic import render_knee


@pytest.fixture(scope="module")
def knee():
    img, _ = render_knee(2, np.random.default_rng(0), size_px=96)
    return img


def test_every_shift_is_deterministic_and_valid(knee):
    for name in SHIFTS:
        a, b = apply_shift(knee, name, "k1"), apply_shift(knee, name, "k1")
        assert np.array_equal(a, b), name
        assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert apply_shift(knee, "aspect_wide").shape[1] / apply_shift(knee, "aspect_wide").shape[0] == \
        pytest.approx(1.85, rel=0.05)
    assert not np.array_equal(apply_shift(knee, "noise", "a"), apply_shift(knee, "noise", "b"))
    # zoom-in magnifies: the centre pixel stays, the frame shows less
    z = apply_shift(knee, "zoom_in_30")
    assert z.shape == knee.shape and abs(float(z[48, 48]) - float(knee[48, 48])) < 0.05


def test_shift_names():
    assert shift_names("all") == list(SHIFTS)
    assert shift_names("blur, rgb") == ["blur", "rgb"]
    with pytest.raises(ValueError, match="unknown shift"):
        shift_names("blur,sepia")


def test_written_encodings_read_back(knee, tmp_path):
    src = tmp_path / "k.png"
    Image.fromarray((knee * 255 + 0.5).astype(np.uint8)).save(src)
    p16 = write_shifted(src, "bit16", tmp_path / "k16.png")
    prgb = write_shifted(src, "rgb", tmp_path / "krgb.png")
    with Image.open(p16) as im:
        assert im.mode.startswith("I") and np.asarray(im).max() > 255
    with Image.open(prgb) as im:
        assert im.mode == "RGB"
    a, b = read_image(src), read_image(prgb)
    assert np.array_equal(a, b)
    c = read_image(p16)  # a linear map of the 8-bit values
    assert np.corrcoef(a.ravel(), c.ravel())[0, 1] > 0.999


def test_site_shift_augment_batched_and_seeded():
    x = torch.rand(6, 1, 48, 48)
    aug = SiteShiftAugment()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)


def test_augment_includes_site_shift_by_default():
    assert any(isinstance(op, SiteShiftAugment) for op in Augment().ops)
    assert not any(isinstance(op, SiteShiftAugment) for op in Augment(AugmentConfig(site_shift=False)).ops)
