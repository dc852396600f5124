"""The stack's memory touched at start-up (`stream.memory_reserve`): sized from the flags,
taken by the calibrated series where it fits, released where it does not; the series
accumulates into it exactly as into memory of its own."""

import math

import numpy as np
import pytest

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream import memory_reserve
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor


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


def test_expected_stack_is_the_disk_of_the_optics_plus_a_pixel():
    meta = {"scan_shape": (4, 5), "semiangle_mrad": 20.0, "angular_sampling_mrad": 1.0}
    assert memory_reserve.expected_stack_bytes(meta) == 4 * 5 * math.ceil(math.pi * 21**2) * 2
    for missing in meta:
        assert memory_reserve.expected_stack_bytes(meta | {missing: None}) is None


def test_the_series_accumulates_in_the_prepared_memory_exactly(sim):
    own = fed(sim)
    memory_reserve.prepare_expected(flags(sim.series_info(1)), budget_bytes=1 << 30)
    prepared = memory_reserve.prepared_bytes()
    n_bf = own.calibration.n_bf
    assert n_bf * 140 * 2 <= prepared <= 2 * n_bf * 140 * 2  # the estimate brackets the truth
    buf = memory_reserve._reserve
    proc = fed(sim)
    assert memory_reserve.prepared_bytes() == 0  # taken, once
    assert np.shares_memory(proc.acc.state.stack, buf)
    np.testing.assert_array_equal(proc.acc.state.stack, own.acc.state.stack)
    a, b = proc.result(), own.result()
    np.testing.assert_array_equal(a.total_counts, b.total_counts)
    np.testing.assert_array_equal(a.incoherent_bf, b.incoherent_bf)
    assert not np.shares_memory(fed(sim).acc.state.stack, buf)  # the next series: its own


@pytest.mark.parametrize("factor", [0.4, 2.5])
def test_a_reserve_that_does_not_fit_is_released_before_the_stack_is_allocated(sim, factor):
    need = fed(sim).acc.state.stack.nbytes
    memory_reserve.prepare(int(need * factor))
    proc = fed(sim)
    assert memory_reserve.prepared_bytes() == 0  # released, not kept beside the new stack
    assert proc.acc.state.stack.flags.owndata and proc.acc.state.stack.nbytes == need


def test_nothing_is_prepared_over_half_the_budget_or_without_the_optics(sim):
    meta = flags(sim.series_info(1))
    need = memory_reserve.expected_stack_bytes(meta)
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
