"""The coordinator: the `run` process when frames are received by several workers
(`run --workers N`, `tcbf-live worker`), the engine whose receiver is its workers.

`Coordinator` is an `Engine` (series lifecycle, budget, alignment thread, results: unchanged)
whose receiver, `WorkerPool`, listens for workers on the worker link (loopback unless told
otherwise; CURVE when wider), starts the local ones and turns what they send into the engine's
steps, in its ingest thread:

- control messages (starts, header parts, ends) gather in a window that settles for
  `SETTLE_S`, are ordered (receive time; a V1 `dheader` before the parts that follow it) and
  decoded here, then relayed to every worker, so every decoder sees one order;
- the first frames of a series calibrate here (its lowest `calibration_frames` indices, as one
  process would take them from an in-order stream); the calibration goes to every worker;
- `StateDelta`s from workers are checked and added to the series' state; the engine aligns and
  solves on it as it would on its own;
- an end waits until every live worker has drained and sent its last delta ("ended"), at most
  `end_wait_s`: a worker that died or went silent never blocks the others; its frames not yet
  sent are missing from the result, which says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.pages import peak_rss_mb
from tcbf_live.stream.result import SeriesResult
from tcbf_live.stream.series import SeriesError
from tcbf_live.stream.tcbf.accumulators import ACCEPTED, StateDelta
from tcbf_live.stream.transport import CurveKeys
from tcbf_live.stream.worker_link import DELTA_CREDIT_BYTES, pack
from tcbf_live.stream.worker_pool import WorkerPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    """How a run receives through workers."""

    local: int = 2  # worker processes started on this host
    link: str = "tcp://127.0.0.1:0"  # where workers join (port 0: any free port)
    curve: CurveKeys | None = None  # CURVE server keys of the link (beyond loopback)
    remote: int = 0  # workers expected from other hosts (their PUB share is kept for them)
    sync_interval_s: float = 0.1  # each worker's deltas at most this far apart
    backlog_bytes: int = 256 << 20  # per worker: frames before their series is ready
    end_wait_s: float = 5.0  # an end waits at most this long for every worker's last delta
    worker_timeout_s: float = 3.0  # a worker silent this long is stalled
    ready_timeout_s: float = 60.0  # local workers must have joined by then
    row_block_rows: int = 0  # rows of a worker's row block per series (0: `RowBlock.capacity`)
    delta_credit_bytes: int = 2 * DELTA_CREDIT_BYTES  # all workers' deltas not merged, at most


class Coordinator(Engine):
    """An Engine whose frames arrive as workers' deltas (`WorkerPool`)."""

    def __init__(self, settings: EngineSettings, plan: WorkerPlan,
                 on_series_end: Callable[[SeriesResult], None] | None = None):  # fmt: skip
        self.plan = plan
        self.merge_cpu_s = 0.0  # CPU time adding workers' deltas (the coordinator's share)
        self.merges = 0
        super().__init__(settings, on_series_end)

    def _receiver(self) -> WorkerPool:
        return WorkerPool(self, self.settings, self.plan)

    def start(self) -> Coordinator:
        """Start the local workers and wait until they have joined, then ingest."""
        self.receiver.start_local()
        self.receiver.wait_ready()
        super().start()
        return self

    @property
    def lost(self) -> list[str]:
        return self.receiver.lost

    def merge_delta(self, sid: int, delta: StateDelta, this_run: bool = True) -> None:
        """Add a worker's delta to its series (refused if it does not fit; a delta of an
        earlier run of the same id counts as a stranger's)."""
        proc = self.table.open.get(sid)
        if proc is None or not proc.calibrated or not this_run:
            frames = max(0, int(delta.stats[ACCEPTED]))
            if frames or delta.rows.size:  # an empty delta (a last one after the end) loses none
                reason, detail = self.table.stranger(sid)
                self.counters.rejected[reason] += frames
                log.warning("frames of series %d from a worker: %s", sid, detail)
            return
        t0 = time.thread_time()
        try:
            with self._lock:
                proc.apply(delta)
        except SeriesError as err:
            self._reject("bad_link_message", str(err))
            return
        self.merge_cpu_s += time.thread_time() - t0
        self.merges += 1
        self.counters.frames += int(delta.stats[ACCEPTED])
        self.table.touched(sid)
        if self._current is not proc:
            with self._lock:
                self._current = proc
        if proc.done:
            self._finish(sid, complete=True)

    def _forget(self, sid: int, why: str):
        """The series leaves the open set (ended, refused, evicted): workers drop it too."""
        proc = super()._forget(sid, why)
        gen = self.receiver.opened.get(sid)
        self.receiver.tell_all(pack("drop", {"sid": sid, "why": why, "gen": gen}))
        return proc

    def calibrate_series(self, sid: int, frames: np.ndarray) -> bool:
        """Calibrate an open series on frames its workers offered (False: refused)."""
        proc = self.table.open.get(sid)
        try:
            with self._lock:
                ok = proc.calibrate_on(frames)
        except Exception as exc:  # over the budget once sized, or a setup that raises
            self.refuse_series(sid, f"{type(exc).__name__}: {exc}")
            return False
        if ok:
            self.table.reserve(sid)
            self.table.rebudget()
        return ok

    def refuse_series(self, sid: int, why: str) -> None:
        if sid in self.table:
            reason = "over_budget" if "budget" in why else "series_failed"
            self._refuse(sid, reason, why)
            self.receiver.tell_all(pack("drop", {"sid": sid, "why": "refused"}))
        elif sid < 0:  # a worker that could not open the detector link
            log.error("a worker could not start: %s", why)

    def stage_lines(self) -> list[str]:
        """CPU microseconds per frame by stage, each worker (its last report) and this
        coordinator: the figures that carry to a host with more cores (docs/engine.md)."""
        lines = []
        for ident, p in sorted(self.receiver.peers.items(), key=lambda ip: ip[1].index):
            per = 1e6 / max(p.frames, 1)
            seg = self.receiver.segments.get(ident)
            shared = f"{seg.bytes_read / 2**20:.0f} MiB read in shared memory" if seg else "none"
            cpu = dict(p.cpu_s)
            process = cpu.pop("process", 0.0)
            startup = cpu.pop("start-up", 0.0)  # kernels loaded (first call): not per frame
            other = process - startup - sum(cpu.values())  # ZeroMQ's I/O thread, the loop
            stages = ", ".join(f"{k} {v * per:.1f}" for k, v in cpu.items())
            rss, (waits, waited), (held, held_s) = p.peak_rss_mb, p.row_waits, p.merge_waits
            lines.append(f"worker {p.index}: {p.frames} frames ({p.lane} by the compiled lane); "
                         f"CPU us/frame: {stages}, "
                         f"other {other * per:.1f} (process {process * per:.1f}, less "
                         f"{startup:.2f} s start-up); peak RSS {rss:.0f} MiB; deltas forced "
                         f"by a full row block: {waits} ({waited:.2f} s); deltas held back for "
                         f"the coordinator: {held} ({held_s:.2f} s); of its deltas {shared}"
                         )  # fmt: skip
        e = self
        frames = max(e.counters.frames, 1)
        lines.append(f"coordinator: merge {e.merge_cpu_s * 1e6 / frames:.2f} us/frame "
                     f"({e.merges} deltas), process {time.process_time() * 1e6 / frames:.1f} "
                     f"us/frame (with alignment and start-up); peak RSS {peak_rss_mb():.0f} "
                     "MiB")  # fmt: skip
        return lines
