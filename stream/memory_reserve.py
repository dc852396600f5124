"""Memory for a series' accumulators, touched before the scan starts.

Fresh anonymous memory is mapped on first write: the kernel zeroes each page as the
accumulate kernel first writes to it, on the ingest thread, while frames arrive. On bare
metal that costs ~0.1 ms per MB (~35 ms for the 335 MB of a 256x256 scan with 2,091 BF
pixels: a 274 MB stack and 58 MB of tile sums); on virtual machines whose host reclaims free
guest memory (free page reporting, as on the VM the benchmarks ran on) the first touch runs at
~0.5 GB/s and the stack alone cost 0.55 s, more than a bare receive of the whole stream (0.4
s; `benchmarks/dectris_rate.py`). With the stack prepared, the tile sums' first touch was
still 8-14 % of the ingest thread's samples in a profile (perf, V2, one process).

`run` therefore sizes the state of the series it expects from its flags (scan, semi-angle
and angular sampling: the BF disk radius in pixels; the tile levels of `--bins` or the
default ones for that disk) and touches that memory once at start, before its socket
connects (`prepare`). The series' calibration takes it if the calibrated state fits and uses
at least half of it (`take`); otherwise it is released before the state is allocated, so the
memory budget holds either way. One process, one reserve: it is the process's memory, not a
series setting.

A worker (another process) holds a row block and a delta's copy of it per series, about 64 MiB
each whatever the scan (`tcbf.row_block`): it writes `KEPT_BUFFERS` buffers of that size at
start-up (`prepare_kept`), lends them to its series (`take_kept`) and keeps them when a series
is dropped (`give_back`, zeroed), so series after series fold into memory written once; delta
buffers ZeroMQ still sends from come back once it has let go (a local worker's are shared
with the coordinator, `shared_segments`, and come back once it has merged them). A larger
block (a large detector's `MIN_ROWS` rows) is allocated as before, and frees a kept buffer
it cannot use (a shared one is named in the worker's beats, `unshared`, and the coordinator
unmaps it too).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from tcbf_live.stream import pages, shared_segments
from tcbf_live.stream.budget import format_bytes
from tcbf_live.stream.tcbf.accumulators import ROW_FIELDS, Accumulators, AccumulatorState
from tcbf_live.stream.tcbf.tiles import default_bins, disk_tile_counts

log = logging.getLogger(__name__)

MIN_USE = 0.5  # a state smaller than this fraction of the reserve does not take it
BF_MARGIN_PX = 1.0  # the disk radius estimated from the optics, plus this (pixel edges)

_reserve: np.ndarray | None = None  # fresh (all zero), touched, not yet taken
KEPT_BUFFERS = 2  # a worker's: a row block and a delta's copy of it
_kept: list[np.ndarray] = []  # all zero, touched, not lent
_lent: dict[int, tuple[np.ndarray, int]] = {}  # id -> a kept buffer lent, the bytes asked for
_pending: list[tuple[np.ndarray, int, Any]] = []  # given back while still sent or read from
_shared: list[tuple[str, np.ndarray | None]] = []  # shared kept buffers: name, buffer (None: freed)


def expected_layout(metadata: Mapping[str, Any], bins: tuple[int, ...] | None = None
                    ) -> dict[str, tuple[tuple, np.dtype]] | None:  # fmt: skip
    """The accumulator layout (`AccumulatorState.layout`, uint16 stack) of the series that
    metadata given as flags describe: the scan, and a BF disk of radius semi-angle / angular
    sampling plus `BF_MARGIN_PX` (pixels), tiled at `bins` (default: the disk's default
    levels); None when one of them is not given. Counted, not listed: any flags size it in
    microseconds (`tiles.disk_tile_counts`), and the budget then decides."""
    scan = metadata.get("scan_shape")
    semiangle, sampling = metadata.get("semiangle_mrad"), metadata.get("angular_sampling_mrad")
    if not scan or not semiangle or not sampling:
        return None
    radius = semiangle / sampling + BF_MARGIN_PX
    n_bf, n_tiles = disk_tile_counts(radius, bins or default_bins(radius - BF_MARGIN_PX))
    n_pos = int(scan[0]) * int(scan[1])
    return AccumulatorState.layout(n_pos, n_bf, sum(n_tiles), n_pos)


def prepare_expected(metadata: Mapping[str, Any], budget_bytes: int,
                     bins: tuple[int, ...] | None = None) -> None:  # fmt: skip
    """`prepare` the state of the series the flags describe (`expected_layout`), where it
    takes at most half the memory budget; says what it did in the log."""
    layout = expected_layout(metadata, bins)
    nbytes = None if layout is None else AccumulatorState.block_bytes(layout)
    if nbytes is None:
        log.info("no memory prepared: --scan, --semiangle and --angular-sampling size it")
    elif nbytes > budget_bytes // 2:
        log.info("no memory prepared: the expected accumulators (%s) are over half the budget "
                 "(%s)", format_bytes(nbytes), format_bytes(budget_bytes))  # fmt: skip
    else:
        seconds = prepare(nbytes)
        log.info("prepared %s for the accumulators of the expected series in %.2f s",
                 format_bytes(nbytes), seconds)  # fmt: skip


def prepare(nbytes: int) -> float:
    """Allocate `nbytes` and write every page of it (zeros) now; the seconds it took.
    Replaces a reserve not taken yet."""
    global _reserve
    release()
    t = time.perf_counter()
    buf = np.empty(int(nbytes), np.uint8)
    buf.fill(0)  # a write: each page is mapped and zeroed once, now
    _reserve = buf
    return time.perf_counter() - t


def prepared_bytes() -> int:
    return 0 if _reserve is None else int(_reserve.nbytes)


def take(layout: dict[str, tuple[tuple, np.dtype]]) -> np.ndarray | None:
    """The reserve (uint8, all zero) for the accumulators of a calibrated series
    (`AccumulatorState.layout`), or None: nothing prepared, too small, or more than twice the
    size (then it is released first, so the caller's allocation fits the budget). Taken once."""
    global _reserve
    buf, _reserve = _reserve, None
    if buf is None:
        return None
    nbytes = AccumulatorState.block_bytes(layout)
    if buf.nbytes * MIN_USE <= nbytes <= buf.nbytes:
        log.info("the accumulators (%s) are in the memory prepared at start-up",
                 format_bytes(nbytes))  # fmt: skip
        pages.release(buf[nbytes:])  # the unused end goes back (the budget counts the state)
        return buf
    log.info("memory prepared at start-up released: the calibrated accumulators need %s, not %s",
             format_bytes(nbytes), format_bytes(buf.nbytes))  # fmt: skip
    return None


def release() -> None:
    """Free a reserve not taken (a refused series, a test)."""
    global _reserve
    _reserve = None


def for_state(layout: dict[str, tuple[tuple, np.dtype]], block: int | None) -> np.ndarray | None:
    """Memory written before, for a series' state of `layout` (a row per position): the
    reserve (`take`), or for a worker's row block of `block` rows a kept buffer."""
    if block is None:
        return take(layout)
    return take_kept(block_bytes(layout, block))


def block_bytes(layout: dict[str, tuple[tuple, np.dtype]], block: int) -> int:
    """Bytes of a worker's row block of `block` rows for a state of `layout`."""
    rows = {name: ((block, *shape[1:]) if name in ROW_FIELDS else shape, dtype)
            for name, (shape, dtype) in layout.items()}  # fmt: skip
    return AccumulatorState.block_bytes(rows)


def kept_bytes(metadata: Mapping[str, Any], bins: tuple[int, ...] | None = None,
               rows: int = 0, least: int = 0) -> int:  # fmt: skip
    """A worker's kept buffer for the series the flags describe (`expected_layout`): its row
    block of `rows` rows (0: `RowBlock.capacity`), at least `least` (also when the flags do
    not size it). A large detector's block (2,048 rows of ~120 KiB at 512x512) so comes
    from memory written at start, shared with the coordinator, like a small one's."""
    layout = expected_layout(metadata, bins)
    if layout is None:
        return least
    return max(least, block_bytes(layout, Accumulators.block_rows(layout, rows)))


def prepare_kept(nbytes: int, count: int = KEPT_BUFFERS, shared: str | None = None) -> float:
    """Write `count` buffers of `nbytes` now, to be lent (`take_kept`); the seconds it took.
    `shared` (a local worker's tag, `shared_segments.new_tag`): in segments the coordinator
    maps, where /dev/shm has the room, else in the process's own memory (said in the log)."""
    t = time.perf_counter()
    while len(_kept) + len(_lent) + len(_pending) < count:
        buf = None
        if shared:
            try:
                name, buf = shared_segments.create(int(nbytes), len(_shared), shared)
                _shared.append((name, buf))
            except shared_segments.SegmentError as err:
                log.info("deltas sent over the link, not shared: %s", err)
                shared = None
        if buf is None:
            buf = np.empty(int(nbytes), np.uint8)
            buf.fill(0)
        _kept.append(buf)
    return time.perf_counter() - t


def shared_names() -> list[str]:
    """The shared segments of this process (`prepare_kept(shared=True)`), in order."""
    return [name for name, _ in _shared]


def locate(a: np.ndarray) -> tuple[int, int] | None:
    """(segment number, byte offset) of a C-contiguous array that lies in one of this
    process's shared segments, else None."""
    if not a.flags.c_contiguous:
        return None
    start = a.__array_interface__["data"][0]
    for k, (_, buf) in enumerate(_shared):
        if buf is None:
            continue
        base = buf.__array_interface__["data"][0]
        if base <= start and start + a.nbytes <= base + buf.nbytes:
            return k, start - base
    return None


def unshared() -> list[int]:
    """The shared segments this process has freed (a worker's beat tells its coordinator)."""
    return [k for k, (_, buf) in enumerate(_shared) if buf is None]


def unshare() -> None:
    """The segments are this process's memory alone from now on (`locate` finds none)."""
    _shared.clear()


def unlink_shared() -> None:
    """Remove the shared segments' files (at exit; the mappings stay while they are used)."""
    shared_segments.unlink(shared_names())


def take_kept(nbytes: int) -> np.ndarray | None:
    """The smallest kept buffer of at least `nbytes` (uint8, all zero, touched), lent until
    `give_back` (its first `nbytes` may be written); None when none is kept or large enough.
    A series whose block is larger (a large detector) frees the smallest kept buffer: with
    the kept buffers idle, a worker holds the kept memory or such a series' own, not both."""
    for free in [p for p in _pending if p[2].done]:  # sent or merged since
        _pending.remove(free)
        free[0][: free[1]].fill(0)  # (only what was asked for was written)
        _kept.append(free[0])
    fits = [b for b in _kept if b.nbytes >= nbytes]
    if not fits:
        if _kept:
            small = min(_kept, key=lambda b: b.nbytes)
            _kept.remove(small)
            if (where := locate(small)) is not None:  # the coordinator unmaps it too (`unshared`)
                _shared[where[0]] = (_shared[where[0]][0], None)
        return None
    buf = min(fits, key=lambda b: b.nbytes)
    _kept.remove(buf)
    _lent[id(buf)] = (buf, int(nbytes))
    return buf


@contextlib.contextmanager
def lent_for_build(buf: np.ndarray | None) -> Iterator[np.ndarray | None]:
    """`buf` (from `for_state`) for building a series' state in: given back if the building
    raises, so that a failed series does not leave a worker one kept buffer short."""
    try:
        yield buf
    except BaseException:
        if buf is not None:
            give_back(buf)
        raise


def give_back(a: np.ndarray, busy: Any = None) -> bool:
    """Return the lent buffer that `a` is a view of (False for any other array), zeroed, for
    the next series; `busy` (a `zmq.MessageTracker` or `MergedMark`: ZeroMQ may still send
    from it, the coordinator still read it): kept
    only once its `done` is true."""
    while isinstance(a.base, np.ndarray):  # (a view's base: the buffer it was carved from)
        a = a.base
    buf, nbytes = _lent.pop(id(a), (None, 0))
    if buf is None:
        return False
    if busy is not None and not busy.done:
        _pending.append((buf, nbytes, busy))
    else:
        buf[:nbytes].fill(0)  # (only what was asked for was written)
        _kept.append(buf)
    return True
