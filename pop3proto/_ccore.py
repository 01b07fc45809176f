"""The compiled core: the C twin of ``_purecore`` through cffi.

Same functions, signatures, results and exceptions as ``_purecore`` (see its
docstring for the contract); importing this module fails with ``ImportError``
when the extension was not built. Each function makes one C call per buffer
(two for a listing that needs more room), and releases the buffer it borrowed
from the caller before returning, so a ``bytearray`` may be resized right
after. The functions may be called from several threads at once.
"""

from __future__ import annotations

from typing import Any

from ._cspeedups import ffi, lib
from ._purecore import SKIP_LF, Buffer, ListingError

__all__ = ["ListingError", "parse_listing", "stuff", "unstuff"]

_DONE = lib.P3_DONE
_AT_LINE_START = lib.P3_AT_LINE_START
_COPIED = lib.P3_COPIED
_EMPTY = lib.P3_EMPTY
_TERM_SHIFT = lib.P3_TERM_SHIFT
_STATE_SHIFT = lib.P3_STATE_SHIFT
_STOP_SHIFT = lib.P3_STOP_SHIFT
_LEN_SHIFT = lib.P3_LEN_SHIFT

_REASONS = (
    "",
    "expected a decimal number",
    "number too long",
    "number too large",
    "message number 0",
    "expected a space after the message number",
    "junk after the size",
    "empty unique-id",
    "unique-id longer than 70 octets",
    "unique-id has an invalid octet",
    "too many listing entries",
)

# Output arrays are written before they are read: skip zero-filling them.
_alloc = ffi.new_allocator(should_clear_after_alloc=False)
_new = ffi.new
_from_buffer = ffi.from_buffer
_release = ffi.release
_unpack = ffi.unpack  # on a char array it makes bytes: one copy
_buffer = ffi.buffer
_NULL = ffi.NULL
_c_unstuff = lib.p3_unstuff
_c_stuff = lib.p3_stuff
_c_parse_listing = lib.p3_parse_listing

# Scratch output buffers, reused: a fresh allocation per call costs page
# faults that show at receive-buffer sizes. A call pops one (list.pop and
# append are atomic, so threads and re-entrant calls each get their own) and
# puts it back when done; buffers above _SCRATCH_MAX are not kept.
_SCRATCH_MIN = 64 * 1024
_SCRATCH_MAX = 1 << 20
# (output buffer, its size, a uint64_t[1] for a length)
_Scratch = tuple[Any, int, Any]
_scratch_pool: list[_Scratch] = []


def _new_scratch(size: int) -> _Scratch:
    """A new scratch of at least ``size`` bytes. (The functions below pop a
    pooled one first, inline: that is their hot path.)"""
    if size > _SCRATCH_MAX:
        return _alloc("char[]", size), size, _new("uint64_t[1]")  # used once
    # Round up to a power of two, so a growing buffer reallocates rarely.
    size = max(1 << (size - 1).bit_length(), _SCRATCH_MIN)
    return _alloc("char[]", size), size, _new("uint64_t[1]")


def _check_range(size: int, start: int, end: int) -> None:
    if start < 0 or end > size:
        raise IndexError(f"range {start}:{end} is outside a buffer of {size} bytes")


def unstuff(
    buf: Buffer, start: int, end: int, at_line_start: bool
) -> tuple[bytes, int, bool, bool]:
    """Un-stuff ``buf[start:end]``; see ``_purecore`` for the contract."""
    if start >= end:
        return b"", start, False, at_line_start
    # cffi hands a bytes object to C without copying it; anything else is
    # borrowed (and so locked against resizing) until released below.
    borrowed = None if type(buf) is bytes else _from_buffer(buf)
    try:
        cbuf = buf if borrowed is None else borrowed
        if start < 0 or end > len(cbuf):
            _check_range(len(cbuf), start, end)
        try:
            scratch = _scratch_pool.pop()
            if scratch[1] < end - start:
                scratch = _new_scratch(end - start)
        except IndexError:
            scratch = _new_scratch(end - start)
        out, size, out_len = scratch
        r = _c_unstuff(cbuf, start, end, at_line_start, out, out_len)
        if r & _COPIED:
            data = _unpack(out, out_len[0])
        elif borrowed is None:
            # No dot dropped: the data is a slice of the input.
            data = buf[start : (r >> _STOP_SHIFT) - (r >> _TERM_SHIFT & 3)]
        else:
            data = _unpack(borrowed + start, (r >> _STOP_SHIFT) - (r >> _TERM_SHIFT & 3) - start)
        if size <= _SCRATCH_MAX:
            _scratch_pool.append(scratch)
    finally:
        if borrowed is not None:
            _release(borrowed)
    return data, r >> _STOP_SHIFT, (r & _DONE) != 0, (r & _AT_LINE_START) != 0


def stuff(data: Buffer, state: int, dots: bool = True) -> tuple[bytes, int]:
    """Stuff one chunk of a message; see ``_purecore`` for the contract."""
    if not data:
        return b"", state
    borrowed = None if type(data) is bytes else _from_buffer(data)
    try:
        cbuf = data if borrowed is None else borrowed
        n = len(cbuf)
        # Each input byte yields at most two output bytes.
        try:
            scratch = _scratch_pool.pop()
            if scratch[1] < 2 * n:
                scratch = _new_scratch(2 * n)
        except IndexError:
            scratch = _new_scratch(2 * n)
        out = scratch[0]
        # Only the two flags matter to C; the state passes through otherwise.
        r = _c_stuff(cbuf, n, state & 3, dots, out)
        if r & _EMPTY:
            result = b""
            state &= ~SKIP_LF
        elif r & _COPIED:
            result = _unpack(out, r >> _LEN_SHIFT)
        elif type(data) is bytes:
            result = data  # unchanged: no copy
        else:
            result = _unpack(borrowed, n)
        if scratch[1] <= _SCRATCH_MAX:
            _scratch_pool.append(scratch)
    finally:
        if borrowed is not None:
            _release(borrowed)
    if r & _EMPTY:
        return result, state
    return result, r >> _STATE_SHIFT & 3


def parse_listing(
    buf: Buffer, start: int, end: int, numeric: bool, max_entries: int
) -> tuple[list[int], list[int] | list[bytes], int, bool]:
    """Parse the complete lines of a LIST/UIDL listing; see ``_purecore``."""
    if start >= end:
        return [], [], start, False
    borrowed = None if type(buf) is bytes else _from_buffer(buf)
    try:
        cbuf = buf if borrowed is None else borrowed
        _check_range(len(cbuf), start, end)
        # An entry takes at least 4 bytes ("1 1\n"): that bounds the arrays.
        limit = max(0, min(max_entries, (end - start) // 4 + 1))
        res = _new("uint64_t[5]")
        msgs = _alloc("uint64_t[]", limit)
        if numeric:
            values = _alloc("uint64_t[]", limit)
            uids = _NULL
        else:
            values = _NULL
            uids = _alloc("char[]", end - start)
        err = _c_parse_listing(cbuf, start, end, numeric, limit, msgs, values, uids, res)
        if err:
            raise ListingError(_REASONS[err], res[3])
        count = res[0]
        # Through a 'Q' memoryview: the fastest way found to a list of ints.
        msg_list: list[int] = memoryview(_buffer(msgs, 8 * count)).cast("Q").tolist()
        value_list: list[int] | list[bytes]
        if numeric:
            value_list = memoryview(_buffer(values, 8 * count)).cast("Q").tolist()
        else:
            # The UIDs were written one after another, each ending in LF.
            value_list = _unpack(uids, res[4]).split(b"\n")
            value_list.pop()
        stop = res[1]
        done = res[2] != 0
    finally:
        if borrowed is not None:
            _release(borrowed)
    return msg_list, value_list, stop, done
