"""Peer comparison: our tcBF reconstruction against py4DSTEM 0.14.18's `Parallax` on the same
simulated frames.

What it measures, per case (each simulated once; both tools get the identical frames):
- the fitted defocus (A; C10 = -defocus) and scan rotation (deg) of each tool against the
  simulator's ground truth, plus C12 and, for the third-order case, C21/C23/C30;
- the Pearson correlation of each tool's phase-flipped (CTF-sign-corrected) tcBF image with the
  true phase low-passed to the information limit 2 alpha / lambda on our upsampled grid
  (rows f x cols f), after cropping a border of 6 f pixels (as `tests/test_tcbf.py`), at the
  best integer translation within +-2 scan pixels (+-2 f upsampled pixels), the same search for
  both tools;
- the wall time of each tool's reconstruction (ours: SeriesProcessor add + final solve; py4DSTEM:
  DataCube -> preprocess -> reconstruct -> subpixel_alignment -> aberration_fit ->
  aberration_correct), excluding simulation, file I/O and imports, one thread each.

py4DSTEM is not installed next to tcbf_live, so the script runs in two stages. The main stage
(the Python that has tcbf_live) simulates, writes each case as data.npy (scan_rows, scan_cols,
det_rows, det_cols) plus params.json into a temporary work directory, runs our pipeline, and
starts `--peer-python` on this same file with `--stage py4dstem --workdir CASE_DIR --variant V`
once per py4DSTEM option set; that stage imports only numpy, json, argparse (and the standard
library) and py4DSTEM, and writes p4_V_image.npy and p4_V_result.json back. The main stage then
scores everything and prints one Markdown table (one row per case and py4DSTEM option set).

py4DSTEM, every run: DataCube calibrations R = step (A), Q = angular sampling (mrad);
Parallax(energy, verbose=False, object_padding_px=(32, 32), its default); preprocess
(threshold_intensity 0.8 default, plot_average_bf=False); reconstruct(reset=True, no plots);
subpixel_alignment(kde_upsample_factor=4); aberration_fit(force_transpose=False; default
max_radial_order=3, except the third-order case: aberrations_mn = C10, C12, C21, C23, C30, the
set our joint fit uses); aberration_correct() (sign flip with its polar-decomposition C1). Option
sets:
  A  everything default: edge_blend 16 and its own bin schedule (powers of two from the BF
     diameter down to 1, then 1 again);
  B  edge_blend 16, alignment_bin_values = our dose-chosen schedule (without our cold-start pair
     iteration);
  C  as B with edge_blend = ours (1/6 of the field, within [2, 16]: 4 px on a 24-row scan);
  D  third-order case only: as C with regularize_shifts=True, regularizer_matrix_size (3, 3)
     (without it py4DSTEM projects the shifts on a linear function of k at every iteration, so
     its C21/C23/C30 come out ~0).
Ours: SeriesProcessor with default ProcessingSettings (dose-chosen schedule, no defocus-sign
hint: the rotation is folded into (-90, 90] deg, as py4DSTEM does).

Run (about 4 minutes on a 2-core VM):

    python benchmarks/peer_py4dstem.py --peer-python /tmp/p4env/bin/python

Options: --cases to pick a subset (e.g. `--cases tutorial weak-1e5`), --keep to keep the work
directory, --p4-edge-blend to set edge_blend of sets A and B (default: py4DSTEM's 16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402

KDE_UPSAMPLE = 4  # py4DSTEM's real-space upsampling factor
OBJECT_PADDING_PX = [32, 32]  # py4DSTEM's default object padding, passed explicitly
SHIFT_SEARCH_SCAN_PX = 2  # best integer translation searched within +- this many scan px
PEER_TIMEOUT_S = 300
# py4DSTEM (m, n, cos/sin) of C10, C12a/b, C21a/b, C23a/b, C30: the set our joint fit uses
THIRD_ORDER_MN = [[1, 0, 0], [1, 2, 0], [1, 2, 1], [2, 1, 0], [2, 1, 1], [2, 3, 0], [2, 3, 1],
                  [3, 0, 0]]  # fmt: skip


# --------------------------------------------------------------------------- py4DSTEM stage
def _plain(value):
    """JSON-able copy of numpy scalars/arrays and nested containers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def py4dstem_stage(workdir: Path, variant: str) -> int:
    """Run py4DSTEM's Parallax on workdir/data.npy with the options of `variant` in
    workdir/params.json; write p4_<variant>_result.json and p4_<variant>_image.npy."""
    import warnings

    t_import = time.perf_counter()
    import py4DSTEM

    import_s = time.perf_counter() - t_import
    p = json.loads((workdir / "params.json").read_text())
    v = p["variants"][variant]
    data = np.load(workdir / "data.npy")
    out: dict = {"version": py4DSTEM.__version__, "import_s": import_s, "errors": [],
                 "step_s": {}, "options": {}}  # fmt: skip
    caught: list[str] = []

    def step(name, fn):
        t = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                fn()
            caught.extend(f"{name}: {x.message}" for x in w
                          if not issubclass(x.category, DeprecationWarning))  # fmt: skip
            out["deprecation_warnings"] = out.get("deprecation_warnings", 0) + sum(
                issubclass(x.category, DeprecationWarning) for x in w
            )
            return True
        except Exception as exc:  # any failure is reported in the table, not raised
            out["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            out["traceback"] = traceback.format_exc()
            return False
        finally:
            out["step_s"][name] = time.perf_counter() - t

    t0 = time.perf_counter()
    holder: dict = {}

    def make():
        dc = py4DSTEM.DataCube(data=data)
        dc.calibration.set_R_pixel_size(p["step_A"])
        dc.calibration.set_R_pixel_units("A")
        dc.calibration.set_Q_pixel_size(p["angular_sampling_mrad"])
        dc.calibration.set_Q_pixel_units("mrad")
        holder["px"] = py4DSTEM.process.phase.Parallax(
            energy=p["energy_eV"], datacube=dc, verbose=False,
            object_padding_px=tuple(p["object_padding_px"]),
        )  # fmt: skip

    pre = {"plot_average_bf": False}
    if v.get("edge_blend") is not None:
        pre["edge_blend"] = float(v["edge_blend"])
    rec = {"reset": True, "progress_bar": False, "plot_aligned_bf": False,
           "plot_convergence": False}  # fmt: skip
    if v.get("our_bins"):
        rec["alignment_bin_values"] = p["bins"]
    if v.get("regularizer_matrix_size"):
        rec["regularize_shifts"] = True
        rec["regularizer_matrix_size"] = tuple(v["regularizer_matrix_size"])
    sub = {"kde_upsample_factor": p["kde_upsample_factor"], "plot_upsampled_BF_comparison": False,
           "plot_upsampled_FFT_comparison": False, "progress_bar": False}  # fmt: skip
    fit = {"force_transpose": False, "plot_CTF_comparison": False,
           "plot_BF_shifts_comparison": False}  # fmt: skip
    if p.get("aberrations_mn"):
        fit["aberrations_mn"] = p["aberrations_mn"]
    cor = {"plot_corrected_phase": False}
    out["options"] = {"preprocess": pre, "reconstruct": rec, "subpixel_alignment": sub,
                      "aberration_fit": fit, "aberration_correct": cor}  # fmt: skip
    ok = step("DataCube/Parallax", make)
    px = holder.get("px")
    for name, method, kwargs in (
        ("preprocess", "preprocess", pre),
        ("reconstruct", "reconstruct", rec),
        ("subpixel_alignment", "subpixel_alignment", sub),
        ("aberration_fit", "aberration_fit", fit),
        ("aberration_correct", "aberration_correct", cor),
    ):
        if not ok:
            break
        ok = step(name, lambda m=method, k=kwargs: getattr(px, m)(**k))
    out["wall_s"] = time.perf_counter() - t0
    out["warnings"] = sorted(set(caught))
    if px is not None:
        for attr in ("aberrations_C1", "aberrations_C12a", "aberrations_C12b",
                     "rotation_Q_to_R_rads", "transpose", "aberrations_dict_polar",
                     "error_iterations"):  # fmt: skip
            if hasattr(px, attr):
                out[attr] = _plain(getattr(px, attr))
        if hasattr(px, "recon_phase_corrected"):
            image = np.asarray(px.recon_phase_corrected, np.float32)
            np.save(workdir / f"p4_{variant}_image.npy", image)
    # public attributes only: the grid is the one asked for (padding, kde factor); the BF
    # pixel count is recomputed with preprocess's default rule (mean pattern >= 0.8 max)
    out["kde_upsample_factor"] = p["kde_upsample_factor"]
    out["object_padding_px"] = p["object_padding_px"]
    mean_dp = data.mean(axis=(0, 1))
    out["num_bf_images"] = int(np.count_nonzero(mean_dp >= 0.8 * mean_dp.max()))
    (workdir / f"p4_{variant}_result.json").write_text(json.dumps(_plain(out), indent=1))
    return 0


# --------------------------------------------------------------------------- main stage
def make_cases(only: list[str] | None) -> list[tuple[str, object, bool]]:
    """(name, SimulationConfig, third order present) for every case."""
    from dataclasses import replace

    from tcbf_live.simulators.config import SimulationConfig, tutorial_config
    from tcbf_live.simulators.optics import Aberrations

    weak = SimulationConfig(  # tests/test_tcbf.py::weak_object_cfg
        scan_shape=(24, 48), step_A=0.5, detector_shape=(128, 128), energy_eV=300e3,
        semiangle_mrad=20.0, angular_sampling_mrad=1.23, rolloff_mrad=0.2,
        aberrations=Aberrations.from_defocus(150.0), dose_e_per_A2=1e5, sample="random",
        feature_A=0.5, phase_rms=0.038,
    )  # fmt: skip
    # tests/test_higher_order.py::third_order_case(edge_px=1.0, dose=1e4)
    a, step, edge_px = 4e-3, 256 / 24, 1.0
    third = Aberrations(C10_A=-15000.0, C12_A=100.0, phi12_rad=0.3,
                        C21_A=edge_px * step / a**2, phi21_rad=math.radians(-40.0),
                        C23_A=edge_px * step / a**2, phi23_rad=math.radians(10.0),
                        C30_A=edge_px * step / a**3)  # fmt: skip
    # tests/test_transfer_fit.py::high_angle_case(1e5): 300 kV, 25 mrad, where tile peaks
    # read coma and trefoil low
    high = Aberrations(C10_A=-100.0, C12_A=20.0, phi12_rad=0.3, C21_A=800.0,
                       phi21_rad=math.radians(-40), C23_A=600.0, phi23_rad=math.radians(10),
                       C30_A=2e4)  # fmt: skip
    high_cfg = tutorial_config(scan_shape=(64, 64), step_A=0.5, detector_shape=(64, 64),
                               semiangle_mrad=25.0, angular_sampling_mrad=1.95,
                               rolloff_mrad=0.2, aberrations=high, rotation_deg=-15.0,
                               dose_e_per_A2=1e5, sample="random", feature_A=0.5,
                               phase_rms=0.05, seed=1)  # fmt: skip
    cases = [
        ("tutorial", tutorial_config(), False),
        ("tutorial-1e3", tutorial_config(dose_e_per_A2=1000.0), False),
        ("weak-1e5", weak, False),
        ("weak-1e4", replace(weak, dose_e_per_A2=1e4), False),
        (
            "third-order",
            tutorial_config(scan_shape=(48, 48), aberrations=third, dose_e_per_A2=1e4),
            True,
        ),  # fmt: skip
        ("high-angle", high_cfg, True),
    ]
    return [c for c in cases if not only or c[0] in only]


def correlation(a: np.ndarray, b: np.ndarray, border: int) -> float:
    """Pearson correlation after cropping `border` pixels (tests/test_tcbf.py)."""
    a = a[border:-border, border:-border].ravel()
    b = b[border:-border, border:-border].ravel()
    return float(np.corrcoef(a, b)[0, 1])


def best_shift_correlation(image: np.ndarray, truth: np.ndarray, border: int,
                           max_shift: int) -> tuple[float, float, tuple[int, int]]:  # fmt: skip
    """(correlation at zero shift, signed correlation at the integer translation within
    +-max_shift that maximises |correlation|, that translation). Rolled-in edges lie inside
    the cropped border (border >= max_shift)."""
    assert border >= max_shift
    best = (-1.0, 0.0, (0, 0))
    for dr in range(-max_shift, max_shift + 1):
        for dc in range(-max_shift, max_shift + 1):
            c = correlation(np.roll(image, (dr, dc), axis=(0, 1)), truth, border)
            if abs(c) > best[0]:
                best = (abs(c), c, (dr, dc))
    return correlation(image, truth, border), best[1], best[2]


def fourier_decimate(image: np.ndarray, ratio: int) -> np.ndarray:
    """Band-limit to the Nyquist frequency of the grid `ratio` times coarser (ideal low-pass),
    then keep every `ratio`-th sample: sample j of the result is sample j*ratio of the input."""
    if ratio == 1:
        return image
    spec = np.fft.fft2(image)
    qx = np.abs(np.fft.fftfreq(image.shape[0]))[:, None]
    qy = np.abs(np.fft.fftfreq(image.shape[1]))[None, :]
    spec[(qx >= 0.5 / ratio) | (qy >= 0.5 / ratio)] = 0
    return np.real(np.fft.ifft2(spec))[::ratio, ::ratio]


def p4_on_our_grid(image: np.ndarray, res: dict, shape: tuple[int, int],
                   f: int) -> tuple[np.ndarray, str]:  # fmt: skip
    """py4DSTEM's padded, kde-upsampled image cropped/resampled onto our (rows f, cols f) grid.
    Its upsampled pixel j sits at scan coordinate j / f_p - pad/2 (pad = object padding)."""
    from scipy import ndimage as ndi

    fp = float(res["kde_upsample_factor"])
    pad = res.get("object_padding_px", [32, 32])
    how = "none"
    if abs(fp - round(fp)) < 1e-9 and round(fp) % f == 0:
        ratio = round(fp) // f
        coarse = fourier_decimate(image, ratio)
        how = "none" if ratio == 1 else f"Fourier low-pass + decimate x1/{ratio}"
    else:
        coarse = ndi.zoom(image, f / fp, order=1)
        how = f"ndimage.zoom {f / fp:.3g}"
    r0, c0 = round(pad[0] / 2 * f), round(pad[1] / 2 * f)
    out = coarse[r0 : r0 + shape[0], c0 : c0 + shape[1]]
    if out.shape != shape:
        raise ValueError(f"py4DSTEM image {image.shape} does not cover {shape} after cropping")
    return out, how


def run_ours(sim, frames, global_search: bool = True):
    from tcbf_live.detectors.base import FrameBatch
    from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
    from tcbf_live.stream.tcbf import PipelineSettings
    from tcbf_live.stream.tcbf.alignment import AlignmentSettings

    t = time.perf_counter()
    align = AlignmentSettings(global_search=global_search)
    proc = SeriesProcessor(sim.series_info(1),
                           ProcessingSettings(pipeline=PipelineSettings(alignment=align)))
    proc.add(FrameBatch(1, 0, frames))
    res = proc.solve(final=True)
    return res, time.perf_counter() - t


def run_peer(args, case_dir: Path, variant: str, truth_shape, f: int, sim, q_max) -> dict:
    """Run one py4DSTEM variant in the peer Python and score its image."""
    out: dict = {}
    cmd = [args.peer_python, str(Path(__file__).resolve()), "--stage", "py4dstem",
           "--workdir", str(case_dir), "--variant", variant]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1", MPLBACKEND="Agg")  # fmt: skip
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=PEER_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        out["error"] = f"timed out after {PEER_TIMEOUT_S} s"
        return out
    out["process_s"] = time.perf_counter() - t
    if proc.returncode != 0:
        out["error"] = f"stage exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
        return out
    p4 = json.loads((case_dir / f"p4_{variant}_result.json").read_text())
    out["p4"] = p4
    if p4["errors"]:
        out["error"] = "; ".join(p4["errors"])
    if "aberrations_C1" in p4:
        out["defocus"] = -p4["aberrations_C1"]
        out["rot"] = math.degrees(p4["rotation_Q_to_R_rads"])
        a, b = p4["aberrations_C12a"], p4["aberrations_C12b"]
        out["c12"] = (math.hypot(a, b), math.degrees(math.atan2(b, a) / 2))
    image_path = case_dir / f"p4_{variant}_image.npy"
    if not image_path.exists():
        return out
    try:
        full = np.load(image_path)
        img, out["resample"] = p4_on_our_grid(full, p4, truth_shape, f)
        truth = sim.phase_on_grid(f, q_max)
        out["corr"] = best_shift_correlation(img, truth, 6 * f, SHIFT_SEARCH_SCAN_PX * f)
        fp = round(p4["kde_upsample_factor"])
        if fp != f:  # also on its own grid, against the truth sampled there
            own = sim.phase_on_grid(fp, q_max)
            pad = p4.get("object_padding_px", [32, 32])
            r0, c0 = pad[0] // 2 * fp, pad[1] // 2 * fp
            crop = full[r0 : r0 + own.shape[0], c0 : c0 + own.shape[1]]
            out["corr_own"] = best_shift_correlation(crop, own, 6 * fp, SHIFT_SEARCH_SCAN_PX * fp)
    except Exception as exc:  # scoring failure: report it, keep going
        out["error"] = (out.get("error", "") + f" scoring: {exc}").strip()
    return out


def run_case(name, cfg, third, args, root: Path) -> dict:
    from tcbf_live.simulators.simulate import Simulator
    from tcbf_live.stream.tcbf.alignment import default_edge_blend

    row: dict = {"case": name, "dose": cfg.dose_e_per_A2, "cfg": cfg, "notes": []}
    t = time.perf_counter()
    sim = Simulator(cfg)
    frames = sim.frames(0, sim.n_frames)  # acquisition order
    row["sim_s"] = time.perf_counter() - t
    assert cfg.scan_order == "raster" and not cfg.transpose
    rows, cols = cfg.scan_shape
    row["truth_defocus"] = cfg.aberrations.defocus_A
    row["truth_rot"] = cfg.rotation_deg
    row["truth_ab"] = cfg.aberrations
    q_max = 2 * cfg.semiangle_mrad * 1e-3 / sim.wavelength_A

    res, row["ours_s"] = run_ours(sim, frames)
    f = res.upsampling_factor if res is not None else 4
    row["f"] = f
    truth = sim.phase_on_grid(f, q_max)
    bins: list[int] = [32, 32, 16, 16, 8, 8]
    if res is None:
        row["notes"].append("ours: no model (too low dose)")
    else:
        ab = res.aberrations
        row["ours_defocus"] = ab.defocus_A
        row["ours_rot"] = math.degrees(ab.rotation_rad)
        row["ours_c12"] = (ab.C12_A, math.degrees(ab.phi12_rad))
        row["ours_corr"] = best_shift_correlation(res.image, truth, 6 * f,
                                                  SHIFT_SEARCH_SCAN_PX * f)  # fmt: skip
        row["ours_sched"] = res.alignment.schedule
        bins = [int(b) for b in res.alignment.schedule[1:]]  # [0]: the cold-start pair estimate
        if res.alignment.method == "global":  # py4DSTEM gets the schedule our tiles ran
            tiles, _ = run_ours(sim, frames, global_search=False)
            bins = [int(b) for b in tiles.alignment.schedule[1:]] if tiles else bins
            row["notes"].append(f"ours: global search (tiles alone: schedule {bins})")
        if res.higher is not None:
            row["ours_higher"] = {k: (c.value_A, c.angle_rad, c.determined)
                                  for k, c in res.higher.coefficients().items()}  # fmt: skip
    row["bins"] = bins

    case_dir = root / name
    case_dir.mkdir(parents=True, exist_ok=True)
    np.save(case_dir / "data.npy", frames.reshape(rows, cols, *cfg.detector_shape))
    del frames
    ours_blend = default_edge_blend(cfg.scan_shape)
    blend = "default edge_blend 16" if args.p4_edge_blend is None \
        else f"edge_blend {args.p4_edge_blend:g}"  # fmt: skip
    variants = {
        "own": {"edge_blend": args.p4_edge_blend, "our_bins": False},
        "default": {"edge_blend": args.p4_edge_blend, "our_bins": True},
        "blend": {"edge_blend": ours_blend, "our_bins": True},
    }
    row["variant_labels"] = {
        "own": f"A: all defaults ({blend}, own bins)",
        "default": f"B: {blend}, our bins",
        "blend": f"C: edge_blend {ours_blend:g} (= ours), our bins",
    }
    if third:  # the shifts may only be non-linear in k with regularize_shifts
        variants["regular"] = {"edge_blend": ours_blend, "our_bins": True,
                               "regularizer_matrix_size": [3, 3]}  # fmt: skip
        row["variant_labels"]["regular"] = "D: as C + regularize_shifts, matrix size (3, 3)"
    params = {"step_A": cfg.step_A, "angular_sampling_mrad": sim.grid.angular_sampling_mrad,
              "energy_eV": cfg.energy_eV, "bins": bins, "kde_upsample_factor": KDE_UPSAMPLE,
              "object_padding_px": OBJECT_PADDING_PX,
              "aberrations_mn": THIRD_ORDER_MN if third else None, "variants": variants,
              "scan_shape": list(cfg.scan_shape)}  # fmt: skip
    (case_dir / "params.json").write_text(json.dumps(params))
    row["peer"] = {v: run_peer(args, case_dir, v, truth.shape, f, sim, q_max) for v in variants}
    return row


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _corr(c) -> str:
    if c is None:
        return "n/a"
    zero, best, (dr, dc) = c
    return f"{best:+.3f} @({dr:+d},{dc:+d}) [0: {zero:+.3f}]"


def print_report(rows: list[dict], elapsed: float) -> None:
    print()
    print(
        "| case | dose (e/A^2) | py4DSTEM run | defocus ours / py4DSTEM / true (A) | rotation "
        "ours / py4DSTEM / true (deg) | corr ours | corr py4DSTEM | time ours / py4DSTEM (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for v, p in r["peer"].items():
            if p.get("error") and "corr" not in p:
                err = " ".join(p["error"].split()).replace("|", "/")
                p4c = f"py4DSTEM failed: {err[:160]}"
            else:
                p4c = _corr(p.get("corr"))
            print(f"| {r['case']} | {r['dose']:g} | {r['variant_labels'][v]} | "
                  f"{_fmt(r.get('ours_defocus'), '.1f')} / {_fmt(p.get('defocus'), '.1f')} / "
                  f"{r['truth_defocus']:.1f} | {_fmt(r.get('ours_rot'), '.2f')} / "
                  f"{_fmt(p.get('rot'), '.2f')} / {r['truth_rot']:.2f} | "
                  f"{_corr(r.get('ours_corr'))} | {p4c} | {_fmt(r.get('ours_s'), '.2f')} / "
                  f"{_fmt(p.get('p4', {}).get('wall_s'), '.2f')} |")  # fmt: skip
    print()
    print(
        "corr: Pearson correlation of the phase-flipped tcBF image with the true phase "
        "low-passed to 2 alpha/lambda, on our grid (rows f x cols f), border 6 f px cropped, at "
        "the integer translation (dr, dc) in upsampled px within +-2 scan px that maximises "
        "|corr| (same search for both tools; the sign is reported as found); [0: ...] is the "
        "value without translation. py4DSTEM's x4 KDE image is cropped of its object padding "
        "and, where our f < 4, Fourier low-passed and decimated onto our grid. Times: "
        "reconstruction only, one thread; simulation, file I/O and imports excluded."
    )
    print()
    print("Details:")
    for r in rows:
        ab = r["truth_ab"]
        oc = r.get("ours_c12")
        print(f"- {r['case']}: simulation {r['sim_s']:.1f} s; our f={r['f']}, our schedule "
              f"{r.get('ours_sched')} (py4DSTEM got bins {r['bins']}); true C12 {ab.C12_A:.1f} A "
              f"at {math.degrees(ab.phi12_rad):.1f} deg, ours {_fmt(oc and oc[0], '.1f')} A at "
              f"{_fmt(oc and oc[1], '.1f')} deg")  # fmt: skip
        for v, p in r["peer"].items():
            p4 = p.get("p4", {})
            pc = p.get("c12")
            steps = ", ".join(f"{k} {t:.2f}" for k, t in p4.get("step_s", {}).items())
            line = [f"  - py4DSTEM {r['variant_labels'][v]}: C12 {_fmt(pc and pc[0], '.1f')} A at "
                    f"{_fmt(pc and pc[1], '.1f')} deg; kde x{p4.get('kde_upsample_factor')} -> "
                    f"our grid: {p.get('resample', 'n/a')}"]  # fmt: skip
            if "corr_own" in p:
                line.append(f"corr on its own x{round(p4['kde_upsample_factor'])} grid (truth "
                            f"sampled there) {_corr(p['corr_own'])}")  # fmt: skip
            line.append(
                f"steps (s): {steps}; subprocess {p.get('process_s', 0):.1f} s incl. "
                f"import {p4.get('import_s', 0):.1f} s; {p4.get('num_bf_images')} BF px; "
                f"{p4.get('deprecation_warnings', 0)} numpy deprecation warning(s)"
            )
            print("; ".join(line))
            if p.get("error"):
                print(f"    error: {p['error']}")
            for w in p4.get("warnings", []):
                print(f"    warning: {w}")
            if r["case"] in ("third-order", "high-angle") and "ours_higher" in r:
                _print_third_order(r, p4, ab)
    print(f"\ntotal {elapsed:.0f} s")


def _print_third_order(r: dict, p4: dict, ab) -> None:
    pol = p4.get("aberrations_dict_polar", {})
    print(
        "    third order, magnitude (A) at angle (deg), ours (joint fit, res.higher) / "
        "py4DSTEM (aberrations_dict_polar; aberrations_mn = C10, C12, C21, C23, C30) / "
        "true:"
    )
    for name, m in (("C10", 0), ("C12", 2), ("C21", 1), ("C23", 3), ("C30", 0)):
        o = r["ours_higher"].get(name)
        true_a = getattr(ab, f"phi{name[1:]}_rad") if m else None
        p_a = pol.get(f"phi{name[1:]}") if m else None
        print(f"      {name}: {_fmt(o and o[0], '.4g')} at "
              f"{_fmt(o and m and math.degrees(o[1]), '.1f')} / {_fmt(pol.get(name), '.4g')} at "
              f"{_fmt(p_a and math.degrees(p_a), '.1f')} / {getattr(ab, f'{name}_A'):.4g} at "
              f"{_fmt(true_a and math.degrees(true_a), '.1f')}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("main", "py4dstem"), default="main")
    ap.add_argument("--workdir", help="py4dstem stage: the case directory")
    ap.add_argument("--variant", help="py4dstem stage: which option set of params.json")
    ap.add_argument("--peer-python", default="/tmp/p4env/bin/python",
                    help="a Python with py4DSTEM 0.14.18 installed")  # fmt: skip
    ap.add_argument("--cases", nargs="*", help="subset of case names (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--p4-edge-blend",
        type=float,
        default=None,
        help="edge_blend of the first py4DSTEM run (default: its own, 16)",
    )
    args = ap.parse_args(argv)
    if args.stage == "py4dstem":
        return py4dstem_stage(Path(args.workdir), args.variant)

    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="peer-py4dstem-"))
    rows = []
    try:
        for name, cfg, third in make_cases(args.cases):
            print(f"case {name} ...", file=sys.stderr, flush=True)
            rows.append(run_case(name, cfg, third, args, root))
    finally:
        if args.keep:
            print(f"work directory kept: {root}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    print_report(rows, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
