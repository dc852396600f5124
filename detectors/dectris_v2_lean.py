"""DECTRIS stream V2 image messages read without building the CBOR object tree.

The images of one series are laid out alike: the same keys in the same order, the same series
id, channel, dims, typed array and compression; only the image id, the times (unsigned integers
or arrays of them) and the blob change. `image_layout` learns that layout from an image message
that the decoder (`dectris_v2`) has fully parsed with `cbor2` and accepted: two bytes patterns,
the bytes up to the blob's head and the bytes after the blob, every value copied literally
(type, series id, channel, array) but the image id (captured), other unsigned integers such as
the times (any unsigned integer) and the blob (its length read from its head). A message that
matches decodes under `cbor2` to what the learned one did, with its own image id and blob, so
the decoder takes the id and a view of the blob from the match and builds nothing else;
anything that does not match goes to the full parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SELF_DESCRIBED = b"\xd9\xd9\xf7"
TYPED = {64: "|u1", 69: "<u2", 70: "<u4"}
MAX_DEPTH = 32
_WIDTH = {24: 1, 25: 2, 26: 4, 27: 8}
_UINT = rb"[\x00-\x17]|\x18.|\x19..|\x1a.{4}|\x1b.{8}"  # any unsigned integer item
_BYTES_HEAD = rb"([\x40-\x57]|\x58.|\x59..|\x5a.{4}|\x5b.{8})"  # a byte string's head
_IMAGE_ID, _DATA = b"\x68image_id", b"\x64data"  # keys as CBOR text items
_LITERAL = (b"\x64type", b"\x69series_id")  # the values the decoder reads: learned bytes


class Unusual(Exception):
    """The message is not laid out as this module reads it (the full parse decides)."""


def _argument(head: bytes) -> int:
    """The argument of a CBOR head (its integer value, a string's length)."""
    return head[0] & 31 if len(head) == 1 else int.from_bytes(head[1:], "big")


@dataclass(frozen=True)
class ImageLayout:
    """The learned layout of one series' image messages (see the module docstring)."""

    before: re.Pattern  # up to the blob's head; its last group is the head
    after: re.Pattern  # from the blob's end to the message's end
    id_before: bool  # the image id (group 1) is in `before`, else in `after`
    algorithm: str | None  # the blob's compression (tag 56500), None: raw pixels
    element_size: int  # the compression's element size (0 for raw pixels)

    def read(self, buf: memoryview) -> tuple[int, memoryview] | None:
        """(image id, blob) of a message laid out so, or None."""
        first = self.before.match(buf)
        if first is None:
            return None
        start = first.end()
        end = start + _argument(first[first.lastindex])
        rest = self.after.fullmatch(buf, end) if end <= len(buf) else None
        if rest is None:
            return None
        return _argument(first[1] if self.id_before else rest[1]), buf[start:end]


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


def _value(buf: memoryview, start: int, end: int) -> bytes:
    """The pattern of a value: any unsigned integer for one, an array of as many for an array
    of them (times), else the learned bytes."""
    major, count, pos = _head(buf, start)
    if major == 0:
        return rb"(?:" + _UINT + rb")"
    if major == 4 and count:
        items = [pos]
        while len(items) <= count and items[-1] < end and buf[items[-1]] >> 5 == 0:
            items.append(_skip(buf, items[-1]))
        if len(items) == count + 1 and items[-1] == end:
            return re.escape(bytes(buf[start:pos])) + (rb"(?:" + _UINT + rb")") * count
    return re.escape(bytes(buf[start:end]))


def _blob(buf: memoryview, pos: int, channel: bytes) -> tuple[int, str | None, int]:
    """(position of the head of `channel`'s blob, algorithm, element size) in the `data` map at
    `pos`: the array is tag 40 [[h, w], tag 64|69|70 (bytes | tag 56500 [algorithm, element
    size, bytes])]."""
    major, count, pos = _head(buf, pos)
    key = bytes([0x60 + len(channel)]) + channel if len(channel) < 24 else None
    for _ in range(count if major == 5 else 0):
        after_key = _skip(buf, pos)
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
    try:
        pos = 3 if buf[:3] == SELF_DESCRIBED else 0
        major, count, pos = _head(buf, pos)
        if major != 5:
            return None
        parts, split, id_before = [re.escape(bytes(buf[:pos]))], None, None
        for _ in range(count):
            key_end = _skip(buf, pos)
            key, end = bytes(buf[pos:key_end]), _skip(buf, key_end)
            parts.append(re.escape(key))
            if key == _IMAGE_ID and id_before is None and buf[key_end] >> 5 == 0:
                id_before = split is None
                parts.append(rb"(" + _UINT + rb")")
            elif key == _DATA and split is None:
                head, algorithm, element_size = _blob(buf, key_end, channel)
                _, length, start = _head(buf, head)
                parts += [re.escape(bytes(buf[key_end:head])) + _BYTES_HEAD, None,
                          re.escape(bytes(buf[start + length : end]))]  # fmt: skip
                split = len(parts) - 2
            elif key in (_IMAGE_ID, _DATA):
                return None  # repeated (cbor2 keeps the last)
            elif key in _LITERAL:
                parts.append(re.escape(bytes(buf[key_end:end])))
            else:
                parts.append(_value(buf, key_end, end))
            pos = end
    except (Unusual, IndexError, UnicodeDecodeError):
        return None
    if pos != len(buf) or split is None or id_before is None:
        return None
    before, after = b"".join(parts[:split]), b"".join(parts[split + 1 :])
    return ImageLayout(re.compile(before, re.DOTALL), re.compile(after, re.DOTALL), id_before,
                       algorithm, element_size)  # fmt: skip
