"""What the engine's session drivers ask a binding to do.

The client and server drivers (``_client``, ``_server``) are generators: they
hold every POP3 decision and *yield* a request whenever I/O is needed; the
binding carries it out and sends the result back into the generator. A
binding's whole job is the loop::

    result = None
    while True:
        try:
            request = gen.send(result)
        except StopIteration as done:
            return done.value
        result = <carry out request>

Requests and what the binding sends back:

==================  ===========================================================
``Send(data)``      write all of ``data`` (waiting while the peer is slow to
                    read: that is the server's backpressure); result ``None``
``Receive(t)``      read some bytes; ``b""`` at end of stream; ``TIMED_OUT``
                    when nothing came within ``t`` seconds (None = no limit);
                    the binding also enforces the whole-session deadline
``StartTLS()``      run the TLS handshake on the connection (client or server
                    side); result a ``TLSInfo``, or ``None`` when it failed
``Sleep(t)``        wait ``t`` seconds; result ``None``
``OpenMaildrop(u)`` server: lock and list user ``u``'s maildrop; result a
                    sequence of ``(size, uid)`` or a ``MaildropFailure``
``OpenMessage(i)``  server: the stored bytes of message ``i`` (0-based) as an
                    iterable of chunks (raw stored form; the engine converts),
                    or None when it cannot be read (answered -ERR [SYS/TEMP])
``Commit(idx)``     server, after QUIT: remove these messages (0-based; none
                    is fine) and release the maildrop's lock, before the
                    reply goes out; result ``True`` when every removal
                    succeeded
``Deliver(data)``   client: hand a piece of message content to the caller
                    (a file, an iterator); result ``None``
==================  ===========================================================
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from ._events import ResponseCode
from ._util import FieldValue, sanitize

__all__ = [
    "TIMED_OUT",
    "Commit",
    "Deliver",
    "MaildropFailure",
    "OpenMaildrop",
    "OpenMessage",
    "Pop3Error",
    "Pop3TLSError",
    "Pop3TimeoutError",
    "Receive",
    "Request",
    "Send",
    "Sleep",
    "StartTLS",
    "TLSInfo",
]


class Request(FieldValue):
    """Base class of the requests a driver yields."""

    __slots__ = ()


@attrs.frozen(eq=False, repr=False)
class Send(Request):
    data: bytes


@attrs.frozen(eq=False, repr=False)
class Receive(Request):
    timeout: float | None = None


@attrs.frozen(eq=False, repr=False)
class StartTLS(Request):
    pass


@attrs.frozen(eq=False, repr=False)
class Sleep(Request):
    seconds: float


@attrs.frozen(eq=False, repr=False)
class OpenMaildrop(Request):
    user: str


@attrs.frozen(eq=False, repr=False)
class OpenMessage(Request):
    index: int


@attrs.frozen(eq=False, repr=False)
class Commit(Request):
    indexes: tuple[int, ...]


@attrs.frozen(eq=False, repr=False)
class Deliver(Request):
    data: bytes


class _TimedOut(enum.Enum):
    TIMED_OUT = "TIMED_OUT"


#: The result of a ``Receive`` that waited ``timeout`` seconds for nothing.
TIMED_OUT = _TimedOut.TIMED_OUT


@attrs.frozen(eq=False, repr=False)
class TLSInfo(FieldValue):
    """What the binding learnt from a finished TLS handshake.

    ``channel_bindings`` maps a channel-binding type (``tls-exporter``,
    ``tls-server-end-point``, ``tls-unique``) to its data, for SCRAM-PLUS;
    ``peer_identity`` is the identity of a verified client certificate (for
    EXTERNAL), or None."""

    channel_bindings: Mapping[str, bytes] = attrs.field(factory=dict)
    peer_identity: str | None = None


@attrs.frozen(eq=False, repr=False)
class MaildropFailure(FieldValue):
    """Opening a maildrop failed: ``in_use`` when another session holds its
    lock (answered ``-ERR [IN-USE]``), otherwise a system problem
    (``-ERR [SYS/TEMP]``)."""

    in_use: bool = False


class Pop3Error(Exception):
    """The server answered ``-ERR`` (or broke off): ``code`` is the parsed
    response code (``[IN-USE]``, ``[LOGIN-DELAY]``, ``[SYS/TEMP]``,
    ``[SYS/PERM]``, ``[AUTH]`` …) or None, ``text`` the server's text.
    ``str()`` shows the text sanitised (no control characters)."""

    def __init__(self, text: str, code: ResponseCode | None = None) -> None:
        self.text = text
        self.code = code
        shown = sanitize(text)
        super().__init__(f"[{code}] {shown}" if code is not None else shown)

    def is_(self, code: str) -> bool:
        """True when the reply carried ``code`` (or one of its sub-levels)."""
        return self.code is not None and self.code.is_(code)


class Pop3TimeoutError(Pop3Error, TimeoutError):
    """A deadline passed: connect, greeting, a command, or the whole operation."""

    def __init__(self, text: str) -> None:
        super().__init__(text)


class Pop3TLSError(Pop3Error):
    """TLS could not be set up as required: the handshake failed, the
    certificate did not verify, or TLS was required and the server did not
    offer it (STLS stripped or refused)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
