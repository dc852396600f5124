"""Control endpoint of a running `run` (`--control ENDPOINT`): acquisition software asks, the run
answers.

A ZeroMQ REP socket on a background thread answers one JSON object per request with one JSON
object (never pickle; requests capped at MAX_REQUEST_BYTES; a malformed one gets an error reply
and the endpoint stays up):

- {"cmd": "status"}: the series in progress (id, frames received and expected, dose, complete);
- {"cmd": "aberrations"}: the latest model (defocus, C12, angles, rotation, their 1-sigma
  errors, the method and why) and resolution, or "model": false with the reason;
- {"cmd": "save", "path": "name.h5" | "name.npy", "overwrite": false}: the current result (an
  HDF5 result file, as `--output` writes) or the current tcBF image alone (.npy), written
  beside `--output` (a path that leaves that directory is refused; an existing file only with
  "overwrite": true);
- {"cmd": "stop"}: end the run now (the result so far is written as at an end message).

Every reply has "ok" (and "error" when false). Binds loopback unless told otherwise; beyond
loopback only with CURVE keys (it can stop a run and write files). `ControlClient` is the
client (acquisition scripts: docs/control.md).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import zmq

from tcbf_live.stream.transport import (
    CurveKeys,
    OversizedMessage,
    ServedSocket,
    open_link,
    recv_capped,
)

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
POLL_MS = 100


def _number(x) -> float | None:
    """JSON-safe float (NaN and inf: null)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def status(result) -> dict:
    if result is None:
        return {"ok": True, "series": None, "frames_received": 0}
    info = result.info
    return {"ok": True, "series": info.series_id, "frames_received": result.frames_received,
            "frames_expected": result.frames_expected, "complete": result.complete,
            "dose_e_per_A2": _number(result.dose_e_per_A2),
            "elapsed_s": _number(result.elapsed_s)}  # fmt: skip


def aberrations(result) -> dict:
    t = None if result is None else result.tcbf
    ab = None if t is None else t.aberrations
    if ab is None:
        why = "no frames yet" if result is None else (result.alignment_note or
                                                      "too few rows or electrons for a model")
        return {"ok": True, "model": False, "why": why}
    errors = {k: _number(v) for k, v in (ab.errors or {}).items()}
    return {"ok": True, "model": True, "method": t.alignment.method, "note": t.alignment.note,
            "defocus_A": _number(ab.defocus_A), "C10_A": _number(ab.C10_A),
            "C12_A": _number(ab.C12_A), "phi12_rad": _number(ab.phi12_rad),
            "rotation_rad": _number(ab.rotation_rad), "transpose": bool(ab.transpose),
            "errors": errors, "resolution_A": _number(t.resolution_A),
            "resolution_range_A": [_number(v) for v in t.resolution_range_A],
            "frames": t.frames}  # fmt: skip


class ControlServer(ServedSocket):
    """The REP endpoint over an engine (`snapshot()`, `stop()`); `save_dir`: where "save" may
    write (the directory of `--output`)."""

    def __init__(self, engine, endpoint: str, protocol: str, save_dir: Path,
                 curve: CurveKeys | None = None):  # fmt: skip
        self.engine, self.protocol = engine, protocol
        self.save_dir = Path(save_dir).resolve()
        self.requests = 0
        super().__init__(open_link(zmq.Context.instance(), zmq.REP, endpoint, bind_here=True,
                                   hwm=4, role="the control endpoint (--control)",
                                   max_message_bytes=MAX_REQUEST_BYTES, curve=curve),
                         "tcbf-control")  # fmt: skip

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(POLL_MS):
                continue
            try:
                parts = recv_capped(self._sock, MAX_REQUEST_BYTES)
                reply = self.handle(json.loads(b"".join(parts)))
            except OversizedMessage as exc:
                reply = {"ok": False, "error": f"request too large: {exc}"}
            except (ValueError, UnicodeDecodeError) as exc:
                reply = {"ok": False, "error": f"not a JSON object: {exc}"}
            except Exception as exc:  # never take the run down: say what failed
                log.exception("control request failed")
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self.requests += 1
            self._sock.send(json.dumps(reply).encode())

    def handle(self, request) -> dict:
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'a request is a JSON object with "cmd"'}
        cmd = request["cmd"]
        if cmd == "status":
            return status(self.engine.snapshot())
        if cmd == "aberrations":
            return aberrations(self.engine.snapshot())
        if cmd == "save":
            return self.save(request.get("path"), request.get("overwrite") is True)
        if cmd == "stop":
            self.engine.stop()
            return {"ok": True, "stopping": True}
        return {"ok": False, "error": f"unknown command {cmd!r} "
                "(status, aberrations, save, stop)"}  # fmt: skip

    def save(self, name, overwrite: bool) -> dict:
        """The current result (.h5) or tcBF image (.npy) under `save_dir`."""
        from tcbf_live.stream.hdf5 import write_result
        from tcbf_live.stream.outputs import OutputExists

        if not isinstance(name, str) or Path(name).suffix not in (".h5", ".npy"):
            return {"ok": False, "error": '"path" must name a .h5 or .npy file'}
        path = (self.save_dir / name).resolve()
        if self.save_dir not in path.parents:
            return {"ok": False, "error": f"{name!r} leaves {self.save_dir}"}
        result = self.engine.snapshot()
        if path.suffix == ".npy":
            if result is None or result.tcbf is None:
                return {"ok": False, "error": "no tcBF image yet"}
            if path.exists() and not overwrite:
                return {"ok": False, "error": f"{path} exists (pass \"overwrite\": true)"}
            np.save(path, result.tcbf.image)
        else:
            if result is None:
                return {"ok": False, "error": "no series yet"}
            try:
                write_result(path, result, self.protocol, overwrite=overwrite)
            except OutputExists:
                return {"ok": False, "error": f"{path} exists (pass \"overwrite\": true)"}
        return {"ok": True, "path": str(path)}


class ControlClient:
    """Requests to a run's control endpoint: `client.request("status")`, `.request("save",
    path="now.h5")`. A request unanswered within `timeout_s` raises TimeoutError (the socket is
    then reopened, as a REQ socket must be)."""

    def __init__(self, endpoint: str, timeout_s: float = 5.0, curve: CurveKeys | None = None):
        self.endpoint, self.timeout_s, self.curve = endpoint, timeout_s, curve
        self._sock = self._open()

    def _open(self) -> zmq.Socket:
        return open_link(zmq.Context.instance(), zmq.REQ, self.endpoint, bind_here=False, hwm=4,
                         role="control client", max_message_bytes=1 << 20,
                         curve=self.curve)  # fmt: skip

    def request(self, cmd: str, **fields) -> dict:
        self._sock.send(json.dumps({"cmd": cmd, **fields}).encode())
        if not self._sock.poll(int(self.timeout_s * 1000)):
            self._sock.close(linger=0)
            self._sock = self._open()
            raise TimeoutError(f"no reply from {self.endpoint} within {self.timeout_s} s")
        return json.loads(self._sock.recv())

    def close(self) -> None:
        self._sock.close(linger=0)
