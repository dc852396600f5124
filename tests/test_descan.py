"""Descan measured from the per-BF-pixel stack (`stream/tcbf/descan.py`): the BF disk's drift
over the scan against the simulator's ground truth (`descan_px_per_step`)."""

import numpy as np
import pytest

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators.simulate import Simulator, tutorial_config
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf import descan


def solved(d):
    sim = Simulator(tutorial_config(dose_e_per_A2=1000.0, descan_px_per_step=d))
    proc = SeriesProcessor(sim.series_info(1), ProcessingSettings())
    proc.add(FrameBatch(1, 0, sim.frames(0, sim.n_frames)))
    return proc.solve(final=True)


@pytest.mark.parametrize("d", [(0.02, 0.0, 0.0, 0.015), (0.01, 0.005, -0.008, 0.012)])
def test_a_linear_descan_is_measured(d):
    """A plane is chosen, and each per-step coefficient is within 15 % of the largest true one
    plus 3 standard errors (measured: 6-13 % off; the stated errors are statistical only)."""
    fit = solved(d).descan
    truth = np.array(d).reshape(2, 2)  # centre (row, col) per scan (row, col) step
    assert fit.order == 1
    err = fit.errors_px[1:3].T  # the same layout as per_step_px
    np.testing.assert_array_less(np.abs(fit.per_step_px - truth),
                                 0.15 * np.abs(truth).max() + 3 * err)  # fmt: skip
    r, c = np.array(fit.centres_px.shape[:2]) - 1
    true_drift = np.hypot(d[0] * r + d[1] * c, d[2] * r + d[3] * c)
    assert fit.drift_px() == pytest.approx(true_drift, rel=0.15)


def test_reconstruct_writes_the_descan(tmp_path, capsys):
    import h5py

    from tcbf_live.detectors.files import write_dataset
    from tcbf_live.stream.cli.main import main

    d = (0.02, 0.0, 0.0, 0.015)
    sim = Simulator(tutorial_config(dose_e_per_A2=1000.0, descan_px_per_step=d))
    cfg, data, out = sim.cfg, tmp_path / "d.npy", tmp_path / "r.h5"
    write_dataset(str(data), cfg.scan_shape, cfg.detector_shape, cfg.dtype, sim.ground_truth(),
                  iter([(0, sim.frames(0, sim.n_frames))]))  # fmt: skip
    assert main(["reconstruct", str(data), "--output", str(out)]) == 0
    assert "descan plane, drift" in capsys.readouterr().err
    with h5py.File(out) as f:
        g = f["descan"]
        assert g.attrs["model"] == "plane" and g.attrs["terms"] == "1, row, col"
        assert g["centre_px"].shape == (*cfg.scan_shape, 2)
        np.testing.assert_allclose(g.attrs["per_step_px"], np.reshape(d, (2, 2)), atol=0.003)


def test_no_descan_is_a_constant():
    fit = solved((0.0, 0.0, 0.0, 0.0)).descan
    assert fit.order == 0 and fit.drift_px() == 0.0
    assert np.all(np.abs(fit.coefficients_px[0]) < 0.1)  # the calibrated centre


def test_the_moment_gain_of_a_uniform_disk_is_one_half():
    """Over a fixed support, a uniform disk's moment moves by half its displacement (the lens
    where the two disks overlap is symmetric about the midpoint)."""
    yy, xx = np.mgrid[:128, :128]
    disk = ((yy - 64.0) ** 2 + (xx - 64.0) ** 2 <= 30.0**2).astype(float)
    bf = np.argwhere(disk > 0.5)
    assert descan.moment_gain(disk, bf, (64.0, 64.0)) == pytest.approx(0.5, abs=0.03)


def test_too_few_positions_or_no_gain_give_no_model():
    assert descan.fit_descan(np.zeros((8, 2)), (2, 4), 0.5) is None
    assert descan.fit_descan(np.zeros((100, 2)), (10, 10), 0.0) is None


def test_live_updates_measure_it_incrementally():
    """Live: measured on the positions so far; the moments of a position are taken once and
    again only when its frames change or it is excluded or readmitted, and the end equals a
    fresh computation."""
    d = (0.02, 0.0, 0.0, 0.015)
    sim = Simulator(tutorial_config(dose_e_per_A2=1000.0, descan_px_per_step=d))
    frames = sim.frames(0, sim.n_frames)
    proc = SeriesProcessor(sim.series_info(1), ProcessingSettings())
    half = len(frames) // 2
    proc.add(FrameBatch(1, 0, frames[:half]))
    live = proc.solve()
    assert live.descan is not None and live.descan.order >= 1
    assert np.isnan(live.descan.centres_px.reshape(-1, 2)[half:]).all()  # not acquired yet
    proc.add(FrameBatch(1, half, frames[half:]))
    final = proc.solve(final=True).descan
    pl, inputs = proc.pipeline, proc.inputs()
    fresh = descan.disk_moments(inputs.stack, pl.k_px, pl.moments._of[1]) / pl.descan_gain
    np.testing.assert_allclose(final.centres_px.reshape(-1, 2), fresh, rtol=1e-12)
    assert abs(final.per_step_px[0, 0] - d[0]) < 0.003


def test_disk_moments_are_recomputed_for_new_frames_and_exclusions_only():
    """A refit of the dose model moves every exposure a little: no moment depends on it, so
    none is recomputed; new frames, an exclusion and a readmission are."""
    rng = np.random.default_rng(2)
    k = rng.uniform(-5, 5, (40, 2))
    stack = rng.integers(0, 50, (12, 40)).astype(np.uint16)
    hits = np.ones(12, np.int64)
    exposure = np.ones(12)
    moments = descan.DiskMoments(12, k)
    first = moments.update(stack, hits, exposure).copy()
    assert moments.recomputed == 12
    np.testing.assert_allclose(first, descan.disk_moments(stack, k, exposure))
    moments.update(stack, hits, exposure * rng.uniform(0.9, 1.1, 12))  # the dose model refitted
    assert moments.recomputed == 0
    exposure[5] = 0.0  # excluded
    assert np.isnan(moments.update(stack, hits, exposure)[5]).all() and moments.recomputed == 1
    exposure[5] = 1.0  # readmitted
    np.testing.assert_allclose(moments.update(stack, hits, exposure), first)
    assert moments.recomputed == 1
    stack[7] += 3  # a repeat-pass frame
    hits[7] = 2
    again = moments.update(stack, hits, exposure)
    assert moments.recomputed == 1
    np.testing.assert_allclose(again, descan.disk_moments(stack, k, exposure))
