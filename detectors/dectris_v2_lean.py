"""DECTRIS stream V2 image messages read without building the CBOR object tree.

The images of one series are laid out alike: the same keys in the same order, the same series
id, channel, dims, typed array and compression; only the image id, the times (unsigned integers
or arrays of them) and the blob change. `image_layout` learns that layout from an image message
that the decoder (`dectris_v2`) has fully parsed with `cbor2` and accepted: a token template
(`cbor_template`, matched in numba) with every value copied literally (type, series id,
channel, array) but the image id (captured), other unsigned integers such as the times (any
unsigned integer) and the blob (its length read from its head). A message that
matches decodes under `cbor2` to what the learned one did, with its own image id and blob, so
the decoder takes the id and a view of the blob from the match and builds nothing else;
anything that does not match goes to the full parse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tcbf_live.detectors.cbor_template import BLOB, IMAGE_ID, LITERAL, UINT, Builder, match

SELF_DESCRIBED = b"\xd9\xd9\xf7"
TYPED = {64: "|u1", 69: "<u2", 70: "<u4"}
MAX_DEPTH = 32
_WIDTH = {24: 1, 25: 2, 26: 4, 27: 8}
_IMAGE_ID, _DATA = b"\x68image_id", b"\x64data"  # keys as CBOR text items
_LITERAL = (b"\x64type", b"\x69series_id")  # the values the decoder reads: learned bytes


class Unusual(Exception):
    """The message is not laid out as this module reads it (the full parse decides)."""


@dataclass(frozen=True)
class ImageLayout:
    """The learned layout of one series' image messages (see the module docstring)."""

    template: tuple[np.ndarray, np.ndarray]  # `cbor_template` (text, prog)
    algorithm: str | None  # the blob's compression (tag 56500), None: raw pixels
    element_size: int  # the compression's element size (0 for raw pixels)

    def read(self, buf: memoryview) -> tuple[int, memoryview] | None:
        """(image id, blob) of a message laid out so, or None."""
        s = np.frombuffer(buf, np.uint8)
        image_id, start, length = match(s, 0, s.shape[0], *self.template)
        return None if image_id < 0 else (image_id, buf[start : start + length])


def _head(buf: memoryview, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the item at `pos`."""
    initial = buf[pos]
    major, info = initial >> 5, initial & 31
    if info < 24:
        return major, info, pos + 1
    width = _WIDTH.get(info)
    if width is None or pos + 1 + width > len(buf):  # indefinite length, reserved, truncated
        raise Unusual
    return major, int.from_bytes(buf[pos + 1 : pos + 1 + width], "big"), pos + 1 + width


def _skip(buf: memoryview, pos: int, depth: int = 0) -> int:
    """The position after the item at `pos` (of a message `cbor2` has accepted)."""
    major, arg, pos = _head(buf, pos)
    if major in (2, 3):
        if pos + arg > len(buf):
            raise Unusual
        return pos + arg
    if major in (4, 5, 6) and depth >= MAX_DEPTH:
        raise Unusual
    if major in (4, 5):
        for _ in range(arg * (major - 3)):  # an array's items, a map's keys and values
            pos = _skip(buf, pos, depth + 1)
    elif major == 6:
        pos = _skip(buf, pos, depth + 1)
    return pos


def _key(buf: memoryview, pos: int, seen: set[bytes]) -> int:
    """The position after the map key at `pos`: a text string in its shortest head, not in
    `seen` (added). Keys are compared as bytes below (the template's literals); `cbor2`
    compares them decoded and keeps a repeated key's last value, so any other key is Unusual."""
    major, arg, after = _head(buf, pos)
    shortest = 1 if arg < 24 else 2 if arg < 1 << 8 else 3 if arg < 1 << 16 else 5
    if major != 3 or after - pos != shortest or after + arg > len(buf):
        raise Unusual
    key = bytes(buf[after : after + arg])
    if key in seen:
        raise Unusual
    seen.add(key)
    return after + arg


def _value(buf: memoryview, start: int, end: int, out: Builder) -> None:
    """The tokens of a value: any unsigned integer for one, an array of as many for an array
    of them (times), else the learned bytes."""
    major, count, pos = _head(buf, start)
    if major == 0:
        out.add(UINT)
        return
    if major == 4 and count:
        items = [pos]
        while len(items) <= count and items[-1] < end and buf[items[-1]] >> 5 == 0:
            items.append(_skip(buf, items[-1]))
        if len(items) == count + 1 and items[-1] == end:
            out.add(LITERAL, bytes(buf[start:pos]))
            for _ in range(count):
                out.add(UINT)
            return
    out.add(LITERAL, bytes(buf[start:end]))


def _blob(buf: memoryview, pos: int, channel: bytes) -> tuple[int, str | None, int]:
    """(position of the head of `channel`'s blob, algorithm, element size) in the `data` map at
    `pos`: the array is tag 40 [[h, w], tag 64|69|70 (bytes | tag 56500 [algorithm, element
    size, bytes])]."""
    major, count, pos = _head(buf, pos)
    key = bytes([0x60 + len(channel)]) + channel if len(channel) < 24 else None
    seen: set[bytes] = set()
    for _ in range(count if major == 5 else 0):
        after_key = _key(buf, pos, seen)
        if bytes(buf[pos:after_key]) != key:
            pos = _skip(buf, after_key)
            continue
        pos = after_key
        # tag 40, [dims, array], dims [h, w], h, w, the typed-array tag
        for want in ((6, 40), (4, 2), (4, 2), (0, None), (0, None), (6, None)):
            major, arg, after = _head(buf, pos)
            if major != want[0] or want[1] not in (None, arg):
                raise Unusual
            pos = after
        major, arg, after = _head(buf, pos)
        if (major, arg) == (6, 56500):  # [algorithm, element size, blob]
            major, arg, after = _head(buf, after)
            if (major, arg) != (4, 3):
                raise Unusual
            major, length, pos = _head(buf, after)
            if major != 3 or buf[pos + length] >> 5 != 0:
                raise Unusual
            algorithm = bytes(buf[pos : pos + length]).decode()
            _, element_size, pos = _head(buf, pos + length)
        else:
            algorithm, element_size = None, 0
        if buf[pos] >> 5 != 2:
            raise Unusual
        return pos, algorithm, element_size
    raise Unusual


def image_layout(buf: memoryview, channel: bytes) -> ImageLayout | None:
    """The layout of this image message (accepted by the full parse) for `channel` (UTF-8),
    or None when it has no single image id, data map and channel blob to locate."""
    out, seen_id, seen_data, keys = Builder(), False, False, set()
    try:
        pos = 3 if buf[:3] == SELF_DESCRIBED else 0
        major, count, pos = _head(buf, pos)
        if major != 5:
            return None
        out.add(LITERAL, bytes(buf[:pos]))
        for _ in range(count):
            key_end = _key(buf, pos, keys)
            key, end = bytes(buf[pos:key_end]), _skip(buf, key_end)
            out.add(LITERAL, key)
            if key == _IMAGE_ID and not seen_id and buf[key_end] >> 5 == 0:
                seen_id = True
                out.add(IMAGE_ID)
            elif key == _DATA and not seen_data:
                head, algorithm, element_size = _blob(buf, key_end, channel)
                _, length, start = _head(buf, head)
                out.add(LITERAL, bytes(buf[key_end:head]))
                out.add(BLOB)
                out.add(LITERAL, bytes(buf[start + length : end]))
                seen_data = True
            elif key == _IMAGE_ID:
                return None  # not an unsigned integer (the full parse decides)
            elif key in _LITERAL:
                out.add(LITERAL, bytes(buf[key_end:end]))
            else:
                _value(buf, key_end, end, out)
            pos = end
    except (Unusual, IndexError, UnicodeDecodeError):
        return None
    if pos != len(buf) or not seen_data or not seen_id:
        return None
    return ImageLayout(out.template(), algorithm, element_size)
