"""Raw recording (`run --record FILE`): every series' frames as they arrive, one file per series.

The ingest thread only hands references to the received frames (a DECTRIS `CompressedFrame`'s
bslz4 blob, a `FrameBatch`'s array, the blobs one call of the compiled lane folded:
`TappedFrames`) to a writer thread through a queue bounded in bytes; it
never waits for the disk: a frame that finds the queue full is counted as not recorded, and
the run reports it. Before a series is accepted its size (frames x frame bytes; bslz4: twice
the mean blob of its first frames) must fit the free space of the target folder, else nothing
of it is recorded and the run says why.

Layout (one HDF5 file per series, `detectors.vendor_files.DectrisMaster` reads it, so
`reconstruct FILE` and `simulate --replay FILE` take it without flags):
- `/entry/data/data_000001`: (scan positions, H, W), one frame per chunk, at its acquisition
  index. bslz4 frames are the received chunks unchanged (HDF5 direct chunk write, bitshuffle
  filter 32008 with LZ4, the options DECTRIS files carry, so h5py with a bitshuffle plugin
  reads them too); decoded frames are stored unfiltered (a plain dataset, or chunks with the
  filter skipped in a bslz4 one). Its `tcbf_meta` attribute (JSON) holds the series metadata as
  the run resolved it (scan shape and order, energy, step, semi-angle, angular sampling,
  counts per electron, mask value...).
- `/entry/recording/frames_present` (bool per position): frames never received or not
  recorded stay missing (unwritten chunks read as zeros); the readers skip them, so a replay
  or reconstruction sees the same gaps as the live run. `/entry/recording/pixel_mask`: the
  detector's pixel mask when the stream sent one.
Files are written under a temporary name and moved into place when the series ends
(`stream.outputs.commit`): never half a file, never a replaced one without --overwrite.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from tcbf_live import __version__
from tcbf_live.detectors.base import CompressedFrame, DecodeError, FrameBatch, SeriesInfo
from tcbf_live.detectors.compression import bslz4_into, decompress, native_bslz4
from tcbf_live.detectors.files import META_ATTR
from tcbf_live.detectors.vendor_files import (
    BITSHUFFLE_FILTER,
    PIXEL_MASK,
    PRESENT,
    RECORDED_DATA,
    RECORDED_FIELDS,
)
from tcbf_live.stream.lane_reader import TappedFrames
from tcbf_live.stream.outputs import OutputExists, commit, series_output, temporary_name

log = logging.getLogger(__name__)

QUEUE_BYTES = 256 << 20  # frames waiting for the writer, at most
RESERVE_BYTES = 64 << 20  # disk left free beyond a series' estimate
BSLZ4_MARGIN = 2.0  # a series' bslz4 size: this times the mean blob of its first frames
CHUNK_OVERHEAD_BYTES = 64  # HDF5 chunk index per frame (estimate)
YIELD_EVERY = 64  # chunk writes of a tapped run between two yields of the GIL


@dataclass(frozen=True)
class RecordSettings:
    path: Path  # the first series' file; the next ones beside it (outputs.series_output)
    overwrite: bool = False
    queue_bytes: int = QUEUE_BYTES
    reserve_bytes: int = RESERVE_BYTES


class SeriesRecord:
    """One recorded series: counted by the ingest thread (queued, not recorded) and the writer
    (written, where, errors)."""

    def __init__(self, series_id: int, key: int, n_positions: int, offset: int):
        self.series_id, self.key = series_id, key
        self.n_positions, self.offset = n_positions, offset  # offset: the pass's first index
        self.target: Path | None = None  # None: refused (no space)
        self.refusal = ""
        self.queue_full = 0  # frames not recorded: the writer was behind
        self.beyond = 0  # frames past one scan pass (repeat passes accumulated): not recorded
        self.written = 0
        self.skipped: Counter = Counter()  # the writer's (`SeriesFile.skipped`)
        self.path: Path | None = None  # where it went (a kept name if the target appeared)
        self.error = ""

    def summary(self) -> str:
        """The run's closing line about this series' recording."""
        sid = self.series_id
        if self.target is None:
            return f"series {sid} not recorded: {self.refusal}"
        if self.error:
            return f"series {sid}: recording failed: {self.error}"
        missed = []
        if self.queue_full:
            missed.append(f"{self.queue_full} not recorded (the recording queue was full)")
        if self.beyond:
            missed.append(f"{self.beyond} beyond one scan pass not recorded")
        missed += [f"{n} {why} not recorded" for why, n in sorted(self.skipped.items())]
        more = f" ({'; '.join(missed)})" if missed else ""
        return f"recorded {self.written} frames of series {sid} to {self.path}{more}"


def series_meta(info: SeriesInfo) -> dict:
    """The metadata a reader needs to process the recording as the run did."""
    meta = {k: getattr(info, k) for k in RECORDED_FIELDS if getattr(info, k) is not None}
    meta.update(scan_shape=list(info.scan_shape), series_id=info.series_id,
                frames_expected=info.frames_expected, recorded_by=f"tcbf-live {__version__}")
    return meta


def estimate_bytes(info: SeriesInfo, n_frames: int, batches: list) -> int:
    """Disk a series will take: raw frames, or bslz4 at BSLZ4_MARGIN x its first blobs."""
    blobs = [len(memoryview(b.blob).cast("B")) for b in batches if isinstance(b, CompressedFrame)]
    for b in batches:
        if isinstance(b, TappedFrames):
            blobs.extend(np.diff(b.offsets).tolist())
    per_frame = info.frame_nbytes
    if blobs:
        per_frame = min(int(BSLZ4_MARGIN * np.mean(blobs)), per_frame + per_frame // 100 + 16)
    return n_frames * (per_frame + CHUNK_OVERHEAD_BYTES)


class SeriesFile:
    """The writer thread's open file of one series (under its temporary name)."""

    def __init__(self, tmp: Path, info: SeriesInfo, compressed: bool):
        self.tmp, self.info = tmp, info
        n = info.scan_shape[0] * info.scan_shape[1]
        shape = (n, *info.detector_shape)
        self.dtype = np.dtype(info.dtype)
        self.f = h5py.File(tmp, "w", libver="latest")
        filters = {}
        if compressed:  # DECTRIS's (block size, LZ4) completed as the plugin would
            opts = (0, 2) if h5py.h5z.filter_avail(BITSHUFFLE_FILTER) else (
                0, 5, self.dtype.itemsize, 0, 2)  # fmt: skip
            filters = dict(compression=BITSHUFFLE_FILTER, compression_opts=opts,
                           allow_unknown_filter=True)  # fmt: skip
        self.compressed = compressed
        self.ds = self.f.create_dataset(RECORDED_DATA, shape=shape, dtype=self.dtype,
                                        chunks=(1, *info.detector_shape), **filters)  # fmt: skip
        self.ds.attrs[META_ATTR] = json.dumps(series_meta(info), default=lambda v: v.item())
        self.present = np.zeros(n, bool)
        self.skipped: Counter = Counter()  # frames not written, by why
        self._scratch = np.empty(int(np.prod(info.detector_shape)), self.dtype)  # `_decoded`
        if info.pixel_mask is not None:
            self.f.create_dataset(PIXEL_MASK, data=np.asarray(info.pixel_mask, "<u4"))

    def write(self, index, item: FrameBatch | CompressedFrame | TappedFrames) -> int:
        """Store the frames at their acquisition index (a tapped run: an index per blob, -1:
        not recorded) as the live result folds them: a duplicate's first copy, and no blob
        that does not decompress (`skipped` counts them); returns how many were stored."""
        write, written = self.ds.id.write_direct_chunk, 0
        frame_bytes = self.dtype.itemsize * int(np.prod(self.info.detector_shape))
        if isinstance(item, TappedFrames):  # (the lane folded them: each decompresses)
            for k in np.flatnonzero(index >= 0):
                if self._fresh(int(index[k])):
                    blob = item.data[item.offsets[k] : item.offsets[k + 1]].tobytes()
                    if not self.compressed:  # (a series that began with unencoded frames)
                        blob = decompress("bslz4", self.dtype.itemsize, blob, frame_bytes)
                    write((int(index[k]), 0, 0), blob)
                    written += 1
                if k % YIELD_EVERY == YIELD_EVERY - 1:
                    time.sleep(0)  # the ingest thread's Python parts get the GIL in between
            return written
        if isinstance(item, CompressedFrame):  # (the live fold decoded it, or counted it)
            if not self.present[index] and (raw := self._decoded(item.blob, frame_bytes)) is None:
                self.skipped["with a blob that does not decompress"] += 1  # (a duplicate: not
                return 0  # decoded, counted by `_fresh`)
            if not self._fresh(index):
                return 0
            write((index, 0, 0), bytes(item.blob) if self.compressed else raw.tobytes())
            return 1
        mask = 1 if self.compressed else 0  # in a bslz4 dataset: stored with the filter skipped
        for k, frame in enumerate(item.frames):
            if self._fresh(index + k):
                raw = np.ascontiguousarray(frame, self.dtype)
                write((index + k, 0, 0), raw.tobytes(), filter_mask=mask)
                written += 1
        return written

    def _decoded(self, blob, frame_bytes: int) -> np.ndarray | None:
        """The bslz4 blob's frame (a scratch buffer), None where it does not decompress to one;
        in a kernel without the GIL where the engine's kernels decompress too."""
        if not native_bslz4():
            try:
                return np.frombuffer(decompress("bslz4", self.dtype.itemsize, blob,
                                                frame_bytes), self.dtype)  # fmt: skip
            except DecodeError:
                return None
        b = np.frombuffer(blob, np.uint8)
        return self._scratch if bslz4_into(b, 0, b.shape[0], self._scratch,
                                           self.dtype.itemsize) else None  # fmt: skip

    def _fresh(self, index: int) -> bool:
        """Whether position `index` has no frame yet (it is marked as having one now)."""
        if self.present[index]:
            self.skipped["duplicates (the first copy kept, as live)"] += 1
            return False
        self.present[index] = True
        return True

    def finish(self, target: Path, overwrite: bool) -> Path:
        """Close and move into place; a target that appeared meanwhile is kept (kept name)."""
        self.f.create_dataset(PRESENT, data=self.present)
        self.f[PRESENT].parent.attrs["frames_recorded"] = int(self.present.sum())
        self.f.close()
        try:
            commit(self.tmp, target, overwrite)
        except OutputExists:
            n = 1
            while (kept := target.with_name(f"{target.stem}.kept-{n}{target.suffix}")).exists():
                n += 1
            commit(self.tmp, kept, False)
            return kept
        return target

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


STOP = object()


class Recorder:
    """The engine's `on_frames` observer for `run --record`: enqueues, a thread writes.

    Call it with (processor, frame events) on the ingest thread; `end(series_id)` when a series
    ends (`ending` wraps an `on_series_end`); `close()` once the engine has stopped, then
    `summaries()` for the run's closing lines."""

    def __init__(self, settings: RecordSettings):
        self.settings = settings
        self.records: list[SeriesRecord] = []
        self._open: dict[int, tuple[object, SeriesRecord]] = {}  # series id -> (processor, record)
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._pending_bytes = 0
        self._files: dict[int, SeriesFile] = {}  # writer thread: key -> open file
        self._thread = threading.Thread(target=self._write_loop, name="tcbf-record", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ ingest thread
    def __call__(self, proc, batches: list[FrameBatch | CompressedFrame | TappedFrames]) -> None:
        """Enqueue the frames of an open series; never waits, never raises."""
        try:
            rec = self._record_of(proc, batches)
            if rec.target is None:
                return
            for b in batches:
                self._enqueue(rec, b)
        except Exception:  # the recording must never stop the live processing
            log.exception("recording: frames not recorded")

    def _enqueue(self, rec: SeriesRecord, b: FrameBatch | CompressedFrame | TappedFrames) -> None:
        if isinstance(b, TappedFrames):  # the compiled lane's blobs: one item per call
            index = b.frames - rec.offset
            beyond = (index < 0) | (index >= rec.n_positions)
            rec.beyond += int(np.count_nonzero(beyond))
            index[beyond] = -1
            if beyond.all():
                return
            if not self._put((rec.key, index, b), b.data.nbytes, bounded=True):  # (all of it)
                rec.queue_full += int(np.count_nonzero(index >= 0))
            return
        index = b.first - rec.offset
        count = 1 if isinstance(b, CompressedFrame) else len(b.frames)
        room = rec.n_positions - index
        if index < 0 or room <= 0:
            rec.beyond += count
            return
        if count > room:
            rec.beyond += count - room
            b, count = FrameBatch(b.series_id, b.first, b.frames[:room]), room
        nbytes = b.frames.nbytes if isinstance(b, FrameBatch) else memoryview(b.blob).nbytes
        if not self._put((rec.key, index, b), nbytes, bounded=True):
            rec.queue_full += count

    def _record_of(self, proc, batches: list) -> SeriesRecord:
        sid = proc.info.series_id
        held = self._open.get(sid)
        if held is not None and held[0] is proc:
            return held[1]
        if held is not None:  # the next pass as a new series (--repeat new-series)
            self.end(sid)
        info = proc.info
        rec = SeriesRecord(sid, len(self.records), proc.n_positions, proc.index_offset)
        self.records.append(rec)
        self._open[sid] = (proc, rec)
        number = sum(r.target is not None for r in self.records) + 1
        target = series_output(self.settings.path, number)
        need = estimate_bytes(info, proc.n_positions, batches) + self.settings.reserve_bytes
        free = shutil.disk_usage(target.parent).free
        if need > free:
            spare = self.settings.reserve_bytes >> 20
            rec.refusal = (f"it needs about {need / 1e9:.2f} GB ({spare} MiB to spare "
                           f"included), {free / 1e9:.2f} GB free in {target.parent}")  # fmt: skip
            log.error("series %d not recorded: %s", sid, rec.refusal)
            return rec
        rec.target = target
        compressed = any(isinstance(b, CompressedFrame | TappedFrames) for b in batches)
        self._put(("open", rec, info, compressed), 0, bounded=False)
        log.info("recording series %d to %s", sid, target)
        return rec

    def end(self, series_id: int) -> None:
        """The series ended: its file is finished once its queued frames are written."""
        held = self._open.pop(series_id, None)
        if held is not None and held[1].target is not None:
            self._put(("close", held[1]), 0, bounded=False)

    def ending(self, then: Callable) -> Callable:
        """An `on_series_end` that ends the series' recording, then calls `then`."""

        def on_series_end(result) -> None:
            self.end(result.info.series_id)
            then(result)

        return on_series_end

    def _put(self, item, nbytes: int, bounded: bool) -> bool:
        """Queue an item; a bounded one (frames) is refused when the queue holds its bytes
        limit. Control items (open, close: a few per series) always go in."""
        with self._cond:
            if bounded and self._pending_bytes + nbytes > self.settings.queue_bytes:
                return False
            self._items.append((item, nbytes))
            self._pending_bytes += nbytes
            self._cond.notify()
        return True

    def close(self) -> None:
        """End every series still open, write what is queued, stop the writer."""
        for sid in list(self._open):
            self.end(sid)
        self._put(STOP, 0, bounded=False)
        self._thread.join()

    def summaries(self) -> list[str]:
        return [rec.summary() for rec in self.records]

    # ------------------------------------------------------------------ writer thread
    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item, nbytes = self._items.popleft()
            if item is STOP:
                return
            try:
                self._write(item)
            finally:
                with self._cond:
                    self._pending_bytes -= nbytes
            time.sleep(0)  # h5py holds the GIL: let a waiting ingest thread in at once

    def _write(self, item) -> None:
        if item[0] == "open":
            _, rec, info, compressed = item
            try:
                self._files[rec.key] = SeriesFile(temporary_name(rec.target), info, compressed)
                rec.skipped = self._files[rec.key].skipped
            except Exception as exc:
                self._fail(rec, exc)
        elif item[0] == "close":
            rec = item[1]
            file = self._files.pop(rec.key, None)
            if file is not None:
                try:
                    rec.path = file.finish(rec.target, self.settings.overwrite)
                except Exception as exc:
                    self._fail(rec, exc, file)
        else:
            key, index, batch = item
            file = self._files.get(key)
            if file is not None:
                rec = self.records[key]
                try:
                    rec.written += file.write(index, batch)
                except Exception as exc:
                    self._fail(rec, exc, self._files.pop(key))

    def _fail(self, rec: SeriesRecord, exc: Exception, file: SeriesFile | None = None) -> None:
        rec.error = f"{rec.target}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        log.error("series %d: recording failed: %s", rec.series_id, rec.error)
        if file is not None:
            try:
                file.abort()
            except Exception:
                log.exception("recording: cannot remove %s", file.tmp)
