"""The live engine: one thread receives and accumulates; consumers take snapshots.

Read top to bottom: socket -> decoder -> SeriesProcessor (calibration + numba accumulators)
-> SeriesResult. The receive thread never waits for consumers: the accumulate kernel releases the
GIL, and `snapshot()` only holds the ingest lock while it copies the small per-position maps.

Series lifecycle (docs/reliability.md): every series that starts is accumulated on its own until
it ends (end message, last frame), goes quiet while another one receives (`stale_series_s`), or
the stream stops; each ends in its own `on_series_end` call, so a stray or restarted sender's
series never replaces the open one. A series is refused (counted in `series_refused` by reason,
logged, its frames counted and skipped; the engine goes on) when its metadata is unusable, it
does not fit the memory budget (`stream.budget`), or processing it raised. A start that changes
the metadata of an open series is refused and the series keeps its geometry; a frame whose
shape or dtype is not the series' never reaches a kernel.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from tcbf_live.detectors.base import (
    CompressedFrame,
    DecodeError,
    Event,
    FrameBatch,
    SeriesEnd,
    SeriesStart,
)
from tcbf_live.detectors.compression import native_bslz4
from tcbf_live.detectors.registry import DecoderOptions, protocol
from tcbf_live.stream.budget import (
    BudgetExceeded,
    check_info,
    memory_budget_bytes,
    series_footprint,
)
from tcbf_live.stream.budget import upsampling_bound as _upsampling
from tcbf_live.stream.receiver import (
    StreamCounters,
    SubscriberSettings,
    open_socket,
    receive_event_batches,
    receive_tcp_batches,
)
from tcbf_live.stream.result import SeriesResult
from tcbf_live.stream.series import ProcessingSettings, SeriesError, SeriesProcessor

log = logging.getLogger("tcbf.engine")


@dataclass(frozen=True)
class EngineSettings:
    subscriber: SubscriberSettings = field(default_factory=SubscriberSettings)
    processing: ProcessingSettings = field(default_factory=ProcessingSettings)
    protocol: str = "native"
    idle_timeout_s: float | None = None  # stop after this long without a message
    max_series: int | None = None  # stop after this many series ended normally, with frames
    align_interval_s: float | None = 0.5  # live alignment cadence; None: only at series end
    channel: str | None = None  # DECTRIS stream V2 threshold channel (None: the first)
    # active mode: accept only the series whose id `expect_series` gives (the SIMPLON arm's
    # sequence id); any other series on the socket is counted as foreign and not processed
    armed: bool = False
    memory_budget_bytes: int | None = None  # None: stream.budget.memory_budget_bytes()
    max_open_series: int = 3  # series accumulated at once; beyond, the quietest one ends
    # an open series that received nothing for this long while another one did ends
    # (incomplete); None: the idle timeout, else 30 s
    stale_series_s: float | None = None


ARM_WAIT_S = 10.0  # how long a series start waits for the arm's reply (active mode; longer
#                    than the SIMPLON client's 5 s timeout, after which the run stops anyway)
STALE_DEFAULT_S = 30.0
REMEMBERED_SERIES = 64  # ids of ended / refused series remembered (to name their stragglers)


class Engine:
    """Receive + accumulate in a background thread; results via `snapshot()` and callbacks.

    Tallies for the caller's exit code, final once `join()` returned True:
    `series_complete` (ended normally, nothing missing), `series_incomplete` (frames missing or
    ended early), `series_empty` (started, no frame), `series_refused` (Counter of reasons:
    unusable_series, over_budget, series_failed); `series_finished` counts every result handed
    to `on_series_end`, empty ones included (`frames_received == 0`: nothing to write)."""

    def __init__(
        self,
        settings: EngineSettings,
        on_series_end: Callable[[SeriesResult], None] | None = None,
    ):
        self.settings = settings
        self.on_series_end = on_series_end
        self.counters = StreamCounters()
        self.last_result: SeriesResult | None = None  # the last finished series with frames
        self.series_finished = 0
        self.series_complete = 0
        self.series_incomplete = 0
        self.series_empty = 0
        # ended by the detector's end message or the last frame: what `max_series` counts (a
        # series cut short by a restart, a quiet spell or the stream stopping never does, so a
        # restarted sender's complete series is still received in full; one that the detector
        # itself ended with frames missing does, else the run would wait out its idle timeout)
        self.series_ended = 0
        self.series_refused: Counter = Counter()
        budget = settings.memory_budget_bytes or settings.processing.memory_budget_bytes
        self.budget_bytes = memory_budget_bytes(budget)
        self._open: dict[int, SeriesProcessor] = {}  # series being accumulated, by id
        self._announced: dict[int, object] = {}  # their SeriesInfo as first announced
        self._geometry: dict[int, tuple] = {}  # their frames' (shape, numpy dtype)
        self._active: dict[int, float] = {}  # when each last received frames (or started)
        self._reserved: dict[int, int] = {}  # bytes each holds or will hold (budget)
        self._ended: dict[int, str] = {}  # recently ended or refused ids -> why (bounded)
        self._current: SeriesProcessor | None = None  # the one snapshots show (latest frames)
        self._lock = threading.Lock()  # ingest state (accumulators)
        self._align_lock = threading.Lock()  # alignment state (TcbfProcessor) of the series
        self._stop = threading.Event()
        self._armed = threading.Event()
        self._expected_series: int | None = None
        self._thread: threading.Thread | None = None
        self._aligner: threading.Thread | None = None
        # bound/connected before start(); raw-TCP detectors (Merlin) connect in the thread
        self._protocol = protocol(settings.protocol)  # UnknownProtocol lists the choices
        self._tcp = self._protocol.transport == "tcp"
        self._sock = None if self._tcp else open_socket(settings.subscriber)

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
        self._expected_series = series_id
        self._armed.set()

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
        """Re-align on a timer while frames arrive; never holds the ingest lock for longer
        than copying the per-position maps, so ingest is never blocked by alignment."""
        last: tuple[int, int] = (-1, -1)
        while not self._stop.wait(self.settings.align_interval_s):
            with self._lock:
                proc = self._current
                if proc is None or not proc.solvable or proc.progress() == last:
                    continue  # nothing to align, or no new row since the last update
                last = proc.progress()
                inputs = proc.inputs()  # merge: copies of the state, under the ingest lock
            try:
                with self._align_lock:
                    out = proc.solve(inputs)  # solve: without the ingest lock
                if out is not None:
                    log.debug("%s (%d frames)", out.summary(), out.frames)
            except Exception:  # an alignment failure must not stop the engine
                log.exception("alignment update failed")

    # ------------------------------------------------------------------ ingest thread
    def _run(self) -> None:
        proto = self._protocol  # DECTRIS: bslz4 frames decompressed in the kernel
        decoder = proto.decoder(DecoderOptions(
            defer_bslz4=proto.bslz4_frames and native_bslz4(), channel=self.settings.channel,
        ))  # fmt: skip

        try:
            if self._tcp:
                drained = receive_tcp_batches(
                    self.settings.subscriber.endpoint, decoder, self.counters,
                    timeout_s=self.settings.idle_timeout_s, should_stop=self._stop.is_set,
                )  # fmt: skip
            else:
                drained = receive_event_batches(
                    self._sock, decoder, self.counters,
                    timeout_s=self.settings.idle_timeout_s, should_stop=self._stop.is_set,
                )  # fmt: skip
            for events in drained:
                self.process(events)
            if self._open:  # timed out or stopped mid-series
                log.warning("stream idle or stopped before the series ended")
        except Exception:  # the receiver failed: keep what arrived
            log.exception("receiving failed")
        finally:
            self.close_series()
            if self._sock is not None:
                self._sock.close()

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
        self._on_frames(frames)
        self._end_stale()

    def close_series(self) -> None:
        """End every open series (incomplete): the stream stopped."""
        for sid in list(self._open):
            self._finish(sid, complete=False)

    def _on_start(self, event: SeriesStart) -> None:
        info, sid = event.info, event.info.series_id
        proc = self._open.get(sid)
        if proc is not None:
            if info != self._announced[sid]:  # the decoders refuse these too
                self._reject("metadata_changed", f"start of series {sid} changes its metadata "
                             "(the first start holds)")  # fmt: skip
                return
            if event.repeat or proc.frames_received == 0:
                return  # periodic re-announcement
            log.warning("series %d started again (sender restarted?): its first run ends "
                        "here", sid)  # fmt: skip
            self._finish(sid, complete=False)
        elif event.repeat and sid in self._ended:
            return  # a re-announcement of a series already ended or refused
        if self.settings.armed and not self._is_armed_series(sid):
            self.counters.reject(DecodeError("foreign_series", f"series {sid}"
                                             f", armed {self._expected_series}"))  # fmt: skip
            log.warning("series %d is not the armed series %s: ignored", sid,
                        self._expected_series)  # fmt: skip
            return
        if len(self._open) >= self.settings.max_open_series:
            # a series without frames ends first (stray starts never evict one receiving)
            quietest = min(self._open, key=lambda k: (self._open[k].frames_received > 0,
                                                      self._active[k]))  # fmt: skip
            log.warning("series %d starts while %d are open: series %d (the quietest) ends",
                        sid, len(self._open), quietest)  # fmt: skip
            self._finish(quietest, complete=False)
        try:
            proc = self._open_series(info)
        except BudgetExceeded as err:
            self._refuse(sid, "over_budget", str(err))
            return
        except SeriesError as err:
            self._refuse(sid, "unusable_series", str(err))
            return
        except Exception as exc:  # e.g. a fixed calibration that does not fit the stream
            log.exception("series %d cannot be set up", sid)
            self._refuse(sid, "series_failed", repr(exc))
            return
        self._ended.pop(sid, None)
        self._open[sid] = proc
        self._announced[sid] = info
        self._geometry[sid] = (tuple(proc.info.detector_shape), np.dtype(proc.info.dtype))
        self._active[sid] = time.monotonic()
        self._rebudget()
        with self._lock:
            if self._current is None:
                self._current = proc
        late = " (joined mid-series)" if event.repeat else ""
        others = f"; {len(self._open) - 1} other series open" if len(self._open) > 1 else ""
        log.info("series %d started%s%s", sid, late, others)

    def _open_series(self, info, pass_index: int = 0) -> SeriesProcessor:
        """A processor for the series, once what it will allocate before calibration (and
        after, when the calibration is given) fits what the open series leave of the budget
        (BudgetExceeded otherwise; nothing allocated)."""
        processing = self.settings.processing
        resolved = processing.resolve(info)
        if resolved.scan_shape is None:
            return SeriesProcessor(info, processing, pass_index)  # SeriesError: says why
        limit = resolved.frames_expected
        if limit is None or processing.repeat_scans == "new-series":
            limit = resolved.scan_shape[0] * resolved.scan_shape[1]
        cal = processing.calibration
        left = self.budget_bytes - self._held()
        reason = check_info(resolved, left, n_bf=cal.n_bf if cal is not None else None,
                            frame_limit=limit, upsample=processing.tcbf.upsample,
                            calibration_frames=processing.calibration_frames)  # fmt: skip
        if reason is not None:
            raise BudgetExceeded(f"series {info.series_id}: {reason}")
        # the calibrated size is checked again when the stack is allocated (SeriesProcessor)
        proc = SeriesProcessor(info, replace(processing, memory_budget_bytes=left), pass_index)
        self._reserved[info.series_id] = self._footprint(proc)
        return proc

    def _footprint(self, proc: SeriesProcessor) -> int:
        """Bytes the series holds: exact once calibrated, else what it will at least hold."""
        info, s = proc.info, proc.settings
        acc = proc.acc
        kind = np.dtype(info.dtype)
        return series_footprint(
            info.scan_shape, info.detector_shape, kind.itemsize,
            acc.state.stack.shape[1] if acc is not None else None,
            _upsampling(info, s.tcbf.upsample,
                        proc.calibration.angular_sampling_mrad if proc.calibration else None),
            frames_expected=proc.frame_limit,
            n_tiles=acc.state.tiles.shape[1] if acc is not None else None,
            calibration_frames=s.calibration_frames, integer_stack=kind.kind == "u",
        ).total  # fmt: skip

    def _held(self, but: int | None = None) -> int:
        """Bytes reserved by the open series that hold frames (but `but`): a start with no
        frames yet (a stray or hostile one) never takes budget from a series receiving."""
        return sum(n for k, n in self._reserved.items()
                   if k != but and k in self._open and self._open[k].frames_received)  # fmt: skip

    def _rebudget(self) -> None:
        """Each open series may grow into what the others (with frames) leave of the budget."""
        for sid, proc in self._open.items():
            left = self.budget_bytes - self._held(but=sid)
            proc.settings = replace(proc.settings, memory_budget_bytes=left)

    def _is_armed_series(self, series_id: int) -> bool:
        """The header can arrive before the arm's HTTP reply: wait for it (bounded; a stop
        or a failed arm ends the wait and the series is not taken)."""
        deadline = time.monotonic() + ARM_WAIT_S
        while not self._armed.wait(0.05):
            if self._stop.is_set() or time.monotonic() > deadline:
                return False
        return series_id == self._expected_series

    def _on_end(self, event: SeriesEnd) -> None:
        sid = event.series_id
        if sid in self._open:
            self._finish(sid, complete=True)
        elif sid not in self._ended:  # ended ones: e.g. all frames came before the end
            self._reject("wrong_series", f"end of series {sid}, which is not open")

    def _on_frames(self, batches: list[FrameBatch | CompressedFrame]) -> None:
        if not batches:
            return
        sid = batches[0].series_id
        if len(self._open) == 1 and sid in self._open and all(b.series_id == sid
                                                                for b in batches):  # fmt: skip
            self._on_series_frames(sid, batches)  # the usual case: one series
            return
        groups: dict[int, list[FrameBatch | CompressedFrame]] = {}
        for b in batches:
            groups.setdefault(b.series_id, []).append(b)
        for sid, group in groups.items():
            if sid in self._open:
                self._on_series_frames(sid, group)
                continue
            why = self._ended.get(sid)
            for _ in group:
                if why == "refused":
                    self._reject("series_refused", f"frames of refused series {sid}")
                elif not self._open:
                    self._reject("no_series", f"frames of series {sid}")
                else:
                    self._reject("wrong_series", f"frames of series {sid}, which is not open")

    def _on_series_frames(self, sid: int, batches: list[FrameBatch | CompressedFrame]) -> None:
        proc = self._open[sid]
        batches = self._matching(proc, batches)
        if not batches:
            return
        self._active[sid] = time.monotonic()
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

    def _matching(self, proc: SeriesProcessor, batches: list) -> list:
        """The batches whose frames have the series' shape and dtype; the others are counted
        ('wrong_geometry') and never reach a kernel (which trusts the shape it was built
        for)."""
        shape, kind = self._geometry[proc.info.series_id]
        ok = [b.frames.shape[1:] == shape and b.frames.dtype == kind
              if type(b) is FrameBatch else tuple(b.shape) == shape and np.dtype(b.dtype) == kind
              for b in batches]  # fmt: skip
        if all(ok):
            return batches
        for b, good in zip(batches, ok, strict=True):
            if not good:
                got = b.frames.shape[1:] if type(b) is FrameBatch else b.shape
                self._reject("wrong_geometry", f"frames {got} for series {proc.info.series_id} "
                             f"of {shape} {kind.str}")  # fmt: skip
        return [b for b, good in zip(batches, ok, strict=True) if good]

    def _on_frames_new_series(self, sid: int, batch: FrameBatch | CompressedFrame) -> bool:
        """Repeat scans as separate series: a frame of the next pass closes the current one.
        False when the series is no longer open (refused)."""
        proc = self._open[sid]
        pass_index = batch.first // proc.n_positions
        if pass_index > proc.index_offset // proc.n_positions:
            info = self._announced[sid]
            self._finish(sid, complete=True)
            if self._stop.is_set():  # that pass was the last the run takes: no stub of the next
                return False
            try:
                proc = self._open_series(info, pass_index)
            except BudgetExceeded as err:
                self._refuse(sid, "over_budget", str(err))
                return False
            self._open[sid] = proc
            self._announced[sid] = info
            self._geometry[sid] = (tuple(proc.info.detector_shape), np.dtype(proc.info.dtype))
            self._active[sid] = time.monotonic()
            self._rebudget()
            with self._lock:
                self._current = proc
        return self._fold(sid, proc, [batch])

    def _fold(self, sid: int, proc: SeriesProcessor,
              batches: list[FrameBatch | CompressedFrame]) -> bool:  # fmt: skip
        """Accumulate; frames whose pixels did not decode (in-kernel bslz4) are rejections.
        A series whose processing raises is refused (False), the engine goes on."""
        failed = proc.decode_failures
        calibrated = proc.acc is not None
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
        if not calibrated and proc.acc is not None:  # sized now: reserve what it holds
            self._reserved[sid] = self._footprint(proc)
        if fresh or (not calibrated and proc.acc is not None):
            self._rebudget()
        return True

    def _end_stale(self) -> None:
        """End (incomplete) open series that received nothing for `stale_series_s` while
        another one did: a restarted sender's first run, a stray start."""
        if len(self._open) < 2:
            return
        s = self.settings
        stale = s.stale_series_s or s.idle_timeout_s or STALE_DEFAULT_S
        now = time.monotonic()
        latest = max(self._active.values())
        for sid in [k for k, t in self._active.items() if now - t > stale and latest > t]:
            log.warning("series %d received nothing for %.0f s while another series did: it "
                        "ends here", sid, now - self._active[sid])  # fmt: skip
            self._finish(sid, complete=False)

    def _reject(self, reason: str, detail: str) -> None:
        self.counters.reject(DecodeError(reason, detail))

    def _forget(self, sid: int, why: str) -> SeriesProcessor | None:
        """Take the series out of the open set (and out of the snapshots)."""
        proc = self._open.pop(sid, None)
        for book in (self._announced, self._geometry, self._active, self._reserved):
            book.pop(sid, None)
        self._ended[sid] = why
        while len(self._ended) > REMEMBERED_SERIES:
            self._ended.pop(next(iter(self._ended)))
        self._rebudget()
        if proc is not None and self._current is proc:
            with self._lock:
                latest = max(self._active, key=self._active.__getitem__, default=None)
                self._current = self._open.get(latest) if latest is not None else None
        return proc

    def _refuse(self, sid: int, reason: str, detail: str, batches: list = ()) -> None:
        """The series is not processed (or no longer): counted, logged; the frame messages in
        hand (`batches`) and its later ones are counted as 'series_refused'. The engine goes
        on with the next series."""
        self._forget(sid, "refused")
        self.series_refused[reason] += 1
        self._reject(reason, detail)
        log.error("series %d refused (%s): %s", sid, reason, detail)
        for _ in batches:
            self._reject("series_refused", f"frames of refused series {sid}")

    def _finish(self, sid: int, complete: bool) -> None:
        proc = self._open.get(sid)
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
        self._tally(result)
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
        if limit is not None and self.series_ended >= limit:
            self._stop.set()

    def _tally(self, result: SeriesResult) -> None:
        self.series_finished += 1
        if not result.frames_received:
            self.series_empty += 1
            return
        if result.complete:  # ended by its end message or last frame (not idle, not replaced)
            self.series_ended += 1
        if result.complete and not result.frames_missing:
            self.series_complete += 1
        else:
            self.series_incomplete += 1
