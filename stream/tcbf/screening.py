"""Frame screening: a dose model, anomalous frames and missed triggers, from the data alone.

Pure numerics (per-position sums in, masks and factors out). Why it exists: the alignment
cross-correlates virtual-BF images of BF-pixel groups. Anything that is the same, unshifted, in
every one of them (a blank frame, a flat frame, a hot pixel's position, a dimmer line start, a
beam-current ramp) is a *common-mode* feature that pulls every correlation peak to zero shift
and silently wrecks the fit. A missing frame is harmless (it carries no signal), so:

1. **Dose model.** The electrons delivered per frame are modelled as a separable product
   `D[row, col] = R[row] * C[col]` fitted by medians in the log domain: `R` follows the beam
   current over the scan (one value per line, milliseconds apart), `C` the line-start
   (flyback) behaviour common to all lines. Medians over a whole line or column average the
   sample's own contrast out, where raw per-frame sums would carry it (limited detector
   coverage). Every per-position value is divided by `D` (as a relative exposure), so dose
   fluctuations are not features.
2. **Anomalous frames** are positions whose frame disagrees with that model far beyond its
   noise: the dose residual `log(total / D)`, the BF fraction `bf / total`, and the pattern of
   electrons over the finest tiles of the alignment window (a chi-square against the tiles'
   median shares, cube-root transformed to near-normal, Wilson & Hilferty 1931). Each is
   scored in robust units (1.4826 x MAD over the scan, floored by its Poisson or binomial
   width); a frame is excluded at `OUTLIER_SIGMA` or beyond unless the neighbouring lines
   support the deviation (a sample feature spans lines, a glitch lives in the time of a frame),
   or at once when it belongs to a run that crosses a line end in acquisition order (a burst in
   time): a zero or flat frame, a zinger or overload pixel, a non-finite value. An excluded
   frame is treated exactly as a missing one (exposure 0).
3. **Missed triggers** (a detector that skips a trigger: every later frame lands one position
   early) are found from the parallax and from the frames that arrived, in `slips.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OUTLIER_SIGMA = 8.0  # robust sigmas: a Gaussian tail of 1e-15, so no frame is flagged by noise
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class FrameScreen:
    """What screening found on the positions acquired so far (flat arrays, scan order)."""

    exposure: np.ndarray  # (n_pos,) float64 frames x relative dose; 0 = missing or excluded
    excluded: np.ndarray  # (n_pos,) bool: acquired but excluded
    reasons: dict[str, int] = field(default_factory=dict)  # excluded frames by first reason
    dose_rows: np.ndarray | None = None  # (rows,) relative dose per line (R)
    dose_cols: np.ndarray | None = None  # (cols,) relative dose per column (C)

    @property
    def n_excluded(self) -> int:
        return int(self.excluded.sum())


def _robust_scale(x: np.ndarray, floor: float = 0.0) -> float:
    """1.4826 x median absolute deviation of the finite values, at least `floor`."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return max(floor, 1e-12)
    mad = float(np.median(np.abs(x - np.median(x))))
    return max(MAD_TO_SIGMA * mad, floor, 1e-12)


def _nanmedian(a: np.ndarray, axis: int) -> np.ndarray:
    """Median along `axis` ignoring NaN, fast: the NaNs of each line are replaced by +inf and
    -inf in equal numbers (one more +inf when odd, which moves the median by at most half an
    order statistic), so a plain partition-based median applies. All-NaN lines give NaN; lines
    with more NaNs than values may give +-inf, which callers treat as no data."""
    a = np.array(a, np.float64, copy=True)
    nan = np.isnan(a)
    rank = np.cumsum(nan, axis=axis)
    a[nan & (rank % 2 == 1)] = np.inf
    a[nan & (rank % 2 == 0)] = -np.inf
    out = np.median(a, axis=axis)
    out[np.all(nan, axis=axis)] = np.nan
    return out


def dose_model(per_frame: np.ndarray, use: np.ndarray, rounds: int = 3, sample: int = 256):
    """Separable relative dose `R[row] * C[col]` of per-frame totals (rows, cols) over the
    positions `use`, by alternating medians of log values (each line's median over at most
    `sample` evenly spaced columns, each column's over at most `sample` lines: plenty for a
    median, and it keeps a 1024 x 1024 scan's model to tens of ms). Returns (R, C), normalised
    so the median of R * C over `use` is 1; lines or columns without data get 1."""
    rows, cols = per_frame.shape
    log_t = np.full(per_frame.shape, np.nan)
    good = use & (per_frame > 0) & np.isfinite(per_frame)
    log_t[good] = np.log(per_frame[good])
    if not good.any():
        return np.ones(rows), np.ones(cols)
    step_r, step_c = max(1, rows // sample), max(1, cols // sample)
    by_col = log_t[:, ::step_c]
    by_row = log_t[::step_r]
    r = np.zeros(rows)
    c = np.zeros(cols)
    with np.errstate(all="ignore"):
        for _ in range(rounds):
            r = _nanmedian(by_col - c[None, ::step_c], axis=1)
            r = np.where(np.isfinite(r), r, np.median(r[np.isfinite(r)]))
            c = _nanmedian(by_row - r[::step_r, None], axis=0)
            c = np.where(np.isfinite(c), c, 0.0)
            c -= np.median(c[np.isfinite(log_t).any(axis=0)])
    r = _steady_lines(r)
    centre = np.median((r[:, None] + c[None, :])[good])
    return np.exp(r - centre), np.exp(c)


def _steady_lines(log_r: np.ndarray, half: int = 4) -> np.ndarray:
    """Per-line log dose with lines that jump away from their neighbours (the running median
    of 2 * half + 1 lines) by more than OUTLIER_SIGMA robust sigmas of such jumps replaced by
    that median: a burst of bad frames filling most of a line must not become the line's
    dose, which would make its good frames look anomalous. Drift and smooth fluctuation move
    neighbouring lines alike and stay."""
    n = len(log_r)
    if n < 2 * half + 3:
        return log_r
    padded = np.pad(log_r, half, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    smooth = np.median(windows, axis=1)
    jump = log_r - smooth
    odd = np.abs(jump) > OUTLIER_SIGMA * _robust_scale(jump)
    return np.where(odd, smooth, log_r)


def screen_frames(
    hits: np.ndarray,
    totals: np.ndarray,
    bf_sum: np.ndarray,
    scan_shape: tuple[int, int],
    counts_per_electron: float = 1.0,
    tiles: np.ndarray | None = None,
    tiles_window: tuple[tuple[int, int], tuple[int, int]] | None = None,
    serpentine: bool = False,
) -> FrameScreen:
    """Dose model and excluded frames of one series.

    `hits`, `totals`, `bf_sum`: (n_pos,) frames per position and their summed counts (all
    unmasked pixels; BF pixels). `tiles` (window rows, window cols, n_tiles): one level's tile
    sums over the scan block `tiles_window` ((r0, r1), (c0, c1)), for the pattern test
    (optional; the live engine passes the finest level of its alignment window).
    `serpentine`: odd lines are acquired right to left (for bursts in time)."""
    n_pos = scan_shape[0] * scan_shape[1]
    hits = np.asarray(hits, np.float64).reshape(n_pos)
    acquired = hits > 0
    gain = counts_per_electron if counts_per_electron and counts_per_electron > 0 else 1.0
    with np.errstate(all="ignore"):
        tot = np.where(acquired, np.asarray(totals, np.float64) / np.maximum(hits, 1), np.nan)
        bf = np.where(acquired, np.asarray(bf_sum, np.float64) / np.maximum(hits, 1), np.nan)
    finite = np.isfinite(tot) & np.isfinite(bf)
    reasons: dict[str, int] = {}
    excluded = acquired & ~finite
    _count(reasons, "non_finite", excluded)

    # dose model on the frames that are not obviously broken; then the residual test
    ok = acquired & finite
    r_fac, c_fac = dose_model(tot.reshape(scan_shape), ok.reshape(scan_shape))
    model = (r_fac[:, None] * c_fac[None, :]).ravel()
    counted = ok & (tot > 0)
    scale_ref = float(np.median(tot[counted])) if counted.any() else 0.0
    expected_e = model * scale_ref / gain * hits  # electrons expected at each position
    with np.errstate(all="ignore"):
        resid = np.log(np.where(counted, tot, np.nan) / (model * scale_ref))
    poisson = 1.0 / np.sqrt(max(scale_ref / gain, 1.0))
    z = resid / _robust_scale(resid[ok], poisson)
    # no counts where that is improbable (P(0) = exp(-expected) < 1e-3 / n_pos): the beam was
    # not there (blanked, missed); at a few electrons per frame an empty frame is just Poisson
    dark = ok & (tot <= 0) & (expected_e > np.log(n_pos) + 7.0)
    lone = _anomalous(z, scan_shape, serpentine)
    dark |= counted & lone & (z < 0)
    bright = counted & ~dark & lone & (z > 0)
    _count(reasons, "dark", dark)
    _count(reasons, "bright", bright)
    excluded |= dark | bright

    # BF fraction: a flat or otherwise foreign frame puts its counts in the wrong places; each
    # frame's own binomial width floors the scale (few electrons, or nearly all in the BF disk)
    ok = counted & ~excluded
    with np.errstate(all="ignore"):
        frac = np.where(ok, bf / tot, np.nan)
    if ok.sum() >= 8:
        f0 = float(np.median(frac[ok]))
        n_e = np.maximum(tot * hits / gain, 1.0)
        binomial = np.sqrt(np.maximum(f0 * (1 - f0), 1.0 / n_e) / n_e)
        zf = np.where(ok, frac - f0, np.nan) / np.maximum(_robust_scale(frac[ok]), binomial)
        odd = ok & _anomalous(zf, scan_shape, serpentine)
        _count(reasons, "bf_fraction", odd)
        excluded |= odd

    if tiles is not None and tiles_window is not None:
        odd = _pattern_outliers(tiles, tiles_window, hits, excluded, scan_shape, gain,
                                serpentine)  # fmt: skip
        _count(reasons, "pattern", odd & ~excluded)
        excluded |= odd

    exposure = np.where(acquired & ~excluded, hits * model, 0.0)
    return FrameScreen(exposure, excluded, reasons, r_fac, c_fac)


def _count(reasons: dict[str, int], key: str, mask: np.ndarray) -> None:
    n = int(np.count_nonzero(mask))
    if n:
        reasons[key] = reasons.get(key, 0) + n


def _pattern_outliers(tiles, window, hits, excluded, scan_shape, gain,
                      serpentine: bool = False) -> np.ndarray:  # fmt: skip
    """Positions whose electrons spread over the tiles unlike the scan's pattern (each tile's
    median share): a Poisson chi-square, sum_t (n_t - N r_t)^2 /
    (N r_t) = sum_t n_t^2 / (N r_t) - N in electrons, cube-root transformed (Wilson-Hilferty)
    and scored in robust units. Catches a zinger or overload pixel too small to move the
    total."""
    (r0, r1), (c0, c1) = window
    out = np.zeros(scan_shape[0] * scan_shape[1], bool)
    n_t = tiles.shape[-1]
    if n_t < 2:
        return out
    h = hits.reshape(scan_shape)[r0:r1, c0:c1].ravel()
    ex = excluded.reshape(scan_shape)[r0:r1, c0:c1].ravel()
    t = np.asarray(tiles, np.float32).reshape(-1, n_t) / np.float32(gain)  # electrons
    total = t.sum(axis=1, dtype=np.float64)
    ok = (h > 0) & ~ex & np.isfinite(total) & (total > 0)
    if ok.sum() < 8:
        return out
    # the typical pattern: the median share of each tile over up to 2048 positions kept (robust
    # to a pixel that turns hot for a large part of the scan, unlike the summed pattern)
    rows_ok = np.flatnonzero(ok)
    pick = rows_ok[np.linspace(0, rows_ok.size - 1, min(rows_ok.size, 2048)).astype(int)]
    ref = np.median(t[pick] / total[pick, None].astype(np.float32), axis=0).astype(np.float64)
    ref /= max(ref.sum(), 1e-30)
    inv = np.where(ref > 0, 1.0 / np.maximum(ref, 1e-30), 0.0).astype(np.float32)
    with np.errstate(all="ignore"):
        chi = np.where(ok, (t * t) @ inv / total - total, 0.0)
    root = np.cbrt(np.maximum(chi, 0.0))
    z = np.where(ok, root - float(np.median(root[ok])), np.nan) / _robust_scale(root[ok])
    z = np.maximum(z, 0.0)  # one-sided: only an excess of chi-square is anomalous
    shape = (r1 - r0, c1 - c0)
    if c0 == 0 and c1 == scan_shape[1]:  # whole lines: bursts in time can be told too
        flip = serpentine and r0 % 2 == 1  # the window's first line runs right to left
        zz = z.reshape(shape)[:, ::-1].ravel() if flip else z
        odd = _anomalous(zz, shape, serpentine)
        odd = odd.reshape(shape)[:, ::-1].ravel() if flip else odd
    else:
        odd = _unsupported(z, shape)
    out.reshape(scan_shape)[r0:r1, c0:c1] = odd.reshape(shape)
    return out


def _line_crossing_runs(big: np.ndarray, sign: np.ndarray, shape: tuple[int, int],
                        serpentine: bool) -> np.ndarray:  # fmt: skip
    """Candidates (`big`, flat) that belong to a run of consecutive frames *in acquisition
    order* with one sign that crosses from one line into the next: a burst in time (a glitch
    lasting a while), which no sample feature is. Such frames need no support test: within a
    burst, neighbouring lines support each other."""
    rows, cols = shape
    order = np.arange(rows * cols).reshape(rows, cols)
    if serpentine:
        order[1::2] = order[1::2, ::-1]
    order = order.ravel()  # acquisition index -> flat position
    b = big[order]
    sg = sign[order]
    if not b.any():
        return np.zeros_like(big)
    # runs: consecutive acquisition indices, all big, one sign
    brk = np.ones(len(b), bool)
    brk[1:] = ~(b[1:] & b[:-1] & (sg[1:] == sg[:-1]))
    run_id = np.cumsum(brk)
    line = np.arange(len(b)) // cols
    first_line = np.full(run_id[-1] + 1, rows)
    last_line = np.full(run_id[-1] + 1, -1)
    idx = np.flatnonzero(b)
    np.minimum.at(first_line, run_id[idx], line[idx])
    np.maximum.at(last_line, run_id[idx], line[idx])
    crossing = b & (first_line[run_id] != last_line[run_id])
    out = np.zeros_like(big)
    out[order] = crossing
    return out


def _anomalous(z: np.ndarray, shape: tuple[int, int], serpentine: bool) -> np.ndarray:
    """Frames beyond OUTLIER_SIGMA that are either unsupported by the neighbouring lines
    (`_unsupported`) or part of a burst in time (`_line_crossing_runs`)."""
    zz = np.nan_to_num(np.asarray(z, np.float64), nan=0.0)
    big = np.abs(zz) > OUTLIER_SIGMA
    return big & (_unsupported(zz, shape) | _line_crossing_runs(big, np.sign(zz), shape,
                                                                 serpentine))  # fmt: skip


def _unsupported(z: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Positions beyond OUTLIER_SIGMA (robust z-scores `z`, flat, NaN = no data) that no
    position of the line above or below (the three nearest) supports with the same sign at half
    that level. Real sample features extend over neighbouring lines; a glitch lives in the
    time of one frame (or a few consecutive ones), i.e. within one line. This keeps strong
    genuine contrast (a gold particle at high dose, hundreds of Poisson sigmas) from being
    excluded while any lone frame, or burst of frames, beyond the limit is."""
    grid = np.nan_to_num(np.asarray(z, np.float64).reshape(shape), nan=0.0)
    big = np.abs(grid) > OUTLIER_SIGMA
    half = 0.5 * OUTLIER_SIGMA
    support = np.zeros(shape, bool)
    for dr in (-1, 1):
        for dc in (-1, 0, 1):
            nb = np.zeros(shape)
            rs = slice(max(dr, 0), shape[0] + min(dr, 0))
            rd = slice(max(-dr, 0), shape[0] + min(-dr, 0))
            cs = slice(max(dc, 0), shape[1] + min(dc, 0))
            cd = slice(max(-dc, 0), shape[1] + min(-dc, 0))
            nb[rd, cd] = grid[rs, cs]
            support |= (np.abs(nb) > half) & (np.sign(nb) == np.sign(grid))
    return (big & ~support).ravel()
