"""Higher-order aberration fit (`stream/tcbf/higher_order.py`) on shift fields with known
ground truth: exact recovery, uncertainties that cover the truth, withheld magnitudes."""

import math

import numpy as np
import pytest

from tcbf_live.simulators import Aberrations, Simulator, tutorial_config
from tcbf_live.stream.tcbf.higher_order import calibration_floor, fit_higher_order, higher_basis

TRUTH = Aberrations(C10_A=-15000.0, C12_A=300.0, phi12_rad=math.radians(25.0),
                    C21_A=3.0e5, phi21_rad=math.radians(-40.0), C23_A=1.5e5,
                    phi23_rad=math.radians(10.0), C30_A=2.0e7)  # fmt: skip


def field(ab: Aberrations, rotation=-15.0, transpose=False, radius_px=24, step=4):
    """Tile-like samples of the exact correction shifts (A, scan frame) over the BF disk:
    detector tilts (rad) every `step` px, and the simulator's truth."""
    sim = Simulator(tutorial_config(scan_shape=(2, 2), rotation_deg=rotation, aberrations=ab,
                                    transpose=transpose, noise=False))  # fmt: skip
    cx, cy = sim.cfg.resolved_center_px()
    rr, cc = np.mgrid[-radius_px : radius_px + 1 : step, -radius_px : radius_px + 1 : step]
    inside = rr**2 + cc**2 <= radius_px**2
    k = np.stack([rr[inside], cc[inside]], axis=1).astype(float)
    shifts_px = -np.array([sim.expected_shift_px(r + cx, c + cy) for r, c in k])
    alpha = k * sim.grid.angular_sampling_mrad * 1e-3
    return alpha, shifts_px * sim.cfg.step_A, sim


def test_gradients_are_those_of_the_simulator():
    """Each basis column is grad W of one unit coefficient (the simulator's own formula)."""
    rng = np.random.default_rng(1)
    alpha = rng.uniform(-0.004, 0.004, (50, 2))
    names = [("C21_A", "phi21_rad", 0.0), ("C21_A", "phi21_rad", math.pi / 2),
             ("C23_A", "phi23_rad", 0.0), ("C23_A", "phi23_rad", math.pi / 6),
             ("C30_A", None, 0.0)]  # fmt: skip
    basis = higher_basis(alpha)
    for j, (mag, angle, phi) in enumerate(names):
        ab = Aberrations(C10_A=0.0, **{mag: 1.0}, **({angle: phi} if angle else {}))
        expect = np.stack(ab.shift_A(alpha[:, 0], alpha[:, 1]), axis=1)
        np.testing.assert_allclose(basis[:, :, j], expect, atol=1e-15)


@pytest.mark.parametrize("rotation,transpose", [(-15.0, False), (130.0, True)])
def test_exact_field_recovers_every_coefficient(rotation, transpose):
    alpha, shifts, _ = field(TRUTH, rotation, transpose)
    fit = fit_higher_order(alpha, shifts, np.ones(len(alpha)), transpose,
                           math.radians(rotation + 20))  # the linear fit's, roughly
    c = fit.coefficients()
    assert c["C10"].value_A == pytest.approx(TRUTH.C10_A, rel=1e-6)
    for name in ("C12", "C21", "C23"):
        assert c[name].value_A == pytest.approx(getattr(TRUTH, f"{name}_A"), rel=1e-6)
        m = {"C12": 2, "C21": 1, "C23": 3}[name]
        d = m * (c[name].angle_rad - getattr(TRUTH, f"phi{name[1:]}_rad"))
        assert math.remainder(d, 2 * math.pi) == pytest.approx(0.0, abs=1e-5)
    assert c["C30"].value_A == pytest.approx(TRUTH.C30_A, rel=1e-6)
    assert math.remainder(fit.rotation_rad - math.radians(rotation), 2 * math.pi) == \
        pytest.approx(0.0, abs=1e-6)  # fmt: skip
    np.testing.assert_allclose(fit.shifts_A(alpha), shifts, atol=1e-6 * np.abs(shifts).max())
    assert fit.correlation(0, 7) < -0.9  # C10 and C30 nearly collinear over the disk


def test_uncertainties_cover_the_truth_and_noise_is_withheld():
    """Noisy fields (0.1 scan px per tile): >= 90 % of the truths within 2 sigma, none beyond
    4; coefficients the data do not determine are withheld with a bound that holds."""
    alpha, exact, sim = field(TRUTH)
    noise_A = 0.1 * sim.cfg.step_A
    rng = np.random.default_rng(7)
    z = []
    for _ in range(40):
        fit = fit_higher_order(alpha, exact + rng.normal(0, noise_A, exact.shape),
                               np.ones(len(alpha)), False, -0.2)  # fmt: skip
        truth = [TRUTH.C10_A, TRUTH.C12_A, TRUTH.C21_A, TRUTH.C23_A, TRUTH.C30_A]
        for t, co in zip(truth, fit.coefficients().values(), strict=True):
            z.append(abs(co.value_A - t) / co.error_A)
    z = np.array(z)
    assert np.mean(z <= 2) >= 0.9 and z.max() < 4
    flat = Aberrations(C10_A=-15000.0)
    alpha, exact, _ = field(flat)
    fit = fit_higher_order(alpha, exact + rng.normal(0, noise_A, exact.shape),
                           np.ones(len(alpha)), False, -0.2)  # fmt: skip
    c = fit.coefficients()
    for name in ("C21", "C23"):
        assert not c[name].determined and math.isnan(c[name].angle_rad)
        assert c[name].bound_A > 0
        assert math.isnan(fit.polar_dict()[name])


def test_too_few_tiles_give_no_fit_and_the_calibration_floor_grows_with_the_order():
    alpha, exact, _ = field(TRUTH, step=12)
    assert fit_higher_order(alpha[:11], exact[:11], np.ones(11), False, 0.0) is None
    assert calibration_floor("C10", 0.01) == pytest.approx(0.0099, abs=1e-4)
    assert calibration_floor("C30", 0.01) == pytest.approx(0.0294, abs=1e-4)


def third_order_case(edge_px: float, dose: float, full_chi: bool = True,
                     transfer_fit: str = "determined"):  # fmt: skip
    """The tutorial's optics (4 mrad, 10.7 A steps) with coma, trefoil and Cs each moving the
    disk edge by `edge_px` scan px (large coefficients: the tutorial's small angles), C12 and
    rotation as well; aligned and fitted as `reconstruct` does."""
    from tcbf_live.detectors.base import FrameBatch
    from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
    from tcbf_live.stream.tcbf.updates import PipelineSettings

    a, step = 4e-3, 256 / 24
    ab = Aberrations(C10_A=-15000.0, C12_A=100.0, phi12_rad=0.3,
                     C21_A=edge_px * step / a**2, phi21_rad=math.radians(-40.0),
                     C23_A=edge_px * step / a**2, phi23_rad=math.radians(10.0),
                     C30_A=edge_px * step / a**3)  # fmt: skip
    sim = Simulator(tutorial_config(scan_shape=(48, 48), aberrations=ab, dose_e_per_A2=dose))
    settings = ProcessingSettings(pipeline=PipelineSettings(full_chi=full_chi,
                                                            transfer_fit=transfer_fit))  # fmt: skip
    proc = SeriesProcessor(sim.series_info(1), settings)
    proc.add(FrameBatch(1, 0, sim.frames(0, sim.n_frames)))
    return ab, proc.solve(final=True), sim


def angle_miss_rad(co, ab: Aberrations, m: int) -> float:
    """m (phi measured - phi true), wrapped to (-pi, pi]: what the issue's 0.1 rad bounds."""
    truth = getattr(ab, f"phi{co.name[1:]}_rad")
    return m * math.remainder(co.angle_rad - truth, 2 * math.pi / m)


def magnitude_recovered(co, ab: Aberrations, rel: float, n_sigma: float) -> None:
    """The coefficient `co` is determined, within `rel` of the truth and `n_sigma` of its
    reported error."""
    truth = getattr(ab, f"{co.name}_A")
    assert co.determined
    assert co.value_A == pytest.approx(truth, rel=rel)
    assert abs(co.value_A - truth) < n_sigma * co.error_A


@pytest.mark.parametrize("edge_px,tolerance", [(1.0, 0.15), (0.3, 0.35)])
def test_simulated_coma_trefoil_and_cs_are_recovered(edge_px, tolerance):
    """Magnitudes within 15 % where a term moves the disk edge by 1 px, 35 % at 0.3 px; angles
    within m |dphi| <= 0.1 rad at 1 px (at 0.3 px coma's angle has a sigma of 8.6 degrees, more
    than the 5.7 degrees asked: within 3 sigma there); every truth within 4 reported sigma
    (measured: docs/tcbf.md)."""
    ab, result, _ = third_order_case(edge_px, 1e4)
    c = result.higher.coefficients()
    for name, m in (("C21", 1), ("C23", 3), ("C30", 0)):
        magnitude_recovered(c[name], ab, tolerance, 4)
        if m:
            d = angle_miss_rad(c[name], ab, m)
            assert abs(d) <= (0.1 if edge_px >= 1 else 3 * m * c[name].angle_error_rad)
            assert abs(d) < 4 * m * c[name].angle_error_rad
    assert abs(c["C10"].value_A - ab.C10_A) < 4 * c["C10"].error_A
    assert "third order: C21" in result.summary()
    assert result.higher.method == "transfer"  # refitted on the pixels' transfer at the end


def test_with_the_transfer_fit_off_the_tiles_shift_fit_stands():
    """`--transfer-fit off`: the tiles' shift fit is the result (it is right at the
    tutorial's 4 mrad, docs/tcbf.md), marked as such in the result file's attributes."""
    ab, result, _ = third_order_case(1.0, 1e4, full_chi=False, transfer_fit="off")
    hi = result.higher
    assert hi.method == "tiles" and hi.file_attributes()["third_order_method"] == "tiles"
    assert hi.coefficients()["C23"].value_A == pytest.approx(ab.C23_A, rel=0.15)
    assert "from the pixels' transfer" not in result.summary()


@pytest.mark.parametrize("dose", [1e4, 100.0])
def test_the_linear_fit_reports_errors_that_cover_the_truth(dose):
    """Defocus, C12 and rotation with 1-sigma errors from the tiles' scatter: the truth within
    3 sigma (measured on the tutorial: 0.0-2.1 sigma over 1e4, 1e3 and 100 e/A^2)."""
    from tcbf_live.detectors.base import FrameBatch
    from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor

    sim = Simulator(tutorial_config(dose_e_per_A2=dose))
    proc = SeriesProcessor(sim.series_info(1), ProcessingSettings())
    proc.add(FrameBatch(1, 0, sim.frames(0, sim.n_frames)))
    r = proc.solve(final=True)
    ab, e = r.aberrations, r.aberrations.errors
    assert 0 < e["C10_A"] < 0.02 * 15000
    assert abs(ab.defocus_A - 15000.0) < 3 * e["C10_A"]
    assert abs(ab.C12_A) < 3 * e["C12_A"]  # none in the truth
    assert abs(math.remainder(ab.rotation_rad - math.radians(-15.0), 2 * math.pi)) < \
        3 * e["rotation_rad"]  # fmt: skip
    assert "(1 sigma: defocus" in r.summary()


def test_the_defocus_error_covers_a_coarse_schedule_bias():
    """The weak-phase case (20 mrad, 150 A defocus) at 3e4 e/A^2 aligns only to bin 8 and reads
    its defocus ~3 % high; the statistical sigma alone (0.9 A) put the truth 5.5 sigma away.
    With the tile-size floor it is within 2 sigma."""
    from tcbf_live.detectors.base import FrameBatch
    from tcbf_live.simulators.simulate import weak_phase_config
    from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
    from tcbf_live.stream.tcbf.alignment import AlignmentSettings
    from tcbf_live.stream.tcbf.pipeline import PipelineSettings

    sim = Simulator(weak_phase_config(dose_e_per_A2=3e4))
    settings = ProcessingSettings(pipeline=PipelineSettings(
        alignment=AlignmentSettings(defocus_sign=+1)))  # fmt: skip
    proc = SeriesProcessor(sim.series_info(1), settings)
    proc.add(FrameBatch(1, 0, sim.frames(0, sim.n_frames)))
    ab = proc.solve(final=True).aberrations
    assert abs(ab.defocus_A - 150.0) < 2 * ab.errors["C10_A"]
    assert ab.errors["C10_A"] < 0.05 * 150.0


def test_the_transfer_of_a_quadratic_chi_is_sin_chi():
    """`kernels.weak_phase_transfer` for a pure C10/C12 chi, pixels well inside the aperture
    and small q: the shifted BF pixel's transfer is sin chi(q) (the linear sign flip's),
    imaginary 0."""
    from tcbf_live.stream.tcbf.chi_kernels import weak_phase_transfer
    from tcbf_live.stream.tcbf.optics import quadratic_chi, wavelength_A

    lam, c = wavelength_A(300e3), np.array([-15000.0, 300.0, -200.0, 0, 0, 0, 0, 0])
    p = np.array([[c[0] + c[1], c[2]], [c[2], c[0] - c[1]]])
    alpha = np.array([[0.0, 0.0], [1e-3, -0.5e-3], [-0.8e-3, 0.6e-3]])
    shape, sampling = (32, 32), 4.0
    q0, q1 = np.fft.fftfreq(32, sampling), np.fft.fftfreq(32, sampling)
    out = np.zeros(shape, complex)
    weak_phase_transfer(q0, q1, alpha, alpha @ p.T, c, lam, 1.0, out)  # a wide aperture: no edge
    chi, _ = quadratic_chi(shape, sampling, lam, p)
    np.testing.assert_allclose(out.real / len(alpha), np.sin(chi), atol=1e-9)
    np.testing.assert_allclose(out.imag, 0.0, atol=1e-9)


def test_the_final_image_uses_the_full_chi_and_is_closer_to_the_truth():
    """Coma, trefoil and Cs each moving the disk edge by 1 px: the final image corrected with
    the full fitted chi (`full_chi.py`) correlates better with the true phase than the
    linear model's sign flip of the same data (measured 0.677 against 0.628)."""
    from tcbf_live.stream.tcbf.optics import information_limit_per_A

    _, result, sim = third_order_case(1.0, 1e4)
    _, linear, _ = third_order_case(1.0, 1e4, full_chi=False, transfer_fit="off")
    assert result.chi_model == "third order" and "third order chi" in result.summary()
    assert linear.chi_model == "linear"
    f = result.upsampling_factor
    truth = sim.phase_on_grid(f, information_limit_per_A(sim.cfg.semiangle_mrad,
                                                         sim.wavelength_A))  # fmt: skip

    def best_correlation(image):
        b = 6 * f
        return max(np.corrcoef(np.roll(image, (dy, dx), (0, 1))[b:-b, b:-b].ravel(),
                               truth[b:-b, b:-b].ravel())[0, 1]
                   for dy in range(-2 * f, 2 * f + 1, 2) for dx in range(-2 * f, 2 * f + 1, 2))

    full, lin = best_correlation(result.image), best_correlation(linear.image)
    assert full > lin + 0.02 and full > 0.65, (full, lin)


def test_a_thin_live_model_has_errors_that_cover_the_truth():
    """The tutorial's first 8-16 rows: the live model rests on 4 tiles (2 degrees of freedom),
    its errors carry Student's factor; over 4 noise realisations x 3 partial scans the true
    defocus and rotation are within 2 reported sigma in >= 90 % of cases, none beyond 4
    (measured 23 of 24, the worst 2.5 sigma)."""
    from dataclasses import replace

    from tcbf_live.detectors.base import FrameBatch
    from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor

    z = []
    for seed in range(4):
        sim = Simulator(replace(tutorial_config(), seed=seed))
        for rows in (8, 12, 16):
            proc = SeriesProcessor(sim.series_info(1), ProcessingSettings())
            proc.add(FrameBatch(1, 0, sim.frames(0, rows * 48)))
            r = proc.solve()
            ab, e = r.aberrations, r.aberrations.errors
            assert e and int(np.count_nonzero(r.alignment.iterations[-1].measured_weights)) >= 4
            assert "unknown" not in ab.errors_text()
            z += [(ab.defocus_A - 15000.0) / e["C10_A"],
                  (ab.rotation_rad - math.radians(-15.0)) / e["rotation_rad"]]  # fmt: skip
    z = np.abs(z)
    assert np.mean(z <= 2) >= 0.9 and z.max() < 4, np.round(z, 2)
