"""`tcbf-live run`: receive one series, accumulate it, write the HDF5 result."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import replace

from .cliutil import UsageError, parse_finite
from .engine import DECODERS, TCP_PROTOCOLS, Engine, EngineSettings
from .options import add_processing_args, processing_from_args, report
from .subscriber import SubscriberSettings

log = logging.getLogger("tcbf.run")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="receive a live series, accumulate it and write the result file",
        description="Receive one series over ZeroMQ until its end message, its expected frame "
        "count or --timeout seconds without data; write the HDF5 result.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--connect", metavar="ENDPOINT", default="tcp://127.0.0.1:5555")
    where.add_argument("--bind", metavar="ENDPOINT", help="bind instead of connecting")
    p.add_argument(
        "--socket",
        default=None,
        choices=["sub", "pull"],
        help="default: pull for DECTRIS (they PUSH), sub for the native protocol",
    )
    p.add_argument("--protocol", default="native", choices=sorted(DECODERS))
    p.add_argument(
        "--channel",
        metavar="NAME",
        help="DECTRIS stream V2 threshold channel (default: the first announced)",
    )
    add_processing_args(p)
    p.add_argument("--repeat", default="accumulate", choices=["accumulate", "new-series"],
                   help="frames beyond one scan pass")  # fmt: skip
    p.add_argument("--timeout", type=parse_finite, default=30.0, metavar="S", help="idle timeout")
    p.add_argument(
        "--align-interval",
        type=parse_finite,
        default=0.5,
        metavar="S",
        help="re-align every S seconds while frames arrive (0: only at the end)",
    )
    p.add_argument("--output", required=True, metavar="FILE.h5")
    p.add_argument("--headless", action="store_true", help="no viewer window")
    d = p.add_argument_group(
        "detector control (DECTRIS SIMPLON REST; default: passive, attach "
        "to a series armed by the vendor software)"
    )
    d.add_argument(
        "--simplon",
        metavar="HOST[:PORT]",
        help="active mode: enable and configure the stream, configure one frame per "
        "scan position (needs --scan), arm, and disarm at the end",
    )
    d.add_argument(
        "--trigger-mode",
        default="exte",
        choices=["exte", "exts", "ints"],
        help="SIMPLON trigger mode in active mode: external per frame (exte) or series (exts), "
        "or internal series (ints, triggered here)",
    )
    p.add_argument("--publish", metavar="ENDPOINT",
                   help="publish the result stream (for tcbf-live view)")  # fmt: skip
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> EngineSettings:
    if not args.headless:
        from viewer.app import check_display

        check_display()
    if not 0 < args.timeout <= 1e6 or not 0 <= args.align_interval <= 3600:
        raise UsageError("need 0 < --timeout <= 1e6 s and 0 <= --align-interval <= 3600 s")

    processing = processing_from_args(args)
    if args.simplon and args.protocol not in ("dectris-v1", "dectris-v2"):
        raise UsageError("--simplon controls DECTRIS detectors: use --protocol dectris-v1/-v2")
    if args.simplon and args.scan is None:
        raise UsageError("--simplon needs --scan ROWSxCOLS (one frame per scan position)")

    if not args.headless or args.publish:  # a viewer will show the axial-radius control
        processing = replace(processing, tcbf=replace(processing.tcbf, ring_images=True))
    endpoint = args.bind or args.connect
    if args.protocol in TCP_PROTOCOLS:
        if args.bind or not re.fullmatch(r"tcp://[A-Za-z0-9.\-]+:\d{1,5}", endpoint):
            raise UsageError(f"--protocol {args.protocol} connects to the detector's data port: "
                             "--connect tcp://HOST:PORT")  # fmt: skip
    socket_type = args.socket or ("pull" if args.protocol.startswith("dectris") else "sub")
    return EngineSettings(
        subscriber=SubscriberSettings(
            endpoint=endpoint, socket_type=socket_type, bind=args.bind is not None
        ),
        processing=processing,
        protocol=args.protocol,
        idle_timeout_s=args.timeout,
        max_series=1,
        align_interval_s=args.align_interval or None,
        channel=args.channel,
        armed=args.simplon is not None,
    )


def run(args: argparse.Namespace) -> int:
    from .results import write_result

    settings = settings_from_args(args)
    failures: list[str] = []

    def finished(result) -> None:  # ingest thread: write as soon as the series ends
        try:
            write_result(args.output, result, args.protocol)
            sys.stderr.write(report(result, args.output))
        except OSError as exc:
            failures.append(f"cannot write {args.output}: {exc}")

    engine = Engine(settings, on_series_end=finished).start()
    try:
        detector = arm_detector(args, engine) if args.simplon else None
    except UsageError:
        engine.stop()
        engine.join()
        raise

    publisher = None
    if args.publish:
        from .publisher import SnapshotPublisher

        publisher = SnapshotPublisher(engine, args.publish).start()
    try:
        if args.headless:
            while not engine.join(timeout=0.5):
                pass
        else:  # the window stays open on the final result until it is closed (or Ctrl-C)
            from viewer.app import qt_app, run_window, shutdown
            from viewer.sources import EngineSource
            from viewer.window import ViewerWindow

            app = qt_app()
            window = ViewerWindow(
                EngineSource(engine),
                save_result=lambda path: write_result(path, engine.snapshot(), args.protocol),
                title=f"tcbf-live run {settings.subscriber.endpoint}",
            )
            run_window(window, app)
            del window
            shutdown(app)
            engine.stop()
            engine.join()
    except KeyboardInterrupt:
        engine.stop()
        engine.join()
    finally:
        if publisher is not None:
            publisher.close()
        if detector is not None:
            try:
                detector.disarm()
            except Exception as exc:  # report, but the result is what matters now
                sys.stderr.write(f"tcbf-live run: disarm failed: {exc}\n")

    result = engine.last_result
    if engine.counters.rejected:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(engine.counters.rejected.items()))
        sys.stderr.write(f"rejected messages: {reasons}\n")
    if failures:
        raise UsageError(failures[0])
    if result is None:
        sys.stderr.write(f"tcbf-live run: no series received within {args.timeout:g} s\n")
        return 1
    return 0


def arm_detector(args: argparse.Namespace, engine: Engine):
    """Active mode: configure and arm a DECTRIS detector over SIMPLON REST (the receiver is
    already connected, so the header cannot be missed) and tell the engine which series to
    take. Returns the client (for disarm)."""
    import json

    from detectors.simplon import SimplonClient, SimplonError

    host, _, port = args.simplon.rpartition(":") if ":" in args.simplon else (args.simplon, "", "")
    try:
        client = SimplonClient(host, int(port or 80))
    except ValueError as exc:
        raise UsageError(f"--simplon: {exc}") from None
    appendix = json.dumps({"scan_shape": list(args.scan), "energy_eV": args.energy,
                           "step_A": args.step, "semiangle_mrad": args.semiangle})  # fmt: skip
    v1 = args.protocol == "dectris-v1"
    try:
        # V1 carries the appendix only with header_detail all; V2 puts it in user_data
        client.configure_stream("legacy" if v1 else "cbor", "all" if v1 else "basic", appendix)
        client.configure_scan(args.scan[0] * args.scan[1], args.trigger_mode)
        series = client.arm()
    except SimplonError as exc:
        raise UsageError(f"detector: {exc}") from None
    engine.expect_series(series)
    if args.trigger_mode == "ints":  # returns when the images are taken: in a thread
        import threading

        def trigger():
            try:
                client.trigger()
            except SimplonError as exc:
                log.error("trigger failed: %s", exc)

        threading.Thread(target=trigger, name="simplon-trigger", daemon=True).start()
    log.info("armed %s: series %d", client.base, series)
    return client
