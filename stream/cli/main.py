"""`tcbf-live` console script: one parser, one subcommand per job.

Errors in flags or inputs are one line on stderr and exit code 2, never a traceback; the other
exit codes of `run` and `reconstruct` are in `stream.exitcodes`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import zmq

from tcbf_live import __version__
from tcbf_live.detectors.files import DatasetError
from tcbf_live.simulators.simulate import SimulationError
from tcbf_live.stream.cli.common import OneLineParser, UsageError
from tcbf_live.stream.cli.exitcodes import ExitCode
from tcbf_live.stream.series import SeriesError
from tcbf_live.viewer.display import WindowUnavailable


def build_parser() -> OneLineParser:
    from tcbf_live.stream.cli import control, demo, export, listen, reconstruct, run, workers
    from tcbf_live.stream.cli import simulate as sim_cli
    from tcbf_live.stream.cli import view as viewer_cli

    parser = OneLineParser(prog="tcbf-live", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"tcbf-live {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim_cli.add_parser(sub)
    run.add_parser(sub)
    reconstruct.add_parser(sub)
    demo.add_parser(sub)
    viewer_cli.add_parser(sub)
    listen.add_parser(sub)
    workers.add_parser(sub)
    control.add_parser(sub)
    export.add_parser(sub)
    return parser


NEGATIVE_VALUES = ("--depth-sections",)  # flags whose value may start with '-': -200:200:50


def joined_negative_values(argv: Sequence[str]) -> list[str]:
    """`--depth-sections -200:200:50` as `--depth-sections=-200:200:50` (argparse would read
    the value as an unknown flag)."""
    out: list[str] = []
    for a in argv:
        if out and out[-1] in NEGATIVE_VALUES and a.startswith("-"):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(joined_negative_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("numba").setLevel(logging.WARNING)  # -v: ours, not the JIT's (~0.5 MB)
    try:
        return int(args.run(args) or 0)
    except (UsageError, DatasetError, SimulationError, SeriesError, WindowUnavailable) as exc:
        sys.stderr.write(f"tcbf-live {args.command}: error: {exc}\n")
        return ExitCode.USAGE
    except (OSError, ValueError, zmq.ZMQError) as exc:  # e.g. port in use, unreadable file
        msg = " ".join(str(exc).split()) or type(exc).__name__
        sys.stderr.write(f"tcbf-live {args.command}: error: {msg}\n")
        return ExitCode.USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"tcbf-live {args.command}: interrupted\n")
        return 130
    except Exception as exc:  # a bug: one line (the traceback with -v), exit code 1
        logging.getLogger("tcbf_live").debug("internal error", exc_info=True)
        msg = " ".join(str(exc).split())
        sys.stderr.write(f"tcbf-live {args.command}: internal error: {type(exc).__name__}"
                         f"{': ' + msg if msg else ''}{'' if args.verbose else ' (-v: traceback)'}"
                         "\n")  # fmt: skip
        return ExitCode.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
