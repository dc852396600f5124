"""The live engine of tcbf-live: receive detector frames, accumulate, align, publish, write.

The spine of one frame (docs/architecture.md): `engine` (threads, sockets, series lifecycle)
-> `series` (one object per series: accumulate, merge, solve) -> `tcbf.pipeline` (one update)
-> `view_state` (what the viewer draws) and `hdf5` (the result file). `tcbf` is the pure
science core; `cli` holds every command.
"""
