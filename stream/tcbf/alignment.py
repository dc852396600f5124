"""Parallax alignment: iterative coarse-to-fine cross-correlation of binned virtual-BF images.

Pure numerics (arrays in, arrays out). One iteration at one bin level (tcbf-physics.md sect. 4.3,
7.2-7.4, in our own formulation):

1. every tile image (the sum of its BF pixels' virtual-BF images over the acquired region) is
   normalised to mean 1 over the valid positions, made zero-mean, tapered to the edges of the
   acquired region (sin^2) and zero-padded, so partial scans and gaps need no special case;
2. each tile is pre-shifted by the current linear model s = M k (warm start), so only small
   residuals are measured;
3. tiles are visited centre-outwards: the first usable one is registered against the current
   reconstruction (mean of all pre-shifted tiles), every later one against the running,
   electron-weighted mean of the tiles already aligned (a bootstrapped reference);
4. residuals come from DFT-upsampled cross-correlation (`stream.registration`); tiles whose
   correlation peak is weak are left out;
5. the total tile shifts are projected onto the linear model s = M k by weighted least squares
   (no constant term): M is what the next iteration and the aberration fit use. The rms misfit
   of the tiles to the model is the iteration's self-consistency error.

Units: `k_px` is the detector-frame position of a tile (or BF pixel) relative to the disk centre
in detector pixels (row, col); shifts are tcBF *correction* shifts in scan pixels (row, col):
moving an image's content by +s aligns it. M is in scan px per detector px.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.fft as sfft

from tcbf_live.stream.tcbf.registration import correlation_peak
from tcbf_live.stream.tcbf.shift_model import robust_fit
from tcbf_live.stream.tcbf.spectral_kernels import (
    blend_moved,
    cross_power,
    ramp_factors,
    shift_spectra,
)
from tcbf_live.stream.tcbf.tiles import TileSet, TileSource

DEFAULT_MIN_TILE_ELECTRONS = 2.5e5  # Yu et al.: electrons per binned vBF image to trust it


@dataclass(frozen=True)
class AlignmentSettings:
    """How to align; `bins=None` chooses the schedule from the dose."""

    bins: tuple[int, ...] | None = None  # explicit schedule, one iteration per entry
    min_tile_electrons: float = DEFAULT_MIN_TILE_ELECTRONS
    iterations_per_level: int = 2
    live_iterations_per_level: int = 1  # warm live updates refine from the last model

    upsample: int = 8  # DFT upsampling of the cross-correlation peak
    edge_blend_px: float | None = None  # None: 1/6 of the acquired field, within [2, 16]
    min_rows: int = 8  # rows acquired before the first alignment
    max_field_px: int = 128  # align on at most this many rows and columns (central block)
    min_quality: float = 4.0  # tile-vs-reference peak (peak - mean) / std below this: unused
    min_pair_quality: float = 8.0  # the same for a pair-summed peak (cold start)
    fit_radius_fraction: float = 0.8  # model fit: tiles within this fraction of the disk
    max_residual_px: float = 2.0  # a warm-started tile moving further than this is an outlier
    defocus_sign: int | None = None  # +1 / -1: known sign of the defocus (resolves 180 deg)
    # where the tiles give no model: the global search (`global_alignment`), with the nominal
    # defocus as a prior when given (A, > 0 underfocus)
    global_search: bool = True
    defocus_hint_A: float | None = None

    def __post_init__(self):
        if self.upsample < 1 or self.iterations_per_level < 1 or self.min_rows < 1:
            raise ValueError("upsample, iterations_per_level and min_rows must be >= 1")
        if self.defocus_sign not in (None, 1, -1):
            raise ValueError("defocus_sign must be +1, -1 or None")


@dataclass(frozen=True)
class IterationResult:
    """One iteration at one bin level."""

    bin_px: int
    k_px: np.ndarray  # (n_tiles, 2)
    shifts_px: np.ndarray  # (n_tiles, 2) measured total correction shift of each tile
    quality: np.ndarray  # (n_tiles,) correlation peak quality (0: not correlated)
    used: np.ndarray  # (n_tiles,) bool: entered the model fit
    matrix_px: np.ndarray  # (2, 2) model after this iteration
    error_px: float  # weighted rms misfit of the used tiles to the model
    # weights of the tiles whose peak was accepted, within the fit radius, whatever the linear
    # model's outlier rejection decided (the higher-order fit's data, `higher_order.py`)
    measured_weights: np.ndarray | None = None


@dataclass(frozen=True)
class AlignmentResult:
    matrix_px: np.ndarray  # (2, 2): shifts_px = k_px @ matrix_px.T
    iterations: tuple[IterationResult, ...] = ()
    rows: tuple[int, int] = (0, 0)  # scan rows [first, last) the alignment used
    converged: bool = False  # at least one iteration fitted a model
    method: str = "tiles"  # "tiles" (cross-correlation) or "global" (`global_alignment`)
    note: str = ""  # why this method, in words (the global search's outcome)

    @property
    def schedule(self) -> tuple[int, ...]:
        return tuple(it.bin_px for it in self.iterations)

    @property
    def errors_px(self) -> np.ndarray:
        return np.array([it.error_px for it in self.iterations], float)

    def shifts_px(self, k_px: np.ndarray) -> np.ndarray:
        """Model correction shifts (N, 2) in scan px of pixels/tiles at `k_px` (N, 2)."""
        return np.asarray(k_px, float) @ self.matrix_px.T


# ---------------------------------------------------------------------------------- geometry
def acquired_rows(valid: np.ndarray, min_fraction: float = 0.5) -> tuple[int, int]:
    """[first, last) rows with at least `min_fraction` of their positions acquired."""
    good = np.flatnonzero(valid.mean(axis=1) >= min_fraction)
    return (int(good[0]), int(good[-1]) + 1) if good.size else (0, 0)


def alignment_window(valid: np.ndarray,
                     cap: int) -> tuple[tuple[int, int], tuple[int, int]]:  # fmt: skip
    """Scan rows and columns the alignment uses: the acquired rows of `valid` (rows, cols), at
    most `cap` of them (the middle ones) and of the columns (centred): a 128 x 128 field holds
    ample signal for the 4 numbers of the model and bounds the cost."""
    r0, r1 = acquired_rows(valid)
    if r1 - r0 > cap:
        r0 += (r1 - r0 - cap) // 2
        r1 = r0 + cap
    cols = valid.shape[1]
    c0 = max(0, (cols - cap) // 2)
    return (r0, r1), (c0, min(cols, c0 + cap))


def edge_taper(shape: tuple[int, int], edge_blend_px: float) -> np.ndarray:
    """Separable sin^2 taper: 0 outside, rising to 1 over `edge_blend_px` from each edge."""
    out = []
    for n in shape:
        d = np.minimum(np.arange(n) + 0.5, n - 0.5 - np.arange(n))
        out.append(np.sin(0.5 * np.pi * np.minimum(d / max(edge_blend_px, 1e-6), 1.0)) ** 2)
    return (out[0][:, None] * out[1][None, :]).astype(np.float32)


def default_edge_blend(shape: tuple[int, int]) -> float:
    return float(np.clip(min(shape) / 6.0, 2.0, 16.0))


def padded_shape(shape: tuple[int, int], margin_px: int | None = None) -> tuple[int, int]:
    """Room for shifts of `margin_px` (default a quarter of the field) each way, no wrap."""
    return tuple(sfft.next_fast_len(n + 2 * (margin_px or max(8, n // 4))) for n in shape)  # type: ignore


def ramps(shape: tuple[int, int], shifts_px: np.ndarray) -> np.ndarray:
    """(n, P0, P1) Fourier factors that move content by +shift (F{f(r - a)} = F e^{-2 pi i q a})."""
    e0, e1 = ramp_factors(shape, shifts_px)
    return e0[:, :, None] * e1[:, None, :]


def tile_spectra(
    tiles: TileSet, edge_blend_px: float | None = None, margin_px: int | None = None
) -> np.ndarray:
    """(n, P0, P1) spectra of the normalised, zero-mean, tapered, zero-padded tile images.

    Only the block of acquired rows is used and tapered (a partial scan looks like a smaller
    scan); missing positions inside it are set to the mean, i.e. carry no signal."""
    r0, r1 = acquired_rows(tiles.valid)
    valid = tiles.valid[r0:r1]
    images = tiles.images[:, r0:r1]
    n, rows, cols = images.shape
    edge = default_edge_blend((rows, cols)) if edge_blend_px is None else edge_blend_px
    weight = edge_taper((rows, cols), edge) * valid
    sums = images.reshape(n, -1) @ valid.ravel().astype(np.float64)
    means = np.where(sums > 0, sums / max(int(valid.sum()), 1), 1.0)
    norm = (images / means[:, None, None].astype(np.float32) - 1.0) * weight
    pad = padded_shape(tiles.valid.shape, margin_px)
    canvas = np.zeros((n, *pad), np.float32)
    canvas[:, :rows, :cols] = norm
    return sfft.fft2(canvas, axes=(1, 2), workers=1)


def align_iteration(
    spectra: np.ndarray,
    tiles: TileSet,
    matrix_px: np.ndarray,
    weights: np.ndarray,
    settings: AlignmentSettings,
    applied_px: np.ndarray | None = None,
) -> IterationResult:
    """One pass over the tiles of one level, warm-started from `matrix_px` (see module doc).

    `applied_px` (n_tiles, 2): shifts already applied to the images before tapering (re-formed
    from per-pixel data); only the rest of the model shift is applied here, as a Fourier ramp."""
    model = tiles.k_px @ matrix_px.T
    done = np.zeros_like(model) if applied_px is None else applied_px
    w = weights.astype(np.float64)
    total_w = w.sum()
    shifted = np.empty_like(spectra)
    reference = np.empty(spectra.shape[1:], np.complex64)  # the mean of all pre-shifted tiles
    share = (w / max(total_w, 1e-300)).astype(np.float32)
    shift_spectra(spectra, *ramp_factors(spectra.shape[1:], model - done), share, shifted,
                  reference)  # fmt: skip
    n = len(tiles.k_px)
    search = int(np.ceil(settings.max_residual_px)) + 1  # warm start: residuals are small
    residual = np.zeros((n, 2))

    quality = np.zeros(n)
    used = np.zeros(n, bool)
    ref_weight = 0.0
    cross = np.empty_like(reference)
    for t in np.argsort(np.hypot(*tiles.k_px.T), kind="stable"):
        if w[t] <= 0 or total_w <= 0:
            continue
        cross_power(shifted[t], reference, cross)
        d, quality[t] = correlation_peak(cross, settings.upsample, search)
        if quality[t] < settings.min_quality or np.hypot(*d) > settings.max_residual_px:
            continue
        used[t] = True
        residual[t] = -d
        e0, e1 = ramp_factors(spectra.shape[1:], residual[t])
        # the first tile replaces the reconstruction; later ones join the running mean
        blend_moved(reference, shifted[t], e0[0], e1[0], ref_weight / (ref_weight + w[t]),
                    w[t] / (ref_weight + w[t]))  # fmt: skip
        ref_weight += w[t]
    measured = model + residual
    # the fit leaves out tiles at the disk rim: there the aperture cuts each pixel's transfer on
    # one side, which adds an apparent outward displacement (worst near focus)
    fit_w = np.where(used & tiles.within(settings.fit_radius_fraction), w, 0.0)
    matrix, used, error = robust_fit(tiles.k_px, measured, fit_w, matrix_px)
    # a warm iteration refines: a model moving pixels at the disk edge by more than twice the
    # largest accepted residual is not supported by the measurements (e.g. a few clustered
    # tiles extrapolated); keep the previous one
    if np.linalg.norm(matrix - matrix_px, 2) * tiles.radius_px > 2 * settings.max_residual_px:
        matrix, used, error = matrix_px, np.zeros_like(used), float("nan")
    return IterationResult(tiles.bin_px, tiles.k_px, measured, quality, used, matrix, error,
                           fit_w)  # fmt: skip


MIN_PAIR_OFFSETS = 3  # offsets with a clear, mutually consistent peak for a pair estimate
INNER_FRACTION = 0.75  # pair estimate: tiles within this fraction of the disk radius
PAIR_OFFSETS = ((1, 0), (0, 1), (1, 1), (1, -1), (2, 0), (0, 2), (2, 1), (1, 2), (2, -1), (1, -2))


def pair_iteration(
    spectra: np.ndarray,
    tiles: TileSet,
    matrix_px: np.ndarray,
    weights: np.ndarray,
    settings: AlignmentSettings,
) -> IterationResult | None:
    """Reference-free estimate of M from tile *pairs*: all pairs whose grid labels differ by the
    same offset share one relative shift M (k_u - k_t), so their cross-power spectra are summed
    before one peak search. Every electron of the level contributes to each offset's peak,
    without a reference to bootstrap: the cold start at dose where single tiles are too noisy.
    Returns None when fewer than two non-parallel offsets give a clear peak."""
    if tiles.labels is None:
        return None
    model = tiles.k_px @ matrix_px.T
    shifted = spectra * ramps(spectra.shape[1:], model)
    # full tiles away from the disk edge only: near the edge the aperture cuts one side of each
    # pixel's transfer and the images are no longer pure shifted copies (outlier pairs)
    inner = (tiles.n_pixels >= 0.9 * tiles.n_pixels.max()) & tiles.within(INNER_FRACTION)
    weights = np.where(inner, weights, 0.0)
    index = {tuple(lab): t for t, lab in enumerate(tiles.labels.tolist())}
    dk, meas, wq, qual = [], [], [], []
    for off in PAIR_OFFSETS:
        pairs = [(t, index[(a + off[0], b + off[1])]) for (a, b), t in index.items()
                 if (a + off[0], b + off[1]) in index]  # fmt: skip
        pairs = [(t, u) for t, u in pairs if weights[t] > 0 and weights[u] > 0]
        if not pairs:
            continue
        t_idx, u_idx = np.array(pairs).T
        pw = np.sqrt(weights[t_idx] * weights[u_idx])
        cross = np.tensordot(pw, shifted[u_idx] * np.conj(shifted[t_idx]), axes=1)
        d, q = correlation_peak(cross, settings.upsample)
        qual.append(q)
        if q < settings.min_pair_quality:
            continue
        dk.append(np.average(tiles.k_px[u_idx] - tiles.k_px[t_idx], axis=0, weights=pw))
        meas.append(-d)  # residual correction of u relative to t
        wq.append(pw.sum())
    if len(dk) < MIN_PAIR_OFFSETS:
        return None
    dk, meas = np.array(dk), np.array(meas)
    residual, used, error = robust_fit(dk, meas, np.array(wq), np.zeros((2, 2)))
    # consistent offsets only: a linear model must explain them to a fraction of their size
    scale = float(np.sqrt(np.mean(np.sum(meas[used] ** 2, axis=1)))) if used.any() else 0.0
    if used.sum() < MIN_PAIR_OFFSETS or not error <= max(0.5, 0.25 * scale):
        return None
    matrix = matrix_px + residual
    if not plausible(matrix, tiles):
        return None
    n = len(tiles.k_px)
    return IterationResult(tiles.bin_px, tiles.k_px, tiles.k_px @ matrix.T, np.zeros(n),
                           weights > 0, matrix, error)  # fmt: skip


def plausible(matrix_px: np.ndarray, tiles: TileSet) -> bool:
    """Shifts at the disk edge of at most half the field's larger side: anything larger could
    not have been measured on this field (the padding allows a quarter each way)."""
    edge_shift = np.linalg.norm(matrix_px, 2) * tiles.radius_px
    return bool(np.isfinite(edge_shift) and edge_shift <= 0.5 * max(tiles.valid.shape))


# ---------------------------------------------------------------------------------- schedule


def choose_schedule(levels: dict[int, TileSet], settings: AlignmentSettings) -> tuple[int, ...]:
    """Explicit bins as given; else every trusted level, coarse to fine, `iterations_per_level`
    times each, stopping at the first level that is not trusted yet (never finer than that:
    fine tiles at low dose undo a good coarse estimate)."""
    if settings.bins:
        return tuple(b for b in settings.bins if b in levels)
    schedule: list[int] = []
    for b in sorted(levels, reverse=True):
        if not levels[b].is_trusted(settings.min_tile_electrons):
            break
        schedule += [b] * settings.iterations_per_level
    return tuple(schedule)


def align(
    levels: dict[int, TileSet],
    settings: AlignmentSettings,
    matrix_px: np.ndarray | None = None,
    schedule: tuple[int, ...] | None = None,
    pixels: TileSource | None = None,
) -> AlignmentResult:
    """Run the schedule (default `choose_schedule`) from `matrix_px` (default 0: cold start).

    With `pixels` (e.g. `tiles.RegroupedTiles`), each level's tile images are re-formed from
    per-pixel data when the schedule first reaches it, each pixel moved by its own shift under
    the model at that point, before the taper: tiles are then not blurred by the shift spread
    inside them (|M| x bin px), and every tile shares one fixed window, so the window does not
    pull the shifts toward zero on small fields. Without it the accumulated tile sums are used
    and moved by Fourier ramps (window included)."""
    matrix = np.zeros((2, 2)) if matrix_px is None else np.asarray(matrix_px, float)
    if schedule is None:
        schedule = choose_schedule(levels, settings)
    spectra: dict[int, np.ndarray] = {}
    iterations = []
    converged = matrix_px is not None  # warm start: the model is known
    if not converged:
        # cold start: the reference-free pair estimate, coarse to fine over every level (it
        # sums all pairs, so it works below the per-tile trust threshold); the first level
        # with a confident estimate provides the model the schedule refines
        for b in sorted(levels, reverse=True):
            spec = tile_spectra(levels[b], settings.edge_blend_px)
            it = pair_iteration(spec, levels[b], matrix, levels[b].electrons.astype(float),
                                settings)  # fmt: skip
            if it is not None:
                converged = True
                matrix = it.matrix_px
                iterations.append(it)
                break
        if not converged:
            return AlignmentResult(matrix, (), converged=False)
    applied: dict[int, np.ndarray] = {}
    for b in schedule:
        tiles = levels[b]
        if b not in spectra:
            applied[b] = np.zeros_like(tiles.k_px)
            margin = None
            if pixels is not None:  # already moved: only residuals remain, a thin margin does
                images, moved_by = pixels.tile_images(b, matrix)
                tiles = replace(tiles, images=images)
                applied[b] = tiles.k_px @ moved_by.T
                margin = 4 + int(np.ceil(settings.max_residual_px))
            spectra[b] = tile_spectra(tiles, settings.edge_blend_px, margin)
        weights = tiles.electrons.astype(float)
        if settings.bins is None:  # dose-chosen schedule: untrusted rim tiles are left out
            weights = np.where(tiles.trusted_tiles(settings.min_tile_electrons), weights, 0.0)
        it = align_iteration(spectra[b], tiles, matrix, weights, settings, applied[b])
        matrix = it.matrix_px
        iterations.append(it)
    return AlignmentResult(matrix, tuple(iterations), converged=converged)
