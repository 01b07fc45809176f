"""``ClientSession``: every decision a POP3 client makes, without I/O.

A client binding (blocking sockets, asyncio, trio) creates one
``ClientSession`` per connection and runs its generator methods with the loop
described in ``_requests``; the session decides what to send, when TLS starts,
which mechanism to log in with, when a secret may cross the wire, how many
commands to pipeline, and when the connection has become unusable. The binding
only moves bytes, runs the TLS handshake and keeps the clocks.

Requests a client session yields, and what the binding sends back:

====================  =========================================================
``Send(data)``        write all of ``data``; result ``None``. A ``Send`` also
                      restarts the *command clock* (below).
``Receive(t)``        read some bytes (up to the binding's read size); ``b""``
                      at end of stream; ``TIMED_OUT`` once ``t`` seconds have
                      passed on the command clock with the read unanswered.
``StartTLS()``        run the client TLS handshake (certificate and host name
                      verified); result a ``TLSInfo`` with the channel-binding
                      data, or ``None`` when it failed. Restarts the clock.
``Deliver(data)``     a piece of the message being streamed
                      (``retrieve_stream``); result ``None``.
``DeliverMessage``    ``(msg, data)``: one whole message of a
                      ``retrieve_many`` batch, complete; result ``None``.
``MessageBoundary``   ``(msg, size)``: in ``retrieve_many_stream``, message
                      ``msg`` begins (``size`` None; its ``Deliver`` pieces
                      follow) or is complete (``size`` its octets); result
                      ``None``.
====================  =========================================================

The command clock. ``Receive.timeout`` is *not* a per-read timeout: the
binding measures it from the last ``Send`` (or ``StartTLS``; for the greeting,
from when the connection was made), across every read, so a server that
trickles one byte a second still trips it (HARDENING 48). So that large
messages on slow links are not cut off, the session grows the budget with
the bytes already received since that ``Send``: ``command_timeout +
received / min_transfer_rate``. A whole-operation deadline is the binding's
own (it knows when the operation began): it answers the read with an
exception of its own instead of ``TIMED_OUT``.

After ``TIMED_OUT``, a remote protocol error, an abandoned generator or a
failed TLS upgrade the session is *broken*: every later call raises
``Pop3Error`` (HARDENING 10: a pipeline is never resumed). A ``-ERR`` reply is
not a break: ``Pop3Error`` is raised and the session goes on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING, TypeVar, overload

import attrs

from . import _events as ev
from ._codec import SaslError, b64encode
from ._connection import CLIENT, Connection
from ._limits import Limits
from ._requests import (
    TIMED_OUT,
    Deliver,
    Pop3Error,
    Pop3TimeoutError,
    Pop3TLSError,
    Receive,
    Request,
    Send,
    TLSInfo,
)
from ._requests import StartTLS as StartTLSRequest
from ._state import State
from ._util import NEED_DATA, PAUSED, LocalProtocolError, RemoteProtocolError, sanitize

if TYPE_CHECKING:
    from ._sasl import ClientMechanism

# The SASL mechanisms (hashing, JSON, stringprep) and the mechanism policy are
# imported when a login first needs them: USER/PASS never does.

__all__ = [
    "CapaClosedError",
    "ClientSession",
    "DeliverMessage",
    "Driver",
    "MessageBoundary",
]

T = TypeVar("T")

#: What every ``ClientSession`` operation is: a generator that yields requests,
#: is sent their results, and returns the operation's result.
Driver = Generator[Request, object, T]

#: RFC 5034 §4: ``AUTH mech initial-response CRLF`` must fit in 255 octets,
#: or the initial response waits for the server's empty challenge.
_MAX_AUTH_LINE = 255

#: Mechanisms that put a password or bearer token on the wire as it is.
_PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"})

#: Response codes that mean "these credentials failed", not "that form of
#: AUTH is not understood": no retry without the initial response then.
_FINAL_AUTH_CODES = ("AUTH", "IN-USE", "LOGIN-DELAY", "SYS")

#: Channel-binding types in the order a SCRAM-PLUS client prefers them
#: (RFC 9266 makes tls-exporter the default; tls-unique is only defined up
#: to TLS 1.2, so the binding offers it only there).
_CB_PREFERENCE = ("tls-exporter", "tls-unique", "tls-server-end-point")


@attrs.frozen(eq=False, repr=False)
class DeliverMessage(Request):
    """One message of a ``retrieve_many`` batch, complete and in order: hand
    ``(msg, data)`` to the caller. Result ``None``."""

    msg: int
    data: bytes

    def __repr__(self) -> str:
        return f"DeliverMessage(msg={self.msg}, <{len(self.data)} octets>)"


@attrs.frozen(eq=False, repr=False)
class MessageBoundary(Request):
    """In a ``retrieve_many_stream`` batch: message ``msg`` begins (``size``
    is None, and its pieces follow as ``Deliver``) or is complete (``size``
    is its size in octets). Result ``None``."""

    msg: int
    size: int | None

    def __repr__(self) -> str:
        state = "begins" if self.size is None else f"complete, {self.size} octets"
        return f"MessageBoundary(msg={self.msg}, {state})"


class CapaClosedError(Pop3Error):
    """The server closed the connection in answer to CAPA (PROTOCOL §12.9).

    Connect again and use ``ClientSession(capa=False)``; a session that
    requires STLS gets ``Pop3TLSError`` instead (STLS needs CAPA)."""

    def __init__(self) -> None:
        super().__init__("the server closed the connection in answer to CAPA")


def _valid_msg(msg: object) -> int:
    if not isinstance(msg, int) or isinstance(msg, bool) or not 1 <= msg <= 0x7FFFFFFF:
        raise ValueError("message numbers are integers from 1 to 2**31-1")
    return msg


class ClientSession:
    """The client side of one POP3 connection, as generators for a binding to run.

    ``tls_active``: the connection is inside TLS from the start (implicit
    TLS, port 995); ``tls_info`` then carries its channel-binding data.
    ``starttls``: TLS is required and comes from STLS — ``open()`` fails with
    ``Pop3TLSError`` before any credential is sent when the server hides or
    refuses STLS, or CAPA fails (HARDENING 30). ``allow_insecure``: allow
    plaintext secrets (USER/PASS, PLAIN, LOGIN, bearer tokens, APOP) without
    TLS; off by default (RFC 2595 §2.3, HARDENING 39-40). ``capa=False`` skips
    CAPA at ``open()`` (for servers that close the connection on it).
    ``command_timeout``, ``greeting_timeout`` and ``min_transfer_rate``
    (octets per second) set the command clock (see the module docstring);
    None means no limit. ``host`` and ``port`` name the server for
    OAUTHBEARER. ``pipelining`` forces pipelining on or off (default: as CAPA
    says).
    """

    def __init__(
        self,
        *,
        tls_active: bool,
        starttls: bool = False,
        allow_insecure: bool = False,
        limits: Limits | None = None,
        command_timeout: float | None = 60.0,
        greeting_timeout: float | None = 60.0,
        min_transfer_rate: float = 16384.0,
        tls_info: TLSInfo | None = None,
        capa: bool = True,
        host: str | None = None,
        port: int | None = None,
        pipelining: bool | None = None,
    ) -> None:
        if starttls and tls_active:
            raise ValueError("STLS is for a plaintext connection; this one is already in TLS")
        if min_transfer_rate <= 0:
            raise ValueError("min_transfer_rate must be positive")
        self.conn = Connection(CLIENT, limits=limits, tls_active=tls_active, pipelining=pipelining)
        self.starttls_required = starttls
        self.allow_insecure = allow_insecure
        self.command_timeout = command_timeout
        self.greeting_timeout = greeting_timeout
        self.min_transfer_rate = float(min_transfer_rate)
        self.use_capa = capa
        self.host = host
        self.port = port
        self._tls_info = tls_info if tls_active else None
        self._timeout = greeting_timeout
        self._received = 0
        self._eof = False
        self._broken: str | None = None
        self._opened = False
        self._apop_timestamp: bytes | None = None
        self._capture: bytearray | None = None
        #: How the login succeeded: a SASL mechanism name, ``"APOP"`` or
        #: ``"USER"``; None before.
        self.mechanism: str | None = None
        #: The raw first line (without its line end) of the last reply read by
        #: ``open()``, ``execute()``, ``execute_body()`` or ``starttls()``.
        self.last_status_line: bytes = b""

    # ------------------------------------------------------------ properties

    @property
    def state(self) -> State:
        """The POP3 state as the engine sees it."""
        return self.conn.state

    @property
    def greeting(self) -> ev.Greeting | None:
        """The server's greeting, once ``open()`` has read it."""
        return self.conn.greeting

    @property
    def tls_active(self) -> bool:
        """The connection runs inside TLS (implicit, or after STLS)."""
        return self.conn.tls_active

    @property
    def tls_info(self) -> TLSInfo | None:
        """What the binding reported about the TLS layer, if any."""
        return self._tls_info

    @property
    def cached_capabilities(self) -> ev.Capabilities | None:
        """The last CAPA reply received under the current TLS state, or None."""
        return self.conn.capabilities

    @property
    def apop_timestamp(self) -> bytes | None:
        """The greeting's APOP timestamp, or None when there is none or it was
        received before STLS (HARDENING 31)."""
        return self._apop_timestamp

    @property
    def broken(self) -> str | None:
        """Why the session can no longer be used, or None while it can."""
        return self._broken

    @property
    def usable(self) -> bool:
        """A new operation may start: not broken and not closed."""
        return self._broken is None and self.conn.state not in (State.CLOSED, State.ERROR)

    def abort(self, reason: str) -> None:
        """Mark the session unusable (the binding calls this when the
        connection failed under it)."""
        if self._broken is None:
            self._broken = reason

    # ------------------------------------------------------------ plumbing

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise Pop3Error(f"the connection is unusable: {self._broken}")
        if self.conn.outstanding:
            # An earlier operation was abandoned half-way: its replies are
            # still coming, and nothing may be credited to a new command.
            self._broken = "an earlier operation was abandoned mid-reply"
            raise Pop3Error(f"the connection is unusable: {self._broken}")
        if self.conn.state is State.CLOSED:
            raise Pop3Error("the session is closed")

    def _guarded(self, body: Driver[T]) -> Driver[T]:
        """Run ``body``; any failure that leaves replies unread or the engine
        in ERROR breaks the session."""
        self._check_usable()
        try:
            return (yield from body)
        except BaseException as exc:
            conn = self.conn
            if conn.outstanding or conn.state is State.ERROR:
                self.abort(_describe(exc))
            raise

    def _budget(self) -> float | None:
        if self._timeout is None:
            return None
        return self._timeout + self._received / self.min_transfer_rate

    def _feed(self, data: object) -> None:
        if data is TIMED_OUT:
            self.abort("a reply did not arrive in time")
            raise Pop3TimeoutError("the server did not answer within the command deadline")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("a Receive request must be answered with bytes or TIMED_OUT")
        if self._eof:
            raise RuntimeError("Receive answered after end of stream")
        if not data:
            self._eof = True
        self._received += len(data)
        capture = self._capture
        if capture is not None:
            capture += data
            end = capture.find(b"\n")
            if end >= 0:
                self._finish_capture(end)
        self.conn.receive_data(data)

    def _start_capture(self) -> None:
        self._capture = bytearray()

    def _finish_capture(self, end: int | None = None) -> None:
        capture = self._capture
        if capture is None:
            return
        self._capture = None
        line = bytes(capture if end is None else capture[:end])
        self.last_status_line = line[:-1] if line.endswith(b"\r") else line

    def _next_event(self) -> Driver[ev.Event]:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                if self._eof:  # pragma: no cover - the engine never asks twice
                    raise RemoteProtocolError("connection closed")
                data = yield Receive(self._budget())
                self._feed(data)
                continue
            if event is PAUSED:  # pragma: no cover - only after StartTLS
                raise RemoteProtocolError("the engine paused unexpectedly")
            assert isinstance(event, ev.Event)
            return event

    def _check_quiet(self) -> None:
        """Before a command that nothing precedes: bytes already received are
        unsolicited and never credited to it (HARDENING 9)."""
        conn = self.conn
        if conn.outstanding:
            return
        event = conn.next_event()  # raises RemoteProtocolError for stray bytes
        if isinstance(event, ev.ConnectionClosed):
            self.abort("the server closed the connection")
            raise Pop3Error("the server closed the connection")

    def _send(self, *commands: ev.Command) -> Driver[None]:
        self._check_quiet()
        conn = self.conn
        data = b"".join([conn.send(cmd) for cmd in commands])
        yield Send(data)
        self._received = 0
        self._timeout = self.command_timeout

    def _reply(self) -> Driver[ev.Event]:
        """The next event; ``-ERR`` raises ``Pop3Error``."""
        event = yield from self._next_event()
        if isinstance(event, ev.Err):
            raise Pop3Error(event.text, event.code)
        return event

    def _simple(self, cmd: ev.Command) -> Driver[ev.Event]:
        yield from self._send(cmd)
        return (yield from self._reply())

    def _body(self, deliver: bool) -> Driver[tuple[bytes, int]]:
        """The rest of a multi-line body after ``MessageStart``: the content
        (empty when ``deliver`` streamed it) and its size."""
        chunks: list[bytes] = []
        size = 0
        while True:
            event = yield from self._next_event()
            kind = type(event)
            if kind is ev.Data:
                data = event.data  # type: ignore[attr-defined]
                size += len(data)
                if deliver:
                    yield Deliver(data)
                else:
                    chunks.append(data)
            elif kind is ev.EndOfMessage:
                return b"".join(chunks), size
            else:  # pragma: no cover - the engine guarantees the order
                raise RemoteProtocolError(f"unexpected {kind.__name__} in a message body")

    def _capa(self) -> Driver[ev.Capabilities | None]:
        """CAPA, tolerating ``-ERR`` (None) and telling a server that closes
        on it (``CapaClosedError``)."""
        yield from self._send(ev.Capa())
        try:
            event = yield from self._next_event()
        except RemoteProtocolError:
            if self._eof and any(isinstance(c, ev.Capa) for c in self.conn.outstanding):
                self.abort("the server closed the connection in answer to CAPA")
                raise CapaClosedError() from None
            raise
        if isinstance(event, ev.Capabilities):
            return event
        return None

    def _channel_binding(self) -> tuple[str, bytes] | None:
        info = self._tls_info
        if info is None or not self.conn.tls_active:
            return None
        for name in _CB_PREFERENCE:
            data = info.channel_bindings.get(name)
            if data:
                return name, bytes(data)
        return None

    def _plaintext_allowed(self) -> bool:
        return self.conn.tls_active or self.allow_insecure

    def _refuse_plaintext(self, what: str) -> Pop3TLSError:
        return Pop3TLSError(
            f"refusing to send {what} without TLS (pass allow_insecure=True to allow it)"
        )

    # ------------------------------------------------------------ opening

    def open(self) -> Driver[ev.Greeting]:
        """Read the greeting, ask CAPA, and upgrade with STLS when required.

        Returns the greeting. Raises ``Pop3Error`` for a ``-ERR`` greeting,
        ``CapaClosedError`` when the server closes on CAPA, ``Pop3TLSError``
        when STLS is required and cannot be had (nothing else is sent then)."""
        if self._opened:
            raise LocalProtocolError("open() runs once per session")
        self._opened = True
        return (yield from self._guarded(self._open()))

    def _open(self) -> Driver[ev.Greeting]:
        conn = self.conn
        self._timeout = self.greeting_timeout
        self._start_capture()
        event = yield from self._next_event()
        self._finish_capture()
        self._timeout = self.command_timeout
        if isinstance(event, ev.Err):
            self.abort("the server refused service")
            raise Pop3Error(event.text, event.code)
        assert isinstance(event, ev.Greeting)
        if event.timestamp is not None:
            self._apop_timestamp = event.timestamp.encode("ascii")
        caps: ev.Capabilities | None = None
        if self.use_capa or self.starttls_required:
            try:
                caps = yield from self._capa()
            except CapaClosedError:
                if self.starttls_required:
                    raise Pop3TLSError(
                        "STLS is required but the server closed the connection on CAPA"
                    ) from None
                raise
        if self.starttls_required and not conn.tls_active:
            if caps is None:
                self.abort("STLS required, CAPA failed")
                raise Pop3TLSError("STLS is required but the server did not answer CAPA")
            try:
                yield from self._starttls()
            except Pop3TLSError as exc:
                self.abort(f"STLS required: {exc}")
                raise
        return event

    def starttls(self) -> Driver[TLSInfo]:
        """Upgrade a plaintext session with STLS (RFC 2595 §4).

        Needs a CAPA reply that offers STLS (ask ``capabilities()`` first if
        ``open()`` skipped CAPA). After the handshake the plaintext CAPA and
        the APOP timestamp are forgotten and CAPA is asked again (HARDENING
        31). Raises ``Pop3TLSError`` when STLS is not offered or is refused
        (the session stays usable in plaintext) or the handshake fails (the
        session is broken)."""
        return (yield from self._guarded(self._starttls()))

    def _starttls(self) -> Driver[TLSInfo]:
        conn = self.conn
        if conn.tls_active:
            raise Pop3TLSError("TLS is already active")
        caps = conn.capabilities
        if caps is None:
            raise Pop3TLSError("no CAPA reply: the server's STLS support is unknown")
        if not caps.stls:
            raise Pop3TLSError("the server does not offer STLS")
        if conn.state is not State.AUTHORIZATION or conn.utf8:
            raise Pop3TLSError("STLS is only possible before login and before UTF8")
        yield from self._send(ev.Stls())
        self._start_capture()
        event = yield from self._next_event()
        self._finish_capture()
        if isinstance(event, ev.Err):
            raise Pop3TLSError(f"the server refused STLS: {sanitize(event.text)}")
        if not isinstance(event, ev.StartTLS):  # pragma: no cover - engine guarantee
            raise RemoteProtocolError("STLS was not answered with +OK or -ERR")
        # NO STARTTLS: bytes glued after the +OK are an injection (the engine
        # raises RemoteProtocolError here, HARDENING 29).
        if conn.next_event() is not PAUSED:  # pragma: no cover - engine guarantee
            raise RemoteProtocolError("the engine did not pause for the TLS handshake")
        try:
            info = yield StartTLSRequest()
        except BaseException as exc:
            self.abort(f"TLS handshake failed: {_describe(exc)}")
            raise
        if not isinstance(info, TLSInfo):
            self.abort("TLS handshake failed")
            raise Pop3TLSError("the TLS handshake failed")
        conn.tls_established()
        self._tls_info = info
        self._received = 0
        # RFC 2595 §4, HARDENING 31: nothing learnt in plaintext is kept.
        self._apop_timestamp = None
        yield from self._capa()
        return info

    # ------------------------------------------------------------ capabilities

    def capabilities(self, refresh: bool = False) -> Driver[ev.Capabilities | None]:
        """The server's capabilities: the cached CAPA reply, or a fresh one
        when there is none or ``refresh``. None when CAPA is not supported."""
        conn = self.conn
        if conn.capabilities is not None and not refresh:
            self._check_usable()
            return conn.capabilities
        return (yield from self._guarded(self._capa()))

    # ------------------------------------------------------------ login

    def login(
        self,
        user: str,
        password: str | None = None,
        *,
        mechanism: str | None = None,
        token: str | None = None,
        external: bool = False,
        authzid: str = "",
    ) -> Driver[None]:
        """Log in, choosing the strongest method both sides support.

        With ``mechanism`` None: a SASL mechanism from CAPA's SASL list
        (``choose_client_mechanism``: EXTERNAL when ``external``, OAUTHBEARER
        or XOAUTH2 with a ``token``, SCRAM-PLUS, SCRAM, CRAM-MD5, PLAIN,
        LOGIN with a password), else APOP when the greeting offered it under
        TLS, else USER/PASS. ``mechanism`` forces one: a SASL name, ``"APOP"``
        or ``"USER"``. Secrets never go out in plaintext without TLS unless
        ``allow_insecure`` (``Pop3TLSError`` before any byte is sent).

        The SASL initial response is sent on the AUTH line only when CAPA
        listed SASL and the line fits 255 octets (RFC 5034 §4); a server that
        rejects that form outright is asked again in two steps. A malformed
        challenge or a mechanism error cancels with ``*``; SCRAM's server
        signature is checked on ``+OK`` (failure breaks the session).
        Raises ``Pop3Error`` (with the response code, e.g. ``[AUTH]`` or
        ``[IN-USE]``) when the server refuses."""
        return (
            yield from self._guarded(
                self._login(user, password, mechanism, token, external, authzid)
            )
        )

    def _login(
        self,
        user: str,
        password: str | None,
        mechanism: str | None,
        token: str | None,
        external: bool,
        authzid: str,
    ) -> Driver[None]:
        conn = self.conn
        if conn.state is not State.AUTHORIZATION:
            raise LocalProtocolError("login is only possible in the AUTHORIZATION state")
        if password is None and token is None and not external:
            raise ValueError("login needs a password, a token, or external=True")
        tls = conn.tls_active
        caps = conn.capabilities
        offered = caps.sasl if caps is not None else ()
        if mechanism is not None:
            name = mechanism.upper()
            if name == "USER":
                yield from self._user_pass(user, password)
            elif name == "APOP":
                yield from self._apop(user, password, explicit=True)
            else:
                yield from self._sasl(name, user, password, token, authzid, offered)
            return
        from ._auth import choose_client_mechanism, client_may_use_apop

        name_or_none = choose_client_mechanism(
            offered,
            have_password=password is not None,
            have_token=token is not None,
            have_client_cert=external,
            tls_active=tls,
            allow_insecure=self.allow_insecure,
            channel_binding_available=self._channel_binding() is not None,
        )
        if name_or_none is not None:
            yield from self._sasl(name_or_none, user, password, token, authzid, offered)
            return
        if password is None:
            if token is not None and offered and not self._plaintext_allowed():
                raise self._refuse_plaintext("a bearer token")
            raise Pop3Error("the server offers no mechanism usable with the credentials given")
        if self._apop_timestamp is not None and client_may_use_apop(
            self._apop_timestamp, tls_active=tls
        ):
            yield from self._apop(user, password, explicit=False)
            return
        yield from self._user_pass(user, password)

    def _user_pass(self, user: str, password: str | None) -> Driver[None]:
        if password is None:
            raise ValueError("USER/PASS needs a password")
        if not self._plaintext_allowed():
            raise self._refuse_plaintext("a password")
        yield from self._simple(ev.User(user))
        yield from self._simple(ev.Pass(password))
        self.mechanism = "USER"

    def _apop(self, user: str, password: str | None, explicit: bool) -> Driver[None]:
        if password is None:
            raise ValueError("APOP needs a password")
        from ._auth import client_may_use_apop
        from ._sasl import apop_digest

        stamp = self._apop_timestamp
        if stamp is None:
            raise Pop3Error(
                "APOP is not available: the greeting had no timestamp, "
                "or it was received before STLS"
            )
        allowed = client_may_use_apop(stamp, tls_active=self.conn.tls_active) or (
            explicit and self.allow_insecure
        )
        if not allowed:
            # CVE-2007-1558: APOP digests are open to an active attacker.
            raise self._refuse_plaintext("an APOP digest")
        yield from self._simple(ev.Apop(user, apop_digest(stamp, password)))
        self.mechanism = "APOP"

    def _sasl(
        self,
        name: str,
        user: str,
        password: str | None,
        token: str | None,
        authzid: str,
        offered: tuple[str, ...],
    ) -> Driver[None]:
        if name in _PLAINTEXT_MECHANISMS and not self._plaintext_allowed():
            raise self._refuse_plaintext(f"{name} credentials")
        base = name.removesuffix("-PLUS")
        plus_offered = base.startswith("SCRAM-") and f"{base}-PLUS" in offered
        cb = self._channel_binding() if base.startswith("SCRAM-") else None
        from ._sasl import client_mechanism

        def make() -> ClientMechanism:
            return client_mechanism(
                name,
                user=user,
                password=password,
                token=token,
                authzid=authzid,
                channel_binding=cb,
                server_offers_plus=plus_offered,
                host=self.host,
                port=self.port,
            )

        mech = make()  # SaslError (a ValueError) for bad input, before any byte
        caps = self.conn.capabilities
        ir = mech.initial_response()
        may_ir = ir is not None and caps is not None and "SASL" in caps
        one_line = may_ir and _fits(name, ir or b"")
        reply, rounds = yield from self._auth_exchange(mech, name, ir if one_line else None)
        if isinstance(reply, ev.Err) and may_ir and rounds == 0 and not _final_code(reply):
            # Refused before any exchange: try the other form once. Some
            # servers (XOAUTH2 at some providers) reject the one-line form and
            # want the initial response after "+ "; others document only the
            # one-line form, even past RFC 5034's 255 octets (an OAuth token
            # is long), which is then sent as a last resort.
            reply, rounds = yield from self._auth_exchange(make(), name, None if one_line else ir)
        if isinstance(reply, ev.Err):
            raise Pop3Error(reply.text, reply.code)
        self.mechanism = name

    def _auth_exchange(
        self, mech: ClientMechanism, name: str, ir: bytes | None
    ) -> Driver[tuple[ev.Ok | ev.Err, int]]:
        yield from self._send(ev.Auth(name, ir))
        rounds = 0
        while True:
            event = yield from self._next_event()
            if isinstance(event, ev.AuthChallenge):
                rounds += 1
                try:
                    answer = mech.respond(event.data)
                except SaslError as exc:
                    yield from self._cancel_auth()
                    raise Pop3Error(f"{name} exchange cancelled: {exc}") from exc
                yield from self._send(ev.AuthResponse(answer))
            elif isinstance(event, ev.MalformedChallenge):
                yield from self._cancel_auth()
                raise Pop3Error(f"{name} exchange cancelled: the challenge was not valid base64")
            elif isinstance(event, ev.Ok):
                try:
                    mech.check_success()
                except SaslError as exc:
                    # The server let us in without proving itself (SCRAM):
                    # whoever that is, it is not to be trusted with the mail.
                    self.abort(f"{name}: {exc}")
                    raise Pop3Error(f"{name} login not trusted: {exc}") from exc
                return event, rounds
            elif isinstance(event, ev.Err):
                return event, rounds
            else:  # pragma: no cover - the engine only lets these through
                raise RemoteProtocolError(f"unexpected {type(event).__name__} during AUTH")

    def _cancel_auth(self) -> Driver[None]:
        """RFC 5034 §4: ``*`` cancels; the server must answer ``-ERR``."""
        yield from self._send(ev.AuthCancel())
        event = yield from self._next_event()
        if not isinstance(event, ev.Err):
            self.abort("the server did not refuse a cancelled AUTH")
            raise Pop3Error("the server did not answer a cancelled AUTH with -ERR")

    # ------------------------------------------------------------ transaction

    def stat(self) -> Driver[tuple[int, int]]:
        """``STAT``: ``(message count, maildrop size in octets)``."""
        return (yield from self._guarded(self._stat()))

    def _stat(self) -> Driver[tuple[int, int]]:
        event = yield from self._simple(ev.Stat())
        assert isinstance(event, ev.DropListing)
        return event.count, event.size

    @overload
    def list(self, msg: None = None) -> Driver[dict[int, int]]: ...
    @overload
    def list(self, msg: int) -> Driver[int]: ...

    def list(self, msg: int | None = None) -> Driver[dict[int, int]] | Driver[int]:
        """``LIST``: ``{msg: size}`` for every message, or one message's size.
        Sizes are advisory (PROTOCOL §12.5)."""
        return self._guarded(self._listing(ev.List(msg)))  # type: ignore[return-value]

    @overload
    def uidl(self, msg: None = None) -> Driver[dict[int, str]]: ...
    @overload
    def uidl(self, msg: int) -> Driver[str]: ...

    def uidl(self, msg: int | None = None) -> Driver[dict[int, str]] | Driver[str]:
        """``UIDL``: ``{msg: unique-id}`` for every message, or one message's
        unique-id (duplicates and malformed ids are a protocol error)."""
        return self._guarded(self._listing(ev.Uidl(msg)))  # type: ignore[return-value]

    def _listing(self, cmd: ev.List | ev.Uidl) -> Driver[object]:
        if cmd.msg is not None:
            _valid_msg(cmd.msg)
        event = yield from self._simple(cmd)
        if isinstance(event, (ev.ScanListing, ev.UniqueIdListing)):
            return event.size if isinstance(event, ev.ScanListing) else event.uid
        assert isinstance(event, (ev.ScanListings, ev.UniqueIdListings))
        return dict(event.entries)

    def retrieve(self, msg: int) -> Driver[bytes]:
        """``RETR``: the whole message, un-stuffed, line ends as sent."""
        return (yield from self._guarded(self._retrieve(ev.Retr(_valid_msg(msg)), False)))[0]

    def retrieve_stream(self, msg: int) -> Driver[int]:
        """``RETR``, streamed: yields ``Deliver(chunk)`` for each piece as it
        arrives (nothing is held); returns the message size."""
        return (yield from self._guarded(self._retrieve(ev.Retr(_valid_msg(msg)), True)))[1]

    def top(self, msg: int, lines: int) -> Driver[bytes]:
        """``TOP``: the header and the first ``lines`` body lines."""
        if not isinstance(lines, int) or isinstance(lines, bool) or lines < 0:
            raise ValueError("the line count is a non-negative integer")
        return (yield from self._guarded(self._retrieve(ev.Top(_valid_msg(msg), lines), False)))[0]

    def _retrieve(self, cmd: ev.Command, deliver: bool) -> Driver[tuple[bytes, int]]:
        event = yield from self._simple(cmd)
        assert isinstance(event, ev.MessageStart)
        return (yield from self._body(deliver))

    def delete(self, msg: int) -> Driver[None]:
        """``DELE``: mark a message deleted (removed at QUIT only)."""
        return (yield from self._guarded(self._ok(ev.Dele(_valid_msg(msg)))))

    def reset(self) -> Driver[None]:
        """``RSET``: unmark every message marked deleted."""
        return (yield from self._guarded(self._ok(ev.Rset())))

    def noop(self) -> Driver[None]:
        """``NOOP``."""
        return (yield from self._guarded(self._ok(ev.Noop())))

    def utf8(self) -> Driver[None]:
        """``UTF8`` (RFC 6856 §2): UTF-8 user names, passwords and content."""
        return (yield from self._guarded(self._ok(ev.Utf8())))

    def _ok(self, cmd: ev.Command) -> Driver[None]:
        yield from self._simple(cmd)

    def quit(self) -> Driver[bool]:
        """``QUIT``: True when the server answered ``+OK``. False after
        ``-ERR`` or when it just closed; then deletions are uncertain
        (PROTOCOL §12.8) and must be checked by UIDL next time."""
        return (yield from self._guarded(self._quit()))

    def _quit(self) -> Driver[bool]:
        yield from self._send(ev.Quit())
        event = yield from self._next_event()
        return isinstance(event, ev.Ok)

    # ------------------------------------------------------------ batches

    def retrieve_many(self, msgs: Iterable[int], window: int = 16) -> Driver[int]:
        """``RETR`` each message of ``msgs``, in order, yielding one
        ``DeliverMessage(msg, data)`` per message as it completes.

        With PIPELINING up to ``window`` RETRs are outstanding (bounded by
        ``Limits.max_pipeline``), sent in batches of one write each; without
        it, one at a time. After a ``-ERR`` no new command is sent, the
        replies already asked for are read (and delivered), and ``Pop3Error``
        for the first failure is raised. Returns the number delivered."""
        return (yield from self._guarded(self._batch(msgs, window, retrieve=True)))

    def retrieve_many_stream(self, msgs: Iterable[int], window: int = 2) -> Driver[int]:
        """``retrieve_many`` for messages too large to hold: each message is
        streamed as ``MessageBoundary(msg, None)``, its pieces as
        ``Deliver(data)`` as they arrive, then ``MessageBoundary(msg,
        size)``. Pipelined like ``retrieve_many`` (the default ``window``
        of 2 asks for the next message while one streams, so the server never
        waits between them; nothing is held either way). A message answered
        ``-ERR`` yields nothing; ``Pop3Error`` for the first failure is
        raised once the replies already asked for are read. Returns the
        number delivered."""
        return (yield from self._guarded(self._batch(msgs, window, retrieve=True, stream=True)))

    def delete_many(self, msgs: Iterable[int], window: int = 16) -> Driver[int]:
        """``DELE`` each message of ``msgs``, pipelined like
        ``retrieve_many``. Raises ``Pop3Error`` for the first ``-ERR`` (after
        reading every outstanding reply). Returns the number marked."""
        return (yield from self._guarded(self._batch(msgs, window, retrieve=False)))

    def _batch(
        self, msgs: Iterable[int], window: int, *, retrieve: bool, stream: bool = False
    ) -> Driver[int]:
        conn = self.conn
        if conn.state is not State.TRANSACTION:
            raise LocalProtocolError("batches are only possible in the TRANSACTION state")
        if window < 1:
            raise ValueError("window must be at least 1")
        window = min(window, conn.limits.max_pipeline) if conn.pipelining else 1
        refill_at = window // 2
        source = iter(msgs)
        exhausted = False
        pending: deque[int] = deque()
        failure: Pop3Error | None = None
        done = 0
        while True:
            if failure is None and not exhausted and len(pending) <= refill_at:
                batch: list[int] = []
                while len(pending) + len(batch) < window:
                    try:
                        batch.append(_valid_msg(next(source)))
                    except StopIteration:
                        exhausted = True
                        break
                if batch:
                    make = ev.Retr if retrieve else ev.Dele
                    yield from self._send(*[make(m) for m in batch])
                    pending.extend(batch)
            if not pending:
                break
            msg = pending.popleft()
            event = yield from self._next_event()
            if isinstance(event, ev.Err):
                if failure is None:
                    failure = Pop3Error(event.text, event.code)
                continue
            if stream:
                yield MessageBoundary(msg, None)
                _, size = yield from self._body(True)
                yield MessageBoundary(msg, size)
            elif retrieve:
                data, _ = yield from self._body(False)
                yield DeliverMessage(msg, data)
            done += 1
        if failure is not None:
            raise failure
        return done

    # ------------------------------------------------------------ raw access

    def execute(self, cmd: ev.Command) -> Driver[ev.Event]:
        """Send one command and return its reply event (``Ok``,
        ``DropListing``, a listing, ``Capabilities``, an ``AuthChallenge``
        …); ``-ERR`` raises ``Pop3Error``. ``last_status_line`` then holds
        the reply's raw first line. For replies with a message body use
        ``execute_body``. The plaintext policy applies to ``Pass``,
        ``Apop`` and plaintext SASL mechanisms."""
        secret = isinstance(cmd, (ev.Pass, ev.Apop)) or (
            isinstance(cmd, ev.Auth) and cmd.mechanism.upper() in _PLAINTEXT_MECHANISMS
        )
        if secret and not self._plaintext_allowed():
            raise self._refuse_plaintext("credentials")
        if isinstance(cmd, (ev.AuthResponse, ev.AuthCancel)):
            # The AUTH exchange is still open: continue it.
            if self._broken is not None:
                raise Pop3Error(f"the connection is unusable: {self._broken}")
            return (yield from self._exchange_step(cmd))
        return (yield from self._guarded(self._execute(cmd)))

    def _execute(self, cmd: ev.Command) -> Driver[ev.Event]:
        yield from self._send(cmd)
        return (yield from self._exchange_step(None))

    def _exchange_step(self, cmd: ev.Command | None) -> Driver[ev.Event]:
        try:
            if cmd is not None:
                yield from self._send(cmd)
            self._start_capture()
            event = yield from self._next_event()
            self._finish_capture()
        except BaseException as exc:
            self._capture = None
            if self.conn.outstanding or self.conn.state is State.ERROR:
                self.abort(_describe(exc))
            raise
        if isinstance(event, ev.Err):
            raise Pop3Error(event.text, event.code)
        if isinstance(event, ev.MessageStart):
            self.abort("a message body was left unread")
            raise LocalProtocolError("use execute_body() for commands answered with a body")
        if isinstance(event, ev.StartTLS):
            self.abort("STLS sent through execute()")
            raise LocalProtocolError("use starttls() for STLS")
        return event

    def execute_body(self, cmd: ev.Command) -> Driver[tuple[ev.MessageStart, bytes]]:
        """Send a command answered with a message body (``Retr``, ``Top``, a
        multi-line ``ExtensionCommand``) and return ``(MessageStart, body)``;
        ``-ERR`` raises ``Pop3Error``."""
        return (yield from self._guarded(self._execute_body(cmd)))

    def _execute_body(self, cmd: ev.Command) -> Driver[tuple[ev.MessageStart, bytes]]:
        yield from self._send(cmd)
        self._start_capture()
        try:
            event = yield from self._next_event()
        finally:
            self._finish_capture()
        if isinstance(event, ev.Err):
            raise Pop3Error(event.text, event.code)
        if not isinstance(event, ev.MessageStart):
            raise LocalProtocolError(f"{type(cmd).__name__} is not answered with a body")
        data, _ = yield from self._body(False)
        return event, data


def _fits(name: str, ir: bytes) -> bool:
    encoded = b64encode(ir) if ir else b"="
    return len(b"AUTH ") + len(name) + 1 + len(encoded) + 2 <= _MAX_AUTH_LINE


def _final_code(reply: ev.Err) -> bool:
    code = reply.code
    return code is not None and any(code.is_(c) for c in _FINAL_AUTH_CODES)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, GeneratorExit):
        return "an operation was abandoned mid-reply"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
