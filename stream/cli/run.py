"""`tcbf-live run`: receive one series, accumulate it, write the HDF5 result.

Every series the run sees goes to its own file (`SeriesFiles`): `--output r.h5` names the first
result written, the next ones go beside it as r.series-2.h5, r.series-3.h5 ... A series with no
frames, or one that could not be processed, writes no file; no file is ever replaced without
--overwrite. The exit code (`stream.exitcodes`) says what the run ended with.
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
import threading
from dataclasses import replace
from pathlib import Path

from tcbf_live.detectors import registry
from tcbf_live.stream import memory_reserve
from tcbf_live.stream.cli.common import (
    UsageError,
    add_curve_args,
    curve_from_args,
    link_curve,
    parse_finite,
)
from tcbf_live.stream.cli.control import check_control, start_control
from tcbf_live.stream.cli.exitcodes import (
    EPILOG,
    ExitCode,
)
from tcbf_live.stream.cli.options import (
    add_output_args,
    add_processing_args,
    check_memory,
    processing_from_args,
)
from tcbf_live.stream.cli.series_files import SeriesFiles
from tcbf_live.stream.cli.workers import add_worker_args, start_coordinator, worker_plan
from tcbf_live.stream.engine import Engine, EngineSettings
from tcbf_live.stream.outputs import check_output, same_file
from tcbf_live.stream.receiver import SubscriberSettings
from tcbf_live.stream.recorder import Recorder, RecordSettings
from tcbf_live.stream.transport import tcp_host_port

log = logging.getLogger(__name__)

FILES_EPILOG = """result files:
  --output r.h5 names the first result written; each further series the run
  sees (e.g. a restarted sender's partial series beside its complete one) goes
  to its own file beside it, numbered in the order the series end:
  r.series-2.h5, r.series-3.h5 ... A series with no frames, or one that was
  refused or could not be processed, writes no file. Existing files are never
  replaced unless --overwrite is given (a file that appears during the run is
  kept and the result goes to r.kept-1.h5, exit code 2); results are written to
  a temporary file and renamed, so a crash never leaves half a file. With
  several series the exit code is the best outcome: 0 if a file holds a
  complete series (its `wrote` line and /acquisition attrs say which).

"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="receive a live series, accumulate it and write the result file",
        description="Receive one series over ZeroMQ until its end message, its expected frame "
        "count or --timeout seconds without data; write the HDF5 result.",
        epilog=FILES_EPILOG + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--connect", metavar="ENDPOINT", default="tcp://127.0.0.1:5555")
    where.add_argument("--bind", metavar="ENDPOINT", help="bind instead of connecting")
    p.add_argument(
        "--socket",
        default=None,
        choices=registry.receiver_socket_types(),
        help="default: pull for DECTRIS (they PUSH), sub for the native protocol",
    )
    p.add_argument("--protocol", default="native", choices=sorted(registry.names()))
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
    p.add_argument("--no-compiled-lane", dest="compiled_lane", action="store_false",
                   help="DECTRIS V1: read every image through the Python decoder (comparison, "
                   "diagnosis; default: the compiled lane wherever it can run)")  # fmt: skip
    add_output_args(p)
    p.add_argument("--record", metavar="FILE.h5",
                   help="also keep the raw frames as received, one file per series (FILE.h5, "
                   "FILE.series-2.h5 ...; read by reconstruct and simulate --replay)")  # fmt: skip
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
    p.add_argument("--control", metavar="ENDPOINT",
                   help="answer requests of acquisition scripts here (status, aberrations, "
                   "save, stop; JSON over ZeroMQ REQ/REP, docs/control.md); loopback, or "
                   "CURVE keys (--curve-secret) beyond it")  # fmt: skip
    add_curve_args(p, server=True, client=True)
    add_worker_args(p)
    p.set_defaults(run=run)


def check_outputs(args: argparse.Namespace) -> Path:
    """Refuse, before anything is received, an --output that is a directory, in a missing or
    read-only folder, one of the inputs, or (without --overwrite) an existing result of this
    name, including the series files an earlier run left beside it."""
    inputs = [p for p in (args.mask, args.calibration) if p]
    output = check_output(args.output, args.overwrite, inputs)
    if not args.overwrite:
        pattern = f"{glob.escape(output.stem)}.series-*{glob.escape(output.suffix)}"
        earlier = sorted(output.parent.glob(pattern))
        if earlier:
            raise UsageError(f"--output {earlier[0]} exists (series files of an earlier run): "
                             "pass --overwrite or another name")  # fmt: skip
    return output


def check_record(args: argparse.Namespace) -> None:
    """--record: refused before anything starts like --output (exists without --overwrite,
    its earlier series files, an input), and never the result file itself."""
    if args.record is None:
        return
    inputs = [p for p in (args.mask, args.calibration) if p]
    record = check_output(args.record, args.overwrite, inputs, flag="--record")
    if same_file(record, Path(args.output)):
        raise UsageError(f"--record {record} is the --output file: name another")
    pattern = f"{glob.escape(record.stem)}.series-*{glob.escape(record.suffix)}"
    earlier = sorted(record.parent.glob(pattern))
    if earlier and not args.overwrite:
        raise UsageError(f"--record {earlier[0]} exists (series files of an earlier run): "
                         "pass --overwrite or another name")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> EngineSettings:
    check_control(args)
    if not args.headless:
        from tcbf_live.viewer.app import check_window

        check_window()
    if not 0 < args.timeout <= 1e6 or not 0 <= args.align_interval <= 3600:
        raise UsageError("need 0 < --timeout <= 1e6 s and 0 <= --align-interval <= 3600 s")

    processing = processing_from_args(args)
    check_outputs(args)
    check_record(args)
    check_memory(args)
    proto = registry.protocol(args.protocol)
    if args.simplon and not proto.simplon:
        raise UsageError("--simplon controls DECTRIS detectors: use --protocol dectris-v1/-v2")
    if args.simplon and args.scan is None:
        raise UsageError("--simplon needs --scan ROWSxCOLS (one frame per scan position)")

    if not args.headless or args.publish:  # a viewer will show the axial-radius control
        processing = replace(processing, pipeline=replace(processing.pipeline, ring_images=True))
    endpoint = args.bind or args.connect
    if proto.transport == "tcp":
        try:
            if args.bind:
                raise ValueError("binds")
            tcp_host_port(endpoint)
        except ValueError:
            raise UsageError(
                f"--protocol {args.protocol} connects to the detector's data port: "
                "--connect tcp://HOST:PORT"
            ) from None
    socket_type = args.socket or (proto.receiver_sockets or ("sub",))[0]
    curve = link_curve(args, connects=args.bind is None, detector=proto.detector,
                       publishes=args.publish is not None)  # fmt: skip
    return EngineSettings(
        subscriber=SubscriberSettings(
            endpoint=endpoint,
            socket_type=socket_type,
            bind=args.bind is not None,
            curve=curve,
            detector=proto.detector,
        ),
        processing=processing,
        protocol=args.protocol,
        idle_timeout_s=args.timeout,
        max_series=1,
        align_interval_s=args.align_interval or None,
        channel=args.channel,
        armed=args.simplon is not None,
        compiled_lane=args.compiled_lane,
    )


def stop_on_signals(engine: Engine, headless: bool) -> None:
    """Ctrl-C (SIGINT) and a facility script's `kill` (SIGTERM) end the run with the series in
    progress written (incomplete), never lost. Headless, the handler only asks the engine to
    stop: raising KeyboardInterrupt inside `Thread.join` (CPython 3.11) can mark the ingest
    thread as ended while it still runs, and the process would then exit before the series is
    written. A second signal interrupts at once. With a window, SIGTERM acts as Ctrl-C."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    asked = []

    def stop(signum, frame):
        if headless and not asked:
            asked.append(signum)
            engine.stop()
            return
        raise KeyboardInterrupt

    if headless:
        signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


# ingest returns from the compiled lane (no GIL) to Python often; waiting up to the default
# 5 ms for the GIL held by the alignment thread cost V2 a third of its rate (52,000 -> 83,000
# frames/s in one process at 0.5 ms, docs/engine.md): set for this process, not by the library
GIL_SWITCH_S = 0.0005


def series_refused(engine: Engine) -> int:
    """Series the engine refused (unusable metadata, over the memory budget, failed)."""
    return sum(engine.tally.refused.values())


def run(args: argparse.Namespace) -> int:
    from tcbf_live.stream.hdf5 import write_result

    settings = settings_from_args(args)
    files = SeriesFiles(args.output, args.protocol, args.overwrite)
    recorder = Recorder(RecordSettings(Path(args.record), args.overwrite)) if args.record else None
    engine = start_engine(settings, worker_plan(args, settings), files, recorder)
    stop_on_signals(engine, args.headless)
    try:
        detector = arm_detector(args, engine) if args.simplon else None
        files.detector = detector
    except UsageError:
        engine.stop()
        engine.join()
        raise

    control, publisher = start_control(args, engine), None
    if args.publish:
        from tcbf_live.stream.publisher import SnapshotPublisher

        publisher = SnapshotPublisher(engine, args.publish, curve=curve_from_args(args)).start()
    try:
        if args.headless:
            while not engine.join(timeout=0.5):
                pass
        else:  # the window stays open on the final result until it is closed (or Ctrl-C)
            from tcbf_live.stream.view_state import EngineStates
            from tcbf_live.viewer.app import show_viewer

            show_viewer(  # the save dialog has asked before replacing a file
                EngineStates(engine), title=f"tcbf-live run {settings.subscriber.endpoint}",
                save_result=lambda path: write_result(
                    path, engine.snapshot(), args.protocol, overwrite=True
                ),
            )  # fmt: skip
            engine.stop()
            engine.join()
    except KeyboardInterrupt:
        engine.stop()
        engine.join()
    finally:
        for endpoint in (publisher, control):
            if endpoint is not None:
                endpoint.close()
        if detector is not None:
            try:
                detector.disarm()
            except Exception as exc:  # report, but the result is what matters now
                sys.stderr.write(f"tcbf-live run: disarm failed: {exc}\n")

    if recorder is not None:  # the recording's own lines; the exit code is the result's
        recorder.close()
        sys.stderr.writelines(f"{line}\n" for line in recorder.summaries())
    for line in getattr(engine, "lost", ()):  # workers that died or went silent
        sys.stderr.write(f"tcbf-live run: {line}\n")
    if engine.counters.rejected:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(engine.counters.rejected.items()))
        sys.stderr.write(f"rejected messages: {reasons}\n")
    if engine.counters.lane:  # in this process (workers say theirs in their lines)
        sys.stderr.write(f"compiled lane: {engine.counters.lane} of "
                         f"{engine.counters.messages} messages\n")  # fmt: skip
    sys.stderr.writelines([*(f"tcbf-live run: error: {e}\n" for e in files.errors),
                           *(f"tcbf-live run: internal error: {e}\n" for e in files.internal)])
    refused = series_refused(engine)
    code = files.exit_code(refused)
    if code is ExitCode.EMPTY:
        sys.stderr.write(f"tcbf-live run: no series received within {args.timeout:g} s\n")
    elif code is ExitCode.UNUSABLE:
        n = refused + files.unusable
        sys.stderr.write(f"tcbf-live run: {n} series refused or not processable (see above); "
                         "no result written\n")  # fmt: skip
    return int(code)


def start_engine(settings: EngineSettings, plan, files: SeriesFiles,
                 recorder: Recorder | None) -> Engine:  # fmt: skip
    """The receiving engine, started: in this process, or a coordinator with its workers
    (`plan`). The accumulators' memory (the coordinator's, with workers) is touched first,
    before any data flows (`stream.memory_reserve`)."""
    sys.setswitchinterval(GIL_SWITCH_S)
    memory_reserve.prepare_expected(settings.processing.metadata, settings.budget_bytes(),
                                    settings.processing.bins)  # fmt: skip
    if plan is not None:
        return start_coordinator(settings, plan, files)
    return Engine(settings, on_series_end=recorder.ending(files) if recorder else files,
                  on_frames=recorder).start()  # fmt: skip


def arm_detector(args: argparse.Namespace, engine: Engine):
    """Active mode: configure and arm a DECTRIS detector over SIMPLON REST (the receiver is
    already connected, so the header cannot be missed) and tell the engine which series to
    take. Returns the client (for disarm)."""
    import json

    from tcbf_live.detectors.simplon import SimplonClient, SimplonError

    host, _, port = args.simplon.rpartition(":") if ":" in args.simplon else (args.simplon, "", "")
    try:
        client = SimplonClient(host, int(port or 80))
    except ValueError as exc:
        raise UsageError(f"--simplon: {exc}") from None
    appendix = json.dumps({"scan_shape": list(args.scan), "energy_eV": args.energy,
                           "step_A": args.step, "semiangle_mrad": args.semiangle})  # fmt: skip
    stream_format, header_detail = registry.protocol(args.protocol).simplon
    try:
        client.configure_stream(stream_format, header_detail, appendix)
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
