"""Controlled site shifts (evaluation re-renderings) and the SiteShiftAugment training op."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from klgrade.augment.augment import Augment
from klgrade.augment.site_shift import SHIFTS, SiteShiftAugment, apply_shift, shift_names, write_shifted
from klgrade.config import AugmentConfig
from klgrade.ingest.images import read_image
from klgrade.synthetic import render_knee


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
    aug = Augment()
    assert isinstance(aug.site, SiteShiftAugment) and aug.site.photometric in aug.ops
    assert Augment(AugmentConfig(site_shift=False)).site is None


def test_fused_warp_equals_framing_then_jitter():
    """Augment.warp (one resampling) == the jitter followed by the site framing (two resamplings),
    up to the second interpolation's smoothing."""
    import torch.nn.functional as F

    from klgrade.augment.augment import Augment

    x = F.interpolate(torch.rand(5, 1, 6, 6), size=64, mode="bicubic", align_corners=False).clamp(0, 1)
    aug = Augment()
    fused = aug.warp(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    theta = aug.jitter_theta(5, g)  # same draws, same order as warp
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    jittered = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    two_pass = aug.site.geometry(jittered, g)
    assert (fused - two_pass).abs().mean() < 0.01
    assert (fused - x).abs().mean() > 0.02  # and it did move the images


def test_photometric_ops_leave_unselected_images_alone():
    aug = SiteShiftAugment()
    x = torch.rand(16, 1, 96, 96)
    for op in (aug.curve, aug.blur, aug.texture, aug.noise):
        y = op(x, torch.Generator().manual_seed(0))
        changed = (y - x).flatten(1).abs().amax(1) > 0
        assert 0 < changed.sum() < 16, op.__name__  # selected by its probability, not all or none


def _lag1(d: torch.Tensor) -> float:
    d = d - d.mean(dim=(2, 3), keepdim=True)
    return float(((d[..., 1:] * d[..., :-1]).mean() / d.var()).item())


def test_noise_grain_correlates_neighbours_and_keeps_the_amplitude():
    """A film's noise reaches the view resampled (neighbouring pixels correlated ~0.4); the grain
    option draws such noise, at the same amplitude, and leaves the default independent."""
    from klgrade.config import SiteShiftConfig

    x = torch.full((16, 1, 224, 224), 0.5)  # grain is given in px at 224 px
    only_noise = dict(p_geometry=0, p_frame=0, p_curve=0, p_blur=0, p_texture=0, p_noise=1, noise=0.05)
    plain = SiteShiftAugment(SiteShiftConfig(**only_noise)).photometric(x, torch.Generator().manual_seed(0)) - x
    grainy = SiteShiftAugment(SiteShiftConfig(**only_noise, noise_grain=1.0)).photometric(
        x, torch.Generator().manual_seed(0)) - x
    assert abs(_lag1(plain)) < 0.03
    assert 0.15 < _lag1(grainy) < 0.8  # sigma U(0, 1 px at 224): lag-1 correlation 0 ... 0.78 per image
    # same sigma draws, rescaled to unit variance: the amplitude is the plain noise's
    assert grainy.std().item() == pytest.approx(plain.std().item(), rel=0.1)


def test_noise_grain_off_keeps_the_random_stream():
    """Configs saved before the grain option reproduce exactly: grain 0 draws nothing extra."""
    from klgrade.config import SiteShiftConfig

    x = torch.rand(8, 1, 48, 48)
    a = SiteShiftAugment(SiteShiftConfig())(x, torch.Generator().manual_seed(5))
    b = SiteShiftAugment(SiteShiftConfig(noise_grain=0.0))(x, torch.Generator().manual_seed(5))
    c = SiteShiftAugment(SiteShiftConfig(noise_grain=1.0))(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
