"""The coordinator's receiver: its workers, through the worker link (`stream.coordinator`).

`WorkerPool` listens for workers (loopback unless told otherwise; CURVE when wider), starts the
local ones, and turns what they send into the engine's steps, in the engine's ingest thread:
control messages settle in a window (`SETTLE_S`), are ordered (`routing.starts_first`), decoded here
and relayed to every worker; offered frames calibrate here; deltas go to
`Coordinator.merge_delta`; an end waits for every live worker's "ended" (at most
`end_wait_s`); a worker that died or went silent is named in `lost` and never waited for.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import zmq

from tcbf_live.detectors.base import DecodeError, Event, SeriesEnd, SeriesStart
from tcbf_live.detectors.registry import DecoderOptions, protocol
from tcbf_live.detectors.routing import starts_first
from tcbf_live.stream.receiver import StreamCounters, decode_counted
from tcbf_live.stream.transport import open_link, release_context
from tcbf_live.stream.worker_link import (
    LINK_HWM,
    LINK_MAX_BYTES,
    LINK_VERSION,
    LinkError,
    WorkerConfig,
    delta_from,
    pack,
    settings_to_dict,
    unpack,
)
from tcbf_live.stream.worker_process import spawned

if TYPE_CHECKING:
    from tcbf_live.stream.coordinator import Coordinator, WorkerPlan
    from tcbf_live.stream.engine import EngineSettings

log = logging.getLogger(__name__)

SETTLE_S = 0.01  # control messages are ordered once none arrived for this long
CAL_WAIT_S = 1.0  # calibrate on what arrived when the first indices do not all come
MAX_PENDING = 4  # series whose calibration frames are held at once
MAX_CALIBRATION_FRAMES = 4096  # frames one offer may hold


@dataclass
class _Peer:
    index: int
    name: str
    last_seen: float
    messages: int = 0
    rejected: dict = field(default_factory=dict)
    frames: int = 0
    gone: str | None = None  # "died" / "stalled"
    cpu_s: dict = field(default_factory=dict)  # its CPU seconds by stage, last reported
    peak_rss_mb: float = 0.0
    flushed: bool = False


@dataclass
class _End:
    event: SeriesEnd
    waiting: set  # workers whose last delta is still to come
    deadline: float
    offered: set = field(default_factory=set)  # workers that offered all their frames


class WorkerPool:
    """The coordinator's receiver: its workers, through the worker link."""

    def __init__(self, engine: Coordinator, settings: EngineSettings, plan: WorkerPlan):
        self.engine, self.settings, self.plan = engine, settings, plan
        self.wire = protocol(settings.protocol)
        self.ctx = zmq.Context()
        self.link = open_link(self.ctx, zmq.ROUTER, plan.link, bind_here=True, hwm=LINK_HWM * 4,
                              role="the worker link", max_message_bytes=LINK_MAX_BYTES,
                              curve=plan.curve, linger_s=1.0)  # fmt: skip
        self.link.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.endpoint = self.link.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.decoder = self.wire.decoder(DecoderOptions(channel=settings.channel))
        self.peers: dict[bytes, _Peer] = {}
        self.processes: dict[bytes, mp.Process] = {}
        self.window: list[tuple[int, float, list, bool, bool]] = []  # ts, t, parts, relay, first
        self.last_ctl = 0.0
        self.candidates: dict[int, dict[int, np.ndarray]] = {}
        self.first_candidate: dict[int, float] = {}
        self.ends: dict[int, _End] = {}
        self.lost: list[str] = []  # what the run says at its end
        self.shared = settings.subscriber.socket_type == "sub"
        self.idle_since = time.monotonic()

    # ------------------------------------------------------------------ workers
    def start_local(self) -> None:
        spawn = mp.get_context("spawn")
        for k in range(self.plan.local):
            ident = f"w{k}".encode()
            p = spawn.Process(target=spawned, name=f"tcbf-worker-{k}", daemon=True,
                              args=(self.endpoint, ident, self.settings.subscriber.curve,
                                    logging.getLogger().getEffectiveLevel()))  # fmt: skip
            p.start()
            self.processes[ident] = p

    def wait_ready(self) -> None:
        """Until every local worker has joined (RuntimeError after `ready_timeout_s`)."""
        until = time.monotonic() + self.plan.ready_timeout_s
        while len(self.peers) < self.plan.local:
            if time.monotonic() > until or any(not p.is_alive() for p in self.processes.values()):
                raise RuntimeError(f"{self.plan.local - len(self.peers)} local worker(s) did "
                                   "not start")  # fmt: skip
            if self.link.poll(100):
                for events in self.on_link():
                    self.engine.process(events)

    def welcome(self, ident: bytes, head: dict) -> None:
        """A worker joined: its number (a local one's own, others after them) and config."""
        if ident in self.peers:  # a restarted worker under the same name: a new peer
            self.lose(ident, "restarted", "joined again")
        local = ident in self.processes
        n = int(ident[1:]) if local else self.plan.local + sum(
            1 for i in self.peers if i not in self.processes)  # fmt: skip
        s, sub = self.settings, self.settings.subscriber
        total = self.plan.local + self.plan.remote
        config = WorkerConfig(
            index=n, protocol=s.protocol, endpoint=sub.endpoint, socket_type=sub.socket_type,
            rcvhwm=sub.rcvhwm, max_message_bytes=sub.max_message_bytes, channel=s.channel,
            share=(n, max(total, n + 1)) if self.shared else None,
            sync_interval_s=self.plan.sync_interval_s, backlog_bytes=self.plan.backlog_bytes,
            processing=settings_to_dict(s.processing),
        )  # fmt: skip
        self.peers[ident] = _Peer(n, f"{head.get('host', '?')}:{head.get('pid', '?')}",
                                  time.monotonic())  # fmt: skip
        self.tell(ident, pack("welcome", {"config": config.to_json()}))
        log.info("worker %d joined (%s)", n, self.peers[ident].name)

    def tell(self, ident: bytes, parts: list) -> None:
        try:
            self.link.send_multipart([ident, *parts], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as err:  # gone (ROUTER_MANDATORY) or full (stalled): liveness
            #                          says so; a live worker reads its link every loop
            log.debug("worker %r: not sent: %s", ident, err)

    def tell_all(self, parts: list) -> None:
        for ident, peer in self.peers.items():
            if peer.gone != "died":
                self.tell(ident, parts)

    def live(self) -> set:
        return {i for i, p in self.peers.items() if p.gone is None}

    def check_peers(self, now: float) -> None:
        """Dead local processes and silent workers stop being waited for (said once)."""
        for ident, peer in self.peers.items():
            proc = self.processes.get(ident)
            if peer.gone != "died" and proc is not None and not proc.is_alive():
                self.lose(ident, "died", f"exit code {proc.exitcode}")
            elif peer.gone is None and now - peer.last_seen > self.plan.worker_timeout_s:
                self.lose(ident, "stalled", f"silent for {now - peer.last_seen:.1f} s")

    def lose(self, ident: bytes, how: str, detail: str) -> None:
        peer = self.peers[ident]
        peer.gone = how
        for end in self.ends.values():
            end.waiting.discard(ident)
        what = (f"worker {peer.index} ({peer.name}) {how} ({detail}): frames it had not sent "
                "are missing from the open series")  # fmt: skip
        self.lost.append(what)
        log.error(what)

    # ------------------------------------------------------------------ the engine's receiver
    def batches(self, should_stop: Callable[[], bool],
                timeout_s: float | None) -> Iterator[list[Event]]:  # fmt: skip
        """The events for the engine (starts, ends) while workers report; stops like
        `receiver.receive_event_batches` (idle: no worker received anything)."""
        while not should_stop():
            if self.link.poll(20):
                yield from self.on_link()
            now = time.monotonic()
            yield from self.settled(now)
            yield from self.due(now)
            self.check_peers(now)
            if timeout_s is not None and now - self.idle_since > timeout_s and not self.ends:
                break
        self.flush()

    def on_link(self, limit: int = 256) -> Iterator[list[Event]]:
        for _ in range(limit):
            try:
                ident, *parts = self.link.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                kind, head, arrays, raw = unpack(parts)
            except LinkError as err:
                self.engine.counters.reject(DecodeError("bad_link_message", str(err)))
                continue
            ident = bytes(ident.bytes)
            peer = self.peers.get(ident)
            if kind == "hello":
                if head.get("version") != LINK_VERSION:
                    log.error("a worker of another link version (%r) is not taken",
                              head.get("version"))  # fmt: skip
                else:
                    self.welcome(ident, head)
                continue
            if peer is None:
                continue  # not joined: nothing it says counts
            peer.last_seen = time.monotonic()
            if peer.gone == "stalled":
                peer.gone = None
                log.warning("worker %d is back", peer.index)
            yield from self.on_message(ident, peer, kind, head, arrays, raw)

    def on_message(self, ident, peer, kind, head, arrays, raw) -> Iterator[list[Event]]:
        now = time.monotonic()
        if kind in ("ctl", "first"):
            self.window.append((int(head.get("ts", 0)), now, raw, bool(head.get("relay")),
                                kind == "first"))  # fmt: skip
            self.last_ctl = now
            self.idle_since = now
        elif kind == "cal":
            self.candidate(int(head["sid"]), int(head["first"]), arrays["frames"])
        elif kind == "delta":
            try:
                delta = delta_from(arrays)
            except LinkError as err:
                self.engine.counters.reject(DecodeError("bad_link_message", str(err)))
                return
            self.engine.merge_delta(int(head["sid"]), delta)
            self.idle_since = now
        elif kind in ("ended", "ending"):  # "ending": all its frames offered, not calibrated
            end = self.ends.get(int(head["sid"]))
            if end is not None:
                end.offered.add(ident)
                if kind == "ended":
                    end.waiting.discard(ident)
        elif kind == "refused":
            self.engine.refuse_series(int(head["sid"]), str(head.get("why", "")))
        elif kind == "beat":
            self.beat(peer, head)
        elif kind == "flushed":
            peer.flushed = True
        yield from ()

    def beat(self, peer: _Peer, head: dict) -> None:
        """Add what a worker's counters grew by since its last report."""
        c = self.engine.counters
        messages = int(head.get("messages", 0))
        if messages > peer.messages:
            self.idle_since = time.monotonic()
        c.messages += messages - peer.messages
        rejected = {str(k): int(v) for k, v in dict(head.get("rejected", {})).items()}
        c.rejected.update(Counter({k: v - peer.rejected.get(k, 0) for k, v in rejected.items()
                                   if v > peer.rejected.get(k, 0)}))  # fmt: skip
        peer.messages, peer.rejected = messages, rejected
        peer.frames = int(head.get("frames", peer.frames))
        peer.cpu_s = {str(k): float(v) for k, v in dict(head.get("cpu_s", {})).items()}
        peer.peak_rss_mb = float(head.get("peak_rss_mb", 0.0))

    # ------------------------------------------------------------------ control messages
    def settled(self, now: float) -> Iterator[list[Event]]:
        """Decode the control window once it has been quiet for SETTLE_S and relay it to every
        worker as one message (its parts stay together: a V1 header's parts are decoded
        before any frame a worker holds is tried again)."""
        if not self.window or now - self.last_ctl < SETTLE_S:
            return
        window, self.window = sorted(self.window, key=lambda w: w[0]), []
        events: list[tuple[Event, bool]] = []
        relayed: list = []
        for _, _, raw, relay, first in starts_first(
            window, lambda w: self.wire.rank(w[2]), lambda w: w[4]
        ):
            counters = self.engine.counters if relay else StreamCounters()  # PUB: theirs
            for e in decode_counted(self.decoder, [p.buffer for p in raw], counters):
                events.append((e, first))
            if relay:
                relayed.append(raw)
        if relayed:
            sizes = [len(raw) for raw in relayed]
            self.tell_all(pack("ctl", {"sizes": sizes}, raw=[p for raw in relayed for p in raw]))
        for e, first in events:
            if isinstance(e, SeriesStart):
                yield [e]
                if e.info.series_id not in self.engine.table:
                    self.tell_all(pack("drop", {"sid": e.info.series_id}))
                    self.candidates.pop(e.info.series_id, None)
                else:
                    self.ready(e.info.series_id)
            elif isinstance(e, SeriesEnd) and not first:
                self.ends[e.series_id] = _End(e, self.live(), now + self.plan.end_wait_s)

    def due(self, now: float) -> Iterator[list[Event]]:
        """Ends whose workers have all drained (or the wait ran out); pending calibrations."""
        for sid, end in list(self.ends.items()):
            if sid in self.candidates and (self.live() <= end.offered or now > end.deadline):
                self.calibrate(sid, force=True)  # a short series: on what its workers offered
            if end.waiting and now < end.deadline:
                continue
            del self.ends[sid]
            if end.waiting:
                names = ", ".join(str(self.peers[i].index) for i in end.waiting)
                wait = self.plan.end_wait_s
                self.lost.append(f"series {sid} ended without the last frames of worker(s) "
                                 f"{names} (no answer in {wait:.0f} s)")  # fmt: skip
                log.error(self.lost[-1])
            yield [end.event]
        for sid in list(self.candidates):
            if now - self.first_candidate[sid] > CAL_WAIT_S and sid in self.engine.table:
                self.calibrate(sid)
            elif now - self.first_candidate[sid] > self.plan.end_wait_s * 4:  # never started
                self.candidates.pop(sid)
                self.first_candidate.pop(sid)

    # ------------------------------------------------------------------ calibration
    def candidate(self, sid: int, first: int, frames: np.ndarray) -> None:
        """Frames a worker offers to calibrate on; kept also before the series' start is
        decoded here (a worker may offer them first), for at most MAX_PENDING series."""
        proc = self.engine.table.open.get(sid)
        if proc is not None and (proc.calibrated or proc.calibration_error is not None):
            return
        if sid not in self.candidates and len(self.candidates) >= MAX_PENDING:
            self.engine.counters.reject(DecodeError("no_start", f"frames of series {sid} "
                                                    "offered to calibrate on"))  # fmt: skip
            return
        held = self.candidates.setdefault(sid, {})
        self.first_candidate.setdefault(sid, time.monotonic())
        for k, f in enumerate(frames[: 2 * MAX_CALIBRATION_FRAMES]):
            held.setdefault(first + k, f.copy())
        self.ready(sid)

    def ready(self, sid: int) -> None:
        """Calibrate once the first `calibration_frames` indices of an open series are in."""
        proc = self.engine.table.open.get(sid)
        held = self.candidates.get(sid)
        if proc is None or not held or proc.calibrated:
            return
        n = proc.settings.calibration_frames
        if all(proc.index_offset + i in held for i in range(n)):
            self.calibrate(sid)

    def calibrate(self, sid: int, force: bool = False) -> None:
        """Calibrate on the lowest indices offered (all of the first N, N frames after
        CAL_WAIT_S, or whatever came at the end) and send the calibration to every worker."""
        held = self.candidates.get(sid, {})
        proc = self.engine.table.open.get(sid)
        n = proc.settings.calibration_frames if proc is not None else 0
        if proc is None or (len(held) < n and not force):
            if proc is None:
                self.candidates.pop(sid, None)
            return
        self.candidates.pop(sid, None)
        self.first_candidate.pop(sid, None)
        if not held:
            return
        frames = np.stack([held[i] for i in sorted(held)[:n]])
        if self.engine.calibrate_series(sid, frames):
            cal = proc.raw_calibration.to_json()
            self.tell_all(pack("cal", {"sid": sid, "calibration": cal}))
        else:
            self.tell_all(pack("drop", {"sid": sid, "why": "refused"}))

    # ------------------------------------------------------------------ the end
    def flush(self, wait_s: float = 5.0) -> None:
        """Every live worker's last deltas, before the engine closes the open series."""
        for peer in self.peers.values():
            peer.flushed = False
        self.tell_all(pack("flush"))
        until = time.monotonic() + wait_s
        while time.monotonic() < until and not all(p.flushed for p in self.peers.values()
                                                   if p.gone is None):  # fmt: skip
            if self.link.poll(50):
                for events in self.on_link():
                    self.engine.process(events)
            self.check_peers(time.monotonic())

    def close(self) -> None:
        self.tell_all(pack("stop"))
        for p in self.processes.values():
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        self.link.close(linger=0)
        release_context(self.ctx)
        for line in self.engine.stage_lines():
            log.info("%s", line)
