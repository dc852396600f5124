"""4D-STEM detector simulator: frames = |FFT(probe(r - R) t(r))|^2 with detector effects.

`SimulationConfig` (`simulators.config`) holds every physical and detector parameter;
`Simulator` builds the fine sampling grid, probe, sample and detector lookup once and then
produces frames lazily in batches (`iter_batches`), so arbitrarily large scans never hold the
4D array.

Sampling: the fine real-space pixel is step/m (integer m), so scan positions fall exactly on
fine pixels and no sub-pixel interpolation of the sample is needed. The fine window of N pixels
gives a reciprocal pixel 1/(N dx) = detector pixel / oversample. m and N are chosen together so
the simulated detector pitch matches the requested one to < 0.2 %; the pitch actually used is
reported as `angular_sampling_mrad` in the ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
import scipy.ndimage as ndi

from tcbf_live.detectors.base import SeriesInfo, scan_position
from tcbf_live.simulators.config import (  # PRESETS, tutorial_config: imported from here too
    PRESETS,  # noqa: F401
    SimulationConfig,
    SimulationError,
    tutorial_config,  # noqa: F401
    weak_phase_config,  # noqa: F401
)
from tcbf_live.simulators.detector import build_detector_lut, detect_batch
from tcbf_live.simulators.optics import aperture, detector_to_scan_matrix, wavelength_A
from tcbf_live.simulators.samples import band_limit, make_phase


@dataclass(frozen=True)
class SamplingGrid:
    """Fine simulation grid derived from the config (see module docstring)."""

    fine_per_step: int  # m: fine pixels per scan step
    window_px: int  # N: FFT window edge
    oversample: int  # fine reciprocal pixels per detector pixel
    pixel_A: float  # fine real-space pixel = step / m
    angular_sampling_mrad: float  # detector pitch actually simulated
    sample_q_max_per_A: float  # sample band limit keeping the exit wave on the grid

    @classmethod
    def from_config(cls, cfg: SimulationConfig) -> SamplingGrid:
        lam = wavelength_A(cfg.energy_eV)
        dk = cfg.resolved_angular_sampling_mrad() * 1e-3 / lam  # 1/A per detector px
        # The fine grid covers |k_x|, |k_y| <= H around the disk centre (scan frame), H at least
        # the detector's reach along an axis. The sample is band-limited to
        # q_s = H - alpha_edge/lambda - descan, so the exit-wave spectrum never leaves the grid:
        # no aliasing, and rotated detector corners beyond H truly receive nothing.
        cx, cy = cfg.resolved_center_px()
        qx, qy = cfg.detector_shape
        radius_px = cfg.disk_edge_mrad() / cfg.resolved_angular_sampling_mrad()
        half_extent_px = max(cx, qx - cx, cy, qy - cy, 1.5 * radius_px + cfg.max_descan_px()) + 1
        m0 = max(1, math.ceil(cfg.step_A * 2.0 * half_extent_px * dk))
        if m0 > 4096:
            raise SimulationError(f"scan step {cfg.step_A} A needs {m0} fine pixels per step")
        # real-space window must hold the defocused probe: geometric radius + diffraction tails
        alpha = cfg.semiangle_mrad * 1e-3
        radius_A = cfg.aberrations.max_shift_A(alpha) + 2.5 * lam / alpha
        oversample = max(1, math.ceil(2.0 * 1.25 * radius_A * dk))
        if oversample * m0 / (cfg.step_A * dk) > 4096:
            raise SimulationError(
                f"the probe ({2 * radius_A:.0f} A across) needs a simulation window over 4096 px: "
                "reduce defocus/aberrations or the detector size"
            )
        # smallest m (then N) whose pitch error is < 0.2 %, else the best one found
        best = None
        for m in range(m0, 3 * m0 + 8):
            target = oversample * m / (cfg.step_A * dk)
            for n in (math.floor(target), math.ceil(target)):
                if n < 8 or sfft.next_fast_len(n) != n:
                    continue
                err = abs(oversample * m / (n * cfg.step_A) / dk - 1.0)
                if best is None or err < best[0]:
                    best = (err, m, n)
            if best is not None and best[0] < 2e-3:
                break
        if best is None:
            raise SimulationError("no usable simulation grid for these optics")
        _, m, n = best
        dk_eff = oversample * m / (n * cfg.step_A)
        q_s = m / cfg.step_A / 2.0 - (cfg.disk_edge_mrad() * 1e-3 / lam) - cfg.max_descan_px() * dk
        return cls(m, n, oversample, cfg.step_A / m, float(dk_eff * lam * 1e3), float(q_s))


class Simulator:
    """Lazy frame generator with ground truth. Build once, then `iter_batches` or `frames`."""

    def __init__(self, cfg: SimulationConfig):
        cfg.validate()
        self.cfg = cfg
        self.grid = SamplingGrid.from_config(cfg)
        g = self.grid
        if g.window_px > 2048:
            raise SimulationError(
                f"simulation window {g.window_px}^2 px is too large: reduce defocus or detector"
            )
        rows, cols = cfg.scan_shape
        m, n = g.fine_per_step, g.window_px
        if cfg.periodic_sample:
            self.sample_shape = (rows * m, cols * m)
        else:
            self.sample_shape = ((rows - 1) * m + n, (cols - 1) * m + n)
        if self.sample_shape[0] * self.sample_shape[1] > 12e8 / 8:
            raise SimulationError(f"sample grid {self.sample_shape} exceeds 1.2 GB; scan too large")
        self.wavelength_A = wavelength_A(cfg.energy_eV)
        self.phase = make_phase(
            cfg.sample, self.sample_shape, g.pixel_A, cfg.energy_eV, cfg.seed,
            feature_A=cfg.feature_A, phase_rms=cfg.phase_rms, q_max_per_A=g.sample_q_max_per_A,
        )  # fmt: skip
        self.transmission = np.exp(1j * self.phase).astype(np.complex64)
        self.probe = self._make_probe()
        self.det_to_scan = detector_to_scan_matrix(math.radians(cfg.rotation_deg), cfg.transpose)
        self.lut_index, self.lut_weight = build_detector_lut(
            cfg.detector_shape,
            cfg.resolved_center_px(),
            g.window_px,
            g.oversample,
            self.det_to_scan,
        )
        rng = np.random.default_rng([cfg.seed, 0xBAD])
        npx = cfg.detector_shape[0] * cfg.detector_shape[1]
        self.bad_pixels = np.sort(rng.choice(npx, cfg.bad_pixels, replace=False)).astype(np.int64)
        self._window_r = (np.arange(g.window_px) - g.window_px // 2) * g.pixel_A

    # ------------------------------------------------------------------ setup
    def _make_probe(self) -> np.ndarray:
        g, cfg = self.grid, self.cfg
        k = sfft.fftfreq(g.window_px, g.pixel_A)
        ax = self.wavelength_A * k[:, None]
        ay = self.wavelength_A * k[None, :]
        a = np.hypot(ax, ay)
        amp = aperture(a, cfg.semiangle_mrad * 1e-3, cfg.rolloff_mrad * 1e-3)
        chi = cfg.aberrations.chi_rad(ax, ay, self.wavelength_A)
        probe = sfft.fftshift(sfft.ifft2(amp * np.exp(-1j * chi)))  # centred at N//2
        probe /= np.sqrt(np.sum(np.abs(probe) ** 2))
        return probe.astype(np.complex64)

    @property
    def electrons_per_frame(self) -> float:
        """Mean electrons per probe position: dose x step^2."""
        return float(self.cfg.dose_e_per_A2) * self.cfg.step_A**2

    def ground_truth(self) -> dict:
        """Everything the simulator knows, as plain JSON/msgpack-able values."""
        cfg, g = self.cfg, self.grid
        return {
            "simulator": "tcbf-live",
            "sample": cfg.sample,
            "seed": cfg.seed,
            "scan_shape": list(cfg.scan_shape),
            "scan_order": cfg.scan_order,
            "step_A": cfg.step_A,
            "detector_shape": list(cfg.detector_shape),
            "energy_eV": cfg.energy_eV,
            "wavelength_A": self.wavelength_A,
            "semiangle_mrad": cfg.semiangle_mrad,
            "rolloff_mrad": cfg.rolloff_mrad,
            "angular_sampling_mrad": float(g.angular_sampling_mrad),
            "center_px": list(cfg.resolved_center_px()),
            "rotation_deg": cfg.rotation_deg,
            "transpose": cfg.transpose,
            "descan_px_per_step": list(cfg.descan_px_per_step),
            "aberrations": cfg.aberrations.as_dict(),
            "defocus_A": cfg.aberrations.defocus_A,
            "dose_e_per_A2": cfg.dose_e_per_A2,
            "electrons_per_frame": self.electrons_per_frame,
            "noise": cfg.noise,
            "counts_per_electron": cfg.counts_per_electron,
            "bits": cfg.bits,
            "mask_value": cfg.mask_value,
            "bad_pixels": self.bad_pixels.tolist(),
            "phase_rms_rad": float(self.phase.std()),
            "phase_pixel_A": g.pixel_A,
            "phase_scan_origin_px": g.window_px // 2,
            "fine_per_step": g.fine_per_step,
            "dwell_s": cfg.dwell_s,
        }

    @property
    def n_frames(self) -> int:
        return self.cfg.n_frames

    def series_info(self, series_id: int) -> SeriesInfo:
        """Start-message metadata of this dataset, ground truth included."""
        cfg = self.cfg
        return SeriesInfo(
            series_id=series_id,
            scan_shape=cfg.scan_shape,
            detector_shape=cfg.detector_shape,
            dtype=cfg.dtype.str,
            scan_order=cfg.scan_order,
            energy_eV=cfg.energy_eV,
            step_A=cfg.step_A,
            semiangle_mrad=cfg.semiangle_mrad,
            angular_sampling_mrad=self.grid.angular_sampling_mrad,
            rotation_deg=cfg.rotation_deg,
            transpose=cfg.transpose,
            counts_per_electron=cfg.counts_per_electron,
            mask_value=cfg.mask_value,
            frames_expected=cfg.n_frames,
            dwell_s=cfg.dwell_s,
            ground_truth=self.ground_truth(),
        )

    def phase_on_scan_grid(self) -> np.ndarray:
        """True phase sampled at the probe positions (rows, cols): ground truth for images."""
        g = self.grid
        o, m = g.window_px // 2, g.fine_per_step
        rows, cols = self.cfg.scan_shape
        r = (o + m * np.arange(rows)) % self.phase.shape[0]
        c = (o + m * np.arange(cols)) % self.phase.shape[1]
        return self.phase[np.ix_(r, c)]

    def phase_on_grid(self, factor: int = 1, q_max_per_A: float | None = None) -> np.ndarray:
        """True phase on the scan grid refined `factor` times, (rows f, cols f): cell u is at
        scan coordinate u / f (the tcBF reconstruction's grid). Band-limited first to
        `q_max_per_A` and to the grid's Nyquist frequency, so sampling does not alias."""
        g = self.grid
        nyquist = factor / (2.0 * self.cfg.step_A)
        q_max = nyquist if q_max_per_A is None else min(q_max_per_A, nyquist)
        smooth = band_limit(self.phase, g.pixel_A, q_max)
        rows, cols = self.cfg.scan_shape
        u = g.window_px // 2 + g.fine_per_step * np.arange(rows * factor) / factor
        v = g.window_px // 2 + g.fine_per_step * np.arange(cols * factor) / factor
        coords = np.meshgrid(u, v, indexing="ij")
        return ndi.map_coordinates(smooth, coords, order=3, mode="wrap").astype(np.float32)

    def expected_shift_px(self, det_row: float, det_col: float) -> tuple[float, float]:
        """Raw displacement (scan px, scan frame) of the vBF image at a detector pixel.

        Content moves by -grad W(alpha)/step (tcbf-physics.md sect. 3.3), with alpha the
        scan-frame tilt of that pixel.
        """
        cx, cy = self.cfg.resolved_center_px()
        d = np.array([det_row - cx, det_col - cy]) * self.grid.angular_sampling_mrad * 1e-3
        a = self.det_to_scan @ d
        sx, sy = self.cfg.aberrations.shift_A(a[0], a[1])
        return -float(sx) / self.cfg.step_A, -float(sy) / self.cfg.step_A

    # ------------------------------------------------------------------ frames
    def _crop(self, r0: int, c0: int) -> np.ndarray:
        """Window of the transmission function under the probe at sample pixel (r0, c0)."""
        n = self.grid.window_px
        t = self.transmission
        if not self.cfg.periodic_sample:
            return t[r0 : r0 + n, c0 : c0 + n]
        rows = np.arange(r0, r0 + n) % t.shape[0]
        cols = np.arange(c0, c0 + n) % t.shape[1]
        return t[np.ix_(rows, cols)]

    def _exit_spectra(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        g, cfg = self.grid, self.cfg
        n, m = g.window_px, g.fine_per_step
        waves = np.empty((len(rows), n, n), np.complex64)
        d = cfg.descan_px_per_step
        has_descan = any(d)
        dk = g.angular_sampling_mrad * 1e-3 / self.wavelength_A
        for b, (r, c) in enumerate(zip(rows, cols, strict=True)):
            np.multiply(self._crop(r * m, c * m), self.probe, out=waves[b])
            if has_descan:
                shift_det = np.array([d[0] * r + d[1] * c, d[2] * r + d[3] * c])
                kx, ky = self.det_to_scan @ shift_det * dk
                ramp_x = np.exp(2j * np.pi * kx * self._window_r).astype(np.complex64)
                ramp_y = np.exp(2j * np.pi * ky * self._window_r).astype(np.complex64)
                waves[b] *= ramp_x[:, None] * ramp_y[None, :]
        return sfft.fft2(waves, norm="ortho", workers=1, overwrite_x=True)

    def frames(self, first: int, count: int) -> np.ndarray:
        """Frames first..first+count-1 in acquisition order, shape (count, Qx, Qy)."""
        cfg = self.cfg
        if first < 0 or first + count > cfg.n_frames:
            raise IndexError(f"frames {first}..{first + count - 1} outside 0..{cfg.n_frames - 1}")
        ids = np.arange(first, first + count, dtype=np.int64)
        rows, cols = scan_position(ids, cfg.scan_shape, cfg.scan_order)
        spectra = self._exit_spectra(rows, cols).reshape(count, -1)
        out = np.empty((count, cfg.detector_shape[0] * cfg.detector_shape[1]), cfg.dtype)
        mask_value = cfg.mask_value
        detect_batch(
            spectra,
            self.lut_index,
            self.lut_weight,
            np.full(count, self.electrons_per_frame),
            float(cfg.counts_per_electron),
            cfg.noise,
            np.int64(cfg.seed),
            ids,
            float(mask_value - 1) if mask_value is not None else np.inf,
            self.bad_pixels,
            float(mask_value) if mask_value is not None else np.nan,
            out,
        )
        return out.reshape(count, *cfg.detector_shape)

    def iter_batches(self, batch: int = 32) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first frame index, frames) in acquisition order, `batch` frames at a time."""
        for first in range(0, self.cfg.n_frames, batch):
            yield first, self.frames(first, min(batch, self.cfg.n_frames - first))

    def datacube(self) -> np.ndarray:
        """The whole 4D array (rows, cols, Qx, Qy) in scan-position order (small scans only)."""
        cfg = self.cfg
        out = np.empty((*cfg.scan_shape, *cfg.detector_shape), cfg.dtype)
        for first, frames in self.iter_batches(64):
            ids = np.arange(first, first + len(frames))
            r, c = scan_position(ids, cfg.scan_shape, cfg.scan_order)
            out[r, c] = frames
        return out
