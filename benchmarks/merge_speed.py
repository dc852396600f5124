"""The merge phase: what it costs to combine receivers' partial states, per alignment update.

Two or four partial `AccumulatorState`s of a 256x256 scan on a 128x128 detector (BF radius
~26 px: 2088 BF pixels, 222 tiles per position), each holding an interleaved share of the
frames (round robin, as PUSH/PULL deals them), merged into a fresh state: with the per-BF-pixel
stack left out (what every alignment update needs) and with it (the series' end). Also the copy
a solve takes of the merged state (`SeriesProcessor.inputs`), for comparison.

Run: OMP_NUM_THREADS=1 python benchmarks/merge_speed.py
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf.accumulators import AccumulatorState


def best_of(fn, repeats: int = 5) -> float:
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def filled_states(proc: SeriesProcessor, n_parts: int, rng) -> list[AccumulatorState]:
    """Partial states with random counts at every position of their share (the cost of a
    merge depends on the sizes and the shares, not on the values)."""
    parts = []
    for k in range(n_parts):
        s = proc.partition()
        rows = np.arange(k, s.hits.size, n_parts)
        s.hits[rows] = 1
        s.totals[rows] = rng.uniform(1e4, 2e4, rows.size)
        s.bf_sum[rows] = s.totals[rows] * 0.8
        s.axial_sum[rows] = s.totals[rows] * 0.1
        s.tiles[rows] = rng.uniform(0, 100, (rows.size, s.tiles.shape[1]))
        s.stack[rows] = rng.integers(0, 20, (rows.size, s.stack.shape[1]))
        s.seen[rows] = 1
        s.stats[0] = rows.size
        parts.append(s)
    return parts


def main() -> None:
    sim = Simulator(tutorial_config(scan_shape=(8, 8)))
    info = replace(sim.series_info(1), scan_shape=(256, 256), frames_expected=256 * 256)
    proc = SeriesProcessor(info, ProcessingSettings())
    proc.add(FrameBatch(1, 0, sim.frames(0, 64)))  # calibrates on the first 64 frames
    rng = np.random.default_rng(0)
    state = proc.acc.state
    print(f"256x256 scan, 128x128 detector: {state.stack.shape[1]} BF px, "
          f"{state.tiles.shape[1]} tiles per position; state {state.nbytes() / 2**20:.0f} MiB "
          f"(stack {state.stack.nbytes / 2**20:.0f} MiB)")  # fmt: skip
    print(f"{'what':52s} {'seconds':>8s}")
    for n_parts in (2, 4):
        parts = filled_states(proc, n_parts, rng)
        for stack in (False, True):

            def merge(parts=parts, stack=stack):
                into = proc.partition()
                for p in parts:
                    into.merge(p, stack=stack)

            what = f"merge {n_parts} partial states, {'with' if stack else 'without'} the stack"
            print(f"{what:52s} {best_of(merge):8.3f}")
    state.hits[:] = 1  # the whole scan acquired: the alignment window is full
    print(f"{'the solve inputs copied from the merged state':52s} {best_of(proc.inputs):8.3f}")


if __name__ == "__main__":
    main()
