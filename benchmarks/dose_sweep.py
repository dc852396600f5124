"""Dose sweep: defocus and rotation against ground truth, with the reported uncertainty, for the
tile alignment alone and with the global search where the tiles give no model (issue 16).

Two samples: the 0.038 rad weak-phase case of docs/tcbf.md (300 kV, 20 mrad, 150 A defocus,
0.5 A steps, 24x48 scan) and the tutorial sample (4 mrad, 1.5 um defocus, rotation -15 deg,
24x48 scan of 10.7 A steps). Each dose is simulated with `--seeds` noise realisations; both
methods see the same frames. Prints one table row per case and, over every case with a model,
how many truths lie within 2 and beyond 4 reported sigmas (defocus and rotation).

Run: OMP_NUM_THREADS=1 python benchmarks/dose_sweep.py [--seeds 2] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators.simulate import Simulator, tutorial_config, weak_phase_config
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf import PipelineSettings
from tcbf_live.stream.tcbf.alignment import AlignmentSettings

WEAK = (1e5, 3e4, 1e4, 5e3, 2e3, 1e3, 5e2)
TUTORIAL = (1000.0, 100.0, 50.0, 30.0, 20.0, 10.0)


def solve(sim: Simulator, frames: np.ndarray, global_search: bool):
    align = AlignmentSettings(global_search=global_search)
    settings = ProcessingSettings(pipeline=PipelineSettings(alignment=align))
    proc = SeriesProcessor(sim.series_info(1), settings)
    for first in range(0, len(frames), 64):
        proc.add(FrameBatch(1, first, frames[first : first + 64]))
    t0 = time.perf_counter()
    res = proc.solve(final=True)
    return res, time.perf_counter() - t0


def row(label, dose, electrons, res, seconds, truth_defocus, truth_rot_deg, sigmas):
    if res is None or res.aberrations is None:
        return f"| {label} | {dose:g} | {electrons:.2g} | no model | | | | {seconds:.1f} |"
    ab, e = res.aberrations, res.aberrations.errors or {}
    d_err = ab.defocus_A - truth_defocus
    r_err = (math.degrees(ab.rotation_rad) - truth_rot_deg + 180) % 360 - 180
    sd, sr = e.get("C10_A", math.nan), math.degrees(e.get("rotation_rad", math.nan))
    sigmas.append((abs(d_err) / sd, abs(r_err) / sr))
    return (f"| {label} | {dose:g} | {electrons:.2g} | {res.alignment.method} | "
            f"{ab.defocus_A:.4g} ({100 * d_err / truth_defocus:+.1f} %) | {sd:.2g} A | "
            f"{r_err:+.2f} +- {sr:.2g} deg | {seconds:.1f} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="three doses per sample, one seed")
    args = p.parse_args()
    seeds = 1 if args.quick else args.seeds
    cases = [("weak phase", lambda d, s: weak_phase_config(dose_e_per_A2=d, seed=s),
              WEAK[2::2] if args.quick else WEAK, 0.0),
             ("tutorial", lambda d, s: tutorial_config(dose_e_per_A2=d, seed=s),
              TUTORIAL[1::2] if args.quick else TUTORIAL, -15.0)]  # fmt: skip
    print("| sample, method | dose (e/A^2) | electrons in the scan | model | defocus (error) | "
          "reported sigma | rotation error | solve s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    sigmas = {"tiles": [], "tiles + global": []}
    for name, make, doses, rot in cases:
        for dose in doses:
            for seed in range(seeds):
                sim = Simulator(make(dose, seed))
                cfg = sim.cfg
                electrons = dose * cfg.scan_shape[0] * cfg.scan_shape[1] * cfg.step_A**2
                truth = -cfg.aberrations.C10_A  # the true defocus
                frames = sim.frames(0, sim.n_frames)
                for label, on in (("tiles", False), ("tiles + global", True)):
                    res, seconds = solve(sim, frames, on)
                    print(row(f"{name}, {label}, seed {seed}", dose, electrons, res, seconds,
                              truth, rot, sigmas[label]), flush=True)  # fmt: skip
    for label, s in sigmas.items():
        a = np.array(s).ravel()
        a = a[np.isfinite(a)]
        if a.size:
            print(f"\n{label}: {a.size} estimates (defocus and rotation); within 2 sigma: "
                  f"{np.mean(a <= 2):.0%}; beyond 4 sigma: {int(np.sum(a > 4))}")  # fmt: skip


if __name__ == "__main__":
    main()
