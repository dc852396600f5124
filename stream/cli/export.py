"""`export`: a written result file in another tool's format. `--emd`: EMD 1.0 for py4DSTEM
(`stream/emd.py`, through the optional `emdfile`)."""

from __future__ import annotations

import argparse
import sys

from tcbf_live.stream.cli.common import UsageError
from tcbf_live.stream.outputs import check_output


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a result file (run/reconstruct --output) in "
                       "another tool's format (EMD 1.0 for py4DSTEM)")  # fmt: skip
    p.add_argument("result", metavar="RESULT.h5")
    p.add_argument("--emd", required=True, metavar="FILE.emd",
                   help="EMD 1.0 file py4DSTEM.read opens (needs: pip install tcbf-live[emd])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import emdfile  # noqa: F401
    except ImportError:
        raise UsageError("--emd needs the emdfile package: pip install tcbf-live[emd]") from None
    import h5py

    from tcbf_live.stream.emd import write_emd

    check_output(args.emd, args.overwrite, [args.result], flag="--emd")
    try:
        with h5py.File(args.result, "r") as f:
            if "acquisition" not in f or "bf" not in f:
                raise UsageError(f"{args.result} is not a tcbf-live result file")
    except OSError as exc:
        raise UsageError(f"cannot read {args.result}: {exc}") from None
    path = write_emd(args.result, args.emd, args.overwrite)
    sys.stderr.write(f"wrote {path} (EMD 1.0: py4DSTEM.read)\n")
    return 0
