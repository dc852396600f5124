"""Global, model-based alignment for the lowest doses: the shift model from every BF pixel at once.

Pure numerics. Tile cross-correlation decides per tile pair where its peak is; at low dose no
single pair has a peak, though the evidence summed over all pairs does. Here the linear shift
model s = M k (`shift_model.py`) is chosen to maximise the power of the shift-and-add image
of all BF pixels (no binning, so no binning blur), summed over the scan frequencies q:

    S(M) = sum_q ( |F_q(M^T q)|^2 / N_q - 1 ),   F_q(u) = sum_k I_k(q) exp(-2 pi i u.k),

with I_k(q) the Fourier component of BF pixel k's (windowed, mean-free) image, u in cycles
per detector pixel and N_q = sum_k |I_k(q)|^2: each term is the coherence of all pixel pairs
at q, 0 on average for noise (its null), positive where the model aligns them. For one q,
F_q over all u is a 2-D FFT of the I_k(q) placed at their detector positions, so a coarse
search over M (scale, rotation, transpose: a few 10^4 candidates) costs one FFT per q and a
table lookup per candidate; the best candidate is refined over the four entries of M with
the exact sum and its gradient (L-BFGS). The 180-degree twin is not an ambiguity of M (M and -M give
different images); it is resolved, as for the tile fit, when M is split into aberrations.

- *Determined or not*: the same coarse search on the data with the scan positions shuffled
  (which destroys every parallax and keeps the noise), SHUFFLES times, gives the peak that
  noise alone reaches; with the BF pixels' detector positions shuffled (each image kept
  whole, so an image common to all pixels, the incoherent BF image, scores as high as in the
  data near M = 0), SHUFFLES times, the peak that the sample's contrast reaches without
  parallax. The model counts as determined when the data's coarse peak exceeds the highest
  of both by MIN_SIGNIFICANCE (the first alone let the tutorial at 2 e/A^2 through at M
  near 0, its incoherent image). The null is measured, not assumed: the terms
  of S are correlated and heavy-tailed, and the peak over ~10^4 candidates of pure noise
  ranged over 45-85 for 110 frequencies in tests where the nominal sigma is 10.5.
- *Uncertainty*: a jackknife over 8 interleaved subsets of the BF pixels (each estimate
  leaves one out), scaled to Student's 95 % for 7 degrees of freedom, plus a systematic
  floor (FLOOR of |M| on each entry, ROTATION_FLOOR_RAD on the rotation).
- *Prior*: a defocus hint (the microscope's nominal defocus) restricts the scale searched to
  within a factor of two of it (`GlobalFallback`).

Maximising a reconstruction's power over its aberration parameters is the usual autofocus
criterion; the pair-coherence form with its null, and the FFT-per-frequency search, are ours.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import scipy.fft as sfft
import scipy.optimize as opt

from tcbf_live.stream.tcbf.alignment import AlignmentResult
from tcbf_live.stream.tcbf.higher_order import MIN_LINEAR_TILES, student_scale

MAX_FREQUENCIES = 600  # scan frequencies used at most (thinned evenly in |q|)
Q_MAX = 0.5  # cycles per scan px at most (Nyquist)
LOW_BAND = 0.25  # the low band: where a weak signal is, without the noise of the rest
SHUFFLES = 3  # the null: the search repeated on the data with the positions shuffled ...
MIN_SIGNIFICANCE = 1.5  # ... the data's peak must exceed the highest of theirs by this factor
SUBSETS = 8  # jackknife over interleaved BF-pixel subsets
# systematic floor of each entry, relative to |M|: the field, fixed while the object moves
# through it, pulls |M| low by 1.5-4 % on noisy shifted copies of an object with structure at
# the scan step (more for a smoother one: docs/tcbf.md); on the simulated samples the errors
# were -4.5 to +4.7 % at the lowest doses, +0.7 to +2.6 % without noise to speak of
FLOOR = 0.03
ROTATION_FLOOR_RAD = FLOOR / math.sqrt(2)  # the same floor on M's antisymmetric part
TABLE_BYTES = 64 << 20  # one power table at most (frequencies x grid)
FIELD_PX = 96  # the central block of the alignment window searched (bounds memory and time)
TAPER = 0.15  # the fraction of the field under the window's cosine taper (half at each end)
TRANSPOSE = np.array([[0.0, 1.0], [1.0, 0.0]])


@dataclass(frozen=True)
class GlobalEstimate:
    """The outcome of one global search (`estimate`)."""

    matrix_px: np.ndarray | None  # (2, 2) shifts_px = k_px @ matrix_px.T; None: not determined
    errors_px: np.ndarray  # (2, 2) 1-sigma errors of the entries: jackknife x Student, floor
    # in quadrature (NaN: none)
    subsets: np.ndarray  # (SUBSETS, 2, 2) the leave-one-out matrices (for derived errors)
    peak: float  # S at the refined optimum (full data)
    null_peak: float  # the highest coarse S on the shuffled data
    frequencies: int
    seconds: float
    reason: str  # why it is (not) determined, in words
    significance: float  # the data's coarse peak / null_peak (determined from MIN_SIGNIFICANCE)
    band_ratios: tuple[float, ...] = ()  # that ratio in each band (low, all)

    @property
    def determined(self) -> bool:
        return self.matrix_px is not None


def tukey(n: int, taper: float = TAPER) -> np.ndarray:
    """A Tukey window of n samples, flat but for a cosine taper over `taper` of its length
    (half at each end), sampled inside the support so that no sample is zero."""
    x = (np.arange(n) + 1.0) / (n + 1.0)
    edge = np.minimum(x, 1.0 - x)  # distance to the nearer end, as a fraction of the length
    half = taper / 2
    return np.where(edge < half, 0.5 * (1.0 - np.cos(np.pi * edge / max(half, 1e-12))), 1.0)


def pixel_spectra(images: np.ndarray,
                  n_max: int = MAX_FREQUENCIES) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(spectra (N, n_q), q (n_q, 2) cycles per scan px) of the BF-pixel images (N, rows, cols):
    mean-free, under a Tukey window (TAPER), at most `n_max` frequencies of the half plane up
    to Q_MAX, thinned evenly in |q| where there are more. (The lowest `n_max` alone read the
    tutorial's scale 10 % high on a 96x96 field, at every dose: 600 frequencies reached only
    0.14 cycles/px there; thinned, +1.4 %.)

    The window's flat top keeps nearly every position's full weight (a Hann window keeps a
    quarter of the samples' weight: at 5x10^2 e/A^2 the weak-phase peak stood 1.1-1.4x its
    null with it, 1.9-2.1x with this one); its short taper softens the edge that the circular
    shift wraps round. Zero-padding instead read the tutorial's scale 5 % high. Single
    precision: the refinement's objective is summed in complex64."""
    n, rows, cols = images.shape
    win = np.outer(tukey(rows), tukey(cols)).astype(np.float32)  # complex64 spectra
    centred = (images - images.mean(axis=(1, 2), keepdims=True)) * win
    spec = sfft.rfft2(centred, axes=(1, 2), workers=1)
    qr = np.broadcast_to(sfft.fftfreq(rows)[:, None], spec.shape[1:])
    qc = np.broadcast_to(sfft.rfftfreq(cols)[None, :], spec.shape[1:])
    radius = np.hypot(qr, qc)
    keep = (radius > 0) & (radius <= Q_MAX) & ~((qc == 0) & (qr < 0))  # one of each +-q
    order = np.argsort(radius[keep], kind="stable")
    order = order[:: -(-len(order) // n_max)][:n_max]  # thinned evenly in |q|, all kept if few
    q = np.column_stack([qr[keep], qc[keep]])[order]
    return spec[:, keep][:, order], q


def score_exact(m: np.ndarray, spectra: np.ndarray, q: np.ndarray, k: np.ndarray,
                noise: np.ndarray) -> tuple[float, np.ndarray]:  # fmt: skip
    """S(M) summed exactly over the pixels, and its gradient dS/dM (2, 2) (the refinement's
    objective): with f_q = sum_k a_kq exp(-2 pi i k.M^T q) and g_qj = sum_k a_kq exp(..) k_j,
    d|f_q|^2 / dM_ij = 4 pi q_i Im(conj(f_q) g_qj)."""
    phase = np.exp(-2j * np.pi * (k @ (q @ m).T)).astype(np.complex64)  # (N, n_q)
    terms = spectra * phase
    f = terms.sum(axis=0)
    g = terms.T @ k  # (n_q, 2)
    grad = 4.0 * np.pi * q.T @ (np.imag(np.conj(f)[:, None] * g) / noise[:, None])
    return float(np.sum(np.abs(f) ** 2 / noise - 1.0)), grad


def table_size(k: np.ndarray) -> int:
    """Side of the u grid: the BF pixels' extent, twice over (u sampled at 1/size)."""
    extent = int(np.abs(np.rint(k)).max()) * 2 + 1
    return 1 << max(6, math.ceil(math.log2(2 * extent)))


class PowerTable:
    """|F_q(u)|^2 / N_q for every q on a grid of u (one FFT per q): coarse scores by lookup."""

    def __init__(self, spectra: np.ndarray, q: np.ndarray, k: np.ndarray):
        ki = np.rint(k).astype(np.int64)
        self.size = table_size(k)
        grid = np.zeros((len(q), self.size, self.size), np.complex64)
        grid[:, ki[:, 0] % self.size, ki[:, 1] % self.size] = spectra.T
        self.noise = (np.abs(spectra) ** 2).sum(axis=0)
        power = np.abs(sfft.fft2(grid, axes=(1, 2), workers=1, overwrite_x=True)) ** 2
        self.power = (power / self.noise[:, None, None]).astype(np.float32)
        self.q = q

    def scores(self, matrices: np.ndarray, bands: tuple[int, ...]) -> np.ndarray:
        """S of candidate matrices (n, 2, 2) over the first n_q frequencies of each band
        ((n_bands, n) scores), nearest grid point per frequency."""
        out = np.empty((len(bands), len(matrices)))
        n = self.size
        flat, base = self.power.ravel(), (np.arange(len(self.q)) * n * n)[None, :]
        q0, q1 = (self.q[:, j][None, :] * n for j in (0, 1))  # u in grid steps
        for a in range(0, len(matrices), 1024):  # bounded temporaries
            m = matrices[a : a + 1024]
            u0 = np.rint(q0 * m[:, 0, 0, None] + q1 * m[:, 1, 0, None]).astype(np.int64) % n
            u1 = np.rint(q0 * m[:, 0, 1, None] + q1 * m[:, 1, 1, None]).astype(np.int64) % n
            terms = flat[base + u0 * n + u1] - 1.0  # (candidates, n_q): u = M^T q
            for b, n_q in enumerate(bands):
                out[b, a : a + 1024] = terms[:, :n_q].sum(axis=1)
        return out


def candidates(radius_px: float, field_px: int, q_max: float, transposes: tuple[bool, ...],
               scale_band: tuple[float, float] | None) -> np.ndarray:  # fmt: skip
    """Coarse grid of M = s R(theta) T: s from -s_max to s_max (shifts up to half the field
    at the disk edge; or |s| within `scale_band`, a prior), theta over 180 degrees (the sign
    of s gives the other half), T the identity and/or the transpose. Steps keep the phase
    error at the highest frequency `q_max` under a tenth of a cycle."""
    step = 0.1 / (max(radius_px, 1.0) * q_max)
    if scale_band is None:
        s_max = field_px / (2.0 * max(radius_px, 1.0))
        scales = np.arange(-s_max, s_max + step / 2, step)
    else:
        band = np.arange(scale_band[0], scale_band[1] + step / 2, step)
        scales = np.concatenate([-band[::-1], band])
    theta = np.arange(0.0, math.pi, math.radians(1.5))
    c, s = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (n_theta, 2, 2)
    out = []
    for t in transposes:
        base = rot @ TRANSPOSE if t else rot
        out.append((scales[:, None, None, None] * base[None]).reshape(-1, 2, 2))
    return np.concatenate(out)


def _refine(m0: np.ndarray, spectra, q, k) -> tuple[np.ndarray, float]:
    """The local maximum of S near `m0` (quasi-Newton with the exact gradient)."""
    noise = (np.abs(spectra) ** 2).sum(axis=0)

    def objective(x):
        value, grad = score_exact(x.reshape(2, 2), spectra, q, k, noise)
        return -value, -grad.ravel()

    res = opt.minimize(objective, m0.ravel(), jac=True, method="L-BFGS-B",
                       options={"maxiter": 100, "gtol": 1e-6, "ftol": 1e-6})  # fmt: skip
    return res.x.reshape(2, 2), -float(res.fun)


def estimate(images: np.ndarray, k_px: np.ndarray, transpose: bool | None = None,
             scale_band: tuple[float, float] | None = None,
             seed: int = 0) -> GlobalEstimate:  # fmt: skip
    """The shift model of BF-pixel images (N, rows, cols) at detector positions `k_px` (N, 2,
    relative to the disk centre). `transpose`: known detector wiring (None: both tried);
    `scale_band`: the range of |s| a prior allows, else all plausible ones.

    Two bands are searched, the low frequencies (q <= LOW_BAND: a weak signal's) and all;
    the one whose peak stands higher above its own null is refined. The frequencies are
    capped so that one power table stays within TABLE_BYTES."""
    t0 = time.perf_counter()
    images = np.asarray(images, np.float32)
    k = np.asarray(k_px, np.float64)
    n_max = min(MAX_FREQUENCIES, max(16, TABLE_BYTES // (4 * table_size(k) ** 2)))
    spectra, q = pixel_spectra(images, n_max)
    radius = float(np.hypot(*k.T).max())
    transposes = (False, True) if transpose is None else (bool(transpose),)
    cands = candidates(radius, min(images.shape[1:]), float(np.hypot(*q.T).max()), transposes,
                       scale_band)  # fmt: skip
    bands = (int(np.count_nonzero(np.hypot(*q.T) <= LOW_BAND)), len(q))
    scores = PowerTable(spectra, q, k).scores(cands, bands)
    rng = np.random.default_rng(seed)  # the nulls: scan positions or pixel positions shuffled
    null_peaks = np.zeros(len(bands))
    for _ in range(SHUFFLES):
        flat = images.reshape(len(images), -1)[:, rng.permutation(images[0].size)]
        null_spectra, _ = pixel_spectra(flat.reshape(images.shape), n_max)
        moved = k[rng.permutation(len(k))]
        for table in (PowerTable(null_spectra, q, k), PowerTable(spectra, q, moved)):
            null_peaks = np.maximum(null_peaks, table.scores(cands, bands).max(axis=1))
    ratios = scores.max(axis=1) / np.maximum(null_peaks, 1e-9)  # like with like: coarse peaks
    b = int(np.argmax(ratios))
    n_q, ratio = bands[b], float(ratios[b])
    ok = ratio >= MIN_SIGNIFICANCE
    band = "q <= 0.25/px" if b == 0 else "all q"
    reason = (f"global search ({band}, {n_q} frequencies): image power {scores[b].max():.0f}, "
              f"{ratio:.2f}x the most that {SHUFFLES} shuffles of the scan positions and "
              f"{SHUFFLES} of the pixels reach "
              f"({null_peaks[b]:.0f})")  # fmt: skip
    if not ok:  # nothing to refine
        return GlobalEstimate(None, np.full((2, 2), np.nan), np.empty((0, 2, 2)), float("nan"),
                              float(null_peaks[b]), n_q, time.perf_counter() - t0,
                              f"{reason}; needs {MIN_SIGNIFICANCE}x", ratio,
                              tuple(float(r) for r in ratios))  # fmt: skip
    m, peak = _refine(cands[int(np.argmax(scores[b]))], spectra[:, :n_q], q[:n_q], k)
    subsets = np.empty((SUBSETS, 2, 2))
    for j in range(SUBSETS):  # jackknife: leave every 8th pixel out
        keep = np.arange(len(k)) % SUBSETS != j
        subsets[j] = _refine(m, spectra[keep, :n_q], q[:n_q], k[keep])[0]
    spread = (SUBSETS - 1) / SUBSETS * ((subsets - subsets.mean(axis=0)) ** 2).sum(axis=0)
    errors = np.sqrt(spread * student_scale(SUBSETS - 1) ** 2 + (FLOOR * np.linalg.norm(m, 2)) ** 2)
    return GlobalEstimate(m, errors, subsets, peak, float(null_peaks[b]), n_q,
                          time.perf_counter() - t0, reason, ratio,
                          tuple(float(r) for r in ratios))  # fmt: skip


def pixel_images(stack: np.ndarray, exposure: np.ndarray, scan_shape: tuple[int, int],
                 window: tuple[tuple[int, int], tuple[int, int]],
                 use_px: np.ndarray) -> np.ndarray:  # fmt: skip
    """(N, rows, cols) float32 images of the BF pixels `use_px` (bool) over the central
    FIELD_PX block of `window`, per unit exposure; positions without exposure take each
    pixel's mean (no contrast)."""
    (r0, r1), (c0, c1) = window
    if r1 - r0 > FIELD_PX:
        r0 += (r1 - r0 - FIELD_PX) // 2
        r1 = r0 + FIELD_PX
    if c1 - c0 > FIELD_PX:
        c0 += (c1 - c0 - FIELD_PX) // 2
        c1 = c0 + FIELD_PX
    e = np.asarray(exposure, np.float64).reshape(scan_shape)[r0:r1, c0:c1]
    block = stack.reshape(*scan_shape, -1)[r0:r1, c0:c1][..., use_px].astype(np.float32)
    ok = e > 0
    block /= np.where(ok, e, 1.0)[..., None].astype(np.float32)
    block[~ok] = block[ok].mean(axis=0) if ok.any() else 0.0
    return np.ascontiguousarray(np.moveaxis(block, -1, 0))


def _jackknife(values: np.ndarray, centre: float, period: float | None = None) -> float:
    d = np.asarray(values, np.float64) - centre
    if period:  # angles: differences folded into (-period/2, period/2]
        d = (d + period / 2) % period - period / 2
    n = len(d)
    if n < 2:
        return math.nan
    return float(np.sqrt((n - 1) / n * np.sum((d - d.mean()) ** 2))) * student_scale(n - 1)


class GlobalFallback:
    """The global search for one series where the tile alignment has no model: at the final
    update, and live whenever the acquired rows grew by half since the last attempt (each
    costs seconds, `estimate`). Keeps the last outcome, in words, for the result."""

    def __init__(self, enabled: bool, defocus_hint_A: float | None, transpose: bool | None,
                 step_A: float | None, sampling_mrad: float | None):  # fmt: skip
        self.enabled, self.transpose = enabled, transpose
        self.scale_band, self.prior = None, "none"
        if defocus_hint_A and step_A and sampling_mrad:  # |s| = |C10| alpha/k / step
            s = abs(defocus_hint_A) * sampling_mrad * 1e-3 / step_A
            self.scale_band = (s / 2, 2 * s)
            self.prior = f"defocus hint {defocus_hint_A:g} A (searched within 0.5-2x)"
        self.rows_tried = 0
        self.last: GlobalEstimate | None = None
        self.why = "no model"  # what the tiles gave, in words
        self.model: AlignmentResult | None = None  # the last model the search determined
        self.model_estimate: GlobalEstimate | None = None  # ... and the search that gave it

    def attempt(self, stack: np.ndarray, exposure: np.ndarray, scan_shape: tuple[int, int],
                window: tuple[tuple[int, int], tuple[int, int]], k_px: np.ndarray,
                excluded_px: np.ndarray, final: bool) -> GlobalEstimate | None:  # fmt: skip
        """The search on the window's positions (None: not due, or switched off)."""
        rows = window[0][1] - window[0][0]
        if not self.enabled or (not final and rows < 1.5 * self.rows_tried):
            return None
        self.rows_tried = rows
        use = ~np.asarray(excluded_px, bool)
        images = pixel_images(stack, exposure, scan_shape, window, use)
        self.last = estimate(images, k_px[use], self.transpose, self.scale_band)
        return self.last

    def consider(self, found: AlignmentResult, current: str | None, stack: np.ndarray,
                 exposure: np.ndarray, scan_shape: tuple[int, int],
                 window: tuple[tuple[int, int], tuple[int, int]], k_px: np.ndarray,
                 excluded_px: np.ndarray, final: bool) -> AlignmentResult:  # fmt: skip
        """The tiles' outcome `found`, or the global search's model where the tiles gave none
        or a thin one (fewer measured tiles than MIN_LINEAR_TILES: its uncertainty rests on
        two degrees of freedom or none) and
        the search determines one. `current`: the method of the model in use (None: none yet).
        Live, a model from the tiles, thin or not, stands (the search takes seconds, and would
        hold up the tiles' fast updates); the final update replaces a thin one."""
        its = found.iterations
        weights = its[-1].measured_weights if its else None
        n = int(np.count_nonzero(weights > 0)) if weights is not None else 0
        thin = found.converged and n < MIN_LINEAR_TILES
        if (found.converged and not thin) or not (final or current != "tiles"):
            return found
        if not final and found.converged and current is None:  # live: the thin model stands
            return found
        self.why = "no model" if not found.converged else \
            f"{n} measured tiles, too few for a firm uncertainty"  # fmt: skip
        est = self.attempt(stack, exposure, scan_shape, window, k_px, excluded_px, final)
        if est is not None and est.determined:
            self.model = AlignmentResult(est.matrix_px, (), found.rows, True, "global",
                                         self.note())  # fmt: skip
            self.model_estimate = est
            return self.model
        if est is None and current == "global" and self.model is not None:  # not due: kept
            return replace(self.model, rows=found.rows)
        return found

    def note(self) -> str:
        """Why the model is what it is, for the result (empty: the tiles gave it)."""
        if self.last is None:
            return ""
        e = self.last
        return (f"tile alignment: {self.why}; {e.reason}; prior: {self.prior}; "
                f"{e.seconds:.1f} s")  # fmt: skip

    def errors(self, fit, decompose_px) -> dict[str, float]:
        """1-sigma errors of the aberrations `fit` of the global model: the jackknife over
        subsets of the search that gave the model in use (a later search may have found none;
        `decompose_px` turns a matrix in px into an AberrationFit) scaled to
        Student's 95 % for its 7 degrees of freedom, C10 and C12 with FLOOR x |C10| and the
        rotation with ROTATION_FLOOR_RAD in quadrature (without both, 5 of 15 rotations at the
        lowest doses of the dose sweep lay beyond 2 sigma, one at 4)."""
        subs = [decompose_px(m) for m in self.model_estimate.subsets]
        floor = FLOOR * abs(fit.C10_A)
        return {
            "C10_A": math.hypot(_jackknife([s.C10_A for s in subs], fit.C10_A), floor),
            "C12_A": math.hypot(_jackknife([s.C12_A for s in subs], fit.C12_A), floor),
            "phi12_rad": _jackknife([s.phi12_rad for s in subs], fit.phi12_rad, math.pi),
            "rotation_rad": math.hypot(_jackknife([s.rotation_rad for s in subs],
                                                  fit.rotation_rad, 2 * math.pi),
                                       ROTATION_FLOOR_RAD),
        }  # fmt: skip
