"""A small DECTRIS SIMPLON REST client (API 1.8): configure the stream, arm, trigger, disarm.

URL scheme `http://HOST:PORT/<module>/api/<version>/<task>/<parameter>` (detector-protocols.md
sect. 1). `PUT .../config/<p>` takes {"value": v} and returns the list of parameters that
changed; commands are `PUT .../command/<name>`; `arm` returns {"sequence id": n}, the series id
that the stream will carry. Plain HTTP from the standard library, a timeout on every call, and
one clear `SimplonError` for anything that goes wrong (no connection, HTTP error, bad JSON).
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from typing import Any

HOST = re.compile(r"^[A-Za-z0-9.\-]+$|^\[[0-9a-fA-F:]+\]$")


class SimplonError(RuntimeError):
    """The detector could not be reached or refused a request."""


class SimplonClient:
    def __init__(self, host: str, port: int = 80, version: str = "1.8.0", timeout_s: float = 5.0):
        if not HOST.fullmatch(host):
            raise ValueError(f"bad detector host {host!r}")
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        self.base = f"http://{host}:{port}"
        self.version = version
        self.timeout_s = timeout_s

    def _url(self, module: str, task: str, param: str) -> str:
        return f"{self.base}/{module}/api/{self.version}/{task}/{param}"

    def _request(self, method: str, url: str, body: Any = None, timeout_s: float | None = None
                 ) -> Any:  # fmt: skip
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                text = resp.read(1 << 20)
        except urllib.error.HTTPError as exc:
            raise SimplonError(f"{method} {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            raise SimplonError(f"{method} {url}: {reason}") from None
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise SimplonError(f"{method} {url}: reply is not JSON") from None

    # ------------------------------------------------------------------ primitives
    def get(self, module: str, param: str, task: str = "config") -> Any:
        reply = self._request("GET", self._url(module, task, param))
        return reply.get("value") if isinstance(reply, dict) else reply

    def set(self, module: str, param: str, value: Any) -> list:
        reply = self._request("PUT", self._url(module, "config", param), {"value": value})
        return reply if isinstance(reply, list) else []

    def command(self, name: str, module: str = "detector", timeout_s: float | None = None) -> Any:
        return self._request("PUT", self._url(module, "command", name), {}, timeout_s)

    # ------------------------------------------------------------------ workflow
    def configure_stream(self, fmt: str, header_detail: str = "basic",
                         header_appendix: str | None = None) -> None:  # fmt: skip
        """Enable the stream in `legacy` (V1) or `cbor` (V2) format."""
        self.set("stream", "mode", "enabled")
        self.set("stream", "format", fmt)
        self.set("stream", "header_detail", header_detail)
        if header_appendix is not None:
            self.set("stream", "header_appendix", header_appendix)

    def configure_scan(self, positions: int, trigger_mode: str = "exte",
                       frame_time_s: float | None = None) -> None:  # fmt: skip
        """One frame per scan position: `exte`/`inte` count triggers, `exts`/`ints` images."""
        per_trigger = trigger_mode in ("exte", "inte")
        self.set("detector", "trigger_mode", trigger_mode)
        self.set("detector", "nimages", 1 if per_trigger else positions)
        self.set("detector", "ntrigger", positions if per_trigger else 1)
        if frame_time_s is not None:
            self.set("detector", "frame_time", frame_time_s)
            self.set("detector", "count_time", frame_time_s)

    def arm(self) -> int:
        reply = self.command("arm")
        if not isinstance(reply, dict) or type(reply.get("sequence id")) is not int:
            raise SimplonError(f"arm: unexpected reply {reply!r}")
        return reply["sequence id"]

    def trigger(self, timeout_s: float = 24 * 3600.0) -> None:
        """In `ints` the call returns when the triggered images are taken: a long wait."""
        self.command("trigger", timeout_s=timeout_s)

    def disarm(self) -> None:
        self.command("disarm")

    def stream_state(self) -> str | None:
        return self.get("stream", "state", task="status")

    def dropped(self) -> int | None:
        """Images the detector's stream dropped since the last arm (status `dropped`), or None
        when the detector does not report a count."""
        value = self.get("stream", "dropped", task="status")
        return int(value) if isinstance(value, int | float) and value >= 0 else None
