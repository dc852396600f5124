"""Per-series tcBF pipeline: accumulators -> tile images -> alignment -> aberrations -> image.

No sockets and no threads: the live engine calls `TcbfProcessor.update` from its alignment
thread on a timer (and once more when the series ends), the offline `reconstruct` command once
at the end, both with inputs taken by `SeriesProcessor.alignment_inputs()`. Each update
warm-starts from the previous shift model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from tcbf_live.detectors.base import SeriesInfo
from tcbf_live.simulators.optics import wavelength_A
from tcbf_live.stream.tcbf.aberrations import AberrationFit, decompose
from tcbf_live.stream.tcbf.accumulators import TileLevels
from tcbf_live.stream.tcbf.alignment import (
    AlignmentResult,
    AlignmentSettings,
    TileGeometry,
    TileSet,
    acquired_rows,
    align,
)
from tcbf_live.stream.tcbf.calibration import Calibration, hot_and_dead
from tcbf_live.stream.tcbf.dose import (
    FRC,
    LevelTrust,
    dose_for_resolution,
    fourier_ring_correlation,
)
from tcbf_live.stream.tcbf.reconstruction import (
    EXPOSURE_TOLERANCE,
    PixelGroups,
    ShiftAndAdd,
    default_upsampling,
    exposure_changed,
    phase_flip,
    ring_sums,
    window_pixel_means,
)
from tcbf_live.stream.tcbf.screening import FrameScreen, screen_frames, slip_lines


@dataclass(frozen=True)
class TcbfSettings:
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)
    upsample: int | None = None  # None: round(2 alpha dx / lambda), capped
    phase_flip: bool = True
    target_resolution_A: float | None = None  # report the dose projected to reach it
    rebuild_tolerance_px: float = 0.1  # shift change (upsampled px) that forces a rebuild
    ring_images: bool = False  # also keep annular vBF images (the viewer's axial-radius slider)


@dataclass(frozen=True)
class AlignmentInputs:
    """What one update reads, taken under the ingest lock (copies, except `stack`).

    `stack` is the live per-BF-pixel array: rows of positions counted in `hits` are complete
    (the kernel fills a row before counting it), so reading them without the lock is safe for
    a single pass. During a repeat pass (`--repeat accumulate`) a position being written while
    an update reads it can be off by one frame in that update; the final update runs after
    ingest and is exact."""

    hits: np.ndarray  # (n_pos,) copy
    electrons_total: float  # electrons in the whole scan so far (dose)
    window: tuple[tuple[int, int], tuple[int, int]]  # scan rows, cols the alignment uses
    tiles: np.ndarray  # (window rows, window cols, total tiles) copy of that block
    stack: np.ndarray  # (n_pos, N_bf) live view
    frames: int  # frames accumulated when taken
    totals: np.ndarray | None = None  # (n_pos,) copy: counts of all unmasked pixels
    bf_sum: np.ndarray | None = None  # (n_pos,) copy: counts of the BF pixels
    # (n_pos,) frames x relative dose of each position, 0 where missing or excluded: what every
    # per-position value is divided by (set by `TcbfProcessor.update` from the frame screen)
    exposure: np.ndarray | None = None


@dataclass(frozen=True)
class TcbfResult:
    """One alignment + reconstruction update (arrays are owned copies)."""

    image: np.ndarray  # tcBF image (phase-flipped when enabled and possible), (rows f, cols f)
    shift_and_add: np.ndarray  # the image before phase flipping (mean ~1)
    phase_flipped: bool
    upsampling_factor: int
    sampling_A: float | None  # pixel size of `image`
    bf_k_px: np.ndarray  # (N_bf, 2) BF pixel positions rel. to the disk centre (det px)
    shifts_px: np.ndarray  # (N_bf, 2) model correction shifts (scan px, row/col)
    alignment: AlignmentResult
    aberrations: AberrationFit | None
    rows: tuple[int, int]  # scan rows the alignment used
    frames: int  # frames accumulated when the update started
    latency_s: float  # wall time of the update
    rebuilt: bool  # image rebuilt from the stack (else only new positions deposited)
    final: bool = False
    ring_radii_px: np.ndarray | None = None  # (n_rings,) outer radius of each annulus
    ring_bf: np.ndarray | None = None  # (n_rings, rows, cols) vBF per annulus, per frame
    frc: FRC | None = None  # of the two checkerboard half reconstructions
    resolution_A: float | None = None  # FRC 0.143 crossing (None: unknown)
    resolution_limited: bool = False  # never crossed: the grid's Nyquist limit, not the data
    resolution_half_bit_A: float | None = None
    resolution_vs_dose: np.ndarray | None = None  # (updates, 2): scan-average dose, resolution
    target_resolution_A: float | None = None
    dose_for_target_e_per_A2: float | None = None  # estimate from the power-law fit
    trust: tuple[LevelTrust, ...] = ()
    alignment_s: float = 0.0  # of `latency_s`: the alignment alone (tiles, registration, fit)
    screen: FrameScreen | None = None  # dose model and excluded frames this update used
    pixels_excluded: int = 0  # BF pixels that turned hot or dead during the scan, left out
    slips: tuple[tuple[int, int], ...] = ()  # (scan line, +-1 px): frames land off from there

    @property
    def errors_px(self) -> np.ndarray:
        return self.alignment.errors_px

    def summary(self) -> str:
        ab = self.aberrations
        fit = (
            f"defocus {ab.defocus_A:.4g} A, C12 {ab.C12_A:.3g} A at "
            f"{np.degrees(ab.phi12_rad):.1f} deg, rotation {np.degrees(ab.rotation_rad):.2f} deg"
            f"{', transposed' if ab.transpose else ''}"
            if ab is not None
            else "aberrations need --energy/--step and an angular sampling"
        )
        levels = ",".join(str(b) for b in self.alignment.schedule) or "none"
        res = ""
        if self.resolution_A is not None:
            bound = "better than " if self.resolution_limited else ""
            res = (f"; resolution {bound}{self.resolution_A:.3g} A (FRC 0.143), "
                   f"{self.resolution_half_bit_A:.3g} A (half-bit)")  # fmt: skip
        if self.dose_for_target_e_per_A2 is not None:
            res += (f"; {self.target_resolution_A:g} A needs ~{self.dose_for_target_e_per_A2:.3g}"
                    " e/A^2 (estimate)")  # fmt: skip
        return f"tcBF: bins {levels}; {fit}{res}; update {self.latency_s * 1e3:.0f} ms"


RINGS = 8  # annuli of the BF disk for the axial-radius control
OUTSIDE_PX = 1 << 30  # a pixel group moved this far lands on no tile (left out)
REGROUP_PX = 0.5
# live updates re-form the pixel groups when a pixel's shift moved this much
FINAL_REGROUP_PX = 0.25  # the final update, tighter
LIVE_REBUILD_PX = 0.5  # image rebuild when a shift moved this much (upsampled px), live ...
FINAL_REBUILD_PX = 0.1  # ... and at the end
# the final update re-deposits positions whose exposure (frames x relative dose) moved by more
# than this since they were deposited: the dose model's last refinements are far smaller, so
# the final image needs no full rebuild (256 x 256: 0.7 s instead of 1.6 s after the last frame)
FINAL_EXPOSURE_TOLERANCE = 0.005


def level_trust(levels: dict[int, TileSet], threshold: float, dose: float) -> tuple:
    """Electrons per tile of every bin level against the schedule's threshold (full tiles:
    those holding at least half as many pixels as the largest, as `TileSet.is_trusted`)."""
    out = []
    for b in sorted(levels, reverse=True):
        t = levels[b]
        full = t.electrons[t.n_pixels >= 0.5 * t.n_pixels.max()]
        lowest = float(full.min()) if full.size else 0.0
        needed = dose * threshold / lowest if lowest > 0 and math.isfinite(dose) else None
        out.append(LevelTrust(b, len(t.electrons), lowest, float(np.median(full)) if full.size
                              else 0.0, threshold, t.is_trusted(threshold), needed))  # fmt: skip
    return tuple(out)


class TcbfProcessor:
    """Alignment state of one series (shift model, shift-and-add accumulator)."""

    def __init__(self, info: SeriesInfo, calibration: Calibration, layout: TileLevels,
                 settings: TcbfSettings):  # fmt: skip
        self.info = info
        self.settings = settings
        self.layout = layout
        self.scan_shape = info.scan_shape
        self.k_px = calibration.bf_pixels - np.asarray(calibration.center_px)
        self.bf_pixels = calibration.bf_pixels
        self.detector_shape = tuple(calibration.detector_shape)
        self.bad_px = np.zeros(len(self.k_px), bool)  # BF pixels that turned hot or dead
        self.radius_px = float(np.hypot(*self.k_px.T).max())
        mp = calibration.mean_pattern
        weights = mp[calibration.bf_pixels[:, 0], calibration.bf_pixels[:, 1]]
        self.geometry = TileGeometry.build(layout.bins, layout.member_tile, self.k_px, weights)
        # angular sampling: the stream's / the flags', else the calibration's, else semiangle
        # over the measured disk radius
        self.sampling_mrad = calibration.angular_sampling_mrad  # resolved by SeriesProcessor
        self.wavelength_A = wavelength_A(info.energy_eV) if info.energy_eV else None
        self.upsampling = settings.upsample or default_upsampling(
            info.step_A, self.wavelength_A, info.semiangle_mrad,
            max(info.detector_shape), self.sampling_mrad,
        )  # fmt: skip
        # checkerboard of detector pixels: two independent half-sets over the whole scan
        half = (calibration.bf_pixels[:, 0] + calibration.bf_pixels[:, 1]) % 2
        self.shift_and_add = ShiftAndAdd(self.scan_shape, self.upsampling,
                                         settings.rebuild_tolerance_px, half)  # fmt: skip
        self.resolution_history: list[tuple[float, float]] = []
        self.last_trust: tuple[LevelTrust, ...] = ()
        self.matrix_px: np.ndarray | None = None  # warm start for the next update
        self._groups: tuple | None = None  # (key, PixelGroups) within one update
        self._regroup_px = REGROUP_PX
        self._rings: np.ndarray | None = None  # ring images, updated where hits changed
        self.last: TcbfResult | None = None
        self._slips: set[tuple[int, int]] = set()

    def window(self, valid: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
        """Scan rows and columns the alignment uses: the acquired rows, at most
        `max_field_px` of them (the middle ones) and of the columns (centred): a 128 x 128
        field holds ample signal for the 4 numbers of the model and bounds the cost."""
        cap = self.settings.alignment.max_field_px
        r0, r1 = acquired_rows(valid)
        if r1 - r0 > cap:
            r0 += (r1 - r0 - cap) // 2
            r1 = r0 + cap
        cols = self.scan_shape[1]
        c0 = max(0, (cols - cap) // 2)
        return (r0, r1), (c0, min(cols, c0 + cap))

    def tile_sets(self, inputs: AlignmentInputs) -> dict[int, TileSet]:
        """Accumulated tile images of every level over the window, per frame (repeat passes
        leave some positions with more frames than others) and relative dose, excluded frames
        left out; electrons are the raw sums over the positions kept."""
        (r0, r1), (c0, c1) = inputs.window
        exposure = self.exposure(inputs).reshape(-1, self.scan_shape[1])[r0:r1, c0:c1]
        valid = exposure > 0
        per_frame = np.divide(1.0, exposure, out=np.zeros(exposure.shape), where=valid)
        per_frame = per_frame.astype(np.float32)
        block = self.without_bad_pixels(inputs)
        lay, geo = self.layout, self.geometry
        gain = self.info.counts_per_electron
        out = {}
        for lvl, b in enumerate(lay.bins):
            sub = block[:, :, lay.offsets[lvl] : lay.offsets[lvl] + lay.n_tiles[lvl]]
            with np.errstate(invalid="ignore"):  # inf x 0 at excluded non-finite frames
                images = np.ascontiguousarray(np.moveaxis(sub, 2, 0)) * per_frame
            images[:, ~valid] = 0.0  # excluded frames: no signal (and no non-finite values)
            electrons = sub[valid].sum(axis=0, dtype=np.float64) / gain

            out[b] = TileSet(b, images, valid, geo.k_px[b], electrons, geo.n_pixels[b],
                             lay.labels[lvl], self.radius_px)  # fmt: skip
        return out

    def regrouped_tiles(self, inputs: AlignmentInputs, window, bin_px: int,
                        matrix_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Tile images of level `bin_px` from the per-pixel stack, each pixel's image moved by its
        model shift (nearest scan px), so tiles are sharp and share one window (see `align`);
        and the model those shifts came from. The grouped pixel sums are reused by every level
        until the model moves some pixel by more than REGROUP_PX."""
        shifts = self.k_px @ matrix_px.T
        cached = self._groups
        if (
            cached is None
            or cached[0] != (id(inputs), window)
            or np.abs(shifts - self.k_px @ cached[1].matrix_px.T).max() > self._regroup_px
        ):
            move = np.rint(shifts).astype(np.int64)
            move[self.bad_px] = OUTSIDE_PX  # left out: moved off every tile
            groups = PixelGroups(inputs.stack, self.exposure(inputs), window[0], window[1],
                                 self.scan_shape[1], self.layout.member_tile[-1], move,
                                 matrix_px.copy())  # fmt: skip
            self._groups = cached = ((id(inputs), window), groups)
        groups = cached[1]
        lvl = self.layout.bins.index(bin_px)
        images = groups.tile_images(self.layout.member_tile[lvl], self.layout.n_tiles[lvl])
        return images, groups.matrix_px

    def update(self, inputs: AlignmentInputs, final: bool = False) -> TcbfResult | None:
        """Align on what has arrived, refit, bring the image up to date. None until enough rows
        are acquired and the dose supports a first shift model."""
        t0 = time.perf_counter()
        st = self.settings.alignment
        window = inputs.window
        rows = window[0]
        cols = window[1][1] - window[1][0]
        if min(rows[1] - rows[0], cols) < st.min_rows:  # too small a field to align on
            return None
        screen = self.screen(inputs)
        inputs = replace(inputs, exposure=screen.exposure)
        self.find_bad_pixels(inputs)
        levels = self.tile_sets(inputs)
        dose = self.scan_dose(inputs.electrons_total)
        self.last_trust = level_trust(levels, st.min_tile_electrons, dose)

        # The final update starts cold and re-forms the tiles at every level: exact rather than
        # fast, and independent of when the live updates ran, so a live run ends with exactly
        # what `reconstruct` gives for the same frames. Live updates warm-start.
        self._regroup_px = FINAL_REGROUP_PX if final else REGROUP_PX
        warm = not final and self.matrix_px is not None
        if warm:  # a live update refines the last model: each trusted level once
            st = replace(st, iterations_per_level=st.live_iterations_per_level)

        t_align = time.perf_counter()
        try:
            result = align(
                levels,
                st,
                matrix_px=None if final else self.matrix_px,
                regroup=lambda b, m: self.regrouped_tiles(inputs, window, b, m),
            )
        finally:
            self._groups = None  # release the grouped sums (and never reuse them)
        align_s = time.perf_counter() - t_align

        result = AlignmentResult(result.matrix_px, result.iterations, rows, result.converged)
        if not result.converged and self.matrix_px is None:
            return None
        if result.converged:
            self.matrix_px = result.matrix_px
        else:  # nothing trusted this time: keep the previous model
            result = AlignmentResult(self.matrix_px, result.iterations, rows, False)
        shifts = result.shifts_px(self.k_px)
        slips = self.all_slips(self.slips(levels, result))
        aberrations = None
        if self.sampling_mrad and self.info.step_A:
            # s_A = alpha M_A^T with alpha = k x sampling: M_A = M_px x step / sampling
            m_a = result.matrix_px * self.info.step_A / (self.sampling_mrad * 1e-3)
            errors = result.errors_px[np.isfinite(result.errors_px)]
            misfit = float(errors[-1]) if errors.size else float("nan")
            aberrations = decompose(m_a, st.defocus_sign, misfit, self.info.transpose)

        # live: rebuild only when the shifts moved by half an upsampled pixel (they drift by a
        # few hundredths of a scan pixel per update); final: a tenth, so the end result is
        # the shift-and-add of its own shifts
        rebuilt = self.shift_and_add.update(
            inputs.stack,
            self.exposure(inputs),
            shifts,
            FINAL_REBUILD_PX if final else LIVE_REBUILD_PX,
            exposure_tolerance=FINAL_EXPOSURE_TOLERANCE if final else EXPOSURE_TOLERANCE,
            excluded_px=self.bad_px,
        )
        saa, half0, half1 = self.shift_and_add.images()
        sampling = self.info.step_A / self.upsampling if self.info.step_A else None
        image, flipped = saa - 1.0, False
        if self.settings.phase_flip and aberrations is not None and self.wavelength_A:
            q_max = (2e-3 * self.info.semiangle_mrad / self.wavelength_A
                     if self.info.semiangle_mrad else None)  # fmt: skip
            image = phase_flip(saa, sampling, self.wavelength_A, aberrations.p_matrix_A(), q_max,
                               self.shift_and_add.coverage())  # fmt: skip
            flipped = True

        radii, rings = self.ring_images(inputs) if self.settings.ring_images else (None, None)

        # resolution from the two half-sets, and its history against the dose so far
        frc = fourier_ring_correlation(half0, half1, sampling, self.shift_and_add.coverage())
        res, limited = frc.resolution_A("0.143")
        half_bit, _ = frc.resolution_A("half-bit")
        if sampling is None:  # no step: the curve is in 1/px, a resolution in A is unknown
            res = half_bit = None

        if res is not None and not limited and math.isfinite(dose):
            self.resolution_history.append((dose, res))
        history = np.array(self.resolution_history, float).reshape(-1, 2)
        target = self.settings.target_resolution_A
        needed = dose_for_resolution(target, history) if target else None

        self.last = TcbfResult(
            image=image,
            shift_and_add=saa,
            phase_flipped=flipped,
            upsampling_factor=self.upsampling,
            sampling_A=sampling,
            bf_k_px=self.k_px,
            shifts_px=shifts,
            alignment=result,
            aberrations=aberrations,
            rows=rows,
            frames=inputs.frames,
            latency_s=time.perf_counter() - t0,
            rebuilt=rebuilt,
            final=final,
            ring_radii_px=radii,
            ring_bf=rings,
            frc=frc,
            resolution_A=res,
            resolution_limited=limited,
            resolution_half_bit_A=half_bit,
            resolution_vs_dose=history,
            target_resolution_A=target,
            dose_for_target_e_per_A2=needed,
            trust=self.last_trust,
            alignment_s=align_s,
            screen=screen,
            slips=slips,
            pixels_excluded=int(self.bad_px.sum()),
        )
        return self.last

    @staticmethod
    def slips(levels: dict[int, TileSet], result: AlignmentResult) -> tuple:
        """Missed-trigger check (`screening.slip_lines`) on the finest level the alignment
        used, with the fitted model's tile shifts; lines as scan rows."""
        if not result.schedule:
            return ()
        tiles = levels[result.schedule[-1]]
        found = slip_lines(tiles.images, result.shifts_px(tiles.k_px), tiles.valid, result.rows[0])
        return tuple(found)

    def all_slips(self, found: tuple) -> tuple:
        """Slips found by this update or any earlier one (the window and the dose change
        between updates: a slip seen once stays reported)."""
        self._slips.update(found)
        return tuple(sorted(self._slips))

    def find_bad_pixels(self, inputs: AlignmentInputs) -> None:
        """BF pixels that turned hot or dead during the scan (after calibration), from their
        mean over the alignment window against their neighbours (`hot_and_dead`); once found,
        left out of the tiles, the pixel groups and the image for the rest of the series."""
        means, exposure = window_pixel_means(inputs.stack, self.exposure(inputs), inputs.window,
                                             self.scan_shape[1])  # fmt: skip
        if exposure <= 0:
            return
        rows, cols = self.bf_pixels[:, 0], self.bf_pixels[:, 1]
        grid = np.zeros(self.detector_shape)
        grid[rows, cols] = means
        usable = np.zeros(self.detector_shape, bool)
        usable[rows, cols] = ~self.bad_px
        hot, dead = hot_and_dead(grid, usable, int(exposure), self.info.counts_per_electron)
        self.bad_px |= (hot | dead)[rows, cols]

    def without_bad_pixels(self, inputs: AlignmentInputs) -> np.ndarray:
        """The window's tile sums with the bad BF pixels' values taken out (every level)."""
        if not self.bad_px.any():
            return inputs.tiles
        (r0, r1), (c0, c1) = inputs.window
        block = inputs.tiles.astype(np.float32, copy=True)
        stack = inputs.stack.reshape(*self.scan_shape, -1)
        lay = self.layout
        for i in np.flatnonzero(self.bad_px):
            values = stack[r0:r1, c0:c1, i].astype(np.float32)
            for lvl in range(len(lay.bins)):
                block[:, :, lay.offsets[lvl] + lay.member_tile[lvl][i]] -= values
        return block

    def screen(self, inputs: AlignmentInputs) -> FrameScreen:
        """Dose model and excluded frames over everything acquired (`stream.screening`); the
        pattern test runs on the finest tiles of the alignment window (fewest electrons per
        tile: a zinger stands out most)."""
        n0 = self.layout.n_tiles[-1]
        totals = inputs.totals if inputs.totals is not None else inputs.hits.astype(float)
        bf = inputs.bf_sum if inputs.bf_sum is not None else totals
        return screen_frames(inputs.hits, totals, bf, self.scan_shape,
                             self.info.counts_per_electron, inputs.tiles[..., -n0:],
                             inputs.window, self.info.scan_order == "serpentine")  # fmt: skip

    @staticmethod
    def exposure(inputs: AlignmentInputs) -> np.ndarray:
        """Per-position divisor: the screened exposure, else the frame count."""
        if inputs.exposure is not None:
            return inputs.exposure
        return inputs.hits.astype(np.float64)

    def scan_dose(self, electrons_total: float) -> float:
        """Scan-average dose so far (e/A^2): all electrons over the whole scan's area; it grows
        from 0 to the dose per position during a pass, and adds up over repeat passes."""
        step = self.info.step_A
        n_pos = self.scan_shape[0] * self.scan_shape[1]
        return electrons_total / (n_pos * step**2) if step else float("nan")

    def ring_images(self, inputs: AlignmentInputs, n_rings: int = RINGS):
        """Virtual-BF images of `n_rings` equal-width annuli of the disk (for a live axial-radius
        control: the vBF of radius r is the sum of the rings inside r)."""
        edges = self.radius_px * np.arange(1, n_rings + 1) / n_rings
        if self._rings is None:
            radius = np.hypot(*self.k_px.T)
            self._ring_of = np.minimum(np.searchsorted(edges, radius), n_rings - 1)
            self._rings = np.zeros((n_rings, inputs.stack.shape[0]), np.float32)
            self._ring_hits = np.zeros(inputs.stack.shape[0])
        exposure = self.exposure(inputs)
        changed = np.flatnonzero(exposure_changed(exposure, self._ring_hits))
        ring_sums(inputs.stack, exposure, changed.astype(np.int64),
                  self._ring_of.astype(np.int64), self._rings)  # fmt: skip
        self._ring_hits[changed] = exposure[changed]
        return edges, self._rings.reshape(n_rings, *self.scan_shape).copy()
