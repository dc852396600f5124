"""The compiled ingest lane: DECTRIS image messages (stream V1 and V2) received, read,
decompressed and folded in one numba loop, with no Python per frame (issue 14).

Measured on the 2-core machine (docs/engine.md, benchmarks/dectris_rate.py), the Python path
spends 26-34 us of CPU per V1 frame: receive 3, parse 8-9, decompress and fold 8-13, the rest
bookkeeping; this loop does the same work in ~8-10 us. It calls libzmq's message API
(`zmq_msg_recv`, non-blocking) on the socket pyzmq opened, from the very library pyzmq loaded
(its symbols bound for numba by address: `bind_libzmq`), so no second ZeroMQ is involved and
the socket stays pyzmq's for everything else.

For each message it takes the four parts of an image of the series the decoder has learned
(`DectrisV1Decoder.lane`: dimage, dimage_d, blob, dconfig, the JSON parts matched by
`json_template` as the lean Python path matches them) and, when every check passes (frame id
within the series, blob of the announced size with a real header, one frame after
decompression), folds the frame in (`staging.fold_blob`). Anything else, a control message, a
fifth part, a damaged blob, stops the loop with that message's parts held: `drain` hands them
to the caller as the parts of one message, for the full decoder, which counts and reports
whatever is wrong with them. V2 (`drain_v2`) is the same with one CBOR part matched by
`cbor_template`. The loop also stops when the socket is empty or after a bounded
number of messages, so the caller's loop stays responsive.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
from dataclasses import dataclass

import numba
import numpy as np
import zmq

from tcbf_live.detectors.cbor_template import match as cbor_match
from tcbf_live.detectors.json_template import Template, match
from tcbf_live.stream.staging import fold_blob, fold_buffers
from tcbf_live.stream.transport import MAX_MESSAGE_PARTS

log = logging.getLogger(__name__)

PREFIX = "tcbf_live_"  # our names for libzmq's symbols (never clash with another library's)
_SIGNATURES = {  # libzmq 4 message API; a message is an opaque 64-byte zmq_msg_t
    "zmq_msg_init": numba.types.int32(numba.types.intp),
    "zmq_msg_recv": numba.types.int32(numba.types.intp, numba.types.intp, numba.types.int32),
    "zmq_msg_data": numba.types.CPointer(numba.types.uint8)(numba.types.intp),
    "zmq_msg_size": numba.types.uintp(numba.types.intp),
    "zmq_msg_more": numba.types.int32(numba.types.intp),
    "zmq_msg_close": numba.types.int32(numba.types.intp),
    "zmq_errno": numba.types.int32(),
}
MSG_BYTES = 64  # sizeof(zmq_msg_t) in libzmq 4
PARTS = 4  # dimage, dimage_d, blob, dconfig
DONTWAIT = 1
MAX_FRAME_ID = 1 << 31
# result slots of `drain_v1`
LEAN, HELD, LAST_FRAME, ERRNO = range(4)


def _library_path() -> str | None:
    """The libzmq shared library this process loaded (pyzmq's), from the process' maps; None
    when there is none, or more than one (another extension brought its own: which one
    pyzmq's sockets belong to is unknown, and the other's functions on them would corrupt
    memory)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps}
    except OSError:
        return None
    found = sorted(p for p in paths
                   if p.startswith("/") and re.match(r"libzmq[.-]", p.rsplit("/", 1)[-1]))
    if len(found) > 1:
        log.info("no compiled ingest lane: %d libzmq libraries loaded (%s)", len(found),
                 ", ".join(found))  # fmt: skip
    return found[0] if len(found) == 1 else None


@functools.cache
def bind_libzmq() -> ctypes.CDLL | None:
    """Bind libzmq's message functions under `PREFIX` names for numba, by address from the
    library pyzmq loaded; that library (ctypes), or None where it cannot be found (pyzmq built
    with libzmq linked in, another OS): then there is no compiled lane."""
    import llvmlite.binding

    path = _library_path()
    if path is None or zmq.zmq_version_info()[0] != 4:
        return None
    try:
        lib = ctypes.CDLL(path)
        got = [ctypes.c_int(), ctypes.c_int(), ctypes.c_int()]
        lib.zmq_version(*map(ctypes.byref, got))
        if tuple(v.value for v in got) != zmq.zmq_version_info():
            raise OSError(f"{path} is libzmq {[v.value for v in got]}, pyzmq's "
                          f"{zmq.zmq_version_info()}")  # fmt: skip
        for name in _SIGNATURES:
            address = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            llvmlite.binding.add_symbol(PREFIX + name, address)
    except (OSError, AttributeError) as exc:
        log.info("no compiled ingest lane: %s", exc)
        return None
    lib.zmq_msg_data.restype = ctypes.c_void_p
    lib.zmq_msg_data.argtypes = lib.zmq_msg_size.argtypes = [ctypes.c_void_p]
    lib.zmq_msg_more.argtypes = lib.zmq_msg_close.argtypes = [ctypes.c_void_p]
    lib.zmq_msg_size.restype = ctypes.c_size_t
    return lib


_z = {name: numba.types.ExternalFunction(PREFIX + name, sig) for name, sig in _SIGNATURES.items()}
_init, _recv, _data = _z["zmq_msg_init"], _z["zmq_msg_recv"], _z["zmq_msg_data"]
_size, _more, _close, _errno = (_z["zmq_msg_size"], _z["zmq_msg_more"], _z["zmq_msg_close"],
                                _z["zmq_errno"])  # fmt: skip


@numba.njit(nogil=True, cache=True)
def _part(msgs: np.ndarray, k: int) -> np.ndarray:
    """Part `k` of the held message, as a uint8 view of libzmq's buffer."""
    m = msgs.ctypes.data + MSG_BYTES * k
    return numba.carray(_data(m), (np.intp(_size(m)),))


@numba.njit(nogil=True, cache=True)
def tap_room(tap: tuple, n: int, nbytes: int) -> bool:
    """Whether the tap (data, offsets, frames; empty data: no tap) holds one more blob of
    `nbytes` after its first `n`."""
    data, offsets, frames = tap
    return data.shape[0] == 0 or (n < frames.shape[0] and offsets[n] + nbytes <= data.shape[0])


@numba.njit(nogil=True, cache=True)
def tap_put(tap: tuple, n: int, blob: np.ndarray, start: int, stop: int, frame: int) -> None:
    """Copy blob[start:stop] of frame id `frame` into the tap as its blob `n` (`tap_room`)."""
    data, offsets, frames = tap
    if data.shape[0] > 0:
        data[offsets[n] : offsets[n] + stop - start] = blob[start:stop]
        offsets[n + 1] = offsets[n] + stop - start
        frames[n] = frame


@numba.njit(nogil=True, cache=True)
def drain_v1(sock: int, msgs: np.ndarray, max_messages: int, max_bytes: int, dimage: Template,
             image_d: Template, dconfig: Template, frame_limit: int, index_offset: int,
             element_size: int, scratch: np.ndarray, k: tuple, tap: tuple,
             result: np.ndarray) -> None:  # fmt: skip
    """Fold up to `max_messages` lean image messages queued on the socket `sock` (module doc).
    `result`: [LEAN] messages folded, [LAST_FRAME] the last one's frame id, [HELD] parts of a
    message left in `msgs` for the caller (0: none; the loop stopped on an empty socket,
    `ERRNO`, or on `max_messages`). With a `tap` (`run --record`), each folded message's
    blob and frame id are copied into it; a message it has no room for is held, as is one
    whose parts add up to more than `max_bytes` (the whole-message cap: `Lane.drain`)."""
    vals, cum = fold_buffers(k)
    result[:] = 0
    result[LAST_FRAME] = -1
    base = msgs.ctypes.data
    while result[LEAN] < max_messages:
        held = total = 0
        frame = size = -1
        whole = False  # the four parts of a lean image, nothing more
        while held < PARTS:
            m = base + MSG_BYTES * held
            _init(m)
            if _recv(m, sock, DONTWAIT if held == 0 else 0) < 0:
                _close(m)
                result[ERRNO] = _errno()
                break
            held += 1
            part = _part(msgs, held - 1)
            more = _more(m) != 0
            total += part.shape[0]
            if total > max_bytes:
                break
            if held == 1:
                frame = match(part, 0, part.shape[0], dimage[0], dimage[1]) if more else -1
                if frame < 0 or frame > MAX_FRAME_ID or frame >= frame_limit:
                    break
            elif held == 2:
                size = match(part, 0, part.shape[0], image_d[0], image_d[1]) if more else -1
                if size < 12:
                    break
            elif held == 3:
                if not more or part.shape[0] != size or not part[:12].any():
                    break  # a zeroed bslz4 header: the decoder rewrites it
            elif more or match(part, 0, part.shape[0], dconfig[0], dconfig[1]) < 0:
                break
            else:
                whole = True
        if not whole or not tap_room(tap, result[LEAN], size):
            result[HELD] = held
            return
        blob = _part(msgs, 2)
        if not fold_blob(blob, 0, blob.shape[0], element_size, scratch, frame - index_offset,
                         k, vals, cum):  # fmt: skip
            result[HELD] = held  # the full decoder counts it
            return
        tap_put(tap, result[LEAN], blob, 0, blob.shape[0], frame)
        for p in range(PARTS):
            _close(base + MSG_BYTES * p)
        result[LEAN] += 1
        result[LAST_FRAME] = frame


@numba.njit(nogil=True, cache=True)
def drain_v2(sock: int, msgs: np.ndarray, max_messages: int, image: Template, frame_limit: int,
             index_offset: int, element_size: int, scratch: np.ndarray, k: tuple, tap: tuple,
             result: np.ndarray) -> None:  # fmt: skip
    """`drain_v1` for DECTRIS stream V2: one-part CBOR image messages that match the series'
    `cbor_template`, the image id below `frame_limit`, the blob one bslz4 frame."""
    vals, cum = fold_buffers(k)
    result[:] = 0
    result[LAST_FRAME] = -1
    m = msgs.ctypes.data
    while result[LEAN] < max_messages:
        _init(m)
        if _recv(m, sock, DONTWAIT) < 0:
            _close(m)
            result[ERRNO] = _errno()
            return
        part = _part(msgs, 0)
        image_id, start, length = cbor_match(part, 0, part.shape[0], image[0], image[1])
        if (_more(m) != 0 or image_id < 0 or image_id >= frame_limit
                or not tap_room(tap, result[LEAN], length)
                or not fold_blob(part, start, start + length, element_size, scratch,
                                 image_id - index_offset, k, vals, cum)):  # fmt: skip
            result[HELD] = 1  # the decoder reads it (and the rest of a multipart message)
            return
        tap_put(tap, result[LEAN], part, start, start + length, image_id)
        _close(m)
        result[LEAN] += 1
        result[LAST_FRAME] = image_id


@dataclass(frozen=True)
class LaneTarget:
    """Where `drain` folds: a series' learned templates (V1: dimage, dimage_d, dconfig; V2:
    the image message) and its accumulate kernel arguments."""

    templates: tuple[Template, ...]
    frame_limit: int  # frame ids from here on go to the decoder (index_out_of_range)
    index_offset: int
    element_size: int
    scratch: np.ndarray  # one decompressed frame
    kernel_args: tuple
    tap: tuple = (np.zeros(0, np.uint8), np.zeros(1, np.int64), np.zeros(0, np.int64))  # none


class Lane:
    """The compiled lane on one pyzmq socket (used from the thread that owns the socket)."""

    def __init__(self, sock: zmq.Socket):
        self.lib = bind_libzmq()
        self.sock = sock
        self.msgs = np.zeros((PARTS, MSG_BYTES // 8), np.int64)
        self.result = np.zeros(4, np.int64)

    @property
    def available(self) -> bool:
        return self.lib is not None

    def drain(self, target: LaneTarget, max_messages: int,
              max_bytes: int) -> tuple[int, int, list, str | None]:  # fmt: skip
        """Fold up to `max_messages` image messages: (messages folded, the last one's frame id,
        the parts of the message the lane stopped at, for the decoder: empty when none, why
        that message was released unread: over `max_bytes` or MAX_MESSAGE_PARTS, as
        `recv_capped`). The parts are the whole message (its rest is received here)."""
        r, t = self.result, target
        if len(t.templates) == PARTS - 1:  # V1: the three JSON parts
            drain_v1(self.sock.underlying, self.msgs, max_messages, max_bytes, *t.templates,
                     t.frame_limit, t.index_offset, t.element_size, t.scratch, t.kernel_args,
                     t.tap, r)  # fmt: skip
        else:
            drain_v2(self.sock.underlying, self.msgs, max_messages, t.templates[0],
                     t.frame_limit, t.index_offset, t.element_size, t.scratch, t.kernel_args,
                     t.tap, r)  # fmt: skip
        parts, more, total = [], False, 0
        for p in range(int(r[HELD])):
            m = self.msgs.ctypes.data + MSG_BYTES * p
            size = self.lib.zmq_msg_size(m)
            total += size
            if total <= max_bytes:
                parts.append(ctypes.string_at(self.lib.zmq_msg_data(m), size) if size else b"")
            more = self.lib.zmq_msg_more(m) != 0
            self.lib.zmq_msg_close(m)
        count = int(r[HELD])
        while more:  # libzmq delivers a message whole: the rest is queued
            try:
                frame = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:  # (never seen) the decoder gets what there is, and says so
                break
            total, count, more = total + len(frame), count + 1, frame.more
            if total <= max_bytes and count <= MAX_MESSAGE_PARTS:
                parts.append(frame.buffer)
        oversized = None
        if total > max_bytes or count > MAX_MESSAGE_PARTS:
            parts, oversized = [], (f"message of {count} parts, {total} bytes (cap "
                                    f"{MAX_MESSAGE_PARTS} parts, {max_bytes} bytes)")  # fmt: skip
        return int(r[LEAN]), int(r[LAST_FRAME]), parts, oversized
