"""`reconstruct --engine libertem`: the same series processing on LiberTEM's executors.

The dataset is read by LiberTEM's own readers (.npy, HDF5 datasets, Merlin .mib) where it lies,
so a dataset larger than this machine's memory is processed partition by partition on a Dask
cluster (`--scheduler tcp://HOST:PORT`: `dask-scheduler` plus `libertem-worker` or plain Dask
workers, the file on a path every worker sees) or on local worker processes (`--workers N`).
The calibration frames come through LiberTEM too (`PickUDF` on the first positions); the
accumulate and merge phases run as `TcbfUDF`; the solve phase runs here on the merged state in
the same `SeriesProcessor` as the built-in engine, so both write the same result.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

import numpy as np

from tcbf_live.detectors.base import scan_position
from tcbf_live.detectors.files import split_dataset_spec
from tcbf_live.stream.cli.common import UsageError
from tcbf_live.stream.cli.progress import Progress
from tcbf_live.stream.series import SeriesProcessor

INSTALL = 'pip install "tcbf-live[libertem]"'


def check_available() -> None:
    """UsageError (exit code 2, one line) when LiberTEM is not installed."""
    try:
        import libertem.api  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine libertem needs LiberTEM: {INSTALL}") from None


@contextmanager
def context(workers: int | None, scheduler: str | None):
    """A LiberTEM Context: on a running Dask scheduler, on `workers` local processes (None:
    one per core), or in this process (0)."""
    from libertem.api import Context

    if scheduler:
        from libertem.executor.dask import DaskJobExecutor

        if not re.fullmatch(r"[a-z]+://[^/\s]+:\d+", scheduler):
            raise UsageError(f"--scheduler {scheduler}: expected tcp://HOST:PORT")

        try:
            ctx = Context(executor=DaskJobExecutor.connect(scheduler))
        except OSError as exc:
            raise UsageError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
    elif workers == 0:
        ctx = Context.make_with("inline")
    else:
        ctx = Context.make_with("dask", cpus=workers or os.cpu_count() or 1)
    try:
        yield ctx
    finally:
        ctx.close()


def load(ctx, spec: str, scan_shape: tuple[int, int], detector_shape: tuple[int, int]):
    """The input as a LiberTEM dataset (its readers), checked against our reading of it."""
    path, inner = split_dataset_spec(spec)
    if path.suffix == ".npy":
        ds = ctx.load("npy", path=str(path), nav_shape=scan_shape)
    elif path.suffix == ".mib":
        ds = ctx.load("mib", path=str(path), nav_shape=scan_shape)
    elif inner is not None:
        ds = ctx.load("hdf5", path=str(path), ds_path=inner, nav_shape=scan_shape)
    else:
        raise UsageError(f"--engine libertem reads .npy, HDF5 datasets and .mib files; "
                         f"{spec}: use the built-in engine")  # fmt: skip
    if tuple(ds.shape.nav) != tuple(scan_shape) or tuple(ds.shape.sig) != tuple(detector_shape):
        raise UsageError(f"{spec}: LiberTEM reads {tuple(ds.shape)}, expected "
                         f"{(*scan_shape, *detector_shape)}")  # fmt: skip
    return ds


def accumulate(spec: str, proc: SeriesProcessor, workers: int | None, scheduler: str | None,
               nav: str = "acquisition") -> None:  # fmt: skip
    """Calibrate `proc` on the first frames (unless it has a fixed calibration) and merge
    every frame's accumulators into it, both through LiberTEM (progress on a terminal).
    `nav`: the file's frame order, "acquisition" or "scan" (`libertem_udf.state_of`)."""
    from tcbf_live.stream.libertem_udf import TcbfUDF, state_of

    scan, info = proc.scan_shape, proc.info
    with context(workers, scheduler) as ctx:
        ds = load(ctx, spec, scan, tuple(info.detector_shape))
        if not proc.calibrated and not calibrate(ctx, ds, proc, nav):
            return  # the caller reports `calibration_error`
        udf = TcbfUDF.for_series(proc, solve=False)
        progress = Progress(proc.n_positions)
        for part in ctx.run_udf_iter(dataset=ds, udf=udf):
            progress.update(int(np.count_nonzero(part.damage.data)))
        progress.finish(" aligning ...")
        names = [k for k in part.buffers[0] if k in proc.acc.state.arrays()]
        state = state_of({k: part.buffers[0][k] for k in names}, scan, info.scan_order, nav)
    proc.merge(state)


def calibrate(ctx, ds, proc: SeriesProcessor, nav: str) -> bool:
    """Calibrate `proc` on the first `--calibration-frames` acquired frames, picked from the
    dataset by LiberTEM (`PickUDF`; in nav order, with their scan positions)."""
    from libertem.udf.raw import PickUDF

    scan, n = proc.scan_shape, min(proc.settings.calibration_frames, proc.n_positions)
    rows, cols = scan_position(np.arange(n), scan, proc.info.scan_order)
    positions = rows * scan[1] + cols  # of acquisition indices 0 .. n-1
    if nav == "acquisition":  # nav index = acquisition index
        picked = np.arange(n)
    else:  # nav index = position: picked (and returned) in position order
        picked = positions = np.sort(positions)
    roi = np.zeros(proc.n_positions, bool)
    roi[picked] = True
    frames = ctx.run_udf(ds, PickUDF(), roi=roi.reshape(scan))["intensity"].data
    at = np.column_stack(np.divmod(positions, scan[1]))
    return proc.calibrate_on(np.asarray(frames), at)
