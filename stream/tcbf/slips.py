"""Missed triggers, from the parallax itself and from the frames that arrived.

A detector that skips a trigger records one frame fewer and every later frame lands one
position early (the image shears). Live, `slip_lines` finds the line from the tile images
(shifted copies of one object, so line r of one tile and line r + dr of another must agree at
lag 0 unless the frames slipped between them); at the series end, frames missing from the end
of an acquisition with no other gap (`slip_suspected`) say the same.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from tcbf_live.stream.tcbf.spectral_kernels import slip_votes

SLIP_SIGMA = 5.0  # standard errors by which a sideways-lag preference must exceed zero
MAX_SLIP_PAIRS = 200  # tile pairs used by `slip_lines` (evenly chosen beyond that)


def slip_lines(
    images: np.ndarray, shifts_px: np.ndarray, valid: np.ndarray, first_line: int = 0
) -> list[tuple[int, int]]:
    """Scan lines at which the frames start landing one position off (a missed trigger), from
    the parallax itself.

    Neighbouring lines of one image hold different parts of the sample, so their sideways
    offset says little. But tcBF tile images are shifted copies of one object: with correction
    shifts `s_t`, line r of tile t shows the same object line as line r + (s_t - s_u)_row of
    tile u, at the column offset (s_t - s_u)_col. Once that offset is undone the two lines agree
    best at lag 0, unless the frames slipped by one position between the two acquisition
    lines, when lag +-1 wins. For every hypothesis "slip at the start of line L", the pairs of
    lines that straddle L vote with (best of lag +-1) - (lag 0) correlation; a line where this
    preference exceeds SLIP_SIGMA standard errors is reported with the step's sign (+1: later
    lines' content lies one column further right). `images` (n, rows, cols) over fully acquired
    lines `valid` (rows, cols); returns [(line + first_line, step)]."""
    n, rows, cols = images.shape
    # lines at least half acquired, up to the first that is not (the live scan front)
    usable = valid.mean(axis=1) >= 0.5
    rows = int(np.argmin(usable)) if not usable.all() else rows
    if rows < 4 or cols < 8:
        return []
    d = shifts_px[:, None, :] - shifts_px[None, :, :]  # (t, u, 2)
    t_idx, u_idx = np.nonzero((d[..., 0] >= 1.0) & (d[..., 0] <= rows - 4))
    if t_idx.size == 0:
        return []
    pick = np.linspace(0, t_idx.size - 1, min(t_idx.size, MAX_SLIP_PAIRS)).astype(int)
    used, local = np.unique(np.concatenate([t_idx[pick], u_idx[pick]]), return_inverse=True)
    spectra, ends = normalised_lines(images[used, :rows], valid[:rows])
    acc = slip_votes(spectra, ends, cols, local[: pick.size], local[pick.size :],
                     np.ascontiguousarray(d[t_idx[pick], u_idx[pick]]))  # fmt: skip
    sums = np.cumsum(acc, axis=1)[:, :rows]
    count = np.maximum(sums[4], 1)
    out: list[tuple[int, int]] = []
    for step, (s1, s2) in ((-1, sums[0:2]), (1, sums[2:4])):
        mean = s1 / count
        se = np.sqrt(np.maximum(s2 / count - mean**2, 1e-12) / count)
        tstat = np.where(sums[4] >= 4, mean / se, -np.inf)
        hits = np.flatnonzero(tstat > SLIP_SIGMA)
        # one slip per run of neighbouring hypotheses: the strongest
        runs = np.split(hits, np.flatnonzero(np.diff(hits) > 1) + 1) if hits.size else []
        out += [(int(r[np.argmax(tstat[r])]) + first_line, step) for r in runs]
    return sorted(out)


def normalised_lines(images: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each line of each image with its mean taken off and scaled to unit RMS, as its rfft
    (n, rows, cols // 2 + 1) and its first and last samples (n, rows, 2). Missing or excluded
    positions take their line's mean: no signal. The RMS comes from the spectrum (Parseval)."""
    img = np.asarray(images, np.float64)
    cols = img.shape[2]
    if not valid.all():
        line_mean = (img * valid).sum(axis=2, keepdims=True) / np.maximum(
            valid.sum(axis=1), 1)[:, None]  # fmt: skip
        img = np.where(valid, img, line_mean)
    spectra = scipy.fft.rfft(img, axis=2)
    mean = spectra[..., :1].real / cols
    spectra[..., 0] = 0.0
    q = np.arange(spectra.shape[2])
    weight = np.where((q == 0) | (2 * q == cols), 1.0, 2.0)  # the half spectrum's share
    rms = np.sqrt((weight * (spectra.real**2 + spectra.imag**2)).sum(axis=2, keepdims=True)) / cols
    # a constant line leaves only the transform's rounding: no signal, not unit-RMS noise
    flat = rms <= 1e-9 * np.abs(mean) + 1e-30
    scale = np.where(flat, 0.0, 1.0 / np.where(flat, 1.0, rms))
    spectra *= scale
    return spectra, (img[..., [0, -1]] - mean) * scale


def slip_suspected(seen: np.ndarray, frames_expected: int) -> int:
    """Frames missing from the *end* of an acquisition that otherwise has no gap: what a
    detector that recorded fewer frames than triggers (missed triggers) leaves. 0 if the
    missing frames are anywhere else (dropped in transport) or none are missing."""
    seen = np.asarray(seen[:frames_expected], bool)
    got = int(seen.sum())
    if got == 0 or got == frames_expected:
        return 0
    return frames_expected - got if seen[:got].all() else 0
