import numpy as np
import pytest

from tcbf_live.simulators.optics import Aberrations, interaction_constant, wavelength_A


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
