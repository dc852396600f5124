"""Shared helpers for the benchmark scripts."""

import os


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _proc_rss_kb(pid: int) -> int:
    """VmRSS of one process in kB from /proc (0 when it has gone or is a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _proc_children(pid: int) -> list[int]:
    """Direct children of `pid` over all its threads (/proc/PID/task/TID/children)."""
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return children


def tree_rss_mb(pid: int) -> float:
    """Resident set size in MB of process `pid` plus all its descendants (psutil when
    installed, else /proc VmRSS summed over the tree)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return float("nan")
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total / 2**20
    seen: set[int] = set()
    todo = [pid]
    total_kb = 0
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total_kb += _proc_rss_kb(p)
        todo.extend(_proc_children(p))
    return total_kb / 1024 if total_kb else float("nan")


def bare_receive(endpoint: str, header_messages: int, timed_messages: int,
                 rcvhwm: int) -> tuple[float, float]:  # fmt: skip
    """The bare pyzmq loop the engine is compared with: a PULL socket connects to `endpoint`,
    takes the header messages and the first data message, then `timed_messages` more with
    `recv_multipart(copy=False)` and nothing else, then the end message. Returns the wall and
    CPU (this process) seconds of the timed messages."""
    import time

    import zmq

    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.connect(endpoint)
    for _ in range(header_messages + 1):  # the header, and the first data message (warm)
        parts = sock.recv_multipart(copy=False)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(timed_messages):
        parts = sock.recv_multipart(copy=False)
    t1, c1 = time.perf_counter(), time.process_time()
    sock.recv_multipart(copy=False)  # end
    del parts
    sock.close()
    return t1 - t0, c1 - c0
