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
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import zmq

from tcbf_live.detectors.base import DecodeError, Event, SeriesEnd, SeriesStart
from tcbf_live.detectors.registry import DecoderOptions, protocol
from tcbf_live.detectors.routing import starts_first
from tcbf_live.stream import memory_reserve, shared_segments
from tcbf_live.stream.receiver import StreamCounters, decode_counted
from tcbf_live.stream.transport import open_link, release_context
from tcbf_live.stream.worker_calibration import CAL_WAIT_S, Calibrating
from tcbf_live.stream.worker_link import (
    LINK_HWM,
    LINK_MAX_BYTES,
    LINK_VERSION,
    LinkError,
    WorkerConfig,
    credit_share,
    delta_from,
    pack,
    settings_to_dict,
    unpack,
)
from tcbf_live.stream.worker_process import KEPT_BYTES, spawned
from tcbf_live.stream.worker_series import Copies, Ends, Peer, PendingEnd

if TYPE_CHECKING:
    from tcbf_live.stream.coordinator import Coordinator, WorkerPlan
    from tcbf_live.stream.engine import EngineSettings

log = logging.getLogger(__name__)

SETTLE_S = 0.01  # control messages are ordered once none arrived for this long, ...
WINDOW_MAX_S, WINDOW_MAX = 0.1, 256  # ... or the oldest waited this long, or this many wait
HEADER_WAIT_S = 1.0  # a relay waits at most this long for the rest of a header


class WorkerPool(Calibrating):
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
        self.peers: dict[bytes, Peer] = {}
        self.segments: dict[bytes, shared_segments.PeerSegments] = {}  # local workers'
        self.processes: dict[bytes, mp.Process] = {}
        self.owners: dict[bytes, str | None] = {}  # local workers' segment names
        self.window: list[tuple[int, float, list, bool, bool]] = []  # ts, t, parts, relay, first
        self.last_ctl = 0.0
        self.unrelayed: list = []  # decoded control messages not relayed yet (`relay`)
        self.unrelayed_since = 0.0
        self.candidates: dict[tuple[int, int], dict[int, np.ndarray]] = {}  # (id, run)
        self.first_candidate: dict[tuple[int, int], float] = {}
        self.ends = Ends()  # the pending ends, by (id, run)
        self.runs: dict[int, int] = {}  # starts of each id decoded so far (its runs: `gen`)
        self.opened: dict[int, int] = {}  # the run of each id the engine has open
        self.queue: deque[tuple[Event, PendingEnd | int]] = deque()  # starts (run), ends, in order
        self.copies = Copies()  # PUB: the control messages taken
        self.lost: list[str] = []  # what the run says at its end
        self.shared = settings.subscriber.socket_type == "sub"
        self.idle_since = time.monotonic()

    # ------------------------------------------------------------------ workers
    def start_local(self) -> None:
        spawn, s = mp.get_context("spawn"), self.settings.processing  # kept: sized by its flags
        kept = memory_reserve.kept_bytes(s.metadata, s.bins, self.plan.row_block_rows, KEPT_BYTES)
        shared = shared_segments.allot(self.plan.local, memory_reserve.KEPT_BUFFERS * kept)
        for k in range(self.plan.local):
            ident, tag = f"w{k}".encode(), shared_segments.new_tag() if k < shared else None
            p = spawn.Process(target=spawned, name=f"tcbf-worker-{k}", daemon=True,
                              args=(self.endpoint, ident, self.settings.subscriber.curve,
                                    logging.getLogger().getEffectiveLevel(),
                                    self.settings.budget_bytes(), kept, tag,
                                    os.getpid()))  # fmt: skip
            p.start()
            self.processes[ident] = p
            self.owners[ident] = tag and shared_segments.owner(p.pid, tag)

    def wait_ready(self) -> None:
        """Until every local worker has joined (RuntimeError after `ready_timeout_s`)."""
        until = time.monotonic() + self.plan.ready_timeout_s
        while len(self.peers) < self.plan.local:
            if time.monotonic() > until or any(not p.is_alive() for p in self.processes.values()):
                raise RuntimeError(f"{self.plan.local - len(self.peers)} local worker(s) did "
                                   "not start")  # fmt: skip
            if self.link.poll(100):
                self.on_link()

    def welcome(self, ident: bytes, head: dict) -> None:
        """A worker joined: its number (a local one's own, others after them) and config."""
        if ident in self.peers:  # a restarted worker under the same name: a new peer
            self.lose(ident, "restarted", "joined again")
        local = ident in self.processes
        whose = self.owners.get(ident)  # (a local one's segments: none other's)
        if seg := shared_segments.mapped(head, whose, self.segments.pop(ident, None)):
            self.segments[ident] = seg
        n = int(ident[1:]) if local else self.plan.local + sum(
            1 for i in self.peers if i not in self.processes)  # fmt: skip
        s, sub = self.settings, self.settings.subscriber
        total = self.plan.local + self.plan.remote
        config = WorkerConfig(
            index=n, protocol=s.protocol, endpoint=sub.endpoint, socket_type=sub.socket_type,
            rcvhwm=sub.rcvhwm, max_message_bytes=sub.max_message_bytes, channel=s.channel,
            share=(n, max(total, n + 1)) if self.shared else None,
            sync_interval_s=self.plan.sync_interval_s, backlog_bytes=self.plan.backlog_bytes,
            processing=settings_to_dict(s.processing), lane=s.compiled_lane,
            row_block_rows=self.plan.row_block_rows,
            delta_credit_bytes=credit_share(self.plan.delta_credit_bytes, total, n),
            shared=ident in self.segments,
        )  # fmt: skip
        self.peers[ident] = Peer(n, f"{head.get('host', '?')}:{head.get('pid', '?')}",
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
        for end in self.ends.pending.values():
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
                self.on_link()
            now = time.monotonic()
            self.settled(now)
            yield from self.due(now)
            self.check_peers(now)
            if timeout_s is not None and now - self.idle_since > timeout_s and not self.queue:
                break
        self.flush()

    def on_link(self, limit: int = 256) -> None:
        """Handle what workers sent (control messages go to the window, events to `queue`)."""
        for _ in range(limit):
            try:
                ident, *parts = self.link.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            ident = bytes(ident.bytes)
            try:
                kind, head, arrays, raw = unpack(parts, self.segments.get(ident))
            except LinkError as err:
                self.engine.counters.reject(DecodeError("bad_link_message", str(err)))
                continue
            peer = self.peers.get(ident)
            if kind == "hello":
                if head.get("version") != LINK_VERSION:
                    log.error("a worker of another link version (%r) is not taken",
                              head.get("version"))  # fmt: skip
                else:
                    self.welcome(ident, head)
                continue
            if peer is None:  # not joined: nothing it says counts (a worker of an earlier run
                self.tell(ident, pack("stop"))  # on this link, whose coordinator died: it stops)
                continue
            peer.last_seen = time.monotonic()
            if peer.gone == "stalled":
                peer.gone = None
                log.warning("worker %d is back", peer.index)
            try:
                self.on_message(ident, peer, kind, head, arrays, raw)
            except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
                self.engine.counters.reject(DecodeError("bad_link_message", f"{kind}: {exc!r}"))
            if kind == "beat" and ident in self.segments:  # segments it freed (a larger block)
                self.segments[ident].drop(head.get("unshared"))
            if kind in ("delta", "beat", "credit") and type(head.get("sent")) is int:  # handled
                self.tell(ident, pack("merged", {"bytes": head["sent"]}))  # (`worker_inbox`)

    def on_message(self, ident, peer, kind, head, arrays, raw) -> None:
        now = time.monotonic()
        if kind in ("ctl", "first"):
            relay = bool(head.get("relay"))
            if self.shared and not relay and not self.copies.take(raw, kind, ident, now):
                return  # PUB: a copy another worker sent first (`Copies`)
            self.window.append((int(head.get("ts", 0)), now, raw, relay, kind == "first"))
            self.last_ctl = now
            self.idle_since = now
        elif kind == "cal":
            self.candidate(int(head["sid"]), int(head["gen"]), int(head["first"]),
                           arrays["frames"])  # fmt: skip
        elif kind == "delta":
            try:
                delta = delta_from(arrays)
            except LinkError as err:
                self.engine.counters.reject(DecodeError("bad_link_message", str(err)))
                return
            sid = int(head["sid"])
            self.engine.merge_delta(sid, delta, int(head["gen"]) == self.opened.get(sid))
            self.idle_since = now
        elif kind in ("ended", "ending"):  # "ending": all its frames offered, not calibrated
            self.ends.answer((int(head["sid"]), int(head["gen"])), ident, kind)
        elif kind == "refused":
            self.engine.refuse_series(int(head["sid"]), str(head.get("why", "")))
        elif kind == "beat" and peer.read_beat(head, self.engine.counters):
            self.idle_since = time.monotonic()
        elif kind == "flushed":
            peer.flushed = True

    # ------------------------------------------------------------------ control messages
    def settled(self, now: float) -> None:
        """Decode the control window once it has been quiet for SETTLE_S (a steady flow of
        control messages: at most WINDOW_MAX_S, WINDOW_MAX) and relay it to every worker as
        one message (its parts stay together: a V1 header's parts are decoded
        before any frame a worker holds is tried again)."""
        self.relay(now)
        if not self.window or (now - self.last_ctl < SETTLE_S and len(self.window) < WINDOW_MAX
                               and now - self.window[0][1] < WINDOW_MAX_S):  # fmt: skip
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
        if relayed and not self.unrelayed:
            self.unrelayed_since = now
        self.unrelayed += relayed
        self.relay(now)
        for e, first in events:  # in order: a start waits behind an earlier end
            if isinstance(e, SeriesStart):  # its run of the id, counted as workers count
                sid = e.info.series_id
                gen = self.runs.setdefault(sid, 1) if e.repeat else self.runs.get(sid, 0) + 1
                self.runs[sid] = gen
                self.queue.append((e, gen))
            elif isinstance(e, SeriesEnd) and not first:
                gen = self.runs.get(e.series_id, 0)
                end = PendingEnd(e, self.live(), now + self.plan.end_wait_s, gen)
                self.ends.open(end)
                self.queue.append((e, end))

    def relay(self, now: float) -> None:
        """Relay the decoded control messages to every worker as one message, never in the
        middle of a header: a V1 `dheader` whose config part (or a header blob) is still on
        its way waits for it (at most HEADER_WAIT_S), so a worker never decodes a frame
        between two parts of one header (its decoder would take the frame for the part)."""
        if not self.unrelayed or (getattr(self.decoder, "header_open", False)
                                  and now - self.unrelayed_since < HEADER_WAIT_S):  # fmt: skip
            return
        relayed, self.unrelayed = self.unrelayed, []
        sizes = [len(raw) for raw in relayed]
        self.tell_all(pack("ctl", {"sizes": sizes}, raw=[p for raw in relayed for p in raw]))

    def due(self, now: float) -> Iterator[list[Event]]:
        """The queued starts and ends, in order, each once it is due (an end: every live
        worker has drained, the wait ran out, or there is nothing to wait for); pending
        calibrations."""
        while self.queue:
            event, end = self.queue[0]
            if isinstance(end, PendingEnd) and not self.end_due(end, now):
                break
            self.queue.popleft()
            if isinstance(end, PendingEnd):
                yield [event]
                self.ends.pending.pop((event.series_id, end.gen), None)
                continue
            sid = event.info.series_id
            opened = self.engine.table.open.get(sid)
            yield [event]
            if sid not in self.engine.table:  # refused: workers drop it
                self.tell_all(pack("drop", {"sid": sid, "gen": end}))
                self.candidates.pop((sid, end), None)
            elif self.opened.get(sid) != end:  # the id's next run, as the workers count runs
                self.opened[sid] = end  # (also where the engine kept its processor: a start
                proc = self.engine.table.open[sid]  # again before any frame merged here)
                if proc is opened and proc.calibrated:  # (the workers' new run waits for it)
                    cal = proc.raw_calibration.to_json()
                    self.tell_all(pack("cal", {"sid": sid, "gen": end, "calibration": cal}))
            self.ready(sid)
        for key in list(self.candidates):
            if now - self.first_candidate[key] > CAL_WAIT_S and self.current(*key) is not None:
                self.calibrate(key[0])
            elif now - self.first_candidate[key] > self.plan.end_wait_s * 4:  # never opened
                self.candidates.pop(key)
                self.first_candidate.pop(key)

    def end_due(self, end: PendingEnd, now: float) -> bool:
        sid = end.event.series_id
        proc = self.engine.table.open.get(sid)
        if proc is None:  # refused, ended or never opened here: nothing to wait for
            return True
        if not proc.calibrated and self.live() <= end.offered:  # every frame offered
            if (sid, end.gen) not in self.candidates:
                return True  # no frames at all
            self.calibrate(sid, force=True)  # a short series: on what its workers offered
        if end.waiting and now < end.deadline:
            return False
        if end.waiting:
            names = ", ".join(f"{p.index} (last said: {p.held / 2**20:.0f} MiB held, rejected "
                              f"{p.rejected or 'none'})" for p in map(self.peers.get,
                                                                       end.waiting))  # fmt: skip
            self.lost.append(f"series {sid} ended without the last frames of worker(s) "
                             f"{names} (no answer in {self.plan.end_wait_s:.0f} s)")  # fmt: skip
            log.error(self.lost[-1])
        return True

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
                self.on_link()
            self.check_peers(time.monotonic())

    def close(self) -> None:
        self.tell_all(pack("stop"))
        for ident, p in self.processes.items():
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
            shared_segments.unlink_of(self.owners[ident])  # (one killed before it joined)
        self.link.close(linger=0)
        release_context(self.ctx)
        for seg in self.segments.values():
            seg.close()
        for line in self.engine.stage_lines():
            log.info("%s", line)
