import numpy as np
import pytest
import scipy.fft as sfft

from tcbf_live.stream.tcbf.registration import correlation_peak, register_shift


def fourier_shift(img, shift):
    qx = sfft.fftfreq(img.shape[0])[:, None]
    qy = sfft.fftfreq(img.shape[1])[None, :]
    ramp = np.exp(-2j * np.pi * (qx * shift[0] + qy * shift[1]))
    return sfft.ifft2(sfft.fft2(img) * ramp).real


@pytest.mark.parametrize("shift", [(1.37, -2.61), (-0.25, 0.5), (7.9, 3.05)])
def test_recovers_known_subpixel_shift(shift):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((64, 80))
    # smooth so the image is band-limited and the Fourier shift is a true translation
    q2 = sfft.fftfreq(64)[:, None] ** 2 + sfft.fftfreq(80)[None, :] ** 2
    base = sfft.ifft2(sfft.fft2(base) * np.exp(-q2 / 0.01)).real
    moved = fourier_shift(base, shift)
    np.testing.assert_allclose(register_shift(base, moved, upsample=100), shift, atol=0.01)
    coarse = register_shift(base, moved, upsample=8)
    np.testing.assert_allclose(coarse, shift, atol=1 / 8)


def test_local_search_agrees_with_the_full_map():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((48, 56))
    q2 = sfft.fftfreq(48)[:, None] ** 2 + sfft.fftfreq(56)[None, :] ** 2
    base = sfft.ifft2(sfft.fft2(base) * np.exp(-q2 / 0.01)).real
    moved = fourier_shift(base, (1.3, -0.7)) + 0.3 * rng.standard_normal(base.shape)
    cross = sfft.fft2(moved - moved.mean()) * np.conj(sfft.fft2(base - base.mean()))
    full, q_full = correlation_peak(cross, 8)
    local, q_local = correlation_peak(cross, 8, max_shift_px=3)
    np.testing.assert_allclose(local, full, atol=1e-9)
    assert q_local == pytest.approx(q_full, rel=1e-6) and q_full > 3
