"""Ingest staging: the front of the accumulate phase, many messages into few kernel calls.

DECTRIS and Merlin send one frame per message; a kernel call costs ~3 us, so runs of small
messages are copied into a reusable staging buffer (one concatenate, no Python per frame) and
folded with one call. Runs of bslz4-compressed frames share one call that decompresses each
frame into an L1/L2-sized scratch buffer and folds it while it is still in cache (through
dectris-compression's C entry point where installed, else the portable numba decoder; if the
chosen one fails its self-test, `native_bslz4()`, they are decoded first).
"""

from __future__ import annotations

import math
from collections import Counter

import numba
import numpy as np

from tcbf_live.detectors.base import CompressedFrame, DecodeError, FrameBatch
from tcbf_live.detectors.compression import bslz4_into, native_bslz4
from tcbf_live.stream.tcbf.accumulators import Accumulators, AccumulatorState
from tcbf_live.stream.tcbf.kernels import FASTMATH, claim, fold

STAGE_SMALL = 4  # messages with fewer frames than this are gathered ...
STAGE_FRAMES = 32  # ... into one kernel call of up to this many frames (<= 1 MiB, see below).
# Larger frames are not staged: copying one costs more than a kernel call (~3 us). Measured on
# the decoder path of benchmarks/decode_speed.py: 512x512 overhead 128 % -> 106-115 %.
STAGE_MAX_FRAME_BYTES = 32 << 10

Batch = FrameBatch | CompressedFrame


class Staging:
    """Folds decoded and compressed batches of one calibrated series into a state.

    `fold` returns the frames it had to skip, by reason (pixels that did not decode); the
    caller counts and logs them."""

    def __init__(self, acc: Accumulators, index_offset: int = 0):
        self.acc = acc
        self.index_offset = index_offset  # acquisition index of the series' first frame
        cal = acc.calibration
        self.detector_shape = cal.detector_shape
        self._stage: np.ndarray | None = None
        self._stage_index = np.empty(0, np.int64)
        self._scratch: np.ndarray | None = None  # one decompressed frame

    def fold(self, batches: list[Batch], into: AccumulatorState | None = None) -> Counter:
        """Fold `batches` in order (into `into`, another state of this geometry, if given)."""
        failed: Counter = Counter()
        small: list[FrameBatch] = []
        packed: list[CompressedFrame] = []
        count = 0
        for b in batches:
            if isinstance(b, CompressedFrame):
                self._stage_run(small, count, into)
                small, count = [], 0
                packed.append(b)
                if len(packed) >= STAGE_FRAMES:
                    self._compressed_run(packed, into, failed)
                    packed = []
                continue
            self._compressed_run(packed, into, failed)
            packed = []
            m = len(b.frames)
            if m >= STAGE_SMALL or not self._stageable(b.frames):
                self._stage_run(small, count, into)
                small, count = [], 0
                self.acc.add_indexed(self._indices(b.first, m), b.frames, into)
                continue
            small.append(b)
            count += m
            if count >= STAGE_FRAMES:
                self._stage_run(small, count, into)
                small, count = [], 0
        self._stage_run(small, count, into)
        self._compressed_run(packed, into, failed)
        return failed

    def _indices(self, first: int, n: int) -> np.ndarray:
        return np.arange(first - self.index_offset, first - self.index_offset + n, dtype=np.int64)

    @staticmethod
    def _stageable(frames: np.ndarray) -> bool:
        return math.prod(frames.shape[1:]) * frames.dtype.itemsize <= STAGE_MAX_FRAME_BYTES

    def _stage_run(self, small: list[FrameBatch], count: int, into) -> None:
        """Copy a run of small batches into the staging buffer with one concatenate and fold
        them with one kernel call."""
        if not small:
            return
        dtype = small[0].frames.dtype
        if self._stage is None or self._stage.dtype != dtype:
            self._stage = np.empty((STAGE_FRAMES + STAGE_SMALL, *self.detector_shape), dtype)
            self._stage_index = np.empty(self._stage.shape[0], np.int64)
        frames = self._stage[:count]
        index = self._stage_index[:count]
        np.concatenate([b.frames for b in small], axis=0, out=frames)
        if count == len(small):  # one frame per message (DECTRIS, Merlin)
            index[:] = np.fromiter((b.first for b in small), np.int64, count)
        else:
            index[:] = np.concatenate([np.arange(b.first, b.first + len(b.frames))
                                       for b in small])  # fmt: skip
        index -= self.index_offset
        self.acc.add_indexed(index, frames, into)

    def _compressed_run(self, packed: list[CompressedFrame], into, failed: Counter) -> None:
        """One kernel call for a run of bslz4 frames, decompressed inside it."""
        if not packed:
            return
        if not native_bslz4() or np.dtype(packed[0].dtype).str[1:] == "f2":  # (no f16 kernels)
            for c in packed:
                try:
                    b = c.decoded()
                except DecodeError as err:
                    failed[str(err)] += 1
                    continue
                self.acc.add_indexed(self._indices(b.first, len(b.frames)), b.frames, into)
            return
        index = np.fromiter((c.first for c in packed), np.int64, len(packed))
        index -= self.index_offset
        dtype = np.dtype(packed[0].dtype)
        if self._scratch is None or self._scratch.dtype != dtype:
            self._scratch = np.empty(math.prod(self.detector_shape), dtype)
        joined = np.frombuffer(b"".join(c.blob for c in packed), np.uint8)
        offsets = np.zeros(len(packed) + 1, np.int64)
        np.cumsum([len(c.blob) for c in packed], out=offsets[1:])
        bad = accumulate_compressed(joined, offsets, dtype.itemsize, self._scratch, index,
                                    self.acc.kernel_args(into))  # fmt: skip
        if bad:
            failed["bslz4 blob does not decompress to one frame"] += bad


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def accumulate_compressed(
    blobs: np.ndarray,  # uint8: the bslz4 blobs back to back
    offsets: np.ndarray,  # (B + 1,) blob b = blobs[offsets[b]:offsets[b + 1]]
    element_size: int,
    scratch: np.ndarray,  # (Qx*Qy,) one frame of the detector's dtype (stays in L1/L2)
    indices: np.ndarray,
    k: tuple,  # Accumulators.kernel_args()
) -> int:
    """`accumulate_frames` for bslz4-compressed frames: each is decompressed into `scratch` and
    folded in while it is still in cache. A blob that does not decompress to exactly one frame
    is skipped (its position stays empty, it is not marked seen); returns how many were."""
    vals, cum = fold_buffers(k)
    failed = 0
    for b in range(indices.shape[0]):
        if not fold_blob(blobs, offsets[b], offsets[b + 1], element_size, scratch, indices[b],
                         k, vals, cum):  # fmt: skip
            failed += 1
    return failed


@numba.njit(nogil=True, cache=True)
def fold_buffers(k: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The per-call scratch `fold_blob` needs, for the kernel arguments `k`."""
    zero = k[9]
    return np.zeros(k[3].shape[0], type(zero)), np.zeros(k[3].shape[0] + 1, type(zero))


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def fold_blob(blob, start, stop, element_size, scratch, idx, k, vals, cum) -> bool:
    """Decompress the bslz4 blob `blob[start:stop]` into `scratch` and fold it in at acquisition
    index `idx` (`claim` counts a duplicate or out-of-range index); False, with nothing changed,
    for a blob that does not decompress to exactly one frame."""
    (n_pos, cols, serpentine, bf_index, tile_start, tile_stop, axial_index, masked_index,
     stack_max, zero, exact, totals, bf_sum, axial_sum, hits, stack, tiles, seen, stats,
     moments, read_offset, masked_flag, det_cols, slot_of, slot_pos, slot_count) = k
    if not bslz4_into(blob, start, stop, scratch, element_size):
        return False
    j, r = claim(idx, n_pos, cols, serpentine, seen, stats, slot_of, slot_pos, slot_count)
    if j >= 0:
        fold(scratch, j, r, bf_index, tile_start, tile_stop, axial_index, masked_index,
             type(zero)(stack_max), zero, exact, vals, cum, totals, bf_sum, axial_sum, hits, stack,
             tiles, stats, moments, read_offset, masked_flag, det_cols)  # fmt: skip
    return True
