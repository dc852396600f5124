"""A worker's fold and delta cycle, per frame: a recycled block of rows against rows for the
whole scan given back to the OS after every delta (the layout workers had before 2026-11-27).

One worker's share of a 256x256 scan (every frame, or every other one as with 2 workers and
round robin), 96x96 uint16 bslz4 frames (the messages of `parse_speed.py`), folded by the
fused decompress-and-fold kernel in runs of 4,096 frames (a sync interval at ~40,000 frames/s),
a delta taken after each run. The two layouts alternate, so both see the same state of the
machine:
- "whole scan, released": a state with a row per scan position; after each delta its stack
  and tile pages go back to the OS (`pages.release`), so the next frames write fresh memory;
- "row block": a worker's state (`ProcessingSettings.row_block_rows`, `tcbf.row_block`), the
  rows written again and again; the delta takes the used rows in position order.
Wall microseconds per frame of the fold, of the delta (take + release) and of both; best of
--repeats. On a VM whose host reclaims free guest memory (docs/engine.md) the released layout
also pays the host's first touch whenever the pages it gets back are cold.

Run: OMP_NUM_THREADS=1 python benchmarks/worker_rows.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from parse_speed import messages, series_info  # noqa: E402
from stage_profile import decoded  # noqa: E402

from tcbf_live.detectors.base import FrameBatch  # noqa: E402
from tcbf_live.stream.pages import release  # noqa: E402
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor  # noqa: E402
from tcbf_live.stream.staging import accumulate_compressed  # noqa: E402
from tcbf_live.stream.tcbf.deltas import DeltaTaker  # noqa: E402

SCAN = (256, 256)
RUN = 4096  # frames between two deltas
POOL = 8192  # distinct messages encoded (their blobs repeat over the scan)


def setup():
    n = SCAN[0] * SCAN[1]
    frames = decoded("dectris-v2", messages("dectris-v2", POOL, SCAN))
    proc = SeriesProcessor(series_info(n, SCAN), ProcessingSettings())
    proc.add(FrameBatch(1, 0, np.stack([f.decoded().frames[0] for f in frames[:64]])))
    blobs = [np.frombuffer(f.blob, np.uint8) for f in frames]
    return proc, blobs


def cycle(proc: SeriesProcessor, blobs: list, share: int, block: bool) -> tuple[float, float]:
    """(fold, delta) wall seconds for one worker's share (every `share`-th frame) of the scan."""
    settings = ProcessingSettings(calibration=proc.raw_calibration,
                                  row_block_rows=0 if block else None)  # fmt: skip
    acc = SeriesProcessor(proc.info, settings).acc
    rows = acc.rows
    taker = DeltaTaker(acc.state, rows)
    scratch = np.empty(96 * 96, "<u2")
    k = acc.kernel_args()
    indices = np.arange(0, SCAN[0] * SCAN[1], share, dtype=np.int64)
    fold_s = delta_s = 0.0
    for start in range(0, len(indices), RUN):
        idx = indices[start : start + RUN]
        joined = np.concatenate([blobs[i % POOL] for i in idx])
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum([len(blobs[i % POOL]) for i in idx], out=offsets[1:])
        t = time.perf_counter()
        accumulate_compressed(joined, offsets, 2, scratch, idx, k)
        fold_s += time.perf_counter() - t
        t = time.perf_counter()
        taker.take()
        if not block:
            release(acc.state.stack)
            release(acc.state.tiles)
        delta_s += time.perf_counter() - t
    return fold_s / len(indices), delta_s / len(indices)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    proc, blobs = setup()
    cycle(proc, blobs, 16, True)  # compile
    best: dict[tuple, np.ndarray] = {}
    for _ in range(args.repeats):
        for share in (1, 2):
            for block in (False, True):
                got = np.array(cycle(proc, blobs, share, block)) * 1e6
                key = (share, block)
                best[key] = np.minimum(best.get(key, got), got)
    print(f"{SCAN[0]}x{SCAN[1]} scan, 96x96 uint16 bslz4, a delta every {RUN} frames; wall us "
          f"per frame, best of {args.repeats}")
    print(f"{'worker share':14s} {'layout':24s} {'fold':>6s} {'delta':>6s} {'both':>6s}")
    for (share, block), (fold, delta) in best.items():
        what = "row block" if block else "whole scan, released"
        print(f"{'1 of ' + str(share):14s} {what:24s} {fold:6.2f} {delta:6.2f} {fold + delta:6.2f}")


if __name__ == "__main__":
    main()
