"""What one tcBF update reads and returns: the series' acquisition, settings, inputs, result.

Plain frozen records, shared by the pipeline (`pipeline.Pipeline`) and the series side
that builds the inputs and publishes the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from tcbf_live.stream.tcbf.aberrations import AberrationFit
from tcbf_live.stream.tcbf.alignment import AlignmentResult, AlignmentSettings
from tcbf_live.stream.tcbf.depth import DepthSections
from tcbf_live.stream.tcbf.descan import DescanFit
from tcbf_live.stream.tcbf.dose import FRC, LevelTrust
from tcbf_live.stream.tcbf.higher_order import HigherOrderFit
from tcbf_live.stream.tcbf.screening import FrameScreen


@dataclass(frozen=True)
class Acquisition:
    """What the core needs of a series' metadata (field names as `detectors.base.SeriesInfo`,
    whose resolved values the series side passes: `Acquisition.of(info)`)."""

    scan_shape: tuple[int, int]  # (rows, cols)
    detector_shape: tuple[int, int]
    scan_order: str = "raster"  # or "serpentine"
    energy_eV: float | None = None
    step_A: float | None = None
    semiangle_mrad: float | None = None
    counts_per_electron: float = 1.0
    transpose: bool | None = None  # detector wiring, when announced
    dose_e_per_A2: float | None = None  # stated per position: the counts per electron from it
    # float intensities without a counts calibration (not whole numbers, no counts per
    # electron announced or given): with a stated dose their gain comes from it
    # (`with_stated_dose`), else they are read as noiseless: every bin level trusted
    intensities: bool = False

    @classmethod
    def of(cls, metadata: object, counts: bool = True) -> Acquisition:
        """From any object carrying these fields (e.g. a `SeriesInfo`); `counts`: the frames
        are counts (whole numbers, or a counts per electron was given)."""
        known = {f.name: getattr(metadata, f.name) for f in fields(cls) if f.name != "intensities"}
        floats = np.dtype(getattr(metadata, "dtype", "<u2")).kind == "f"
        return cls(**known, intensities=floats and not counts
                   and known["counts_per_electron"] == 1.0)  # fmt: skip

    @property
    def noiseless(self) -> bool:
        return self.intensities and not self.dose_e_per_A2

    def with_stated_dose(self, totals: np.ndarray, hits: np.ndarray) -> Acquisition:
        """Float intensities with a stated dose (and a known step): the counts per electron
        that make the acquired positions' mean counts per frame that dose; else unchanged."""
        frames = float(hits.sum())
        if not (self.intensities and self.dose_e_per_A2 and self.step_A) or frames <= 0:
            return self
        counts = float(totals[np.isfinite(totals)].sum()) / frames
        gain = counts / (self.dose_e_per_A2 * self.step_A**2)
        return replace(self, counts_per_electron=gain) if gain > 0 else self


@dataclass(frozen=True)
class PipelineSettings:
    alignment: AlignmentSettings = field(default_factory=AlignmentSettings)
    upsample: int | None = None  # None: round(2 alpha dx / lambda), capped
    phase_flip: bool = True
    target_resolution_A: float | None = None  # report the dose projected to reach it
    rebuild_tolerance_px: float = 0.1  # shift change (upsampled px) that forces a rebuild
    ring_images: bool = False  # also keep annular vBF images (the viewer's axial-radius slider)
    # depth sections (`depth`) at these changes of defocus (A), at the final update (and at
    # every live one with `depth_live`); () for none
    depth_offsets_A: tuple[float, ...] = ()
    depth_live: bool = False
    # the final image with the full fitted chi where a third-order term is determined
    # (`full_chi.py`); False: the linear model's sign flip, as the live updates
    full_chi: bool = True
    # the final update refits the third order on the pixels' transfer (`transfer_fit.py`,
    # seconds): "determined" where the tiles' shift fit finds a term at 5 sigma, "always" (from
    # the linear model where the tiles give no third order), "off" (the shift fit stands)
    transfer_fit: str = "determined"


@dataclass(frozen=True)
class AlignmentInputs:
    """What one update reads, taken under the ingest lock (copies, except `stack`).

    `stack` is the live per-BF-pixel array: rows of positions counted in `hits` are complete
    (the kernel fills a row before counting it), so reading them without the lock is safe for
    a single pass. During a repeat pass (`--repeat accumulate`) a position being written while
    an update reads it can be off by one frame in that update (and in the pixel groups kept
    for the next live updates until that position's frame count changes again: a stack row
    changes only with its count in `hits`); the final update runs after ingest and is exact."""

    hits: np.ndarray  # (n_pos,) copy
    electrons_total: float  # electrons in the whole scan so far (dose)
    window: tuple[tuple[int, int], tuple[int, int]]  # scan rows, cols the alignment uses
    tiles: np.ndarray  # (window rows, window cols, total tiles) copy of that block
    stack: np.ndarray  # (n_pos, N_bf) live view
    frames: int  # frames accumulated when taken
    totals: np.ndarray | None = None  # (n_pos,) copy: counts of all unmasked pixels
    bf_sum: np.ndarray | None = None  # (n_pos,) copy: counts of the BF pixels
    # (n_pos,) frames x relative dose of each position, 0 where missing or excluded: what every
    # per-position value is divided by (set by `Pipeline.update` from the frame screen)
    exposure: np.ndarray | None = None
    # descan compensation (`descan_compensation.py`): per-position disk displacement from the
    # centres of mass (n_pos, 2), where the BF pixels were read, positions clipped at the edge
    descan_centres: np.ndarray | None = None
    read_shift_px: np.ndarray | None = None
    read_clipped: int = 0


@dataclass(frozen=True)
class PipelineResult:
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
    # (updates, 4): scan-average dose, resolution, its range (better, worse: the FRC one sigma
    # up and down; NaN: not determined at that end)
    resolution_vs_dose: np.ndarray | None = None
    resolution_range_A: tuple[float, float] = (float("nan"), float("nan"))
    target_resolution_A: float | None = None
    dose_for_target_e_per_A2: float | None = None  # estimate from the power-law fit
    trust: tuple[LevelTrust, ...] = ()
    alignment_s: float = 0.0  # of `latency_s`: the alignment alone (tiles, registration, fit)
    screen: FrameScreen | None = None  # dose model and excluded frames this update used
    pixels_excluded: int = 0  # BF pixels that turned hot or dead during the scan, left out
    slips: tuple[tuple[int, int], ...] = ()  # (scan line, +-1 px): frames land off from there
    depth: DepthSections | None = None  # refocused sections (PipelineSettings.depth_offsets_A)
    descan: DescanFit | None = None  # the BF disk's drift over the scan (every update)
    higher: HigherOrderFit | None = None  # C10..C30 with uncertainties (`higher_order.py`)
    noiseless: bool = False  # float intensities read as noiseless (`Acquisition.noiseless`)
    chi_model: str = "linear"  # the chi `image` was corrected with: or "third order"

    @property
    def errors_px(self) -> np.ndarray:
        return self.alignment.errors_px

    def resolution_text(self, angstrom: str = "A") -> str:
        """'resolution [better than ]d A (FRC 0.143), h A (half-bit)': the one wording of the
        summary lines and the viewer's dose panel ('better than' when the sampling, not the
        data, limits it); `angstrom` is the unit's symbol (the viewer's is 'Å')."""
        bound = "better than " if self.resolution_limited else ""
        h = self.resolution_half_bit_A
        half_bit = "not determined" if h is None else f"{h:.3g} {angstrom}"
        lo, hi = self.resolution_range_A
        spread = "" if bound or math.isnan(lo) else \
            f"; {lo:.3g}-{'?' if math.isnan(hi) else f'{hi:.3g}'} {angstrom}"  # fmt: skip
        return (f"resolution {bound}{self.resolution_A:.3g} {angstrom} (FRC 0.143{spread}), "
                f"{half_bit} (half-bit)")  # fmt: skip

    def summary(self) -> str:
        ab = self.aberrations
        fit = (
            f"defocus {ab.defocus_A:.4g} A, C12 {ab.C12_A:.3g} A at "
            f"{np.degrees(ab.phi12_rad):.1f} deg, rotation {np.degrees(ab.rotation_rad):.2f} deg"
            f"{', transposed' if ab.transpose else ''}{ab.errors_text()}"
            if ab is not None
            else "aberrations need --energy/--step and an angular sampling"
        )
        levels = ",".join(str(b) for b in self.alignment.schedule) or "none"
        if self.alignment.method == "global":  # where no tile level is trusted (its why)
            levels = f"none: {self.alignment.note}"
        res = f"; {self.resolution_text()}" if self.resolution_A is not None else ""
        if self.dose_for_target_e_per_A2 is not None:
            res += (f"; {self.target_resolution_A:g} A needs ~{self.dose_for_target_e_per_A2:.3g}"
                    " e/A^2 (estimate)")  # fmt: skip
        d = self.depth
        depth = ("" if d is None else f"; depth sections {d.offsets_A[0]:+.4g}.."
                 f"{d.offsets_A[-1]:+.4g} A: sharpest at {d.sharpest_offset_A:+.4g} A (depth of "
                 f"field {d.depth_of_field_A:.3g} A)")  # fmt: skip
        third = "" if self.higher is None else f"; third order: {self.higher.text()}"
        if self.chi_model != "linear":
            third += f" (the image with the {self.chi_model} chi)"
        s = self.descan
        descan = "" if s is None else f"; descan {s.model}, drift {s.drift_px():.2g} px" + (
            " (compensated)" if s.compensated else " (--compensate-descan reads the BF pixels "
            "where the disk is)" * (s.drift_px() >= 1.0))  # fmt: skip
        if self.noiseless:
            res += ("; float frames without --counts-per-electron or --dose: read as "
                    "noiseless, every bin level trusted, the dose in counts")  # fmt: skip
        return (f"tcBF: bins {levels}; {fit}{third}{res}{depth}{descan}; update "
                f"{self.latency_s * 1e3:.0f} ms")  # fmt: skip
