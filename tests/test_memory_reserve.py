"""The accumulators' memory touched at start-up (`stream.memory_reserve`): sized from the
flags, taken by the calibrated series where it fits, released where it does not; the series
accumulates into it exactly as into memory of its own."""

import math
from dataclasses import replace

import numpy as np
import pytest

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream import memory_reserve
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf.accumulators import ALIGN_BYTES, AccumulatorState
from tcbf_live.stream.tcbf.tiles import TileLevels, disk_tile_counts


@pytest.fixture(autouse=True)
def no_reserve_left():
    memory_reserve.release()
    yield
    memory_reserve.release()
    for pool in (memory_reserve._kept, memory_reserve._lent, memory_reserve._pending):
        pool.clear()


@pytest.fixture(scope="module")
def sim():
    return Simulator(tutorial_config(scan_shape=(10, 14), bad_pixels=12))


def flags(info, **more) -> dict:
    return {"scan_shape": info.scan_shape, "semiangle_mrad": info.semiangle_mrad,
            "angular_sampling_mrad": info.angular_sampling_mrad} | more  # fmt: skip


def fed(sim) -> SeriesProcessor:
    proc = SeriesProcessor(sim.series_info(1), ProcessingSettings())
    proc.add(FrameBatch(1, 0, sim.frames(0, sim.n_frames)))
    return proc


def expected_bytes(meta, bins=None) -> int:
    return AccumulatorState.block_bytes(memory_reserve.expected_layout(meta, bins))


@pytest.mark.parametrize("radius, bins", [(27.0, (32, 16, 8, 4)), (21.0, (32, 16, 8, 4)),
                                          (5.5, (4, 2, 1)), (40.3, (16, 8)), (1.0, (2, 1)),
                                          (63.9, (64, 32, 16, 8, 4, 2))])  # fmt: skip
def test_the_disk_is_counted_as_the_tile_layout_lists_it(radius, bins):
    reach = math.ceil(radius)
    grid = np.mgrid[-reach : reach + 1, -reach : reach + 1].reshape(2, -1).T
    disk = grid[(grid**2).sum(axis=1) <= radius**2]
    assert disk_tile_counts(radius, bins) == (len(disk), TileLevels.build(disk, (0, 0),
                                                                            bins).n_tiles)


def test_expected_state_is_the_disk_of_the_optics_plus_a_pixel_at_its_tile_levels():
    meta = {"scan_shape": (4, 5), "semiangle_mrad": 20.0, "angular_sampling_mrad": 1.0}
    layout = memory_reserve.expected_layout(meta)
    n_bf, n_tiles = disk_tile_counts(21.0, (32, 16, 8, 4))  # default levels of a 40 px disk
    assert layout["stack"][0] == (20, n_bf) and layout["tiles"][0] == (20, sum(n_tiles))
    assert memory_reserve.expected_layout(meta, bins=(16, 8))["tiles"][0] == (20, sum(
        disk_tile_counts(21.0, (16, 8))[1]))  # fmt: skip
    for missing in meta:
        assert memory_reserve.expected_layout(meta | {missing: None}) is None
    # a unit slip (20 mrad at 0.001 mrad/px: a 20,000 px disk) is sized, not listed, and
    # refused by the budget
    slip = meta | {"angular_sampling_mrad": 0.001}
    assert AccumulatorState.block_bytes(memory_reserve.expected_layout(slip)) > 1 << 31
    memory_reserve.prepare_expected(slip, budget_bytes=1 << 31)
    assert memory_reserve.prepared_bytes() == 0


def test_the_series_accumulates_in_the_prepared_memory_exactly(sim):
    own = fed(sim)
    memory_reserve.prepare_expected(flags(sim.series_info(1)), budget_bytes=1 << 30)
    prepared = memory_reserve.prepared_bytes()
    state = own.acc.state
    need = AccumulatorState.block_bytes({k: (a.shape, a.dtype) for k, a in
                                         state.arrays().items()})  # fmt: skip
    assert need <= prepared <= 2 * need  # the estimate brackets the truth
    buf = memory_reserve._reserve
    proc = fed(sim)
    assert memory_reserve.prepared_bytes() == 0  # taken, once
    for name, a in proc.acc.state.arrays().items():  # every array, each on a cache line
        assert np.shares_memory(a, buf) and a.ctypes.data % ALIGN_BYTES == 0, name
        np.testing.assert_array_equal(a, state.arrays()[name])
    a, b = proc.result(), own.result()
    np.testing.assert_array_equal(a.total_counts, b.total_counts)
    np.testing.assert_array_equal(a.incoherent_bf, b.incoherent_bf)
    assert not np.shares_memory(fed(sim).acc.state.stack, buf)  # the next series: its own


def test_a_state_carved_from_a_block_stays_inside_it_each_array_on_a_cache_line():
    for integer in (True, False):
        layout = AccumulatorState.layout(7, 5, 3, 9, integer)
        need = AccumulatorState.block_bytes(layout)
        block = np.zeros(need + ALIGN_BYTES, np.uint8)
        for start in range(ALIGN_BYTES):  # every alignment of the block's start
            memory = block[start : start + need]
            state = AccumulatorState.zeros(7, 5, 3, 9, integer, memory=memory)
            spans = []
            for name, a in state.arrays().items():
                assert (a.shape, a.dtype) == layout[name] and a.flags.c_contiguous, name
                assert a.ctypes.data % ALIGN_BYTES == 0, name
                lo = a.ctypes.data - memory.ctypes.data
                assert 0 <= lo and lo + a.nbytes <= need, name
                spans.append((lo, lo + a.nbytes))
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    need = AccumulatorState.block_bytes(AccumulatorState.layout(7, 5, 3, 9))
    with pytest.raises(ValueError, match="do not hold"):
        AccumulatorState.zeros(7, 5, 3, 9, memory=np.zeros(need - 1, np.uint8))


@pytest.mark.parametrize("factor", [0.4, 2.5])
def test_a_reserve_that_does_not_fit_is_released_before_the_stack_is_allocated(sim, factor):
    state = fed(sim).acc.state
    need = AccumulatorState.block_bytes({k: (a.shape, a.dtype) for k, a in
                                         state.arrays().items()})  # fmt: skip
    memory_reserve.prepare(int(need * factor))
    proc = fed(sim)
    assert memory_reserve.prepared_bytes() == 0  # released, not kept beside the new stack
    assert proc.acc.state.stack.flags.owndata and proc.acc.state.stack.nbytes == \
        state.stack.nbytes  # fmt: skip


def test_nothing_is_prepared_over_half_the_budget_or_without_the_optics(sim):
    meta = flags(sim.series_info(1))
    need = expected_bytes(meta)
    memory_reserve.prepare_expected(meta, budget_bytes=2 * need - 2)
    assert memory_reserve.prepared_bytes() == 0
    memory_reserve.prepare_expected(meta | {"semiangle_mrad": None}, budget_bytes=1 << 30)
    assert memory_reserve.prepared_bytes() == 0
    memory_reserve.prepare_expected(meta, budget_bytes=2 * need)
    assert memory_reserve.prepared_bytes() == need


def test_prepared_memory_is_zero():
    memory_reserve.prepare(3 << 20)
    buf = memory_reserve._reserve
    assert buf.nbytes == 3 << 20 and not buf.any()


class Busy:
    done = False  # (a zmq.MessageTracker's)


def test_kept_buffers_are_lent_smallest_first_and_kept_zeroed_once_free():
    """A worker's kept memory (`prepare_kept`): lent by size, given back zeroed through any
    view of it; one given back while ZeroMQ may still send from it is lent again only once
    that is done; a series too large for any kept buffer frees one (never both held)."""
    assert memory_reserve.take_kept(1) is None  # none prepared: the caller allocates
    memory_reserve.prepare_kept(1 << 20, count=1)
    memory_reserve.prepare_kept(2 << 20, count=2)  # one more, larger
    small, large = memory_reserve.take_kept(1000), memory_reserve.take_kept((1 << 20) + 1)
    assert (small.nbytes, large.nbytes) == (1 << 20, 2 << 20)
    assert memory_reserve.take_kept(1) is None  # both lent
    small[:10] = 7
    assert memory_reserve.give_back(small[64:].view(np.float64))
    assert memory_reserve.take_kept(1) is small and not small.any()
    assert not memory_reserve.give_back(np.zeros(4096, np.uint8))  # never lent
    busy = Busy()
    large[:5] = 1
    assert memory_reserve.give_back(large, busy) and memory_reserve.give_back(small)
    assert memory_reserve.take_kept((1 << 20) + 1) is None  # still sent from
    busy.done = True
    again = memory_reserve.take_kept((1 << 20) + 1)
    assert again is large and not large.any()
    assert memory_reserve.take_kept(3 << 20) is None  # too large: the small one is freed
    assert memory_reserve._kept == [] and memory_reserve.give_back(large)
    assert [b.nbytes for b in memory_reserve._kept] == [2 << 20]


def test_a_worker_folds_series_after_series_into_the_memory_it_kept(sim):
    """A worker's row block comes from its kept memory, and after the series goes back to it,
    zeroed: the next series folds into the same memory and accumulates exactly what a block
    of new memory holds."""
    frames = sim.frames(0, sim.n_frames)
    settings = ProcessingSettings(calibration=fed(sim).calibration, row_block_rows=40)
    memory_reserve.prepare_kept(8 << 20, count=1)
    kept = memory_reserve._kept[0]
    states = []
    for _ in range(2):
        proc = SeriesProcessor(sim.series_info(1), settings)
        assert np.shares_memory(proc.acc.state.stack, kept)
        proc.add(FrameBatch(1, 0, frames[:40]))
        states.append({n: a.copy() for n, a in proc.acc.state.arrays().items()})
        assert memory_reserve.give_back(proc.acc.state.totals) and not kept.any()
    assert memory_reserve.take_kept(1) is kept  # the next one gets memory of its own
    plain = SeriesProcessor(sim.series_info(1), replace(settings))
    assert not np.shares_memory(plain.acc.state.stack, kept)
    plain.add(FrameBatch(1, 0, frames[:40]))
    for state in states:
        for name, a in plain.acc.state.arrays().items():
            np.testing.assert_array_equal(state[name], a, err_msg=name)


def test_a_series_whose_build_fails_gives_its_kept_buffer_back(sim, monkeypatch):
    """A series whose state cannot be built after its block was lent (here its staging
    raises) returns the kept buffer, zeroed: the worker's next series folds into it."""
    from tcbf_live.stream import series as series_module

    settings = ProcessingSettings(calibration=fed(sim).calibration, row_block_rows=40)
    memory_reserve.prepare_kept(8 << 20, count=1)
    kept = memory_reserve._kept[0]

    def broken(*args, **kwargs):
        raise RuntimeError("staging failed")

    monkeypatch.setattr(series_module, "Staging", broken)
    with pytest.raises(RuntimeError, match="staging failed"):
        SeriesProcessor(sim.series_info(1), settings)
    assert memory_reserve._kept == [kept] and not memory_reserve._lent and not kept.any()
    monkeypatch.undo()
    proc = SeriesProcessor(sim.series_info(1), settings)
    assert np.shares_memory(proc.acc.state.stack, kept)


def test_a_workers_kept_buffer_is_sized_for_the_series_its_flags_describe(sim):
    """`run --workers` sizes its workers' kept buffers for the series its flags describe
    (`kept_bytes`: a large detector's block is larger than the default): the series' block
    fits the buffer, which is not much larger; without the flags, the least given."""
    info = sim.series_info(1)
    nbytes = memory_reserve.kept_bytes(flags(info), rows=40)
    memory_reserve.prepare_kept(nbytes, count=1)
    kept = memory_reserve._kept[0]
    settings = ProcessingSettings(calibration=fed(sim).calibration, row_block_rows=40)
    proc = SeriesProcessor(info, settings)
    assert np.shares_memory(proc.acc.state.stack, kept)
    (buf, asked), = memory_reserve._lent.values()
    assert buf is kept and asked <= nbytes < 1.3 * asked, (asked, nbytes)
    assert memory_reserve.kept_bytes({"scan_shape": (8, 8)}, least=5) == 5
