"""tcBF against the simulator's ground truth: defocus, astigmatism, rotation, image, low dose,
live versus offline. Tolerances are the issue's; measured values are in docs/tcbf.md."""

import math
import threading

import h5py
import numpy as np
import pytest
import zmq

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.detectors.files import write_dataset
from tcbf_live.simulators.optics import Aberrations
from tcbf_live.simulators.sender import SendSettings, stream_series
from tcbf_live.simulators.simulate import (
    Simulator,
    tutorial_config,
    weak_phase_config,
)
from tcbf_live.stream.cli.main import main
from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf.alignment import AlignmentSettings
from tcbf_live.stream.tcbf.pipeline import PipelineSettings


def simulate(cfg):
    sim = Simulator(cfg)
    return sim, sim.frames(0, sim.n_frames)


def process(sim, frames, defocus_sign=None, batch=64, **alignment):
    settings = ProcessingSettings(
        pipeline=PipelineSettings(
            alignment=AlignmentSettings(defocus_sign=defocus_sign, **alignment)
        )
    )
    proc = SeriesProcessor(sim.series_info(1), settings)
    for first in range(0, len(frames), batch):
        proc.add(FrameBatch(1, first, frames[first : first + batch]))
    result = proc.solve(final=True)
    return proc, result


def correlation(a, b, border):
    a = a[border:-border, border:-border].ravel()
    b = b[border:-border, border:-border].ravel()
    return float(np.corrcoef(a, b)[0, 1])


def true_shifts(sim, bf_pixels):
    """Correction shifts = minus the simulator's raw vBF displacement."""
    return -np.array([sim.expected_shift_px(*p) for p in bf_pixels])


@pytest.fixture(scope="module")
def tutorial():
    return simulate(tutorial_config())


@pytest.fixture(scope="module")
def weak_object_cfg():
    """py4DSTEM's low-dose test object: 300 kV, 20 mrad, defocus 150 A, 0.5 A step, 1.23
    mrad/px (793 BF px), weak random phase 0.038 rad rms, 24x48 scan."""
    return weak_phase_config()


def test_tutorial_reconstruct_recovers_defocus_rotation_and_image(tutorial, tmp_path, capsys):
    sim, frames = tutorial
    cfg = sim.cfg
    data = tmp_path / "tutorial.npy"
    write_dataset(str(data), cfg.scan_shape, cfg.detector_shape, cfg.dtype, sim.ground_truth(),
                  iter([(0, frames)]))  # fmt: skip
    out = tmp_path / "result.h5"
    argv = ["reconstruct", str(data), "--energy", "300000", "--step", str(cfg.step_A),
            "--semiangle", "4", "--defocus-sign", "+1", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "defocus" in err and "wrote" in err
    with h5py.File(out) as f:
        ab = dict(f["aberrations"].attrs)
        image = f["tcbf/image"][()]
        factor = int(f["tcbf/image"].attrs["upsampling_factor"])
        sampling = float(f["tcbf/image"].attrs["sampling_A"])
        incoherent = f["bf/incoherent"][()]
        shifts = f["alignment/shifts_px"][()]
        bf_pixels = f["alignment/bf_pixels"][()]
        errors = f["alignment/error"][()]
    # measured: defocus -0.7 %, rotation 0.25 deg off
    assert ab["defocus_A"] == pytest.approx(15000.0, rel=0.03)
    assert ab["C10_A"] == pytest.approx(-ab["defocus_A"])
    assert math.degrees(ab["rotation_rad"]) == pytest.approx(-15.0, abs=1.0)
    assert not ab["transpose"]
    assert factor == 4 and sampling == pytest.approx(cfg.step_A / 4)
    assert image.shape == (24 * 4, 48 * 4)
    assert shifts.shape == bf_pixels.shape and len(errors) >= 2
    assert np.sqrt(np.mean(np.sum((shifts - true_shifts(sim, bf_pixels)) ** 2, axis=1))) < 0.2
    # image vs the true phase low-passed to the information limit 2 alpha / lambda
    q_max = 2 * cfg.semiangle_mrad * 1e-3 / sim.wavelength_A
    truth = sim.phase_on_grid(factor, q_max)
    tcbf_corr = correlation(image, truth, 6 * factor)  # measured 0.58
    bf_corr = correlation(incoherent, sim.phase_on_grid(1, q_max), 6)  # measured 0.01
    assert tcbf_corr >= 0.5
    assert abs(bf_corr) <= 0.1


def test_overfocus_sign_hint_and_the_folded_default(tutorial):
    sim, _ = tutorial
    cfg = tutorial_config(aberrations=Aberrations.from_defocus(-15000.0), scan_shape=(24, 32))
    sim, frames = simulate(cfg)
    proc, hinted = process(sim, frames, defocus_sign=-1)
    ab = hinted.aberrations
    assert ab.defocus_A == pytest.approx(-15000.0, rel=0.03)
    assert math.degrees(ab.rotation_rad) == pytest.approx(-15.0, abs=1.0)
    q_max = 2 * cfg.semiangle_mrad * 1e-3 / sim.wavelength_A
    truth = sim.phase_on_grid(hinted.upsampling_factor, q_max)
    assert correlation(hinted.image, truth, 24) >= 0.5  # right sign: positive correlation
    # a wrong hint gives the 180-degree twin: same shifts, opposite defocus, inverted image
    _, wrong = process(sim, frames, defocus_sign=+1)
    assert wrong.aberrations.defocus_A == pytest.approx(15000.0, rel=0.03)
    assert math.degrees(wrong.aberrations.rotation_rad) == pytest.approx(165.0, abs=1.0)
    np.testing.assert_allclose(wrong.shifts_px, hinted.shifts_px, atol=1e-6)
    assert correlation(wrong.image, truth, 24) <= -0.5
    # no hint: rotation folded into (-90, 90] deg, i.e. the correct answer here
    _, folded = process(sim, frames)
    assert folded.aberrations.defocus_A == pytest.approx(ab.defocus_A, rel=1e-6)


def test_astigmatism_and_rotation(weak_object_cfg):
    from dataclasses import replace

    cfg = replace(weak_object_cfg, rotation_deg=30.0, phase_rms=0.1,
                  aberrations=Aberrations(C10_A=-150.0, C12_A=40.0,
                                          phi12_rad=math.radians(20.0)))  # fmt: skip
    sim, frames = simulate(cfg)
    _, result = process(sim, frames, defocus_sign=+1)
    ab = result.aberrations
    # measured: C12 39.8 A at 20.0 deg, defocus 146.7 A, rotation 30.1 deg
    assert ab.C12_A == pytest.approx(40.0, rel=0.15)
    assert math.degrees(ab.phi12_rad) == pytest.approx(20.0, abs=5.0)
    assert ab.defocus_A == pytest.approx(150.0, rel=0.05)
    assert math.degrees(ab.rotation_rad) == pytest.approx(30.0, abs=1.0)


def test_low_dose_weak_object_where_the_offline_reference_fails(weak_object_cfg):
    from dataclasses import replace

    sim, frames = simulate(replace(weak_object_cfg, dose_e_per_A2=1e4))
    _, result = process(sim, frames, defocus_sign=+1)
    assert result is not None
    # py4DSTEM defaults: C10 -9.6 A (failed); ours measured 158.6 A, rotation -0.75 deg
    assert result.aberrations.defocus_A == pytest.approx(150.0, rel=0.10)
    assert abs(math.degrees(result.aberrations.rotation_rad)) < 3.0
    # coarse levels only: the default schedule never goes finer than the dose allows
    assert set(result.alignment.schedule[1:]) <= {32, 16}


def test_too_low_dose_gives_no_model_rather_than_a_wrong_one(weak_object_cfg):
    from dataclasses import replace

    sim, frames = simulate(replace(weak_object_cfg, dose_e_per_A2=300.0))
    proc, result = process(sim, frames, defocus_sign=+1)
    assert result is None
    assert proc.result(final=True).tcbf is None


def test_partial_scan_updates_converge_and_the_image_is_deposited_incrementally(tutorial):
    sim, frames = tutorial
    proc = SeriesProcessor(sim.series_info(1), ProcessingSettings())
    seen = []
    for first in range(0, len(frames), 96):  # 2 rows at a time
        proc.add(FrameBatch(1, first, frames[first : first + 96]))
        r = proc.solve()
        if r is not None:
            seen.append((first + 96, r.rows, r.aberrations.defocus_A, r.rebuilt))
    final = seen[-1][2]
    half = [d for n, _, d, _ in seen if n <= len(frames) // 2]
    assert half, "a model must exist after half the scan"
    assert half[-1] == pytest.approx(final, rel=0.10)  # measured within 1 %
    assert all(rows[1] <= n // 48 for n, rows, _, _ in seen)  # only acquired rows are used
    assert seen[0][0] <= 10 * 48  # first model after ~8 rows


def test_live_engine_matches_offline_reconstruct(tutorial, endpoint):
    """Stream the tutorial over ZeroMQ at a paced rate: tcBF results are published during the
    scan (half-scan defocus near the final one), and the final live shifts equal the offline
    result on the same frames."""
    sim, frames = tutorial
    settings = EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=True),
        max_series=1, idle_timeout_s=20.0, align_interval_s=0.05,
    )  # fmt: skip
    engine = Engine(settings).start()
    published = []

    def watch():
        while engine.join(timeout=0.02) is False:
            snap = engine.snapshot()
            if snap is not None and snap.tcbf is not None and not snap.tcbf.final:
                published.append((snap.tcbf.frames, snap.tcbf.aberrations.defocus_A))

    watcher = threading.Thread(target=watch)
    watcher.start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(endpoint)
    batches = ((f, frames[f : f + 16]) for f in range(0, len(frames), 16))
    try:  # ~1.5 s for the scan: several alignment updates happen while it arrives
        stream_series(push, sim, SendSettings(rate_fps=800.0), 7, batches)
    finally:
        push.close(linger=2000)
    assert engine.join(timeout=30)
    watcher.join()
    live = engine.last_result
    assert live.complete and live.tcbf is not None and live.tcbf.final
    mid = [d for n, d in published if n <= len(frames) // 2]
    assert mid, f"no live estimate in the first half of the scan ({published[:3]})"
    assert mid[-1] == pytest.approx(live.tcbf.aberrations.defocus_A, rel=0.10)
    _, offline = process(sim, frames)
    # measured: first estimate after ~400 frames (8 rows); the final update is cold-started
    # like the offline one, so the shifts are identical
    np.testing.assert_allclose(live.tcbf.shifts_px, offline.shifts_px, atol=0.05)


@pytest.mark.parametrize("scan", [(12, 12), (8, 8), (3, 3), (1, 16), (8, 3), (6, 48)])
def test_small_fields_give_no_model_or_a_sane_one(scan):
    """Too little field for the shifts: never a confident absurd answer (review finding)."""
    sim, frames = simulate(tutorial_config(scan_shape=scan))
    _, result = process(sim, frames, defocus_sign=+1)
    if result is not None:
        assert result.aberrations.defocus_A == pytest.approx(15000.0, rel=0.2)
        assert np.abs(result.shifts_px).max() < 12


def test_repeat_scans_accumulated_mid_pass(tutorial):
    """1.5 passes accumulated: positions hold 1 or 2 frames; tiles are per frame."""
    from dataclasses import replace

    sim, frames = tutorial
    info = replace(sim.series_info(2), frames_expected=2 * len(frames))
    proc = SeriesProcessor(info, ProcessingSettings())
    both = np.concatenate([frames, frames[: len(frames) // 2]])
    for first in range(0, len(both), 64):
        proc.add(FrameBatch(2, first, both[first : first + 64]))
    result = proc.solve(final=True)
    assert set(np.unique(proc.acc.state.hits)) == {1, 2}
    assert result.aberrations.defocus_A == pytest.approx(15000.0, rel=0.03)


def test_calibration_file_with_sampling_from_the_flags(tutorial, tmp_path, capsys):
    from dataclasses import replace

    from tcbf_live.stream.tcbf.calibration import calibrate

    sim, frames = tutorial
    cal = replace(calibrate(frames[:64]), angular_sampling_mrad=None)
    (tmp_path / "cal.json").write_text(cal.to_json())
    data = tmp_path / "d.npy"
    np.save(data, frames.reshape(24, 48, 128, 128))
    out = tmp_path / "r.h5"
    assert main(["reconstruct", str(data), "--energy", "3e5", "--step", str(sim.cfg.step_A),
                 "--angular-sampling", "0.154", "--calibration", str(tmp_path / "cal.json"),
                 "--output", str(out)]) == 0  # fmt: skip
    with h5py.File(out) as f:
        assert f["aberrations"].attrs["defocus_A"] == pytest.approx(15000, rel=0.03)
        assert f["tcbf/image"].attrs["phase_flipped"]


def test_the_science_core_imports_nothing_impure():
    """stream/tcbf imports numpy, scipy, numba, the standard library and itself only (the
    ingest module `accumulators` is checked by its owner)."""
    import ast
    import sys
    from pathlib import Path

    import tcbf_live.stream.tcbf as core

    allowed = {"numpy", "scipy", "numba", "tcbf_live"}
    for path in Path(core.__path__[0]).glob("*.py"):
        if path.name.startswith("accumulat"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])  # fmt: skip
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, (path.name, name)
                if top == "tcbf_live":
                    assert name.startswith("tcbf_live.stream.tcbf."), (path.name, name)


def test_acquisition_takes_the_series_metadata():
    from tcbf_live.detectors.base import SeriesInfo
    from tcbf_live.stream.tcbf.pipeline import Acquisition

    info = SeriesInfo(
        3,
        (4, 5),
        (16, 16),
        "<u2",
        scan_order="serpentine",
        energy_eV=3e5,
        step_A=0.5,
        semiangle_mrad=20.0,
        counts_per_electron=2.0,
        transpose=True,
    )
    acq = Acquisition.of(info)
    assert acq == Acquisition((4, 5), (16, 16), "serpentine", 3e5, 0.5, 20.0, 2.0, True)
