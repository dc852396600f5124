"""CBOR templates: read the image id and locate the blob of a DECTRIS stream V2 image message
laid out like an earlier one, in numba, without building the CBOR object tree (issue 14).

A template is a list of tokens learned from a fully parsed message (`dectris_v2_lean`):
- LITERAL: these bytes exactly (keys, the series id, channel, dims, typed-array tags, the
  compression's name and element size: every value the decoder reads);
- UINT: any CBOR unsigned integer item (the times), 1 to 9 bytes;
- IMAGE_ID: the same, its value captured;
- BLOB: a definite-length byte string: its length read from its head, its bytes skipped.
The message must end exactly after the last token. A message that matches decodes under cbor2
to what the learned one did, with its own image id, times and blob (the argument for this is
in `dectris_v2_lean`). `match` runs from Python (the lean path) and inside the ingest kernel
(`stream.fast_lane`).

A template is two arrays: `text` (uint8, the literal bytes back to back) and `prog` (int64:
the number of tokens, then per token its kind, literal start, literal length).
"""

from __future__ import annotations

import numba
import numpy as np

LITERAL, UINT, IMAGE_ID, BLOB = range(4)
NO_MATCH = (-1, -1, -1)


@numba.njit(nogil=True, cache=True)
def _uint(s: np.ndarray, i: int, n: int, major: int) -> tuple[int, int]:
    """(argument, end) of the CBOR head of major type `major` at `i`, or (-1, -1). Arguments
    of 8 bytes above 2**62 are refused (no image id or blob is that large)."""
    if i >= n or s[i] >> 5 != major:
        return -1, -1
    info = s[i] & 31
    if info < 24:
        return np.int64(info), i + 1
    width = 1 if info == 24 else 2 if info == 25 else 4 if info == 26 else 8 if info == 27 else 0
    if width == 0 or i + 1 + width > n:
        return -1, -1
    if width == 8 and s[i + 1] >= 64:
        return -1, -1
    value = np.int64(0)
    for k in range(width):
        value = (value << 8) | np.int64(s[i + 1 + k])
    return value, i + 1 + width


@numba.njit(nogil=True, cache=True)
def match(s: np.ndarray, start: int, stop: int, text: np.ndarray,
          prog: np.ndarray) -> tuple[int, int, int]:  # fmt: skip
    """(image id, blob start, blob length) of the message `s[start:stop]` if it matches the
    template, else NO_MATCH."""
    i, n = start, stop
    image_id = blob = length = -1
    for t in range(prog[0]):
        kind, l0, ln = prog[1 + 3 * t], prog[2 + 3 * t], prog[3 + 3 * t]
        if kind == LITERAL:
            if i + ln > n:
                return NO_MATCH
            for k in range(ln):
                if s[i + k] != text[l0 + k]:
                    return NO_MATCH
            i += ln
        elif kind == BLOB:
            length, i = _uint(s, i, n, 2)
            if i < 0 or i + length > n:
                return NO_MATCH
            blob = i
            i += length
        else:
            value, i = _uint(s, i, n, 0)
            if i < 0:
                return NO_MATCH
            if kind == IMAGE_ID:
                image_id = value
    if i != n or image_id < 0 or blob < 0:
        return NO_MATCH
    return image_id, blob, length


class Builder:
    """Collects tokens in message order (`dectris_v2_lean.image_layout`)."""

    def __init__(self):
        self.text, self.prog = bytearray(), [0]

    def add(self, kind: int, literal: bytes = b"") -> None:
        if kind == LITERAL and self.prog[0] and self.prog[-3] == LITERAL:
            self.prog[-1] += len(literal)  # joined to the previous literal
        else:
            self.prog += [kind, len(self.text), len(literal)]
            self.prog[0] += 1
        self.text += literal

    def template(self) -> tuple[np.ndarray, np.ndarray]:
        text = np.frombuffer(bytes(self.text) or b"\0", np.uint8).copy()
        return text, np.array(self.prog, np.int64)
