"""The simulator's ground truth is what every later accuracy test trusts: check it here."""

import json
import math

import numpy as np
import pytest

from tcbf_live.simulators import Aberrations, SimulationError, Simulator, tutorial_config
from tcbf_live.stream.tcbf.registration import register_shift

# noise-free, periodic, band-limited sample: vBF images are exact translated copies
EXACT = dict(
    scan_shape=(32, 32),
    noise=False,
    sample="random",
    feature_A=20.0,
    periodic_sample=True,
)
PIXELS = [(13, 0), (0, 13), (9, 9), (-13, 0), (-6, 11), (4, -17), (-10, -10)]


def measured_and_expected(sim):
    cube = sim.datacube()
    ci, cj = (int(v) for v in sim.cfg.resolved_center_px())
    axial = cube[:, :, ci, cj]
    e0 = np.array(sim.expected_shift_px(ci, cj))
    meas, expd = [], []
    for di, dj in PIXELS:
        meas.append(register_shift(axial, cube[:, :, ci + di, cj + dj], upsample=100))
        expd.append(np.array(sim.expected_shift_px(ci + di, cj + dj)) - e0)
    return np.array(meas), np.array(expd)


@pytest.fixture(scope="module")
def unrotated():
    return measured_and_expected(Simulator(tutorial_config(rotation_deg=0.0, **EXACT)))


def test_vbf_shift_matches_defocus_physics(unrotated):
    meas, expd = unrotated
    # content of the vBF image at +alpha moves by +defocus*alpha/step (tcbf-physics 3.3)
    assert np.all(np.abs(expd).max(axis=1) > 1.0)
    np.testing.assert_allclose(meas, expd, atol=0.05)
    assert expd[0, 0] == pytest.approx(15000 * 13 * 0.15381e-3 / (256 / 24), rel=1e-3)


def test_vbf_shift_matches_astigmatism_physics():
    ab = Aberrations(C10_A=-8000.0, C12_A=3000.0, phi12_rad=math.radians(20))
    meas, expd = measured_and_expected(
        Simulator(tutorial_config(rotation_deg=0.0, aberrations=ab, **EXACT))
    )
    np.testing.assert_allclose(meas, expd, atol=0.05)


def _angle_deg(u, v):
    """Best rotation angle taking vectors u onto v (rows, cols treated as x, y)."""
    cross = np.sum(u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0])
    dot = np.sum(u * v)
    return math.degrees(math.atan2(cross, dot))


@pytest.mark.parametrize("rotation", [-15.0, 40.0])
def test_rotation_rotates_shift_field(unrotated, rotation):
    sim = Simulator(tutorial_config(rotation_deg=rotation, **EXACT))
    meas, expd = measured_and_expected(sim)
    np.testing.assert_allclose(meas, expd, atol=0.05)
    assert _angle_deg(unrotated[0], meas) == pytest.approx(rotation, abs=0.5)


def test_transpose_mirrors_shift_field(unrotated):
    meas, _ = measured_and_expected(
        Simulator(tutorial_config(rotation_deg=0.0, transpose=True, **EXACT))
    )
    np.testing.assert_allclose(meas, unrotated[0][:, ::-1], atol=0.05)


def small(**kw):
    """Cheap geometry (64^2 detector, small defocus) for statistics tests."""
    base = dict(
        scan_shape=(12, 12),
        step_A=5.0,
        detector_shape=(64, 64),
        angular_sampling_mrad=0.3,
        aberrations=Aberrations.from_defocus(2000.0),
        rotation_deg=0.0,
        dose_e_per_A2=40.0,
        sample="random",
    )
    return tutorial_config(**{**base, **kw})


def test_mean_electrons_per_frame_match_dose():
    sim = Simulator(small())
    cube = sim.datacube().astype(np.float64)
    expected = 40.0 * 5.0**2  # dose x step^2 = 1000 e
    per_frame = cube.sum(axis=(2, 3))
    # weak phase object on a detector 2.5x the BF disk: essentially nothing escapes
    noise_free = Simulator(small(noise=False)).datacube().sum(axis=(2, 3))
    assert noise_free.mean() == pytest.approx(expected, rel=2e-3)
    sigma = math.sqrt(expected / per_frame.size)
    assert abs(per_frame.mean() - noise_free.mean()) < 4 * sigma
    # per-frame spread is Poisson: var = mean
    assert per_frame.var() == pytest.approx(expected, rel=0.25)


def test_poisson_statistics_per_pixel():
    sim = Simulator(small(phase_rms=0.0, scan_shape=(40, 40)))
    cube = sim.datacube().reshape(1600, -1).astype(np.float64)
    mean = cube.mean(axis=0)
    bf = mean > 0.5 * mean.max()
    ratio = cube[:, bf].var(axis=0).mean() / mean[bf].mean()
    assert ratio == pytest.approx(1.0, abs=0.05)


def test_gain_scales_counts_and_variance():
    gain = 7.5
    sim = Simulator(small(phase_rms=0.0, scan_shape=(40, 40), counts_per_electron=gain))
    ref = Simulator(small(phase_rms=0.0, scan_shape=(40, 40)))
    counts = sim.datacube().reshape(1600, -1).astype(np.float64)
    electrons = ref.datacube().reshape(1600, -1).astype(np.float64)
    assert counts.sum() / electrons.sum() == pytest.approx(gain, rel=0.01)
    bf = electrons.mean(axis=0) > 0.5 * electrons.mean(axis=0).max()
    # integrating detector: var(counts) = gain * mean(counts)
    assert counts[:, bf].var(axis=0).mean() / counts[:, bf].mean() == pytest.approx(gain, rel=0.1)


def test_bad_pixels_carry_mask_value_and_saturation_clips():
    sim = Simulator(small(bits=8, bad_pixels=25, dose_e_per_A2=20000.0))
    cube = sim.datacube().reshape(144, -1)
    truth = sim.ground_truth()
    assert truth["mask_value"] == 255 and cube.dtype == np.uint8
    bad = np.array(truth["bad_pixels"])
    assert bad.size == 25
    assert np.all(cube[:, bad] == 255)
    others = np.delete(cube, bad, axis=1)
    assert others.max() == 254  # saturated pixels clip below the mask value


def test_descan_moves_disk_linearly():
    sim = Simulator(small(descan_px_per_step=(0.5, 0.0, 0.0, -0.25), phase_rms=0.0, noise=False))
    cube = sim.datacube().astype(np.float64)
    q = np.arange(cube.shape[2])
    total = cube.sum(axis=(2, 3))
    com_r = (cube.sum(axis=3) * q).sum(axis=2) / total
    com_c = (cube.sum(axis=2) * q).sum(axis=2) / total
    assert com_r[11, 0] - com_r[0, 0] == pytest.approx(0.5 * 11, abs=0.02)
    assert com_c[0, 11] - com_c[0, 0] == pytest.approx(-0.25 * 11, abs=0.02)
    assert abs(com_c[11, 0] - com_c[0, 0]) < 0.02


def test_lazy_batches_match_and_serpentine_order():
    sim = Simulator(small(scan_order="serpentine"))
    whole = sim.frames(0, sim.n_frames)
    batched = np.concatenate([f for _, f in sim.iter_batches(7)])
    np.testing.assert_array_equal(whole, batched)  # noise does not depend on batching
    cube = sim.datacube()
    np.testing.assert_array_equal(cube[1, 11], whole[12])  # row 1 runs backwards
    np.testing.assert_array_equal(cube[1, 0], whole[23])


def test_ground_truth_travels_and_is_serialisable():
    sim = Simulator(tutorial_config())
    gt = sim.ground_truth()
    json.dumps(gt)
    assert gt["defocus_A"] == 15000.0 and gt["rotation_deg"] == -15.0
    assert gt["scan_shape"] == [24, 48] and gt["detector_shape"] == [128, 128]
    assert gt["angular_sampling_mrad"] == pytest.approx(0.154, rel=2e-3)
    assert gt["semiangle_mrad"] / gt["angular_sampling_mrad"] == pytest.approx(26, abs=0.5)
    assert sim.series_info(7).ground_truth["seed"] == 0


def test_tutorial_bf_disk_radius():
    sim = Simulator(tutorial_config(scan_shape=(4, 4), noise=False))
    mean = sim.datacube().mean(axis=(0, 1))
    area = np.count_nonzero(mean > 0.5 * mean.max())
    assert math.sqrt(area / math.pi) == pytest.approx(26.0, abs=0.7)


@pytest.mark.parametrize(
    "kw",
    [
        dict(semiangle_mrad=30.0),  # disk larger than the detector
        dict(center_px=(10.0, 64.0)),  # disk off the detector edge
        dict(descan_px_per_step=(3.0, 0, 0, 0)),  # drifts off the detector
        dict(step_A=-1.0),
        dict(bits=12),
        dict(sample="cheese"),
        dict(noise=False, bad_pixels=3),
    ],
)
def test_impossible_settings_are_rejected(kw):
    with pytest.raises(SimulationError):
        Simulator(tutorial_config(**kw))


def test_sample_presets_have_expected_character():
    from tcbf_live.simulators.samples import make_phase

    gold = make_phase("gold-fiducials", (600, 600), 1.0, 300e3, seed=1)
    apo = make_phase("apoferritin-like", (600, 600), 1.0, 300e3, seed=1)
    rnd = make_phase("random", (300, 300), 1.0, 300e3, seed=1)
    assert gold.max() - np.median(gold) > 0.5  # strong particles
    assert 0.02 < apo.std() < 0.3 and apo.max() - np.median(apo) < 0.6  # weak object
    assert rnd.std() == pytest.approx(0.1, rel=0.1)
    scaled = make_phase("apoferritin-like", (300, 300), 1.0, 300e3, seed=1, phase_rms=0.04)
    assert scaled.std() == pytest.approx(0.04, rel=1e-3)


def test_true_phase_is_registered_to_the_scan_grid():
    """A point-like scatterer placed at scan position (i0, j0) of the true-phase grid lights up
    the dark field exactly there: probe positions and `phase_on_scan_grid` agree."""
    sim = Simulator(small(scan_shape=(21, 21), step_A=4.0, aberrations=Aberrations(), noise=False))
    i0, j0 = 8, 13
    m, o = sim.grid.fine_per_step, sim.grid.window_px // 2
    y, x = np.mgrid[: sim.phase.shape[0], : sim.phase.shape[1]] * sim.grid.pixel_A
    cy, cx = (o + i0 * m) * sim.grid.pixel_A, (o + j0 * m) * sim.grid.pixel_A
    sim.phase = (0.5 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 3.0**2))).astype(np.float32)
    sim.transmission = np.exp(1j * sim.phase).astype(np.complex64)
    phase = sim.phase_on_scan_grid()
    assert np.unravel_index(np.argmax(phase), phase.shape) == (i0, j0)
    cube = sim.datacube()
    ccx, ccy = sim.cfg.resolved_center_px()
    r, c = np.mgrid[: cube.shape[2], : cube.shape[3]]
    outside = np.hypot(r - ccx, c - ccy) > 1.3 * 4.0 / sim.grid.angular_sampling_mrad
    df = cube[:, :, outside].sum(-1).astype(np.float64)
    df[df < 0.05 * df.max()] = 0.0  # probe tails elsewhere would bias the centroid
    rows, cols = np.mgrid[: df.shape[0], : df.shape[1]]
    centroid = (float((df * rows).sum() / df.sum()), float((df * cols).sum() / df.sum()))
    assert centroid == pytest.approx((i0, j0), abs=0.05)


def test_pacer_holds_the_rate_without_drift():
    """A fake clock: frames go out at start + n / rate; time lost to a slow send is caught
    up (no sleep while behind), never carried forward; rate 0 never waits."""
    from tcbf_live.simulators.pacing import Pacer

    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    pacer = Pacer(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        pacer.wait(10)  # batches of 10 frames at 1000 fps: one every 10 ms
        now[0] += 0.002  # the send itself takes 2 ms
    assert pacer.frames == 100
    assert slept[0] == pytest.approx(0.010) and slept[1] == pytest.approx(0.008)
    assert now[0] == pytest.approx(100.0 + 0.100 + 0.002)  # 100 frames in 100 ms, no drift
    now[0] += 0.050  # a 50 ms stall: the next 5 batches are due already
    slept.clear()
    for _ in range(5):
        pacer.wait(10)
    assert slept == [] and pacer.frames == 150
    pacer.wait(10)
    assert slept == [pytest.approx(0.160 - 0.152)]
    unlimited = Pacer(0.0, clock=lambda: now[0], sleep=sleep)
    unlimited.wait(1000)
    assert unlimited.frames == 1000 and len(slept) == 1
