"""Ingest with and without `run --record`, same messages, same run (ratios in one session).

A sender process pre-encodes one series and pushes it over tcp loopback as fast as it can;
the receiver is tcbf-live's Engine, alternately without and with the raw recorder
(stream/recorder.py) as its `on_frames` observer, writing to a temporary folder:
  native: 128x128 uint16 frames, raw payloads, batches of 16 (decoded arrays recorded);
  dectris-v1, dectris-v2: 96x96 uint16 frames, bslz4, one per message (chunks recorded
  unchanged; since 2026-11-27 the compiled lane reads them with --record too, copying each
  folded blob out for the recorder).
Reported: the engine's own ingest rate (first to last frame), the seconds until the recording
is complete (writer drained, file moved into place), the frames the recorder did not take
(queue full) and the share of the frames the compiled lane read. Best of 2 rounds each.

Run: OMP_NUM_THREADS=1 python benchmarks/record_speed.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import zmq  # noqa: E402
from ingest_speed import free_endpoint  # noqa: E402

CASES = {  # protocol: (detector px, batch, frames)
    "native": (128, 16, 10_000),
    "dectris-v1": (96, 1, 40_000),
    "dectris-v2": (96, 1, 40_000),
}


def sender(endpoint: str, protocol: str, detector: int, batch: int, n_frames: int) -> None:
    """Child process: pre-encode one series of `protocol`, then push it unpaced."""
    from dataclasses import replace

    from tcbf_live.detectors.registry import protocol as wire
    from tcbf_live.simulators import Simulator, tutorial_config

    sim = Simulator(tutorial_config(scan_shape=(8, 8), detector_shape=(detector, detector),
                                    rotation_deg=0.0))  # fmt: skip
    pool = sim.frames(0, 64)[np.random.default_rng(0).integers(0, 64, 256)]
    scan = (n_frames // 200, 200)
    info = replace(sim.series_info(7), scan_shape=scan, frames_expected=n_frames)
    enc = wire(protocol).encoder
    encoding = "bslz4" if protocol.startswith("dectris") else "raw"
    messages = list(enc.start(info))
    for seq, first in enumerate(range(0, n_frames, batch)):
        k = first % (len(pool) - batch)
        messages += enc.frames(7, first, pool[k : k + batch], seq + 1, encoding)
    messages += enc.end(7, n_frames)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 100_000)
    push.bind(endpoint)
    push.setsockopt(zmq.SNDTIMEO, 20_000)
    for parts in messages:
        try:
            push.send_multipart(parts, copy=False)
        except zmq.Again:
            break
    push.setsockopt(zmq.LINGER, 5000)
    push.close()
    ctx.term()


def one_run(protocol: str, record: bool, folder: Path) -> tuple[float, float, int, float]:
    """(engine frames/s, seconds until the recording is complete, frames not recorded, the
    share of the frames the compiled lane read)."""
    from tcbf_live.stream.engine import Engine, EngineSettings
    from tcbf_live.stream.receiver import SubscriberSettings
    from tcbf_live.stream.recorder import Recorder, RecordSettings

    detector, batch, n_frames = CASES[protocol]
    endpoint = free_endpoint()
    proc = mp.get_context("spawn").Process(
        target=sender, args=(endpoint, protocol, detector, batch, n_frames))  # fmt: skip
    proc.start()
    target = folder / "rec.h5"
    rec = Recorder(RecordSettings(target, overwrite=True)) if record else None
    settings = EngineSettings(subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull"),
                              protocol=protocol, idle_timeout_s=30, max_series=1)  # fmt: skip
    eng = Engine(settings, on_series_end=rec.ending(lambda r: None) if rec else None,
                 on_frames=rec).start()  # fmt: skip
    eng.join()
    t_end = time.perf_counter()
    dropped = 0
    if rec is not None:
        rec.close()
        (r,) = rec.records
        dropped = r.queue_full
        assert r.written + dropped == n_frames and not r.error, rec.summaries()
        target.unlink()
    drained = time.perf_counter() - t_end
    proc.join()
    result = eng.last_result
    assert result is not None and result.frames_received == n_frames, result and result.summary()
    return result.frames_per_s, drained, dropped, eng.counters.lane / n_frames


def main() -> None:
    from tcbf_live.stream.tcbf.kernels import accumulate_frames  # noqa: F401  (JIT cache warm)

    print("engine ingest without / with --record (recording to a local temporary folder)")
    print(f"{'protocol':>11s} {'frames':>7s} {'without':>9s} {'with':>9s} {'ratio':>6s} "
          f"{'drain s':>8s} {'not rec.':>9s} {'lane':>5s}")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=os.environ.get("RECORD_DIR")) as tmp:
        for protocol in CASES:
            one_run(protocol, True, Path(tmp))  # warm-up: JIT, h5py, first calibration
            bare = max(one_run(protocol, False, Path(tmp))[0] for _ in range(2))
            runs = [one_run(protocol, True, Path(tmp)) for _ in range(2)]
            fps, drain, dropped, lane = max(runs)
            print(f"{protocol:>11s} {CASES[protocol][2]:7d} {bare:9.0f} {fps:9.0f} "
                  f"{fps / bare:6.2f} {drain:8.2f} {dropped:9d} {lane:5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
