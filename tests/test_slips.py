"""`slips.slip_votes` (Fourier space, no line transformed back) against the direct real-space
computation it replaces: each pair's lines interpolated, moved along the line, and correlated
at lags -1, 0, +1 over the overlapping samples."""

import numpy as np
import pytest
import scipy.fft

from tcbf_live.stream.tcbf.slips import normalised_lines
from tcbf_live.stream.tcbf.spectral_kernels import slip_votes


def direct_votes(img: np.ndarray, t: np.ndarray, u: np.ndarray, d: np.ndarray) -> np.ndarray:
    _, rows, cols = img.shape
    acc = np.zeros((5, rows + 2))
    for a, b, (dr, dc) in zip(t, u, d, strict=True):
        n0 = int(np.floor(dr))
        w, m = dr - n0, rows - n0 - 1
        line = (1 - w) * img[b, n0 : n0 + m] + w * img[b, n0 + 1 : n0 + 1 + m]
        ramp = np.exp(2j * np.pi * np.fft.rfftfreq(cols) * dc)
        moved = np.fft.irfft(np.fft.rfft(line, axis=1) * ramp, cols, axis=1)
        own = img[a, :m]
        cc = {k: (own[:, max(0, -k) : cols - max(0, k)] * moved[:, max(0, k) : cols + min(0, k)])
              .mean(1) for k in (-1, 0, 1)}  # fmt: skip
        left, right = cc[-1] - cc[0], cc[1] - cc[0]
        lo = np.arange(m) + 1
        hi = np.minimum(np.floor(np.arange(m) + dr).astype(int), rows - 1) + 1
        for row, val in enumerate((left, left**2, right, right**2, np.ones(m))):
            acc[row] += np.bincount(lo, val, rows + 2) - np.bincount(hi, val, rows + 2)
    return acc


@pytest.mark.parametrize(("rows", "cols"), [(20, 16), (37, 63), (48, 64)])
def test_slip_votes_equal_the_direct_correlations(rows, cols):
    rng = np.random.default_rng(rows)
    img = rng.normal(size=(12, rows, cols))
    shifts = rng.uniform(-9, 9, size=(12, 2))
    d = shifts[:, None] - shifts[None]
    t, u = np.nonzero((d[..., 0] >= 1.0) & (d[..., 0] <= rows - 4))
    spectra = scipy.fft.rfft(img, axis=2)
    got = slip_votes(spectra, np.ascontiguousarray(img[..., [0, -1]]), cols, t, u,
                     np.ascontiguousarray(d[t, u]))  # fmt: skip
    want = direct_votes(img, t, u, d[t, u])
    assert t.size > 20 and np.abs(want[0]).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("cols", [15, 16])
def test_normalised_lines_take_off_the_mean_and_scale_to_unit_rms(cols):
    """Missing positions take their line's mean (no signal), then each line has zero mean and
    unit RMS: the spectrum and the end samples of exactly that line."""
    rng = np.random.default_rng(3)
    img = 50 + rng.normal(size=(4, 6, cols)) * rng.uniform(0.5, 3, size=(4, 6, 1))
    valid = rng.uniform(size=(6, cols)) > 0.3
    img[2, 4] = 37.3  # a constant line (a dead tile's): no signal, not rounding made unit-RMS
    line_mean = (img * valid).sum(2, keepdims=True) / valid.sum(1)[:, None]
    want = np.where(valid, img, line_mean) - line_mean
    with np.errstate(invalid="ignore"):  # the constant line: 0 / 0
        want /= np.sqrt((want**2).mean(2, keepdims=True))
    want[2, 4] = 0.0
    spectra, ends = normalised_lines(img, valid)
    np.testing.assert_allclose(scipy.fft.irfft(spectra, cols, axis=2), want, atol=1e-12)
    np.testing.assert_allclose(ends, want[..., [0, -1]], atol=1e-12)
