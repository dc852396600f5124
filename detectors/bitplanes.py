"""The bitshuffle transform in numba: 8x8 bit-matrix transposes of uint64 words, not bit loops.

One block of `n` elements (`n` a multiple of 8) of `s` bytes is `8 s` bit rows of `n / 8`
bytes: bit `k` of byte `j` of element `e` sits at bit `e % 8` of byte `e // 8` of row `8 j + k`
(as `bitshuffle` and `dectris-compression` lay it out; tests/test_compression.py compares them
bit for bit). Also the unaligned 8-byte loads/stores and the memcpy these kernels and the
portable LZ4 decoder (`bslz4`) need, as numba intrinsics.
"""

from __future__ import annotations

import sys

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_U64 = numba.uint64


@intrinsic
def memcpy(typingctx, dst, dst_at, src, src_at, n):
    """memcpy(&dst[dst_at], &src[src_at], n) for uint8 arrays (the ranges must not overlap)."""
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        d, da, sr, sa, count = args
        to = builder.gep(context.make_array(signature.args[0])(context, builder, d).data, [da])
        frm = builder.gep(context.make_array(signature.args[2])(context, builder, sr).data, [sa])
        cgutils.raw_memcpy(builder, to, frm, count, 1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def load64(typingctx, arr, at):
    """The 8 bytes `arr[at:at + 8]` of a uint8 array as one little-endian uint64 (unaligned)."""
    sig = types.uint64(arr, types.intp)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())
        value = builder.load(ptr, align=1)
        if sys.byteorder == "big":
            value = builder.call(builder.module.declare_intrinsic("llvm.bswap", [value.type]),
                                 [value])  # fmt: skip
        return value

    return sig, codegen


@intrinsic
def store64(typingctx, arr, at, value):
    """`arr[at:at + 8]` = the little-endian bytes of the uint64 `value` (unaligned)."""
    sig = types.void(arr, types.intp, types.uint64)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())
        value = args[2]
        if sys.byteorder == "big":
            value = builder.call(builder.module.declare_intrinsic("llvm.bswap", [value.type]),
                                 [value])  # fmt: skip
        builder.store(value, ptr, align=1)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True, inline="always")
def _transpose8(x: np.uint64) -> np.uint64:
    """Transpose the 8x8 bit matrix in `x` (row r = byte r, column c = bit c)."""
    t = (x ^ (x >> _U64(7))) & _U64(0x00AA00AA00AA00AA)
    x = x ^ t ^ (t << _U64(7))
    t = (x ^ (x >> _U64(14))) & _U64(0x0000CCCC0000CCCC)
    x = x ^ t ^ (t << _U64(14))
    t = (x ^ (x >> _U64(28))) & _U64(0x00000000F0F0F0F0)
    return x ^ t ^ (t << _U64(28))


@numba.njit(nogil=True, cache=True, inline="always")
def _swap(a: np.uint64, b: np.uint64, shift: int, mask: int) -> tuple:
    t = ((a >> _U64(shift)) ^ b) & _U64(mask)
    return a ^ (t << _U64(shift)), b ^ t


@numba.njit(nogil=True, cache=True, inline="always")
def _transpose_bytes(w0, w1, w2, w3, w4, w5, w6, w7) -> tuple:
    """Transpose the 8x8 byte matrix whose row r is word r (column c = byte c)."""
    w0, w4 = _swap(w0, w4, 32, 0x00000000FFFFFFFF)
    w1, w5 = _swap(w1, w5, 32, 0x00000000FFFFFFFF)
    w2, w6 = _swap(w2, w6, 32, 0x00000000FFFFFFFF)
    w3, w7 = _swap(w3, w7, 32, 0x00000000FFFFFFFF)
    w0, w2 = _swap(w0, w2, 16, 0x0000FFFF0000FFFF)
    w1, w3 = _swap(w1, w3, 16, 0x0000FFFF0000FFFF)
    w4, w6 = _swap(w4, w6, 16, 0x0000FFFF0000FFFF)
    w5, w7 = _swap(w5, w7, 16, 0x0000FFFF0000FFFF)
    w0, w1 = _swap(w0, w1, 8, 0x00FF00FF00FF00FF)
    w2, w3 = _swap(w2, w3, 8, 0x00FF00FF00FF00FF)
    w4, w5 = _swap(w4, w5, 8, 0x00FF00FF00FF00FF)
    w6, w7 = _swap(w6, w7, 8, 0x00FF00FF00FF00FF)
    return w0, w1, w2, w3, w4, w5, w6, w7


@numba.njit(nogil=True, cache=True, inline="always")
def _spread(v: np.uint64, bits: int) -> np.uint64:
    """The four `bits`-wide lanes of the low 32 bits of `v` (bits 8: bytes, 16: halves) moved
    to every other lane of a uint64, zeros between."""
    v &= _U64(0xFFFFFFFF)
    if bits == 8:
        v = (v | (v << _U64(16))) & _U64(0x0000FFFF0000FFFF)
        return (v | (v << _U64(8))) & _U64(0x00FF00FF00FF00FF)
    return (v | (v << _U64(16))) & _U64(0x0000FFFF0000FFFF)


@numba.njit(nogil=True, cache=True, inline="always")
def _zip(a: np.uint64, b: np.uint64, bits: int) -> tuple:
    """Interleave the `bits`-wide lanes of `a` and `b` (a's first): two words."""
    lo = _spread(a, bits) | (_spread(b, bits) << _U64(bits))
    hi = _spread(a >> _U64(32), bits) | (_spread(b >> _U64(32), bits) << _U64(bits))
    return lo, hi


@numba.njit(nogil=True, cache=True)
def bitunshuffle(src: np.ndarray, s0: int, dst: np.ndarray, d0: int, n: int, size: int) -> None:
    """Undo the bitshuffle of `n` elements (a multiple of 8) of `size` bytes: the shuffled
    block `src[s0:s0 + n * size]` into the element bytes `dst[d0:d0 + n * size]`. Per 8
    elements and byte j: the 8 bit rows' bytes, bit-transposed into byte j of each element;
    eight rows are read 8 bytes at a time (64 elements) and byte-transposed first, all-zero
    words (most bit planes of sparse frames) skipped; bytes of one element are interleaved in
    registers and written 8 at a time."""
    row = n // 8  # bytes per bit row
    x = np.zeros(8 * size, np.uint64)  # [t * size + j]: byte j of elements 8 (i + t) .. + 7
    i = 0
    while i < row:
        group = min(8, row - i)
        for j in range(size):
            base = s0 + 8 * j * row + i
            if group == 8:
                w = (load64(src, base), load64(src, base + row),
                     load64(src, base + 2 * row), load64(src, base + 3 * row),
                     load64(src, base + 4 * row), load64(src, base + 5 * row),
                     load64(src, base + 6 * row), load64(src, base + 7 * row))  # fmt: skip
                if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) == 0:
                    for t in range(8):
                        x[t * size + j] = 0
                    continue
                y = _transpose_bytes(w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7])
                for t in range(8):
                    x[t * size + j] = _transpose8(y[t])
            else:  # fewer than 8 bytes per row left
                for t in range(group):
                    v = _U64(0)
                    for k in range(8):
                        v |= _U64(src[base + k * row + t]) << _U64(8 * k)
                    x[t * size + j] = _transpose8(v)
        for t in range(group):
            at = d0 + 8 * (i + t) * size
            if size == 1:
                store64(dst, at, x[t * size + 0])
            elif size == 2:
                lo, hi = _zip(x[t * size + 0], x[t * size + 1], 8)
                store64(dst, at, lo)
                store64(dst, at + 8, hi)
            else:
                a0, a1 = _zip(x[t * size + 0], x[t * size + 1], 8)  # elements 0-3, 4-7: bytes 0, 1
                b0, b1 = _zip(x[t * size + 2], x[t * size + 3], 8)  # bytes 2, 3
                lo, hi = _zip(a0, b0, 16)
                store64(dst, at, lo)
                store64(dst, at + 8, hi)
                lo, hi = _zip(a1, b1, 16)
                store64(dst, at + 16, lo)
                store64(dst, at + 24, hi)
        i += group


@numba.njit(nogil=True, cache=True)
def bitshuffle(src: np.ndarray, s0: int, dst: np.ndarray, d0: int, n: int, size: int) -> None:
    """The bitshuffle of `n` elements (a multiple of 8) of `size` bytes, `src[s0:]` (element
    bytes) into `dst[d0:]` (bit rows); the inverse of `bitunshuffle`."""
    row = n // 8
    x = np.empty(8, np.uint64)
    for j in range(size):
        base = d0 + 8 * j * row
        i = 0
        while i + 8 <= row:
            for t in range(8):
                x[t] = _transpose8(_gather(src, s0 + 8 * (i + t) * size + j, size))
            w = _transpose_bytes(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7])
            for k in range(8):
                store64(dst, base + k * row + i, w[k])
            i += 8
        for r in range(i, row):  # fewer than 8 bytes per row left
            v = _transpose8(_gather(src, s0 + 8 * r * size + j, size))
            for k in range(8):
                dst[base + k * row + r] = np.uint8((v >> _U64(8 * k)) & _U64(0xFF))


@numba.njit(nogil=True, cache=True, inline="always")
def _gather(src: np.ndarray, at: int, size: int) -> np.uint64:
    """Byte b = src[at + b * size] (one byte of 8 consecutive elements)."""
    if size == 1:
        return load64(src, at)
    x = _U64(0)
    for b in range(8):
        x |= _U64(src[at + b * size]) << _U64(8 * b)
    return x
