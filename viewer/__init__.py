"""Live pyqtgraph viewer of engine snapshots (arrives with the viewer issue; empty for now)."""
