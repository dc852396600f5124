"""CPU per frame of each ingest stage, one thread (issue 14): the figures that carry to a host
with more cores, where each receiver process runs these stages for its share of the frames.

DECTRIS stream V1 and V2, 96x96 uint16 bslz4 images (the pre-encoded messages of
`parse_speed.py`), timed stage by stage in one process on one core:
- receive: `transport.recv_capped` of every message from an inproc PULL socket whose PUSH side
  queued them beforehand (the receiving side's cost only; loopback TCP adds the kernel's);
- parse: the decoder (lean path, bslz4 left compressed for the kernel);
- decompress: one frame, the C library and the portable codec;
- accumulate: the accumulate kernel on decoded frames (all bin levels, 2090 BF px), and the
  fused kernel that decompresses each frame in cache and folds it (what the engine runs);
- engine loop: the same messages decoded and handed to `Engine.process` as the receive loop
  does (routing, geometry checks, staging, the fused kernel), without a socket and without the
  alignment (which runs on its own thread);
- merge: one merge of a 256x256 scan's partial state without the stack (`merge_speed.py`),
  per alignment update, not per frame.
Best of 3 per stage.

Run: OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/stage_profile.py
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import zmq  # noqa: E402
from parse_speed import messages, series_info  # noqa: E402

from tcbf_live.detectors import compression  # noqa: E402
from tcbf_live.detectors.base import CompressedFrame, FrameBatch  # noqa: E402
from tcbf_live.detectors.registry import DecoderOptions, protocol  # noqa: E402
from tcbf_live.stream.series import ProcessingSettings, SeriesProcessor  # noqa: E402
from tcbf_live.stream.staging import Staging  # noqa: E402
from tcbf_live.stream.transport import recv_capped  # noqa: E402

N_FRAMES = 8192


def best_us(fn, n: int, repeats: int = 3) -> float:
    """Best CPU time of `fn()` over `repeats`, in microseconds per item (n items per call)."""
    best = np.inf
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best / n * 1e6


def receive_us(msgs: list[list[bytes]]) -> float:
    ctx = zmq.Context.instance()

    def run():
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        push.set_hwm(0)
        pull.set_hwm(0)
        pull.bind("inproc://stage")
        push.connect("inproc://stage")
        for m in msgs:
            push.send_multipart(m)
        t = time.thread_time()
        for _ in msgs:
            recv_capped(pull, 1 << 30, flags=0)
        spent = time.thread_time() - t
        push.close(linger=0)
        pull.close(linger=0)
        return spent

    return min(run() for _ in range(3)) / len(msgs) * 1e6


def decoded(name: str, msgs: list[list[bytes]]) -> list:
    decoder = protocol(name).decoder(DecoderOptions(defer_bslz4=True))
    events = []
    for m in msgs:
        out = decoder.decode(m)  # one event, a list of them, or None
        events.extend(out if isinstance(out, list) else [out])
    return [e for e in events if isinstance(e, CompressedFrame)]


def stage_table(name: str) -> list[tuple[str, float]]:
    scan = (N_FRAMES // 128, 128)
    msgs = messages(name, N_FRAMES, scan)
    images = msgs[len(msgs) - N_FRAMES - 1 : -1]
    rows = [("receive (recv_capped, inproc)", receive_us(images))]

    def parse():
        decoded(name, msgs)

    rows.append(("parse (lean, blob left compressed)", best_us(parse, N_FRAMES)))
    frames = decoded(name, msgs)
    nbytes = 96 * 96 * 2
    blobs = [f.blob for f in frames[:512]]
    rows.append(("decompress, C library",
                 best_us(lambda: [compression.decompress("bslz4", 2, b, nbytes) for b in blobs],
                         len(blobs))))  # fmt: skip
    rows.append(("decompress, portable codec",
                 best_us(lambda: [compression.decompress_portable("bslz4", 2, memoryview(b),
                                                                  nbytes) for b in blobs],
                         len(blobs))))  # fmt: skip
    info = series_info(N_FRAMES, scan)
    proc = SeriesProcessor(info, ProcessingSettings())
    first = np.stack([f.decoded().frames[0] for f in frames[:64]])
    proc.add(FrameBatch(1, 0, first))  # calibrates
    acc = proc.acc
    plain = np.stack([f.decoded().frames[0] for f in frames[:2048]])
    idx = np.arange(2048, dtype=np.int64)

    def accumulate():
        into = acc.empty_state()
        for k in range(0, 2048, 32):
            acc.add_indexed(idx[k : k + 32], plain[k : k + 32], into)

    rows.append(("accumulate (decoded frames, all levels)", best_us(accumulate, 2048)))
    staging = Staging(acc)

    def fused():
        staging.fold(frames[:2048], into=acc.empty_state())

    rows.append(("decompress + accumulate, fused kernel", best_us(fused, 2048)))
    rows.append(("engine loop: decode + route + stage + kernel", engine_us(name, msgs)))
    rows.append(("compiled lane: receive+parse+decompress+fold", lane_us(name, images, proc)))
    return rows


def lane_us(name: str, images: list[list[bytes]], proc: SeriesProcessor) -> float:
    """`fast_lane`: every image message received, matched, decompressed and folded by the
    compiled loop from an inproc PULL socket whose PUSH side queued them beforehand."""
    from tcbf_live.detectors import dectris_v1_fields, dectris_v2_lean
    from tcbf_live.stream.fast_lane import Lane, LaneTarget

    if name == "dectris-v1":
        lay = dectris_v1_fields.image_layout(images[0], json.loads(images[0][1]))
        templates = (lay.dimage, lay.image_d, lay.dconfig)
    else:
        templates = (dectris_v2_lean.image_layout(memoryview(images[0][0]),
                                                  b"threshold_1").template,)  # fmt: skip
    ctx = zmq.Context.instance()

    def run():
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        push.set_hwm(0)
        pull.set_hwm(0)
        endpoint = f"inproc://lane-{time.perf_counter_ns()}"
        pull.bind(endpoint)
        push.connect(endpoint)
        for m in images:
            push.send_multipart(m)
        target = LaneTarget(templates, 1 << 31, 0, 2,
                            np.empty(96 * 96, "<u2"),
                            proc.acc.kernel_args(proc.acc.empty_state()))  # fmt: skip
        lane = Lane(pull)
        t = time.thread_time()
        n, _, held, _ = lane.drain(target, len(images), 1 << 30)
        spent = time.thread_time() - t
        assert n == len(images) and not held, (n, held)
        push.close(linger=0)
        pull.close(linger=0)
        return spent

    return min(run() for _ in range(3)) / len(images) * 1e6


def engine_us(name: str, msgs: list[list[bytes]]) -> float:
    """The engine's whole ingest step without a socket: every message decoded
    (`decode_counted`) and handed to `Engine.process` 64 at a time, as the receive loop does;
    the last frame and the end are left out, so no final alignment runs."""
    from tcbf_live.stream.engine import Engine, EngineSettings
    from tcbf_live.stream.receiver import StreamCounters, SubscriberSettings, decode_counted

    def run() -> float:
        eng = Engine(EngineSettings(subscriber=SubscriberSettings(
            endpoint="inproc://engine-stage", socket_type="pull", bind=True),
            protocol=name, align_interval_s=None))  # fmt: skip
        decoder = protocol(name).decoder(DecoderOptions(defer_bslz4=True))
        counters, batch = StreamCounters(), []
        t = time.thread_time()
        for m in msgs[:-2]:
            batch.extend(decode_counted(decoder, m, counters))
            if len(batch) >= 64:
                eng.process(batch)
                batch = []
        eng.process(batch)
        spent = time.thread_time() - t
        eng.receiver.close()
        return spent

    return min(run() for _ in range(2)) / (N_FRAMES - 1) * 1e6


def main() -> None:
    print(f"{N_FRAMES} DECTRIS 96x96 uint16 bslz4 images; CPU microseconds per frame, one thread")
    tables = {name: stage_table(name) for name in ("dectris-v1", "dectris-v2")}
    print(f"{'stage':42s} {'V1':>8s} {'V2':>8s}")
    for k, (what, v1) in enumerate(tables["dectris-v1"]):
        print(f"{what:42s} {v1:8.2f} {tables['dectris-v2'][k][1]:8.2f}")
    for name, rows in tables.items():
        d = dict(rows)
        total = (d["receive (recv_capped, inproc)"] + d["parse (lean, blob left compressed)"]
                 + d["decompress + accumulate, fused kernel"])  # fmt: skip
        print(
            f"{name}: receive + parse + fused kernel = {total:.1f} us per frame "
            f"= {1e6 / total:,.0f} frames/s per core"
        )


if __name__ == "__main__":
    main()
