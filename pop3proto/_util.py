"""Errors, sentinels and small text helpers shared by the engine."""

from __future__ import annotations

import enum
from typing import Any


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


class FieldValue:
    """Equality, hashing and ``repr`` from the attrs fields of the subclass.

    The engine's records are ``@attrs.frozen(eq=False, repr=False)`` classes
    deriving from this: they behave exactly like attrs' generated methods
    (equal only to an instance of the very same class with equal fields;
    hashed on the fields; ``Name(field=value, ...)``), but one implementation
    serves every class instead of three methods generated and compiled for
    each, which was most of the package's import time."""

    __slots__ = ()
    __attrs_attrs__: Any

    def _field_values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, a.name) for a in self.__attrs_attrs__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._field_values() == other._field_values()

    def __hash__(self) -> int:
        return hash((self.__class__, *self._field_values()))

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{a.name}={getattr(self, a.name)!r}" for a in self.__attrs_attrs__ if a.repr
        )
        return f"{self.__class__.__qualname__}({fields})"
