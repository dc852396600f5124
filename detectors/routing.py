"""Which messages carry frames, and which control a series: what several receivers that share
one stream must tell apart without decoding (`stream.coordinator` relays control messages to
every worker, in one order, because a PUSH sender hands each message to one receiver only).

Each protocol's `rank(parts)` reads a few bytes of the first part: None for a frame message,
else the control message's rank: START (a series start: DECTRIS V1 `dheader`, V2 and native
`start`), DETAIL (any other control part, e.g. a V1 header part sent as its own message, which
belongs after its `dheader`) or END. An unrecognised message ranks as DETAIL: relayed to every
worker, where the decoder counts what is wrong with it; a frame message mistaken for control
would reach every worker and be counted as a duplicate, never lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

START, DETAIL, END = 0, 1, 2
HEAD_BYTES = 256  # V1 JSON parts name their htype near the start

Rank = Callable[[list[Any]], int | None]


def _head(parts: list[Any], n: int = HEAD_BYTES) -> bytes:
    return bytes(memoryview(parts[0]).cast("B")[:n]) if parts else b""


def _ranked(head: bytes, image: bytes, start: bytes, end: bytes) -> int | None:
    if image in head:
        return None
    if start in head:
        return START
    return END if end in head else DETAIL


def dectris_v1_rank(parts: list[Any]) -> int | None:
    """V1: a message whose first part is a `dimage-1.0` carries a frame (dimage, dimage_d,
    blob, dconfig, and an image appendix where the detector adds one); `dheader-1.0` starts a
    series, `dseries_end-1.0` ends it; every other part (config, flatfield, mask, appendix) is
    DETAIL."""
    return _ranked(_head(parts), b'"dimage-1.0"', b"dheader-1.0", b"dseries_end-1.0")


def dectris_v2_rank(parts: list[Any]) -> int | None:
    """V2: one CBOR map per message whose first key is `type` (text "image", "start", "end")."""
    return _ranked(_head(parts, 16), b"dtypeeimage", b"dtypeestart", b"dtypecend")


def native_rank(parts: list[Any]) -> int | None:
    """Native: the msgpack header names its `kind` ("frames", "start", "end") after the
    protocol name and version (docs/protocol.md)."""
    return _ranked(_head(parts, 48), b"\xa4kind\xa6frames", b"\xa4kind\xa5start",
                   b"\xa4kind\xa3end")  # fmt: skip


def starts_first(window: list, rank: Callable[[Any], int | None],
                 frames: Callable[[Any], bool] = lambda m: False) -> list:  # fmt: skip
    """Control messages gathered from several receivers, sorted by receive time, with each
    series start moved before the other header parts received just before it: they follow it
    on the wire (V1 sends them as separate messages, which several receivers may read in
    either order). `rank(m)` ranks an entry; `frames(m)`: an entry that carries frames."""
    out: list = []
    for m in window:
        if not frames(m) and rank(m) == START:
            k = len(out)
            while k and not frames(out[k - 1]) and rank(out[k - 1]) not in (START, None):
                k -= 1
            out.insert(k, m)
        else:
            out.append(m)
    return out
