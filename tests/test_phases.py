"""The accumulate / merge / solve phases: partial states of several receivers merge into
exactly the state one receiver fed everything would hold (bit for bit, repeat passes included),
and the solve on the merged state gives the same result."""

from dataclasses import replace

import numpy as np
import pytest

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf.accumulators import AccumulatorState, StateDelta, merged
from tcbf_live.stream.tcbf.deltas import DeltaTaker

PASSES = 2


@pytest.fixture(scope="module", params=["raster", "serpentine"])
def series(request):
    """A 12x16 scan scanned twice (frames 0..2n-1), integer frames, a few bad pixels."""
    sim = Simulator(tutorial_config(scan_shape=(12, 16), bad_pixels=8,
                                    scan_order=request.param))  # fmt: skip
    one = sim.frames(0, sim.n_frames)
    rng = np.random.default_rng(3)
    again = rng.poisson(one.astype(np.float64)).astype(one.dtype)  # a second, independent pass
    frames = np.concatenate([one, again])
    info = replace(sim.series_info(1), frames_expected=PASSES * sim.n_frames)
    cal = SeriesProcessor(info, ProcessingSettings())
    cal.add(FrameBatch(1, 0, frames[:64]))
    settings = ProcessingSettings(calibration=cal.calibration)  # every receiver shares it
    return info, frames, settings


def receiver(info, settings) -> SeriesProcessor:
    return SeriesProcessor(info, settings)


def feed(proc: SeriesProcessor, frames: np.ndarray, indices: np.ndarray, size: int = 5) -> None:
    """Frames of the given acquisition indices, in messages of one or `size` frames."""
    for k in range(0, len(indices), size):
        idx = indices[k : k + size]
        if np.all(np.diff(idx) == 1):
            proc.add(FrameBatch(1, int(idx[0]), frames[idx]))
        else:
            proc.add_many([FrameBatch(1, int(i), frames[i : i + 1]) for i in idx])


def assert_same_state(a: AccumulatorState, b: AccumulatorState) -> None:
    for name, x in a.arrays().items():
        y = b.arrays()[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def splits(n_frames: int, cols: int) -> dict[str, list[np.ndarray]]:
    idx = np.arange(n_frames)
    rows = (idx % (n_frames // PASSES)) // cols
    return {
        "even/odd frames": [idx[0::2], idx[1::2]],
        "blocks of rows": [idx[rows < 5], idx[rows >= 5]],
        "three receivers, round robin": [idx[0::3], idx[1::3], idx[2::3]],
        "one pass each": [idx[: n_frames // 2], idx[n_frames // 2 :]],
    }


@pytest.mark.parametrize("how", ["even/odd frames", "blocks of rows",
                                 "three receivers, round robin", "one pass each"])  # fmt: skip
def test_merged_partial_states_equal_one_state_fed_everything(series, how):
    info, frames, settings = series
    whole = receiver(info, settings)
    feed(whole, frames, np.arange(len(frames)))
    parts = splits(len(frames), info.scan_shape[1])[how]
    workers = [receiver(info, settings) for _ in parts]
    for w, idx in zip(workers, parts, strict=True):
        feed(w, frames, idx)
    coordinator = receiver(info, settings)
    for w in workers:
        coordinator.merge(w.acc.state)
    assert_same_state(coordinator.acc.state, whole.acc.state)
    assert coordinator.frames_received == len(frames) and coordinator.done
    # merge order does not matter, and `merged` leaves its inputs alone
    states = [w.acc.state for w in workers]
    before = [s.hits.copy() for s in states]
    assert_same_state(merged(states[::-1]), whole.acc.state)
    for s, h in zip(states, before, strict=True):
        np.testing.assert_array_equal(s.hits, h)


@pytest.mark.parametrize("how", ["even/odd frames", "three receivers, round robin",
                                 "one pass each"])  # fmt: skip
def test_deltas_taken_while_receivers_run_add_up_to_one_state_fed_everything(series, how):
    """Workers send their growth as deltas at arbitrary moments (each frame once); the
    coordinator's state equals one receiver's, and a duplicate that reaches the same worker
    after its first copy was sent is still caught there."""
    info, frames, settings = series
    whole = receiver(info, settings)
    feed(whole, frames, np.arange(len(frames)))
    parts = splits(len(frames), info.scan_shape[1])[how]
    workers = [receiver(info, settings) for _ in parts]
    takers = [DeltaTaker(w.acc.state) for w in workers]
    coordinator = receiver(info, settings)
    for chunk in range(4):  # interleaved: take a delta after each quarter of each share
        for w, t, idx in zip(workers, takers, parts, strict=True):
            feed(w, frames, np.array_split(idx, 4)[chunk])
            delta = t.take()
            assert delta.check(coordinator.acc.state) is None
            assert coordinator.acc.state.apply(delta) == 0
    assert_same_state(coordinator.acc.state, whole.acc.state)
    first = int(parts[0][0])
    feed(workers[0], frames, np.array([first]))  # sent already: still a duplicate there
    late = takers[0].take()
    assert late.rows.size == 0 and late.seen.size == 0 and late.stats[1] == 1


def test_a_delta_that_does_not_fit_the_series_is_refused_before_anything_is_added(series):
    info, frames, settings = series
    proc = receiver(info, settings)
    feed(proc, frames, np.arange(20))
    good = DeltaTaker(proc.acc.state).take()
    target = receiver(info, settings).acc.state
    n_pos = target.hits.size
    bad = {
        "row outside": replace(good, rows=good.rows + n_pos - 5),
        "index beyond": replace(good, seen=good.seen + target.seen.size),
        "repeated": replace(good, rows=np.concatenate([good.rows[:-1], good.rows[:1]])),
        "wrong dtype": replace(good, values={**good.values,
                                             "totals": good.values["totals"].astype("<f4")}),
        "missing field": replace(good, values={k: v for k, v in good.values.items()
                                               if k != "stack"}),
        "int32 rows": replace(good, rows=good.rows.astype(np.int32)),
    }  # fmt: skip
    for what, delta in bad.items():
        assert delta.check(target) is not None, what
    assert good.check(target) is None and isinstance(good, StateDelta)


def test_partitions_of_one_processor_and_the_solve_on_merged_state(series):
    """The coordinator's own partitions (`partition`, `accumulate_into`) merge the same way;
    the solve on the merged state equals the solve of the receiver fed everything."""
    info, frames, settings = series
    whole = receiver(info, settings)
    feed(whole, frames, np.arange(len(frames)))
    coordinator = receiver(info, settings)
    left, right = coordinator.partition(), coordinator.partition()
    idx = np.arange(len(frames))
    coordinator.accumulate_into(left, [FrameBatch(1, int(i), frames[i : i + 1]) for i in idx[::2]])
    coordinator.accumulate_into(right, [FrameBatch(1, int(i), frames[i : i + 1])
                                        for i in idx[1::2]])  # fmt: skip
    assert coordinator.frames_received == 0  # partitions are not the coordinator's own state
    coordinator.merge(left, stack=False)  # the alignment cadence: small arrays only
    assert not coordinator.acc.state.stack.any()
    np.testing.assert_array_equal(coordinator.acc.state.tiles[::2], left.tiles[::2])
    coordinator.merge(right, stack=False)
    fresh = receiver(info, settings)
    fresh.merge(left)
    fresh.merge(right)
    assert_same_state(fresh.acc.state, whole.acc.state)
    a, b = fresh.solve(final=True), whole.solve(final=True)
    assert a is not None and b is not None and a.aberrations is not None
    np.testing.assert_array_equal(a.shifts_px, b.shifts_px)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.aberrations.C10_A == b.aberrations.C10_A


def test_merge_refuses_a_state_of_another_geometry_and_counts_frames_seen_twice(series):
    info, frames, settings = series
    a, b = receiver(info, settings), receiver(info, settings)
    feed(a, frames, np.arange(0, 40))
    feed(b, frames, np.arange(30, 60))  # frames 30..39 reached both receivers
    assert a.acc.state.merge(b.acc.state) == 10
    assert a.acc.duplicates == 10
    other = replace(info, scan_shape=(8, 16))
    with pytest.raises(ValueError, match="cannot merge totals"):
        receiver(other, settings).acc.state.merge(b.acc.state)


def test_stack_merge_saturates_like_the_kernel():
    """uint16 stack: the kernel caps each sum at 65535; merging capped partial sums caps the
    same way (saturating addition of non-negative values is associative)."""
    s = AccumulatorState.zeros(2, 3, 1, 4)
    t = AccumulatorState.zeros(2, 3, 1, 4)
    s.stack[0] = [65000, 10, 65535]
    t.stack[0] = [1000, 20, 1]
    s.hits[0] = t.hits[0] = 1  # a state holds values only where it has frames
    s.merge(t)
    np.testing.assert_array_equal(s.stack[0], [65535, 30, 65535])
    assert s.stack.dtype == np.uint16


def test_the_notebook_entry_gives_what_a_series_gives():
    """`tcbf.reconstruct` on a 4D array (no file, no socket) equals the series path on the
    same frames and metadata, bit for bit, and recovers the simulator's defocus."""
    from tcbf_live.stream.tcbf import reconstruct

    sim = Simulator(tutorial_config())
    info = sim.series_info(1)
    frames = sim.frames(0, sim.n_frames)
    proc = SeriesProcessor(info, ProcessingSettings())
    proc.add(FrameBatch(1, 0, frames))
    expected = proc.solve(final=True)
    got = reconstruct(frames.reshape(*info.scan_shape, *info.detector_shape),
                      energy_eV=info.energy_eV, step_A=info.step_A,
                      semiangle_mrad=info.semiangle_mrad,
                      angular_sampling_mrad=info.angular_sampling_mrad,
                      counts_per_electron=info.counts_per_electron,
                      mask_value=info.mask_value)  # fmt: skip
    np.testing.assert_array_equal(got.image, expected.image)
    np.testing.assert_array_equal(got.shifts_px, expected.shifts_px)
    truth = info.ground_truth["defocus_A"]
    assert got.aberrations.defocus_A == pytest.approx(truth, rel=0.01)
    with pytest.raises(ValueError, match="rows, cols, Qx, Qy"):
        reconstruct(frames, energy_eV=300e3, step_A=10.0)
