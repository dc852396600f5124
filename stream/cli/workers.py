"""Several receiving processes: `run --workers N` (on this host) and `tcbf-live worker` (a
worker on another host joining a run), docs/engine.md "Workers"."""

from __future__ import annotations

import argparse
import os

from tcbf_live.detectors import registry
from tcbf_live.stream.cli.common import UsageError, add_curve_args, curve_from_args, parse_finite
from tcbf_live.stream.cli.options import parse_memory_budget
from tcbf_live.stream.engine import EngineSettings
from tcbf_live.stream.transport import CurveError, CurveKeys, is_loopback, valid_endpoint

AUTO_MIN_CORES = 4  # fewer: one process is as fast (V2) or faster (V1, its compiled lane)
WORKERS_HELP = (
    "receive with N worker processes, each with its own socket (DECTRIS PUSH streams share "
    "their frames among them; a PUB stream is received by each, which keeps its share); "
    "0: in this process; auto (default): one per core for a PULL stream on a host with at least "
    f"{AUTO_MIN_CORES} cores, else 0"
)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """`run`'s flags for workers."""
    g = p.add_argument_group("workers (several receiving processes)")
    g.add_argument("--workers", default="auto", metavar="N", help=WORKERS_HELP)
    g.add_argument("--worker-link", metavar="ENDPOINT", default="tcp://127.0.0.1:0",
                   help="where workers join this run (default: loopback, any free port; "
                   "beyond loopback needs --worker-curve-secret)")  # fmt: skip
    g.add_argument("--remote-workers", type=int, default=0, metavar="M",
                   help="workers expected from other hosts (tcbf-live worker): a PUB stream's "
                   "shares are kept for them")  # fmt: skip
    g.add_argument(
        "--worker-curve-secret",
        metavar="FILE",
        help="this run's key pair for the worker link (CURVE server)",
    )
    g.add_argument(
        "--worker-curve-clients",
        metavar="DIR",
        help="accept only the workers whose public keys (*.key) are in DIR",
    )
    g.add_argument(
        "--sync-interval",
        type=parse_finite,
        default=0.1,
        metavar="S",
        help="each worker sends what it accumulated at least this often",
    )


def worker_count(args: argparse.Namespace, settings: EngineSettings) -> int:
    """Local workers to start: the number given, or for `auto` the usable cores when the
    stream is shareable (a PULL socket that connects) and there are AUTO_MIN_CORES of them,
    else 0 (in this process; docs/engine.md "Workers" has the 2-core measurements)."""
    proto = registry.protocol(settings.protocol)
    sub = settings.subscriber
    text = str(args.workers).strip().lower()
    if text == "auto":
        shareable = proto.rank is not None and sub.socket_type == "pull" and not sub.bind
        plain = not (args.record or args.compensate_descan) and args.repeat == "accumulate"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return cores if shareable and plain and cores >= AUTO_MIN_CORES else 0
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"--workers takes a number or auto, not {args.workers!r}") from None
    if not 0 <= n <= 256:
        raise UsageError("--workers must be between 0 and 256")
    return n


def worker_plan(args: argparse.Namespace, settings: EngineSettings):
    """The WorkerPlan of a run, or None to receive in this process; UsageError when workers
    were asked for a run that cannot use them."""
    from tcbf_live.stream.coordinator import WorkerPlan

    local, remote = worker_count(args, settings), args.remote_workers
    if remote < 0:
        raise UsageError("--remote-workers must be >= 0")
    if local == 0 and remote == 0:
        return None
    proto = registry.protocol(settings.protocol)
    why = (
        "a raw-TCP detector stream has one reader" if proto.rank is None
        else "--bind: one socket binds the detector's address; workers connect" if
        settings.subscriber.bind
        else "--record keeps frames in one process" if args.record
        else "--compensate-descan moves where frames are read in one process"
        if args.compensate_descan
        else "--repeat new-series splits series by frame index in one process"
        if args.repeat != "accumulate" else None
    )  # fmt: skip
    if why:
        raise UsageError(f"--workers/--remote-workers cannot be used here: {why} "
                         "(use --workers 0)")  # fmt: skip
    if not valid_endpoint(args.worker_link):
        raise UsageError(f"--worker-link {args.worker_link!r} is not a ZeroMQ endpoint")
    curve = None
    if args.worker_curve_secret:
        try:
            curve = CurveKeys.load(args.worker_curve_secret, None, args.worker_curve_clients)
        except CurveError as exc:
            raise UsageError(str(exc)) from None
    elif not is_loopback(args.worker_link):
        raise UsageError("--worker-link beyond loopback needs --worker-curve-secret FILE "
                         "(workers on other hosts are authenticated)")  # fmt: skip
    return WorkerPlan(local=local, link=args.worker_link, curve=curve, remote=remote,
                      sync_interval_s=args.sync_interval)  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="receive for a run on another host (joins its --worker-link)",
        description="Join a `tcbf-live run` as one of its receiving processes: connect to the "
        "detector stream it names (or --connect), accumulate the frames this process "
        "receives and send them to the run. Ends when the run does.",
    )
    p.add_argument("--coordinator", metavar="ENDPOINT", required=True,
                   help="the run's --worker-link (tcp://HOST:PORT)")  # fmt: skip
    p.add_argument(
        "--connect",
        metavar="ENDPOINT",
        help="the detector's address as this host reaches it (default: the run's)",
    )
    p.add_argument(
        "--join-timeout",
        type=parse_finite,
        default=30.0,
        metavar="S",
        help="give up when the run does not answer within S seconds",
    )
    p.add_argument("--memory-budget", type=parse_memory_budget, metavar="BYTES",
                   help="memory one series may use on this host, e.g. 8G (default: half its "
                   "memory, or $TCBF_MEMORY_BUDGET); a local worker of `run --workers N` "
                   "takes its run's")  # fmt: skip
    add_curve_args(p, server=False, client=True)
    p.set_defaults(run=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from tcbf_live.stream.worker_process import serve

    for name, value in (("--coordinator", args.coordinator), ("--connect", args.connect)):
        if value is not None and not valid_endpoint(value):
            raise UsageError(f"{name} {value!r} is not a ZeroMQ endpoint")
    curve = curve_from_args(args)
    if curve is not None and curve.server_key is None:
        raise UsageError("--curve-secret needs --curve-server-key FILE (the run's public key)")
    if curve is None and not is_loopback(args.coordinator):
        raise UsageError("a coordinator beyond loopback is reached with CURVE: "
                         "--curve-secret FILE --curve-server-key FILE")  # fmt: skip
    return serve(args.coordinator, curve=curve, endpoint=args.connect,
                 join_timeout_s=args.join_timeout, budget_bytes=args.memory_budget)  # fmt: skip


def start_coordinator(settings: EngineSettings, plan, on_series_end):
    """The run's coordinator, its local workers joined (UsageError when they cannot start)."""
    from tcbf_live.stream.coordinator import Coordinator

    engine = Coordinator(settings, plan, on_series_end=on_series_end)
    try:
        return engine.start()
    except RuntimeError as err:
        engine.receiver.close()
        raise UsageError(str(err)) from None
