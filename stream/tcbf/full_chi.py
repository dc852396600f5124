"""The tcBF image with the full fitted chi (third order), for the final update.

With chi quadratic, every BF pixel's image, once shifted by grad W, has the same transfer
sin chi(q), so one sign flip of the summed image corrects it (`reconstruction.phase_flip`).
With coma, three-fold astigmatism or spherical aberration it does not: after the shift, the
weak-phase transfer of the BF pixel at scan-frame tilt a is (tcbf-physics.md sect. 3; the
derivation of Yu et al., Ultramicroscopy 2024, for any chi)

    S_a(q) = (i/2) [A(a + l q) exp(-i D+(q)) - A(a - l q) exp(+i D-(q))],
    D+-(q) = chi(a +- l q) - chi(a) -+ 2 pi q . s_a,

(l the wavelength, A the aperture, s_a the shift applied), equal to sin chi(q) for a quadratic
chi. It varies across the disk, and a sum over the whole disk cancels where the pixels'
transfers disagree: one filter of the summed image (tried: correlation with the true phase
0.58 against 0.63 for the linear sign flip) is not enough. So the disk is split into groups
of neighbouring BF pixels (about 30, tiles of a third of the disk radius), each group is
shift-and-added with the model's shifts (`ShiftAndAdd`, one channel per group), its transfer S_g
is the mean of S_a over its pixels, and the groups are combined in Fourier space by their
transfers, a Wiener filter:

    image(q) = sum_g n_g S_g(q) I_g(q) / (sum_g n_g |S_g(q)|^2 + WIENER max(...)),

band-limited to 2 alpha / l. Measured on the third-order case of tests/test_higher_order.py
(docs/tcbf.md): 0.675 against 0.628 for the linear model's sign flip, and 0.656 for this
combination with the linear model (the grouping gains 0.03, the full chi 0.02 more).
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from tcbf_live.stream.tcbf.chi_kernels import weak_phase_transfer
from tcbf_live.stream.tcbf.reconstruction import ShiftAndAdd

GROUPS_PER_RADIUS = 2.6  # group tile size = disk radius / this (about 30 groups)
MAX_GROUP_BYTES = 128 << 20  # the per-group accumulators (num and den, float64)
TRANSFER_EVALUATIONS = 8e6  # pixel x frequency evaluations of S_a (about 0.4 s on one core)
WIENER = 0.05  # regularisation, relative to the largest summed |S_g|^2


def pixel_groups(k_px: np.ndarray, radius_px: float, max_groups: int) -> np.ndarray:
    """Group index (N_bf,) of square tiles of about radius / GROUPS_PER_RADIUS detector px,
    coarser where `max_groups` is smaller than that gives."""
    size = max(radius_px / GROUPS_PER_RADIUS, 1.0)
    while True:
        _, group = np.unique(np.floor(k_px / size), axis=0, return_inverse=True)
        if group.max() < max_groups:
            return group.ravel().astype(np.int64)
        size *= 1.25


def full_chi_image(stack: np.ndarray, exposure: np.ndarray, scan_shape: tuple[int, int],
                   factor: int, shifts_px: np.ndarray, alpha_rad: np.ndarray,
                   coefficients_A: np.ndarray, k_px: np.ndarray, excluded: np.ndarray,
                   step_A: float, wavelength_A: float, semiangle_rad: float, q_max_per_A: float,
                   weight: np.ndarray) -> np.ndarray:  # fmt: skip
    """The grouped, transfer-weighted image (module doc) of the stack: `shifts_px` the model's
    shifts (N_bf, 2) scan px, `alpha_rad` the BF pixels' scan-frame tilts, `coefficients_A`
    the cartesian set (8,), `k_px` their detector positions (grouping), `excluded` pixels
    left out, `weight` the coverage (0..1) the result is tapered and masked with."""
    shape = (scan_shape[0] * factor, scan_shape[1] * factor)
    per_group = 2 * shape[0] * shape[1] * 8
    groups = pixel_groups(k_px, float(np.hypot(*k_px.T).max()),
                          max(2, min(64, MAX_GROUP_BYTES // per_group)))  # fmt: skip
    n_groups = int(groups.max()) + 1
    saa = ShiftAndAdd(scan_shape, factor, 0.0, groups)  # one channel per group
    saa.update(stack, exposure, shifts_px, excluded_px=excluded)
    sampling = step_A / factor
    q0, q1 = sfft.fftfreq(shape[0], sampling), sfft.rfftfreq(shape[1], sampling)
    per_pixel = max(1, int(TRANSFER_EVALUATIONS / (q0.size * q1.size * n_groups)))
    shifts_A = np.asarray(shifts_px, float) * step_A
    inside = weight > 0.5
    total = np.zeros((q0.size, q1.size), complex)
    power = np.zeros((q0.size, q1.size))
    for g in range(n_groups):
        members = np.flatnonzero((groups == g) & ~excluded)
        if members.size == 0:
            continue
        pick = members[np.linspace(0, members.size - 1, min(per_pixel, members.size)).astype(int)]
        s_g = np.zeros((q0.size, q1.size), complex)
        weak_phase_transfer(q0, q1, np.ascontiguousarray(alpha_rad[pick], float), shifts_A[pick],
                  np.asarray(coefficients_A, float), wavelength_A, semiangle_rad, s_g)  # fmt: skip
        s_g /= pick.size
        image = saa.channel_image(g)
        centred = (image - image[inside].mean()) * weight if inside.any() else image - 1.0
        total += members.size * s_g * sfft.rfft2(centred, workers=1)
        power += members.size * np.abs(s_g) ** 2
    out = total / (power + WIENER * max(float(power.max()), 1e-30))
    q = np.hypot(q0[:, None], q1[None, :])
    out[q > q_max_per_A] = 0.0
    out[0, 0] = 0.0
    image = sfft.irfft2(out, s=shape, workers=1).astype(np.float32)
    return image * inside
