"""The accumulators' memory touched at start-up (`stream.memory_reserve`): sized from the
flags, taken by the calibrated series where it fits, released where it does not; the series
accumulates into it exactly as into memory of its own."""

import math

import numpy as np
import pytest

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream import memory_reserve
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.tcbf.accumulators import ALIGN_BYTES, AccumulatorState


@pytest.fixture(autouse=True)
def no_reserve_left():
    memory_reserve.release()
    yield
    memory_reserve.release()


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


def test_expected_state_is_the_disk_of_the_optics_plus_a_pixel_at_its_tile_levels():
    meta = {"scan_shape": (4, 5), "semiangle_mrad": 20.0, "angular_sampling_mrad": 1.0}
    layout = memory_reserve.expected_layout(meta)
    (n_pos, n_bf), _ = layout["stack"]
    assert n_pos == 20 and abs(n_bf - math.pi * 21**2) < 2 * math.pi * 21  # the disk, r 21 px
    # default levels of a 40 px disk: 32, 16, 8, 4 px; the disk of radius 21 px needs at least
    # its area in tiles of each, and at most the cells of its bounding square
    (_, n_tiles), _ = layout["tiles"]
    levels = (32, 16, 8, 4)
    assert sum(math.pi * 21**2 / b**2 for b in levels) <= n_tiles
    assert n_tiles <= sum((math.ceil(42 / b) + 1) ** 2 for b in levels)
    (_, fewer), _ = memory_reserve.expected_layout(meta, bins=(16, 8))["tiles"]
    assert fewer < n_tiles - 20
    for missing in meta:
        assert memory_reserve.expected_layout(meta | {missing: None}) is None


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


def test_a_state_does_not_fit_in_less_than_its_block():
    layout = AccumulatorState.layout(6, 5, 4, 6)
    with pytest.raises(ValueError, match="do not hold"):
        AccumulatorState.zeros(6, 5, 4, 6, memory=np.zeros(AccumulatorState.block_bytes(layout)
                                                            - 1, np.uint8))  # fmt: skip


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
