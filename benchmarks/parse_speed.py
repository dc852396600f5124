"""DECTRIS image parsing, lean vs full (issue 14): the decoders alone, then the whole ingest.

1. Decoder alone, microseconds per frame, on the same pre-encoded 96x96 uint16 bslz4 image
   messages in the same process: the lean path (image messages of a learned layout read by a
   bytes pattern: no json for V1, no cbor2 for V2) against the full parse (the layout never
   learned). "parse" leaves the bslz4 blob compressed, as the engine does when the accumulate
   kernel decompresses it; "decode" decompresses it in the decoder as well. Best of 5,
   interleaved.
2. Ingest, frames/s: a sender process pushes one pre-encoded DECTRIS series (256x256 scan,
   96x96 bslz4 frames, unpaced, tcp loopback) to, alternately, a bare pyzmq PULL loop
   (recv_multipart(copy=False) and nothing else), tcbf-live's Engine with the full parse, and
   the Engine with the lean path. Rates from the first to the last image (the engine's own
   summary rate); CPU of the receiving process per frame; best of 2 rounds; ratios of one run.

Run: OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/parse_speed.py [--decoder-only]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import zmq  # noqa: E402
from ingest_speed import free_endpoint  # noqa: E402

from common import bare_receive  # noqa: E402
from tcbf_live.detectors.dectris_v1 import DectrisV1Decoder  # noqa: E402
from tcbf_live.detectors.dectris_v2 import DectrisV2Decoder  # noqa: E402

SIZE = 96
PROTOCOLS = ("dectris-v1", "dectris-v2")
_LEARN = {cls: cls._learn for cls in (DectrisV1Decoder, DectrisV2Decoder)}


def series_info(n_frames: int, scan: tuple[int, int]):
    from tcbf_live.detectors.base import SeriesInfo

    return SeriesInfo(1, scan, (SIZE, SIZE), "<u2", frames_expected=n_frames, mask_value=65535)


def messages(protocol: str, n_frames: int, scan: tuple[int, int]) -> list[list[bytes]]:
    """Header, n_frames image messages (64 distinct bslz4 blobs), end: as the detector sends."""
    from tcbf_live.detectors import dectris_v1_encoder as v1
    from tcbf_live.detectors import dectris_v2_encoder as v2
    from tcbf_live.detectors.compression import compress_bslz4

    rng = np.random.default_rng(SIZE)
    r = np.hypot(*np.mgrid[:SIZE, :SIZE] - SIZE / 2)
    mean = np.where(r < 0.2 * SIZE, 3.0, 0.02)  # ~3 counts per BF pixel, sparse dark field
    pool = rng.poisson(mean, (64, SIZE, SIZE)).astype(np.uint16)
    blobs = [compress_bslz4(f) for f in pool]
    info = series_info(n_frames, scan)
    enc = v1 if protocol == "dectris-v1" else v2
    head = v1.encode_header(info) if enc is v1 else [v2.encode_start(info)]
    images = [enc.encode_image(1, i, pool[0], blob=blobs[i % 64]) for i in range(n_frames)]
    return [*head, *images, enc.encode_end(1)]


def full_parse_only(full: bool) -> None:
    """Keep the decoders from learning a layout (every image fully parsed), or let them."""
    for cls, learn in _LEARN.items():
        cls._learn = (lambda self, *args: None) if full else learn


def decoder_table(n_frames: int = 4096) -> None:
    make = {"dectris-v1": lambda lean, defer: DectrisV1Decoder(defer, lean=lean),
            "dectris-v2": lambda lean, defer: DectrisV2Decoder(defer_bslz4=defer, lean=lean)}
    print(f"decoder alone, {SIZE}x{SIZE} uint16 bslz4, {n_frames} pre-encoded images, "
          "microseconds per frame (best of 5)")  # fmt: skip
    print(f"{'protocol':>11} {'mode':>7} {'full us':>8} {'lean us':>8} {'full/lean':>10}")
    for protocol in PROTOCOLS:
        msgs = [[memoryview(p) for p in m] for m in messages(protocol, n_frames, (64, 64))]
        head, images = msgs[: 2 if protocol == "dectris-v1" else 1], msgs[-n_frames - 1 : -1]
        for mode, defer in (("parse", True), ("decode", False)):
            best = {True: np.inf, False: np.inf}
            for _ in range(5):
                for lean in (False, True):
                    dec = make[protocol](lean, defer)
                    for m in head:
                        dec.decode(m)
                    t = time.perf_counter()
                    for m in images:
                        dec.decode(m)
                    best[lean] = min(best[lean], time.perf_counter() - t)
            full_us, lean_us = (best[k] / n_frames * 1e6 for k in (False, True))
            print(f"{protocol:>11} {mode:>7} {full_us:8.2f} {lean_us:8.2f} "
                  f"{full_us / lean_us:10.2f}")  # fmt: skip


def sender(protocol: str, endpoint: str, n_frames: int, scan: tuple[int, int]) -> None:
    """Child process: pre-encode the series, then push it unpaced."""
    series = messages(protocol, n_frames, scan)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 1000)
    push.bind(endpoint)
    for parts in series:
        if parts is series[-1]:  # the receiver may leave on the frame count before the end
            push.setsockopt(zmq.SNDTIMEO, 2000)
        try:
            push.send_multipart(parts, copy=False)  # blocks until the receiver connects
        except zmq.Again:
            break
    push.setsockopt(zmq.LINGER, 2000)
    push.close()
    ctx.term()


def start_sender(protocol, endpoint, n_frames, scan):
    proc = mp.get_context("spawn").Process(target=sender,
                                           args=(protocol, endpoint, n_frames, scan))  # fmt: skip
    proc.start()
    return proc


def bare(protocol: str, n_frames: int, scan) -> tuple[float, float]:
    endpoint = free_endpoint()
    proc = start_sender(protocol, endpoint, n_frames, scan)
    headers = 2 if protocol == "dectris-v1" else 1
    wall, cpu = bare_receive(endpoint, headers, n_frames - 1, rcvhwm=10_000)  # engine's HWM
    proc.join()
    return (n_frames - 1) / wall, cpu / (n_frames - 1) * 1e6


def engine(protocol: str, n_frames: int, scan, full: bool) -> tuple[float, float]:
    from tcbf_live.stream.engine import Engine, EngineSettings
    from tcbf_live.stream.receiver import SubscriberSettings

    full_parse_only(full)
    endpoint = free_endpoint()
    proc = start_sender(protocol, endpoint, n_frames, scan)
    eng = Engine(EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", detector=True),
        protocol=protocol, idle_timeout_s=30, max_series=1))  # fmt: skip
    c0 = time.process_time()
    eng.start()
    eng.join()
    cpu = time.process_time() - c0
    proc.join()
    full_parse_only(False)
    r = eng.last_result
    assert r is not None and r.frames_received == n_frames, r and r.summary()
    return r.frames_per_s, cpu / n_frames * 1e6


def ingest_table(scan=(256, 256)) -> None:
    from tcbf_live.detectors.compression import native_bslz4
    from tcbf_live.stream.tcbf.kernels import accumulate_frames  # noqa: F401  (JIT cache)

    n = scan[0] * scan[1]
    print(f"\ningest, {scan[0]}x{scan[1]} scan of {SIZE}x{SIZE} bslz4 frames, tcp loopback, "
          f"PUSH -> PULL, unpaced; in-kernel bslz4: {native_bslz4()}")  # fmt: skip
    print("(frames/s, best of 2; CPU: receiving process, all threads, microseconds per frame)")
    print(f"{'protocol':>11} {'bare f/s':>9} {'full f/s':>9} {'lean f/s':>9} {'full/bare':>10} "
          f"{'lean/bare':>10} {'bare CPU':>9} {'full CPU':>9} {'lean CPU':>9}")  # fmt: skip
    for protocol in PROTOCOLS:
        engine(protocol, 4096, (64, 64), full=False)  # warm-up: JIT cache, first calibration
        b, bc = max(bare(protocol, n, scan) for _ in range(2))
        f, fc = max(engine(protocol, n, scan, full=True) for _ in range(2))
        le, lc = max(engine(protocol, n, scan, full=False) for _ in range(2))
        print(f"{protocol:>11} {b:9.0f} {f:9.0f} {le:9.0f} {f / b:10.2f} {le / b:10.2f} "
              f"{bc:9.1f} {fc:9.1f} {lc:9.1f}")  # fmt: skip


def main() -> None:
    print(f"{os.cpu_count()} CPUs")
    decoder_table()
    if "--decoder-only" not in sys.argv[1:]:
        ingest_table()


if __name__ == "__main__":
    main()
