"""The CPU for ingest on a busy host: background threads yield to it, and the garbage
collector does not walk the objects of start-up while frames arrive."""

from __future__ import annotations

import gc
import os
import threading

ALIGN_NICENESS = 10  # the alignment thread: frames come first; it catches up when they pause


def lower_thread_priority(niceness: int = ALIGN_NICENESS) -> bool:
    """Raise the calling thread's nice value by `niceness` (Linux: per thread); on a host with
    fewer cores than busy threads the others run first. False where the OS does not allow it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        return False
    return True


def freeze_startup_objects(collect: bool = True) -> None:
    """Put every object alive now (modules, compiled kernels, settings) out of the cyclic
    garbage collector's reach (`gc.freeze`). Its full collections walk every tracked object,
    some 10^5 once numpy, scipy and numba are imported; in a worker they took 23 % of the
    receiving thread's samples (perf, V2, one worker, 2-core VM). Call it after start-up,
    before data flows (`collect`: collect first, so no garbage is frozen), and again without
    collecting once the compiled kernels have run (a worker: after its first delta)."""
    if collect:
        gc.collect()
    gc.freeze()
