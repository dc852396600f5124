"""Thread priority: background work yields the CPU to ingest on a busy host."""

from __future__ import annotations

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
