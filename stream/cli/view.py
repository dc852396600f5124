"""`tcbf-live view`: watch an engine's result stream (`run/demo --publish`) from anywhere."""

from __future__ import annotations

import argparse

from tcbf_live.stream.cli.common import UsageError, add_curve_args, link_curve, parse_finite
from tcbf_live.stream.transport import valid_endpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view",
        help="show the live panels of an engine's result stream",
        description="Subscribe to a result stream (tcbf-live run/demo --publish ENDPOINT) and "
        "show the live panels; join or leave at any time.",
    )
    p.add_argument("--connect", default="tcp://127.0.0.1:5556", metavar="ENDPOINT")
    p.add_argument("--seconds", type=parse_finite, metavar="S", help="close after S seconds")
    p.add_argument("--screenshot", metavar="PNG", help="save the window when closing")
    p.add_argument("--headless", action="store_true", help="render offscreen (needs --seconds)")
    add_curve_args(p, server=False, client=True)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not valid_endpoint(args.connect):
        raise UsageError(f"bad endpoint {args.connect!r} (tcp://HOST:PORT or ipc://PATH)")
    if args.headless and not args.seconds:
        raise UsageError("--headless needs --seconds")
    if args.seconds is not None and not 0 < args.seconds <= 1e6:
        raise UsageError("--seconds must be positive (at most 1e6)")
    curve = link_curve(args, connects=True)

    from tcbf_live.stream.publisher import subscribe_states
    from tcbf_live.viewer.app import check_window, show_viewer

    check_window(args.headless)
    source = subscribe_states(args.connect, curve=curve)
    try:
        show_viewer(source, title=f"tcbf-live view {args.connect}", headless=args.headless,
                    seconds=args.seconds, screenshot=args.screenshot)  # fmt: skip
    finally:
        source.close()
    return 0
