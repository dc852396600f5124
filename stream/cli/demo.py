"""`tcbf-live demo`: simulator -> engine -> viewer in one command.

Read top to bottom: a sender thread streams the tutorial preset in a loop over a loopback
PUSH/PULL socket, the live engine receives, accumulates and aligns it, and the viewer polls the
engine (or, `--headless`, renders offscreen for `--seconds` and saves a screenshot). At the end
the newest finished series (else the one in progress) goes to `--output`. Existing files are
replaced only with `--overwrite` (checked before the demo starts, and again when writing).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
import threading
from collections import deque
from dataclasses import replace
from pathlib import Path

from tcbf_live.simulators.sender import SendSettings
from tcbf_live.simulators.simulate import PRESETS, Simulator
from tcbf_live.stream.cli.common import UsageError, add_curve_args, curve_from_args, parse_finite
from tcbf_live.stream.cli.sending import LinkSettings, serve
from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.outputs import atomic_output, check_output, same_file
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.series import ProcessingSettings
from tcbf_live.stream.tcbf.pipeline import PipelineSettings

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="simulator -> live engine -> viewer, in one command",
        description="Stream a simulated dataset in a loop into the live engine and watch the "
        "tcBF image sharpen. --headless renders offscreen for --seconds and saves a PNG.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tutorial")
    p.add_argument("--scan", metavar="RxC", help="scan shape (default: the preset's)")
    p.add_argument("--rate", type=parse_finite, default=400.0, metavar="FPS",
                   help="frames/s sent (default 400: a tutorial scan in ~3 s)")  # fmt: skip
    p.add_argument("--seconds", type=parse_finite, metavar="S", help="stop after S seconds")
    p.add_argument("--headless", action="store_true", help="no window (offscreen rendering)")
    p.add_argument("--screenshot", metavar="PNG", help="save the window at the end")
    p.add_argument("--output", metavar="FILE.h5", help="write the newest result at the end")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output or --screenshot"
    )
    p.add_argument("--publish", metavar="ENDPOINT",
                   help="also publish the result stream here (for tcbf-live view)")  # fmt: skip
    add_curve_args(p, server=True, client=False)
    p.set_defaults(run=run)


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checked_config(args: argparse.Namespace):
    """The flags checked (one-line UsageError), the outputs checked before anything starts,
    and the simulation the demo streams."""
    from tcbf_live.stream.cli.common import parse_pair

    if args.headless and not args.seconds:
        raise UsageError("--headless needs --seconds")
    if args.seconds is not None and not 0 < args.seconds <= 1e6:
        raise UsageError("--seconds must be positive (at most 1e6)")
    if not args.rate >= 0:
        raise UsageError("--rate must be >= 0")
    if curve_from_args(args) is not None and not args.publish:
        raise UsageError("--curve-secret protects --publish (the demo's own link is loopback)")
    if args.output:
        check_output(args.output, args.overwrite)
    if args.screenshot:
        check_output(args.screenshot, args.overwrite, flag="--screenshot")
        if args.output and same_file(Path(args.screenshot), Path(args.output)):
            raise UsageError("--screenshot and --output name the same file")
    cfg = PRESETS[args.preset]()
    if args.scan:
        try:
            cfg = replace(cfg, scan_shape=parse_pair(args.scan))
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--scan: {exc}") from None
    return cfg


def run(args: argparse.Namespace) -> int:
    from tcbf_live.stream.hdf5 import write_result
    from tcbf_live.stream.view_state import EngineStates
    from tcbf_live.viewer.app import check_window, show_viewer

    cfg = checked_config(args)
    check_window(args.headless)  # before anything starts (the window needs Qt even headless)
    curve = curve_from_args(args)
    simulator = Simulator(cfg)
    endpoint = f"tcp://127.0.0.1:{_free_loopback_port()}"

    # 1. the live engine (connects; the sender binds); keeps the newest fully acquired series
    # (stopping the sender ends the series in progress early, with an end message)
    finished: deque = deque(maxlen=1)  # the newest only: a list grew ~0.45 MB per series
    engine = Engine(EngineSettings(
        subscriber=SubscriberSettings(endpoint=endpoint, socket_type="pull", bind=False),
        processing=ProcessingSettings(pipeline=PipelineSettings(ring_images=True)),
        align_interval_s=0.25,
    ), on_series_end=lambda r: finished.append(r) if r.complete and not r.frames_missing
       else None).start()  # fmt: skip

    publisher = None
    if args.publish:
        from tcbf_live.stream.publisher import SnapshotPublisher

        publisher = SnapshotPublisher(engine, args.publish, curve=curve).start()

    # 2. the simulator, looping, in a thread
    stop = threading.Event()
    sender = threading.Thread(
        target=serve,
        args=(simulator, SendSettings(rate_fps=args.rate, loop=True),
              LinkSettings(bind=endpoint, socket_type="push")),  # fmt: skip
        kwargs={"should_stop": stop.is_set, "show_progress": False, "log": sys.stderr},
        name="tcbf-sender",
        daemon=True,
    )
    sender.start()

    # 3. the viewer (this thread), until closed / Ctrl-C / --seconds; the screenshot is saved
    # under a temporary name and moved into place at the end, after the result
    with contextlib.ExitStack() as outputs:
        png = (outputs.enter_context(atomic_output(args.screenshot, args.overwrite))
               if args.screenshot else None)  # fmt: skip
        try:
            show_viewer(EngineStates(engine), title="tcbf-live demo", headless=args.headless,
                        seconds=args.seconds, screenshot=str(png) if png else None,
                        # the save dialog has asked before replacing a file
                        save_result=lambda path: write_result(path, engine.snapshot(), "native",
                                                              True))  # fmt: skip
        finally:
            stop.set()
            sender.join(5.0)
            engine.stop()
            engine.join(10.0)
            if publisher is not None:
                publisher.close()
        result = finished[-1] if finished else engine.last_result

        if args.output and result is not None:
            write_result(args.output, result, "native", args.overwrite)
            sys.stderr.write(f"{result.summary()}\n")
            if result.tcbf is not None:
                sys.stderr.write(f"{result.tcbf.summary()}\n")
            sys.stderr.write(f"wrote {args.output}\n")
        elif args.output:
            sys.stderr.write(f"no series received: nothing written to {args.output}\n")
    if args.screenshot:
        sys.stderr.write(f"wrote {args.screenshot}\n")
    return 0
