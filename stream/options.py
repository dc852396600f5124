"""Flags shared by `run` and `reconstruct`: calibration, accumulation, alignment, image."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .accumulators import validate_bins
from .alignment import DEFAULT_MIN_TILE_ELECTRONS, AlignmentSettings
from .calibration import Calibration, CalibrationError
from .cliutil import UsageError, parse_finite, parse_pair
from .series import ProcessingSettings
from .tcbf import TcbfSettings


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
    p.add_argument("--calibration-frames", type=int, default=64, metavar="N")
    p.add_argument("--bf-threshold", type=parse_finite, default=0.5, metavar="T",
                   help="BF disk = mean pattern >= T x plateau (default 0.5)")  # fmt: skip
    p.add_argument("--calibration", metavar="FILE", help="fixed calibration (JSON) to use")
    p.add_argument("--mask", metavar="FILE.npy", help="bool array of pixels to exclude")
    p.add_argument("--axial-radius", type=parse_finite, metavar="PX", help="axial vBF radius")
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
    a.add_argument("--defocus-sign", type=parse_defocus_sign, metavar="+1|-1",
                   help="known sign of the defocus (+1: C10 < 0); resolves the 180 deg "
                   "ambiguity (default: rotation folded into (-90, 90] deg)")  # fmt: skip


def processing_from_args(args: argparse.Namespace) -> ProcessingSettings:
    """ProcessingSettings from the shared flags; UsageError for impossible values."""
    if args.calibration_frames < 1 or not 0 < args.bf_threshold < 1:
        raise UsageError("need --calibration-frames >= 1 and 0 < --bf-threshold < 1")
    for name in ("energy", "step", "semiangle", "angular_sampling", "counts_per_electron",
                 "min_tile_electrons", "axial_radius"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
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
    calibration = mask = None
    try:
        if args.calibration:
            calibration = Calibration.load(args.calibration)
        if args.mask:
            mask = np.load(args.mask, allow_pickle=False).astype(bool)
    except (OSError, ValueError, KeyError, CalibrationError) as exc:
        raise UsageError(f"cannot read {args.calibration or args.mask}: {exc}") from None
    if not Path(args.output).parent.exists():
        raise UsageError(f"output folder {Path(args.output).parent} does not exist")
    alignment = AlignmentSettings(
        bins=args.bins,
        min_tile_electrons=args.min_tile_electrons,
        defocus_sign=args.defocus_sign,
    )
    return ProcessingSettings(
        scan_shape=args.scan,
        energy_eV=args.energy,
        step_A=args.step,
        semiangle_mrad=args.semiangle,
        angular_sampling_mrad=args.angular_sampling,
        counts_per_electron=args.counts_per_electron,
        calibration_frames=args.calibration_frames,
        bf_threshold=args.bf_threshold,
        calibration=calibration,
        mask=mask,
        bins=validate_bins(args.bins) if args.bins else None,
        axial_radius_px=args.axial_radius,
        repeat_scans=getattr(args, "repeat", "accumulate"),
        tcbf=TcbfSettings(
            alignment=alignment,
            upsample=args.upsample,
            phase_flip=not args.no_phase_flip,
            target_resolution_A=args.target_resolution,
        ),
    )


def report(result, output: str) -> str:
    """End-of-job lines: counters and dose, alignment and aberrations, the file written."""
    tcbf = (
        result.tcbf.summary()
        if result.tcbf is not None
        else ("tcBF: no shift model (too few rows or electrons for any trusted bin level)")
    )
    return f"{result.summary()}\n{tcbf}\n{result.dose_summary()}\nwrote {output}\n"
