"""The two `reconstruct` engines on one dataset: built-in (one process) and LiberTEM
(`--engine libertem`: its readers and executors, local worker processes or in-process).

Engines: built-in; LiberTEM in this process (`--workers 0`), on N local worker processes it
starts (`--workers N`), and on a Dask `LocalCluster` of N processes started beforehand
(`--scheduler`, as a cluster that is already running).

A tutorial-like scan (default 256x256 positions, 64x64 detector, 100 e/A^2) is simulated once
into a .npy in a temporary directory; each engine then runs `tcbf-live reconstruct` on it as a
separate process, `--repeat` times, and the table gives the wall time of the whole command
(start-up, Dask workers and imports included), the engine's own time ("reconstructed ... in")
and the frame rate of the latter, and whether its defocus, shifts and image equal the built-in
result. Ratios are within one run of this script (shared machines are noisy).

    python benchmarks/engines.py [--scan 256x256] [--detector 64] [--workers 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from tcbf_live.detectors.files import write_dataset
from tcbf_live.simulators import Simulator, tutorial_config


def simulate(path: Path, scan: tuple[int, int], detector: int) -> None:
    # the tutorial's optics with the disk scaled to the detector (radius ~26 px on 128 px)
    cfg = tutorial_config(scan_shape=scan, detector_shape=(detector, detector),
                          angular_sampling_mrad=0.154 * 128 / detector)  # fmt: skip
    sim = Simulator(cfg)
    batches = ((first, sim.frames(first, min(4096, sim.n_frames - first)))
               for first in range(0, sim.n_frames, 4096))  # fmt: skip
    write_dataset(str(path), cfg.scan_shape, cfg.detector_shape, cfg.dtype, sim.ground_truth(),
                  batches)  # fmt: skip


def run(data: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    argv = [sys.executable, "-m", "tcbf_live", "reconstruct", str(data), "--output", str(out),
            "--semiangle", "4", "--overwrite", *extra]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    own = float(re.search(r"reconstructed \d+ frames in ([\d.]+) s", done.stderr).group(1))
    return wall, own


def equal(a: Path, b: Path) -> str:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        same = all(np.array_equal(fa[k][()], fb[k][()])
                   for k in ("tcbf/image", "alignment/shifts_px"))  # fmt: skip
        same &= fa["aberrations"].attrs["C10_A"] == fb["aberrations"].attrs["C10_A"]
    return "yes" if same else "NO"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", default="256x256")
    ap.add_argument("--detector", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    scan = tuple(int(n) for n in a.scan.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "scan.npy"
        t0 = time.perf_counter()
        simulate(data, scan, a.detector)
        n = scan[0] * scan[1]
        print(f"simulated {n} frames of {a.detector}x{a.detector} in "
              f"{time.perf_counter() - t0:.0f} s; {data.stat().st_size / 2**20:.0f} MiB")
        engines = {
            "built-in": [],
            "libertem, in process (--workers 0)": ["--engine", "libertem", "--workers", "0"],
            f"libertem, {a.workers} worker processes": ["--engine", "libertem", "--workers",
                                                       str(a.workers)],  # fmt: skip
        }
        from distributed import LocalCluster  # (LiberTEM's dependency)

        cluster = LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)  # fmt: skip
        engines[f"libertem, Dask LocalCluster of {a.workers} (started before)"] = [
            "--engine", "libertem", "--scheduler", cluster.scheduler_address]  # fmt: skip
        ref = Path(tmp) / "built-in.h5"
        print("\n| engine | run | command wall (s) | engine (s) | frames/s | same result |")
        print("|---|---|---|---|---|---|")
        for k, (name, extra) in enumerate(engines.items()):
            out = ref if k == 0 else Path(tmp) / f"e{k}.h5"
            for r in range(a.repeat):
                wall, own = run(data, out, extra)
                same = "-" if k == 0 else equal(ref, out)
                print(f"| {name} | {r + 1} | {wall:.1f} | {own:.1f} | {n / own:,.0f} | {same} |")
        cluster.close()


if __name__ == "__main__":
    main()
