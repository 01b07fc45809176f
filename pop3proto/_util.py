"""Errors, sentinels and small text helpers shared by the engine."""

from __future__ import annotations

import enum


class ProtocolError(Exception):
    """Base class of the engine's errors.

    ``error_text`` is a one-line, ASCII, safe-to-send hint (it never contains
    anything the peer sent), so that a server can answer ``-ERR <error_text>``
    before closing.
    """

    def __init__(self, msg: str, error_text: str | None = None) -> None:
        super().__init__(msg)
        self.error_text = error_text if error_text is not None else "protocol error"


class LocalProtocolError(ProtocolError):
    """*You* tried to do something the protocol forbids; nothing was emitted and
    the connection is unchanged."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol beyond recovery; the connection is now in
    ``State.ERROR``."""


class LimitExceeded(RemoteProtocolError):
    """The peer made the engine go past one of its configured limits.

    ``limit`` is the name of the limit (the attribute of ``Limits``)."""

    def __init__(self, limit: str, value: int) -> None:
        super().__init__(f"limit {limit} ({value}) exceeded", error_text=f"limit exceeded: {limit}")
        self.limit = limit
        self.value = value


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"

    def __repr__(self) -> str:
        return self.value


#: ``next_event`` needs more bytes from the peer before it can say anything.
NEED_DATA = _Sentinel.NEED_DATA
#: ``next_event`` will not go on until you do something (send a reply, finish TLS).
PAUSED = _Sentinel.PAUSED


def decode_text(data: bytes) -> str:
    """Wire text to ``str``: UTF-8, with undecodable octets kept (surrogate
    escapes) so that nothing the peer sent is lost or rewritten."""
    return data.decode("utf-8", "surrogateescape")


def encode_text(text: str) -> bytes:
    """The inverse of ``decode_text``."""
    return text.encode("utf-8", "surrogateescape")


def sanitize(text: str | bytes, limit: int = 200) -> str:
    """A printable, single-line rendering of peer text for exception messages
    and logs: control characters (escape sequences included) and undecodable
    octets are shown escaped, and long text is cut."""
    if isinstance(text, bytes):
        text = decode_text(text)
    out = []
    for ch in text[:limit]:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0 or 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o & 0xFF:02x}")
        else:
            out.append(ch)
    if len(text) > limit:
        out.append("...")
    return "".join(out)
