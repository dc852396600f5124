"""tcbf-live: real-time tilt-corrected bright-field STEM (tcBF, "parallax").

One import namespace; the subpackages live in the repository's top-level folders and are
installed under it (pyproject.toml maps them):

- `tcbf_live.stream`: the live engine; `tcbf_live.stream.tcbf` is the pure science core
  (`reconstruct(data, energy_eV=..., step_A=..., ...)` for a 4D numpy array);
- `tcbf_live.detectors`: wire formats and recordings;
- `tcbf_live.simulators`: the 4D-STEM simulator and senders;
- `tcbf_live.viewer`: the live viewer (Qt only when a window is opened).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tcbf-live")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
