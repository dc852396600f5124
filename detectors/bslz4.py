"""Portable bitshuffle/LZ4 codec in numba, for when the C libraries are not installed.

`dectris-compression` (source only: every install compiles it) and `bitshuffle` (few wheels)
are optional (`pip install "tcbf-live[fast]"`); this module decodes and encodes the same blobs
with numba and the `lz4` package, which have wheels everywhere. `compression` picks it when the
C libraries are missing; the formats are described there.

- `lz4_block_into`: one LZ4 *block* (the raw format, no frame), every read and write bounds
  checked; follows the rules of the reference decoder (`LZ4_decompress_safe`): the last
  sequence is literals only and ends the input exactly, the last 5 output bytes are literals,
  a match never reaches before the output start. Malformed input returns False.
- the bitshuffle transform itself: `bitplanes`.
- `bslz4_into` / `lz4_into`: a whole framed blob into a caller's buffer (numba, callable from
  kernels); `compress_bslz4`: the encoder (numba bitshuffle, then `lz4.block.compress`).
"""

from __future__ import annotations

import struct

import lz4.block
import numba
import numpy as np

from tcbf_live.detectors.bitplanes import bitshuffle, bitunshuffle, memcpy

HEADER = struct.Struct(">QI")
LENGTH = struct.Struct(">I")
MAX_BLOCK_BYTES = 1 << 24
MFLIMIT = 12  # LZ4: a match may not start within the last 12 bytes of a block ...
LASTLITERALS = 5  # ... and the last 5 bytes are always literals

@numba.njit(nogil=True, cache=True)
def _copy(dst: np.ndarray, to: int, src: np.ndarray, frm: int, n: int) -> None:
    """dst[to:to + n] = src[frm:frm + n], ranges in bounds and not overlapping (callers check)."""
    if n > 0:
        memcpy(dst, to, src, frm, n)


@numba.njit(nogil=True, cache=True)
def lz4_block_into(src: np.ndarray, ip: int, iend: int, dst: np.ndarray, op: int,
                   oend: int) -> bool:  # fmt: skip
    """Decode the LZ4 block `src[ip:iend]` into exactly `dst[op:oend]`; False (having written
    nothing outside `dst[op:oend]`) for input that is malformed or decodes to another size.
    The caller guarantees 0 <= ip <= iend <= len(src) and 0 <= op <= oend <= len(dst)."""
    lowest = op
    if iend - ip < 1:
        return False
    while True:
        if ip >= iend:
            return False
        token = np.int64(src[ip])
        ip += 1
        length = token >> 4
        if length == 15:
            while True:
                if ip >= iend:
                    return False
                s = np.int64(src[ip])
                ip += 1
                length += s
                if s != 255:
                    break
        # literals; near either end they must be the last sequence, consuming all input
        if op + length > oend - MFLIMIT or ip + length > iend - (2 + 1 + LASTLITERALS):
            if ip + length != iend or op + length > oend:
                return False
            _copy(dst, op, src, ip, length)
            return op + length == oend
        _copy(dst, op, src, ip, length)
        op += length
        ip += length
        offset = np.int64(src[ip]) | (np.int64(src[ip + 1]) << 8)  # ip + 2 <= iend - 6
        ip += 2
        if offset == 0 or offset > op - lowest:
            return False
        length = token & 15  # the literal-length loop again: a shared inlined helper
        if length == 15:  # returning (length, ip) cost 45 % of the decode time (8.7 -> 12.8 us)
            while True:
                if ip >= iend - LASTLITERALS:
                    return False
                s = np.int64(src[ip])
                ip += 1
                length += s
                if s != 255:
                    break
        length += 4
        if op + length > oend - LASTLITERALS:
            return False
        m = op - offset
        while length > 0:  # the source region [m, op) repeats with period `offset`
            chunk = min(op - m, length)
            _copy(dst, op, dst, m, chunk)
            op += chunk
            length -= chunk


@numba.njit(nogil=True, cache=True)
def _be(blob: np.ndarray, at: int, nbytes: int) -> int:
    v = 0
    for k in range(nbytes):
        v = (v << 8) | np.int64(blob[at + k])
    return v


@numba.njit(nogil=True, cache=True)
def frame_into(blob: np.ndarray, start: int, stop: int, out: np.ndarray, block: int,
               size: int, scratch: np.ndarray) -> bool:  # fmt: skip
    """The blocks of a framed blob `blob[start:stop]` (after the 12-byte header) into the bytes
    `out`. `size` > 0: bslz4 of `size`-byte elements (blocks of `block` bytes, the last rounded
    down to whole groups of 8 elements, the rest stored raw at the end), each unshuffled via
    `scratch` (>= `block` bytes). `size` == 0: plain LZ4 blocks (HDF5 LZ4 framing; a block
    whose stored length equals its size is stored raw)."""
    total = out.shape[0]
    ip = start + 12
    op = 0
    group = 8 * max(size, 1)
    while op < total:
        want = min(block, total - op)
        if size > 0:
            want -= want % group
            if want == 0:  # the last < 8 elements, stored raw
                if stop - ip != total - op:
                    return False
                _copy(out, op, blob, ip, total - op)
                return True
        if stop - ip < 4:
            return False
        n = _be(blob, ip, 4)
        ip += 4
        if n > stop - ip:
            return False
        if size == 0:
            if n == want:
                _copy(out, op, blob, ip, n)
            elif not lz4_block_into(blob, ip, ip + n, out, op, op + want):
                return False
        else:
            if not lz4_block_into(blob, ip, ip + n, scratch, 0, want):
                return False
            bitunshuffle(scratch, 0, out, op, want // size, size)
        ip += n
        op += want
    return ip == stop


@numba.njit(nogil=True, cache=True)
def _checked_block(blob: np.ndarray, start: int, stop: int, expected: int, size: int) -> int:
    """The header's block size, or -1 where the header does not fit a frame of `expected`
    bytes (the same checks as `compression._header`) or the blob is out of range."""
    n = stop - start
    if n < 12 or start < 0 or stop > blob.shape[0]:
        return -1
    block = _be(blob, start + 8, 4)
    if _be(blob, start, 8) != expected or block == 0 or block > MAX_BLOCK_BYTES:
        return -1
    if n > expected + expected // 255 + 16 * (expected // block + 2) + 64:
        return -1
    if size > 0 and block % (8 * size) != 0:
        return -1
    return block


@numba.njit(nogil=True, cache=True)
def bslz4_into(blob: np.ndarray, start: int, stop: int, out: np.ndarray, element_size: int) -> bool:
    """Decompress the bslz4 blob `blob[start:stop]` (uint8) into `out` (C-contiguous; its byte
    size is the frame's), like `compression.bslz4_into` over the C library. False for anything
    that does not decode to exactly `out.nbytes` bytes."""
    flat = out.reshape(out.size).view(np.uint8)
    if element_size not in (1, 2, 4):
        return False
    block = _checked_block(blob, start, stop, flat.shape[0], element_size)
    if block < 0:
        return False
    scratch = np.empty(min(block, flat.shape[0]), np.uint8)
    return frame_into(blob, start, stop, flat, block, element_size, scratch)


ENTRY_ERROR = np.uint64(2**64 - 1)  # dectris-compression's COMPRESSION_ERROR (SIZE_MAX)
ENTRY_SIGNATURE = numba.types.uintp(numba.types.intc, numba.types.voidptr, numba.types.uintp,
                                    numba.types.voidptr, numba.types.uintp, numba.types.uintp)


@numba.cfunc(ENTRY_SIGNATURE, nopython=True, cache=True)
def c_entry(algorithm, dst, dst_size, src, src_size, element_size):  # noqa: ANN001, ANN201
    """`bslz4_into` behind dectris-compression's C entry point `compression_decompress_buffer`
    (same signature; algorithm 0 = bslz4 only): bound to that symbol name where the library is
    missing, so kernels compiled against either call the one present (`compression`)."""
    if algorithm != 0:
        return ENTRY_ERROR
    n = np.int64(src_size)  # signed sizes: numba mixes uint64 and int64 into float64
    out = numba.carray(dst, np.int64(dst_size), np.uint8)
    blob = numba.carray(src, n, np.uint8)
    if bslz4_into(blob, 0, n, out, np.int64(element_size)):
        return dst_size
    return ENTRY_ERROR


@numba.njit(nogil=True, cache=True)
def lz4_into(blob: np.ndarray, out: np.ndarray) -> bool:
    """Decompress an HDF5-framed LZ4 blob (DECTRIS "lz4") into the uint8 array `out`."""
    block = _checked_block(blob, 0, blob.shape[0], out.shape[0], 0)
    if block < 0:
        return False
    return frame_into(blob, 0, blob.shape[0], out, block, 0, out[:0])


@numba.njit(nogil=True, cache=True)
def _shuffle_blocks(flat: np.ndarray, size: int, block: int) -> np.ndarray:
    """Every block of `flat` (element bytes) bitshuffled, in place of a copy; the tail after
    the last whole group of 8 elements is left as it is."""
    out = flat.copy()
    op = 0
    total = flat.shape[0]
    while op < total:
        want = min(block, total - op)
        want -= want % (8 * size)
        if want == 0:
            break
        bitshuffle(flat, op, out, op, want // size, size)
        op += want
    return out


def compress_bslz4(frame: np.ndarray, block_bytes: int = 8192) -> bytes:
    """bslz4 blob of one frame (header + bitshuffle/LZ4 blocks of `block_bytes`), without the
    `bitshuffle` library; decodes with `dectris-compression`, `bitshuffle` and `bslz4_into`."""
    flat = np.ascontiguousarray(frame).ravel()
    size = flat.itemsize
    if size not in (1, 2, 4) or block_bytes % (8 * size):
        raise ValueError(f"bslz4 needs 1-, 2- or 4-byte elements, blocks of 8 of them "
                         f"(got {size}, {block_bytes})")  # fmt: skip
    raw = flat.view(np.uint8)
    shuffled = _shuffle_blocks(raw, size, block_bytes)
    parts = [HEADER.pack(raw.nbytes, block_bytes)]
    total = raw.nbytes
    op = 0
    while op < total:
        want = min(block_bytes, total - op)
        want -= want % (8 * size)
        if want == 0:
            parts.append(shuffled[op:].tobytes())
            break
        packed = lz4.block.compress(shuffled[op:op + want], store_size=False)
        parts += [LENGTH.pack(len(packed)), packed]
        op += want
    return b"".join(parts)
