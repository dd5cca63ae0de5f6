"""klgrade.filters: OpenCV's separable filter standing in for scipy.ndimage's Gaussian filters."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from klgrade.filters import gaussian_filter


@pytest.mark.parametrize("dtype,tol", [(np.float32, 3e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("sigmas,order,mode", [((1.5, 1.5), 0, "reflect"), ((1.0, 2.0), 1, "reflect"),
                                               ((2.7, 0.7), 2, "nearest"), ((4.0, 0.7), 2, "nearest"),
                                               ((0.7, 0.7), 0, "nearest")])
def test_equals_scipy_gaussian_filter(dtype, tol, sigmas, order, mode):
    # borders matter: a ramp plus texture, and a kernel reaching past the edge of a 40-row image
    rng = np.random.default_rng(0)
    img = (np.linspace(0, 1, 40)[:, None] + 0.2 * rng.random((40, 57))).astype(dtype)
    want = ndimage.gaussian_filter(img, sigmas, order=(order, 0), mode=mode)
    got = gaussian_filter(img, *sigmas, order_rows=order, mode=mode)
    assert got.dtype == img.dtype and got.shape == img.shape
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_a_third_derivative_is_refused():
    with pytest.raises(ValueError, match="order 3"):
        gaussian_filter(np.zeros((8, 8), np.float32), 1.0, 1.0, order_rows=3)


@pytest.mark.parametrize("shape", [(7,), (192, 127), (300, 301)])
def test_percentile_and_median_are_numpys_numbers(shape):
    # exact equality: the locator's thresholds and the view's intensity map are built on them
    from klgrade.filters import median, percentile

    rng = np.random.default_rng(sum(shape))
    img = (rng.random(shape) ** 3).astype(np.float32)
    img.flat[:: 5] = 0.25  # ties, as flat film borders give
    many = np.concatenate([[0.5], np.linspace(5, 95, 19), [99.5]])
    for q in ((1, 99), 50, many, (0.0, 100.0)):
        np.testing.assert_array_equal(percentile(img, q), np.percentile(img, q))
    strided = img[::2, ::2] if img.ndim == 2 else img[::2]
    np.testing.assert_array_equal(percentile(strided, (1, 99)), np.percentile(strided, (1, 99)))
    assert median(img) == float(np.median(img))


def test_kernels_are_cached_and_read_only():
    # the locator asks for the same few kernels many times per knee: one array each, never changed
    from klgrade.filters import gaussian_kernel

    k = gaussian_kernel(1.8, 2)
    assert gaussian_kernel(1.8, 2) is k and not k.flags.writeable
    with pytest.raises(ValueError):
        k[0] = 1.0
    r = int(4 * 1.8 + 0.5)
    x = np.arange(-r, r + 1)
    g = np.exp(-0.5 * x * x / 1.8 ** 2)
    np.testing.assert_allclose(k, g / g.sum() * (x * x / 1.8 ** 4 - 1 / 1.8 ** 2), rtol=1e-12)


def test_area_reduce_is_the_block_mean_of_a_view_without_copying_it():
    from klgrade.filters import area_reduce

    rng = np.random.default_rng(0)
    img = rng.random((103, 130)).astype(np.float32)
    part = img[:, 7:]  # a row-strided view, as a film's leg or a closer look's window
    got = area_reduce(part, 4, 3)
    want = part[:100, :123].reshape(25, 4, 41, 3).mean(axis=(1, 3))
    assert got.shape == (25, 41)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert area_reduce(part, 1) is part


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["reflect", "nearest"])
def test_filtering_some_rows_gives_the_whole_images_numbers_there(dtype, mode):
    # JSW filters only the rows its path search reads: they must be the very numbers of the whole
    # image's filter, at the image's own border too; the rows not asked for are 0
    rng = np.random.default_rng(7)
    img = rng.random((120, 90)).astype(dtype)
    for sig_r, sig_c, order in ((1.5, 1.5, 0), (1.0, 2.0, 1), (2.7, 0.7, 2)):
        full = gaussian_filter(img, sig_r, sig_c, order_rows=order, mode=mode)
        for lo, hi in ((40, 70), (0, 9), (-5, 3), (100, 130), (3, 117), (60, 60)):
            part = gaussian_filter(img, sig_r, sig_c, order_rows=order, mode=mode, rows=(lo, hi))
            a, b = max(0, lo), min(120, hi)
            np.testing.assert_array_equal(part[a:b], full[a:b])
            assert not part[:a].any() and not part[b:].any()
