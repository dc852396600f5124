"""Depth sections (`stream/tcbf/depth.py`): the image refocused by changes of defocus, and a
sharpness figure that finds the plane where the sample is (simulator ground truth)."""

from dataclasses import replace

import h5py
import numpy as np
import pytest

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators.simulate import Simulator, tutorial_config
from tcbf_live.stream.cli.main import main
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf import depth
from tcbf_live.stream.tcbf.updates import PipelineSettings

OFFSETS = tuple(np.arange(-4000.0, 4001.0, 500.0))


@pytest.fixture(scope="module")
def solved():
    sim = Simulator(tutorial_config(dose_e_per_A2=1000.0))
    frames = sim.frames(0, sim.n_frames)
    settings = ProcessingSettings(pipeline=PipelineSettings(depth_offsets_A=OFFSETS))
    proc = SeriesProcessor(sim.series_info(1), settings)
    proc.add(FrameBatch(1, 0, frames))
    return sim, frames, proc, proc.solve(final=True)


def test_offsets_parse_and_refuse():
    assert depth.parse_offsets("-200:200:50") == tuple(np.arange(-200.0, 201.0, 50.0))
    assert depth.parse_offsets("0,-100,250.5") == (0.0, -100.0, 250.5)
    for bad in ("1:2", "5:-5:1", "0:10:0", "a,b", "0:1e9:1", "nan", ""):
        with pytest.raises(ValueError):
            depth.parse_offsets(bad)


def test_the_sharpest_section_is_the_fitted_focus(solved):
    """The fit's defocus is right (within 1 % of the truth): the sharpest section is at 0."""
    sim, _, _, r = solved
    assert r.aberrations.defocus_A == pytest.approx(sim.cfg.aberrations.defocus_A, rel=0.01)
    d = r.depth
    assert d.images.shape == (len(OFFSETS), *r.image.shape)
    assert d.depth_of_field_A == pytest.approx(
        sim.wavelength_A / (sim.cfg.semiangle_mrad * 1e-3) ** 2, rel=1e-6)  # fmt: skip
    assert abs(d.sharpest_offset_A) <= 500.0
    assert d.sharpness.max() > 1.5 * max(d.sharpness[0], d.sharpness[-1])  # +-4000 A: blurred
    np.testing.assert_allclose(d.images[OFFSETS.index(0.0)], r.image, atol=1e-5)


@pytest.mark.parametrize("error_A", [-2000.0, 1500.0])
def test_a_user_reads_the_height_from_the_sections(solved, error_A):
    """Sections around a focus that is off by `error_A` (C10 too large by it): the sharpest
    is the section that undoes it, within one offset step."""
    _, _, proc, r = solved
    pl, fit = proc.pipeline, r.aberrations
    inputs = proc.inputs()
    inputs = replace(inputs, exposure=pl.screen(inputs).exposure)
    alpha_rad = pl.k_px * pl.sampling_mrad * 1e-3
    wrong_shifts = depth.section_shifts_px(
        r.shifts_px, alpha_rad, fit, -error_A, pl.acquisition.step_A
    )
    wrong_fit = replace(fit, C10_A=fit.C10_A + error_A)
    d = depth.depth_sections(inputs.stack, pl.exposure(inputs), pl.scan_shape, pl.upsampling,
                             wrong_shifts, alpha_rad, wrong_fit, pl.acquisition.step_A,
                             pl.wavelength_A, pl.acquisition.semiangle_mrad, OFFSETS,
                             pl.shift_and_add.half, pl.bad_px)  # fmt: skip
    assert abs(d.sharpest_offset_A - error_A) <= 500.0, (d.sharpest_offset_A, d.sharpness)


def test_reconstruct_writes_the_sections(solved, tmp_path, capsys, expect_usage_error):
    from tcbf_live.detectors.files import write_dataset

    sim, frames, _, _ = solved
    data, out = tmp_path / "d.npy", tmp_path / "r.h5"
    cfg = sim.cfg
    write_dataset(str(data), cfg.scan_shape, cfg.detector_shape, cfg.dtype, sim.ground_truth(),
                  iter([(0, frames)]))  # fmt: skip
    assert main(["reconstruct", str(data), "--depth-sections", "-1000:1000:500",
                 "--output", str(out)]) == 0  # fmt: skip
    assert "sharpest at" in capsys.readouterr().err
    with h5py.File(out) as f:
        ds = f["tcbf/depth_sections"]
        assert ds.shape == (5, *f["tcbf/image"].shape)
        np.testing.assert_array_equal(ds.attrs["offsets_A"], [-1000, -500, 0, 500, 1000])
        assert ds.attrs["sharpness"].shape == (5,) and ds.attrs["depth_of_field_A"] > 0
        assert abs(ds.attrs["sharpest_offset_A"]) <= 500
    for bad in ("0:1", "x", "1:0:1"):
        expect_usage_error(["reconstruct", str(data), "--depth-sections", bad,
                            "--output", str(tmp_path / "x.h5")])  # fmt: skip
