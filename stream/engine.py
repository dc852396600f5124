"""The live engine: one thread receives and accumulates; consumers take snapshots.

Read top to bottom: socket -> decoder -> SeriesProcessor -> SeriesResult (workers:
`stream.coordinator`). Ingest never waits for consumers: the kernels release the GIL.

Series lifecycle (docs/reliability.md): every series that starts is accumulated on its own until
it ends (end message, last frame), goes quiet while another one receives (`stale_series_s`), or
the stream stops, in its own `on_series_end` call (a stray or restarted sender's series never
replaces the open one). A series is refused (counted in `tally.refused`, logged, its frames
counted and skipped) when its metadata is unusable, it does not fit the memory budget
(`stream.budget`) or processing it raised. A start that changes an open series' metadata is
refused; a frame whose shape or dtype is not the series' never reaches a kernel.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tcbf_live.detectors.base import (
    CompressedFrame,
    DecodeError,
    Event,
    FrameBatch,
    SeriesEnd,
    SeriesStart,
)
from tcbf_live.detectors.registry import protocol
from tcbf_live.stream.arming import Arm
from tcbf_live.stream.budget import BudgetExceeded
from tcbf_live.stream.engine_settings import STALE_DEFAULT_S, EngineSettings
from tcbf_live.stream.lane_reader import LaneFolded
from tcbf_live.stream.priority import lower_thread_priority
from tcbf_live.stream.receiver import Receiver, StreamCounters
from tcbf_live.stream.result import SeriesResult
from tcbf_live.stream.series import SeriesError, SeriesProcessor
from tcbf_live.stream.series_table import SeriesTable, Tallies

log = logging.getLogger(__name__)


class Engine:
    """Receive + accumulate in a background thread; results via `snapshot()` and callbacks.
    `tally` (`series_table.Tallies`) counts what the series ended with (exit codes); every
    finished series goes to `on_series_end`, empty ones (`frames_received == 0`) included."""

    def __init__(self, settings: EngineSettings,
                 on_series_end: Callable[[SeriesResult], None] | None = None,
                 on_frames: Callable[[SeriesProcessor, list], None] | None = None):  # fmt: skip
        self.settings = settings
        self.on_series_end = on_series_end
        self.on_frames = on_frames  # the frames of an open series, as received (run --record)
        self.counters = StreamCounters()
        self.last_result: SeriesResult | None = None  # the last finished series with frames
        self.tally = Tallies()  # what the series ended with (exit codes)
        self.budget_bytes = settings.budget_bytes()
        self.table = SeriesTable(settings.processing, self.budget_bytes)  # the open series
        self._current: SeriesProcessor | None = None  # the one snapshots show (latest frames)
        self._lock = threading.Lock()  # ingest state (accumulators)
        self._align_lock = threading.Lock()  # alignment state (Pipeline) of the series
        self._stop = threading.Event()
        self.arm = Arm()  # active mode: the series id the detector's arm returned
        self._thread: threading.Thread | None = None
        self._aligner: threading.Thread | None = None
        self.receiver = self._receiver()  # bound/connected now (raw TCP: in the thread)
        if (isinstance(self.receiver, Receiver) and settings.compiled_lane
                and settings.processing.repeat_scans != "new-series"):  # fmt: skip
            self.receiver.use_lane(lambda info: self.table.open.get(info.series_id), self._lock,
                                   tap=on_frames is not None)  # fmt: skip

    def _receiver(self) -> Receiver:
        """Where events come from: the detector link (a coordinator: its workers)."""
        s = self.settings
        return Receiver(s.subscriber, protocol(s.protocol), s.channel, self.counters)

    # ------------------------------------------------------------------ control
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="tcbf-ingest", daemon=True)
        self._thread.start()
        if self.settings.align_interval_s is not None:
            self._aligner = threading.Thread(target=self._align_loop, name="tcbf-align",
                                             daemon=True)  # fmt: skip
            self._aligner.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def expect_series(self, series_id: int) -> None:
        """Active mode (`settings.armed`): the series id the detector's arm returned."""
        self.arm.expect(series_id)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the ingest thread; True when it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        self._stop.set()  # ingest over: the aligner stops too
        if self._aligner is not None:
            self._aligner.join(timeout)
            return not self._aligner.is_alive()
        return True

    def snapshot(self) -> SeriesResult | None:
        """Consistent copy of the series in progress (or the last finished one)."""
        with self._lock:
            if self._current is not None:
                return self._current.result()
            return self.last_result

    # ------------------------------------------------------------------ alignment thread
    def _align_loop(self) -> None:
        """Re-align while frames arrive (lower priority than ingest; a slow update waits as long
        as it took); holds the ingest lock only to copy the per-position maps."""
        lower_thread_priority()
        last, wait_s = (-1, -1), self.settings.align_interval_s
        while not self._stop.wait(wait_s):
            with self._lock:
                proc = self._current
                if proc is None or not proc.solvable or proc.progress() == last:
                    continue  # nothing to align, or no new row since the last update
                last = proc.progress()
                inputs = proc.inputs()  # merge: copies of the state, under the ingest lock
            t0 = time.monotonic()
            try:
                with self._align_lock:  # without the ingest lock; never after the final solve
                    t0, prior = time.monotonic(), proc.pipeline and proc.pipeline.last
                    out = None if prior and prior.final else proc.solve(inputs)
                if out is not None:  # the update's latency, as the viewer sees it
                    log.debug("%s (%d frames; update %.3f s)", out.summary(), out.frames,
                              time.monotonic() - t0)  # fmt: skip
            except Exception:  # an alignment failure must not stop the engine
                log.exception("alignment update failed")
            took_s = time.monotonic() - t0
            if took_s > self.settings.align_interval_s >= wait_s:  # says so when it slows
                log.info("an alignment update took %.1f s: the next waits as long", took_s)
            wait_s = max(self.settings.align_interval_s, took_s)

    # ------------------------------------------------------------------ ingest thread
    def _run(self) -> None:
        try:
            for events in self.receiver.batches(self._stop.is_set, self.settings.idle_timeout_s):
                self.process(events)
            if len(self.table):  # timed out or stopped mid-series
                log.warning("stream idle or stopped before the series ended")
        except Exception:  # the receiver failed: keep what arrived
            log.exception("receiving failed")
        finally:
            self.close_series()
            self.receiver.close()

    def process(self, events: list[Event]) -> None:
        """Handle decoded events in order (the ingest thread's step; also for feeding an
        engine that was not started, e.g. offline or in tests): consecutive frame events go
        to the kernel together. Never raises for a series' sake: a series whose processing
        fails is refused."""
        frames: list[FrameBatch | CompressedFrame] = []
        for event in events:
            if isinstance(event, FrameBatch | CompressedFrame):
                frames.append(event)
                continue
            self._on_frames(frames)
            frames = []
            if isinstance(event, SeriesStart):
                self._on_start(event)
            elif isinstance(event, SeriesEnd):
                self._on_end(event)
            elif isinstance(event, LaneFolded):
                self._on_lane(event)
        self._on_frames(frames)
        self._end_stale()

    def close_series(self) -> None:
        """End every open series (incomplete): the stream stopped."""
        for sid in list(self.table.open):
            self._finish(sid, complete=False)

    def _on_start(self, event: SeriesStart) -> None:
        info, sid = event.info, event.info.series_id
        proc = self.table.open.get(sid)
        if proc is not None:
            if info != self.table.announced[sid]:  # the decoders refuse these too
                self._reject("metadata_changed", f"start of series {sid} changes its metadata "
                             "(the first start holds)")  # fmt: skip
                return
            if event.repeat or proc.frames_received == 0:
                return  # periodic re-announcement
            log.warning("series %d started again (sender restarted?): its first run ends "
                        "here", sid)  # fmt: skip
            self._finish(sid, complete=False)
        elif event.repeat and sid in self.table.ended:
            return  # a re-announcement of a series already ended or refused
        if self.settings.armed and not self.arm.takes(sid, self._stop.is_set):
            self._reject("foreign_series", f"series {sid}, armed {self.arm.series_id}")
            log.warning("series %d is not the armed series %s: ignored", sid, self.arm.series_id)
            return
        if len(self.table) >= self.settings.max_open_series:
            # a series without frames ends first (stray starts never evict one receiving)
            quietest = self.table.quietest()
            log.warning("series %d starts while %d are open: series %d (the quietest) ends",
                        sid, len(self.table), quietest)  # fmt: skip
            self._finish(quietest, complete=False)
        proc = self._open(info)
        if proc is None:
            return
        with self._lock:
            if self._current is None:
                self._current = proc
        late = " (joined mid-series)" if event.repeat else ""
        others = f"; {len(self.table) - 1} other series open" if len(self.table) > 1 else ""
        log.info("series %d started%s%s", sid, late, others)

    def _open(self, info, pass_index: int = 0) -> SeriesProcessor | None:
        """Set the series up and open it, or refuse it (None): over the memory budget,
        unusable metadata, or a setup that raises (e.g. a fixed calibration that does not fit
        the stream)."""
        sid = info.series_id
        try:
            proc = self.table.create(info, pass_index)
        except (BudgetExceeded, SeriesError) as err:
            why = "over_budget" if isinstance(err, BudgetExceeded) else "unusable_series"
            self._refuse(sid, why, str(err))
            return None
        except Exception as exc:
            log.exception("series %d cannot be set up", sid)
            self._refuse(sid, "series_failed", repr(exc))
            return None
        self.table.add(info, proc)
        return proc

    def _on_end(self, event: SeriesEnd) -> None:
        sid = event.series_id
        if sid in self.table:
            self._finish(sid, complete=True)
        elif sid not in self.table.ended:  # ended ones: e.g. all frames came before the end
            self._reject("wrong_series", f"end of series {sid}, which is not open")

    def _on_lane(self, event: LaneFolded) -> None:
        """Frames the compiled lane folded into an open series; its tapped blobs to on_frames."""
        proc = self.table.open[event.series_id]
        if event.tapped is not None and self.on_frames is not None:  # must not wait
            self.on_frames(proc, [event.tapped])
        self.counters.frames += event.frames
        self.table.touched(event.series_id)
        if self._current is not proc:
            with self._lock:
                self._current = proc
        if proc.done:
            self._finish(event.series_id, complete=True)

    def _on_frames(self, batches: list[FrameBatch | CompressedFrame]) -> None:
        for sid, group in self.table.route(batches):
            if sid in self.table:
                self._on_series_frames(sid, group)
            else:
                for _ in group:
                    self._reject(*self.table.stranger(sid))

    def _on_series_frames(self, sid: int, batches: list[FrameBatch | CompressedFrame]) -> None:
        proc = self.table.open[sid]
        batches, wrong = self.table.matching(sid, batches)
        for detail in wrong:  # counted; they never reach a kernel
            self._reject("wrong_geometry", detail)
        if not batches:
            return
        self.table.touched(sid)
        if self.on_frames is not None:  # must not wait (stream.recorder enqueues them)
            self.on_frames(proc, batches)
        if self._current is not proc:
            with self._lock:
                self._current = proc
        if self.settings.processing.repeat_scans == "new-series":  # a pass ends at the
            for batch in batches:  # next pass's first frame or the end message
                if not self._on_frames_new_series(sid, batch):
                    return
            return
        if self._fold(sid, proc, batches) and proc.done:
            self._finish(sid, complete=True)

    def _on_frames_new_series(self, sid: int, batch: FrameBatch | CompressedFrame) -> bool:
        """Repeat scans as separate series: a frame of the next pass closes the current one.
        False when the series is no longer open (refused)."""
        proc = self.table.open[sid]
        pass_index = batch.first // proc.n_positions
        if pass_index > proc.index_offset // proc.n_positions:
            info = self.table.announced[sid]
            self._finish(sid, complete=True)
            if self._stop.is_set():  # that pass was the last the run takes: no stub of the next
                return False
            proc = self._open(info, pass_index)
            if proc is None:
                return False
            with self._lock:
                self._current = proc
        return self._fold(sid, proc, [batch])

    def _fold(self, sid: int, proc: SeriesProcessor,
              batches: list[FrameBatch | CompressedFrame]) -> bool:  # fmt: skip
        """Accumulate; frames whose pixels did not decode (in-kernel bslz4) are rejections.
        A series whose processing raises is refused (False), the engine goes on."""
        failed = proc.decode_failures
        calibrated = proc.calibrated
        fresh = proc.frames_received == 0  # its first frames: its reservation now counts
        try:
            with self._lock:
                proc.add_many(batches)
        except BudgetExceeded as err:
            self._refuse(sid, "over_budget", str(err), batches)
            return False
        except Exception as exc:
            log.exception("series %d: processing failed", sid)
            self._refuse(sid, "series_failed", f"{type(exc).__name__}: {exc}", batches)
            return False
        failed = proc.decode_failures - failed
        for _ in range(failed):
            self.counters.reject(DecodeError("bad_payload", "bslz4 frame does not decompress"))
        n = sum(len(b.frames) if isinstance(b, FrameBatch) else 1 for b in batches)
        self.counters.frames += n - failed
        if not calibrated and proc.calibrated:  # sized now: reserve what it holds
            self.table.reserve(sid)
        if fresh or (not calibrated and proc.calibrated):
            self.table.rebudget()
        return True

    def _end_stale(self) -> None:
        """End (incomplete) open series that received nothing for `stale_series_s` while
        another one did: a restarted sender's first run, a stray start."""
        s = self.settings
        stale = s.stale_series_s or s.idle_timeout_s or STALE_DEFAULT_S
        for sid in self.table.stale(stale):
            log.warning("series %d received nothing for %.0f s while another series did: it "
                        "ends here", sid, time.monotonic() - self.table.active[sid])  # fmt: skip
            self._finish(sid, complete=False)

    def _reject(self, reason: str, detail: str) -> None:
        self.counters.reject(DecodeError(reason, detail))

    def _forget(self, sid: int, why: str) -> SeriesProcessor | None:
        """Take the series out of the open set (and out of the snapshots)."""
        proc = self.table.forget(sid, why)
        if proc is not None and self._current is proc:
            with self._lock:
                self._current = self.table.latest()
        return proc

    def _refuse(self, sid: int, reason: str, detail: str, batches: list = ()) -> None:
        """The series is not processed (or no longer): counted, logged; the frame messages in
        hand (`batches`) and its later ones are counted as 'series_refused'. The engine goes
        on with the next series."""
        self._forget(sid, "refused")
        self.tally.refused[reason] += 1
        self._reject(reason, detail)
        log.error("series %d refused (%s): %s", sid, reason, detail)
        for _ in batches:
            self._reject("series_refused", f"frames of refused series {sid}")

    def _finish(self, sid: int, complete: bool) -> None:
        proc = self.table.open.get(sid)
        if proc is None:
            return
        try:
            with self._lock:  # a series shorter than the calibration frames calibrates on them
                proc.calibrate_now()
            calibrated = proc.calibration_error is None
            if calibrated:
                try:  # final alignment on everything that arrived (waits for a running update)
                    with self._align_lock:
                        proc.solve(final=True)
                except Exception:
                    log.exception("final alignment failed; writing the result without tcBF")
            with self._lock:
                result = proc.result(final=calibrated, complete=complete)
        except BudgetExceeded as err:
            self._refuse(sid, "over_budget", str(err))
            return
        except Exception as exc:
            log.exception("series %d: the result cannot be read out", sid)
            self._refuse(sid, "series_failed", f"{type(exc).__name__}: {exc}")
            return
        self._forget(sid, "ended")
        self.tally.count(result)
        last = self.last_result  # an incomplete series never hides a complete one
        if result.frames_received and (last is None or result.complete or not last.complete):
            with self._lock:
                self.last_result = result
        log.info("%s%s", result.summary(), "" if complete else " (incomplete)")
        if result.frames_excluded or result.suspect:
            log.warning("series %d %s", sid, result.screening_summary())
        if self.on_series_end is not None:
            try:
                self.on_series_end(result)
            except Exception:  # the consumer's failure must not stop ingest
                log.exception("series %d: on_series_end failed", sid)
        limit = self.settings.max_series
        if limit is not None and self.tally.ended >= limit:
            self._stop.set()
