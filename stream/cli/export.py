"""`export`: a written result file in another tool's format. `--emd`: EMD 1.0 for py4DSTEM
(`stream/emd.py`, through the optional `emdfile`); `--hspy`: HyperSpy's format, through
RosettaSciIO (`stream/hspy_export.py`)."""

from __future__ import annotations

import argparse
import sys

from tcbf_live.stream.cli.common import UsageError
from tcbf_live.stream.outputs import check_output

# flag -> (module it needs, extra that installs it, what opens the file)
FORMATS = {"emd": ("emdfile", "emd", "EMD 1.0: py4DSTEM.read"),
           "hspy": ("rsciio", "hyperspy", "HyperSpy: hyperspy.api.load")}  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a result file (run/reconstruct --output) in "
                       "another tool's format (EMD 1.0: py4DSTEM, .hspy: HyperSpy)")  # fmt: skip
    p.add_argument("result", metavar="RESULT.h5")
    p.add_argument("--emd", metavar="FILE.emd",
                   help="EMD 1.0 file py4DSTEM.read opens (needs: pip install tcbf-live[emd])")
    p.add_argument("--hspy", metavar="FILE.hspy",
                   help="HyperSpy file (images with axes in A and mrad) hyperspy.api.load "
                   "opens (needs: pip install tcbf-live[hyperspy])")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import importlib

    import h5py

    wanted = [name for name in FORMATS if getattr(args, name)]
    if not wanted:
        raise UsageError("say which format: --emd FILE.emd and/or --hspy FILE.hspy")
    for name in wanted:
        if not getattr(args, name).endswith(f".{name}"):
            raise UsageError(f"--{name} {getattr(args, name)}: the file name must end in .{name}")
    for name in wanted:
        module, extra, _ = FORMATS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise UsageError(f"--{name} needs {module}: pip install tcbf-live[{extra}]") from None
        check_output(getattr(args, name), args.overwrite, [args.result], flag=f"--{name}")
    try:
        with h5py.File(args.result, "r") as f:
            if "acquisition" not in f or "bf" not in f:
                raise UsageError(f"{args.result} is not a tcbf-live result file")
    except OSError as exc:
        raise UsageError(f"cannot read {args.result}: {exc}") from None
    for name in wanted:
        if name == "emd":
            from tcbf_live.stream.emd import write_emd as write
        else:
            from tcbf_live.stream.hspy_export import write_hspy as write
        path = write(args.result, getattr(args, name), args.overwrite)
        sys.stderr.write(f"wrote {path} ({FORMATS[name][2]})\n")
    return 0
