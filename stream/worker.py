"""A worker: one receiving process with its own detector socket (`run --workers N`, or
`tcbf-live worker` elsewhere; `stream.worker_process` runs it), folding its frames into its
own state. Control messages (`detectors.routing`) go to the coordinator, which relays them to
every worker in one order (PUB: each decodes them in place). Frames of a series not yet known
or calibrated wait in a backlog bounded in bytes; every `sync_interval_s` each series' growth
goes to the coordinator as a `StateDelta` (one not sent stays in the state)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import replace

import zmq

from tcbf_live.detectors.base import (
    CompressedFrame,
    DecodeError,
    FrameBatch,
    SeriesEnd,
    SeriesInfo,
    SeriesStart,
)
from tcbf_live.detectors.registry import DecoderOptions, protocol
from tcbf_live.stream import worker_series
from tcbf_live.stream.budget import BudgetExceeded, memory_budget_bytes
from tcbf_live.stream.lane_reader import MAX_LANE_MESSAGES, lane_for
from tcbf_live.stream.priority import freeze_startup_objects
from tcbf_live.stream.receiver import StreamCounters, SubscriberSettings, open_socket
from tcbf_live.stream.series import SeriesError, SeriesProcessor
from tcbf_live.stream.tcbf.accumulators import ACCEPTED, NEXT_INDEX
from tcbf_live.stream.tcbf.calibration import Calibration
from tcbf_live.stream.tcbf.deltas import DeltaTaker
from tcbf_live.stream.transport import OversizedMessage, recv_capped
from tcbf_live.stream.worker_inbox import LinkInbox
from tcbf_live.stream.worker_link import (
    WorkerConfig,
    delta_message,
    delta_nbytes,
    pack,
    settings_from_dict,
)
from tcbf_live.stream.worker_series import Backlog, WorkerSeries

log = logging.getLogger(__name__)

WAITING = ("no_start", "wrong_series")  # a frame message whose series this worker lacks yet
BACKLOG_S = 30.0  # frame messages wait this long for their series' start, then are rejected
BEAT_S = 0.25  # counters to the coordinator (also: this worker is alive)
CLOSED = 64  # ended or dropped series remembered (to name their stragglers)
ROOM = MAX_LANE_MESSAGES  # rows free in every row block before detector messages are read
ROOM_WAIT_S = 30.0  # frames in hand wait this long for rows (the coordinator takes no delta)


class Worker:
    """Receive, fold and report the share of a stream this process gets."""

    def __init__(self, link: zmq.Socket, config: WorkerConfig, data: SubscriberSettings,
                 budget_bytes: int | None = None):  # fmt: skip
        self.link, self.config = link, config
        self.inbox = LinkInbox(link, config.index, config.delta_credit_bytes)  # and credit
        self.wire = protocol(config.protocol)
        self.shared = config.socket_type == "sub"  # every worker receives every message
        self.settings = settings_from_dict(config.processing, memory_budget_bytes(budget_bytes))
        self.sock = open_socket(data)
        self.decoder = self.wire.decoder(DecoderOptions(defer_bslz4=self.wire.bslz4_frames,
                                                        channel=config.channel))  # fmt: skip
        self.counters = StreamCounters()
        self.lane = lane_for(self.sock, self.decoder, self.shared, config.lane)
        self.series: dict[int, WorkerSeries] = {}
        self.closed: dict[int, str] = {}  # ended / dropped ids -> why
        self.runs: dict[int, int] = {}  # starts of each id so far (its runs: `gen`)
        self.backlog = Backlog(config.backlog_bytes, BACKLOG_S)
        self.cpu_s: Counter = Counter()  # CPU seconds of this thread by stage (beats say)
        self.stopping = self._warm = False  # _warm: the kernels ran once (numba cache)
        self.freeze_after_first_delta = False  # a worker process: `freeze_startup_objects`
        self.unsent, self.row_waits = 0, (0, 0.0)  # sends given up; full-block deltas: n, s
        self.early_cal: tuple | None = None  # a calibration that came before its series' start
        self._process0: float | None = None  # process CPU time at the first message

    def run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.sock, self.link):
            poller.register(sock, zmq.POLLIN)
        last_sync = last_beat = time.monotonic()
        while not self.stopping:
            ready = dict(poller.poll(0 if self.inbox.items else 20))
            if self.link in ready or self.inbox.items:  # (`sync` may have read the link)
                self.on_link()
            if self.sock in ready and not self.stopping and self.make_room(ROOM, 0.1):
                self.on_data()
            now = time.monotonic()
            if now - last_sync >= self.config.sync_interval_s:
                self.sync()
                last_sync = now
            if now - last_beat >= BEAT_S:
                self.backlog.expire(now, self.counters)
                self.beat()
                last_beat, self.stopping = now, self.stopping or self.inbox.gone()
        self.sync()
        self.beat()

    def send(self, parts: list, block_s: float = 1.0) -> bool:
        """Send to the coordinator, waiting at most `block_s` for room (False: not sent)."""
        if not self.link.poll(int(block_s * 1000), zmq.POLLOUT):
            self.unsent += 1  # counted in the beats; the coordinator's log names it
            if self.unsent <= 10:
                log.warning("worker %d: the link to the coordinator is full: a message was "
                            "not sent (%d so far)", self.config.index, self.unsent)  # fmt: skip
            return False
        self.link.send_multipart(parts, copy=False)
        return True

    # ------------------------------------------------------------------ detector messages
    def on_data(self, limit: int = 64) -> int:
        """Read detector messages (the lane's, then up to `limit` more), decode, fold; the count."""
        t0, received = time.thread_time(), []
        t = self.lane and self.lane.take(self.lane_series, self.config.max_message_bytes,
                                         self.counters)  # fmt: skip
        if t:
            if t.folded:
                self.series[t.series_id].frames += t.folded
            if t.parts:
                self.received(t.parts, received)
            self.cpu_s["lane"] += time.thread_time() - t0
            t0 = time.thread_time()
        for _ in range(0 if t and t.series_id is not None else limit):  # the lane reads on
            try:
                parts = recv_capped(self.sock, self.config.max_message_bytes)
            except zmq.Again:
                break
            except OversizedMessage as exc:
                self.counters.messages += 1
                self.counters.reject(DecodeError("oversized", str(exc)))
                continue
            self.received(parts, received)
        t1 = time.thread_time()
        frames: list[FrameBatch | CompressedFrame] = []
        for parts in received:  # (PUB: a control message acts here: the frames before it first)
            if frames and self.shared and self.wire.rank(parts) is not None:
                self.fold(frames)
                frames = []
            frames.extend(self.decode(parts, from_detector=True))
        self.cpu_s["receive"] += t1 - t0
        self.cpu_s["parse"] += time.thread_time() - t1
        self.fold(frames)  # `accumulate` counts its own time
        return (t.folded if t else 0) + len(received)

    def lane_series(self, info: SeriesInfo) -> SeriesProcessor | None:
        return getattr(self.series.get(info.series_id), "proc", None)  # calibrated: folds

    def received(self, parts: list, received: list) -> None:
        """A detector message: a control message to the coordinator, else to be decoded."""
        self.counters.messages += 1
        if self._process0 is None:
            self._process0 = time.process_time()
        if self.wire.rank(parts) is None:
            received.append(parts)
        elif not self.shared:  # decoded as relayed, in one order
            self.send(pack("ctl", {"ts": time.time_ns(), "relay": True}, raw=parts))
        else:  # PUB: every worker decodes it; the coordinator too (a copy from each: it keeps
            #    the first, so no worker is the only one that sends them)
            received.append(parts)
            self.send(pack("ctl", {"ts": time.time_ns(), "relay": False}, raw=parts))

    def decode(self, parts: list, from_detector: bool) -> list:
        """Handle the message's control events now; return its frame events. A frame message
        of a series this worker has no start for yet waits in the backlog. What is wrong with
        a control message is counted by the coordinator, which decodes each one too."""
        counters = self.counters if self.wire.rank(parts) is None else StreamCounters()
        try:
            out = self.decoder.decode([worker_series.buffer(p) for p in parts])
        except DecodeError as err:
            if err.reason in WAITING and from_detector:
                self.backlog.hold(parts, counters)
            else:
                counters.reject(err)
            out = None
        except Exception as exc:  # a decoder bug must not take the worker down
            counters.reject(DecodeError("decoder_error", repr(exc)))
            out = None
        for err in self.decoder.drain_errors():
            counters.reject(err)
        events = out if isinstance(out, list) else [] if out is None else [out]
        frames = []
        for e in events:
            if isinstance(e, SeriesStart):
                if from_detector:  # V1 starts with its first image: the coordinator's start
                    self.send(pack("first", {}, raw=parts))
                self.on_start(e.info, e.repeat)
                if not from_detector:  # its header is complete: what waited for it goes now
                    self.fold(frames)
                    frames = []
                    self.replay()
            elif isinstance(e, SeriesEnd):
                self.fold(frames)
                frames = []
                self.on_end(e.series_id, drain=not self.shared)
            else:
                frames.append(e)
        return frames

    def replay(self) -> None:
        """Decode the backlog again (a relayed control message may have made it known)."""
        frames = []
        for t, parts in self.backlog.take():
            before = len(self.backlog.items)
            frames.extend(self.decode(parts, from_detector=True))
            if len(self.backlog.items) > before:  # still unknown: keep its age
                self.backlog.items[-1] = (t, parts)
        self.fold(frames)

    # ------------------------------------------------------------------ series
    def on_start(self, info: SeriesInfo, repeat: bool) -> None:
        """A series starts. Each start that is not a re-announcement is the id's next run
        (`gen`, counted as the coordinator counts it: both decode the same control messages
        in one order); a run still open here ends first, as in one process."""
        sid = info.series_id
        if repeat:
            if sid not in self.series and sid not in self.closed:  # joined late
                self.series[sid] = WorkerSeries(info, self.runs.setdefault(sid, 1))
        else:
            if sid in self.series:  # restarted: the open run ends here (uncalibrated: dropped)
                self.on_end(sid, drain=False)
                self.drop(sid, "restarted")
            self.closed.pop(sid, None)
            self.runs[sid] = self.runs.get(sid, 0) + 1
            self.series[sid] = WorkerSeries(info, self.runs[sid])
        early, self.early_cal = self.early_cal, None
        if early is not None and early[0] == sid:  # (`calibrated` checks the run)
            self.calibrated(*early)

    def fold(self, frames: list) -> None:
        """Fold frame events by series (held until calibrated), keeping a PUB share only."""
        share = self.config.share if self.shared else None
        for sid, batches in worker_series.by_series(frames, share).items():
            s = self.series.get(sid)
            if s is None:
                why = "series_refused" if self.closed.get(sid) == "refused" else "wrong_series"
                for _ in batches:
                    self.counters.reject(DecodeError(why, f"frames of series {sid}"))
                continue
            s.frames += sum(worker_series.frame_count(b) for b in batches)
            if s.proc is None:
                for message in s.offers(batches, self.settings.calibration_frames, self.counters):
                    self.send(message)
                s.keep(batches, self.config.backlog_bytes - self.backlog.bytes, self.counters)
            else:
                self.accumulate(sid, s, batches)

    def accumulate(self, sid: int, s: WorkerSeries, batches: list) -> None:
        """Fold in what fits in the series' row block, a delta taken whenever it is full."""
        while batches and sid in self.series:
            head, batches = worker_series.fitting(batches, s.free_rows())
            if head:
                self._accumulate(sid, s, head)
            elif not self.make_room(1, ROOM_WAIT_S, only=s):
                n = sum(worker_series.frame_count(b) for b in batches)
                worker_series.lost(n, sid, self.config.index, self.counters)
                return

    def make_room(self, rows: int, wait_s: float, only: WorkerSeries | None = None) -> bool:
        """Deltas until every calibrated series (`only`: that one) has `rows` rows free, waiting
        at most `wait_s` for the link (back-pressure: nothing is read); counted in the beats."""
        series = [only] if only is not None else list(self.series.values())
        if not any(s.short_of(rows) for s in series):
            return True
        t0 = time.monotonic()
        while time.monotonic() - t0 <= wait_s and not self.stopping:
            self.sync(wait_ms=20)
            if not any(s.short_of(rows) for s in series):
                break
        self.row_waits = (self.row_waits[0] + 1, self.row_waits[1] + time.monotonic() - t0)
        return not any(s.short_of(rows) for s in series)

    def _accumulate(self, sid: int, s: WorkerSeries, batches: list) -> None:
        failed = s.proc.decode_failures
        t0 = time.thread_time()
        try:
            s.proc.add_many(batches)
        except Exception as exc:  # the series is dropped here, the worker goes on
            log.exception("worker %d: series %d failed", self.config.index, sid)
            self.refuse(sid, f"{type(exc).__name__}: {exc}")
            return
        finally:  # the first call loads the compiled kernels: start-up, not per frame
            self.cpu_s["accumulate" if self._warm else "start-up"] += time.thread_time() - t0
            self._warm = True
        for _ in range(s.proc.decode_failures - failed):
            self.counters.reject(DecodeError("bad_payload", "bslz4 frame does not decompress"))

    def calibrated(self, sid: int, gen: int | None, cal: Calibration) -> None:
        s = self.series.get(sid)
        if s is None or (gen is not None and gen > s.gen):  # its start (a restart: its next
            self.early_cal = (sid, gen, cal)  # run) has not reached this worker yet: kept
            return
        if s.proc is not None or gen not in (None, s.gen):
            return
        try:
            s.proc = SeriesProcessor(s.info, replace(self.settings, calibration=cal,
                                                     row_block_rows=self.config.row_block_rows))
        except (BudgetExceeded, SeriesError) as err:  # (only the row block is allocated)
            self.refuse(sid, str(err))
            return
        s.taker = DeltaTaker(s.proc.acc.state, s.proc.acc.rows)
        held, s.held, s.held_bytes = s.held, [], 0
        self.accumulate(sid, s, held)
        if s.ending:
            self.on_end(sid, drain=False)

    def refuse(self, sid: int, why: str) -> None:
        self.send(pack("refused", {"sid": sid, "why": why}))
        self.drop(sid, "refused")

    def drop(self, sid: int, why: str, gen: int | None = None) -> None:
        """Forget a series (`gen`: only that run of the id)."""
        if gen is not None and sid in self.series and self.series[sid].gen != gen:
            return
        if (s := self.series.pop(sid, None)) is not None:
            s.release()  # (its memory kept for the next series)
            if s.ending:
                self.send(pack("ended", {"sid": sid, "gen": s.gen, "frames": s.frames}), 5.0)
            for _ in s.held if why in ("refused", "restarted") else ():  # (never silently)
                self.counters.reject(DecodeError(f"series_{why}", f"frames of series {sid}"))
        self.closed[sid] = why
        while len(self.closed) > CLOSED:
            self.closed.pop(next(iter(self.closed)))

    def on_end(self, sid: int, drain: bool) -> None:
        """A series ended: read what is still queued here (sent before the end), then send
        the last delta and "ended" (with the frames received, for a series never calibrated)."""
        if drain:  # a bounded amount: the next series may already be streaming
            for _ in range(max(1, self.config.rcvhwm // 64) + 1):
                if not (self.sock.poll(0) and self.make_room(ROOM, ROOM_WAIT_S) and self.on_data()):
                    break  # (a full row block: the lane would read nothing)
        s = self.series.get(sid)
        if s is None:
            return
        if s.proc is None:  # its calibration is still to come: the end follows it
            s.ending = True
            self.send(pack("ending", {"sid": sid, "gen": s.gen}), 5.0)  # after every offer
            return
        self.sync(only=sid, final=True)
        self.send(pack("ended", {"sid": sid, "gen": s.gen, "frames": s.frames}), 5.0)
        self.drop(sid, "ended")

    def sync(self, only: int | None = None, final: bool = False, wait_ms: int = 0) -> None:
        """Each calibrated series' growth since its last delta, to the coordinator; nothing is
        taken without credit and room within `wait_ms` (`final`: no credit, 5 s for room)."""
        t0 = time.thread_time()
        for sid, s in list(self.series.items()):
            if s.taker is None or (only is not None and sid != only):
                continue
            if not self.inbox.room(5000 if final else wait_ms, credit=not final):
                if final:
                    log.error("worker %d: the last delta of series %d could not be sent: its "
                              "frames are missing", self.config.index, sid)  # fmt: skip
                break
            worker_series.lost(s.newly_lost(), sid, self.config.index, self.counters)
            delta = s.take_delta()
            self.counters.frames += int(delta.stats[ACCEPTED])
            if delta.rows.size or delta.seen.size or delta.stats[:NEXT_INDEX].any() or final:
                sent = self.inbox.delta_sent(delta_nbytes(delta))
                s.send_delta(self.link, delta_message(sid, s.gen, delta, final, sent, s.locate),
                             worker_series.MergedMark(self.inbox, sent))  # fmt: skip
            if delta.rows.size and self.freeze_after_first_delta:  # the kernels have run
                freeze_startup_objects(collect=False)
                self.freeze_after_first_delta = False
        self.cpu_s["delta"] += time.thread_time() - t0

    def beat(self, block_s: float = 0.0) -> None:
        """Counters to the coordinator (frames: folded and sent in deltas so far)."""
        process = time.process_time() - (self._process0 or 0.0)
        self.send(worker_series.beat(self.counters, {**self.cpu_s, "process": process},
                                     self.unsent, self.backlog.bytes, (*self.row_waits,
                                     *self.inbox.waits), self.inbox.sent), block_s)  # fmt: skip

    # ------------------------------------------------------------------ coordinator messages
    def on_link(self) -> None:
        self.inbox.read()
        while self.inbox.items:  # (a "flush" below may read more: they are handled here too)
            kind, head, arrays, raw = self.inbox.items.popleft()
            if kind == "ctl":  # control messages, in the order every worker sees
                for k in head.get("sizes", [len(raw)]):
                    message, raw = raw[:k], raw[k:]
                    self.fold(self.decode(message, from_detector=False))
                self.replay()
            elif kind == "cal":
                self.calibrated(head["sid"], head.get("gen"),
                                Calibration.from_json(head["calibration"]))  # fmt: skip
            elif kind == "drop":
                self.drop(head["sid"], head.get("why", "refused"), head.get("gen"))
            elif kind == "flush":  # the run ends: every series' last delta
                self.sync(final=True)
                self.beat(block_s=5.0)
                self.send(pack("flushed", {}), block_s=5.0)
            elif kind == "stop":
                self.stopping = True
                return
