"""The server side's POP3 session rules, without I/O.

``Mailbox`` is one session's numbered view of a maildrop: it answers STAT,
LIST, UIDL, DELE, RSET and NOOP itself, says which message to stream for RETR
and TOP, and which deletions to apply at QUIT. A server binding drives it; no
binding re-writes these rules. ``TopFilter`` cuts a message for TOP and
``wire_size`` gives a message's POP3 size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from . import _core
from . import _events as ev
from ._util import LocalProtocolError
from ._wire import check_uid

__all__ = ["Mailbox", "Retrieve", "TopFilter", "Update", "wire_size"]


def wire_size(chunks: Iterable[bytes]) -> int:
    """A message's POP3 size (RFC 1939 §11): its octets with every line end
    (CRLF, bare LF, bare CR) counted as CRLF, without stuffing and without the
    CRLF a server adds to content that lacks a final line end."""
    state = _core.LINE_START
    total = 0
    for chunk in chunks:
        out, state = _core.stuff(chunk, state, False)
        total += len(out)
    return total


@attrs.frozen
class Retrieve:
    """Stream message ``index`` (0-based in the list given to ``Mailbox``):
    send ``MessageStart``, the content as ``Data`` (through a ``TopFilter``
    when ``top_lines`` is not None), then ``EndOfMessage``."""

    index: int
    msg: int
    top_lines: int | None = None


@attrs.frozen
class Update:
    """QUIT in TRANSACTION (RFC 1939 §6): remove these messages (0-based
    indexes), then answer with ``Mailbox.quit_reply(all_removed)``."""

    indexes: tuple[int, ...]


class Mailbox:
    """One session's view of a maildrop, numbered 1..n at open (RFC 1939 §4).

    ``messages`` is a sequence of ``(size, uid)`` pairs fixed for the session;
    numbers never shift, messages marked deleted vanish from STAT, LIST and UIDL
    and are refused by every command until RSET. Nothing is removed unless
    ``handle(Quit())`` returned an ``Update``.
    """

    def __init__(self, messages: Sequence[tuple[int, str]]) -> None:
        for size, uid in messages:
            if size < 0:
                raise ValueError("message sizes are non-negative")
            check_uid(uid)
        self._messages = list(messages)
        self._deleted: set[int] = set()
        self._size = sum(size for size, _ in self._messages)
        self._deleted_size = 0

    @property
    def count(self) -> int:
        """Messages in the maildrop at open, deleted ones included."""
        return len(self._messages)

    @property
    def deleted(self) -> frozenset[int]:
        """0-based indexes of the messages marked deleted."""
        return frozenset(self._deleted)

    def _index(self, msg: int) -> int | None:
        i = msg - 1
        if 0 <= i < len(self._messages) and i not in self._deleted:
            return i
        return None

    def handle(self, cmd: ev.Command) -> ev.Reply | Retrieve | Update:
        """The answer to a TRANSACTION command: a reply to send, a message
        to stream, or the deletions to apply at QUIT."""
        if isinstance(cmd, ev.Stat):
            return ev.DropListing(
                len(self._messages) - len(self._deleted), self._size - self._deleted_size
            )
        if isinstance(cmd, ev.List):
            if cmd.msg is None:
                return ev.ScanListings(
                    (i + 1, size)
                    for i, (size, _) in enumerate(self._messages)
                    if i not in self._deleted
                )
            i = self._index(cmd.msg)
            if i is None:
                return _no_such_message()
            return ev.ScanListing(cmd.msg, self._messages[i][0])
        if isinstance(cmd, ev.Uidl):
            if cmd.msg is None:
                return ev.UniqueIdListings(
                    (i + 1, uid)
                    for i, (_, uid) in enumerate(self._messages)
                    if i not in self._deleted
                )
            i = self._index(cmd.msg)
            if i is None:
                return _no_such_message()
            return ev.UniqueIdListing(cmd.msg, self._messages[i][1])
        if isinstance(cmd, (ev.Retr, ev.Top)):
            i = self._index(cmd.msg)
            if i is None:
                return _no_such_message()
            lines = cmd.lines if isinstance(cmd, ev.Top) else None
            return Retrieve(i, cmd.msg, lines)
        if isinstance(cmd, ev.Dele):
            i = self._index(cmd.msg)
            if i is None:
                return _no_such_message()
            self._deleted.add(i)
            self._deleted_size += self._messages[i][0]
            return ev.Ok(f"message {cmd.msg} deleted")
        if isinstance(cmd, ev.Rset):
            self._deleted.clear()
            self._deleted_size = 0
            return ev.Ok(f"maildrop has {len(self._messages)} messages ({self._size} octets)")
        if isinstance(cmd, ev.Noop):
            return ev.Ok()
        if isinstance(cmd, ev.Quit):
            return Update(tuple(sorted(self._deleted)))
        raise LocalProtocolError(f"{type(cmd).__name__} is not a TRANSACTION command")

    @staticmethod
    def quit_reply(all_removed: bool) -> ev.Reply:
        """RFC 1939 §6: ``+OK`` only when every marked message was removed;
        otherwise ``-ERR [SYS/TEMP]`` (some may be gone, no unmarked one is)."""
        if all_removed:
            return ev.Ok("bye")
        return ev.Err("some deleted messages not removed", ev.ResponseCode(("SYS", "TEMP")))


def _no_such_message() -> ev.Err:
    return ev.Err("no such message")


class TopFilter:
    """Cuts a message for ``TOP msg n`` (RFC 1939 §7): the header section, the
    blank line after it, and the first ``lines`` lines of the body.

    Feed the stored message in chunks; each call returns what to send (in CRLF
    form). ``done`` turns true once nothing more is needed, so the caller can
    stop reading the message."""

    def __init__(self, lines: int) -> None:
        if lines < 0:
            raise ValueError("line count must be non-negative")
        self._left = lines
        self._state = _core.LINE_START
        self._in_header = True
        # The last two octets seen, to find "\r\n\r\n" across chunks.
        self._tail = b"\r\n"
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """The part of ``chunk`` to send."""
        if self.done:
            return b""
        data, self._state = _core.stuff(chunk, self._state, False)
        pos = 0
        if self._in_header:
            joined = self._tail + data
            end = joined.find(b"\r\n\r\n")
            if end < 0:
                self._tail = joined[-2:]
                return data
            self._in_header = False
            pos = end + 4 - len(self._tail)
        while self._left > 0:
            nl = data.find(b"\n", pos)
            if nl < 0:
                return data
            self._left -= 1
            pos = nl + 1
        self.done = True
        return data[:pos]
