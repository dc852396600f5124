"""Command-line helpers shared by every subcommand: one-line errors, value parsers, the
CURVE flags of every ZeroMQ link (the keys themselves: `stream.transport.CurveKeys`)."""

from __future__ import annotations

import argparse
import logging
import math
import sys

from tcbf_live.stream.transport import CurveError, CurveKeys


class UsageError(Exception):
    """A bad flag combination or input, reported as one line with exit code 2."""


def parse_pair(text: str, sep: str = "x") -> tuple[int, int]:
    parts = text.lower().replace(",", sep).split(sep)
    try:
        if len(parts) == 1:
            n = int(parts[0])
            values = (n, n)
        elif len(parts) == 2:
            values = (int(parts[0]), int(parts[1]))
        else:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or NxM, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def parse_finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return v


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def add_curve_args(p: argparse.ArgumentParser, server: bool, client: bool) -> None:
    """--curve-* flags for a command whose sockets bind (`server`) and/or connect (`client`)."""
    g = p.add_argument_group(
        "authentication (ZeroMQ CURVE, for links beyond one machine; keys from "
        "zmq.auth.create_certificates: NAME.key public, NAME.key_secret private)"
    )
    g.add_argument("--curve-secret", metavar="FILE",
                   help="this side's key pair (a .key_secret file): every ZeroMQ link of this "
                   "command is authenticated and encrypted")  # fmt: skip
    if client:
        g.add_argument("--curve-server-key", metavar="FILE",
                       help="public key (.key) of the server this command connects to")  # fmt: skip
    if server:
        g.add_argument("--curve-clients", metavar="DIR",
                       help="accept only the clients whose public keys (*.key) are in DIR "
                       "(default: any client that knows this side's public key)")  # fmt: skip


def curve_from_args(args: argparse.Namespace) -> CurveKeys | None:
    """CurveKeys from the --curve-* flags (None without --curve-secret); UsageError if bad."""
    secret = getattr(args, "curve_secret", None)
    server_key = getattr(args, "curve_server_key", None)
    clients = getattr(args, "curve_clients", None)
    if secret is None:
        if server_key is not None or clients is not None:
            raise UsageError("--curve-server-key and --curve-clients need --curve-secret FILE")
        return None
    try:
        return CurveKeys.load(secret, server_key, clients)
    except CurveError as exc:
        raise UsageError(str(exc)) from None


def link_curve(args: argparse.Namespace, connects: bool, detector: bool = False,
               publishes: bool = False) -> CurveKeys | None:  # fmt: skip
    """The CURVE keys of a command's data link (None: plain), checked against its role:
    a connecting link needs --curve-server-key, a binding one must not have it. A detector
    link cannot be authenticated: the flags then only serve --publish (`publishes`)."""
    curve = curve_from_args(args)
    if curve is None:
        return None
    if detector:
        if curve.server_key is not None or not publishes:
            raise UsageError("detector links cannot be authenticated (keep them on an isolated "
                             "network): --curve-* only applies to --publish here")  # fmt: skip
        logging.getLogger(__name__).info("the detector link is plain text; CURVE protects "
                                         "--publish only")
        return None
    if connects and curve.server_key is None:
        raise UsageError("--curve-secret on a connecting link needs --curve-server-key FILE "
                         "(the public key of the side that binds)")  # fmt: skip
    if not connects and curve.server_key is not None:
        raise UsageError("--curve-server-key is for connecting links; a binding one is the "
                         "server (its clients: --curve-clients DIR)")  # fmt: skip
    return curve
