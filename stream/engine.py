"""The live engine: one thread receives and accumulates; consumers take snapshots.

Read top to bottom: socket -> decoder -> SeriesProcessor (calibration + numba accumulators)
-> SeriesResult. The receive thread never waits for consumers: the accumulate kernel releases the
GIL, and `snapshot()` only holds the ingest lock while it copies the small per-position maps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from detectors.base import CompressedFrame, DecodeError, FrameBatch, SeriesEnd, SeriesStart
from detectors.compression import native_bslz4
from detectors.dectris_v1 import DectrisV1Decoder
from detectors.dectris_v2 import DectrisV2Decoder
from detectors.merlin import MerlinDecoder
from detectors.native import NativeDecoder

from .series import ProcessingSettings, SeriesError, SeriesProcessor, SeriesResult
from .subscriber import (
    StreamCounters,
    SubscriberSettings,
    open_socket,
    receive_event_batches,
    receive_tcp_batches,
)

log = logging.getLogger("tcbf.engine")

TCP_PROTOCOLS = {"merlin"}  # raw TCP, not ZeroMQ
DECODERS = {
    "native": NativeDecoder,
    "dectris-v1": DectrisV1Decoder,
    "dectris-v2": DectrisV2Decoder,
    "merlin": MerlinDecoder,
}


@dataclass(frozen=True)
class EngineSettings:
    subscriber: SubscriberSettings = field(default_factory=SubscriberSettings)
    processing: ProcessingSettings = field(default_factory=ProcessingSettings)
    protocol: str = "native"
    idle_timeout_s: float | None = None  # stop after this long without a message
    max_series: int | None = None  # stop after this many finished series
    align_interval_s: float | None = 0.5  # live alignment cadence; None: only at series end
    channel: str | None = None  # DECTRIS stream V2 threshold channel (None: the first)
    # active mode: accept only the series whose id `expect_series` gives (the SIMPLON arm's
    # sequence id); any other series on the socket is counted as foreign and not processed
    armed: bool = False


ARM_WAIT_S = 10.0  # how long a series start waits for the arm's reply (active mode; longer
#                    than the SIMPLON client's 5 s timeout, after which the run stops anyway)


class Engine:
    """Receive + accumulate in a background thread; results via `snapshot()` and callbacks."""

    def __init__(
        self,
        settings: EngineSettings,
        on_series_end: Callable[[SeriesResult], None] | None = None,
    ):
        self.settings = settings
        self.on_series_end = on_series_end
        self.counters = StreamCounters()
        self.last_result: SeriesResult | None = None
        self.series_finished = 0
        self._current: SeriesProcessor | None = None
        self._lock = threading.Lock()  # ingest state (accumulators)
        self._align_lock = threading.Lock()  # alignment state (TcbfProcessor) of the series
        self._stop = threading.Event()
        self._armed = threading.Event()
        self._expected_series: int | None = None
        self._thread: threading.Thread | None = None
        self._aligner: threading.Thread | None = None
        # bound/connected before start(); raw-TCP detectors (Merlin) connect in the thread
        self._tcp = settings.protocol in TCP_PROTOCOLS
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
                if proc is None or proc.tcbf is None:
                    continue
                rows_done = proc.acc.frames_accepted // proc.scan_shape[1]
                if (proc.info.series_id, rows_done) == last:
                    continue  # no new row since the last update
                inputs = proc.alignment_inputs()
            last = (proc.info.series_id, rows_done)
            try:
                with self._align_lock:
                    out = proc.tcbf.update(inputs)
                if out is not None:
                    log.debug("%s (%d frames)", out.summary(), out.frames)
            except Exception:  # an alignment failure must not stop the engine
                log.exception("alignment update failed")

    # ------------------------------------------------------------------ ingest thread
    def _run(self) -> None:
        decoder = DECODERS[self.settings.protocol]()
        if hasattr(decoder, "defer_bslz4"):  # DECTRIS: bslz4 frames decompressed in the kernel
            decoder.defer_bslz4 = native_bslz4()
        if self.settings.channel is not None and hasattr(decoder, "channel"):
            decoder.channel = self.settings.channel

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
                frames: list[FrameBatch | CompressedFrame] = []  # consecutive frame messages
                for event in events:  # go in together
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
            if self._current is not None:  # timed out or stopped mid-series
                log.warning("stream idle or stopped before the series ended")
                self._finish(complete=False)
        except Exception:  # the receiver failed: keep what arrived
            log.exception("receiving failed")
            if self._current is not None:
                self._finish(complete=False)

        finally:
            if self._sock is not None:
                self._sock.close()

    def _on_start(self, event: SeriesStart) -> None:
        if self._current is not None and self._current.info.series_id == event.info.series_id:
            return  # periodic re-announcement
        if self.settings.armed and not self._is_armed_series(event.info.series_id):
            self.counters.reject(DecodeError("foreign_series", f"series {event.info.series_id}"
                                             f", armed {self._expected_series}"))  # fmt: skip
            log.warning("series %d is not the armed series %s: ignored", event.info.series_id,
                        self._expected_series)  # fmt: skip
            return
        if self._current is not None:
            log.warning("series %d never ended; a new one started", self._current.info.series_id)
            self._finish(complete=False)
        try:
            proc = SeriesProcessor(event.info, self.settings.processing)
        except SeriesError as err:
            self.counters.reject(DecodeError("unusable_series", str(err)))
            return
        with self._lock:
            self._current = proc
        late = " (joined mid-series)" if event.repeat else ""
        log.info("series %d started%s", event.info.series_id, late)

    def _is_armed_series(self, series_id: int) -> bool:
        """The header can arrive before the arm's HTTP reply: wait for it (bounded; a stop
        or a failed arm ends the wait and the series is not taken)."""
        deadline = time.monotonic() + ARM_WAIT_S
        while not self._armed.wait(0.05):
            if self._stop.is_set() or time.monotonic() > deadline:
                return False
        return series_id == self._expected_series

    def _on_end(self, event: SeriesEnd) -> None:
        proc = self._current
        if proc is not None and proc.info.series_id != event.series_id:
            self.counters.reject(DecodeError("wrong_series", f"end of series {event.series_id} "
                                             f"during series {proc.info.series_id}"))  # fmt: skip
            return
        self._finish(complete=True)

    def _on_frames(self, batches: list[FrameBatch | CompressedFrame]) -> None:
        if not batches:
            return
        proc = self._current
        if proc is None:
            for b in batches:
                self.counters.reject(DecodeError("no_series", f"frames of series {b.series_id}"))
            return
        series = proc.info.series_id
        if any(b.series_id != series for b in batches):  # e.g. a foreign series (active mode)
            for b in batches:
                if b.series_id != series:
                    self.counters.reject(DecodeError("wrong_series", f"frames of series "
                                                     f"{b.series_id} during {series}"))  # fmt: skip
            batches = [b for b in batches if b.series_id == series]
            if not batches:
                return
        if self.settings.processing.repeat_scans == "new-series":
            for batch in batches:
                self._on_frames_new_series(batch)
            return
        with self._lock:
            self._fold(proc, batches)
        if proc.done:
            self._finish(complete=True)

    def _on_frames_new_series(self, batch: FrameBatch | CompressedFrame) -> None:
        """Repeat scans as separate series: a frame of the next pass closes the current one."""
        proc = self._current
        if proc is None:
            return
        pass_index = batch.first // proc.n_positions
        if pass_index > proc.index_offset // proc.n_positions:
            info = proc.info
            self._finish(complete=True)
            proc = SeriesProcessor(info, self.settings.processing, pass_index)
            with self._lock:
                self._current = proc
        with self._lock:
            self._fold(proc, [batch])

    def _fold(self, proc: SeriesProcessor, batches: list[FrameBatch | CompressedFrame]) -> None:
        """Accumulate; frames whose pixels did not decode (in-kernel bslz4) are rejections."""
        failed = proc.decode_failures
        proc.add_many(batches)
        failed = proc.decode_failures - failed
        for _ in range(failed):
            self.counters.reject(DecodeError("bad_payload", "bslz4 frame does not decompress"))
        n = sum(len(b.frames) if isinstance(b, FrameBatch) else 1 for b in batches)
        self.counters.frames += n - failed

    def _finish(self, complete: bool) -> None:
        proc = self._current
        if proc is None:
            return
        with self._lock:  # a series shorter than the calibration frames calibrates on them
            proc.calibrate_now()
        calibrated = proc.calibration_error is None
        if calibrated:
            try:  # final alignment on everything that arrived (waits for a running update)
                with self._align_lock:
                    proc.update_tcbf(final=True)
            except Exception:
                log.exception("final alignment failed; writing the result without tcBF")
        with self._lock:
            result = proc.result(final=calibrated, complete=complete)

            self._current = None
            self.last_result = result
        self.series_finished += 1
        log.info("%s%s", result.summary(), "" if complete else " (incomplete)")
        if self.on_series_end is not None:
            self.on_series_end(result)
        limit = self.settings.max_series
        if limit is not None and self.series_finished >= limit:
            self._stop.set()
