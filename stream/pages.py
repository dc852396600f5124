"""Memory given back: the pages of a large array that is all zeros returned to the operating
system, and this process's peak resident memory.

`release` hands an array's pages back (Linux `madvise(MADV_DONTNEED)`: anonymous memory reads
back as zeros); `memory_reserve` gives back the part of its prepared block a series does not
take. (Workers once released their whole state after every delta and then wrote every frame
into fresh memory; they now fold into a recycled block of rows, `tcbf.row_block`.) Elsewhere
it does nothing (the memory stays resident, the values stay zero).
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4


def release(a: np.ndarray) -> int:
    """Return to the OS the pages wholly inside `a`, which must be all zeros (the pages at
    its two ends, shared with other memory, stay); the bytes released."""
    if _libc is None or not a.flags.c_contiguous or a.nbytes < 2 * PAGE:
        return 0
    lo = (a.ctypes.data + PAGE - 1) // PAGE * PAGE
    hi = (a.ctypes.data + a.nbytes) // PAGE * PAGE
    if _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) != 0:
        return 0
    return hi - lo


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB; 0 where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
