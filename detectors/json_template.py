"""Flat JSON templates: read the one changing integer of a JSON part laid out like an earlier
one, in numba, without building Python objects (the lean DECTRIS V1 image path, issue 14).

A template is learned from a fully parsed part: a flat JSON object whose keys are plain text.
A part *matches* when it is a JSON object with the same keys in the same order, each value
either the learned one (`LITERAL`: the fields a decoder relies on, e.g. "htype", "shape"; byte
for byte, but for whitespace inside a list of integers), a JSON integer (`CAPTURED`: the one
per-frame number read, e.g. "frame", "size") or
any JSON scalar (`ANY`: times, hashes), with any JSON whitespace between tokens. Strings have
no escapes (printable ASCII but '"' and '\\', at most MAX_STRING bytes), numbers follow the JSON
grammar with bounded digits. A matching part is therefore valid JSON carrying exactly what the
full parse would read; anything else (another layout, an escape, a nested value) does not match
and takes the full parse. `match` is called from Python and from the ingest kernel
(`stream.fast_lane`).

A template is two arrays: `text` (uint8, keys and literal values back to back) and `prog`
(int64: the number of keys, then per key its kind, key start, key length, literal start,
literal length).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numba
import numpy as np

ANY, LITERAL, CAPTURED = 0, 1, 2
MAX_STRING = 256
MAX_INT_DIGITS = 18  # a captured integer stays below 10**18
MAX_JSON_BYTES = 1 << 20  # a longer part is no JSON part (the full parse's rule too)
NO_MATCH = -1
Template = tuple[np.ndarray, np.ndarray]  # (text, prog)
_PLAIN = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\x7e]{0,256}")  # printable ASCII, no '"' or '\'
_TRUE, _FALSE, _NULL = (np.frombuffer(w, np.uint8) for w in (b"true", b"false", b"null"))
_LIST_OF_INTS = re.compile(rb"\[-?[0-9]{1,18}(,-?[0-9]{1,18}){0,15}\]")


def _literal_text(value: Any) -> bytes | None:
    """The compact JSON text of a value a template can hold as LITERAL, else None."""
    text = json.dumps(value, separators=(",", ":")).encode()
    if type(value) is int or (isinstance(value, str) and _PLAIN.fullmatch(value.encode())):
        return text
    if isinstance(value, list) and _LIST_OF_INTS.fullmatch(text):
        return text
    return None


def learn(part: Any, literal: frozenset, captured: frozenset) -> Template | None:
    """The template (text, prog) of parts laid out as `part`, or None when `part` is not a flat
    JSON object with plain keys, each once, a JSON integer for each `captured` key (at most
    one), a LITERAL-able value for each `literal` key and a scalar everywhere else."""
    raw = bytes(memoryview(part))
    try:
        pairs = json.loads(raw, object_pairs_hook=list)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if (not isinstance(pairs, list) or len({k for k, _ in pairs}) != len(pairs)
            or len(captured) > 1 or not captured <= {k for k, _ in pairs}):  # fmt: skip
        return None
    text, prog = bytearray(), [len(pairs)]
    for key, value in pairs:
        k = key.encode()
        if not _PLAIN.fullmatch(k):
            return None
        lit = b""
        if key in captured:
            if type(value) is not int or not 0 <= value < 10**MAX_INT_DIGITS:
                return None
            kind = CAPTURED
        elif key in literal:
            lit = _literal_text(value)
            if lit is None:
                return None
            kind = LITERAL
        elif value is None or isinstance(value, bool | int | float | str):
            kind = ANY
        else:
            return None
        prog += [kind, len(text), len(k)]
        text += k
        prog += [len(text), len(lit)]
        text += lit
    return np.frombuffer(bytes(text) or b"\0", np.uint8).copy(), np.array(prog, np.int64)


@numba.njit(nogil=True, cache=True, inline="always")
def _ws(s: np.ndarray, i: int, n: int) -> int:
    while i < n and (s[i] == 32 or s[i] == 9 or s[i] == 10 or s[i] == 13):
        i += 1
    return i


@numba.njit(nogil=True, cache=True)
def _digits(s: np.ndarray, i: int, n: int, most: int) -> int:
    """The end of a run of 1..most decimal digits at `i`, or -1."""
    j = i
    while j < n and j - i <= most and 48 <= s[j] <= 57:
        j += 1
    return j if 0 < j - i <= most else -1


@numba.njit(nogil=True, cache=True)
def _word(s: np.ndarray, i: int, n: int, word: np.ndarray) -> int:
    """The end of `word` at `i`, or -1."""
    m = word.shape[0]
    if i + m > n:
        return -1
    for k in range(m):
        if s[i + k] != word[k]:
            return -1
    return i + m


@numba.njit(nogil=True, cache=True)
def _scalar(s: np.ndarray, i: int, n: int) -> int:
    """The end of the JSON scalar at `i` (plain string, number, true/false/null), or -1."""
    if i >= n:
        return -1
    c = s[i]
    if c == 34:  # '"'
        j = i + 1
        while j < n and j - i <= MAX_STRING and s[j] != 34:
            if s[j] < 32 or s[j] > 126 or s[j] == 92:  # control, non-ASCII or '\'
                return -1
            j += 1
        return j + 1 if j < n and s[j] == 34 else -1
    if c == 116:  # 't'
        return _word(s, i, n, _TRUE)
    if c == 102:  # 'f'
        return _word(s, i, n, _FALSE)
    if c == 110:  # 'n'
        return _word(s, i, n, _NULL)
    j = i + 1 if c == 45 else i  # '-'
    if j < n and s[j] == 48:  # '0' stands alone
        j += 1
    else:
        j = _digits(s, j, n, 30)
        if j < 0:
            return -1
    if j < n and s[j] == 46:  # '.'
        j = _digits(s, j + 1, n, 30)
        if j < 0:
            return -1
    if j < n and (s[j] == 101 or s[j] == 69):  # 'e' / 'E'
        j += 1
        if j < n and (s[j] == 43 or s[j] == 45):
            j += 1
        j = _digits(s, j, n, 3)
    return j


@numba.njit(nogil=True, cache=True)
def _literal(s: np.ndarray, i: int, n: int, text: np.ndarray, l0: int, ln: int) -> int:
    """The end of the literal `text[l0:l0 + ln]` at `i` (a list of integers may have
    whitespace around its items), or -1."""
    is_list = ln > 0 and text[l0] == 91  # '['
    for k in range(ln):
        c = text[l0 + k]
        if is_list and k > 0 and (c == 44 or c == 93 or text[l0 + k - 1] == 44
                                  or text[l0 + k - 1] == 91):  # fmt: skip
            i = _ws(s, i, n)  # around '[', ',' and ']'
        if i >= n or s[i] != c:
            return -1
        i += 1
    return i


@numba.njit(nogil=True, cache=True)
def match(s: np.ndarray, start: int, stop: int, text: np.ndarray, prog: np.ndarray) -> int:
    """The captured integer of the JSON part `s[start:stop]` (0 when the template captures
    none) if it matches the template (see the module), else NO_MATCH. A part begins with its
    '{' and has at most MAX_JSON_BYTES, as the full parse wants (`dectris_v1_fields.json_part`)."""
    n = stop
    if stop - start > MAX_JSON_BYTES or start >= stop or s[start] != 123:  # '{'
        return NO_MATCH
    i = start + 1
    value = 0
    for f in range(prog[0]):
        p = 1 + 5 * f
        kind, k0, kn, l0, ln = prog[p], prog[p + 1], prog[p + 2], prog[p + 3], prog[p + 4]
        i = _ws(s, i, n)
        if f > 0:
            if i >= n or s[i] != 44:  # ','
                return NO_MATCH
            i = _ws(s, i + 1, n)
        if i + kn + 2 > n or s[i] != 34 or s[i + kn + 1] != 34:
            return NO_MATCH
        for k in range(kn):
            if s[i + 1 + k] != text[k0 + k]:
                return NO_MATCH
        i = _ws(s, i + kn + 2, n)
        if i >= n or s[i] != 58:  # ':'
            return NO_MATCH
        i = _ws(s, i + 1, n)
        if kind == LITERAL:
            i = _literal(s, i, n, text, l0, ln)
            if i < 0:
                return NO_MATCH
        elif kind == CAPTURED:
            if i < n and s[i] == 48:  # '0'
                j = i + 1
            else:
                j = _digits(s, i, n, MAX_INT_DIGITS)
                if j < 0:
                    return NO_MATCH
            value = 0
            for k in range(i, j):
                value = value * 10 + (s[k] - 48)
            i = j
        else:
            i = _scalar(s, i, n)
            if i < 0:
                return NO_MATCH
    i = _ws(s, i, n)
    if i >= n or s[i] != 125:  # '}'
        return NO_MATCH
    return value if _ws(s, i + 1, n) == n else NO_MATCH


def match_part(part: Any, template: Template) -> int:
    """`match` for one part (bytes-like)."""
    s = np.frombuffer(part, np.uint8)
    return match(s, 0, s.shape[0], *template)
