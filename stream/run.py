"""`tcbf-live run`: receive one series, accumulate it, write the HDF5 result."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from .accumulators import validate_bins
from .calibration import Calibration, CalibrationError
from .cliutil import UsageError, parse_pair
from .engine import DECODERS, Engine, EngineSettings
from .series import ProcessingSettings
from .subscriber import SubscriberSettings

log = logging.getLogger("tcbf.run")


def _bins(text: str) -> tuple[int, ...]:
    try:
        return validate_bins(tuple(int(v) for v in text.split(",")))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="receive a live series, accumulate it and write the result file",
        description="Receive one series over ZeroMQ until its end message, its expected frame "
        "count or --timeout seconds without data; write the HDF5 result.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--connect", metavar="ENDPOINT", default="tcp://127.0.0.1:5555")
    where.add_argument("--bind", metavar="ENDPOINT", help="bind instead of connecting")
    p.add_argument("--socket", default="sub", choices=["sub", "pull"])
    p.add_argument("--protocol", default="native", choices=sorted(DECODERS))
    p.add_argument(
        "--scan", type=parse_pair, metavar="RxC", help="scan shape if the stream lacks it"
    )
    p.add_argument("--energy", type=float, metavar="EV")
    p.add_argument("--step", type=float, metavar="A")
    p.add_argument("--semiangle", type=float, metavar="MRAD")
    p.add_argument("--angular-sampling", type=float, metavar="MRAD")
    p.add_argument("--counts-per-electron", type=float, metavar="G")
    p.add_argument("--calibration-frames", type=int, default=64, metavar="N")
    p.add_argument("--bf-threshold", type=float, default=0.5, metavar="T",
                   help="BF disk = mean pattern >= T x plateau (default 0.5)")  # fmt: skip
    p.add_argument("--calibration", metavar="FILE", help="fixed calibration (JSON) to use")
    p.add_argument("--mask", metavar="FILE.npy", help="bool array of pixels to exclude")
    p.add_argument("--bins", type=_bins, metavar="B,B,..", help="alignment bin levels (px)")
    p.add_argument("--axial-radius", type=float, metavar="PX", help="axial vBF radius")
    p.add_argument("--repeat", default="accumulate", choices=["accumulate", "new-series"],
                   help="frames beyond one scan pass")  # fmt: skip
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="idle timeout")
    p.add_argument("--output", required=True, metavar="FILE.h5")
    p.add_argument("--headless", action="store_true", help="no viewer window")
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> EngineSettings:
    if not args.headless:
        raise UsageError("the live viewer is not available yet: pass --headless")
    if args.calibration_frames < 1 or not 0 < args.bf_threshold < 1 or not args.timeout > 0:
        raise UsageError("need --calibration-frames >= 1, 0 < --bf-threshold < 1, --timeout > 0")
    for name in ("energy", "step", "semiangle", "angular_sampling", "counts_per_electron"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
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
    endpoint = args.bind or args.connect
    return EngineSettings(
        subscriber=SubscriberSettings(
            endpoint=endpoint, socket_type=args.socket, bind=args.bind is not None
        ),
        processing=ProcessingSettings(
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
            bins=args.bins,
            axial_radius_px=args.axial_radius,
            repeat_scans=args.repeat,
        ),
        protocol=args.protocol,
        idle_timeout_s=args.timeout,
        max_series=1,
    )


def run(args: argparse.Namespace) -> int:
    from .results import write_result

    settings = settings_from_args(args)
    engine = Engine(settings).start()
    try:
        while not engine.join(timeout=0.5):
            pass
    except KeyboardInterrupt:
        engine.stop()
        engine.join()
    result = engine.last_result
    if engine.counters.rejected:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(engine.counters.rejected.items()))
        sys.stderr.write(f"rejected messages: {reasons}\n")
    if result is None:
        sys.stderr.write(f"tcbf-live run: no series received within {args.timeout:g} s\n")
        return 1
    write_result(args.output, result, args.protocol)
    sys.stderr.write(f"{result.summary()}\nwrote {args.output}\n")
    return 0
