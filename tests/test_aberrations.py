"""Aberration fit from shift fields with known ground truth (simulator geometry)."""

import math

import numpy as np
import pytest

from tcbf_live.simulators import Aberrations, Simulator, tutorial_config
from tcbf_live.stream.tcbf.aberrations import decompose, fit_aberrations
from tcbf_live.stream.tcbf.registration import register_shift


def analytic_field(sim, radius_px=24):
    """Detector-frame tilts (mrad) of BF pixels and their exact correction shifts (px)."""
    cx, cy = sim.cfg.resolved_center_px()
    rr, cc = np.mgrid[-radius_px : radius_px + 1, -radius_px : radius_px + 1]
    inside = rr**2 + cc**2 <= radius_px**2
    pix = np.stack([rr[inside] + cx, cc[inside] + cy], axis=1)
    alpha = (pix - [cx, cy]) * sim.grid.angular_sampling_mrad
    shifts = -np.array([sim.expected_shift_px(r, c) for r, c in pix])  # correction = -raw
    return alpha, shifts


@pytest.mark.parametrize(
    "rotation,transpose,c12,phi12",
    [(-15.0, False, 0.0, 0.0), (40.0, False, 40.0, 20.0), (-120.0, True, 900.0, -35.0),
     (170.0, True, 40.0, 80.0)],
)  # fmt: skip
def test_exact_field_recovers_geometry(rotation, transpose, c12, phi12):
    ab = Aberrations(C10_A=-15000.0, C12_A=c12, phi12_rad=math.radians(phi12))
    sim = Simulator(tutorial_config(scan_shape=(2, 2), rotation_deg=rotation, transpose=transpose,
                                    aberrations=ab, noise=False))  # fmt: skip
    alpha, shifts = analytic_field(sim)
    fit = fit_aberrations(alpha, shifts, sim.cfg.step_A, defocus_sign=+1)
    assert fit.defocus_A == pytest.approx(15000.0, rel=1e-6)
    assert math.degrees(fit.rotation_rad) == pytest.approx(rotation, abs=1e-4)
    assert fit.transpose == transpose
    assert fit.C12_A == pytest.approx(c12, abs=1e-3)
    if c12:
        d = math.degrees(fit.phi12_rad) - phi12
        assert (d + 90) % 180 - 90 == pytest.approx(0.0, abs=1e-3)
    assert fit.residual_px < 1e-9
    np.testing.assert_allclose(fit.shifts_px(alpha, sim.cfg.step_A), shifts, atol=1e-9)


def test_defocus_sign_resolves_the_180_degree_ambiguity():
    sim = Simulator(tutorial_config(scan_shape=(2, 2), rotation_deg=-15.0, noise=False))
    alpha, shifts = analytic_field(sim)
    plus = fit_aberrations(alpha, shifts, sim.cfg.step_A, defocus_sign=+1)
    minus = fit_aberrations(alpha, shifts, sim.cfg.step_A, defocus_sign=-1)
    folded = fit_aberrations(alpha, shifts, sim.cfg.step_A)
    assert plus.defocus_A == pytest.approx(15000.0) and minus.defocus_A == pytest.approx(-15000.0)
    assert math.degrees(minus.rotation_rad - plus.rotation_rad) % 360 == pytest.approx(180.0)
    # same shifts either way: the data cannot tell, only the hint can
    np.testing.assert_allclose(plus.matrix_A_per_rad, minus.matrix_A_per_rad)
    assert -90 < math.degrees(folded.rotation_rad) <= 90
    with pytest.raises(ValueError):
        decompose(np.eye(2), defocus_sign=2)


def test_measured_vbf_shifts_give_defocus_and_rotation():
    """Registration of single-pixel vBF images (noise-free) -> fit -> ground truth."""
    cfg = tutorial_config(scan_shape=(32, 32), rotation_deg=-15.0, noise=False, sample="random",
                          feature_A=20.0, periodic_sample=True)  # fmt: skip
    sim = Simulator(cfg)
    cube = sim.datacube()
    ci, cj = (int(v) for v in sim.cfg.resolved_center_px())
    axial = cube[:, :, ci, cj]
    offsets = [(di, dj) for di in range(-18, 19, 6) for dj in range(-18, 19, 6)
               if 0 < di * di + dj * dj <= 20**2]  # fmt: skip
    raw = np.array([register_shift(axial, cube[:, :, ci + di, cj + dj], 50) for di, dj in offsets])
    alpha = np.array(offsets) * sim.grid.angular_sampling_mrad
    fit = fit_aberrations(alpha, -raw, sim.cfg.step_A, defocus_sign=+1)
    assert fit.defocus_A == pytest.approx(15000.0, rel=0.005)
    assert math.degrees(fit.rotation_rad) == pytest.approx(-15.0, abs=0.1)
    assert not fit.transpose and fit.C12_A < 0.005 * 15000


def test_one_shift_model_fit_in_px_and_in_A_per_rad():
    """The alignment's fit (scan px per detector px) converted to A per rad is the fit in A
    per rad: one model, one fit, two unit systems (`optics.matrix_A_per_rad`)."""
    from tcbf_live.stream.tcbf.aberrations import fit_shift_matrix
    from tcbf_live.stream.tcbf.optics import alpha_rad, matrix_A_per_rad
    from tcbf_live.stream.tcbf.shift_model import fit_matrix

    rng = np.random.default_rng(2)
    k_px = rng.uniform(-20, 20, (60, 2))
    m_px = np.array([[0.3, -0.08], [0.1, 0.28]])
    shifts = k_px @ m_px.T + rng.normal(0, 0.01, (60, 2))
    step, sampling = 0.6, 0.25
    fit_px = fit_matrix(k_px, shifts, np.ones(60))
    m_a, resid = fit_shift_matrix(alpha_rad(k_px, sampling) * 1e3, shifts, step)
    np.testing.assert_allclose(matrix_A_per_rad(fit_px, step, sampling), m_a, rtol=1e-10)
    assert 0.005 < resid < 0.03
    with pytest.raises(ValueError):  # collinear tilts determine no model
        fit_shift_matrix(np.outer(np.arange(1.0, 6.0), [1.0, 2.0]), np.ones((5, 2)), step)


@pytest.mark.parametrize("transpose", [False, True])
def test_polar_decomposition_recovers_rotation_and_symmetric_part(transpose):
    from tcbf_live.stream.tcbf.shift_model import TRANSPOSE, polar_decomposition

    theta = math.radians(-33.0)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    p = np.array([[1.2e4 + 300.0, 150.0], [150.0, 1.2e4 - 300.0]])
    m = p @ rot @ (TRANSPOSE if transpose else np.eye(2))
    got_theta, got_p = polar_decomposition(m, transpose)
    assert got_theta == pytest.approx(theta, abs=1e-12)
    np.testing.assert_allclose(got_p, p, rtol=1e-12)
