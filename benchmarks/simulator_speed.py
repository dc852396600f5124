"""Simulator speed on one core: a 64x64 scan on a 128x128 detector (target <= 10 s).

Run: OMP_NUM_THREADS=1 python benchmarks/simulator_speed.py
Prints a table; also the memory needed to set up a 512x512 scan lazily.
"""

from __future__ import annotations

import os
import resource
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

from common import rss_mb  # noqa: E402
from tcbf_live.simulators import Simulator, tutorial_config  # noqa: E402


def time_full_scan(label: str, **kw) -> tuple[str, int, float, float, int]:
    sim = Simulator(tutorial_config(**kw))
    sim.frames(0, 2)  # JIT warm-up
    t0 = time.perf_counter()
    sim = Simulator(tutorial_config(**kw))  # setup (sample, probe, LUT) counts too
    n = 0
    for _, frames in sim.iter_batches(64):
        n += len(frames)
    dt = time.perf_counter() - t0
    return label, n, dt, n / dt, sim.grid.window_px


def main() -> None:
    rows = [
        time_full_scan(
            "64x64, 128^2 det, tutorial optics, rot 0", scan_shape=(64, 64), rotation_deg=0.0
        ),  # fmt: skip
        time_full_scan("64x64, 128^2 det, tutorial optics, rot -15", scan_shape=(64, 64)),
        time_full_scan("tutorial preset (24x48, rot -15)"),
    ]
    print(f"{'case':46s} {'frames':>7s} {'time s':>8s} {'frames/s':>9s} {'window':>7s}")
    for label, n, dt, fps, w in rows:
        print(f"{label:46s} {n:7d} {dt:8.2f} {fps:9.0f} {w:7d}")

    before = rss_mb()
    sim = Simulator(tutorial_config(scan_shape=(512, 512), rotation_deg=0.0))
    after_setup = rss_mb()
    for i, (_, _frames) in enumerate(sim.iter_batches(64)):
        if i == 20:
            break
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\n512x512 scan, lazily: RSS {before:.0f} MB -> {after_setup:.0f} MB after setup, "
        f"{rss_mb():.0f} MB after {21 * 64} frames (4D array would be "
        f"{512 * 512 * 128 * 128 * 2 / 2**30:.1f} GiB); peak {peak_mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
