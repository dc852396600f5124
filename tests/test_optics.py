import numpy as np
import pytest

from tcbf_live.simulators.optics import Aberrations, interaction_constant, wavelength_A
from tcbf_live.stream.tcbf import optics


def test_wavelength_and_interaction_constant_at_300kV():
    assert wavelength_A(300e3) == pytest.approx(0.019687, abs=2e-6)
    assert interaction_constant(300e3) == pytest.approx(6.53e-4, rel=5e-3)


def test_shift_is_gradient_of_W():
    ab = Aberrations(
        C10_A=-12000, C12_A=800, phi12_rad=0.3, C21_A=5e4, phi21_rad=-1.1,
        C23_A=3e4, phi23_rad=0.7, C30_A=2e6,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    ax, ay = rng.uniform(-4e-3, 4e-3, (2, 50))
    h = 1e-8
    gx = (ab.W_A(ax + h, ay) - ab.W_A(ax - h, ay)) / (2 * h)
    gy = (ab.W_A(ax, ay + h) - ab.W_A(ax, ay - h)) / (2 * h)
    sx, sy = ab.shift_A(ax, ay)
    np.testing.assert_allclose(sx, gx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sy, gy, rtol=1e-5, atol=1e-4)


def test_defocus_sign_convention():
    ab = Aberrations.from_defocus(1.5e4)
    assert ab.C10_A == -1.5e4 and ab.defocus_A == 1.5e4
    # |shift| = |defocus| * alpha: 60 A at 4 mrad (tutorial max parallax)
    sx, sy = ab.shift_A(4e-3, 0.0)
    assert sx == pytest.approx(-60.0) and sy == 0.0
    assert ab.max_shift_A(4e-3) == pytest.approx(60.0)


# ---------------------------------------------------------- the science core's own optics
def core_keys(ab: Aberrations) -> dict[str, float]:
    """The simulator's aberrations as py4DSTEM-style polar keys."""
    return {k.removesuffix("_A").removesuffix("_rad"): v for k, v in ab.as_dict().items()}


def random_aberrations(rng) -> Aberrations:
    return Aberrations(
        C10_A=rng.uniform(-3e4, 3e4), C12_A=rng.uniform(0, 2e3), phi12_rad=rng.uniform(-3, 3),
        C21_A=rng.uniform(0, 1e5), phi21_rad=rng.uniform(-3, 3), C23_A=rng.uniform(0, 5e4),
        phi23_rad=rng.uniform(-3, 3), C30_A=rng.uniform(-5e6, 5e6),
    )  # fmt: skip


@pytest.mark.parametrize("energy_eV", [60e3, 80e3, 120e3, 200e3, 300e3])
def test_core_wavelength_agrees_with_the_simulator(energy_eV):
    assert optics.wavelength_A(energy_eV) == pytest.approx(wavelength_A(energy_eV), rel=1e-9)
    # and with h c / sqrt(E (2 m c^2 + E)) from CODATA constants (the rounded ones: 3e-6)
    codata = 12398.419843320026 / np.sqrt(energy_eV * (2 * 510998.95 + energy_eV))
    assert optics.wavelength_A(energy_eV) == pytest.approx(codata, rel=1e-5)


def test_core_wavelength_textbook_value():
    assert optics.wavelength_A(300e3) == pytest.approx(0.019687, abs=1e-6)
    assert optics.wavelength_A(200e3) == pytest.approx(0.025079, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_core_chi_and_gradient_agree_with_the_simulator(seed):
    rng = np.random.default_rng(seed)
    ab = random_aberrations(rng)
    ax, ay = rng.uniform(-25e-3, 25e-3, (2, 200))
    lam = optics.wavelength_A(300e3)
    np.testing.assert_allclose(optics.chi_rad(ax, ay, lam, core_keys(ab)),
                               ab.chi_rad(ax, ay, lam), rtol=1e-9, atol=1e-9)  # fmt: skip
    for core, sim in zip(optics.correction_shift_A(ax, ay, core_keys(ab)), ab.shift_A(ax, ay),
                         strict=True):  # fmt: skip
        np.testing.assert_allclose(core, sim, rtol=1e-9, atol=1e-9)


def test_core_gradient_is_the_gradient_of_chi():
    keys = {"C10": -1.2e4, "C12": 600.0, "phi12": 0.4, "C21": 4e4, "phi21": 1.0, "C30": 1e6,
            "C32": 2e5, "phi32": -0.3, "C34": 1e5, "phi34": 0.2}  # fmt: skip
    rng = np.random.default_rng(5)
    ax, ay = rng.uniform(-8e-3, 8e-3, (2, 50))
    h = 1e-8
    w = optics.wave_aberration_A
    gx = (w(ax + h, ay, keys) - w(ax - h, ay, keys)) / (2 * h)
    gy = (w(ax, ay + h, keys) - w(ax, ay - h, keys)) / (2 * h)
    sx, sy = optics.correction_shift_A(ax, ay, keys)
    np.testing.assert_allclose(sx, gx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sy, gy, rtol=1e-5, atol=1e-4)


def test_core_defocus_alias_and_sign():
    # C10 = -defocus: a positive defocus gives a correction shift against alpha
    sx, sy = optics.correction_shift_A(4e-3, 0.0, {"defocus": 1.5e4})
    assert sx == pytest.approx(-60.0) and sy == 0.0
    with pytest.raises(ValueError):
        optics.chi_rad(0.0, 0.0, 0.02, {"Cs": 1.0})


def test_quadratic_chi_is_chi_of_defocus_and_astigmatism():
    lam, sampling = optics.wavelength_A(300e3), 0.7
    keys = {"C10": -9000.0, "C12": 300.0, "phi12": 0.6}
    a, b = 300.0 * np.cos(1.2), 300.0 * np.sin(1.2)
    p = np.array([[-9000.0 + a, b], [b, -9000.0 - a]])
    chi, _ = optics.quadratic_chi((16, 20), sampling, lam, p)
    q0 = np.fft.fftfreq(16, sampling)[:, None]
    q1 = np.fft.fftfreq(20, sampling)[None, :]
    np.testing.assert_allclose(chi, optics.chi_rad(lam * q0, lam * q1, lam, keys),
                               rtol=1e-9, atol=1e-9)  # fmt: skip


def test_unit_helpers():
    k = np.array([[3.0, -4.0]])
    np.testing.assert_allclose(optics.alpha_rad(k, 0.25), [[0.75e-3, -1e-3]])
    m = optics.matrix_A_per_rad(np.eye(2), 0.5, 0.25)  # 1 scan px per det px
    np.testing.assert_allclose(optics.alpha_rad(k, 0.25) @ m.T, k * 0.5)
    assert optics.information_limit_per_A(20.0, 0.02) == pytest.approx(2.0)
    assert optics.information_limit_per_A(None, 0.02) is None
