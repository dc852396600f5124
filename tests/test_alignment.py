"""Alignment and reconstruction numerics on small synthetic arrays (no simulator)."""

import numpy as np
import pytest
import scipy.fft as sfft

from tcbf_live.stream.tcbf.alignment import AlignmentSettings, align, choose_schedule
from tcbf_live.stream.tcbf.kernels import deposit
from tcbf_live.stream.tcbf.optics import quadratic_chi
from tcbf_live.stream.tcbf.reconstruction import (
    ShiftAndAdd,
    default_upsampling,
    phase_flip,
    splat_weights,
)
from tcbf_live.stream.tcbf.shift_model import fit_matrix, robust_fit
from tcbf_live.stream.tcbf.tiles import PixelGroups, TileSet


def smooth_field(shape, length_px, rng):
    q2 = sfft.fftfreq(shape[0])[:, None] ** 2 + sfft.fftfreq(shape[1])[None, :] ** 2
    spec = sfft.fft2(rng.standard_normal(shape)) * np.exp(-2 * np.pi**2 * length_px**2 * q2)
    f = sfft.ifft2(spec).real
    return f / f.std()


def fourier_shift(img, shift):
    q0 = sfft.fftfreq(img.shape[0])[:, None]
    q1 = sfft.fftfreq(img.shape[1])[None, :]
    return sfft.ifft2(sfft.fft2(img) * np.exp(-2j * np.pi * (q0 * shift[0] + q1 * shift[1]))).real


def tile_set(matrix, bin_px=8, radius=26, shape=(48, 64), electrons=1e7, rows=None, seed=0):
    """Tiles of a disk whose images are one periodic object shifted by -M k (raw
    displacement), with Poisson noise for `electrons` per tile image."""
    rng = np.random.default_rng(seed)
    obj = 1.0 + 0.05 * smooth_field(shape, 1.5, rng)
    labels = [(a, b) for a in range(-4, 4) for b in range(-4, 4)
              if np.hypot(a * bin_px + bin_px / 2, b * bin_px + bin_px / 2) < radius]  # fmt: skip
    labels = np.array(labels)
    k = labels * bin_px + bin_px / 2.0
    per_px = electrons / (shape[0] * shape[1])
    images = np.stack([fourier_shift(obj, -(matrix @ kk)) for kk in k]) * per_px
    images = rng.poisson(np.clip(images, 0, None)).astype(np.float32)
    valid = np.ones(shape, bool)
    if rows is not None:
        valid[rows:] = False
        images[:, rows:] = 0
    n = len(k)
    return TileSet(bin_px, images, valid, k, np.full(n, electrons), np.full(n, bin_px**2),
                   labels, float(radius))  # fmt: skip


def rotation(deg, scale):
    t = np.radians(deg)
    return scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


@pytest.mark.parametrize("deg, scale", [(-15.0, -0.22), (40.0, 0.3), (170.0, -0.15)])
def test_cold_start_recovers_the_shift_matrix(deg, scale):
    m = rotation(deg, scale)
    tiles = tile_set(m, seed=int(deg) % 7)
    st = AlignmentSettings(bins=(8, 8))
    res = align({8: tiles}, st)
    assert res.converged
    assert res.schedule[0] == 8 and len(res.iterations) == 3  # pair estimate + 2 iterations
    np.testing.assert_allclose(res.matrix_px, m, atol=0.01)
    assert res.errors_px[-1] < 0.1


def test_transposed_detector_gives_a_negative_determinant():
    m = rotation(25.0, -0.2) @ np.array([[0.0, 1.0], [1.0, 0.0]])
    res = align({8: tile_set(m)}, AlignmentSettings(bins=(8,)))
    np.testing.assert_allclose(res.matrix_px, m, atol=0.01)
    assert np.linalg.det(res.matrix_px) < 0


class Moved:
    """A tile source as from per-pixel data: every tile image moved by its model shift."""

    def __init__(self, move):
        self.move = move

    def tile_images(self, bin_px, model):
        return self.move(model), model


def test_partial_scan_uses_only_the_acquired_rows():
    m = rotation(-15.0, -0.22)
    tiles = tile_set(m, rows=30)  # 30 of 48 rows acquired, the rest zeros

    def move(model):  # positions nothing moved into hold the mean (see tiles.PixelGroups)
        out = []
        for img, k in zip(tiles.images, tiles.k_px, strict=True):
            filled = img.copy()
            filled[30:] = img[:30].mean()
            out.append(fourier_shift(filled, model @ k))
        moved = np.stack(out)
        moved[:, 30:] = 0
        return moved

    res = align({8: tiles}, AlignmentSettings(bins=(8, 8, 8)), pixels=Moved(move))
    np.testing.assert_allclose(res.matrix_px, m, atol=0.005)
    # tile sums moved by Fourier ramps carry their window along: pulled toward zero shift
    plain = align({8: tiles}, AlignmentSettings(bins=(8, 8, 8)))
    assert abs(plain.matrix_px[0, 0]) < abs(res.matrix_px[0, 0])


def test_pure_noise_gives_no_model():
    tiles = tile_set(np.zeros((2, 2)), electrons=1e7)
    rng = np.random.default_rng(3)
    noise = rng.poisson(1e7 / tiles.images[0].size, tiles.images.shape).astype(np.float32)
    res = align({8: TileSet(8, noise, tiles.valid, tiles.k_px, tiles.electrons, tiles.n_pixels,
                            tiles.labels, 26.0)}, AlignmentSettings(bins=(8,)))  # fmt: skip
    assert not res.converged and res.iterations == ()


def test_warm_start_refines_a_perturbed_model():
    m = rotation(-15.0, -0.22)
    start = m * 1.05 + np.array([[0.0, 0.01], [-0.01, 0.0]])  # 0.3 px off at the disk edge
    tiles = tile_set(m)

    def move(model):  # tiles re-formed with every image moved by the model
        return np.stack([fourier_shift(img, model @ k) for img, k in
                         zip(tiles.images, tiles.k_px, strict=True)])  # fmt: skip

    res = align({8: tiles}, AlignmentSettings(bins=(8, 8)), matrix_px=start, pixels=Moved(move))

    assert [it.bin_px for it in res.iterations] == [8, 8]  # no pair estimate: model known
    assert res.iterations[-1].used.sum() >= 10
    assert res.errors_px[-1] < 0.1
    np.testing.assert_allclose(res.matrix_px, m, atol=0.005)


def test_two_tiles_or_collinear_tiles_never_give_a_model():
    k = np.array([[10.0, 10.0], [-10.0, -10.0], [5.0, 5.1]])
    s = k @ rotation(10, -0.2).T
    assert fit_matrix(k[:2], s[:2], np.ones(2)) is None  # exactly determined: unchecked
    assert fit_matrix(k, s, np.ones(3)) is None  # nearly collinear


def test_robust_fit_drops_outliers():
    rng = np.random.default_rng(1)
    k = rng.uniform(-20, 20, (40, 2))
    m = rotation(10, -0.3)
    s = k @ m.T + rng.normal(0, 0.02, (40, 2))
    s[:4] += 5.0
    fit, used, err = robust_fit(k, s, np.ones(40), np.zeros((2, 2)))
    np.testing.assert_allclose(fit, m, atol=0.005)
    assert not used[:4].any() and used[4:].all() and err < 0.05


def test_schedule_deepens_coarse_levels_first_as_dose_grows():
    def level(b, n, electrons):
        k = np.zeros((n, 2))
        return TileSet(b, np.zeros((n, 4, 4)), np.ones((4, 4), bool), k,
                       np.full(n, electrons), np.full(n, b * b))  # fmt: skip

    st = AlignmentSettings()
    seen = []
    for total in (1e5, 1e6, 5e6, 2e7, 1e9):  # electrons in the whole BF disk
        levels = {32: level(32, 4, total / 4), 16: level(16, 16, total / 16),
                  8: level(8, 48, total / 48)}  # fmt: skip
        seen.append(choose_schedule(levels, st))
    assert seen == [(), (32, 32), (32, 32, 16, 16), (32, 32, 16, 16, 8, 8),
                    (32, 32, 16, 16, 8, 8)]  # fmt: skip
    assert choose_schedule(levels, AlignmentSettings(bins=(32, 16, 16))) == (32, 16, 16)


# ------------------------------------------------------------------------- reconstruction
def test_deposit_matches_a_numpy_bilinear_splat():
    rng = np.random.default_rng(0)
    rows, cols, n_bf, f = 5, 6, 7, 3
    stack = rng.integers(0, 50, (rows * cols, n_bf)).astype(np.uint16)
    hits = rng.integers(0, 3, rows * cols).astype(np.uint32)
    shifts = rng.uniform(-2, 2, (n_bf, 2))
    gain = rng.uniform(0.5, 2, n_bf)
    offsets, weights = splat_weights(shifts * f)
    half = np.arange(n_bf) % 2
    halves_num = np.zeros((rows * f, cols * f, 2))
    halves_den = np.zeros_like(halves_num)
    deposit(stack, hits, np.arange(rows * cols), cols, f, offsets, weights, 1 / gain, half,
            halves_num, halves_den)  # fmt: skip
    for h in (0, 1):  # each half holds exactly its own pixels
        lone = np.zeros_like(halves_num)
        lone_den = np.zeros_like(halves_num)
        w = weights * (half == h)[:, None]
        deposit(stack, hits, np.arange(rows * cols), cols, f, offsets, w, 1 / gain,
                np.zeros(n_bf, np.int64), lone, lone_den)  # fmt: skip
        np.testing.assert_allclose(halves_num[..., h], lone[..., 0], rtol=1e-12, atol=1e-12)
    num, den = halves_num.sum(axis=2), halves_den.sum(axis=2)
    ref_num, ref_den = np.zeros_like(num), np.zeros_like(num)

    for j in range(rows * cols):
        if hits[j] == 0:
            continue
        r, c = divmod(j, cols)
        for i in range(n_bf):
            p = np.array([r, c]) * f + shifts[i] * f
            base = np.floor(p).astype(int)
            fr = p - base
            for dr, dc, w in ((0, 0, (1 - fr[0]) * (1 - fr[1])), (0, 1, (1 - fr[0]) * fr[1]),
                              (1, 0, fr[0] * (1 - fr[1])), (1, 1, fr[0] * fr[1])):  # fmt: skip
                rr, cc = base[0] + dr, base[1] + dc
                if 0 <= rr < rows * f and 0 <= cc < cols * f:
                    ref_num[rr, cc] += w * stack[j, i] / gain[i] / hits[j]
                    ref_den[rr, cc] += w
    np.testing.assert_allclose(num, ref_num, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(den, ref_den, rtol=1e-10, atol=1e-12)


def test_incremental_deposition_equals_a_rebuild_and_rebuilds_when_shifts_move():
    rng = np.random.default_rng(2)
    rows, cols, n_bf = 8, 8, 12
    stack = rng.integers(1, 40, (rows * cols, n_bf)).astype(np.uint16)
    shifts = rng.uniform(-1, 1, (n_bf, 2))
    hits_half = np.zeros(rows * cols, np.uint32)
    hits_half[:32] = 1
    hits_all = np.ones(rows * cols, np.uint32)
    inc = ShiftAndAdd((rows, cols), 2)
    assert inc.update(stack, hits_half, shifts)  # first call builds
    gains = inc._inv_gain.copy()
    assert not inc.update(stack, hits_all, shifts + 0.01)  # within tolerance: deposit new
    full = ShiftAndAdd((rows, cols), 2)
    full.shifts_px = shifts.copy()
    full._inv_gain, full._splat = gains, splat_weights(shifts * 2)
    full.update(stack, hits_all, shifts)  # same shifts and gains: all positions are new
    np.testing.assert_allclose(inc.num, full.num)
    np.testing.assert_allclose(inc.den, full.den)
    assert inc.update(stack, hits_all, shifts + 0.2)  # moved: rebuilt
    hits_all[3] = 2
    assert inc.update(stack, hits_all, inc.shifts_px)  # a repeat pass over a position
    assert inc.rebuilds == 3


def test_pixel_groups_move_each_pixel_by_its_own_shift():
    rng = np.random.default_rng(4)
    rows, cols, n_bf = 6, 7, 6
    stack = rng.integers(0, 9, (rows * cols, n_bf)).astype(np.uint16)
    hits = np.ones(rows * cols, np.uint32)
    hits[10] = 0
    hits[11] = 2
    finest = np.array([0, 0, 1, 1, 2, 2])  # finest tiles; the coarse level joins 1 and 2
    coarse = np.array([0, 0, 1, 1, 1, 1])
    move = np.array([[0, 0], [1, -1], [0, 2], [0, 2], [-1, 0], [2, 1]])
    window = ((1, 6), (0, 6))  # rows 1..5, cols 0..5 of the scan
    groups = PixelGroups(stack, hits, hits.astype(float), *window, cols, finest, move)
    assert len(groups.members) == 5  # pixels 2 and 3 share tile and shift
    for tile_of, n in ((finest, 3), (coarse, 2)):
        out = groups.tile_images(tile_of, n)
        ref = np.zeros((n, 5, 6))
        cnt = np.zeros_like(ref)
        for r in range(1, 6):
            for c in range(6):
                p = r * cols + c
                if not hits[p]:
                    continue
                for i in range(n_bf):
                    rr, cc = r - 1 + move[i, 0], c + move[i, 1]
                    if 0 <= rr < 5 and 0 <= cc < 6:
                        ref[tile_of[i], rr, cc] += stack[p, i] / hits[p]
                        cnt[tile_of[i], rr, cc] += 1
        mean = ref / np.maximum(cnt, 1)
        for t in range(n):
            mean[t][cnt[t] == 0] = mean[t][cnt[t] > 0].mean()  # uncovered: the tile's mean
        np.testing.assert_allclose(out, mean, rtol=1e-5)


def test_group_sums_of_integer_and_float_stacks_match_a_direct_sum():
    from tcbf_live.stream.tcbf.tile_kernels import GROUP_BLOCK, group_sums

    rng = np.random.default_rng(8)
    rows, cols, n_bf, n_groups = 7, 5, 1200, 9
    group_of = rng.integers(0, n_groups, n_bf)
    order = np.argsort(group_of, kind="stable").astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(group_of, minlength=n_groups))])
    # scan rows 1..6, cols 1..3: 18 positions, all but window position 7 listed, to the
    # window's targets 0..17 (position 7 is left as it was)
    targets = np.array([q for q in range(18) if q != 7])
    positions = (1 + targets // 3) * cols + 1 + targets % 3
    # counts up to 65535 over 1,200 px: running totals near 4e7 > 2**24, exact only in integers
    stack16 = rng.integers(0, 65536, (rows * cols, n_bf)).astype(np.uint16)
    stack32 = stack16.astype(np.float32) / 7
    stack32[12, 5] = np.nan  # a non-finite pixel spoils its own group at its position only
    for stack, exact in ((stack16, True), (stack32, False)):
        out = np.full((n_groups, 18), -1.0, np.float32)  # every listed entry must be written
        group_sums(stack, positions, targets, order, bounds.astype(np.int64), exact,
                   np.int64(0) if exact else 0.0, out)  # fmt: skip
        ref = np.full((n_groups, 18), -1.0)
        for q, p in zip(targets, positions, strict=True):
            ref[:, q] = np.bincount(group_of, stack[p].astype(np.float64), n_groups)
        spoiled = np.zeros_like(ref, bool)
        if not exact:
            spoiled[group_of[5], 4] = True  # position 12 = window row 1, col 1
            assert np.isnan(out[spoiled]).all()
        np.testing.assert_allclose(out[~spoiled], ref[~spoiled], rtol=2e-7)
    assert GROUP_BLOCK < 18 < 2 * GROUP_BLOCK  # a whole block and a part of one were written


def test_phase_flip_makes_the_transfer_positive_for_either_defocus_sign():
    rng = np.random.default_rng(5)
    phase = smooth_field((128, 128), 1.0, rng)
    sampling, lam = 2.0, 0.0197
    for c10 in (-15000.0, 15000.0):
        p = np.array([[c10 + 300.0, 100.0], [100.0, c10 - 300.0]])
        chi, q = quadratic_chi(phase.shape, sampling, lam, p)
        # tcBF of a weak phase object: 1 + sin(chi) x phase (our sign convention)
        image = 1.0 + 0.01 * sfft.ifft2(sfft.fft2(phase) * np.sin(chi)).real
        flipped = phase_flip(image, sampling, lam, p, q_max_per_A=0.2)
        band = sfft.ifft2(sfft.fft2(phase) * (q <= 0.2)).real
        assert np.corrcoef(flipped.ravel(), band.ravel())[0, 1] > 0.6
        assert np.corrcoef(image.ravel(), band.ravel())[0, 1] < 0.3


def test_default_upsampling_follows_the_information_limit():
    assert default_upsampling(256 / 24, 0.019687, 4.0, 128, 0.154) == 4  # tutorial: 4.33
    assert default_upsampling(0.5, 0.019687, 20.0) == 1
    assert default_upsampling(40.0, 0.019687, 20.0) == 8  # capped
    assert default_upsampling(None, 0.019687, 4.0) == 2  # optics unknown


def test_regrouped_tiles_reuse_their_groups_until_a_pixel_moves_too_far():
    from tcbf_live.stream.tcbf.tiles import RegroupedTiles, TileLevels

    rng = np.random.default_rng(6)
    rows, cols = 6, 7
    bf = np.array([(r, c) for r in range(-4, 4) for c in range(-4, 4)]) + 10
    layout = TileLevels.build(bf, (10, 10), (4, 2))
    k = (bf[layout.order] - 10).astype(float)
    stack = rng.integers(0, 9, (rows * cols, len(k))).astype(np.uint16)
    exposure = np.ones(rows * cols)
    excluded = np.zeros(len(k), bool)
    excluded[5] = True
    hits = np.ones(rows * cols, np.uint32)
    source = RegroupedTiles(stack, hits, exposure, ((0, rows), (0, cols)), cols, layout, k,
                            excluded, 0.5)  # fmt: skip
    m = np.array([[0.1, 0.0], [0.0, 0.1]])
    images, used = source.tile_images(4, m)
    first = source.groups
    move = np.rint(k @ m.T).astype(np.int64)
    move[5] = 1 << 30  # left out: lands on no tile
    ref = PixelGroups(stack, hits, exposure, (0, rows), (0, cols), cols, layout.member_tile[-1],
                      move)  # fmt: skip
    np.testing.assert_array_equal(images, ref.tile_images(layout.member_tile[0], 4))
    assert used is m or np.array_equal(used, m)
    source.tile_images(2, m * 2.0)  # edge pixels (|k| <= 4 px) move by 0.4 px: same groups
    assert source.groups is first
    fine, used = source.tile_images(2, m * 3.0)  # by 0.8 px: re-formed with the new model
    assert source.groups is not first and np.array_equal(used, m * 3.0)
    assert fine.shape == (layout.n_tiles[1], rows, cols)


def test_every_core_kernel_lives_in_kernels_and_releases_the_gil():
    import importlib
    import pkgutil

    import numba

    import tcbf_live.stream.tcbf as core
    from tcbf_live.stream.tcbf import chi_kernels, kernels, spectral_kernels, tile_kernels

    found = {}
    for module in (kernels, chi_kernels, spectral_kernels, tile_kernels):
        found |= {name: f for name, f in vars(module).items()
                  if isinstance(f, numba.core.registry.CPUDispatcher)}  # fmt: skip
    assert {"deposit", "group_sums", "scatter_groups", "ring_sums", "transfer_objective",
            "shift_spectra", "cross_power", "blend_moved", "slip_votes", "merge_tiles",
            "normalise_tiles"} <= set(found)  # fmt: skip
    for name, f in found.items():
        assert f.targetoptions.get("nogil") is True, name
        assert type(f._cache).__name__ != "NullCache", name  # cache=True
    for mod in pkgutil.iter_modules(core.__path__):
        if mod.name.endswith("kernels") or mod.name.startswith("accumulat"):  # ingest: its own
            continue
        m = importlib.import_module(f"{core.__name__}.{mod.name}")
        own = [n for n, f in vars(m).items() if isinstance(f, numba.core.registry.CPUDispatcher)
               and f.py_func.__module__ == m.__name__]  # fmt: skip
        assert not own, (mod.name, own)


def test_spectral_kernels_equal_their_numpy_expressions():
    """The fused pass (`spectral_kernels`) against the array expressions it replaced: each
    spectrum moved by its separable ramp, the weighted mean, the cross power, a blend step."""
    from tcbf_live.stream.tcbf.alignment import ramps
    from tcbf_live.stream.tcbf.spectral_kernels import (
        blend_moved,
        cross_power,
        ramp_factors,
        shift_spectra,
    )

    rng = np.random.default_rng(7)
    shape = (12, 10)
    spectra = (rng.normal(size=(5, *shape)) + 1j * rng.normal(size=(5, *shape))).astype("c8")
    shifts = rng.uniform(-3, 3, size=(5, 2))
    share = rng.uniform(size=5).astype(np.float32)
    moved, reference = np.empty_like(spectra), np.empty(shape, np.complex64)
    shift_spectra(spectra, *ramp_factors(shape, shifts), share, moved, reference)
    q0, q1 = np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1])
    ramp = np.exp(-2j * np.pi * (shifts[:, :1, None] * q0[None, :, None]
                                 + shifts[:, 1:, None] * q1[None, None, :]))  # fmt: skip
    want = spectra * ramp
    np.testing.assert_allclose(moved, want, atol=1e-5)
    np.testing.assert_allclose(reference, np.tensordot(share, want, axes=1), atol=1e-5)
    cross = np.empty_like(reference)
    cross_power(moved[2], reference, cross)
    np.testing.assert_allclose(cross, moved[2] * np.conj(reference), atol=1e-5)
    e0, e1 = ramp_factors(shape, [[0.7, -1.2]])
    np.testing.assert_allclose(ramps(shape, [[0.7, -1.2]])[0], np.exp(
        -2j * np.pi * (0.7 * q0[:, None] - 1.2 * q1[None, :])), atol=1e-5)  # fmt: skip
    expected = 0.25 * reference + 0.75 * moved[3] * ramps(shape, [[0.7, -1.2]])[0]
    blend_moved(reference, moved[3], e0[0], e1[0], 0.25, 0.75)
    np.testing.assert_allclose(reference, expected, atol=1e-5)


def test_pixel_groups_refreshed_for_a_later_update_equal_fresh_ones():
    """A later live update refreshes the last update's groups: only positions whose frame count
    changed, or that are new to the window, are summed again; the result equals groups formed
    afresh. Refitted exposures (the dose model) need no new sums; an excluded pixel does."""
    from tcbf_live.stream.tcbf.tiles import RegroupedTiles, TileLevels

    rng = np.random.default_rng(11)
    rows, cols = 12, 9
    bf = np.array([(r, c) for r in range(-4, 4) for c in range(-4, 4)]) + 10
    layout = TileLevels.build(bf, (10, 10), (4, 2))
    k = (bf[layout.order] - 10).astype(float)
    m = np.array([[0.2, 0.05], [-0.05, 0.2]])
    stack = rng.integers(0, 9, (rows * cols, len(k))).astype(np.uint16)
    hits = np.zeros(rows * cols, np.uint32)
    hits[: 6 * cols] = 1  # rows 0..5 acquired
    excluded = np.zeros(len(k), bool)

    def source(window, exposure, previous=None, out=excluded):
        return RegroupedTiles(stack, hits, exposure, window, cols, layout, k, out, 0.5, previous)

    def fresh_sums(window, exposure):
        fresh = source(window, exposure)
        fresh.tile_images(4, m)
        return fresh.groups.sums_t

    first = source(((0, 6), (1, 8)), hits.astype(float))
    first.tile_images(4, m)
    assert first.groups.summed == 6 * 7
    hits[6 * cols :] = 1  # the rest of the scan arrives; position 20 gets a second frame
    stack[20] += rng.integers(0, 9, len(k)).astype(np.uint16)
    hits[20] = 2
    exposure = hits * rng.uniform(0.8, 1.2, rows * cols)  # the dose model refitted
    window = ((2, 12), (1, 8))
    later = source(window, exposure, first.groups)
    images, used = later.tile_images(2, m * 1.2)  # within 0.5 px: the same grouping
    assert later.groups is first.groups and np.array_equal(used, m)
    assert later.groups.summed == 6 * 7 + 1  # rows 6..11 and position 20 (row 2, col 2)
    fresh = source(window, exposure)
    want, _ = fresh.tile_images(2, m)
    np.testing.assert_allclose(later.groups.sums_t, fresh.groups.sums_t)
    np.testing.assert_allclose(images, want, rtol=1e-6)
    stack[30] += 1  # a repeat-pass frame at position 30 (row 3, col 3), same window
    hits[30] += 1
    same = source(window, exposure, later.groups)
    same.tile_images(4, m)
    assert same.groups is later.groups and same.groups.summed == 1
    np.testing.assert_allclose(same.groups.sums_t, fresh_sums(window, exposure))
    idle = source(window, exposure, later.groups)  # an update that formed no tile images
    assert idle.kept() is later.groups  # keeps the groups it was given for the next one
    bad = excluded.copy()
    bad[3] = True
    other = source(window, exposure, later.groups, bad)
    other.tile_images(4, m)
    assert other.groups is not later.groups  # a pixel left out since: formed afresh
