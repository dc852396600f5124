"""A worker's deltas in flight are bounded (`stream.worker_inbox`): it sends one only while
the coordinator has answered "merged" for all but `delta_credit_bytes` of those it sent, so a
slow or silent coordinator cannot let deltas pile up in ZeroMQ's queues."""

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from test_workers import assert_same, messages, receive, workers

from tcbf_live.detectors.base import FrameBatch
from tcbf_live.simulators import Simulator, tutorial_config
from tcbf_live.stream import memory_reserve, worker
from tcbf_live.stream.engine import Engine
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor
from tcbf_live.stream.worker import Worker
from tcbf_live.stream.worker_inbox import LinkInbox
from tcbf_live.stream.worker_link import WorkerConfig, pack, settings_to_dict, unpack


@pytest.fixture(scope="module")
def sim():
    return Simulator(tutorial_config(scan_shape=(16, 24), bad_pixels=4))


@pytest.fixture
def link_pair():
    """(coordinator ROUTER, worker DEALER "w0"), connected over inproc."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"w0")
    router.bind("inproc://link")
    dealer.connect("inproc://link")
    yield router, dealer
    ctx.destroy(linger=0)


def settle(sock: zmq.Socket) -> None:
    assert sock.poll(2000), "nothing arrived"


def test_the_inbox_gives_credit_back_as_the_coordinator_answers(link_pair):
    router, dealer = link_pair
    inbox = LinkInbox(dealer, 0, credit_bytes=1000)
    assert inbox.credit(0)
    assert inbox.delta_sent(600) == 600 and inbox.credit(0)  # 600 in flight < 1000
    assert inbox.delta_sent(600) == 1200
    t0 = time.monotonic()
    assert not inbox.credit(200)  # no answer: waited 0.2 s, then no
    assert 0.19 < time.monotonic() - t0 < 2.0
    assert inbox.waits[0] == 1 and inbox.waits[1] >= 0.19
    for part in (
        pack("ctl", {"n": 1}),
        pack("merged", {"bytes": 600}),
        pack("drop", {"n": 2}),
        pack("merged", {"bytes": 100}),
    ):  # a late, smaller answer changes nothing
        router.send_multipart([b"w0", *part])
    settle(dealer)
    assert inbox.credit(1000)  # 600 in flight again
    while dealer.poll(100):  # (inproc delivers in order; read whatever is still on its way)
        inbox.read()
    assert inbox.merged == 600 and inbox.in_flight() == 600
    assert [(k, h["n"]) for k, h, _, _ in inbox.items] == [("ctl", 1), ("drop", 2)]
    router.send_multipart([b"w0", b"\xc1not msgpack"])  # a bad message is skipped, logged
    settle(dealer)
    inbox.read()
    assert len(inbox.items) == 2


def _worker(link: zmq.Socket, sim, credit: int) -> tuple[Worker, SeriesProcessor]:
    proc = SeriesProcessor(sim.series_info(5), ProcessingSettings())
    proc.add(FrameBatch(5, 0, sim.frames(0, 64)))
    data = SubscriberSettings(endpoint="tcp://127.0.0.1:1", socket_type="pull")
    config = WorkerConfig(0, "native", data.endpoint, "pull", 1000, 1 << 20, None, None, 60.0,
                          1 << 20, settings_to_dict(ProcessingSettings()), row_block_rows=8,
                          delta_credit_bytes=credit)  # fmt: skip
    w = Worker(link, config, data)
    w.on_start(sim.series_info(5), repeat=False)
    w.calibrated(5, 1, proc.raw_calibration)
    return w, proc


def test_a_worker_holds_its_deltas_back_while_the_coordinator_has_not_merged(
    sim, link_pair, monkeypatch
):
    """Credit of 1 byte: one delta in flight at a time. The coordinator does not answer, so
    the worker's 8-row block, full again, cannot be emptied: the frames that do not fit wait
    (here 1 s), then are counted lost; nothing more is queued on the link. Once "merged"
    comes, the next delta goes and the frames land."""
    router, dealer = link_pair
    monkeypatch.setattr(worker, "ROOM_WAIT_S", 1.0)
    w, _ = _worker(dealer, sim, credit=1)
    try:
        w.fold([FrameBatch(5, 0, sim.frames(0, 8))])  # the block is full
        w.fold([FrameBatch(5, 8, sim.frames(8, 8))])  # a delta (credit), then these 8 fit
        kind, head, arrays, _ = unpack(router.recv_multipart()[1:])
        assert kind == "delta" and arrays["rows"].size == 8
        assert head["sent"] == w.inbox.sent == sum(a.nbytes for a in arrays.values())
        t0 = time.monotonic()
        w.fold([FrameBatch(5, 16, sim.frames(16, 8))])  # no credit: waits, then lost
        assert 0.9 < time.monotonic() - t0 < 5.0
        assert w.counters.rejected == {"no_room": 8}
        assert w.inbox.waits[0] >= 1 and w.inbox.waits[1] >= 0.9
        while router.poll(100):  # beats may come; no second delta
            assert msgpack.unpackb(router.recv_multipart()[1])["t"] != "delta"
        router.send_multipart([b"w0", *pack("merged", {"bytes": head["sent"]})])
        settle(dealer)
        w.fold([FrameBatch(5, 16, sim.frames(16, 8))])  # credit again: the delta goes
        kind, head, arrays, _ = unpack(router.recv_multipart()[1:])
        assert kind == "delta" and np.array_equal(arrays["rows"], np.arange(8, 16))
        assert head["sent"] == w.inbox.sent and w.series[5].proc.acc.rows.used == 8
    finally:
        w.sock.close(linger=0)


def test_deltas_sent_one_at_a_time_give_what_one_process_gives(sim, monkeypatch):
    """Two workers with a credit of 1 byte (each delta waits for the coordinator to merge the
    one before) and 48-row blocks: the same result as one process, and the waits counted
    (each merge made to take 20 ms, twice the sync interval, so that deltas wait)."""
    from tcbf_live.stream.coordinator import Coordinator

    merge = Coordinator.merge_delta

    def slow_merge(self, *args, **kwargs):
        time.sleep(0.02)
        return merge(self, *args, **kwargs)

    def burst(eng, k):
        if k < 150:
            time.sleep(0.002)

    stream = messages(sim, "native")
    one = receive(Engine, "native", stream).last_result
    monkeypatch.setattr(Coordinator, "merge_delta", slow_merge)
    eng = receive(workers(2, row_block_rows=48, sync_interval_s=0.01, delta_credit_bytes=1),
                  "native", stream, during=burst)  # fmt: skip
    assert_same(eng.last_result, one)
    assert not eng.lost and not eng.counters.rejected
    assert sum(p.merge_waits[0] for p in eng.receiver.peers.values()) > 0


def test_a_worker_held_back_asks_again_so_a_lost_answer_holds_nothing_back(link_pair):
    """The answer to the last delta never came (dropped, or the delta did not decode): the
    waiting worker asks ("credit", at most every ASK_S) and the coordinator's answer to that
    gives the credit back."""
    router, dealer = link_pair
    inbox = LinkInbox(dealer, 0, credit_bytes=1)
    inbox.delta_sent(10)
    assert not inbox.credit(100)
    settle(router)
    _, *parts = router.recv_multipart()
    kind, head, _, _ = unpack(parts)
    assert (kind, head) == ("credit", {"sent": 10})
    assert not inbox.credit(100) and not router.poll(50)  # asked 0.1 s ago: not again yet
    router.send_multipart([b"w0", *pack("merged", {"bytes": 10})])
    settle(dealer)
    assert inbox.credit(0) and inbox.waits[0] == 1  # one hold, counted once
    router.send_multipart([b"w0", *pack("merged", {"bytes": 99})])  # more than was sent
    settle(dealer)
    inbox.read()
    assert inbox.merged == 10  # (a name rejoined: answers to another process' deltas)


def test_a_flush_sends_every_series_last_delta_without_waiting_for_credit(sim, link_pair):
    """The run ends (no series end): "flush" takes each series' last delta although the one
    before is not merged yet; nothing stays in the block."""
    router, dealer = link_pair
    w, _ = _worker(dealer, sim, credit=1)
    try:
        w.fold([FrameBatch(5, 0, sim.frames(0, 8))])
        w.sync()
        assert unpack(router.recv_multipart()[1:])[0] == "delta"
        w.fold([FrameBatch(5, 8, sim.frames(8, 4))])
        w.sync(wait_ms=100)  # held back: no credit
        assert w.series[5].proc.acc.rows.used == 4
        router.send_multipart([b"w0", *pack("flush")])
        settle(dealer)
        w.on_link()
        kinds = []
        while router.poll(500):
            kind, head, arrays, _ = unpack(router.recv_multipart()[1:])
            kinds.append(kind)
            if kind == "delta":
                assert np.array_equal(arrays["rows"], np.arange(8, 12))
        assert [k for k in kinds if k != "credit"] == ["delta", "beat", "flushed"]
        assert w.series[5].proc.acc.rows.used == 0
    finally:
        w.sock.close(linger=0)


def test_messages_read_while_waiting_for_credit_are_handled_by_the_run_loop(sim, link_pair):
    """`sync` reads the link while it waits; what it queued (here "stop") is handled at once,
    although the socket has nothing more to signal."""
    router, dealer = link_pair
    w, _ = _worker(dealer, sim, credit=1)
    try:
        router.send_multipart([b"w0", *pack("stop")])
        settle(dealer)
        w.inbox.read()  # as a waiting `sync` does
        assert not dealer.poll(0) and len(w.inbox.items) == 1
        thread = threading.Thread(target=w.run, daemon=True)
        thread.start()
        thread.join(3.0)
        stuck = thread.is_alive()
        w.stopping = True
        thread.join(3.0)
        assert not stuck
    finally:
        w.sock.close(linger=0)


def test_a_worker_folds_the_next_series_into_the_memory_the_last_gave_back(sim, link_pair):
    """`Worker.drop` gives a series' kept memory back (`WorkerSeries.release`): the next run
    of the id folds into the same block; its delta buffers, still in ZeroMQ's hands when the
    series was dropped (the coordinator had not read the last delta), serve again once read."""
    router, dealer = link_pair
    memory_reserve.prepare_kept(8 << 20)  # as a worker process at start
    w, proc = _worker(dealer, sim, credit=1 << 30)
    try:
        block = w.series[5].proc.acc.state.stack
        assert any(np.shares_memory(block, b) for b, _ in memory_reserve._lent.values())
        w.fold([FrameBatch(5, 0, sim.frames(0, 8))])
        w.sync()  # the delta, into the other kept buffer, unread by the coordinator
        buffers = w.series[5].delta_out["stack"]
        w.drop(5, "ended")
        assert [np.shares_memory(block, b) for b in memory_reserve._kept] == [True]
        kind, _, arrays, _ = unpack(router.recv_multipart(copy=False)[1:])
        assert kind == "delta" and arrays["stack"].sum() > 0
        del arrays  # the coordinator lets go
        time.sleep(0.2)
        w.on_start(sim.series_info(5), repeat=False)  # the id's next run
        w.calibrated(5, 2, proc.raw_calibration)
        again = w.series[5].proc.acc.state
        assert np.shares_memory(again.stack, block) and not again.stack.any()
        w.fold([FrameBatch(5, 0, sim.frames(0, 8))])
        w.sync()
        assert np.shares_memory(w.series[5].delta_out["stack"], buffers)
    finally:
        w.sock.close(linger=0)
        for pool in (memory_reserve._kept, memory_reserve._lent, memory_reserve._pending):
            pool.clear()
