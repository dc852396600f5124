"""A worker's recycled rows (`stream.tcbf.row_block`): a block of rows smaller than the scan
gives exactly the deltas of a state with a row per position; a frame that finds no row is left
unclaimed and counted, never folded elsewhere; batches are cut to the rows free.

Its deltas' buffers: reused only once ZeroMQ has let go of, or (a local worker's, in memory
shared with its coordinator: `stream.shared_segments`) the coordinator has merged, the delta
in them; the coordinator reads exactly what was taken, read-only, only from the worker's own
segments; without room in /dev/shm the deltas go over the link."""

import os
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import zmq

from tcbf_live.detectors.base import CompressedFrame, FrameBatch
from tcbf_live.detectors.compression import compress_bslz4
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream import memory_reserve, shared_segments
from tcbf_live.stream.budget import BudgetExceeded
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.shared_segments import PeerSegments, SegmentError
from tcbf_live.stream.tcbf.deltas import DeltaTaker
from tcbf_live.stream.tcbf.row_block import MIN_ROWS, RowBlock
from tcbf_live.stream.worker_link import LinkError, delta_from, delta_message, pack, unpack
from tcbf_live.stream.worker_series import MergedMark, WorkerSeries, fitting

TAG = shared_segments.new_tag()  # this process's segments, as a spawned worker's


def OURS() -> str:  # noqa: N802 (what names this process's segments)
    return shared_segments.owner(os.getpid(), TAG)

ROWS = 40  # of a 12x16 scan's 192 positions


@pytest.fixture(scope="module")
def series():
    """A 12x16 scan scanned twice, integer frames; each frame also bslz4-compressed."""
    sim = Simulator(tutorial_config(scan_shape=(12, 16), bad_pixels=8))
    one = sim.frames(0, sim.n_frames)
    again = np.random.default_rng(5).poisson(one.astype(np.float64)).astype(one.dtype)
    frames = np.concatenate([one, again])
    info = replace(sim.series_info(1), frames_expected=len(frames))
    cal = SeriesProcessor(info, ProcessingSettings())
    cal.add(FrameBatch(1, 0, frames[:64]))
    blobs = [compress_bslz4(f) for f in frames]
    return info, frames, blobs, ProcessingSettings(calibration=cal.calibration)


def batches(frames, blobs, idx, packed: bool) -> list:
    """Frames `idx` as one-frame batches, bslz4-compressed (`packed`) or plain."""
    if packed:
        f = frames[0]
        return [CompressedFrame(1, int(i), blobs[i], f.itemsize, f.shape, f.dtype.str)
                for i in idx]  # fmt: skip
    return [FrameBatch(1, int(i), frames[i : i + 1]) for i in idx]


def whole_state(info, frames, settings, idx):
    proc = SeriesProcessor(info, settings)
    proc.add_many([FrameBatch(1, int(i), frames[i : i + 1]) for i in idx])
    return proc.acc.state


def assert_same_state(a, b) -> None:
    for name, x in a.arrays().items():
        np.testing.assert_array_equal(x, b.arrays()[name], err_msg=name)


@pytest.mark.parametrize("packed", [False, True], ids=["frames", "bslz4"])
@pytest.mark.parametrize("arrival", ["random", "in order"])
@pytest.mark.parametrize("into", [None, "buffers"])
def test_a_block_smaller_than_the_scan_gives_the_deltas_of_a_whole_state(
    series, packed, arrival, into
):
    """Both passes, 40 frames (<= 40 positions) between deltas: the coordinator's state
    equals the state of one receiver with a row per position. Deltas taken into new arrays or
    into the same reused buffers (a worker's: `DeltaTaker.buffers`), from rows claimed in
    random order (sorted) or in position order (copied as they are)."""
    info, frames, blobs, settings = series
    order = np.arange(len(frames))
    if arrival == "random":
        order = np.random.default_rng(1).permutation(len(frames))
    worker = SeriesProcessor(info, replace(settings, row_block_rows=ROWS))
    rows = worker.acc.rows
    taker = DeltaTaker(worker.acc.state, rows)
    out = taker.buffers() if into else None
    assert worker.acc.state.stack.shape[0] == ROWS and worker.acc.state.seen.size == len(frames)
    coordinator = SeriesProcessor(info, settings)
    for k in range(0, len(order), ROWS):
        worker.add_many(batches(frames, blobs, order[k : k + ROWS], packed))
        assert rows.used == len(set(order[k : k + ROWS] % (len(frames) // 2)))
        delta = taker.take(out)
        assert rows.used == 0 and not worker.acc.state.hits.any()
        assert np.all(np.diff(delta.rows) > 0) and delta.check(coordinator.acc.state) is None
        for name, values in delta.values.items():  # never the block's own rows
            assert not np.shares_memory(values, worker.acc.state.arrays()[name])
            assert np.shares_memory(values, out[name]) if out else True
        coordinator.acc.state.apply(delta)
    assert rows.lost == 0
    assert_same_state(coordinator.acc.state, whole_state(info, frames, settings, order))


@pytest.mark.parametrize("packed", [False, True], ids=["frames", "bslz4"])
def test_a_frame_that_finds_no_row_is_left_unclaimed_and_counted(series, packed):
    info, frames, blobs, settings = series
    worker = SeriesProcessor(info, replace(settings, row_block_rows=ROWS))
    rows = worker.acc.rows
    taker = DeltaTaker(worker.acc.state, rows)
    worker.add_many(batches(frames, blobs, range(ROWS + 1), packed))  # one too many positions
    assert rows.lost == 1 and worker.acc.frames_accepted == ROWS
    assert worker.acc.state.seen[ROWS] == 0  # not claimed: the frame may come again
    coordinator = SeriesProcessor(info, settings)
    coordinator.acc.state.apply(taker.take())
    worker.add_many(batches(frames, blobs, [ROWS], packed))
    coordinator.acc.state.apply(taker.take())
    assert_same_state(coordinator.acc.state, whole_state(info, frames, settings, range(ROWS + 1)))


def test_the_block_is_sized_by_bytes_within_its_bounds():
    assert RowBlock.capacity(10**6, 5000, 64 << 20) == (64 << 20) // 5000
    assert RowBlock.capacity(10**6, 120 << 10, 64 << 20) == MIN_ROWS  # large rows: the floor
    assert RowBlock.capacity(500, 5000, 64 << 20) == 500  # never more rows than positions


def test_batches_are_cut_to_the_rows_free():
    a = FrameBatch(1, 0, np.zeros((5, 2, 2), np.uint16))
    c = CompressedFrame(1, 5, b"", 2, (2, 2), "<u2")
    b = FrameBatch(1, 6, np.zeros((3, 2, 2), np.uint16))

    def shape(part):
        return [(x.first, len(x.frames) if isinstance(x, FrameBatch) else "c") for x in part]

    for free, head, rest in [
        (9, [(0, 5), (5, "c"), (6, 3)], []),
        (7, [(0, 5), (5, "c"), (6, 1)], [(7, 2)]),
        (5, [(0, 5)], [(5, "c"), (6, 3)]),
        (3, [(0, 3)], [(3, 2), (5, "c"), (6, 3)]),
        (0, [], [(0, 5), (5, "c"), (6, 3)]),
    ]:
        h, r = fitting([a, c, b], free)
        assert (shape(h), shape(r)) == (head, rest), free


def test_a_worker_allocates_and_budgets_only_its_row_block(series):
    """A 1024x1024 scan: its whole state (a stack row per position) is far over a 256 MiB
    budget, which one process refuses at calibration. A worker's series holds only its
    block (about 64 MiB), allocates nothing else of that size and is not refused."""
    info, frames, _, settings = series
    big = replace(info, scan_shape=(1024, 1024), frames_expected=1024 * 1024)
    budget = replace(settings, memory_budget_bytes=256 << 20)
    with pytest.raises(BudgetExceeded, match="1024x1024 scan"):
        SeriesProcessor(big, budget)
    tracemalloc.start()
    try:
        worker = SeriesProcessor(big, replace(budget, row_block_rows=0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    state = worker.acc.state
    assert state.stack.shape[0] == worker.acc.rows.slot_pos.size < 1024 * 1024
    assert 32 << 20 < state.nbytes() <= (64 << 20) + state.seen.nbytes + (1 << 20)
    assert peak < state.nbytes() + (48 << 20), peak  # (the block, the row map, the seen map)
    with pytest.raises(BudgetExceeded, match="a worker's block of 4096 rows"):
        SeriesProcessor(big, replace(budget, row_block_rows=4096, memory_budget_bytes=1 << 20))
    huge = replace(info, scan_shape=(4096, 4096), frames_expected=4096 * 4096)
    with pytest.raises(BudgetExceeded, match="a worker's block of 16 rows"):  # 21 B/position
        SeriesProcessor(huge, replace(budget, row_block_rows=16))


def test_a_worker_reuses_its_delta_buffers_only_once_zmq_has_sent_them(series):
    """A delta goes out without a copy (`WorkerSeries.send_delta`): while zmq still holds it
    (here an inproc peer that has not read it yet, which reads the very buffers) the next
    delta goes to new arrays, so the first arrives intact; once it is released the buffers
    serve again."""
    info, frames, blobs, settings = series
    memory_reserve.prepare_kept(8 << 20)  # (as a worker process at start)
    s = WorkerSeries(info, gen=0)
    s.proc = SeriesProcessor(info, replace(settings, row_block_rows=ROWS))
    s.taker = DeltaTaker(s.proc.acc.state, s.proc.acc.rows)
    ctx = zmq.Context()
    peer, link = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    peer.bind("inproc://deltas")
    link.connect("inproc://deltas")
    try:
        sent = []
        for k in range(3):
            s.proc.add_many(batches(frames, blobs, range(k * ROWS, (k + 1) * ROWS), False))
            delta = s.take_delta()
            sent.append({n: v.copy() for n, v in delta.values.items()})
            reused = np.shares_memory(delta.values["stack"], s.delta_out["stack"])
            assert reused == (k != 1), k  # the first delta is still unread at the second
            s.send_delta(link, delta_message(1, 0, delta, False), None)
            if k == 1:
                for values in sent[:2]:
                    got = delta_from(unpack(peer.recv_multipart(copy=False))[2])
                    for name, want in values.items():
                        np.testing.assert_array_equal(got.values[name], want, err_msg=name)
                del got
                s.delta_busy[0].wait(5.0)
        assert sent[2]["hits"].sum() == ROWS
        block, buffers = s.proc.acc.state.stack, s.delta_out["stack"]
        tracker = s.delta_busy[0]
        s.release()  # dropped with its last delta unread: that memory is not lent yet
        assert [np.shares_memory(block, b) for b in memory_reserve._kept] == [True]
        assert [np.shares_memory(buffers, b) for b, *_ in memory_reserve._pending] == [True]
        got = delta_from(unpack(peer.recv_multipart(copy=False))[2])
        assert np.shares_memory(got.values["stack"], buffers)
        for name, want in sent[2].items():
            np.testing.assert_array_equal(got.values[name], want, err_msg=name)
        del got
        tracker.wait(5.0)  # read and let go: lent again
        lent = [memory_reserve.take_kept(1) for _ in range(2)]
        assert sorted(np.shares_memory(b, buffers) for b in lent) == [False, True]
    finally:
        for pool in (memory_reserve._kept, memory_reserve._lent, memory_reserve._pending):
            pool.clear()
        peer.close(linger=0)
        link.close(linger=0)
        ctx.term()


needs_shm = pytest.mark.skipif(shared_segments.free_bytes() < 64 << 20,
                               reason="/dev/shm lacks the room (the deltas go over the link)")


@pytest.fixture
def clean():
    yield
    memory_reserve.unlink_shared()
    memory_reserve.unshare()
    for pool in (memory_reserve._kept, memory_reserve._lent, memory_reserve._pending):
        pool.clear()


class Inbox:  # what `MergedMark` reads of a worker's `LinkInbox`
    merged = 0


def worker_series(info, settings, rows: int = ROWS) -> WorkerSeries:
    s = WorkerSeries(info, gen=0)
    s.proc = SeriesProcessor(info, replace(settings, row_block_rows=rows))
    s.taker = DeltaTaker(s.proc.acc.state, s.proc.acc.rows)
    return s


def pair(ctx):
    peer, link = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    peer.bind("inproc://deltas")
    link.connect("inproc://deltas")
    return peer, link


@needs_shm
def test_deltas_in_shared_memory_are_read_in_place_and_kept_until_merged(series, clean):
    """The coordinator maps the segments its worker names (and unlinks them), reads each delta
    where the worker took it, read-only; the message carries only the small arrays. Deltas of
    at most half the block alternate between the halves of the buffers; with both halves
    unmerged the next goes to new arrays (sent whole); a merged answer frees them."""
    info, frames, blobs, settings = series
    memory_reserve.prepare_kept(8 << 20, shared=TAG)
    names = memory_reserve.shared_names()
    assert len(names) == 2 and all((shared_segments.SHM_DIR / n).exists() for n in names)
    segments = PeerSegments.open(names, OURS())
    assert not any((shared_segments.SHM_DIR / n).exists() for n in names)  # unlinked at once
    inbox, sent, half = Inbox(), 0, 21  # (the second half's rows start at an odd row)
    s = worker_series(info, settings, rows=2 * half)
    ctx = zmq.Context()
    peer, link = pair(ctx)
    try:
        taken, halves = [], []
        for k in range(4):
            idx = range(k * half, (k + 1) * half)
            s.proc.add_many(batches(frames, blobs, idx, False))
            delta = s.take_delta()
            taken.append({n: v.copy() for n, v in delta.values.items()})
            halves.append(s.delta_halves)
            sent += sum(a.nbytes for a in delta.values.values())
            parts = delta_message(1, 0, delta, False, sent, s.locate)
            s.send_delta(link, parts, MergedMark(inbox, sent))
            got_parts = peer.recv_multipart(copy=False)
            got = delta_from(unpack(got_parts, segments)[2])
            carried = sum(memoryview(p).nbytes for p in got_parts)
            for name, want in taken[k].items():
                np.testing.assert_array_equal(got.values[name], want, err_msg=name)
            if k != 2:  # in shared memory: described, not carried; the coordinator reads it
                assert carried < delta.values["stack"].nbytes / 4, carried
                assert not got.values["stack"].flags.writeable
            else:  # both halves unmerged: new arrays, carried whole
                assert carried > delta.values["stack"].nbytes
            del got
            if k == 2:
                inbox.merged = sent  # the coordinator has merged all of them
        assert halves == [(0,), (1,), (), (0,)]
        assert segments.bytes_read > 0
        with pytest.raises(LinkError, match="shares none"):  # the same message from elsewhere
            unpack(delta_message(1, 0, s.take_delta(), False, sent, s.locate))
    finally:
        segments.close()
        peer.close(linger=0)
        link.close(linger=0)
        ctx.term()


def test_deltas_over_the_link_use_the_halves_while_zmq_holds_the_last(series, clean):
    """Without shared memory a half is free once ZeroMQ has let go of the delta in it."""
    info, frames, blobs, settings = series
    memory_reserve.prepare_kept(8 << 20)
    s = worker_series(info, settings)
    ctx = zmq.Context()
    peer, link = pair(ctx)
    try:
        halves, taken = [], []
        for k in range(3):
            s.proc.add_many(batches(frames, blobs, range(k * 10, (k + 1) * 10), False))
            delta = s.take_delta()
            taken.append({n: v.copy() for n, v in delta.values.items()})
            halves.append(s.delta_halves)
            s.send_delta(link, delta_message(1, 0, delta, False), None)
        assert halves == [(0,), (1,), ()]  # nothing read yet: the third into new arrays
        for want in taken:
            got = delta_from(unpack(peer.recv_multipart(copy=False))[2])
            for name, a in want.items():
                np.testing.assert_array_equal(got.values[name], a, err_msg=name)
            del got
        for mark in s.delta_busy:
            mark.wait(5.0)
        s.proc.add_many(batches(frames, blobs, range(30, 40), False))
        s.take_delta()
        assert s.delta_halves == (0,)
    finally:
        peer.close(linger=0)
        link.close(linger=0)
        ctx.term()


@needs_shm
def test_a_coordinator_maps_only_its_workers_own_segments(clean):
    """Names of another process, of other files or too many are refused; a delta's array
    outside a segment is a bad link message."""
    memory_reserve.prepare_kept(1 << 20, count=1, shared=TAG)
    names = memory_reserve.shared_names()
    other_tag = shared_segments.owner(os.getpid(), "0123456789abcdef")
    other_pid = shared_segments.owner(os.getpid() + 1, TAG)
    for bad, whose in ((names, other_tag), (names, other_pid), (["../etc/passwd"], OURS()),
                       ("tcbf-live-1-0", OURS()), ([names[0]] * 9, OURS()),
                       ([names[0].replace(TAG, "0123456789abcdef")], OURS())):  # fmt: skip
        with pytest.raises(SegmentError):
            PeerSegments.open(bad, whose)
    segments = PeerSegments.open(names, OURS())
    try:
        a = memory_reserve._kept[0][:64].view(np.float32)
        for where in ((0, (1 << 20) - 8), (1, 0), (0, -8), (0, 2)):  # beyond, none, <0, odd
            head = pack("delta", {}, {"stack": a}, locate=lambda v, w=where: w)
            with pytest.raises(LinkError):
                unpack(head, segments)
        got = unpack(pack("x", {}, {"stack": a}, locate=memory_reserve.locate), segments)[2]
        assert got["stack"].shape == (16,)
    finally:
        segments.close()


def test_the_coordinator_shares_dev_shm_out_before_it_spawns_workers(monkeypatch):
    """Workers that /dev/shm cannot hold all together get no tag and send over the link, so
    that they do not race for its last room (each checks again when it creates them)."""
    monkeypatch.setattr(shared_segments, "free_bytes", lambda: 5 << 20)
    assert shared_segments.allot(4, 2 << 20) == 2
    assert shared_segments.allot(2, 2 << 20) == 2
    assert shared_segments.allot(3, 8 << 20) == 0


def test_without_room_in_dev_shm_the_kept_memory_is_the_workers_own(monkeypatch, clean):
    def full(nbytes, number, tag):
        raise SegmentError("/dev/shm has 3 MiB free")

    monkeypatch.setattr(shared_segments, "create", full)
    memory_reserve.prepare_kept(1 << 20, shared=TAG)
    assert len(memory_reserve._kept) == 2 and memory_reserve.shared_names() == []
    assert memory_reserve.locate(memory_reserve._kept[0]) is None


@needs_shm
def test_the_segments_of_a_worker_that_never_joined_are_removed(clean):
    """A worker killed before its coordinator mapped (and unlinked) its segments leaves files
    in /dev/shm: the coordinator removes them at its end (`WorkerPool.close`), and only them:
    another process spawned under the same pid (a reused one) has another tag."""
    memory_reserve.prepare_kept(1 << 20, shared=TAG)
    files = [shared_segments.SHM_DIR / n for n in memory_reserve.shared_names()]
    assert len(files) == 2 and all(f.exists() for f in files)
    shared_segments.unlink_of(shared_segments.owner(os.getpid(), shared_segments.new_tag()))
    assert all(f.exists() for f in files)
    shared_segments.unlink_of(OURS())
    assert not any(f.exists() for f in files)


@needs_shm
def test_a_shared_buffer_a_larger_block_frees_is_unmapped_by_the_coordinator_too(clean):
    """A series whose block the kept buffers cannot hold frees one (`take_kept`) and allocates
    its own, as before; a shared one is named in the worker's beats (`unshared`) and the
    coordinator unmaps it (`PeerSegments.drop`), so its memory goes from both processes."""
    from tcbf_live.stream.receiver import StreamCounters
    from tcbf_live.stream.worker_series import beat

    memory_reserve.prepare_kept(1 << 20, shared=TAG)
    segments = PeerSegments.open(memory_reserve.shared_names(), OURS())
    try:
        assert memory_reserve.take_kept(2 << 20) is None  # (too large: one is freed)
        assert len(memory_reserve._kept) == 1 and memory_reserve.unshared() == [0]
        head = unpack(beat(StreamCounters(), {}, 0, 0))[1]
        segments.drop(head["unshared"])
        with pytest.raises(ValueError, match="no segment 0"):
            segments.view(0, 0, 8)
        assert segments.view(1, 0, 8).nbytes == 8
        kept = memory_reserve.take_kept(1 << 20)
        assert memory_reserve.locate(kept) == (1, 0)
    finally:
        segments.close()


@needs_shm
def test_a_coordinator_does_not_block_on_a_planted_fifo(clean):
    """A name of the right form that is not a regular file of this user (here a FIFO, which a
    blocking open would wait on forever) is refused at once."""
    whose = shared_segments.owner(1 << 30, TAG)  # (no such process)
    fifo = shared_segments.SHM_DIR / f"tcbf-live-{whose}-0"
    os.mkfifo(fifo)
    try:
        with pytest.raises(SegmentError, match="not a segment"):
            PeerSegments.open([fifo.name], whose)
    finally:
        fifo.unlink(missing_ok=True)
