"""The pure-Python core: batch functions over whole buffers.

These are the hot loops of the engine. Each function works on a whole buffer
with ``bytes.find`` / ``bytes.replace`` (never a per-byte Python loop), and has
a byte-identical twin in the compiled core (``_ccore``). The interface is the
same for both, so the engine never knows which one it runs on:

``unstuff(buf, start, end, at_line_start) -> (data, stop, done, at_line_start)``
    Un-stuff the body of a multi-line response held in ``buf[start:end]``.
    ``data`` is the content with the stuffing dot removed from every line that
    began with ``.``; line ends are kept exactly as sent. ``stop`` is the index
    up to which ``buf`` was consumed. ``done`` says that the terminating line
    (``.`` followed by CRLF or a bare LF) was found and consumed. Bytes that
    cannot be decided yet (``.`` or ``.\\r`` at the very end of the buffer, at a
    line start) are left unconsumed for the next call. ``at_line_start`` carries
    over whether the next byte begins a line.

``stuff(data, state, dots) -> (out, state)``
    The sender's side: every line end (CRLF, bare LF, bare CR) becomes CRLF and,
    when ``dots`` is true, every line that begins with ``.`` gets another ``.``.
    ``state`` is a small integer of flags (``LINE_START``, ``SKIP_LF``) that
    carries over between chunks of one message; start with ``LINE_START``.
    With ``dots`` false the output is the CRLF form whose length is the message's
    POP3 size.

``parse_listing(buf, start, end, numeric, max_entries) -> (msgs, values, stop, done)``
    Split the complete lines of a LIST or UIDL listing in ``buf[start:end]``
    into message numbers and values (sizes when ``numeric``, otherwise UIDs as
    bytes). Stops after the terminating ``.`` line (``done``) or after the last
    complete line. Raises ``ListingError`` on a malformed line or when more than
    ``max_entries`` entries would be returned.
"""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview

LINE_START = 1
SKIP_LF = 2

#: The longest number accepted in a listing or status line, in digits.
MAX_DIGITS = 19
#: Largest value accepted for a message number or a size (2**63 - 1).
MAX_NUMBER = (1 << 63) - 1
#: RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
MAX_UID = 70

_DIGITS = frozenset(b"0123456789")
_WS = b" \t"
# RFC 1939 §7: the octets a unique-id may hold.
_UID_OCTETS = bytes(range(0x21, 0x7F))


class ListingError(ValueError):
    """A malformed LIST/UIDL listing line (or too many of them).

    ``offset`` is the index in the buffer where the offending line starts.
    """

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


def _check_range(size: int, start: int, end: int) -> None:
    if start < 0 or end > size:
        raise IndexError(f"range {start}:{end} is outside a buffer of {size} bytes")


def unstuff(
    buf: Buffer, start: int, end: int, at_line_start: bool
) -> tuple[bytes, int, bool, bool]:
    if start >= end:
        return b"", start, False, at_line_start
    _check_range(len(buf), start, end)
    if isinstance(buf, memoryview):
        # memoryview has no find(): work on a copy of the range.
        data, stop, done, line_start = unstuff(bytes(buf[start:end]), 0, end - start, at_line_start)
        return data, start + stop, done, line_start
    view = buf
    pieces: list[Buffer] = []
    pos = start  # first byte not yet emitted
    # A candidate is a "." at a line start: either at `pos` when the previous
    # chunk ended a line, or right after each "\n" found below.
    dot = start if at_line_start and view[start] == 0x2E else -1
    search = start
    while True:
        if dot < 0:
            nl = view.find(b"\n.", search, end)
            if nl < 0:
                break
            dot = nl + 1
        # view[dot] is a "." at the start of a line.
        after = dot + 1
        if after >= end:
            # "." at the end of the buffer: cannot decide yet.
            if dot > pos:
                pieces.append(view[pos:dot])
            return b"".join(pieces), dot, False, True
        c = view[after]
        if c == 0x0A:  # ".\n": terminator (tolerated bare LF)
            if dot > pos:
                pieces.append(view[pos:dot])
            return b"".join(pieces), after + 1, True, True
        if c == 0x0D:
            if after + 1 >= end:
                if dot > pos:
                    pieces.append(view[pos:dot])
                return b"".join(pieces), dot, False, True
            if view[after + 1] == 0x0A:  # ".\r\n": terminator
                if dot > pos:
                    pieces.append(view[pos:dot])
                return b"".join(pieces), after + 2, True, True
        # A stuffed line: drop the first dot.
        if dot > pos:
            pieces.append(view[pos:dot])
        pos = after
        search = after
        dot = -1
    if pos < end:
        pieces.append(view[pos:end])
    last = view[end - 1]
    return b"".join(pieces), end, False, last == 0x0A


def stuff(data: Buffer, state: int, dots: bool = True) -> tuple[bytes, int]:
    out = bytes(data)
    if state & SKIP_LF and out[:1] == b"\n":
        out = out[1:]
    if not out:
        return b"", state & ~SKIP_LF if data else state
    new_state = SKIP_LF if out[-1] == 0x0D else 0
    if b"\r" in out:
        out = out.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    out = out.replace(b"\n", b"\r\n")
    if dots:
        if state & LINE_START and out[0] == 0x2E:
            out = b"." + out.replace(b"\n.", b"\n..")
        else:
            out = out.replace(b"\n.", b"\n..")
    if out[-1] == 0x0A:
        new_state |= LINE_START
    return out, new_state


def stuff_end(state: int) -> bytes:
    """The bytes that close a stuffed body: a CRLF when the content lacked
    a final line end, then the terminating ``.`` line."""
    if state & LINE_START:
        return b".\r\n"
    return b"\r\n.\r\n"


def _number(line: bytes, i: int, end: int) -> tuple[int, int]:
    """Parse a decimal number at line[i:]; returns (value, index after it)."""
    j = i
    while j < end and line[j] in _DIGITS:
        j += 1
    if j == i:
        raise ValueError("expected a decimal number")
    if j - i > MAX_DIGITS:
        raise ValueError("number too long")
    value = int(line[i:j])
    if value > MAX_NUMBER:
        raise ValueError("number too large")
    return value, j


def _skip_ws(line: bytes, i: int, end: int) -> int:
    while i < end and line[i] in (0x20, 0x09):
        i += 1
    return i


def parse_line_entry(line: bytes, numeric: bool) -> tuple[int, int | bytes]:
    """Parse one listing entry ``msg SP value`` (no line end). Raises
    ``ValueError`` with a reason."""
    end = len(line)
    i = _skip_ws(line, 0, end)
    msg, i = _number(line, i, end)
    if msg == 0:
        raise ValueError("message number 0")
    j = _skip_ws(line, i, end)
    if j == i:
        raise ValueError("expected a space after the message number")
    if numeric:
        size, k = _number(line, j, end)
        if k < end and line[k] not in (0x20, 0x09):
            raise ValueError("junk after the size")
        # RFC 1939 §5: text after the size is allowed in a scan listing.
        return msg, size
    k = j
    while k < end and 0x21 <= line[k] <= 0x7E:
        k += 1
    if k == j:
        raise ValueError("empty unique-id")
    if k - j > MAX_UID:
        raise ValueError("unique-id longer than 70 octets")
    if _skip_ws(line, k, end) != end:
        raise ValueError("unique-id has an invalid octet")
    return msg, line[j:k]


def parse_listing(
    buf: Buffer, start: int, end: int, numeric: bool, max_entries: int
) -> tuple[list[int], list[int] | list[bytes], int, bool]:
    if start >= end:
        return [], [], start, False
    _check_range(len(buf), start, end)
    data = bytes(buf[start:end])
    last = data.rfind(b"\n")
    msgs: list[int] = []
    values: list = []  # type: ignore[type-arg]
    if last < 0:
        return msgs, values, start, False
    lines = data[: last + 1].split(b"\n")
    lines.pop()  # the empty piece after the last "\n"
    offset = 0
    for raw in lines:
        line = raw[:-1] if raw[-1:] == b"\r" else raw
        if line == b".":
            return msgs, values, start + offset + len(raw) + 1, True
        if len(msgs) >= max_entries:
            raise ListingError("too many listing entries", start + offset)
        try:
            msg, value = parse_line_entry(line, numeric)
        except ValueError as exc:
            raise ListingError(str(exc), start + offset) from None
        msgs.append(msg)
        values.append(value)
        offset += len(raw) + 1
    return msgs, values, start + offset, False
