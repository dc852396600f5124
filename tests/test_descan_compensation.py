"""Descan compensation (`stream/tcbf/descan_compensation.py`): the kernel reads each position's
BF pixels where the disk is; the calibration is not fooled by a drifting disk; on simulator
ground truth a drift of half a disk radius is recovered within 5 % and the image is as good as
without descan."""

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tcbf_live.detectors.base import FrameBatch, scan_position
from tcbf_live.detectors.files import write_dataset
from tcbf_live.simulators.simulate import Simulator, tutorial_config
from tcbf_live.stream.cli.main import main
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf import descan_compensation as dc
from tcbf_live.stream.tcbf.accumulators import Accumulators, prepare
from tcbf_live.stream.tcbf.calibration import calibrate
from tcbf_live.stream.tcbf.updates import PipelineSettings

sys.path.insert(0, str(Path(__file__).parent))
from test_tcbf import correlation  # noqa: E402

HALF_RADIUS = (0.4, 0.0, 0.0, 0.2)  # 9.2 px down the rows, 9.4 px along: 13 px = 0.5 radii


def disk_frames(shifts, size=48, radius=9.0, level=20):
    """Noise-free integer frames of a uniform disk centred at (24, 24) + shift."""
    yy, xx = np.mgrid[:size, :size]
    return np.array([((yy - 24 - dr) ** 2 + (xx - 24 - dc_) ** 2 <= radius**2) * level
                     for dr, dc_ in shifts], np.uint16)  # fmt: skip


def accumulators(cal, scan=(1, 3)):
    cal, layout = prepare(cal, (4,))
    return Accumulators(scan, cal, layout, axial_radius_px=2.0, moments=True)


def test_the_kernel_reads_the_bf_pixels_at_the_read_shift():
    """Position 1's disk sits (2, -3) px away: read there, its stack row equals the centred
    frame's; the centre of mass comes out of the folded first moments; a masked pixel under
    the shifted disk reads the BF pixel's own (unshifted) value."""
    frames = disk_frames([(0, 0), (2, -3), (0, 0)])
    mask = np.zeros((48, 48), bool)
    mask[24 + 2, 24 - 3 + 5] = True  # under the shifted disk, not a BF pixel of the centred one
    cal = calibrate(frames[[0, 2]], supplied_mask=mask)
    acc = accumulators(cal)
    acc.set_read_shift(np.array([[0, 0], [2.2, -2.8], [0, 0]]), np.array([False, True, False]))
    frames[2, 24, 29] = 7  # position 2: its own pixel under the masked one's BF pixel ...
    frames[1, 24 + 2, 24 - 3 + 5] = 65535  # ... and the masked pixel, full of junk
    acc.add(0, frames)
    s, bf = acc.state, acc.calibration.bf_pixels
    assert acc.read_shift_px[1].tolist() == [2, -3]
    i = int(np.flatnonzero((bf[:, 0] == 24) & (bf[:, 1] == 29))[0])
    row1 = frames[1][bf[:, 0] + 2, bf[:, 1] - 3].astype(int)
    row1[i] = frames[1][24, 29]  # the masked pixel's BF pixel: read unshifted
    np.testing.assert_array_equal(s.stack[1], row1)
    np.testing.assert_array_equal(s.stack[0], frames[0][bf[:, 0], bf[:, 1]])
    assert s.tiles[1].sum() == row1.sum() and s.bf_sum[1] == row1.sum()
    com = dc.centres_of_mass(frames.astype(float), acc.calibration.mask)
    np.testing.assert_allclose(s.moments / s.totals[:, None], com, rtol=1e-12)


def test_a_shift_off_the_detector_is_clipped_and_counted():
    cal = calibrate(disk_frames([(0, 0)] * 2))
    acc = accumulators(cal)
    assert acc.set_read_shift(np.array([[0, 0], [30, 0], [0, -40]]), np.ones(3, bool)) == 2
    lo, hi = acc.calibration.bf_pixels.min(axis=0), acc.calibration.bf_pixels.max(axis=0)
    assert acc.read_shift_px[1, 0] == 47 - hi[0] and acc.read_shift_px[2, 1] == -lo[1]
    acc.add(0, disk_frames([(0, 0)] * 3))  # reads stay on the chip
    assert acc.frames_accepted == 3


def test_calibration_on_a_drifting_disk_is_not_smeared():
    """32 calibration frames over two scan rows, the disk moving 0.3 px per column: realigned,
    the mean pattern is nearly the still disk's (BF pixels at the plateau, the radius the same)
    and the drift is measured; averaged as they are, the disk would be smeared over 4.5 px
    (a third of its BF pixels lit only part of the time)."""
    positions = np.array([(r, c) for r in range(2) for c in range(16)])
    frames = disk_frames([(0.2 * r, 0.3 * c) for r, c in positions])
    still = calibrate(disk_frames([(0, 0)] * 32))
    drifting = calibrate(frames, positions=positions)
    blind = calibrate(frames)

    def lit(cal):
        return np.mean(cal.mean_pattern[tuple(cal.bf_pixels.T)] >= 19.0)

    assert drifting.radius_px == pytest.approx(still.radius_px, rel=0.03)
    assert lit(drifting) > 0.9 and lit(blind) < 0.75  # measured 0.92 (whole-px realignment), 0.70
    np.testing.assert_allclose(drifting.drift.per_step_px, [[0.2, 0.0], [0.0, 0.3]], atol=0.05)
    assert calibrate(disk_frames([(0, 0)] * 32), positions=positions).drift is None


def test_calibration_positions_follow_the_kernel():
    """The calibration frames' positions (`detectors.base.scan_position` of the index within
    its pass, as the series computes them) are where the kernel puts those frames."""
    idx = np.array([0, 3, 4, 7, 8 + 5])
    rows, cols = scan_position(idx % 8, (2, 4), "serpentine")
    assert np.column_stack([rows, cols]).tolist() == [[0, 0], [0, 3], [1, 3], [1, 0], [1, 2]]


def run(d, compensate, **kw):
    """The tutorial with descan `d`; the image by the linear model's sign flip in every run, so
    the comparisons are of the descan alone (a third-order term read at 3 sigma would switch
    one run to the full-chi image, `full_chi.py`)."""
    sim = Simulator(tutorial_config(descan_px_per_step=d, **kw))
    frames = sim.frames(0, sim.n_frames)
    settings = ProcessingSettings(compensate_descan=compensate,
                                  pipeline=PipelineSettings(full_chi=False))  # fmt: skip
    proc = SeriesProcessor(sim.series_info(1), settings)
    for first in range(0, len(frames), 64):
        proc.add(FrameBatch(1, first, frames[first : first + 64]))
    res = proc.solve(final=True)
    q_max = 2 * sim.cfg.semiangle_mrad * 1e-3 / sim.wavelength_A
    truth = sim.phase_on_grid(res.upsampling_factor, q_max)
    return proc, res, correlation(res.image, truth, 6 * res.upsampling_factor)


@pytest.fixture(scope="module")
def without_descan():
    return run((0.0, 0.0, 0.0, 0.0), False)


@pytest.mark.parametrize("d", [HALF_RADIUS, (0.1, 0.25, -0.2, 0.1)])
def test_half_a_radius_of_descan_is_recovered_and_compensated(d, without_descan):
    """Tutorial sample (disk radius 25.8 px, 100 e/A^2), a drift of 13-14 px over the scan.
    Measured: every per-step coefficient within 0.002 px/step (< 1 %) of the truth; image
    correlation with the true phase 0.569 and 0.558 against 0.553 without descan (0.04
    uncompensated); defocus within 1.2 %."""
    proc, res, corr = run(d, True)
    fit, truth = res.descan, np.reshape(d, (2, 2))
    assert fit.compensated and fit.order == 1 and fit.clipped == 0
    np.testing.assert_allclose(fit.per_step_px, truth, atol=0.05 * np.abs(truth).max())
    r, c = 23, 47
    true_drift = np.hypot(d[0] * r + d[1] * c, d[2] * r + d[3] * c)
    assert fit.drift_px() == pytest.approx(true_drift, rel=0.05)
    assert corr >= 0.97 * without_descan[2]
    assert res.aberrations.defocus_A == pytest.approx(15000.0, rel=0.03)
    # every position was read within a pixel of where its disk was
    grid = np.argwhere(np.ones((24, 48), bool))
    where = grid @ truth.T - grid[0] @ truth.T
    offset = fit.read_shift_px.reshape(-1, 2) - where
    assert np.ptp(offset, axis=0).max() <= 2  # (a constant: the calibration's reference)


def test_uncompensated_the_same_descan_ruins_the_image(without_descan):
    _, res, corr = run(HALF_RADIUS, False)
    assert not res.descan.compensated and corr < 0.3 * without_descan[2]


def test_live_the_model_moves_the_reads_of_positions_to_come():
    """After 9 of 24 rows the model is refitted and the last position (never acquired) is set
    to be read within a pixel of where the disk will be."""
    d = HALF_RADIUS
    sim = Simulator(tutorial_config(descan_px_per_step=d))
    proc = SeriesProcessor(sim.series_info(1), ProcessingSettings(compensate_descan=True))
    frames = sim.frames(0, 9 * 48)
    for first in range(0, len(frames), 48):
        proc.add(FrameBatch(1, first, frames[first : first + 48]))
    assert proc.descan.refits >= 2
    cal_ref = proc.calibration.drift.reference_pos
    last = np.array([23, 47]) - cal_ref
    want = np.reshape(d, (2, 2)) @ last
    np.testing.assert_allclose(proc.acc.read_shift_px[-1], want, atol=1.0)


def test_reconstruct_compensates_and_writes_it(tmp_path, capsys):
    sim = Simulator(tutorial_config(dose_e_per_A2=1000.0, descan_px_per_step=HALF_RADIUS))
    cfg, data, out = sim.cfg, tmp_path / "d.npy", tmp_path / "r.h5"
    write_dataset(str(data), cfg.scan_shape, cfg.detector_shape, cfg.dtype, sim.ground_truth(),
                  iter([(0, sim.frames(0, sim.n_frames))]))  # fmt: skip
    assert main(["reconstruct", str(data), "--output", str(out), "--compensate-descan"]) == 0
    assert "descan plane, drift 13 px (compensated)" in capsys.readouterr().err
    with h5py.File(out) as f:
        g = f["descan"]
        assert g.attrs["compensated"] and g.attrs["method"] == "centre of mass"
        assert g["read_shift_px"].shape == (*cfg.scan_shape, 2)
        np.testing.assert_allclose(g.attrs["per_step_px"], np.reshape(HALF_RADIUS, (2, 2)),
                                   atol=0.02)  # fmt: skip
    out2 = tmp_path / "r2.h5"
    assert main(["reconstruct", str(data), "--output", str(out2)]) == 0
    assert "--compensate-descan reads the BF pixels" in capsys.readouterr().err


def test_workers_with_compensation_are_refused(capsys):
    code = main(["run", "--protocol", "dectris-v1", "--workers", "2", "--compensate-descan",
                 "--output", "/tmp/never.h5"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--compensate-descan" in err and "Traceback" not in err
