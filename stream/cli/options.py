"""Flags shared by `run` and `reconstruct`: calibration, accumulation, alignment, image."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tcbf_live.stream.budget import BudgetError, check_series, memory_budget_bytes, parse_bytes
from tcbf_live.stream.cli.common import UsageError, parse_finite, parse_pair
from tcbf_live.stream.series import ProcessingSettings
from tcbf_live.stream.tcbf.alignment import DEFAULT_MIN_TILE_ELECTRONS, AlignmentSettings
from tcbf_live.stream.tcbf.calibration import Calibration, CalibrationError
from tcbf_live.stream.tcbf.depth import parse_offsets
from tcbf_live.stream.tcbf.optics import wavelength_A
from tcbf_live.stream.tcbf.pipeline import PipelineSettings
from tcbf_live.stream.tcbf.reconstruction import default_upsampling
from tcbf_live.stream.tcbf.tiles import validate_bins
from tcbf_live.stream.tcbf.transfer_fit import TRANSFER_FIT


def parse_bins(text: str) -> tuple[int, ...]:
    """An alignment schedule, coarse to fine, repeats allowed (32,32,16,16,8,8)."""
    try:
        schedule = tuple(int(v) for v in text.split(","))
        validate_bins(schedule)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad --bins {text!r}: {exc}") from None
    if list(schedule) != sorted(schedule, reverse=True):
        raise argparse.ArgumentTypeError(f"bins run coarse to fine, got {text!r}")
    return schedule


def parse_defocus_sign(text: str) -> int:
    signs = {"+1": 1, "1": 1, "positive": 1, "-1": -1, "negative": -1}
    if text not in signs:
        raise argparse.ArgumentTypeError("expected +1 (positive defocus, C10 < 0) or -1")
    return signs[text]


def add_processing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scan", type=parse_pair, metavar="RxC",
                   help="scan shape if the data do not give it")  # fmt: skip
    p.add_argument("--energy", type=parse_finite, metavar="EV")
    p.add_argument("--step", type=parse_finite, metavar="A", help="scan step (A)")
    p.add_argument("--semiangle", type=parse_finite, metavar="MRAD", help="convergence semi-angle")
    p.add_argument(
        "--angular-sampling", type=parse_finite, metavar="MRAD", help="mrad per detector px"
    )
    p.add_argument("--counts-per-electron", type=parse_finite, metavar="G")
    p.add_argument("--dose", type=parse_finite, metavar="E_PER_A2",
                   help="the dose per position (e/A^2) if known: float frames get their counts "
                   "per electron from it (else they are read as noiseless)")  # fmt: skip
    p.add_argument("--calibration-frames", type=int, default=64, metavar="N")
    p.add_argument("--bf-threshold", type=parse_finite, default=0.5, metavar="T",
                   help="BF disk = mean pattern >= T x plateau (default 0.5)")  # fmt: skip
    p.add_argument("--calibration", metavar="FILE", help="fixed calibration (JSON) to use")
    p.add_argument("--mask", metavar="FILE.npy",
                   help="bool (Qx, Qy) array of detector pixels to exclude; its shape is "
                   "checked against the detector before any frame is used")  # fmt: skip
    p.add_argument("--axial-radius", type=parse_finite, metavar="PX", help="axial vBF radius")
    p.add_argument("--compensate-descan", action="store_true",
                   help="read each position's BF pixels where the BF disk is there (the disk's "
                   "drift over the scan, measured live from each frame's centre of mass); "
                   "in one process (--workers 0)")  # fmt: skip
    a = p.add_argument_group("alignment and reconstruction")
    a.add_argument(
        "--bins",
        type=parse_bins,
        metavar="B,B,..",
        help="alignment schedule in detector px, one iteration per entry, e.g. "
        "32,32,16,16,8,8 (default: from the dose, see --min-tile-electrons)",
    )
    a.add_argument(
        "--min-tile-electrons",
        type=parse_finite,
        default=DEFAULT_MIN_TILE_ELECTRONS,
        metavar="N",
        help="electrons a tile image needs to be trusted (default "
        "2.5e5); the default schedule stops at the finest trusted level",
    )
    a.add_argument(
        "--upsample",
        type=int,
        metavar="F",
        help="tcBF grid factor (default round(2 alpha step / lambda), at most 8)",
    )
    a.add_argument("--no-phase-flip", action="store_true", help="skip the CTF phase flip")
    a.add_argument("--target-resolution", type=parse_finite, metavar="A",
                   help="report the dose projected to reach this resolution (an estimate from "
                   "the resolution-versus-dose history)")  # fmt: skip
    a.add_argument("--depth-sections", type=parse_depth_offsets, metavar="START:STOP:STEP",
                   help="also refocus the final image by these changes of defocus (A; or a "
                   "list A,B,..), each with a sharpness figure: /tcbf/depth_sections")  # fmt: skip
    a.add_argument("--depth-live", action="store_true",
                   help="compute the depth sections at every live update too (slower updates)")
    a.add_argument("--transfer-fit", choices=TRANSFER_FIT, default="determined",
                   help="refit C21, C23 and C30 on the BF pixels' transfer at the end "
                   "(seconds): where the tiles find one at 5 sigma (default), always (also from "
                   "the linear model), or off (the tiles' shift fit stands)")  # fmt: skip
    a.add_argument("--defocus-hint", type=parse_finite, metavar="A",
                   help="the microscope's nominal |defocus| (A): a prior for the global search "
                   "where no tile level is trusted (searched within 0.5-2x of it)")  # fmt: skip
    a.add_argument("--no-global-search", action="store_true",
                   help="no global search where the tile alignment finds no model (it costs "
                   "seconds per attempt)")  # fmt: skip
    a.add_argument("--defocus-sign", type=parse_defocus_sign, metavar="+1|-1",
                   help="known sign of the defocus (+1: C10 < 0); resolves the 180 deg "
                   "ambiguity (default: rotation folded into (-90, 90] deg)")  # fmt: skip


def parse_depth_offsets(text: str) -> tuple[float, ...]:
    try:
        return parse_offsets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--output, --overwrite and --memory-budget (run, reconstruct)."""
    p.add_argument("--output", required=True, metavar="FILE.h5")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing result files (default: refuse, exit code 2)")  # fmt: skip
    p.add_argument("--memory-budget", type=parse_memory_budget, metavar="BYTES",
                   help="memory one series may use, e.g. 8G or 512MiB (default: half this "
                   "machine's memory, or $TCBF_MEMORY_BUDGET); a larger scan, detector or "
                   "--upsample is refused before anything is allocated")  # fmt: skip


def parse_memory_budget(text: str) -> int:
    try:
        return parse_bytes(text)
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def budget_from_args(args: argparse.Namespace) -> int:
    """--memory-budget, else $TCBF_MEMORY_BUDGET, else half the machine's memory (bytes)."""
    try:
        return memory_budget_bytes(args.memory_budget)
    except BudgetError as exc:
        raise UsageError(str(exc)) from None


def check_memory(
    args: argparse.Namespace,
    scan_shape: tuple[int, int] | None = None,
    detector_shape: tuple[int, int] | None = None,
    dtype: str | None = None,
    frames_expected: int | None = None,
    optics: tuple[float | None, float | None, float | None] | None = None,
) -> int:
    """The memory budget (bytes); UsageError (one line) when the series the flags describe
    (--scan or `scan_shape`, --upsample, --calibration-frames, the detector when known) cannot
    fit it. Without the detector only the scan's share is checked (a lower bound); the engine
    checks the whole series at its start. The upsampling factor is --upsample, else the
    default from the optics (`optics`: energy eV, step A, semi-angle mrad; else the flags'),
    else 1: only what certainly cannot fit is refused here."""
    budget = budget_from_args(args)
    scan = scan_shape or args.scan
    if scan is None:
        return budget
    energy, step, semiangle = optics or (args.energy, args.step, args.semiangle)
    upsample = args.upsample
    if upsample is None and energy and step and semiangle:
        upsample = default_upsampling(step, wavelength_A(energy), semiangle)
    kind = np.dtype(dtype).kind if dtype is not None else "u"
    reason = check_series(
        scan, detector_shape, np.dtype(dtype or "<u2").itemsize, budget,
        upsample=upsample or 1, frames_expected=frames_expected,
        calibration_frames=args.calibration_frames, integer_stack=kind == "u",
    )  # fmt: skip
    if reason is not None:
        raise UsageError(f"refused before acquisition: {reason}")
    return budget


def load_mask(path: str) -> np.ndarray:
    """The --mask file as a 2D bool array; UsageError (one line) if it cannot be one."""
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read --mask {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.size == 0:
        raise UsageError(f"--mask {path}: expected a 2D (Qx, Qy) array, got shape "
                         f"{getattr(mask, 'shape', None)}")  # fmt: skip
    if mask.dtype.kind not in "biuf" or (mask.dtype.kind == "f" and not np.isfinite(mask).all()):
        raise UsageError(f"--mask {path}: expected bool or 0/1 numbers, got {mask.dtype}")
    return mask.astype(bool)


def check_mask_shape(
    mask: np.ndarray | None, detector_shape: tuple[int, int], where: str = "the detector"
) -> None:
    """UsageError naming both shapes when --mask does not fit the detector."""
    if mask is not None and tuple(mask.shape) != tuple(detector_shape):
        raise UsageError(f"--mask is {mask.shape[0]}x{mask.shape[1]} but {where} is "
                         f"{detector_shape[0]}x{detector_shape[1]} px")  # fmt: skip


def processing_from_args(args: argparse.Namespace) -> ProcessingSettings:
    """ProcessingSettings from the shared flags; UsageError for impossible values."""
    if args.calibration_frames < 1 or not 0 < args.bf_threshold < 1:
        raise UsageError("need --calibration-frames >= 1 and 0 < --bf-threshold < 1")
    for name in ("energy", "step", "semiangle", "angular_sampling", "counts_per_electron",
                 "dose", "min_tile_electrons", "axial_radius", "defocus_hint"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.dose is not None and args.counts_per_electron is not None:
        raise UsageError("give --dose (float intensities) or --counts-per-electron, not both")
    if args.step is not None and not 1e-3 <= args.step <= 1e6:
        raise UsageError("--step must be between 0.001 and 1e6 A")
    if args.energy is not None and not 1e3 <= args.energy <= 1e7:
        raise UsageError("--energy must be between 1 keV and 10 MeV (in eV)")
    if args.semiangle is not None and not args.semiangle <= 1000:
        raise UsageError("--semiangle must be at most 1000 mrad")

    if args.target_resolution is not None and not args.target_resolution > 0:
        raise UsageError("--target-resolution must be positive")
    if args.upsample is not None and not 1 <= args.upsample <= 16:
        raise UsageError("--upsample must be between 1 and 16")
    calibration = None
    try:
        if args.calibration:
            calibration = Calibration.from_json(Path(args.calibration).read_text())
    except (OSError, ValueError, KeyError, CalibrationError) as exc:
        raise UsageError(f"cannot read {args.calibration}: {exc}") from None
    mask = load_mask(args.mask) if args.mask else None
    if calibration is not None:
        check_mask_shape(mask, calibration.detector_shape, f"--calibration {args.calibration}")
    alignment = AlignmentSettings(
        bins=args.bins,
        min_tile_electrons=args.min_tile_electrons,
        defocus_sign=args.defocus_sign,
        global_search=not args.no_global_search,
        defocus_hint_A=args.defocus_hint,
    )
    return ProcessingSettings(
        metadata={
            "scan_shape": args.scan,
            "energy_eV": args.energy,
            "step_A": args.step,
            "semiangle_mrad": args.semiangle,
            "angular_sampling_mrad": args.angular_sampling,
            "counts_per_electron": args.counts_per_electron,
            "dose_e_per_A2": args.dose,
        },
        calibration_frames=args.calibration_frames,
        bf_threshold=args.bf_threshold,
        calibration=calibration,
        mask=mask,
        bins=validate_bins(args.bins) if args.bins else None,
        axial_radius_px=args.axial_radius,
        repeat_scans=getattr(args, "repeat", "accumulate"),
        compensate_descan=args.compensate_descan,
        memory_budget_bytes=budget_from_args(args),
        pipeline=PipelineSettings(
            alignment=alignment,
            upsample=args.upsample,
            phase_flip=not args.no_phase_flip,
            target_resolution_A=args.target_resolution,
            depth_offsets_A=args.depth_sections or (),
            depth_live=args.depth_live,
            transfer_fit=args.transfer_fit,
        ),
    )


def report(result, output: str) -> str:
    """End-of-job lines: counters and dose, alignment and aberrations, the file written."""
    why = f"; {result.alignment_note}" if result.alignment_note else ""
    tcbf = (
        result.tcbf.summary()
        if result.tcbf is not None
        else f"tcBF: no shift model (too few rows or electrons for any trusted bin level{why})"
    )
    return (f"{result.summary()}\n{tcbf}\n{result.dose_summary()}\n"
            f"{result.screening_summary()}\nwrote {output}\n")  # fmt: skip
