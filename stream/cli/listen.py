"""`tcbf-live listen`: subscribe to a stream and print what arrives (a wiring check).

Per series it prints the announced metadata, then a summary: frames received, missing,
duplicated, frames skipped because the subscriber joined late, and rejected messages by reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from tcbf_live.detectors import registry
from tcbf_live.detectors.base import DecodeError, FrameBatch, SeriesEnd, SeriesInfo, SeriesStart
from tcbf_live.stream.cli.common import UsageError
from tcbf_live.stream.receiver import (
    StreamCounters,
    SubscriberSettings,
    open_socket,
    receive_events,
)


@dataclass
class SeriesTally:
    """Which frames of one series arrived (one bool per frame: bounded, no per-frame objects)."""

    info: SeriesInfo
    seen: np.ndarray = field(init=False)
    duplicates: int = 0
    total_counts: float = 0.0
    t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.seen = np.zeros(self.info.frames_expected or 0, bool)

    def add(self, batch: FrameBatch) -> None:
        stop = batch.first + len(batch.frames)
        if stop > self.seen.size:  # series of unknown length (decoder caps indices): grow
            grown = np.zeros(max(stop, 2 * self.seen.size), bool)
            grown[: self.seen.size] = self.seen
            self.seen = grown
        window = self.seen[batch.first : stop]
        self.duplicates += int(window.sum())
        window[:] = True
        frames = batch.frames
        if self.info.mask_value is not None:
            frames = np.where(frames == self.info.mask_value, 0, frames)
        self.total_counts += float(frames.sum(dtype=np.float64))

    def summary(self, end: SeriesEnd | None) -> str:
        received = int(self.seen.sum())
        expected = self.info.frames_expected or (end.frames_sent if end else received)
        first_seen = int(np.argmax(self.seen)) if received else 0
        dt = time.perf_counter() - self.t0
        e_per_frame = self.total_counts / max(received, 1) / self.info.counts_per_electron
        text = (
            f"series {self.info.series_id}: {received}/{expected} frames "
            f"({expected - received} missing, {self.duplicates} duplicate) in {dt:.2f} s, "
            f"{e_per_frame:.1f} e/frame"
        )
        if received and first_seen > 0:
            text += f"; joined late: frames before #{first_seen} were not seen"
        if end is None:
            text += "; no end message"
        return text


def describe(info: SeriesInfo) -> str:
    scan = "x".join(map(str, info.scan_shape)) if info.scan_shape else "unknown"
    det = "x".join(map(str, info.detector_shape))
    return (
        f"series {info.series_id}: scan {scan} ({info.scan_order}), detector {det} {info.dtype}, "
        f"{info.energy_eV or float('nan'):.0f} eV, step {info.step_A or float('nan'):.3g} A, "
        f"semiangle {info.semiangle_mrad or float('nan'):.3g} mrad, "
        f"{info.angular_sampling_mrad or float('nan'):.4g} mrad/px, "
        f"{info.frames_expected} frames expected"
    )


def listen(
    settings: SubscriberSettings, n_series: int, timeout_s: float, out: TextIO = sys.stdout,
    protocol: str = "native",
) -> int:
    """Print series seen on the socket (a ZeroMQ `protocol` of the registry); return how many
    complete series ended."""
    options = registry.DecoderOptions(max_batch_bytes=settings.max_message_bytes)
    decoder = registry.protocol(protocol).decoder(options)
    sock = open_socket(settings)
    counters = StreamCounters()
    tally: SeriesTally | None = None
    ended = 0
    try:
        for event in receive_events(sock, decoder, counters, timeout_s=timeout_s):
            if isinstance(event, SeriesStart):
                if tally is not None and tally.info.series_id == event.info.series_id:
                    continue  # a repeat of the series we are already in
                if tally is not None:
                    print(tally.summary(None), file=out)
                tally = SeriesTally(event.info)
                late = " (announcement repeat: joined mid-series)" if event.repeat else ""
                print(describe(event.info) + late, file=out, flush=True)
            elif isinstance(event, FrameBatch):
                if tally is None or event.series_id != tally.info.series_id:
                    # the decoder remembers several series: frames of one not shown here
                    counters.reject(DecodeError("wrong_series", f"frames of series "
                                                f"{event.series_id}"))  # fmt: skip
                    continue
                tally.add(event)
                counters.frames += len(event.frames)
            elif isinstance(event, SeriesEnd):
                if tally is not None:
                    print(tally.summary(event), file=out, flush=True)
                tally = None
                ended += 1
                if n_series and ended >= n_series:
                    break
        else:
            print(f"no message for {timeout_s:g} s: stopping", file=out)
            if tally is not None:
                print(tally.summary(None), file=out)
    finally:
        sock.close()
    if counters.rejected:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counters.rejected.items()))
        print(f"rejected messages: {reasons}", file=out)
    return ended


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("listen", help="subscribe to a stream and print what arrives")
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", metavar="ENDPOINT")
    p.add_argument("--bind", action="store_true", help="bind ENDPOINT instead of connecting")
    p.add_argument("--socket", default=None, choices=registry.receiver_socket_types(),
                   help="default: the protocol's (sub for native, pull for DECTRIS)")  # fmt: skip
    p.add_argument("--protocol", default="native", choices=registry.names(transport="zmq"))
    p.add_argument("--series", type=int, default=1, metavar="N", help="stop after N (0: never)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="idle timeout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.series < 0 or not args.timeout > 0:
        raise UsageError("--series must be >= 0 and --timeout > 0")
    proto = registry.protocol(args.protocol)
    settings = SubscriberSettings(endpoint=args.connect, bind=args.bind, detector=proto.detector,
                                  socket_type=args.socket or proto.receiver_sockets[0])  # fmt: skip
    ended = listen(settings, args.series, args.timeout, protocol=args.protocol)
    return 0 if ended >= max(args.series, 1) or args.series == 0 else 1
