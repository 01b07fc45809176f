"""The receive buffer: bytes from the peer that no event has used yet.

It remembers how far it has searched for a line end, so feeding a long line
one byte at a time costs linear time, not quadratic; consumed bytes are
dropped lazily, in amortised linear time.
"""

from __future__ import annotations

__all__ = ["ReceiveBuffer"]

_COMPACT_AT = 64 * 1024


class ReceiveBuffer:
    """A byte string with a start offset and a remembered search position.

    While everything received so far has been consumed, an incoming ``bytes``
    object is kept as it is (no copy): the common case of one read holding
    whole lines or a body chunk then costs no buffer copy at all. Bytes that
    must wait for more are kept in a ``bytearray``."""

    __slots__ = ("_data", "_searched", "_start")

    def __init__(self) -> None:
        self._data: bytes | bytearray = b""
        self._start = 0
        self._searched = 0  # absolute index: no "\n" in [_start, _searched)

    def __len__(self) -> int:
        return len(self._data) - self._start

    def __bytes__(self) -> bytes:
        return bytes(self._data[self._start :])

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer."""
        if self._start == len(self._data):
            # Everything was consumed: take the new bytes as they are.
            self._data = data if type(data) is bytes else bytes(data)
            self._start = self._searched = 0
            return
        if type(self._data) is bytes:
            self._data = bytearray(memoryview(self._data)[self._start :])
            self._searched -= self._start
            self._start = 0
        self._data += data

    @property
    def raw(self) -> bytes | bytearray:
        """The underlying array; the unread bytes are ``raw[start:]``."""
        return self._data

    @property
    def start(self) -> int:
        """Index in ``raw`` of the first unread byte."""
        return self._start

    def consume_to(self, index: int) -> None:
        """Mark ``raw[:index]`` as read."""
        self._start = index
        if self._searched < index:
            self._searched = index
        data = self._data
        if index >= _COMPACT_AT and index * 2 >= len(data) and type(data) is bytearray:
            del data[:index]
            self._searched -= index
            self._start = 0

    def take(self, index: int) -> bytes:
        """Return and consume ``raw[start:index]``."""
        out = bytes(self._data[self._start : index])
        self.consume_to(index)
        return out

    def find_line_end(self) -> int:
        """Index of the next ``\\n`` at or after ``start``, or -1; remembers
        where it stopped looking."""
        i = self._data.find(b"\n", self._searched)
        if i < 0:
            self._searched = len(self._data)
        else:
            self._searched = i
        return i

    def find_last_line_end(self) -> int:
        """Index of the last ``\\n`` in the unread bytes, or -1 (only bytes not
        searched before are scanned)."""
        end = len(self._data)
        i = self._data.rfind(b"\n", self._searched, end)
        if i < 0:
            self._searched = end
        return i
