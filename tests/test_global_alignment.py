"""The global, model-based alignment (`stream/tcbf/global_alignment.py`): the shift model from
all BF pixels at once where tile cross-correlation finds none, with its null and jackknife
errors, on synthetic shifted copies and on simulator ground truth below the tile method's
floor."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators.config import SimulationConfig
from tcbf_live.simulators.simulate import Simulator, tutorial_config, weak_phase_config
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf import PipelineSettings
from tcbf_live.stream.tcbf import global_alignment as ga
from tcbf_live.stream.tcbf.alignment import AlignmentSettings

sys.path.insert(0, str(Path(__file__).parent))
from test_tcbf import correlation  # noqa: E402


def shifted_copies(m, rows=24, cols=32, radius=6, noise=0.0, seed=0, margin=16, corr_px=0.7):
    """BF-pixel images: one random object (correlation length `corr_px`) displaced by -M k per
    pixel k (the correction shifts are then M k), seen through a fixed field (`margin`: the
    object extends beyond it, as a sample does), plus white noise."""
    rng = np.random.default_rng(seed)
    obj = ndi.gaussian_filter(rng.standard_normal((rows + 2 * margin, cols + 2 * margin)),
                              corr_px, mode="wrap")  # fmt: skip
    k = np.argwhere(np.ones((2 * radius + 1,) * 2)) - radius
    k = k[np.hypot(*k.T) <= radius].astype(float)
    images = np.array([ndi.shift(obj, -(m @ kk), order=3, mode="grid-wrap")
                       [margin : margin + rows, margin : margin + cols] for kk in k])  # fmt: skip
    return images + noise * rng.standard_normal(images.shape), k


@pytest.mark.parametrize("transpose", [False, True])
def test_shifted_copies_give_their_matrix(transpose):
    """Noisy copies (noise as large as the object per pixel): the transpose found when not
    given, M within 3 sigmas (jackknife and the 3 % floor) and 6 % of its size. The field,
    fixed while the object moves, pulls |M| low: by 1.5-4 % on this object over four seeds,
    by 4-9 % on a smoother one (correlation length 1.2 px; docs/tcbf.md)."""
    c, s = math.cos(0.5), math.sin(0.5)
    m = 0.35 * np.array([[c, -s], [s, c]]) @ (ga.TRANSPOSE if transpose else np.eye(2))
    images, k = shifted_copies(m, noise=0.3)
    est = ga.estimate(images, k)
    assert est.determined, est.reason
    err = np.abs(est.matrix_px - m)
    assert np.all(err <= 3 * est.errors_px) and err.max() < 0.06 * 0.35
    assert np.all(est.errors_px > 0)


def test_pure_noise_is_not_a_model():
    rng = np.random.default_rng(1)
    k = np.argwhere(np.ones((13, 13))) - 6.0
    est = ga.estimate(rng.standard_normal((len(k), 24, 32)), k)
    assert not est.determined and "needs 1.5x" in est.reason


def weak_phase(dose, seed=0):
    """The 0.038 rad weak-phase case of docs/tcbf.md (tile alignment: no model at 5e3)."""
    return weak_phase_config(dose_e_per_A2=dose, seed=seed)


def solved(cfg, **alignment):
    sim = Simulator(cfg)
    settings = ProcessingSettings(pipeline=PipelineSettings(
        alignment=AlignmentSettings(**alignment)))  # fmt: skip
    proc = SeriesProcessor(sim.series_info(1), settings)
    frames = sim.frames(0, sim.n_frames)
    for first in range(0, len(frames), 64):
        proc.add(FrameBatch(1, first, frames[first : first + 64]))
    return sim, proc, proc.solve(final=True)


def image_correlation(sim, res):
    q_max = 2 * sim.cfg.semiangle_mrad * 1e-3 / sim.wavelength_A
    truth = sim.phase_on_grid(res.upsampling_factor, q_max)
    return correlation(res.image, truth, 6 * res.upsampling_factor)


def test_below_the_tile_floor_the_global_search_gives_the_defocus():
    """Weak phase at 5x10^2 e/A^2 (10x below where the tiles give up): measured defocus 151.2
    +- 10.2 A (truth 150), rotation 0.2 +- 3.1 deg, image correlation 0.44."""
    sim, proc, res = solved(weak_phase(5e2))
    ab = res.aberrations
    assert res.alignment.method == "global" and res.alignment.schedule == ()
    assert abs(ab.defocus_A - 150.0) < min(0.1 * 150.0, 3 * ab.errors["C10_A"])
    assert abs(math.degrees(ab.rotation_rad)) < 3 * math.degrees(ab.errors["rotation_rad"])
    assert image_correlation(sim, res) > 0.3
    assert "global search" in res.summary() and "prior: none" in res.alignment.note


def test_the_tutorial_at_10_e_per_A2_without_a_prior():
    """Tiles: no model below ~50 e/A^2 on the tutorial sample; the global search at 10:
    measured 15,287 +- 499 A (truth 15,000), rotation -15.1 deg, image correlation 0.26."""
    sim, proc, res = solved(tutorial_config(dose_e_per_A2=10.0))
    ab = res.aberrations
    assert res.alignment.method == "global"
    assert abs(ab.defocus_A - 15000.0) < min(1500.0, 3 * ab.errors["C10_A"])
    assert math.degrees(ab.rotation_rad) == pytest.approx(-15.0, abs=3.0)
    assert image_correlation(sim, res) > 0.2


def test_a_large_field_is_searched_up_to_nyquist():
    """A 96x96 field has more frequencies than the search takes: thinned evenly in |q| they
    reach Nyquist (the lowest 600 alone reached 0.14 cycles/px and read the tutorial's defocus
    10 % high at every dose). Measured at 10 e/A^2: 15,262 +- 495 A."""
    sim, proc, res = solved(tutorial_config(scan_shape=(96, 96), dose_e_per_A2=10.0))
    ab = res.aberrations
    assert res.alignment.method == "global"
    assert abs(ab.defocus_A - 15000.0) < min(0.05 * 15000.0, 2 * ab.errors["C10_A"])


def test_no_contrast_gives_no_model_and_says_why():
    cfg = SimulationConfig(**{**weak_phase(1e3).__dict__, "phase_rms": 1e-9})
    sim, proc, res = solved(cfg)
    assert res is None
    note = proc.result(final=True).alignment_note
    assert note.startswith("tile alignment: no model; global search") and "needs 1.5x" in note


def test_switched_off_or_hinted():
    """--no-global-search: the tiles alone (no model at 20 e/A^2); a defocus hint narrows the
    search and is named in the result."""
    cfg = tutorial_config(dose_e_per_A2=20.0)
    assert solved(cfg, global_search=False)[2] is None
    sim, proc, res = solved(cfg, defocus_hint_A=12000.0)
    assert res.alignment.method == "global"
    assert "prior: defocus hint 12000 A" in res.alignment.note
    assert res.aberrations.defocus_A == pytest.approx(15000.0, rel=0.1)


def test_live_the_first_model_comes_half_way_and_is_refined():
    """Weak phase at 2x10^3 e/A^2 fed 4 rows at a time: no model at 8 rows (0.9x the null),
    the global model at 12 of 24 rows (measured 159.7 +- 7.5 A), kept while the search is not
    due (16 rows), refined at 20 (153.4 +- 6.4 A)."""
    sim = Simulator(weak_phase(2e3))
    frames = sim.frames(0, sim.n_frames)
    proc = SeriesProcessor(sim.series_info(1), ProcessingSettings())
    seen = {}
    for rows in (8, 12, 16, 20):
        first = 0 if rows == 8 else (rows - 4) * 48
        proc.add(FrameBatch(1, first, frames[first : rows * 48]))
        res = proc.solve()
        seen[rows] = None if res is None else (res.alignment.method, res.aberrations)
    assert seen[8] is None
    for rows in (12, 16, 20):
        method, ab = seen[rows]
        assert method == "global" and abs(ab.defocus_A - 150.0) < 3 * ab.errors["C10_A"]
    assert seen[16][1].defocus_A == seen[12][1].defocus_A  # not due: the same model kept
    assert seen[20][1].errors["C10_A"] < seen[12][1].errors["C10_A"]


def test_errors_come_from_the_search_that_gave_the_model():
    """A live global model kept after a later search found none: its errors are still its own
    search's jackknife (that search's subsets), not the empty ones of the newest."""
    from types import SimpleNamespace

    m = 0.35 * np.eye(2)
    found = ga.estimate(*shifted_copies(m, noise=0.3))
    rng = np.random.default_rng(2)
    k = np.argwhere(np.ones((13, 13))) - 6.0
    nothing = ga.estimate(rng.standard_normal((len(k), 24, 32)), k)
    assert found.determined and not nothing.determined and len(nothing.subsets) == 0

    def decompose_px(mat):  # stand-in for the aberration split: the entries themselves
        return SimpleNamespace(C10_A=mat[0, 0], C12_A=mat[0, 1], phi12_rad=mat[1, 0],
                               rotation_rad=mat[1, 1])  # fmt: skip

    fallback = ga.GlobalFallback(True, None, None, None, None)
    fallback.model_estimate, fallback.last = found, found
    own = fallback.errors(decompose_px(found.matrix_px), decompose_px)
    fallback.last = nothing  # the next search: no model
    assert fallback.errors(decompose_px(found.matrix_px), decompose_px) == own
    assert all(np.isfinite(v) and v > 0 for v in own.values())
