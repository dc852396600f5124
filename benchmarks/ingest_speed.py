"""End-to-end ingest over ZeroMQ vs a bare pyzmq receive loop, same messages, same run.

A sender process pre-encodes one native-protocol series (128x128 uint16 frames, raw payloads)
and pushes it over tcp loopback as fast as it can. The receiver is, alternately,
  bare:   a pyzmq loop doing recv_multipart(copy=False) and nothing else;
  engine: tcbf-live's Engine (decode + validate + calibrate + numba accumulate, all levels).
Rates are frames/s from the first to the last message; the table gives the best of 2 rounds.
Target: engine >= 0.8 x bare.

Also: RSS across 10 back-to-back series through one engine, sent at 10k frames/s so the
socket queue stays short (target: flat within 5 %).

Run: OMP_NUM_THREADS=1 python benchmarks/ingest_speed.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from common import bare_receive, rss_mb  # noqa: E402


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def sender(endpoint: str, n_frames: int, batch: int, n_series: int, scan: tuple[int, int],
           rate_fps: float = 0.0):  # fmt: skip
    """Child process: pre-encode, then push n_series series back to back (paced if rate_fps)."""
    from dataclasses import replace

    from tcbf_live.detectors.native import encode_end, encode_frames, encode_start
    from tcbf_live.simulators import Simulator, tutorial_config

    sim = Simulator(tutorial_config(scan_shape=(8, 8), rotation_deg=0.0))
    pool = sim.frames(0, 64)
    pool = pool[np.random.default_rng(0).integers(0, 64, 1024)]
    messages = []
    for s in range(n_series):
        info = replace(sim.series_info(1000 + s), scan_shape=scan, frames_expected=n_frames)
        series = [encode_start(info)]
        for first in range(0, n_frames, batch):
            k = first % (len(pool) - batch)
            series.append(encode_frames(info.series_id, first, pool[k : k + batch], first))
        series.append(encode_end(info.series_id, n_frames))
        messages.append(series)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 1000)
    push.bind(endpoint)
    t0, sent = None, 0
    for i, series in enumerate(messages):
        for parts in series:
            if i == len(messages) - 1 and parts is series[-1]:
                # the receiver may stop on the frame count and leave before the last `end`
                push.setsockopt(zmq.SNDTIMEO, 2000)
            try:
                push.send_multipart(parts, copy=False)  # blocks until the receiver connects
            except zmq.Again:
                break
            t0 = t0 or time.perf_counter()
            sent += batch
            if rate_fps:
                time.sleep(max(0.0, t0 + sent / rate_fps - time.perf_counter()))
    push.setsockopt(zmq.LINGER, 2000)
    push.close()
    ctx.term()


def start_sender(endpoint, n_frames, batch, n_series=1, scan=(100, 200), rate_fps=0.0):
    proc = mp.get_context("spawn").Process(
        target=sender, args=(endpoint, n_frames, batch, n_series, scan, rate_fps)
    )
    proc.start()
    return proc


def bare(n_frames: int, batch: int) -> float:
    endpoint = free_endpoint()
    proc = start_sender(endpoint, n_frames, batch)
    n_messages = 2 + -(-n_frames // batch)  # start, frame messages, end
    wall, cpu = bare_receive(endpoint, 1, n_messages - 3, rcvhwm=100_000)
    proc.join()
    n = n_frames - batch
    return n / wall, cpu / n * 1e6


def engine(n_frames: int, batch: int) -> float:
    from tcbf_live.stream.engine import Engine, EngineSettings
    from tcbf_live.stream.receiver import SubscriberSettings

    endpoint = free_endpoint()
    proc = start_sender(endpoint, n_frames, batch)
    eng = Engine(
        EngineSettings(
            subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull"),
            idle_timeout_s=30,
            max_series=1,
        )
    )
    c0 = time.process_time()  # receiving process CPU (all its threads), incl. waiting setup
    eng.start()
    eng.join()
    cpu = time.process_time() - c0
    proc.join()
    r = eng.last_result
    assert r is not None and r.frames_received == n_frames, r and r.summary()
    return r.frames_per_s, cpu / n_frames * 1e6


def rss_over_series(n_series: int = 10, scan=(64, 64)) -> list[float]:
    from tcbf_live.stream.engine import Engine, EngineSettings
    from tcbf_live.stream.receiver import SubscriberSettings

    endpoint = free_endpoint()
    n = scan[0] * scan[1]
    proc = start_sender(endpoint, n, 16, n_series, scan, rate_fps=10_000)
    rss: list[float] = []
    eng = Engine(
        EngineSettings(
            subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull"),
            idle_timeout_s=30,
            max_series=n_series,
        ),
        on_series_end=lambda r: rss.append(rss_mb()),
    ).start()
    eng.join()
    proc.join()
    return rss


def main() -> None:
    from tcbf_live.stream.tcbf.kernels import accumulate_frames  # noqa: F401  (JIT cache warm)

    n_frames = 20_000
    print("128x128 uint16 frames, raw payloads, tcp loopback, PUSH -> PULL")
    print("(CPU: receiving process, all threads, microseconds per frame)")
    print(f"{'batch':>6s} {'bare frames/s':>14s} {'engine frames/s':>16s} {'ratio':>6s} "
          f"{'bare CPU':>9s} {'engine CPU':>11s}")  # fmt: skip
    engine(2_000, 16)  # warm-up: JIT cache load, first calibration
    for batch in (16, 4, 1):
        b, bc = max(bare(n_frames, batch) for _ in range(2))
        e, ec = max(engine(n_frames, batch) for _ in range(2))
        print(f"{batch:6d} {b:14.0f} {e:16.0f} {e / b:6.2f} {bc:9.1f} {ec:11.1f}")
    rss = rss_over_series()
    spread = (max(rss[1:]) - min(rss[1:])) / min(rss[1:]) * 100
    print(
        "\nRSS after each of 10 back-to-back 64x64 series (MB): "
        + " ".join(f"{v:.0f}" for v in rss)
        + f"\nspread after the first series: {spread:.1f} %"
    )


if __name__ == "__main__":
    main()
