"""Accumulate kernel alone, one core: frames/s with all bin levels maintained.

Targets: >= 100,000 frames/s for 96x96 uint16 and >= 50,000 for 128x128 (BF radius ~26 px).
The last column: with descan compensation (`--compensate-descan`: each frame's first moments
folded in, every position read one pixel off). Also states the accumulator memory for a
256x256 scan on a 128x128 detector.

Run: OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/accumulate_speed.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from tcbf_live.detectors.base import FrameBatch  # noqa: E402
from tcbf_live.simulators import Simulator, tutorial_config  # noqa: E402
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor  # noqa: E402


def processor_for(detector: int, scan: tuple[int, int], sample_frames: np.ndarray, info,
                  compensate: bool = False):  # fmt: skip
    from dataclasses import replace

    info = replace(info, scan_shape=scan, frames_expected=scan[0] * scan[1])
    proc = SeriesProcessor(info, ProcessingSettings(calibration_frames=len(sample_frames),
                                                    compensate_descan=compensate))  # fmt: skip
    proc.add(FrameBatch(1, 0, sample_frames))  # calibrates
    return proc


def bench(detector: int, n_frames: int = 60_000, batch: int = 32, repeats: int = 3,
          compensate: bool = False):  # fmt: skip
    # BF radius ~26 px on every detector size: 4 mrad at 0.154 mrad/px
    sim = Simulator(
        tutorial_config(scan_shape=(8, 8), detector_shape=(detector, detector), rotation_deg=0)
    )
    frames = sim.frames(0, 64)
    pool = frames[np.random.default_rng(0).integers(0, 64, 4096)]
    scan = (n_frames // 250, 250)
    best = 0.0
    for _ in range(repeats):
        proc = processor_for(detector, scan, frames, sim.series_info(1), compensate)
        acc = proc.acc
        if compensate:  # the shifted read path at every position
            acc.set_read_shift(np.ones((acc.n_positions, 2)), np.ones(acc.n_positions, bool))
        t0 = time.perf_counter()
        for first in range(64, n_frames, batch):
            k = first % (len(pool) - batch)
            acc.add(first, pool[k : k + batch])
        dt = time.perf_counter() - t0
        best = max(best, (acc.frames_accepted - 64) / dt)
    lay = acc.tiles_layout
    return detector, proc.calibration.n_bf, lay.bins, lay.n_tiles, best


def main() -> None:
    print(f"{'detector':>9s} {'BF px':>6s} {'bins':>18s} {'tiles':>24s} {'frames/s':>10s} "
          f"{'compensated':>12s}")  # fmt: skip
    for det in (96, 128):
        d, nbf, bins, tiles, fps = bench(det)
        comp = bench(det, compensate=True)[-1]
        print(f"{d:>6d}^2 {nbf:6d} {','.join(map(str, bins)):>18s} "
              f"{','.join(map(str, tiles)):>24s} {fps:10.0f} {comp:12.0f}")  # fmt: skip

    # memory for a 256x256 scan on a 128x128 detector
    sim = Simulator(tutorial_config(scan_shape=(4, 4), rotation_deg=0))
    proc = processor_for(128, (256, 256), sim.frames(0, 16), sim.series_info(1))
    acc = proc.acc
    parts = {
        "per-BF-pixel stack (uint16)": acc.state.stack.nbytes,
        "tile sums, all levels (float32)": acc.state.tiles.nbytes,
        "maps (total, BF, axial, hits)": acc.state.totals.nbytes * 3 + acc.state.hits.nbytes,
        "frame bitmap": acc.state.seen.nbytes,
    }
    print(f"\naccumulators, 256x256 scan, 128^2 detector, {proc.calibration.n_bf} BF px:")
    for k, v in parts.items():
        print(f"  {k:34s} {v / 2**20:8.1f} MiB")
    print(f"  {'total':34s} {acc.nbytes() / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
