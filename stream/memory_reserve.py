"""Memory for a series' per-BF-pixel stack, touched before the scan starts.

Fresh anonymous memory is mapped on first write: the kernel zeroes each page as the
accumulate kernel first writes to it, on the ingest thread, while frames arrive. On bare
metal that costs ~0.1 ms per MB (~30 ms for the 274 MB stack of a 256x256 scan with 2,091 BF
pixels); on virtual machines whose host reclaims free guest memory (free page reporting, as
on the VM the benchmarks ran on) the first touch runs at ~0.5 GB/s and the same stack cost
0.55 s, more than a bare receive of the whole stream (0.4 s; `benchmarks/dectris_rate.py`).

`run` therefore sizes the stack of the series it expects from its flags (scan, semi-angle
and angular sampling: the BF disk radius in pixels) and touches that memory once at start,
before its socket connects (`prepare`). The series' calibration takes it if the calibrated
stack fits and uses at least half of it (`take`); otherwise it is released before the stack
is allocated, so the memory budget holds either way. One process, one reserve: it is the
process's memory, not a series setting (workers, which are other processes, prepare none).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from tcbf_live.stream import pages
from tcbf_live.stream.budget import format_bytes

log = logging.getLogger(__name__)

MIN_USE = 0.5  # a stack smaller than this fraction of the reserve does not take it
BF_MARGIN_PX = 1.0  # the disk radius estimated from the optics, plus this (pixel edges)

_reserve: np.ndarray | None = None  # fresh (all zero), touched, not yet taken


def expected_stack_bytes(metadata: Mapping[str, Any]) -> int | None:
    """Bytes of the (uint16) stack of the series that metadata given as flags describe: the
    scan, and a BF disk of radius semi-angle / angular sampling (pixels); None when one of
    them is not given."""
    scan = metadata.get("scan_shape")
    semiangle, sampling = metadata.get("semiangle_mrad"), metadata.get("angular_sampling_mrad")
    if not scan or not semiangle or not sampling:
        return None
    n_bf = math.ceil(math.pi * (semiangle / sampling + BF_MARGIN_PX) ** 2)
    return int(scan[0]) * int(scan[1]) * n_bf * 2


def prepare_expected(metadata: Mapping[str, Any], budget_bytes: int) -> None:
    """`prepare` the stack of the series the flags describe (`expected_stack_bytes`), where it
    takes at most half the memory budget; says what it did in the log."""
    nbytes = expected_stack_bytes(metadata)
    if nbytes is None:
        log.info("no memory prepared: --scan, --semiangle and --angular-sampling size it")
    elif nbytes > budget_bytes // 2:
        log.info("no memory prepared: the expected stack (%s) is over half the budget (%s)",
                 format_bytes(nbytes), format_bytes(budget_bytes))  # fmt: skip
    else:
        seconds = prepare(nbytes)
        log.info("prepared %s for the stack of the expected series in %.2f s",
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


def take_stack(scan_shape: tuple[int, int], n_bf: int, integer: bool) -> np.ndarray | None:
    """The reserve (uint8, all zero) for the stack of a calibrated series (uint16 for integer
    frames, else float32), or None: nothing prepared, too small, or more than twice the size
    (then it is released first, so the caller's allocation fits the budget). Taken once."""
    global _reserve
    buf, _reserve = _reserve, None
    if buf is None:
        return None
    nbytes = int(scan_shape[0]) * int(scan_shape[1]) * int(n_bf) * (2 if integer else 4)
    if buf.nbytes * MIN_USE <= nbytes <= buf.nbytes:
        log.info("the stack (%s) is in the memory prepared at start-up", format_bytes(nbytes))
        pages.release(buf[nbytes:])  # the unused end goes back (the budget counts the stack)
        return buf
    log.info("memory prepared at start-up released: the calibrated stack needs %s, not %s",
             format_bytes(nbytes), format_bytes(buf.nbytes))  # fmt: skip
    return None


def release() -> None:
    """Free a reserve not taken (a refused series, a test)."""
    global _reserve
    _reserve = None
