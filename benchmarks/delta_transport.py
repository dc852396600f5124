"""What moving a worker's deltas to the coordinator costs: over the worker link (loopback TCP,
zero-copy tracked frames, as a worker on another host sends them) against shared memory (a
local worker's: `stream.shared_segments`, the message names a segment offset and the
coordinator reads the rows in place).

A worker process takes deltas of ROWS stack rows of 5 KiB (a 96x96 frame's 2,091 BF px plus
its tile sums, about 0.1 s of frames at 40,000 frames/s) into the halves of its kept buffers,
as `WorkerSeries` does, and sends each as soon as a half is free (unpaced); the coordinator
(this process) unpacks each with the real link codec, adds its rows into a whole-scan stack
(`state[rows] += delta`, reading every byte once, as the merge does) and answers "merged".
Printed per transport: deltas, MiB, wall seconds, and CPU microseconds per delta row (per
frame) of each process, ZeroMQ's I/O threads included, best of `--rounds`.

Run: OMP_NUM_THREADS=1 python benchmarks/delta_transport.py [--deltas 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from tcbf_live.stream import memory_reserve  # noqa: E402
from tcbf_live.stream.shared_segments import PeerSegments, owner  # noqa: E402
from tcbf_live.stream.worker_link import pack, unpack  # noqa: E402
from tcbf_live.stream.worker_series import AllDone, MergedMark  # noqa: E402

ROWS = 4096  # rows per delta
ROW_ITEMS = 2560  # uint16 per row: 5 KiB
POSITIONS = 256 * 256
TAG = "0123456789abcdef"  # the worker's segment names (`shared_segments.owner`)


class Inbox:  # the worker's view of the coordinator's "merged" answers
    merged = 0


def worker(endpoint: str, shared: bool, deltas: int) -> None:
    """Send `deltas` deltas, each into a free half of the kept buffer (else new arrays)."""
    memory_reserve.prepare_kept(2 * ROWS * ROW_ITEMS * 2 + 4096, count=1,
                                shared=TAG if shared else None)  # fmt: skip
    kept = memory_reserve.take_kept(2 * ROWS * ROW_ITEMS * 2)
    halves = kept[: 2 * ROWS * ROW_ITEMS * 2].view(np.uint16).reshape(2, ROWS, ROW_ITEMS)
    source = np.random.default_rng(1).integers(0, 9, (ROWS, ROW_ITEMS), np.uint16)
    ctx = zmq.Context()
    link = ctx.socket(zmq.DEALER)
    link.connect(endpoint)
    link.send_multipart(pack("hello", {"pid": os.getpid(),
                                       "segments": memory_reserve.shared_names()}))  # fmt: skip
    link.recv_multipart()  # "go"
    memory_reserve.unlink_shared()
    inbox, busy, sent, t0 = Inbox(), [None, None], 0, time.process_time()
    for k in range(deltas):
        while link.poll(0):
            inbox.merged = unpack(link.recv_multipart())[1]["bytes"]
        free = [h for h in (0, 1) if AllDone((busy[h],)).done]
        out = halves[free[0]] if free else np.empty_like(source)
        np.copyto(out, source)  # the take
        rows = np.arange(k * ROWS, (k + 1) * ROWS, dtype=np.int64) % POSITIONS
        sent += out.nbytes
        parts = pack("delta", {"sent": sent}, {"rows": rows, "stack": out},
                     locate=memory_reserve.locate if shared else None)  # fmt: skip
        if not free:
            link.send_multipart(parts, copy=False)
        elif shared:
            busy[free[0]] = MergedMark(inbox, sent)
            link.send_multipart(parts)
        else:
            frames = [zmq.Frame(p, copy=False, track=True) for p in parts]
            busy[free[0]] = zmq.MessageTracker(*frames)
            link.send_multipart(frames, copy=False)
        while not free and inbox.merged < sent - 2 * out.nbytes:  # (bounded: like the credit)
            inbox.merged = unpack(link.recv_multipart())[1]["bytes"]
    while inbox.merged < sent:
        inbox.merged = unpack(link.recv_multipart())[1]["bytes"]
    link.send_multipart(pack("done", {"cpu_s": time.process_time() - t0}))
    link.close(linger=1000)
    ctx.term()


def one(shared: bool, deltas: int) -> dict:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    p = mp.get_context("spawn").Process(target=worker, args=(f"tcp://127.0.0.1:{port}", shared,
                                                              deltas))  # fmt: skip
    p.start()
    ident, *parts = router.recv_multipart()
    head = unpack(parts)[1]
    segments = PeerSegments.open(head["segments"], owner(p.pid, TAG)) if shared else None
    state = np.zeros((POSITIONS, ROW_ITEMS), np.uint16)  # (touched: as prepared at start-up)
    router.send_multipart([ident, *pack("go")])
    t0, c0, nbytes = time.perf_counter(), time.process_time(), 0
    while True:
        ident, *parts = router.recv_multipart(copy=False)
        kind, head, arrays, _ = unpack(parts, segments)
        if kind == "done":
            break
        state[arrays["rows"]] += arrays["stack"]  # the merge: every byte read once
        nbytes += arrays["stack"].nbytes
        del arrays
        router.send_multipart([ident, *pack("merged", {"bytes": head["sent"]})])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    p.join(10)
    if segments is not None:
        segments.close()
    router.close(linger=0)
    ctx.term()
    frames = deltas * ROWS
    return {"MiB": nbytes / 2**20, "wall_s": wall, "worker": head["cpu_s"] * 1e6 / frames,
            "coordinator": cpu * 1e6 / frames}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deltas", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    best: dict[str, dict] = {}
    for _ in range(args.rounds):  # the two transports alternated
        for name, shared in (("link (TCP)", False), ("shared memory", True)):
            r = one(shared, args.deltas)
            b = best.setdefault(name, r)
            for key in ("wall_s", "worker", "coordinator"):
                b[key] = min(b[key], r[key])
    print(f"{args.deltas} deltas of {ROWS} rows x {ROW_ITEMS * 2} B, unpacked and merged; "
          f"best of {args.rounds}; CPU us per row (frame), ZeroMQ's I/O threads included")
    print(f"{'transport':<15} {'MiB':>7} {'wall s':>7} {'worker':>7} {'coordinator':>12}")
    for name, r in best.items():
        print(f"{name:<15} {r['MiB']:7.0f} {r['wall_s']:7.2f} {r['worker']:7.2f} "
              f"{r['coordinator']:12.2f}")


if __name__ == "__main__":
    main()
