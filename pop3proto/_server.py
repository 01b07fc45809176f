"""The server side's whole POP3 session, as an I/O-free driver.

``serve_session`` is a generator that owns one connection's ``Connection``
and every decision of a POP3 server: the greeting, CAPA, which logins are
allowed (TLS policy, mechanisms), the failure delay, the maildrop lock, the
TRANSACTION rules (through ``Mailbox``), TOP, the UPDATE step, deadlines and
connection caps. It yields the requests of ``_requests`` for the I/O; the
sync, asyncio and trio server bindings only carry them out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable
from typing import Any

import attrs

from . import _events as ev
from ._auth import (
    Authenticator,
    FailureDelay,
    apop_available,
    plaintext_allowed,
    server_mechanisms,
    verify_apop,
    verify_user_pass,
)
from ._connection import SERVER, Connection
from ._limits import Limits
from ._requests import (
    TIMED_OUT,
    Commit,
    MaildropFailure,
    OpenMaildrop,
    OpenMessage,
    Receive,
    Request,
    Send,
    Sleep,
    StartTLS,
    TLSInfo,
)
from ._sasl import Challenge, Failure, Success, make_timestamp, server_mechanism
from ._session import Mailbox, Retrieve, TopFilter, Update
from ._state import State
from ._util import NEED_DATA, PAUSED, RemoteProtocolError

__all__ = ["ConnectionLimiter", "ServerConfig", "SessionSummary", "serve_session"]

_FLUSH_AT = 256 * 1024

ServerGen = Generator[Request, Any, "SessionSummary"]


class ConnectionLimiter:
    """Caps on concurrent sessions per client address and per user
    (HARDENING 47; Dovecot's default is 10 per user and address).
    Thread-safe; shared by all sessions of one server."""

    def __init__(self, per_address: int = 50, per_user: int = 10) -> None:
        self.per_address = per_address
        self.per_user = per_user
        self._lock = threading.Lock()
        self._addresses: dict[str, int] = {}
        self._users: dict[str, int] = {}

    @staticmethod
    def _acquire(table: dict[str, int], key: str, cap: int, lock: threading.Lock) -> bool:
        with lock:
            n = table.get(key, 0)
            if n >= cap:
                return False
            table[key] = n + 1
            return True

    @staticmethod
    def _release(table: dict[str, int], key: str, lock: threading.Lock) -> None:
        with lock:
            n = table.get(key, 0) - 1
            if n > 0:
                table[key] = n
            else:
                table.pop(key, None)

    def acquire_address(self, address: str) -> bool:
        return self._acquire(self._addresses, address, self.per_address, self._lock)

    def release_address(self, address: str) -> None:
        self._release(self._addresses, address, self._lock)

    def acquire_user(self, user: str) -> bool:
        return self._acquire(self._users, user, self.per_user, self._lock)

    def release_user(self, user: str) -> None:
        self._release(self._users, user, self._lock)

    def sessions(self) -> int:
        """Sessions currently counted (by address)."""
        with self._lock:
            return sum(self._addresses.values())


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Everything a POP3 server decides by policy. One object serves all the
    sessions of a server (the failure delay and the limiter are shared)."""

    authenticator: Authenticator
    #: Host name for APOP timestamps and CRAM-MD5 challenges.
    hostname: str = "localhost"
    #: The IMPLEMENTATION capability (None to hide it).
    implementation: str | None = "pop3proto"
    #: A certificate is configured: offer STLS on plaintext connections.
    stls_available: bool = False
    #: Allow plaintext-secret logins (USER/PASS, PLAIN, LOGIN) without TLS.
    #: Off by default (RFC 2595 §2.3, RFC 5034 §4); see ``allow_plaintext_loopback``.
    allow_plaintext: bool = False
    #: Allow them without TLS on loopback connections.
    allow_plaintext_loopback: bool = True
    #: Offer APOP (off by default: MD5, broken against active attackers).
    apop: bool = False
    #: Restrict the SASL mechanisms offered (None: all the authenticator can serve).
    mechanisms: tuple[str, ...] | None = None
    #: Answer a bare ``AUTH`` with the mechanism list (Outlook's discovery).
    legacy_auth_listing: bool = True
    #: The EXPIRE capability: days, ``"NEVER"``, or None to omit it.
    expire: str | None = None
    #: The LOGIN-DELAY capability in seconds, or None.
    login_delay: int | None = None
    #: Seconds from connect to a completed login (Dovecot: 180).
    login_timeout: float = 180.0
    #: Seconds of silence after login before the session is dropped
    #: (RFC 1939 §3: at least 10 minutes).
    idle_timeout: float = 600.0
    #: Dovecot's ``outlook-no-nuls`` workaround (PROTOCOL §12): send each NUL
    #: in a message as 0x80, for clients that hang on NUL. Size-preserving.
    outlook_no_nuls: bool = False
    #: Dovecot's ``oe-ns-eoh`` workaround (PROTOCOL §12): Outlook Express and
    #: Netscape Mail break on a message without the empty line that ends its
    #: header section; RETR and TOP add it where it is missing. Unlike
    #: Dovecot, LIST and STAT count those two octets: each message's start is
    #: read once at login to find out (only when this is on).
    oe_ns_eoh: bool = False
    failure_delay: FailureDelay = attrs.field(factory=FailureDelay)
    limiter: ConnectionLimiter = attrs.field(factory=ConnectionLimiter)
    limits: Limits = attrs.field(factory=Limits)


@attrs.define
class SessionSummary:
    """What a session did, for the log."""

    peer: str
    user: str | None = None
    retrieved: int = 0
    octets: int = 0
    deleted: int = 0
    quit: bool = False
    #: Why the session ended when it was not a QUIT: "eof", "timeout",
    #: "protocol error", "tls failed", "too many connections".
    ended: str = ""


_AUTH = ev.ResponseCode(("AUTH",))
_IN_USE = ev.ResponseCode(("IN-USE",))
_SYS_TEMP = ev.ResponseCode(("SYS", "TEMP"))


class _Session:
    def __init__(
        self,
        config: ServerConfig,
        peer: str,
        loopback: bool,
        tls_info: TLSInfo | None,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.conn = Connection(SERVER, limits=config.limits, tls_active=tls_info is not None)
        self.peer = peer
        self.loopback = loopback
        self.tls_info = tls_info
        self.clock = clock
        self.summary = SessionSummary(peer)
        self.out: list[bytes] = []
        self.out_size = 0
        self.mailbox: Mailbox | None = None
        self.user: str | None = None
        self.pending_user: str | None = None
        self.timestamp: bytes | None = None
        self.deadline = clock() + config.login_timeout

    # -------------------------------------------------------------- output

    def emit(self, data: bytes) -> Generator[Request, Any, None]:
        self.out.append(data)
        self.out_size += len(data)
        if self.out_size >= _FLUSH_AT:
            yield from self.flush()

    def reply(self, event: ev.Event) -> Generator[Request, Any, None]:
        yield from self.emit(self.conn.send(event))

    def flush(self) -> Generator[Request, Any, None]:
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            self.out_size = 0
            yield Send(data)

    # -------------------------------------------------------------- policy

    @property
    def plaintext_ok(self) -> bool:
        allow = self.config.allow_plaintext or (
            self.loopback and self.config.allow_plaintext_loopback
        )
        return plaintext_allowed(tls_active=self.conn.tls_active, allow_plaintext=allow)

    def mechanisms(self) -> list[str]:
        cb = bool(self.tls_info and self.tls_info.channel_bindings)
        external = bool(self.tls_info and self.tls_info.peer_identity)
        allow = self.config.allow_plaintext or (
            self.loopback and self.config.allow_plaintext_loopback
        )
        names = server_mechanisms(
            self.config.authenticator.capabilities(),
            self.conn.tls_active,
            allow,
            cb,
            external_available=external,
        )
        if self.config.mechanisms is not None:
            wanted = {m.upper() for m in self.config.mechanisms}
            names = [n for n in names if n in wanted]
        return names

    def capabilities(self) -> ev.Capabilities:
        caps: list[tuple[str, tuple[str, ...]]] = [
            ("TOP", ()),
            ("UIDL", ()),
            ("RESP-CODES", ()),
            ("AUTH-RESP-CODE", ()),
            ("PIPELINING", ()),
            ("UTF8", ()),
            ("LANG", ()),
        ]
        if self.plaintext_ok:
            caps.append(("USER", ()))
        # RFC 2449 §6.3 / RFC 5034 §3: SASL stays listed after login.
        caps.append(("SASL", tuple(self.mechanisms())))
        if self.config.stls_available and self.conn.stls_permitted:
            caps.append(("STLS", ()))
        if self.config.expire is not None:
            caps.append(("EXPIRE", (str(self.config.expire),)))
        if self.config.login_delay is not None:
            caps.append(("LOGIN-DELAY", (str(self.config.login_delay),)))
        if self.config.implementation:
            caps.append(("IMPLEMENTATION", tuple(self.config.implementation.split())))
        return ev.Capabilities(caps)

    # -------------------------------------------------------------- login

    def fail_login(self, code: ev.ResponseCode | None = _AUTH) -> ServerGenNone:
        """HARDENING 36/38: the same text and delay for every bad credential;
        the delay grows for repeated failures from one address."""
        delay = self.config.failure_delay
        delay.record_failure(self.peer)
        seconds = delay.delay_for(self.peer)
        if seconds > 0:
            yield from self.flush()
            yield Sleep(seconds)
        yield from self.reply(ev.Err("authentication failed", code))

    def open_maildrop(self, user: str) -> ServerGenNone:
        limiter = self.config.limiter
        if not limiter.acquire_user(user):
            yield from self.reply(ev.Err("too many sessions for this user", _IN_USE))
            return
        result = yield OpenMaildrop(user)
        if isinstance(result, MaildropFailure):
            limiter.release_user(user)
            if result.in_use:
                yield from self.reply(ev.Err("maildrop is locked by another session", _IN_USE))
            else:
                yield from self.reply(ev.Err("maildrop unavailable", _SYS_TEMP))
            return
        if self.config.oe_ns_eoh:
            result = yield from self.header_end_sizes(result)
        self.mailbox = Mailbox(result)
        self.user = user
        self.summary.user = user
        self.config.failure_delay.record_success(self.peer)
        n = self.mailbox.count
        yield from self.reply(ev.Ok(f"maildrop has {n} message{'s' if n != 1 else ''}"))

    def header_end_sizes(
        self, messages: list[tuple[int, str]]
    ) -> Generator[Request, Any, list[tuple[int, str]]]:
        """The sizes with ``oe_ns_eoh``: two octets more for each message
        that lacks the empty line ending its header section (a message that
        cannot be read now keeps its size: RETR will answer -ERR)."""
        out = []
        for index, (size, uid) in enumerate(messages):
            chunks: Iterable[bytes] | None = yield OpenMessage(index)
            if chunks is not None:
                header = TopFilter(0)  # done once the header section has ended
                try:
                    for chunk in chunks:
                        header.feed(chunk)
                        if header.done:
                            break
                finally:
                    _close(chunks)
                if not header.done:
                    size += 2
            out.append((size, uid))
        return out

    def sasl(self, cmd: ev.Auth) -> ServerGenNone:
        if not cmd.mechanism:
            if self.config.legacy_auth_listing:
                yield from self.reply(ev.MechanismListing(self.mechanisms()))
            else:
                yield from self.reply(ev.Err("mechanism required"))
            return
        mech = None
        if cmd.mechanism in self.mechanisms():
            info = self.tls_info
            mech = server_mechanism(
                cmd.mechanism,
                self.config.authenticator,
                channel_binding=dict(info.channel_bindings) if info else None,
                external_identity=info.peer_identity if info else None,
                hostname=self.config.hostname,
            )
        if mech is None:
            yield from self.reply(ev.Err("unsupported mechanism"))
            return
        step = mech.start(cmd.initial_response)
        while isinstance(step, Challenge):
            yield from self.reply(ev.AuthChallenge(step.data))
            answer = yield from self.next_event()
            if isinstance(answer, ev.AuthResponse):
                step = mech.step(answer.data)
            elif isinstance(answer, (ev.AuthCancel, ev.InvalidCommand)):
                yield from self.reply(ev.Err("authentication cancelled"))
                return
            else:  # ConnectionClosed
                raise _Closed("eof")
        if isinstance(step, Success):
            yield from self.open_maildrop(step.user)
            return
        assert isinstance(step, Failure)
        code = ev.ResponseCode.parse(step.code) if step.code else None
        yield from self.fail_login(code)

    def authorization(self, cmd: ev.Command) -> ServerGenNone:
        if isinstance(cmd, ev.User):
            if not self.plaintext_ok:
                self.pending_user = None
                # HARDENING 39: no plaintext password without TLS.
                yield from self.reply(ev.Err("plaintext login requires TLS", _AUTH))
                return
            self.pending_user = cmd.name
            yield from self.reply(ev.Ok("send PASS"))
        elif isinstance(cmd, ev.Pass):
            user, self.pending_user = self.pending_user, None
            assert user is not None
            result = verify_user_pass(self.config.authenticator, user, cmd.password)
            if isinstance(result, Success):
                yield from self.open_maildrop(result.user)
            else:
                yield from self.fail_login()
        elif isinstance(cmd, ev.Apop):
            if self.timestamp is None:
                yield from self.reply(ev.Err("APOP not available"))
                return
            result = verify_apop(self.config.authenticator, cmd.name, self.timestamp, cmd.digest)
            if isinstance(result, Success):
                yield from self.open_maildrop(result.user)
            else:
                yield from self.fail_login()
        elif isinstance(cmd, ev.Auth):
            yield from self.sasl(cmd)
        elif isinstance(cmd, ev.Stls):
            yield from self.starttls()
        elif isinstance(cmd, ev.Utf8):
            yield from self.reply(ev.Ok("UTF8 enabled"))
        else:
            yield from self.reply(ev.Err("command not valid in this state"))

    def starttls(self) -> ServerGenNone:
        if not self.config.stls_available:
            yield from self.reply(ev.Err("STLS not available"))
            return
        yield from self.reply(ev.Ok("Begin TLS negotiation"))
        yield from self.flush()
        event = self.conn.next_event()  # raises on plaintext injection
        assert isinstance(event, ev.StartTLS)
        info = yield StartTLS()
        if info is None:
            raise _Closed("tls failed")
        self.conn.tls_established()
        self.tls_info = info

    # -------------------------------------------------------------- transaction

    def transaction(self, cmd: ev.Command) -> ServerGenNone:
        assert self.mailbox is not None
        action = self.mailbox.handle(cmd)
        if isinstance(action, Retrieve):
            yield from self.retrieve(action)
        elif isinstance(action, Update):
            yield from self.update(action)
        else:
            yield from self.reply(action)

    def retrieve(self, action: Retrieve) -> ServerGenNone:
        chunks: Iterable[bytes] | None = yield OpenMessage(action.index)
        if chunks is None:
            yield from self.reply(ev.Err("message unavailable", _SYS_TEMP))
            return
        config = self.config
        if (
            action.top_lines is None
            and type(chunks) is tuple
            and len(chunks) == 1
            and not (config.outlook_no_nuls or config.oe_ns_eoh)
        ):
            # The whole message in one piece (a small one): one engine call.
            data = chunks[0]
            self.summary.octets += len(data)
            self.summary.retrieved += 1
            yield from self.emit(self.conn.send_message(data))
            return
        cut = TopFilter(action.top_lines) if action.top_lines is not None else None
        # oe_ns_eoh: the same header-end finder as header_end_sizes, so that
        # what is sent is what LIST counted; and the message's last octet.
        header = TopFilter(0) if config.oe_ns_eoh else None
        last = b""
        yield from self.reply(ev.MessageStart("message follows"))
        try:
            for chunk in chunks:
                if header is not None and not header.done and chunk:
                    header.feed(chunk)
                    last = chunk[-1:]
                part = cut.feed(chunk) if cut is not None else chunk
                if config.outlook_no_nuls:
                    part = part.replace(b"\0", b"\x80")
                if part:
                    self.summary.octets += len(part)
                    yield from self.emit(self.conn.send(ev.Data(part)))
                if cut is not None and cut.done:
                    break
        finally:
            _close(chunks)
        if header is not None and not header.done:
            # End the last line if it is open, then add the empty line.
            fix = b"\r\n" if last in (b"", b"\r", b"\n") else b"\r\n\r\n"
            yield from self.emit(self.conn.send(ev.Data(fix)))
        yield from self.reply(ev.EndOfMessage())
        if cut is None:
            self.summary.retrieved += 1

    def update(self, action: Update) -> ServerGenNone:
        # Always a Commit, even with nothing to remove: it also releases the
        # maildrop's lock, which must be free by the time the client reads
        # +OK (a client that reconnects at once would be refused [IN-USE]).
        ok = bool((yield Commit(action.indexes)))
        if ok and action.indexes:
            self.summary.deleted = len(action.indexes)
        self.summary.quit = True
        # RFC 1939 §6: +OK only when every marked message is gone.
        yield from self.reply(Mailbox.quit_reply(ok))
        raise _Closed("")

    # -------------------------------------------------------------- loop

    def timeout(self) -> float:
        if self.mailbox is None:
            return max(0.0, self.deadline - self.clock())
        return self.config.idle_timeout

    def next_event(self) -> Generator[Request, Any, ev.Event]:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                yield from self.flush()
                data = yield Receive(self.timeout())
                if data is TIMED_OUT:
                    # RFC 1939 §3: autologout closes without a response.
                    raise _Closed("timeout")
                conn.receive_data(data)
                continue
            assert event is not PAUSED, "a command was left unanswered"
            return event  # type: ignore[return-value]

    def run(self) -> ServerGenNone:
        config = self.config
        if apop_available(config.authenticator.capabilities(), enabled=config.apop):
            self.timestamp = make_timestamp(config.hostname)
        stamp = self.timestamp.decode("ascii") if self.timestamp else None
        yield from self.reply(ev.Greeting("POP3 server ready", stamp))
        while True:
            event = yield from self.next_event()
            if isinstance(event, ev.ConnectionClosed):
                raise _Closed("eof")
            assert isinstance(event, ev.Command)
            if isinstance(event, ev.InvalidCommand):
                yield from self.reply(ev.Err(event.reason))
            elif isinstance(event, ev.Capa):
                yield from self.reply(self.capabilities())
            elif isinstance(event, ev.Lang):
                yield from self.lang(event)
            elif isinstance(event, ev.Quit) and self.conn.state is State.AUTHORIZATION:
                self.summary.quit = True
                yield from self.reply(ev.Ok("bye"))
                raise _Closed("")
            elif isinstance(event, ev.ExtensionCommand):
                yield from self.reply(ev.Err("unknown command"))
            elif self.mailbox is None:
                yield from self.authorization(event)
            else:
                yield from self.transaction(event)

    def lang(self, cmd: ev.Lang) -> ServerGenNone:
        # RFC 6856 §3: we speak one language.
        if cmd.tag is None:
            yield from self.reply(ev.LanguageListing([("en", "English")]))
        elif cmd.tag.lower() in ("en", "*", "i-default") or cmd.tag.lower().startswith("en-"):
            yield from self.reply(ev.Ok("en English"))
        else:
            yield from self.reply(ev.Err("language not supported"))


ServerGenNone = Generator[Request, Any, None]


def _close(chunks: Iterable[bytes]) -> None:
    """Close a stored message's chunks (a generator over an open file)."""
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


class _Closed(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def serve_session(
    config: ServerConfig,
    *,
    peer: str,
    loopback: bool = False,
    tls_info: TLSInfo | None = None,
    clock: Callable[[], float],
) -> ServerGen:
    """Run one POP3 server session.

    ``peer`` is the client's address (for the failure delay and the caps),
    ``loopback`` whether it connected over loopback, ``tls_info`` the result of
    an implicit-TLS handshake (None for a plaintext connection), ``clock`` a
    monotonic clock in seconds (``time.monotonic``). Yields requests (see
    ``_requests``) and returns a ``SessionSummary`` once the connection should
    be closed. Deletions are only ever requested (``Commit``) after QUIT in
    TRANSACTION; a session that ends any other way removes nothing.
    """
    session = _Session(config, peer, loopback, tls_info, clock)
    limiter = config.limiter
    if not limiter.acquire_address(peer):
        yield Send(session.conn.send(ev.Err("too many connections", _SYS_TEMP)))
        session.summary.ended = "too many connections"
        return session.summary
    try:
        yield from session.run()
    except _Closed as closed:
        session.summary.ended = closed.reason
    except RemoteProtocolError as exc:
        session.summary.ended = "protocol error"
        session.out.append(b"-ERR " + exc.error_text.encode("ascii", "replace") + b"\r\n")
    finally:
        limiter.release_address(peer)
        if session.user is not None:
            limiter.release_user(session.user)
    yield from session.flush()
    return session.summary
