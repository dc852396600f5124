"""What a stalled coordinator costs: the bytes of deltas a worker queues on the link, with
the delta credit (`stream.worker_inbox`, a worker sends only while fewer than 128 MiB of its
deltas are unmerged) and without it (as before 2026-11-27: only the link's 64-message
queues, each delta up to a row block).

One worker in this process folds a 512x512 scan of 96x96 uint16 frames (Poisson, ~3 counts
per BF pixel) in batches of 1,024 into its row block (64 MiB), a delta whenever it is full.
The coordinator's ROUTER socket is bound but never read (a coordinator that has stalled):
ZeroMQ's I/O threads still move what the worker sends into the ROUTER's queue, in this
process. Before each batch the worker makes room as its run loop does (`make_room`, waiting
here 2 s for the link): where it cannot, it stops reading the detector, as in a run.
Printed: deltas and MiB sent (all unmerged), frames read and sent in deltas, frames lost,
the growth of this process' resident memory, wall seconds.

Run: OMP_NUM_THREADS=1 python benchmarks/link_credit.py
"""

from __future__ import annotations

import logging
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from tcbf_live.detectors.base import FrameBatch, SeriesInfo  # noqa: E402
from tcbf_live.stream import worker  # noqa: E402
from tcbf_live.stream.receiver import SubscriberSettings  # noqa: E402
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor  # noqa: E402
from tcbf_live.stream.worker import Worker  # noqa: E402
from tcbf_live.stream.worker_link import DELTA_CREDIT_BYTES, WorkerConfig, settings_to_dict  # noqa: E402

SCAN = (512, 512)
SIZE = 96
BATCH = 1024


def rss_mb() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def pool() -> np.ndarray:
    rng = np.random.default_rng(0)
    r = np.hypot(*np.mgrid[:SIZE, :SIZE] - SIZE / 2)
    mean = np.where(r < 0.2 * SIZE, 3.0, 0.02)
    return rng.poisson(mean, (BATCH, SIZE, SIZE)).astype(np.uint16)


def run(credit: int, frames: np.ndarray) -> dict:
    info = SeriesInfo(1, SCAN, (SIZE, SIZE), "<u2", frames_expected=SCAN[0] * SCAN[1])
    proc = SeriesProcessor(info, ProcessingSettings())
    proc.add(FrameBatch(1, 0, frames[:64]))  # the calibration
    ctx = zmq.Context()
    coordinator, link = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    link.set_hwm(64)  # the worker link's LINK_HWM, as `worker_process` opens it
    coordinator.set_hwm(256)  # and the coordinator's (LINK_HWM * 4)
    port = coordinator.bind_to_random_port("tcp://127.0.0.1")
    link.connect(f"tcp://127.0.0.1:{port}")
    data = SubscriberSettings(endpoint="tcp://127.0.0.1:1", socket_type="pull")
    config = WorkerConfig(0, "native", data.endpoint, "pull", 1000, 1 << 20, None, None, 0.1,
                          1 << 20, settings_to_dict(ProcessingSettings()),
                          delta_credit_bytes=credit)  # fmt: skip
    w = Worker(link, config, data)
    w.on_start(info, repeat=False)
    w.calibrated(1, 1, proc.raw_calibration)
    rss0, t0 = rss_mb(), time.perf_counter()
    read = 0
    for first in range(0, SCAN[0] * SCAN[1], BATCH):
        if not w.make_room(worker.ROOM, 2.0):  # as `Worker.run` does before it reads
            break  # the detector is not read any more: ZeroMQ pushes back to the sender
        w.fold([FrameBatch(1, first, frames)])
        read += BATCH
    w.sync(wait_ms=2000)
    time.sleep(1.0)  # what was sent reaches the ROUTER's queue
    out = {
        "credit": "none (before)" if credit >= 1 << 60 else f"{credit >> 20} MiB",
        "sent_mib": w.inbox.sent / 2**20,
        "read": read,
        "frames": w.counters.frames,
        "lost": w.counters.rejected.get("no_room", 0),
        "rss_mib": rss_mb() - rss0,
        "wall_s": time.perf_counter() - t0,
    }
    n = 0
    while coordinator.poll(0):
        coordinator.recv_multipart(copy=False)
        n += 1
    out["deltas"] = n
    w.sock.close(linger=0)
    ctx.destroy(linger=0)
    return out


def main() -> None:
    logging.disable(logging.WARNING)  # (a worker that stops reading logs why)
    frames = pool()
    print(
        f"{SCAN[0]}x{SCAN[1]} scan of {SIZE}x{SIZE} frames, one worker, a coordinator that "
        "never reads its link"
    )
    print(
        f"{'credit':>14s} {'deltas':>7s} {'MiB sent':>9s} {'read':>8s} {'in deltas':>9s} "
        f"{'no_room':>8s} "
        f"{'RSS +MiB':>9s} {'wall s':>7s}"
    )
    for credit in (1 << 62, DELTA_CREDIT_BYTES):
        r = run(credit, frames)
        print(
            f"{r['credit']:>14s} {r['deltas']:7d} {r['sent_mib']:9.0f} {r['read']:8d} "
            f"{r['frames']:9d} "
            f"{r['lost']:8d} {r['rss_mib']:9.0f} {r['wall_s']:7.1f}"
        )


if __name__ == "__main__":
    main()
