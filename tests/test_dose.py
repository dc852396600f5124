"""Dose, beam current, alignment trust and FRC resolution against the simulator's truth."""

from dataclasses import replace

import h5py
import numpy as np
import pytest

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators.simulate import Simulator, tutorial_config
from tcbf_live.stream.cli.main import main
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf.alignment import AlignmentSettings
from tcbf_live.stream.tcbf.dose import (
    FRC_THRESHOLD,
    MIN_RING_PIXELS,
    beam_current_pA,
    dose_for_resolution,
    fourier_ring_correlation,
    half_bit_threshold,
)
from tcbf_live.stream.tcbf.pipeline import PipelineSettings


def feed(info, frames, prior=None, settings=None, batch=64):
    proc = SeriesProcessor(info, settings or ProcessingSettings())
    proc.add(FrameBatch(info.series_id, 0, frames[:64]))  # calibrates
    if prior is not None:  # a known shift model (e.g. from a previous scan of the area)
        proc.pipeline.matrix_px = prior.copy()
    for first in range(64, len(frames), batch):
        proc.add(FrameBatch(info.series_id, first, frames[first : first + batch]))
    return proc


@pytest.mark.parametrize("gain", [1.0, 7.5])
def test_dose_within_2_percent_counting_and_integrating_with_masked_pixels(gain):
    cfg = tutorial_config(scan_shape=(12, 16), counts_per_electron=gain, bad_pixels=12)
    sim = Simulator(cfg)
    frames = sim.frames(0, sim.n_frames)
    assert (frames == cfg.mask_value).any()  # hot pixels at 2^16 - 1 in every frame
    proc = feed(sim.series_info(1), frames)
    result = proc.result(final=True, complete=True)
    assert proc.calibration.mask.sum() == 12
    assert result.dose_e_per_A2 == pytest.approx(100.0, rel=0.02)
    electrons = 100.0 * cfg.step_A**2
    assert result.beam_current_pA == pytest.approx(electrons * 1.602177e-7 / cfg.dwell_s, rel=0.02)
    assert result.dose_map.mean() == pytest.approx(100.0, rel=0.02)
    assert np.all((result.bf_fraction > 0.5) & (result.bf_fraction <= 1.0))


def test_projected_dose_during_a_scan_and_over_repeat_passes():
    sim = Simulator(tutorial_config(scan_shape=(12, 16)))
    frames = sim.frames(0, sim.n_frames)
    half = feed(sim.series_info(1), frames[:96]).result()
    assert half.projected_dose_e_per_A2 == pytest.approx(100.0, rel=0.02)
    two_passes = replace(sim.series_info(1), frames_expected=2 * sim.n_frames)
    assert feed(two_passes, frames).result().projected_dose_e_per_A2 == pytest.approx(
        200.0, rel=0.02
    )


def test_beam_current_formula():
    assert beam_current_pA(6.2415, 1e-6) == pytest.approx(1.0, rel=1e-4)  # 1 pA x 1 us
    assert beam_current_pA(100, None) is None


def test_frc_of_independent_noise_stays_below_threshold():
    rng = np.random.default_rng(7)
    for shape in ((96, 192), (256, 256)):
        frc = fourier_ring_correlation(rng.standard_normal(shape), rng.standard_normal(shape), 2.0)
        judged = frc.n_pixels >= MIN_RING_PIXELS  # all but the lowest rings
        assert judged.sum() >= 0.5 * len(judged)
        assert np.all(np.abs(frc.frc[judged]) < FRC_THRESHOLD), frc.frc
        # the half-bit threshold accounts for ring size: noise stays below it everywhere
        assert np.all(frc.frc[1:] < half_bit_threshold(frc.n_pixels[1:]))
        same = fourier_ring_correlation(a := rng.standard_normal(shape), a + 0.1 *
                                        rng.standard_normal(shape), 2.0)  # fmt: skip
        assert np.all(same.frc > 0.9)
        d, limited = same.resolution_A()
        assert limited and d == pytest.approx(1 / same.q_per_A[-1])


def test_frc_crossing_and_half_bit():
    from tcbf_live.stream.tcbf.dose import FRC

    q = np.arange(1, 11) / 20.0
    frc = FRC(q, np.linspace(1.0, 0.0, 10), np.full(10, 1e6))
    d, limited = frc.resolution_A()
    # FRC falls 1/9 per ring; 0.143 is crossed between rings 7 and 8 (0.222 -> 0.111)
    assert not limited and 1 / d == pytest.approx(q[7] + (0.222222 - 0.143) / 0.111111 * 0.05)
    # a one-ring dip (a zero of sin chi) does not end the count; two rings below do
    dip = FRC(q, np.array([1.0, 0.9, 0.8, 0.05, 0.6, 0.5, 0.1, 0.05, 0.02, 0.0]), np.full(10, 1e6))
    d, _ = dip.resolution_A()
    assert 1 / d == pytest.approx(q[5] + (0.5 - 0.143) / 0.4 * 0.05)
    assert half_bit_threshold(np.array([1e12]))[0] == pytest.approx(0.2071 / 1.2071, rel=1e-4)

    assert half_bit_threshold(np.array([10.0]))[0] > 0.5


def test_an_frc_below_threshold_from_the_lowest_rings_gives_no_resolution():
    """The crossing lies among the skipped lowest rings: no resolution (NaN), never a number
    extrapolated from two rings that are both below it (this gave "resolution -119 A")."""
    from tcbf_live.stream.tcbf.dose import FRC

    q = np.arange(1, 11) / 20.0
    for low in ([0.9, 0.134, 0.133, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0],  # once -119 A
                [0.9, 0.12, 0.08, 0.05, 0.05, 0.02, 0.0, 0.0, 0.0, 0.0]):  # fmt: skip
        d, limited = FRC(q, np.array(low), np.full(10, 1e6)).resolution_A()
        assert np.isnan(d) and not limited


def test_the_low_frequency_gap_of_tcbf_is_not_the_resolution():
    """tcBF transfers little near q = 0 (sin chi ~ 0): on a large image several of the lowest
    rings fall in that gap and are below the threshold. The crossing is looked for only after
    the curve has risen above it (a 256x256 scan on a 64x64 detector said "278 A"); the range
    is where the curve one sigma up and down crosses."""
    from tcbf_live.stream.tcbf.dose import FRC

    q = np.arange(1, 13) / 40.0
    curve = np.array([0.5, -0.1, 0.0, 0.05, 0.4, 0.7, 0.8, 0.6, 0.3, 0.1, 0.05, 0.0])
    frc = FRC(q, curve, np.full(12, 400.0))  # sigma 0.05 per ring
    d, limited = frc.resolution_A()
    assert not limited and 1 / d == pytest.approx(q[8] + (0.3 - 0.143) / 0.2 * q[0])
    better, worse = frc.resolution_range_A()
    assert 1 / worse == pytest.approx(q[8] + (0.25 - 0.143) / 0.2 * q[0])
    assert 1 / better == pytest.approx(q[9] + (0.15 - 0.143) / 0.05 * q[0])
    assert better < d < worse
    # rings the transfer mask empties (n = 0 at the zeros of sin chi) are left out, not read
    # as "below": with one after every ring the answer is the same curve's
    gaps = FRC(np.arange(1, 25) / 80.0, np.ravel(np.column_stack([curve, np.zeros(12)])),
               np.ravel(np.column_stack([np.full(12, 400.0), np.zeros(12)])))  # fmt: skip
    assert 1 / gaps.resolution_A()[0] == pytest.approx(17 / 80 + (0.3 - 0.143) / 0.2 * 2 / 80)
    lo, hi = gaps.resolution_range_A()
    assert lo < gaps.resolution_A()[0] < hi


def test_resolution_vs_dose_is_monotone_within_its_range():
    """The tutorial sample scanned row by row: each update's resolution, with the range its
    FRC's noise allows, is never worse than an earlier one beyond both ranges (it jumped
    between 13 and 18 A before: a plateau of the FRC near 0.143 read as a single number)."""
    sim = Simulator(tutorial_config())
    proc = SeriesProcessor(sim.series_info(1), ProcessingSettings())
    cols = sim.cfg.scan_shape[1]
    for r0 in range(0, sim.cfg.scan_shape[0], 2):
        proc.add(FrameBatch(1, r0 * cols, sim.frames(r0 * cols, 2 * cols)))
        r = proc.solve(final=r0 + 2 >= sim.cfg.scan_shape[0])
    h = r.resolution_vs_dose
    assert h.shape[1] == 4 and len(h) >= 6 and np.all(np.diff(h[:, 0]) > 0)
    assert np.all((h[:, 2] <= h[:, 1]) & ((h[:, 1] <= h[:, 3]) | np.isnan(h[:, 3])))
    for j in range(1, len(h)):  # later: never worse than an earlier one beyond the ranges
        worst_before = np.nanmax(np.where(np.isnan(h[:j, 3]), np.inf, h[:j, 3]))
        assert h[j, 2] <= worst_before
    assert h[-1, 1] < 14.0  # measured 12.6 A at 100 e/A^2
    assert "(FRC 0.143; " in r.summary()


def test_dose_projection_from_a_power_law():
    doses = np.array([10.0, 30.0, 100.0, 300.0])
    history = np.column_stack([doses, 50.0 * doses**-0.5])
    assert dose_for_resolution(50.0 * 1000.0**-0.5, history) == pytest.approx(1000.0, rel=1e-6)
    assert dose_for_resolution(5.0, history[:1]) is None  # one point: no trend
    assert dose_for_resolution(5.0, np.column_stack([doses, np.full(4, 9.0)])) is None


@pytest.fixture(scope="module")
def high_dose():
    sim = Simulator(tutorial_config(dose_e_per_A2=1000.0))
    frames = sim.frames(0, sim.n_frames)
    proc = feed(sim.series_info(1), frames)
    return sim, frames, proc.solve(final=True)


def test_resolution_improves_with_dose(high_dose):
    """1000 e/A^2 simulated, 100 and 10 by binomial thinning of the counts (exact for counting
    detectors). 10 e/A^2 is too little for a first model, so all three use the 1000 e/A^2
    model as a prior: the test is of the resolution estimate, not of the alignment."""
    sim, frames, full = high_dose
    rng = np.random.default_rng(3)
    resolution = {1000.0: (full.resolution_A, full.resolution_half_bit_A)}
    for dose in (100.0, 10.0):
        thin = rng.binomial(frames, dose / 1000.0).astype(np.uint16)
        r = feed(sim.series_info(1), thin, prior=full.alignment.matrix_px).solve()
        assert not r.resolution_limited
        resolution[dose] = (r.resolution_A, r.resolution_half_bit_A)
    # measured: 10.4 / 12.9 / 20.5 A (0.143) and 10.6 / 15.0 / 24.5 A (half-bit)
    for k in (0, 1):
        assert resolution[1000.0][k] < resolution[100.0][k] < resolution[10.0][k]


def test_frc_of_pure_noise_halves_through_the_pipeline(high_dose):
    """A vacuum scan (no object): the two half reconstructions share no signal."""
    sim, _, full = high_dose
    vacuum = Simulator(tutorial_config(sample="random", phase_rms=1e-9))
    frames = vacuum.frames(0, vacuum.n_frames)
    r = feed(vacuum.series_info(1), frames, prior=full.alignment.matrix_px).solve()
    judged = r.frc.n_pixels >= MIN_RING_PIXELS  # rings with fewer pixels are noise-dominated
    assert judged.sum() >= 0.5 * len(judged)
    assert np.all(np.abs(r.frc.frc[judged]) < FRC_THRESHOLD), r.frc.frc
    assert np.all(r.frc.frc[1:] < half_bit_threshold(r.frc.n_pixels[1:]))
    # nothing to resolve: not determined (below the threshold from the lowest rings on), or a
    # coarse crossing among the lowest rings (few pixels), never a fine one
    assert r.resolution_A is None or r.resolution_A > 2 * full.resolution_A


def test_trust_switches_on_coarse_levels_first():
    sim = Simulator(tutorial_config())
    frames = sim.frames(0, sim.n_frames)
    early = PipelineSettings(alignment=AlignmentSettings(min_rows=2))  # judge from row 2 on
    proc = SeriesProcessor(sim.series_info(1), ProcessingSettings(pipeline=early))
    seen = []
    for first in range(0, len(frames), 48):
        proc.add(FrameBatch(1, first, frames[first : first + 48]))
        if proc.pipeline is None:  # not calibrated yet
            continue
        proc.solve()
        trust = proc.pipeline.last_trust
        if trust:
            seen.append(tuple(x.bin_px for x in trust if x.trusted))
            # dose needed grows toward finer levels; trusted ones need no more than now
            needed = [x.dose_needed_e_per_A2 for x in trust]
            assert needed == sorted(needed)
    assert seen[0] == (32,) and seen[-1] == (32, 16, 8)
    for before, after in zip(seen, seen[1:], strict=False):
        assert set(before) <= set(after)  # never lost
    for levels in seen:
        assert levels == tuple(sorted(levels, reverse=True)[: len(levels)])  # coarse first
        assert levels == (32, 16, 8, 4)[: len(levels)]


def test_run_summary_and_result_file_dose_group(tmp_path, capsys, high_dose):
    from tcbf_live.detectors.files import write_dataset

    sim, frames, _ = high_dose
    data = tmp_path / "d.npy"
    cfg = sim.cfg
    write_dataset(str(data), cfg.scan_shape, cfg.detector_shape, cfg.dtype, sim.ground_truth(),
                  iter([(0, frames)]))  # fmt: skip
    out = tmp_path / "r.h5"
    assert main(["reconstruct", str(data), "--target-resolution", "5", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("dose "))
    assert "e/A^2" in line and "pA" in line and "resolution" in line and "trusted bins" in line
    with h5py.File(out) as f:
        d = f["dose"]
        assert d.attrs["dose_e_per_A2"] == pytest.approx(1000.0, rel=0.02)
        assert d.attrs["beam_current_pA"] > 0 and np.isfinite(d.attrs["resolution_A"])
        assert d["frc"].shape[1] == 3 and d["resolution_vs_dose"].shape == (1, 4)
        assert d["trust"].shape == (4, 7) and d["map"].shape == cfg.scan_shape
        tiles = f["alignment/tiles"][()]  # per-tile peak quality of the last iteration
        assert tiles.shape[1] == 6 and np.all(tiles[tiles[:, 5] > 0, 4] >= 4.0)

        assert "dose_for_target_e_per_A2_estimate" in d.attrs  # one update: no trend (NaN)


def test_target_resolution_projection_live():
    sim = Simulator(tutorial_config())
    frames = sim.frames(0, sim.n_frames)
    settings = ProcessingSettings(pipeline=PipelineSettings(alignment=AlignmentSettings(),
                                                    target_resolution_A=8.0))  # fmt: skip
    proc = SeriesProcessor(sim.series_info(1), settings)
    for first in range(0, len(frames), 96):
        proc.add(FrameBatch(1, first, frames[first : first + 96]))
        r = proc.solve()
    assert r.resolution_vs_dose.shape[0] >= 3
    doses = r.resolution_vs_dose[:, 0]
    assert np.all(np.diff(doses) > 0)  # scan-average dose grows during the pass
    # measured: ~2.7e4 e/A^2 projected for 8 A, beyond the 100 e/A^2 spent (an estimate)
    assert r.dose_for_target_e_per_A2 is not None and r.dose_for_target_e_per_A2 > doses[-1]
    assert "8 A needs ~" in r.summary() and "(estimate)" in r.summary()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_float_intensities_without_a_counts_calibration_are_read_as_noiseless(dtype):
    """Noise-free simulated frames normalised to sum 1 (as simulations write them) were read
    as counts: a dose of 0.01 e/A^2, the schedule stopped at the coarsest levels and the
    defocus was several percent off; float16 was refused. Without a counts calibration they
    are read as noiseless (every level trusted, said so); measured: -0.06 % defocus."""
    from dataclasses import replace

    sim = Simulator(tutorial_config(noise=False))
    frames = sim.frames(0, sim.n_frames)
    frames = (frames / frames.sum(axis=(1, 2), keepdims=True)).astype(dtype)
    info = replace(sim.series_info(1), dtype=np.dtype(dtype).str)
    proc = SeriesProcessor(info, ProcessingSettings())
    proc.add(FrameBatch(1, 0, frames))
    r = proc.solve(final=True)
    assert r.noiseless and r.alignment.schedule[-1] == 4
    assert r.aberrations.defocus_A == pytest.approx(15000.0, rel=0.005)
    assert "read as noiseless" in r.summary()
    counts = SeriesProcessor(info, ProcessingSettings())  # whole numbers stored as floats
    counts.add(FrameBatch(1, 0, np.round(frames * 1e4).astype(dtype)))
    assert not counts.solve(final=True).noiseless
    stated = ProcessingSettings(metadata={"dose_e_per_A2": 100.0})  # --dose: the gain from it
    proc = SeriesProcessor(info, stated)
    proc.add(FrameBatch(1, 0, frames))
    r = proc.solve(final=True)
    assert not r.noiseless and r.screen is not None
    assert proc.result().dose_e_per_A2 == pytest.approx(100.0, rel=1e-3)
    assert r.aberrations.defocus_A == pytest.approx(15000.0, rel=0.01)


def test_reconstruct_with_a_stated_dose(tmp_path, capsys, expect_usage_error):
    """`reconstruct --dose 100` on noise-free frames normalised to sum 1: the file's dose is
    the stated one and the frames are not read as noiseless; a dose that is not positive is
    a usage error (one line, exit code 2)."""
    from tcbf_live.detectors.files import write_dataset

    sim = Simulator(tutorial_config(noise=False))
    cfg = sim.cfg
    frames = sim.frames(0, sim.n_frames)
    frames = (frames / frames.sum(axis=(1, 2), keepdims=True)).astype(np.float32)
    data, out = tmp_path / "sim.npy", tmp_path / "r.h5"
    write_dataset(str(data), cfg.scan_shape, cfg.detector_shape, np.float32, sim.ground_truth(),
                  iter([(0, frames)]))  # fmt: skip
    argv = ["reconstruct", str(data), "--energy", "300000", "--step", str(cfg.step_A),
            "--semiangle", "4", "--output", str(out)]  # fmt: skip
    assert main([*argv, "--dose", "100"]) == 0
    with h5py.File(out) as f:
        assert f["dose"].attrs["dose_e_per_A2"] == pytest.approx(100.0, rel=1e-3)
        assert f["aberrations"].attrs["defocus_A"] == pytest.approx(15000.0, rel=0.01)
    capsys.readouterr()
    expect_usage_error([*argv, "--dose", "-5", "--overwrite"])
    capsys.readouterr()
    expect_usage_error([*argv, "--dose", "100", "--counts-per-electron", "2", "--overwrite"])
