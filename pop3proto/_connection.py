"""``Connection``: one POP3 connection, client or server side, with no I/O.

Bytes in (``receive_data``), events out (``next_event``), bytes back
(``send``). ``receive_data`` only buffers; ``next_event`` does the work, one
event per call, in time linear in the bytes received however they are chunked.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Union

from . import _core, _wire
from . import _events as ev
from ._codec import apop_timestamp, b64decode_strict, b64encode
from ._limits import Limits
from ._receivebuffer import ReceiveBuffer
from ._state import BARRIERS, SessionState, State
from ._util import (
    NEED_DATA,
    PAUSED,
    LimitExceeded,
    LocalProtocolError,
    RemoteProtocolError,
    _Sentinel,
    decode_text,
    sanitize,
)

__all__ = ["CLIENT", "SERVER", "Connection", "Role"]


class Role(enum.Enum):
    """Which end of the connection we are."""

    CLIENT = "CLIENT"
    SERVER = "SERVER"


CLIENT = Role.CLIENT
SERVER = Role.SERVER

NextEvent = Union[ev.Event, _Sentinel]  # noqa: UP007 (a runtime alias)


class _Mode(enum.Enum):
    """What the client expects next from the server."""

    STATUS = 1  # the status line of the reply to the head command
    BODY = 2  # message content of RETR/TOP/extension
    END = 3  # EndOfMessage still to be emitted
    LISTING = 4  # LIST/UIDL entries
    LINES = 5  # CAPA, LANG or bare-AUTH lines


# The reply shape of each command on the client side.
_MULTILINE_BODY = (ev.Retr, ev.Top)


def _expects_lines(cmd: ev.Command) -> bool:
    return (
        isinstance(cmd, ev.Capa)
        or (isinstance(cmd, ev.Lang) and cmd.tag is None)
        or (isinstance(cmd, ev.Auth) and not cmd.mechanism)
    )


def _expects_listing(cmd: ev.Command) -> bool:
    return isinstance(cmd, (ev.List, ev.Uidl)) and cmd.msg is None


def _expects_body(cmd: ev.Command) -> bool:
    return isinstance(cmd, _MULTILINE_BODY) or (
        isinstance(cmd, ev.ExtensionCommand) and cmd.multiline
    )


# What a server may send in reply to each command (besides Err, always allowed).
def _reply_fits(cmd: ev.Command, reply: ev.Event) -> bool:
    kind = type(reply)
    if kind is ev.Err:
        return True
    if isinstance(cmd, ev.InvalidCommand):
        return False
    if isinstance(cmd, ev.Stat):
        return kind is ev.DropListing
    if isinstance(cmd, ev.List):
        return kind is (ev.ScanListings if cmd.msg is None else ev.ScanListing)
    if isinstance(cmd, ev.Uidl):
        return kind is (ev.UniqueIdListings if cmd.msg is None else ev.UniqueIdListing)
    if isinstance(cmd, ev.Capa):
        return kind is ev.Capabilities
    if _expects_body(cmd):
        return kind is ev.MessageStart
    if isinstance(cmd, ev.Lang) and cmd.tag is None:
        return kind is ev.LanguageListing
    if isinstance(cmd, ev.Auth):
        if not cmd.mechanism:
            return kind is ev.MechanismListing
        return kind in (ev.Ok, ev.AuthChallenge)
    if isinstance(cmd, (ev.AuthResponse, ev.AuthCancel)):
        return False
    return kind is ev.Ok


class Connection:
    """One POP3 connection, as ``CLIENT`` or ``SERVER``.

    ``limits`` (or keyword arguments naming ``Limits`` attributes) bound every
    buffer and count the peer controls. ``tls_active`` says the connection
    runs inside TLS from the start (implicit TLS, RFC 8314). A server lists in
    ``extensions`` the extra command keywords it accepts, mapped to whether
    their ``+OK`` is followed by data lines (e.g. ``{"LAST": False}``). A
    client's ``pipelining`` forces pipelining on or off; by default it follows
    the last CAPA reply (RFC 2449 §6.6).
    """

    def __init__(
        self,
        our_role: Role,
        *,
        limits: Limits | None = None,
        tls_active: bool = False,
        extensions: dict[str, bool] | None = None,
        pipelining: bool | None = None,
    ) -> None:
        if our_role not in (CLIENT, SERVER):
            raise ValueError("our_role must be CLIENT or SERVER")
        self.our_role = our_role
        self.their_role = SERVER if our_role is CLIENT else CLIENT
        self.limits = limits if limits is not None else Limits()
        self._session = SessionState(tls_active=tls_active)
        self._buf = ReceiveBuffer()
        self._eof = False
        self._closed_emitted = False
        self._error: RemoteProtocolError | None = None
        self._tls_pending = False
        self._starttls_emitted = False
        # client side
        self._outstanding: deque[ev.Command] = deque()
        self._projection: SessionState | None = None
        self._mode = _Mode.STATUS
        self._pipelining = pipelining
        self._capabilities: ev.Capabilities | None = None
        self._greeting: ev.Greeting | None = None
        self._line_start = True
        self._body_size = 0
        self._acc_msgs: list[int] = []
        self._acc_values: list[int] | list[bytes] = []
        self._acc_lines: list[bytes] = []
        self._challenge_open = False
        self._auth_rounds = 0
        self.quit_acknowledged = False
        # server side
        self._extensions = {k.upper(): v for k, v in (extensions or {}).items()}
        self._current: ev.Command | None = None
        self._greeted = False
        self._in_sasl = False
        self._sending_body = False
        self._stuff_state = _core.LINE_START
        self._bad_commands = 0
        self._quit_seen = False
        self._sasl_command: ev.Command | None = None
        self._err_only = False

    # ------------------------------------------------------------ properties

    @property
    def state(self) -> State:
        """The POP3 state (``State.ERROR`` after a remote protocol error)."""
        if self._error is not None:
            return State.ERROR
        return self._session.state

    @property
    def tls_active(self) -> bool:
        """The connection runs inside TLS."""
        return self._session.tls_active

    @property
    def utf8(self) -> bool:
        """UTF8 mode is on (RFC 6856 §2)."""
        return self._session.utf8

    @property
    def capabilities(self) -> ev.Capabilities | None:
        """Client: the last CAPA reply, forgotten when TLS starts (RFC 2595 §4)."""
        return self._capabilities

    @property
    def greeting(self) -> ev.Greeting | None:
        """Client: the server's greeting, once received."""
        return self._greeting

    @property
    def outstanding(self) -> tuple[ev.Command, ...]:
        """Client: the commands sent and not yet fully answered, oldest first."""
        return tuple(self._outstanding)

    @property
    def current_command(self) -> ev.Command | None:
        """Server: the command being answered, if any."""
        return self._current

    @property
    def quit_received(self) -> bool:
        """Server: a QUIT was received. When the connection ends without it,
        RFC 1939 §6 forbids applying any deletion."""
        return self._quit_seen

    @property
    def stls_permitted(self) -> bool:
        """STLS may be offered now (RFC 2595 §4: AUTHORIZATION, no TLS yet;
        RFC 6856 §2.1: not after UTF8)."""
        s = self._session
        return s.state is State.AUTHORIZATION and not s.tls_active and not s.utf8

    @property
    def pipelining(self) -> bool:
        """Client: whether commands may be pipelined now."""
        if self._pipelining is not None:
            return self._pipelining
        return self._capabilities is not None and self._capabilities.pipelining

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received and not used by any event, and whether EOF was seen."""
        return bytes(self._buf), self._eof

    # ------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if data:
            if self._eof:
                raise RuntimeError("received data after end of stream")
            self._buf.append(data)
        else:
            self._eof = True

    def next_event(self) -> NextEvent:
        """The next event, or ``NEED_DATA``, or ``PAUSED``.

        Raises ``RemoteProtocolError`` when the peer broke the protocol; the
        connection is then in ``State.ERROR`` and every later call raises too.
        """
        if self._error is not None:
            raise self._error
        try:
            event = self._client_next() if self.our_role is CLIENT else self._server_next()
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        if event is NEED_DATA and len(self._buf) > self.limits.max_buffer:
            self._error = LimitExceeded("max_buffer", self.limits.max_buffer)
            raise self._error
        return event

    def tls_established(self) -> None:
        """Tell the engine the TLS handshake after STLS has completed."""
        if self._error is not None:
            raise LocalProtocolError("connection is in the ERROR state")
        if not self._tls_pending:
            raise LocalProtocolError("no STLS handshake is pending")
        self._tls_pending = False
        self._starttls_emitted = False
        self._session.tls_active = True
        self._projection = None
        # RFC 2595 §4: forget what was learnt in plaintext.
        self._capabilities = None

    # ------------------------------------------------------------ output

    def send(self, event: ev.Event) -> bytes:
        """The bytes that put ``event`` on the wire.

        Raises ``LocalProtocolError`` (and changes nothing) when the event is
        not valid now or cannot be sent safely.
        """
        if self._error is not None:
            raise LocalProtocolError("connection is in the ERROR state")
        if isinstance(event, ev.ConnectionClosed):
            return b""
        if self.our_role is CLIENT:
            return self._client_send(event)
        return self._server_send(event)

    # ============================================================ client

    def _fail(self, message: str, hint: str = "protocol error") -> RemoteProtocolError:
        return RemoteProtocolError(message, error_text=hint)

    def _read_line(self, limit: int, limit_name: str) -> bytes | None:
        """The next line without its line end (a trailing CR is dropped), or
        None when it is not complete yet."""
        buf = self._buf
        i = buf.find_line_end()
        if i < 0:
            if len(buf) >= limit:
                raise LimitExceeded(limit_name, limit)
            if self._eof and len(buf):
                raise self._fail("connection closed in the middle of a line")
            return None
        if i + 1 - buf.start > limit:
            raise LimitExceeded(limit_name, limit)
        return self._take_line(i)

    def _take_line(self, i: int) -> bytes:
        """Consume the line ending at ``raw[i]`` (an LF); return it without
        its line end."""
        line = self._buf.take(i + 1)
        end = len(line) - 1
        if end and line[end - 1] == 0x0D:
            end -= 1
        return line[:end]

    def _client_next(self) -> NextEvent:
        if self._tls_pending:
            if len(self._buf):
                # NO STARTTLS (USENIX Security 2021): bytes after +OK to STLS
                # and before the handshake are an injection attempt.
                raise self._fail("data received between STLS and the TLS handshake")
            if not self._starttls_emitted:
                self._starttls_emitted = True
                return ev.StartTLS()
            return PAUSED
        mode = self._mode
        if mode is _Mode.BODY:
            return self._client_body()
        if mode is _Mode.END:
            self._mode = _Mode.STATUS
            self._finish(ok=True)
            return ev.EndOfMessage()
        if mode is _Mode.LISTING:
            return self._client_listing()
        if mode is _Mode.LINES:
            return self._client_lines()
        # STATUS
        if self._session.state is State.GREETING:
            return self._client_greeting()
        if not self._outstanding:
            if len(self._buf):
                # HARDENING 9: never credit unsolicited bytes to a later command.
                raise self._fail("data received with no command outstanding")
            return self._client_eof()
        head = self._outstanding[0]
        limit, name = self.limits.max_line, "max_line"
        if isinstance(head, ev.Auth) and head.mechanism:
            limit, name = self.limits.max_sasl_line, "max_sasl_line"
        line = self._read_line(limit, name)
        if line is None:
            return self._client_eof()
        if isinstance(head, ev.Auth) and head.mechanism:
            challenge = self._client_auth_line(line)
            if challenge is not None:
                return challenge
        try:
            ok, rest = _wire.parse_status(line)
        except ValueError:
            raise self._fail(f"invalid status line: {sanitize(line)}") from None
        code, text = _wire.split_code(rest)
        if not ok:
            self._finish(ok=False)
            return ev.Err(text, code)
        return self._client_ok(head, rest, text, code)

    def _client_eof(self) -> NextEvent:
        if not self._eof:
            return NEED_DATA
        pending = [c for c in self._outstanding if not isinstance(c, ev.Quit)]
        if pending or self._mode is not _Mode.STATUS:
            raise self._fail("connection closed with a reply outstanding")
        self._outstanding.clear()
        self._session.state = State.CLOSED
        return ev.ConnectionClosed()

    def _client_greeting(self) -> NextEvent:
        line = self._read_line(self.limits.max_line, "max_line")
        if line is None:
            if self._eof:
                raise self._fail("connection closed before the greeting")
            return NEED_DATA
        try:
            ok, rest = _wire.parse_status(line)
        except ValueError:
            raise self._fail(f"invalid greeting: {sanitize(line)}") from None
        code, text = _wire.split_code(rest)
        self._session.greeting(ok)
        if not ok:
            return ev.Err(text, code)
        stamp = apop_timestamp(rest)
        timestamp = None
        if stamp is not None:
            timestamp = stamp.decode("ascii")
            # Sent after the text (see Greeting): keep text and stamp apart.
            if text.endswith(timestamp):
                text = text[: -len(timestamp)].rstrip(" \t")
        greeting = ev.Greeting(text, timestamp, code)
        self._greeting = greeting
        return greeting

    def _client_auth_line(self, line: bytes) -> ev.Event | None:
        """A line during AUTH: a challenge (returned), or None for a status."""
        if line[:1] != b"+" or (len(line) > 1 and line[1] != 0x20):
            return None  # +OK, -ERR, or garbage: the status parser decides
        if self._challenge_open:
            raise self._fail("a second challenge before the answer to the first")
        self._auth_rounds += 1
        if self._auth_rounds > self.limits.max_auth_rounds:
            raise LimitExceeded("max_auth_rounds", self.limits.max_auth_rounds)
        self._challenge_open = True
        payload = line[2:].strip(b" ")
        try:
            data = b64decode_strict(payload) if payload else b""
        except ValueError:
            return ev.MalformedChallenge("challenge is not valid base64")
        return ev.AuthChallenge(data)

    def _client_ok(
        self, head: ev.Command, rest: bytes, text: str, code: ev.ResponseCode | None
    ) -> NextEvent:
        if isinstance(head, ev.Stat):
            count, size = self._numbers(rest, "STAT")
            self._finish(ok=True)
            return ev.DropListing(count, size)
        if isinstance(head, (ev.List, ev.Uidl)) and head.msg is not None:
            msg, value = self._single_listing(rest, isinstance(head, ev.List))
            if msg != head.msg:
                raise self._fail("reply names another message than the one asked")
            self._finish(ok=True)
            if isinstance(value, int):
                return ev.ScanListing(msg, value)
            return ev.UniqueIdListing(msg, value.decode("ascii"))
        if _expects_listing(head):
            self._mode = _Mode.LISTING
            self._acc_msgs = []
            self._acc_values = []
            return self._client_listing()
        if _expects_lines(head):
            self._mode = _Mode.LINES
            self._acc_lines = []
            return self._client_lines()
        if _expects_body(head):
            self._mode = _Mode.BODY
            self._line_start = True
            self._body_size = 0
            return ev.MessageStart(text, code)
        if isinstance(head, ev.Stls):
            self._finish(ok=True)
            self._tls_pending = True
            if len(self._buf):
                raise self._fail("data received between STLS and the TLS handshake")
            self._starttls_emitted = True
            return ev.StartTLS()
        if isinstance(head, ev.Quit):
            self.quit_acknowledged = True
        self._finish(ok=True)
        return ev.Ok(text, code)

    def _numbers(self, rest: bytes, what: str) -> tuple[int, int]:
        parts = rest.split()
        try:
            if len(parts) < 2:
                raise ValueError("missing numbers")
            return _wire.parse_listing_number(parts[0]), _wire.parse_listing_number(parts[1])
        except ValueError:
            raise self._fail(f"invalid {what} reply: {sanitize(rest)}") from None

    def _single_listing(self, rest: bytes, numeric: bool) -> tuple[int, int | bytes]:
        try:
            return _core_entry(rest, numeric)
        except ValueError:
            raise self._fail(f"invalid listing reply: {sanitize(rest)}") from None

    def _client_body(self) -> NextEvent:
        buf = self._buf
        if not len(buf):  # everything received was used: wait for more
            if self._eof:
                raise self._fail("connection closed in the middle of a message")
            return NEED_DATA
        raw = buf.raw
        data, stop, done, self._line_start = _core.unstuff(
            raw, buf.start, len(raw), self._line_start
        )
        buf.consume_to(stop)
        if data:
            self._body_size += len(data)
            if self._body_size > self.limits.max_message_size:
                raise LimitExceeded("max_message_size", self.limits.max_message_size)
        if done:
            if data:
                self._mode = _Mode.END
                return ev.Data(data)
            self._mode = _Mode.STATUS
            self._finish(ok=True)
            return ev.EndOfMessage()
        if data:
            return ev.Data(data)
        if self._eof:
            raise self._fail("connection closed in the middle of a message")
        return NEED_DATA

    def _client_listing(self) -> NextEvent:
        head = self._outstanding[0]
        numeric = isinstance(head, ev.List)
        buf = self._buf
        last = buf.find_last_line_end()
        if last >= 0:
            budget = self.limits.max_listing_entries - len(self._acc_msgs)
            try:
                msgs, values, stop, done = _core.parse_listing(
                    buf.raw, buf.start, last + 1, numeric, budget
                )
            except _core.ListingError as exc:
                if exc.reason == "too many listing entries":
                    raise LimitExceeded(
                        "max_listing_entries", self.limits.max_listing_entries
                    ) from None
                raise self._fail(f"invalid listing line: {exc.reason}") from None
            buf.consume_to(stop)
            self._acc_msgs.extend(msgs)
            self._acc_values.extend(values)  # type: ignore[arg-type]
        else:
            done = False
        if not done:
            if len(buf) >= self.limits.max_line:
                raise LimitExceeded("max_line", self.limits.max_line)
            if self._eof:
                raise self._fail("connection closed in the middle of a listing")
            return NEED_DATA
        msgs_all, values_all = self._acc_msgs, self._acc_values
        self._acc_msgs, self._acc_values = [], []
        self._mode = _Mode.STATUS
        if len(set(msgs_all)) != len(msgs_all):
            raise self._fail("a message number is listed twice")
        if numeric:
            self._finish(ok=True)
            return ev.ScanListings(zip(msgs_all, values_all, strict=False))  # type: ignore[arg-type]
        uids: list[str] = [v.decode("ascii") for v in values_all]  # type: ignore[union-attr]
        if len(set(uids)) != len(uids):
            # HARDENING 7: a duplicated unique-id could make a fetcher skip or
            # delete the wrong message.
            raise self._fail("a unique-id is listed twice")
        self._finish(ok=True)
        return ev.UniqueIdListings(zip(msgs_all, uids, strict=False))

    def _client_lines(self) -> NextEvent:
        head = self._outstanding[0]
        while True:
            line = self._read_line(self.limits.max_line, "max_line")
            if line is None:
                if self._eof:
                    raise self._fail("connection closed in the middle of a reply")
                return NEED_DATA
            if line == b".":
                break
            if line[:1] == b".":
                line = line[1:]
            if len(self._acc_lines) >= self.limits.max_capa_lines:
                raise LimitExceeded("max_capa_lines", self.limits.max_capa_lines)
            self._acc_lines.append(line)
        lines, self._acc_lines = self._acc_lines, []
        self._mode = _Mode.STATUS
        self._finish(ok=True)
        if isinstance(head, ev.Capa):
            caps = ev.Capabilities(_parse_capa(lines))
            self._capabilities = caps
            return caps
        if isinstance(head, ev.Lang):
            entries: list[tuple[str, str]] = []
            for line in lines:
                tag, _, desc = line.strip().partition(b" ")
                if tag:
                    entries.append((decode_text(tag), decode_text(desc.strip())))
            return ev.LanguageListing(entries)
        return ev.MechanismListing(
            decode_text(line.strip()).upper() for line in lines if line.strip()
        )

    def _finish(self, ok: bool) -> None:
        """The head command got its final reply."""
        head = self._outstanding.popleft()
        self._session.issued(head)
        self._session.replied(head, ok)
        self._challenge_open = False
        self._auth_rounds = 0
        if not ok or not self._outstanding:
            # The projection assumed success: start it again from the truth.
            self._projection = None

    def _projected_state(self) -> SessionState:
        """The session as it will be when every outstanding command succeeds
        (kept up to date as commands are sent, rebuilt after a failure)."""
        proj = self._projection
        if proj is None:
            proj = SessionState(tls_active=self._session.tls_active)
            proj.state = self._session.state
            proj.user_accepted = self._session.user_accepted
            proj.utf8 = self._session.utf8
            for cmd in self._outstanding:
                proj.issued(cmd)
                proj.replied(cmd, True)
            self._projection = proj
        return proj

    def _client_send(self, event: ev.Event) -> bytes:
        if not isinstance(event, ev.Command) or isinstance(event, ev.InvalidCommand):
            raise LocalProtocolError(f"a client cannot send {type(event).__name__}")
        if self._tls_pending:
            raise LocalProtocolError("finish the TLS handshake first")
        state = self._session.state
        if state is State.GREETING:
            raise LocalProtocolError("wait for the greeting")
        if state is State.CLOSED:
            raise LocalProtocolError("the session is closed")
        if isinstance(event, (ev.AuthResponse, ev.AuthCancel)):
            head = self._outstanding[0] if self._outstanding else None
            if not isinstance(head, ev.Auth) or not self._challenge_open:
                raise LocalProtocolError("no SASL challenge to answer")
            data = _wire.format_command(event)
            if len(data) > self.limits.max_sasl_line:
                raise LocalProtocolError("SASL answer longer than max_sasl_line")
            self._challenge_open = False
            return data
        if self._outstanding:
            # A barrier admits nothing behind it, so it can only be the last.
            if type(self._outstanding[-1]) in BARRIERS:
                raise LocalProtocolError(
                    "cannot pipeline behind STLS, AUTH or QUIT (RFC 2449 §6.6)"
                )
            if not self.pipelining:
                raise LocalProtocolError("the server does not offer PIPELINING")
            if len(self._outstanding) >= self.limits.max_pipeline:
                raise LocalProtocolError("too many commands outstanding (max_pipeline)")
        if not self._outstanding:
            self._projection = None
        proj = self._projected_state()
        reason = proj.refusal(event)
        if reason is not None:
            raise LocalProtocolError(reason)
        if isinstance(event, ev.Apop) and (
            self._greeting is None or self._greeting.timestamp is None
        ):
            raise LocalProtocolError("the greeting offered no APOP timestamp")
        data = _wire.format_command(event)
        limit = self.limits.max_sasl_line if isinstance(event, ev.Auth) else self.limits.max_line
        if len(data) > limit:
            raise LocalProtocolError("command line too long")
        self._outstanding.append(event)
        proj.issued(event)
        proj.replied(event, True)
        return data

    # ============================================================ server

    def _bad(self, line: bytes, reason: str) -> ev.InvalidCommand:
        self._bad_commands += 1
        if self._session.state is State.AUTHORIZATION:
            limit, name = self.limits.max_bad_commands_before_login, "max_bad_commands_before_login"
        else:
            limit, name = self.limits.max_bad_commands, "max_bad_commands"
        if self._bad_commands > limit:
            raise LimitExceeded(name, limit)
        cmd = ev.InvalidCommand(line, reason)
        self._current = cmd
        return cmd

    def _server_next(self) -> NextEvent:
        if self._tls_pending:
            if len(self._buf):
                # CVE-2011-0411: plaintext after STLS must never reach the
                # post-TLS parser.
                raise self._fail(
                    "data received between STLS and the TLS handshake",
                    "no data allowed before the TLS handshake",
                )
            if not self._starttls_emitted:
                self._starttls_emitted = True
                return ev.StartTLS()
            return PAUSED
        if not self._greeted or self._current is not None:
            return PAUSED
        state = self._session.state
        if state is State.CLOSED:
            return ev.ConnectionClosed() if self._eof else NEED_DATA
        if self._in_sasl:
            line = self._read_line(self.limits.max_sasl_line, "max_sasl_line")
            if line is None:
                return self._server_eof()
            self._in_sasl = False
            head = self._sasl_command
            if line.strip() == b"*":
                # RFC 5034 §4: a cancelled exchange MUST get -ERR.
                self._current = head
                self._err_only = True
                return ev.AuthCancel()
            try:
                data = b64decode_strict(line.strip()) if line.strip() else b""
            except ValueError:
                self._current = head
                self._err_only = True
                return ev.InvalidCommand(b"", "invalid base64 in SASL answer")
            self._current = head
            return ev.AuthResponse(data)
        line = self._read_command_line()
        if line is None:
            return self._server_eof()
        try:
            cmd = _wire.parse_command(line, self._extensions)
        except ValueError as exc:
            return self._bad(line, str(exc))
        reason = self._session.refusal(cmd)
        if reason is not None:
            return self._bad(line, reason)
        if isinstance(cmd, ev.Stls) and len(self._buf):
            raise self._fail(
                "data pipelined after STLS", "no data allowed before the TLS handshake"
            )
        self._session.issued(cmd)
        if isinstance(cmd, ev.Quit):
            self._quit_seen = True
        self._current = cmd
        return cmd

    def _read_command_line(self) -> bytes | None:
        buf = self._buf
        limit = self.limits.max_line
        i = buf.find_line_end()
        if 0 <= i < buf.start + limit:
            return self._take_line(i)  # the common case: a whole, short line
        if i < 0 and len(buf) < limit and not self._eof:
            return None  # and the next most common: waiting for more
        # AUTH carries an initial response that may exceed the command limit
        # (RFC 5034 §4, OAuth tokens): give it the SASL limit.
        head = bytes(buf.raw[buf.start : buf.start + 5]).upper()
        if head == b"AUTH " and self.limits.max_sasl_line > limit:
            return self._read_line(self.limits.max_sasl_line, "max_sasl_line")
        return self._read_line(limit, "max_line")

    def _server_eof(self) -> NextEvent:
        if not self._eof:
            return NEED_DATA
        self._session.state = State.CLOSED
        return ev.ConnectionClosed()

    def _server_send(self, event: ev.Event) -> bytes:
        if isinstance(event, ev.Greeting) or (not self._greeted and isinstance(event, ev.Err)):
            return self._send_greeting(event)
        if not self._greeted:
            raise LocalProtocolError("send the greeting first")
        if self._sending_body:
            return self._send_body(event)
        cmd = self._current
        if cmd is None:
            raise LocalProtocolError("no command is waiting for a reply")
        if isinstance(event, (ev.AuthCancel, ev.AuthResponse)) or not isinstance(event, ev.Reply):
            raise LocalProtocolError(f"a server cannot send {type(event).__name__}")
        if not _reply_fits(cmd, event) or (self._err_only and not isinstance(event, ev.Err)):
            raise LocalProtocolError(f"{type(event).__name__} does not answer {type(cmd).__name__}")
        data = _format_reply(event)
        if isinstance(event, ev.AuthChallenge):
            self._current = None
            self._in_sasl = True
            self._sasl_command = cmd
            return data
        if isinstance(event, ev.MessageStart):
            self._sending_body = True
            self._stuff_state = _core.LINE_START
            return data
        self._reply_done(cmd, not isinstance(event, ev.Err))
        return data

    def _reply_done(self, cmd: ev.Command, ok: bool) -> None:
        self._current = None
        self._err_only = False
        if isinstance(cmd, ev.InvalidCommand):
            return
        self._session.replied(cmd, ok)
        if ok and isinstance(cmd, ev.Stls):
            self._tls_pending = True
            self._starttls_emitted = False

    def _send_greeting(self, event: ev.Event) -> bytes:
        if self._greeted:
            raise LocalProtocolError("the greeting was sent already")
        if isinstance(event, ev.Greeting):
            text = event.text
            if event.timestamp is not None:
                stamp = event.timestamp.encode("ascii", "replace")
                if apop_timestamp(stamp) != stamp:
                    raise LocalProtocolError("APOP timestamp is not a <local@domain> msg-id")
                text = f"{text} {event.timestamp}" if text else event.timestamp
            data = _wire.format_status(True, text, event.code)
            ok = True
        else:
            assert isinstance(event, ev.Err)
            data = _wire.format_status(False, event.text, event.code)
            ok = False
        self._greeted = True
        self._session.greeting(ok)
        return data

    def send_message(
        self, data: bytes | bytearray | memoryview, text: str = "message follows"
    ) -> bytes:
        """Server: the bytes that ``send(MessageStart(text))``,
        ``send(Data(data))`` and ``send(EndOfMessage())`` would give
        together, for a message held whole in memory (most messages a server
        sends are small): one call and one set of checks instead of three.

        Raises ``LocalProtocolError`` (and changes nothing) unless a RETR,
        TOP or multi-line extension command is waiting for its reply, or
        when ``text`` cannot go in a status line."""
        cmd = self._current
        if (
            self._error is not None
            or self.our_role is not SERVER
            or not self._greeted
            or self._sending_body
            or self._err_only
            or cmd is None
            or not _expects_body(cmd)
        ):
            raise LocalProtocolError("no command is waiting for a message")
        head = (
            _MESSAGE_FOLLOWS if text == "message follows" else _wire.format_status(True, text, None)
        )
        body, state = _core.stuff(data, _core.LINE_START)
        self._reply_done(cmd, True)
        return b"".join((head, body, _core.stuff_end(state)))

    def _send_body(self, event: ev.Event) -> bytes:
        if isinstance(event, ev.Data):
            out, self._stuff_state = _core.stuff(event.data, self._stuff_state)
            return out
        if isinstance(event, ev.EndOfMessage):
            self._sending_body = False
            cmd = self._current
            assert cmd is not None
            self._reply_done(cmd, True)
            return _core.stuff_end(self._stuff_state)
        raise LocalProtocolError("only Data or EndOfMessage may follow MessageStart")


_MESSAGE_FOLLOWS = _wire.format_status(True, "message follows", None)


def _core_entry(rest: bytes, numeric: bool) -> tuple[int, int | bytes]:
    from ._purecore import parse_line_entry

    return parse_line_entry(rest.rstrip(b" \t"), numeric)


def _parse_capa(lines: list[bytes]) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for line in lines:
        parts = decode_text(line).split()
        if parts:
            out.append((parts[0].upper(), tuple(parts[1:])))
    return out


def _dot_lines(lines: list[bytes]) -> bytes:
    """Data lines with CRLF, stuffed, and the terminator (RFC 1939 §3)."""
    body = b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines)
    return body + b".\r\n"


def _format_reply(event: ev.Event) -> bytes:
    if isinstance(event, (ev.Ok, ev.Err, ev.MessageStart)):
        return _wire.format_status(not isinstance(event, ev.Err), event.text, event.code)
    if isinstance(event, ev.AuthChallenge):
        return b"+ " + b64encode(event.data) + b"\r\n"
    if isinstance(event, ev.DropListing):
        return b"+OK %d %d\r\n" % (_count(event.count), _count(event.size))
    if isinstance(event, ev.ScanListing):
        return b"+OK %d %d\r\n" % (_count(event.msg, 1), _count(event.size))
    if isinstance(event, ev.UniqueIdListing):
        return b"+OK %d %s\r\n" % (_count(event.msg, 1), _uid(event.uid))
    if isinstance(event, ev.ScanListings):
        body = b"".join(b"%d %d\r\n" % (_count(m, 1), _count(s)) for m, s in event.entries)
        return b"+OK\r\n" + body + b".\r\n"
    if isinstance(event, ev.UniqueIdListings):
        body = b"".join(b"%d %s\r\n" % (_count(m, 1), _uid(u)) for m, u in event.entries)
        return b"+OK\r\n" + body + b".\r\n"
    if isinstance(event, ev.Capabilities):
        lines = []
        for tag, params in event.items_:
            line = b" ".join(_wire._arg(p, "capability") for p in (tag, *params))
            if len(line) + 2 > _wire.MAX_STATUS_LINE:
                raise LocalProtocolError("capability line longer than 512 octets")
            lines.append(line)
        return b"+OK\r\n" + _dot_lines(lines)
    if isinstance(event, ev.LanguageListing):
        lines = []
        for tag, desc in event.entries:
            line = _wire._arg(tag, "language tag")
            if desc:
                line += b" " + _wire.check_text(desc, "language description")
            lines.append(line)
        return b"+OK\r\n" + _dot_lines(lines)
    if isinstance(event, ev.MechanismListing):
        return b"+OK\r\n" + _dot_lines([_wire._arg(m, "mechanism") for m in event.mechanisms])
    raise LocalProtocolError(f"{type(event).__name__} is not a reply")


def _count(n: int, minimum: int = 0) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not minimum <= n < 1 << 63:
        raise LocalProtocolError("listing numbers must be integers in range")
    return n


def _uid(uid: str) -> bytes:
    try:
        return _wire.check_uid(uid)
    except ValueError:
        raise LocalProtocolError("unique-ids are 1-70 octets of 0x21-0x7E") from None
