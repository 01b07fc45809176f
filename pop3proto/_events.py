"""The events of a POP3 conversation.

The same classes serve both directions: what a client sends, a server
receives, and the reverse. All are frozen attrs classes, compared by value.
Text fields are ``str`` (wire text is UTF-8; octets that are not valid UTF-8
are kept as surrogate escapes, so nothing is lost); message content and SASL
payloads are ``bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import attrs

from ._util import FieldValue

__all__ = [
    "Apop",
    "Auth",
    "AuthCancel",
    "AuthChallenge",
    "AuthResponse",
    "Capa",
    "Capabilities",
    "Command",
    "ConnectionClosed",
    "Data",
    "Dele",
    "DropListing",
    "EndOfMessage",
    "Err",
    "Event",
    "ExtensionCommand",
    "Greeting",
    "InvalidCommand",
    "Lang",
    "LanguageListing",
    "List",
    "MalformedChallenge",
    "MechanismListing",
    "MessageStart",
    "Noop",
    "Ok",
    "Pass",
    "Quit",
    "Reply",
    "ResponseCode",
    "Retr",
    "Rset",
    "ScanListing",
    "ScanListings",
    "StartTLS",
    "Stat",
    "Stls",
    "Top",
    "Uidl",
    "UniqueIdListing",
    "UniqueIdListings",
    "User",
    "Utf8",
]


class Event(FieldValue):
    """Base class of every event."""

    __slots__ = ()


class Command(Event):
    """A client command (client → server)."""

    __slots__ = ()
    #: The wire keyword.
    keyword: str = ""


class Reply(Event):
    """A server reply or part of one (server → client)."""

    __slots__ = ()


def _scan_entries(value: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple(value)


def _uid_entries(value: Iterable[tuple[int, str]]) -> tuple[tuple[int, str], ...]:
    return tuple(value)


def _lang_entries(value: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple(value)


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


# ---------------------------------------------------------------- response codes


@attrs.frozen(eq=False, repr=False)
class ResponseCode(FieldValue):
    """An extended response code (RFC 2449 §8, RFC 3206): ``[SYS/TEMP]`` is
    ``ResponseCode(("SYS", "TEMP"))``. Levels are upper-case; ``argument`` holds
    any text after a space inside the brackets (not in the RFCs, seen in the wild).
    """

    levels: tuple[str, ...]
    argument: str | None = None

    @classmethod
    def parse(cls, text: str) -> ResponseCode:
        """Parse ``"SYS/TEMP"`` or ``"LOGIN-DELAY 900"`` (without brackets)."""
        head, _, arg = text.partition(" ")
        return cls(tuple(level.upper() for level in head.split("/")), arg or None)

    def is_(self, code: str) -> bool:
        """True when this code is ``code`` or one of its unknown sub-levels:
        RFC 2449 §8 says clients ignore levels they do not know, so
        ``[SYS/TEMP/FOO]`` is ``SYS/TEMP`` and also ``SYS``."""
        want = tuple(code.upper().split("/"))
        return self.levels[: len(want)] == want

    def __str__(self) -> str:
        body = "/".join(self.levels)
        return f"{body} {self.argument}" if self.argument is not None else body


# ---------------------------------------------------------------- commands


@attrs.frozen(eq=False, repr=False)
class User(Command):
    """``USER name`` (RFC 1939 §7)."""

    name: str
    keyword = "USER"


@attrs.frozen(eq=False, repr=False)
class Pass(Command):
    """``PASS password``; the password is the raw rest of the line (RFC 1939 §7)."""

    password: str
    keyword = "PASS"

    def __repr__(self) -> str:  # never log secrets
        return "Pass(password=<hidden>)"


@attrs.frozen(eq=False, repr=False)
class Apop(Command):
    """``APOP name digest`` (RFC 1939 §7)."""

    name: str
    digest: str
    keyword = "APOP"


@attrs.frozen(eq=False, repr=False)
class Auth(Command):
    """``AUTH mechanism [initial-response]`` (RFC 5034). ``initial_response`` is
    the decoded payload: ``None`` sends none, ``b""`` sends ``=``. An empty
    ``mechanism`` is the legacy bare ``AUTH`` that lists mechanisms."""

    mechanism: str
    initial_response: bytes | None = None
    keyword = "AUTH"

    def __repr__(self) -> str:
        ir = "None" if self.initial_response is None else "<hidden>"
        return f"Auth(mechanism={self.mechanism!r}, initial_response={ir})"


@attrs.frozen(eq=False, repr=False)
class AuthResponse(Command):
    """A client's answer to an ``AuthChallenge`` (decoded payload)."""

    data: bytes
    keyword = ""

    def __repr__(self) -> str:
        return f"AuthResponse(<{len(self.data)} octets>)"


@attrs.frozen(eq=False, repr=False)
class AuthCancel(Command):
    """``*``: the client cancels the SASL exchange."""

    keyword = ""


@attrs.frozen(eq=False, repr=False)
class Stls(Command):
    """``STLS`` (RFC 2595 §4)."""

    keyword = "STLS"


@attrs.frozen(eq=False, repr=False)
class Capa(Command):
    """``CAPA`` (RFC 2449 §5)."""

    keyword = "CAPA"


@attrs.frozen(eq=False, repr=False)
class Stat(Command):
    """``STAT``."""

    keyword = "STAT"


@attrs.frozen(eq=False, repr=False)
class List(Command):
    """``LIST [msg]``."""

    msg: int | None = None
    keyword = "LIST"


@attrs.frozen(eq=False, repr=False)
class Uidl(Command):
    """``UIDL [msg]``."""

    msg: int | None = None
    keyword = "UIDL"


@attrs.frozen(eq=False, repr=False)
class Retr(Command):
    """``RETR msg``."""

    msg: int
    keyword = "RETR"


@attrs.frozen(eq=False, repr=False)
class Top(Command):
    """``TOP msg lines``."""

    msg: int
    lines: int
    keyword = "TOP"


@attrs.frozen(eq=False, repr=False)
class Dele(Command):
    """``DELE msg``."""

    msg: int
    keyword = "DELE"


@attrs.frozen(eq=False, repr=False)
class Noop(Command):
    """``NOOP``."""

    keyword = "NOOP"


@attrs.frozen(eq=False, repr=False)
class Rset(Command):
    """``RSET``."""

    keyword = "RSET"


@attrs.frozen(eq=False, repr=False)
class Quit(Command):
    """``QUIT``."""

    keyword = "QUIT"


@attrs.frozen(eq=False, repr=False)
class Utf8(Command):
    """``UTF8`` (RFC 6856 §2)."""

    keyword = "UTF8"


@attrs.frozen(eq=False, repr=False)
class Lang(Command):
    """``LANG [tag]`` (RFC 6856 §3)."""

    tag: str | None = None
    keyword = "LANG"


@attrs.frozen(eq=False, repr=False)
class ExtensionCommand(Command):
    """Any other command (``LAST``, ``*ENV``, ``XTND`` …). ``multiline`` says
    whether a ``+OK`` to it is followed by data lines, which arrive as
    ``MessageStart`` / ``Data`` / ``EndOfMessage``."""

    keyword: str
    args: tuple[str, ...] = ()
    multiline: bool = False


@attrs.frozen(eq=False, repr=False)
class InvalidCommand(Command):
    """A command line the server engine could not accept: unknown, malformed,
    or not allowed in the current state. Recoverable: answer it with ``Err``.
    ``reason`` is safe to send (it never contains client data)."""

    line: bytes
    reason: str
    keyword = ""


# ---------------------------------------------------------------- replies


@attrs.frozen(eq=False, repr=False)
class Greeting(Reply):
    """The server's greeting. ``timestamp`` is the APOP ``<…>`` timestamp when
    the greeting offers one (it is sent after the text)."""

    text: str = ""
    timestamp: str | None = None
    code: ResponseCode | None = None


@attrs.frozen(eq=False, repr=False)
class Ok(Reply):
    """A single-line ``+OK``."""

    text: str = ""
    code: ResponseCode | None = None


@attrs.frozen(eq=False, repr=False)
class Err(Reply):
    """``-ERR``: always a single line."""

    text: str = ""
    code: ResponseCode | None = None


@attrs.frozen(eq=False, repr=False)
class AuthChallenge(Reply):
    """``+ base64``: a SASL challenge (decoded payload)."""

    data: bytes

    def __repr__(self) -> str:
        return f"AuthChallenge(<{len(self.data)} octets>)"


@attrs.frozen(eq=False, repr=False)
class MalformedChallenge(Reply):
    """A SASL challenge line that is not valid base64. RFC 5034 §4: the client
    must cancel the exchange (send ``AuthCancel``)."""

    reason: str


@attrs.frozen(eq=False, repr=False)
class DropListing(Reply):
    """The reply to ``STAT``."""

    count: int
    size: int


@attrs.frozen(eq=False, repr=False)
class ScanListing(Reply):
    """The reply to ``LIST msg``."""

    msg: int
    size: int


@attrs.frozen(eq=False, repr=False)
class ScanListings(Reply):
    """The reply to ``LIST``: ``(msg, size)`` pairs."""

    entries: tuple[tuple[int, int], ...] = attrs.field(converter=_scan_entries)


@attrs.frozen(eq=False, repr=False)
class UniqueIdListing(Reply):
    """The reply to ``UIDL msg``."""

    msg: int
    uid: str


@attrs.frozen(eq=False, repr=False)
class UniqueIdListings(Reply):
    """The reply to ``UIDL``: ``(msg, uid)`` pairs."""

    entries: tuple[tuple[int, str], ...] = attrs.field(converter=_uid_entries)


@attrs.frozen(eq=False, repr=False)
class LanguageListing(Reply):
    """The reply to a bare ``LANG``: ``(tag, description)`` pairs."""

    entries: tuple[tuple[str, str], ...] = attrs.field(converter=_lang_entries)


@attrs.frozen(eq=False, repr=False)
class MechanismListing(Reply):
    """The reply to a legacy bare ``AUTH``: the mechanism names."""

    mechanisms: tuple[str, ...] = attrs.field(converter=_names)


def _capa_items(
    value: Mapping[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]],
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    pairs = value.items() if isinstance(value, Mapping) else value
    return tuple((tag.upper(), tuple(params)) for tag, params in pairs)


@attrs.frozen(eq=False, repr=False)
class Capabilities(Reply, Mapping[str, tuple[str, ...]]):
    """The reply to ``CAPA``: a mapping from upper-case tag to the tuple of its
    parameters, with case-insensitive lookups (``"pipelining" in caps``).
    Order is kept as the server sent it."""

    items_: tuple[tuple[str, tuple[str, ...]], ...] = attrs.field(converter=_capa_items, default=())

    def __getitem__(self, tag: str) -> tuple[str, ...]:
        want = tag.upper()
        for key, params in self.items_:
            if key == want:
                return params
        raise KeyError(tag)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self.items_)

    def __len__(self) -> int:
        return len(self.items_)

    def __contains__(self, tag: object) -> bool:
        if not isinstance(tag, str):
            return False
        want = tag.upper()
        return any(key == want for key, _ in self.items_)

    @property
    def sasl(self) -> tuple[str, ...]:
        """The SASL mechanisms offered (upper-case), empty when AUTH is not."""
        return tuple(m.upper() for m in self.get("SASL", ()))

    @property
    def implementation(self) -> str | None:
        """The IMPLEMENTATION text (RFC 2449 §6.9); never base behaviour on it."""
        params = self.get("IMPLEMENTATION")
        return " ".join(params) if params is not None else None

    def _seconds_or_days(self, tag: str) -> tuple[int | None, bool] | None:
        params = self.get(tag)
        if not params:
            return None
        per_user = len(params) > 1 and params[1].upper() == "USER"
        if params[0].upper() == "NEVER":
            return None, per_user
        if not params[0].isdigit() or len(params[0]) > 10:
            return None
        return int(params[0]), per_user

    @property
    def login_delay(self) -> tuple[int, bool] | None:
        """``(seconds, per_user)`` from LOGIN-DELAY (RFC 2449 §6.5), or None."""
        value = self._seconds_or_days("LOGIN-DELAY")
        if value is None or value[0] is None:
            return None
        return value[0], value[1]

    @property
    def expire(self) -> tuple[int | None, bool] | None:
        """``(days, per_user)`` from EXPIRE (RFC 2449 §6.7); days is None for
        ``NEVER``; None when not advertised."""
        return self._seconds_or_days("EXPIRE")

    @property
    def utf8(self) -> tuple[bool, bool]:
        """``(offered, user)``: UTF8 (RFC 6856 §2), and whether UTF-8 user
        names and passwords are accepted (``UTF8 USER``)."""
        params = self.get("UTF8")
        if params is None:
            return False, False
        return True, any(p.upper() == "USER" for p in params)

    @property
    def stls(self) -> bool:
        """STLS is offered (and permitted now)."""
        return "STLS" in self

    @property
    def pipelining(self) -> bool:
        """PIPELINING is offered (RFC 2449 §6.6)."""
        return "PIPELINING" in self

    @property
    def resp_codes(self) -> bool:
        """RESP-CODES is offered (RFC 2449 §6.4)."""
        return "RESP-CODES" in self

    @property
    def auth_resp_code(self) -> bool:
        """AUTH-RESP-CODE is offered (RFC 3206 §6)."""
        return "AUTH-RESP-CODE" in self

    @property
    def lang(self) -> bool:
        """LANG is offered (RFC 6856 §3)."""
        return "LANG" in self


@attrs.frozen(eq=False, repr=False)
class MessageStart(Reply):
    """The ``+OK`` line of a RETR/TOP (or multi-line extension) reply; the
    content follows as ``Data`` events, then ``EndOfMessage``."""

    text: str = ""
    code: ResponseCode | None = None


@attrs.frozen(eq=False, repr=False)
class Data(Reply):
    """A piece of message content: un-stuffed when received, line ends as sent;
    raw content when sent (the engine stuffs it and turns line ends into CRLF)."""

    data: bytes

    def __repr__(self) -> str:
        return f"Data(<{len(self.data)} octets>)"


@attrs.frozen(eq=False, repr=False)
class EndOfMessage(Reply):
    """The end of a multi-line message reply."""


@attrs.frozen(eq=False, repr=False)
class StartTLS(Event):
    """STLS was accepted: the binding must now run the TLS handshake and then
    call ``Connection.tls_established()``. Nothing else happens until then."""


@attrs.frozen(eq=False, repr=False)
class ConnectionClosed(Event):
    """The peer closed the connection (end of stream)."""
