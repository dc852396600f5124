"""`run --control ENDPOINT` (checked before the run starts, started beside the engine) and the
`control` command: one request to a running `run` from a shell (acquisition scripts that call
programs; Python scripts use `stream.control.ControlClient`, docs/control.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tcbf_live.stream.cli.common import UsageError, add_curve_args, curve_from_args
from tcbf_live.stream.transport import is_loopback, valid_endpoint

DEFAULT_CONTROL = "tcp://127.0.0.1:5557"


def check_control(args: argparse.Namespace) -> None:
    """UsageError for a --control endpoint ZeroMQ cannot use, or one beyond loopback without
    CURVE keys (it can stop the run and write files); checked before anything starts."""
    if args.control and not valid_endpoint(args.control):
        raise UsageError(f"--control {args.control!r} is not a ZeroMQ endpoint")
    if args.control and curve_from_args(args) is None and not is_loopback(args.control):
        raise UsageError("--control beyond loopback needs CURVE keys (--curve-secret FILE)")


def start_control(args: argparse.Namespace, engine):
    """The --control endpoint (None without it); the engine is stopped and UsageError raised
    when it cannot bind (e.g. the port is taken)."""
    if not args.control:
        return None
    import zmq

    from tcbf_live.stream.control import ControlServer

    try:
        return ControlServer(engine, args.control, args.protocol,
                             Path(args.output).resolve().parent,
                             curve_from_args(args)).start()  # fmt: skip
    except zmq.ZMQError as exc:
        engine.stop()
        engine.join()
        raise UsageError(f"--control {args.control}: {exc}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("control", help="ask a running `run --control` (status, aberrations, "
                       "save, stop) and print its JSON reply")  # fmt: skip
    p.add_argument("request", choices=["status", "aberrations", "save", "stop"])
    p.add_argument("--connect", default=DEFAULT_CONTROL, metavar="ENDPOINT")
    p.add_argument("--path", metavar="NAME.h5|NAME.npy",
                   help="save: the file, beside the run's --output")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="save: replace an existing file")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S")
    add_curve_args(p, server=False, client=True)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Exit code 0 for an "ok" reply, 1 for an error reply, 4 when nothing answered."""
    from tcbf_live.stream.control import ControlClient

    if not valid_endpoint(args.connect) or not args.timeout > 0:
        raise UsageError("need a ZeroMQ --connect endpoint and --timeout > 0")
    if args.request == "save" and not args.path:
        raise UsageError("save needs --path NAME.h5 or NAME.npy")
    fields = {"path": args.path, "overwrite": args.overwrite} if args.request == "save" else {}
    client = ControlClient(args.connect, args.timeout, curve_from_args(args))
    try:
        reply = client.request(args.request, **fields)
    except TimeoutError as exc:
        sys.stderr.write(f"tcbf-live control: {exc}\n")
        return 4
    finally:
        client.close()
    sys.stdout.write(json.dumps(reply, indent=1) + "\n")
    return 0 if reply.get("ok") else 1
