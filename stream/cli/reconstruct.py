"""`tcbf-live reconstruct`: the live engine's processing, offline, on a recorded 4D dataset.

Frames are read in acquisition order and handed to the same `SeriesProcessor` the live
engine uses (calibration, accumulators, alignment, reconstruction), so an offline result is
what a live run of the same frames ends with.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.detectors.files import RecordedDataset
from tcbf_live.detectors.vendor_files import open_recording
from tcbf_live.stream.budget import BudgetExceeded
from tcbf_live.stream.cli.common import UsageError
from tcbf_live.stream.cli.exitcodes import EPILOG, ExitCode, incomplete_reasons, series_code
from tcbf_live.stream.cli.options import (
    add_output_args,
    add_processing_args,
    check_mask_shape,
    check_memory,
    processing_from_args,
    report,
)
from tcbf_live.stream.cli.progress import Progress
from tcbf_live.stream.outputs import check_output, input_path
from tcbf_live.stream.result import SeriesResult
from tcbf_live.stream.series import SeriesProcessor

log = logging.getLogger(__name__)

READ_BATCH = 64  # frames per read / per accumulate call


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reconstruct",
        help="align and reconstruct a recorded 4D-STEM dataset (offline, same engine)",
        description="Process INPUT (a 4D .npy (rows, cols, Qx, Qy) or 3D frame stack with "
        "--scan, an HDF5 FILE.h5:/path dataset, a `simulate --save` or `run --record` file, a "
        "DECTRIS master file, a Merlin .mib, or a file RosettaSciIO reads: .hspy, .zspy, "
        ".blo, EMPAD .xml, .emd) with the live "
        "engine's code path and write the HDF5 result (never over the input; over an existing "
        "file only with --overwrite).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="FILE.npy, FILE.h5[:/dataset], FILE.mib")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=("builtin", "libertem"), default="builtin",
                   help="builtin (this process) or libertem: LiberTEM's readers and executors "
                   "(local worker processes or a Dask cluster; the [libertem] extra)")  # fmt: skip
    e.add_argument("--workers", type=int, metavar="N",
                   help="--engine libertem: N local worker processes (default: one per core; "
                   "0: in this process)")  # fmt: skip
    e.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="--engine libertem: run on this Dask scheduler's workers (the input on "
                   "a path they all see)")  # fmt: skip
    add_processing_args(p)
    add_output_args(p)
    p.set_defaults(run=run)


def reconstruct_dataset(data: RecordedDataset, processor: SeriesProcessor) -> SeriesResult:
    """Feed every frame through `processor`, then the final alignment; return the result.
    Progress (frames/s, time left) on a terminal (`progress.Progress`)."""
    sid = processor.info.series_id
    progress = Progress(data.n_frames)
    for first, frames in data.iter_batches(READ_BATCH):
        processor.add(FrameBatch(sid, first, frames))
        progress.update(first + len(frames))
    progress.finish(" aligning ...")
    processor.solve(final=True)
    return processor.result(final=True, complete=True)


def reconstruct_libertem(args: argparse.Namespace, data, processor: SeriesProcessor
                         ) -> SeriesResult:  # fmt: skip
    """Accumulate and merge on LiberTEM's executors, solve here (`cli/libertem_engine.py`)."""
    from tcbf_live.stream.cli.libertem_engine import accumulate

    nav = "scan" if getattr(data, "stored_by_position", False) else "acquisition"
    accumulate(args.input, processor, args.workers, args.scheduler, nav)
    processor.solve(final=True)
    return processor.result(final=True, complete=True)


def check_engine(args: argparse.Namespace) -> None:
    """The engine flags fit together (UsageError, exit code 2, otherwise)."""
    if args.engine == "builtin":
        if args.workers is not None or args.scheduler:
            raise UsageError("--workers and --scheduler need --engine libertem")
        return
    if args.compensate_descan:
        raise UsageError("--compensate-descan needs the built-in engine (it refits the drift "
                         "as frames arrive in order)")  # fmt: skip
    if args.workers is not None and (args.workers < 0 or args.scheduler):
        raise UsageError("--workers N (N >= 0) or --scheduler, not both")
    from tcbf_live.stream.cli.libertem_engine import check_available

    check_available()


def run(args: argparse.Namespace) -> int:
    from tcbf_live.stream.hdf5 import write_result

    check_engine(args)
    settings = processing_from_args(args)
    source = input_path(args.input)
    sidecar = [source.with_suffix(".json")] if source.suffix == ".npy" else []
    inputs = [source, *sidecar, *(p for p in (args.mask, args.calibration) if p)]
    check_output(args.output, args.overwrite, inputs)
    t0 = time.perf_counter()
    # the scan shape is needed to open a 3D stack; the other flags override the file's
    # metadata through the processing settings, as for a live stream
    with open_recording(args.input, {"scan_shape": args.scan}) as data:
        info = settings.resolve(data.series_info(series_id=1))

        missing = [flag for flag, value in (("--energy", info.energy_eV),
                                            ("--step", info.step_A)) if not value]  # fmt: skip
        if missing:
            raise UsageError(f"{args.input} does not give {' and '.join(missing)}: pass them")
        check_mask_shape(settings.mask, data.detector_shape, f"the detector of {args.input}")
        check_memory(args, info.scan_shape, data.detector_shape, info.dtype, data.n_frames,
                     (info.energy_eV, info.step_A, info.semiangle_mrad))  # fmt: skip
        if not (info.semiangle_mrad or info.angular_sampling_mrad):
            log.warning("no --semiangle or --angular-sampling: shifts only, no aberrations")
        try:
            processor = SeriesProcessor(info, settings)
            if args.engine == "libertem":
                result = reconstruct_libertem(args, data, processor)
            else:
                result = reconstruct_dataset(data, processor)
        except BudgetExceeded as exc:  # found at calibration: the BF disk is too large
            sys.stderr.write(f"tcbf-live reconstruct: {args.input}: {exc}; no file written\n")
            return int(ExitCode.UNUSABLE)
    if processor.calibration_error:
        sys.stderr.write(f"tcbf-live reconstruct: {args.input}: no usable bright-field disk "
                         f"({processor.calibration_error}); no file written\n")  # fmt: skip
        return int(ExitCode.UNUSABLE)

    write_result(args.output, result, "file", args.overwrite)
    sys.stderr.write(report(result, args.output))
    sys.stderr.write(f"reconstructed {result.frames_received} frames in "
                     f"{time.perf_counter() - t0:.2f} s\n")  # fmt: skip
    code = series_code(result)
    if code is ExitCode.INCOMPLETE:
        sys.stderr.write(f"tcbf-live reconstruct: the result is incomplete: "
                         f"{incomplete_reasons(result)}\n")  # fmt: skip
    return int(code)
