"""Per-series tcBF pipeline: accumulated sums -> alignment -> aberrations -> image -> resolution.

No sockets and no threads: the live engine calls `Pipeline.update` from its alignment
thread on a timer (and once more when the series ends), the offline `reconstruct` command once
at the end, both with inputs taken by `SeriesProcessor.inputs()`. Each update
warm-starts from the previous shift model.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from tcbf_live.stream.tcbf.aberrations import AberrationFit, decompose
from tcbf_live.stream.tcbf.accumulators import AccumulatorState
from tcbf_live.stream.tcbf.alignment import AlignmentResult, align, alignment_window
from tcbf_live.stream.tcbf.calibration import Calibration, hot_and_dead
from tcbf_live.stream.tcbf.depth import DepthSections, depth_sections
from tcbf_live.stream.tcbf.descan import DescanFit, DiskMoments, fit_descan, moment_gain
from tcbf_live.stream.tcbf.dose import (
    LevelTrust,
    dose_for_resolution,
    fourier_ring_correlation,
    level_trust,
    transfer_mask,
)
from tcbf_live.stream.tcbf.full_chi import full_chi_image
from tcbf_live.stream.tcbf.global_alignment import GlobalFallback
from tcbf_live.stream.tcbf.higher_order import (
    HigherOrderFit,
    fit_alignment,
    linear_uncertainties,
)
from tcbf_live.stream.tcbf.optics import (
    alpha_rad,
    information_limit_per_A,
    matrix_A_per_rad,
    wavelength_A,
)
from tcbf_live.stream.tcbf.reconstruction import (
    EXPOSURE_TOLERANCE,
    RingImages,
    ShiftAndAdd,
    default_upsampling,
    phase_flip,
    window_pixel_means,
)
from tcbf_live.stream.tcbf.screening import FrameScreen, screen_frames
from tcbf_live.stream.tcbf.slips import slip_lines
from tcbf_live.stream.tcbf.steps import AlignedStep, ImageStep, ResolutionStep
from tcbf_live.stream.tcbf.tiles import (
    PixelGroups,
    RegroupedTiles,
    TileGeometry,
    TileLevels,
    TileSet,
    tile_sets,
    without_excluded,
)
from tcbf_live.stream.tcbf.transfer_fit import Optics, refit
from tcbf_live.stream.tcbf.updates import (
    Acquisition,
    AlignmentInputs,
    PipelineResult,
    PipelineSettings,
)

RINGS = 8  # annuli of the BF disk for the axial-radius control
REGROUP_PX = 0.5
# live updates re-form the pixel groups when a pixel's shift moved this much
FINAL_REGROUP_PX = 0.25  # the final update, tighter
LIVE_REBUILD_PX = 0.5  # image rebuild when a shift moved this much (upsampled px), live ...
FINAL_REBUILD_PX = 0.1  # ... and at the end
# the final update re-deposits positions whose exposure (frames x relative dose) moved by more
# than this since they were deposited: the dose model's last refinements are far smaller, so
# the final image needs no full rebuild (256 x 256: 0.7 s instead of 1.6 s after the last frame)
FINAL_EXPOSURE_TOLERANCE = 0.005


class Pipeline:
    """Alignment state of one series (shift model, shift-and-add accumulator)."""

    def __init__(self, acquisition: Acquisition, calibration: Calibration, layout: TileLevels,
                 settings: PipelineSettings):  # fmt: skip
        acq = self.acquisition = acquisition
        if acq.noiseless:  # no shot noise to wait for: every level is trusted from the start
            settings = replace(settings, alignment=replace(settings.alignment,
                                                           min_tile_electrons=0.0))  # fmt: skip
        self.settings = settings
        self.layout = layout
        self.scan_shape = acq.scan_shape
        self.k_px = calibration.bf_pixels - np.asarray(calibration.center_px)
        self.bf_pixels = calibration.bf_pixels
        self.detector_shape = tuple(calibration.detector_shape)
        self.bad_px = np.zeros(len(self.k_px), bool)  # BF pixels that turned hot or dead
        self.radius_px = float(np.hypot(*self.k_px.T).max())
        mp = calibration.mean_pattern
        self.descan_gain = moment_gain(mp, calibration.bf_pixels, calibration.center_px)
        self.moments = DiskMoments(acq.scan_shape[0] * acq.scan_shape[1], self.k_px)
        weights = mp[calibration.bf_pixels[:, 0], calibration.bf_pixels[:, 1]]
        self.geometry = TileGeometry.build(layout.bins, layout.member_tile, self.k_px, weights)
        # angular sampling: the stream's / flags', else the calibration's, else semiangle/radius
        self.sampling_mrad = calibration.angular_sampling_mrad  # resolved by SeriesProcessor
        self.wavelength_A = wavelength_A(acq.energy_eV) if acq.energy_eV else None
        self.upsampling = settings.upsample or default_upsampling(
            acq.step_A, self.wavelength_A, acq.semiangle_mrad,
            max(acq.detector_shape), self.sampling_mrad,
        )  # fmt: skip
        # checkerboard of detector pixels: two independent half-sets over the whole scan
        half = (calibration.bf_pixels[:, 0] + calibration.bf_pixels[:, 1]) % 2
        self.shift_and_add = ShiftAndAdd(self.scan_shape, self.upsampling,
                                         settings.rebuild_tolerance_px, half)  # fmt: skip
        self.rings = RingImages(self.k_px, self.radius_px, RINGS)
        self.resolution_history: list[tuple[float, float]] = []
        self.last_trust: tuple[LevelTrust, ...] = ()
        self.matrix_px: np.ndarray | None = None  # warm start for the next update
        self.method = "tiles"  # what gave matrix_px (`global_alignment` where tiles cannot)
        st = settings.alignment
        self.fallback = GlobalFallback(st.global_search, st.defocus_hint_A, acq.transpose,
                                       acq.step_A, self.sampling_mrad)  # fmt: skip
        self.last: PipelineResult | None = None
        self._slips: set[tuple[int, int]] = set()
        self.groups: PixelGroups | None = None  # the last live update's, for the next

    def inputs(self, state: AccumulatorState, frames: int) -> AlignmentInputs:
        """Copies of the (merged) state for one update: the hits, totals and BF sums, and the
        tile sums of the alignment window only (live: take them under the ingest lock)."""
        hits = state.hits.copy()
        self.acquisition = self.acquisition.with_stated_dose(state.totals, hits)
        window = alignment_window(hits.reshape(self.scan_shape) > 0,
                                  self.settings.alignment.max_field_px)
        (r0, r1), (c0, c1) = window
        tiles = state.tiles.reshape(*self.scan_shape, -1)[r0:r1, c0:c1].copy()
        totals = state.totals.copy()
        cpe = self.acquisition.counts_per_electron
        electrons = float(totals[np.isfinite(totals)].sum()) / cpe
        return AlignmentInputs(hits, electrons, window, tiles, state.stack, frames, totals,
                               state.bf_sum.copy())  # fmt: skip

    def update(self, inputs: AlignmentInputs, final: bool = False) -> PipelineResult | None:
        """Align on what has arrived, refit, bring the image up to date, measure the
        resolution. None until enough rows are acquired and the dose supports a first model."""
        t0 = time.perf_counter()
        (r0, r1), (c0, c1) = inputs.window
        if min(r1 - r0, c1 - c0) < self.settings.alignment.min_rows:  # too small to align on
            return None
        screen = self.screen(inputs)
        inputs = replace(inputs, exposure=screen.exposure)
        dose = self.scan_dose(inputs.electrons_total)
        aligned = self.align(inputs, dose, final)
        if aligned is None:
            return None
        aberrations = self.aberrations(aligned.result)
        higher = self.third_order(inputs, aligned, aberrations, final)
        image = self.image(inputs, aligned.shifts_px, aberrations, final, higher)
        res = self.resolution(image, dose, aberrations)
        depth = self.depth(inputs, aligned.shifts_px, aberrations, final)
        descan = self.descan(inputs)
        self.last = PipelineResult(
            image=image.image, shift_and_add=image.shift_and_add,
            phase_flipped=image.phase_flipped, upsampling_factor=self.upsampling,
            sampling_A=image.sampling_A, bf_k_px=self.k_px, shifts_px=aligned.shifts_px,
            higher=higher,
            alignment=aligned.result, aberrations=aberrations, rows=inputs.window[0],
            frames=inputs.frames, latency_s=time.perf_counter() - t0, rebuilt=image.rebuilt,
            final=final, ring_radii_px=image.ring_radii_px, ring_bf=image.ring_bf, frc=res.frc,
            resolution_A=res.resolution_A, resolution_limited=res.limited,
            resolution_half_bit_A=res.half_bit_A, resolution_vs_dose=res.history,
            resolution_range_A=res.range_A,
            target_resolution_A=self.settings.target_resolution_A,
            dose_for_target_e_per_A2=res.dose_for_target, trust=self.last_trust,
            alignment_s=aligned.seconds, screen=screen, slips=aligned.slips,
            pixels_excluded=int(self.bad_px.sum()), depth=depth, descan=descan,
            noiseless=self.acquisition.noiseless, chi_model=image.chi_model,
        )  # fmt: skip
        return self.last

    def descan(self, inputs: AlignmentInputs) -> DescanFit | None:
        """The BF disk's drift over the scan (`descan.py`): from the stack's first moments, or
        compensated (`descan_compensation.py`) from the frames' centres of mass."""
        if inputs.descan_centres is not None:
            fit = fit_descan(inputs.descan_centres, self.scan_shape, 1.0)
            shifts = inputs.read_shift_px.reshape(*self.scan_shape, 2)
            return fit and replace(fit, clipped=inputs.read_clipped, read_shift_px=shifts)
        moments = self.moments.update(inputs.stack, inputs.hits, self.exposure(inputs))
        return fit_descan(moments, self.scan_shape, self.descan_gain)

    def depth(self, inputs: AlignmentInputs, shifts_px: np.ndarray,
              aberrations: AberrationFit | None, final: bool) -> DepthSections | None:  # fmt: skip
        """Step 5 (when asked): sections refocused to `depth_offsets_A` (`depth.py`); they need
        the fitted aberrations, the wavelength and the semi-angle."""
        s, acq = self.settings, self.acquisition
        if not s.depth_offsets_A or not (final or s.depth_live) or aberrations is None \
                or not (self.wavelength_A and acq.semiangle_mrad):  # fmt: skip
            return None
        alpha_rad = self.k_px * self.sampling_mrad * 1e-3
        return depth_sections(inputs.stack, self.exposure(inputs), self.scan_shape,
                              self.upsampling, shifts_px, alpha_rad, aberrations, acq.step_A,
                              self.wavelength_A, acq.semiangle_mrad, s.depth_offsets_A,
                              self.shift_and_add.half, self.bad_px, s.phase_flip)  # fmt: skip

    # ------------------------------------------------------------------ the four steps
    def align(self, inputs: AlignmentInputs, dose: float, final: bool) -> AlignedStep | None:
        """Step 1: the shift model from the tiles of the alignment window. The final update
        starts cold and re-forms the tiles at every level: exact rather than fast, and
        independent of when the live updates ran, so a live run ends with exactly what
        `reconstruct` gives for the same frames. Live updates warm-start (one iteration per
        trusted level). None while no model was ever found."""
        st = self.settings.alignment
        self.find_bad_pixels(inputs)
        levels = self.tile_sets(inputs)
        self.last_trust = level_trust(levels, st.min_tile_electrons, dose)
        if not final and self.matrix_px is not None:
            st = replace(st, iterations_per_level=st.live_iterations_per_level)
        previous, self.groups = None if final else self.groups, None  # final: formed afresh
        pixels = RegroupedTiles(inputs.stack, inputs.hits, self.exposure(inputs), inputs.window,
                                self.scan_shape[1], self.layout, self.k_px, self.bad_px,
                                FINAL_REGROUP_PX if final else REGROUP_PX, previous)  # fmt: skip
        t_align = time.perf_counter()
        found = align(levels, st, matrix_px=None if final else self.matrix_px, pixels=pixels)
        seconds = time.perf_counter() - t_align
        self.groups = None if final else pixels.kept()  # the next live update refreshes them
        rows = inputs.window[0]
        found = self.fallback.consider(found, None if self.matrix_px is None else self.method,
                                       inputs.stack, self.exposure(inputs), self.scan_shape,
                                       inputs.window, self.k_px, self.bad_px, final)  # fmt: skip
        if not found.converged and self.matrix_px is None:
            return None
        if found.converged:
            self.matrix_px, self.method = found.matrix_px, found.method
            result = replace(found, rows=rows)
        else:  # nothing trusted this time: keep the previous model
            result = AlignmentResult(self.matrix_px, found.iterations, rows, False, self.method)
        slips = self.all_slips(self.slips(levels, result))
        return AlignedStep(result, result.shifts_px(self.k_px), slips, seconds)

    def third_order(self, inputs: AlignmentInputs, aligned: AlignedStep,
                    aberrations: AberrationFit | None,
                    final: bool) -> HigherOrderFit | None:  # fmt: skip
        """Step 2b: C21, C23 and C30 from the tiles' shifts (every update); at the final one
        refitted on the pixels' transfer as `transfer_fit` says (`transfer_fit.refit`)."""
        acq = self.acquisition
        higher = fit_alignment(aligned.result, aberrations, acq.step_A, self.sampling_mrad)
        if not (final and aberrations and self.wavelength_A and acq.semiangle_mrad):
            return higher
        optics = Optics(acq.step_A, self.sampling_mrad * 1e-3, self.wavelength_A,
                        acq.semiangle_mrad * 1e-3, aberrations.transpose)  # fmt: skip
        return refit(higher, aberrations.matrix_A_per_rad, aberrations.rotation_rad,
                     self.settings.transfer_fit, inputs.stack, self.exposure(inputs),
                     self.scan_shape, inputs.window, self.k_px, self.bad_px, optics)  # fmt: skip

    def aberrations(self, result: AlignmentResult) -> AberrationFit | None:
        """Step 2: defocus, astigmatism and geometry from the shift model (needs the scan step
        and the angular sampling)."""
        if not (self.sampling_mrad and self.acquisition.step_A):
            return None
        m_a = matrix_A_per_rad(result.matrix_px, self.acquisition.step_A, self.sampling_mrad)
        errors = result.errors_px[np.isfinite(result.errors_px)]
        misfit = float(errors[-1]) if errors.size else float("nan")
        fit = decompose(m_a, self.settings.alignment.defocus_sign, misfit,
                        self.acquisition.transpose)  # fmt: skip
        if result.method == "global":  # the jackknife of the global search
            return replace(fit, errors=self.fallback.errors(fit, lambda m: decompose(
                matrix_A_per_rad(m, self.acquisition.step_A, self.sampling_mrad),
                self.settings.alignment.defocus_sign, misfit, fit.transpose)))  # fmt: skip
        errors = linear_uncertainties(result, fit, self.acquisition.step_A, self.sampling_mrad)
        return replace(fit, errors=errors)

    def image(self, inputs: AlignmentInputs, shifts_px: np.ndarray,
              aberrations: AberrationFit | None, final: bool,
              higher: HigherOrderFit | None = None) -> ImageStep:  # fmt: skip
        """Step 3: the shift-and-add image, phase-flipped when the aberrations are known. Live
        updates rebuild only when the shifts moved by half an upsampled pixel (they drift by a
        few hundredths of a scan pixel per update); the final one at a tenth, so the end
        result is the shift-and-add of its own shifts. The final image uses the full chi
        where a third-order term is determined (`full_chi.py`); halves and FRC stay linear."""
        exposure = self.exposure(inputs)
        rebuilt = self.shift_and_add.update(
            inputs.stack, exposure, shifts_px, FINAL_REBUILD_PX if final else LIVE_REBUILD_PX,
            exposure_tolerance=FINAL_EXPOSURE_TOLERANCE if final else EXPOSURE_TOLERANCE,
            excluded_px=self.bad_px,
        )  # fmt: skip
        saa, half0, half1 = self.shift_and_add.images()
        weight = self.shift_and_add.coverage()  # (once: the flip and the FRC taper with it)
        step, lam = self.acquisition.step_A, self.wavelength_A
        sampling = step / self.upsampling if step else None
        image, flipped, model = saa - 1.0, False, "linear"
        if self.settings.phase_flip and aberrations is not None and lam:
            q_max = information_limit_per_A(self.acquisition.semiangle_mrad, lam)
            image = phase_flip(saa, sampling, lam, aberrations.p_matrix_A(), q_max, weight)
            flipped, model = True, "linear"
            if final and self.settings.full_chi and higher and higher.third_order and q_max:
                a = alpha_rad(self.k_px, self.sampling_mrad)
                image = full_chi_image(inputs.stack, exposure, self.scan_shape, self.upsampling,
                                       higher.shifts_A(a) / step, higher.scan_tilts(a),
                                       higher.cartesian_A, self.k_px, self.bad_px, step, lam,
                                       self.acquisition.semiangle_mrad * 1e-3, q_max, weight)
                model = "third order"
        radii = rings = None
        if self.settings.ring_images:
            radii, rings = self.rings.update(inputs.stack, exposure, self.scan_shape)
        return ImageStep(image, saa, (half0, half1), flipped, rebuilt, sampling, radii, rings,
                         model, weight)

    def resolution(self, image: ImageStep, dose: float,
                   aberrations: AberrationFit | None) -> ResolutionStep:  # fmt: skip
        """Step 4: resolution from the FRC of the two half-sets, its history against the dose
        so far, and the dose projected for the target resolution."""
        sampling, p = image.sampling_A, aberrations and aberrations.p_matrix_A()
        transfer = transfer_mask(image.image.shape, sampling, self.wavelength_A, p)
        frc = fourier_ring_correlation(*image.halves, sampling, image.coverage,
                                       transfer=transfer)  # fmt: skip
        res, limited = frc.resolution_A("0.143")
        half_bit, _ = frc.resolution_A("half-bit")
        if sampling is None:  # no step: the curve is in 1/px, a resolution in A is unknown
            res = half_bit = None
        res, half_bit = (None if d is None or math.isnan(d) else d for d in (res, half_bit))
        spread = frc.resolution_range_A("0.143") if res is not None else (math.nan, math.nan)
        if res is not None and not limited and math.isfinite(dose):
            self.resolution_history.append((dose, res, *spread))
        history = np.array(self.resolution_history, float).reshape(-1, 4)
        target = self.settings.target_resolution_A
        needed = dose_for_resolution(target, history) if target else None
        return ResolutionStep(frc, res, limited, half_bit, history, needed, spread)

    # ------------------------------------------------------------------ helpers
    def tile_sets(self, inputs: AlignmentInputs) -> dict[int, TileSet]:
        """Accumulated tile images of every level over the window, per unit exposure (repeat
        passes leave some positions with more frames than others; relative dose), excluded
        frames and bad pixels left out."""
        (r0, r1), (c0, c1) = inputs.window
        exposure = self.exposure(inputs).reshape(-1, self.scan_shape[1])[r0:r1, c0:c1]
        block = without_excluded(inputs.tiles, inputs.stack, inputs.window, self.scan_shape[1],
                                 self.layout, self.bad_px)  # fmt: skip
        return tile_sets(block, exposure, self.layout, self.geometry,
                         self.acquisition.counts_per_electron, self.radius_px)  # fmt: skip

    @staticmethod
    def slips(levels: dict[int, TileSet], result: AlignmentResult) -> tuple:
        """Missed-trigger check (`slips.slip_lines`) on the finest level the alignment
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
        gain = self.acquisition.counts_per_electron
        hot, dead = hot_and_dead(grid, usable, int(exposure), gain)
        self.bad_px |= (hot | dead)[rows, cols]

    def screen(self, inputs: AlignmentInputs) -> FrameScreen:
        """Dose model and excluded frames over everything acquired (`screening`); the pattern
        test runs on the finest tiles of the alignment window (fewest electrons per tile: a
        zinger stands out most)."""
        n0 = self.layout.n_tiles[-1]
        totals = inputs.totals if inputs.totals is not None else inputs.hits.astype(float)
        bf = inputs.bf_sum if inputs.bf_sum is not None else totals
        acq = self.acquisition
        return screen_frames(inputs.hits, totals, bf, self.scan_shape, acq.counts_per_electron,
                             inputs.tiles[..., -n0:], inputs.window,
                             acq.scan_order == "serpentine")  # fmt: skip

    @staticmethod
    def exposure(inputs: AlignmentInputs) -> np.ndarray:
        """Per-position divisor: the screened exposure, else the frame count."""
        if inputs.exposure is not None:
            return inputs.exposure
        return inputs.hits.astype(np.float64)

    def scan_dose(self, electrons_total: float) -> float:
        """Scan-average dose so far (e/A^2): all electrons over the whole scan's area; it grows
        from 0 to the dose per position during a pass, and adds up over repeat passes."""
        step = self.acquisition.step_A
        n_pos = self.scan_shape[0] * self.scan_shape[1]
        return electrons_total / (n_pos * step**2) if step else float("nan")
