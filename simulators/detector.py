"""Detector response: fine diffraction intensity -> detector pixels -> counts.

The exit-wave FFT lives on a fine reciprocal grid `oversample` times finer than the detector.
A precomputed lookup (detector pixel -> weighted fine pixels) integrates each detector pixel
over its area after the detector-to-scan rotation/transpose, so rotation costs no per-frame
interpolation setup. The numba kernel then adds Poisson noise, gain, saturation and masked pixels
in one pass.
"""

from __future__ import annotations

import numba
import numpy as np


def build_detector_lut(
    detector_shape: tuple[int, int],
    center_px: tuple[float, float],
    fine_size: int,
    oversample: int,
    det_to_scan: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (index, weight), each (Qx*Qy, oversample**2 * 4), into an *unshifted* fine FFT.

    Detector pixel d (relative to `center_px`, detector frame) sees the scan-frame reciprocal
    position det_to_scan @ d; each pixel is integrated at oversample**2 sub-points, each
    bilinearly interpolated. Sub-points outside the fine grid get weight 0.
    """
    qx, qy = detector_shape
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    u = np.arange(qx)[:, None, None, None] - center_px[0] + sub[None, None, :, None]
    v = np.arange(qy)[None, :, None, None] - center_px[1] + sub[None, None, None, :]
    u, v = np.broadcast_arrays(u, v)
    fx = oversample * (det_to_scan[0, 0] * u + det_to_scan[0, 1] * v) + fine_size // 2
    fy = oversample * (det_to_scan[1, 0] * u + det_to_scan[1, 1] * v) + fine_size // 2
    fx = fx.reshape(qx * qy, -1)
    fy = fy.reshape(qx * qy, -1)
    x0 = np.floor(fx).astype(np.int64)
    y0 = np.floor(fy).astype(np.int64)
    tx = fx - x0
    ty = fy - y0
    idx, wts = [], []
    for dx, wx in ((0, 1.0 - tx), (1, tx)):
        for dy, wy in ((0, 1.0 - ty), (1, ty)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < fine_size) & (yi >= 0) & (yi < fine_size)
            # fine grid is stored unshifted: centred index c -> (c - N//2) mod N
            xs = (xi - fine_size // 2) % fine_size
            ys = (yi - fine_size // 2) % fine_size
            idx.append(np.where(inside, xs * fine_size + ys, 0))
            wts.append(np.where(inside, wx * wy, 0.0))
    return _merge_duplicates(np.concatenate(idx, axis=1), np.concatenate(wts, axis=1))


def _merge_duplicates(idx: np.ndarray, wts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum weights of repeated fine pixels per row and drop zero weights (smaller, faster LUT)."""
    order = np.argsort(idx, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    wts = np.take_along_axis(wts, order, axis=1)
    rows, width = idx.shape
    new_group = np.ones_like(idx, dtype=bool)
    new_group[:, 1:] = idx[:, 1:] != idx[:, :-1]
    group = np.cumsum(new_group, axis=1) - 1
    out_w = np.zeros((rows, width))
    np.add.at(out_w, (np.repeat(np.arange(rows), width), group.ravel()), wts.ravel())
    out_i = np.zeros((rows, width), np.int64)
    out_i[np.repeat(np.arange(rows), width), group.ravel()] = idx.ravel()
    keep = int(max(1, np.max(np.sum(out_w != 0, axis=1))))
    # move non-zero weights first so the kernel's loop can stay short
    nz_order = np.argsort(out_w == 0, axis=1, kind="stable")
    out_w = np.take_along_axis(out_w, nz_order, axis=1)[:, :keep]
    out_i = np.take_along_axis(out_i, nz_order, axis=1)[:, :keep]
    return out_i.astype(np.int32), out_w.astype(np.float32)


@numba.njit(nogil=True, cache=True)
def _splitmix(x: np.uint64) -> np.uint64:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def _poisson(lam: float) -> float:
    """Poisson draw: one-uniform CDF inversion for small means, numba's sampler otherwise."""
    if lam <= 0.0:
        return 0.0
    if lam > 20.0:
        return float(np.random.poisson(lam))  # noqa: NPY002 (numba RNG)
    u = np.random.random()  # noqa: NPY002 (numba RNG, seeded per frame)
    p = np.exp(-lam)
    cdf = p
    k = 0
    while u > cdf and k < 200:
        k += 1
        p *= lam / k
        cdf += p
    return float(k)


@numba.njit(nogil=True, cache=True)
def detect_batch(
    fine: np.ndarray,
    lut_index: np.ndarray,
    lut_weight: np.ndarray,
    electrons: np.ndarray,
    gain: float,
    noise: bool,
    seed: np.int64,
    frame_ids: np.ndarray,
    max_count: float,
    bad_pixels: np.ndarray,
    bad_value: float,
    out: np.ndarray,
) -> None:
    """Fill `out` (B, Qx*Qy) from the complex exit-wave spectra `fine` (B, N*N).

    Expected counts = electrons[b] * |F|^2 integrated over the pixel. With `noise`, each frame
    draws Poisson electrons from its own stream seeded by (seed, frame id), so the result does
    not depend on batching; counts = gain * electrons, rounded with uniform dither (unbiased),
    clipped to `max_count`.
    """
    nb, npx = out.shape
    nk = lut_index.shape[1]
    for b in range(nb):
        if noise:
            s = _splitmix(np.uint64(seed) * np.uint64(0x100000001B3) + np.uint64(frame_ids[b]))
            np.random.seed(np.int64(s & np.uint64(0xFFFFFFFF)))  # noqa: NPY002
        e = electrons[b]
        for p in range(npx):
            acc = 0.0
            for j in range(nk):
                w = lut_weight[p, j]
                if w != 0.0:
                    z = fine[b, lut_index[p, j]]
                    acc += w * (z.real * z.real + z.imag * z.imag)
            lam = acc * e
            if noise:
                val = _poisson(lam)
                if gain != 1.0:  # analog signal -> ADU with dithered (unbiased) rounding
                    val = np.floor(gain * val + np.random.random())  # noqa: NPY002
            else:
                val = gain * lam
            if val > max_count:
                val = max_count
            out[b, p] = val
        for k in range(bad_pixels.shape[0]):
            out[b, bad_pixels[k]] = bad_value
