"""ClientSession, the I/O-free client driver, against in-memory servers.

``FakeServer`` is a small POP3 server made from ``Connection(SERVER)``, the
engine's ``Mailbox`` and its SASL server mechanisms; ``ScriptedServer``
answers from a fixed script, to play the malicious servers of HARDENING
29-32. ``drive`` plays the binding: it runs a session generator, carrying
its requests out against one of them, with the server's bytes delivered
whole, in random pieces or one byte at a time.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pop3proto as p
from pop3proto._auth import PasswordTable
from pop3proto._client import (
    CapaClosedError,
    ClientSession,
    DeliverMessage,
    Driver,
    MessageBoundary,
)
from pop3proto._requests import (
    TIMED_OUT,
    Deliver,
    Pop3Error,
    Pop3TimeoutError,
    Pop3TLSError,
    Receive,
    Send,
    StartTLS,
    TLSInfo,
)
from pop3proto._sasl import (
    Challenge,
    Failure,
    Success,
    apop_digest,
    b64encode,
    server_mechanism,
)

pytestmark = pytest.mark.usefixtures("backend")

USER, PASSWORD, TOKEN = "alice", "correct horse", "tok-123"
STAMP = "<1896.697170952@dbc.mtview.ca.us>"
CB = {"tls-server-end-point": b"\x11" * 32}


def message(n: int, size: int = 300) -> bytes:
    """A stored message with dot lines and LF line ends."""
    body = [b"Subject: message %d" % n, b"", b".leading dot", b"..two dots", b"."]
    line = b"line of message %d " % n
    while sum(len(x) + 1 for x in body) < size:
        body.append(line * 3)
    return b"\n".join(body) + b"\n"


def crlf(stored: bytes) -> bytes:
    """What a client must hand back for a stored message (CRLF form)."""
    out = re.sub(rb"\r\n|\n", b"\r\n", stored)
    return out if out.endswith(b"\r\n") or not out else out + b"\r\n"


# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------


class FakeServer:
    """A POP3 server in memory: real server engine, real mailbox rules, real
    SASL mechanisms. ``received`` keeps every byte the client sent."""

    def __init__(
        self,
        messages: Iterable[bytes] = (),
        *,
        tls: bool = False,
        stls: bool = False,
        sasl: Iterable[str] = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN"),
        pipelining: bool = True,
        timestamp: str | None = None,
        capa: bool = True,
        channel_binding: dict[str, bytes] | None = None,
        tokens: bool = False,
        reject_initial_response: bool = False,
    ) -> None:
        self.messages = [bytes(m) for m in messages]
        self.conn = p.Connection(p.SERVER, tls_active=tls)
        self.sasl = tuple(sasl)
        self.stls = stls
        self.pipelining = pipelining
        self.timestamp = timestamp
        self.capa = capa
        self.channel_binding = channel_binding
        self.reject_ir = reject_initial_response
        self.table = PasswordTable({USER: PASSWORD}, tokens={USER: TOKEN} if tokens else None)
        self.out = bytearray(self.conn.send(p.Greeting("ready", timestamp)))
        self.received = bytearray()
        self.commands: list[p.Command] = []
        self.mailbox: p.Mailbox | None = None
        self.mech: Any = None
        self.user_ok = False
        self.closed = False
        self.tls_pending = False
        self.body: list[p.Event] = []

    # -- client -> server
    def feed(self, data: bytes) -> None:
        self.received += data
        self.conn.receive_data(data)
        self.pump()

    def pump(self) -> None:
        while not self.closed:
            event = self.conn.next_event()
            if event is p.NEED_DATA or event is p.PAUSED:
                return
            if isinstance(event, p.StartTLS):
                self.tls_pending = True
                return
            if isinstance(event, p.ConnectionClosed):
                self.closed = True
                return
            assert isinstance(event, p.Command)
            self.commands.append(event)
            self.answer(event)

    def send(self, *events: p.Event) -> None:
        for event in events:
            self.out += self.conn.send(event)

    def caps(self) -> p.Capabilities:
        items: list[tuple[str, tuple[str, ...]]] = [("TOP", ()), ("UIDL", ()), ("USER", ())]
        if self.pipelining:
            items.append(("PIPELINING", ()))
        if self.stls and not self.conn.tls_active:
            items.append(("STLS", ()))
        if self.sasl:
            items.append(("SASL", self.sasl))
        return p.Capabilities(items)

    def answer(self, cmd: p.Command) -> None:
        if isinstance(cmd, p.InvalidCommand):
            self.send(p.Err(cmd.reason))
        elif isinstance(cmd, p.Capa):
            self.send(self.caps() if self.capa else p.Err("no CAPA"))
        elif isinstance(cmd, p.Stls):
            self.send(p.Ok("Begin TLS") if self.stls else p.Err("no STLS"))
        elif isinstance(cmd, p.User):
            self.user_ok = cmd.name == USER
            self.send(p.Ok("send PASS"))
        elif isinstance(cmd, p.Pass):
            self.finish(self.user_ok and cmd.password == PASSWORD)
        elif isinstance(cmd, p.Apop):
            good = self.timestamp is not None and cmd.digest == apop_digest(
                self.timestamp.encode(), PASSWORD
            )
            self.finish(cmd.name == USER and good)
        elif isinstance(cmd, p.Auth):
            self.auth(cmd)
        elif isinstance(cmd, p.AuthResponse):
            self.sasl_step(self.mech.step(cmd.data))
        elif isinstance(cmd, p.AuthCancel):
            self.mech = None
            self.send(p.Err("cancelled"))
        elif isinstance(cmd, p.Quit) and self.mailbox is None:
            self.send(p.Ok("bye"))
        elif isinstance(cmd, p.Utf8):
            self.send(p.Ok("UTF8 on"))
        else:
            assert self.mailbox is not None
            self.transaction(cmd)

    def finish(self, ok: bool) -> None:
        if ok:
            self.mailbox = p.Mailbox(
                [(p.wire_size([m]), f"uid{i}") for i, m in enumerate(self.messages, 1)]
            )
            self.send(p.Ok("maildrop ready"))
        else:
            self.send(p.Err("authentication failed", p.ResponseCode(("AUTH",))))

    def auth(self, cmd: p.Auth) -> None:
        name = cmd.mechanism.upper()
        if name not in self.sasl:
            self.send(p.Err("unknown mechanism"))
            return
        if self.reject_ir and cmd.initial_response is not None:
            self.send(p.Err("syntax error"))
            return
        self.mech = server_mechanism(name, self.table, channel_binding=self.channel_binding)
        self.sasl_step(self.mech.start(cmd.initial_response))

    def sasl_step(self, step: object) -> None:
        if isinstance(step, Challenge):
            self.send(p.AuthChallenge(step.data))
        elif isinstance(step, Success):
            self.finish(True)
        else:
            assert isinstance(step, Failure)
            self.send(p.Err(step.reason, p.ResponseCode(("AUTH",))))

    def transaction(self, cmd: p.Command) -> None:
        assert self.mailbox is not None
        what = self.mailbox.handle(cmd)
        if isinstance(what, p.Retrieve):
            data = self.messages[what.index]
            if what.top_lines is not None:
                data = p.TopFilter(what.top_lines).feed(data)
            self.send(p.MessageStart("follows"), p.Data(data), p.EndOfMessage())
        elif isinstance(what, p.Update):
            for i in sorted(what.indexes, reverse=True):
                del self.messages[i]
            self.send(p.Mailbox.quit_reply(True))
        else:
            self.send(what)

    # -- server -> client
    def take(self, n: int | None) -> bytes:
        data = bytes(self.out if n is None else self.out[:n])
        del self.out[: len(data)]
        return data

    def start_tls(self) -> bool:
        assert self.tls_pending
        self.tls_pending = False
        self.conn.tls_established()
        return True

    def sent_lines(self) -> list[bytes]:
        return bytes(self.received).split(b"\r\n")[:-1]


class ScriptedServer:
    """A server that answers each client line with the next scripted reply.

    ``script`` is a list of ``(expected line prefix, reply bytes)``; the
    greeting is sent first. A reply of None closes the connection. When the
    script runs out the server goes silent. ``handshake`` decides whether a
    TLS handshake would succeed (it fails when unsent bytes are pending:
    the client would read them as TLS records)."""

    def __init__(self, greeting: bytes, script: list[tuple[bytes, bytes | None]]) -> None:
        self.out = bytearray(greeting)
        self.script = list(script)
        self.received = bytearray()
        self._partial = b""
        self.closed = False
        self.tls_started = False

    def feed(self, data: bytes) -> None:
        self.received += data
        self._partial += data
        while b"\n" in self._partial:
            line, self._partial = self._partial.split(b"\n", 1)
            if not self.script:
                continue
            expect, reply = self.script.pop(0)
            assert line.rstrip(b"\r").startswith(expect), (line, expect)
            if reply is None:
                self.closed = True
            else:
                self.out += reply

    def take(self, n: int | None) -> bytes:
        data = bytes(self.out if n is None else self.out[:n])
        del self.out[: len(data)]
        return data

    def start_tls(self) -> bool:
        if self.out:
            return False
        self.tls_started = True
        return True

    def sent_lines(self) -> list[bytes]:
        return bytes(self.received).split(b"\r\n")[:-1]


Server = Any


class Run:
    """What ``drive`` saw: the result, every request, and the deliveries."""

    def __init__(self) -> None:
        self.result: Any = None
        self.requests: list[Any] = []
        self.chunks: list[bytes] = []
        self.messages: list[tuple[int, bytes]] = []
        self.boundaries: list[tuple[int, int | None]] = []

    def streamed(self) -> dict[int, bytes]:
        """The messages of a ``retrieve_many_stream``, rebuilt from the
        requests in the order they came (checking that every piece falls
        between its message's two boundaries)."""
        got: dict[int, bytes] = {}
        current: int | None = None
        for req in self.requests:
            if isinstance(req, MessageBoundary):
                if req.size is None:
                    assert current is None and req.msg not in got
                    current, got[req.msg] = req.msg, b""
                else:
                    assert current == req.msg and req.size == len(got[req.msg])
                    current = None
            elif isinstance(req, Deliver):
                assert current is not None
                got[current] += req.data
        assert current is None
        return got


def drive(
    gen: Driver[Any],
    server: Server,
    *,
    mode: str = "whole",
    seed: int = 0,
    tls_info: TLSInfo | None = None,
    on_request: Callable[[Any], None] | None = None,
) -> Run:
    """Play the binding: run ``gen`` against ``server``. ``mode`` is how the
    server's bytes are handed over: ``whole``, ``random`` or ``bytewise``.
    A read with nothing to read and the server still open times out."""
    rng = random.Random(seed)
    run = Run()
    result: object = None
    while True:
        try:
            req = gen.send(result)
        except StopIteration as stop:
            run.result = stop.value
            return run
        run.requests.append(req)
        if on_request is not None:
            on_request(req)
        result = None
        if isinstance(req, Send):
            server.feed(req.data)
        elif isinstance(req, Receive):
            n = None if mode == "whole" else 1 if mode == "bytewise" else rng.randint(1, 9)
            data = server.take(n)
            if data:
                result = data
            elif server.closed:
                result = b""
            else:
                result = TIMED_OUT
        elif isinstance(req, StartTLS):
            ok = server.start_tls()
            result = (tls_info or TLSInfo(channel_bindings=CB)) if ok else None
        elif isinstance(req, Deliver):
            run.chunks.append(req.data)
        elif isinstance(req, DeliverMessage):
            run.messages.append((req.msg, req.data))
        elif isinstance(req, MessageBoundary):
            run.boundaries.append((req.msg, req.size))
        else:  # pragma: no cover
            raise AssertionError(req)


def opened(server: Server, **kw: Any) -> ClientSession:
    kw.setdefault("tls_active", False)
    session = ClientSession(**kw)
    drive(session.open(), server)
    return session


def logged_in(server: FakeServer, **kw: Any) -> ClientSession:
    kw.setdefault("tls_active", True)
    session = opened(server, **kw)
    drive(session.login(USER, PASSWORD), server)
    assert session.state is p.State.TRANSACTION
    return session


MODES = ("whole", "random", "bytewise")


# ---------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_open_reads_greeting_and_capa(mode: str) -> None:
    server = FakeServer(timestamp=STAMP)
    session = ClientSession(tls_active=True)
    run = drive(session.open(), server, mode=mode)
    assert run.result == p.Greeting("ready", STAMP)
    assert session.cached_capabilities is not None
    assert session.cached_capabilities.pipelining
    assert server.sent_lines() == [b"CAPA"]
    assert session.last_status_line == b"+OK ready " + STAMP.encode()
    assert session.apop_timestamp == STAMP.encode()


def test_open_tolerates_capa_err() -> None:
    server = FakeServer(capa=False)
    session = opened(server, allow_insecure=True)
    assert session.cached_capabilities is None
    drive(session.login(USER, PASSWORD), server)
    assert session.mechanism == "USER"


def test_server_closing_on_capa_is_reported_for_a_reconnect() -> None:
    server = ScriptedServer(b"+OK hi\r\n", [(b"CAPA", None)])
    session = ClientSession(tls_active=False)
    with pytest.raises(CapaClosedError):
        drive(session.open(), server)
    assert session.broken is not None
    # The second connection skips CAPA.
    server2 = ScriptedServer(b"+OK hi\r\n", [(b"USER", b"+OK\r\n"), (b"PASS", b"+OK\r\n")])
    session2 = opened(server2, capa=False, allow_insecure=True)
    drive(session2.login(USER, PASSWORD), server2)
    assert server2.sent_lines()[0] == b"USER alice"


def test_err_greeting_raises_with_code() -> None:
    server = ScriptedServer(b"-ERR [SYS/TEMP] try later\r\n", [])
    session = ClientSession(tls_active=False)
    with pytest.raises(Pop3Error) as info:
        drive(session.open(), server)
    assert info.value.is_("SYS/TEMP")
    assert info.value.text == "try later"
    assert not session.usable
    assert server.received == b""


def test_escape_sequences_in_err_text_are_sanitised_in_str() -> None:
    server = ScriptedServer(b"-ERR \x1b[31mred\x07\r\n", [])
    session = ClientSession(tls_active=False)
    with pytest.raises(Pop3Error) as info:
        drive(session.open(), server)
    assert info.value.text == "\x1b[31mred\x07"  # kept as data
    assert "\x1b" not in str(info.value) and "\\x1b" in str(info.value)


def test_data_glued_to_greeting_is_never_credited_to_capa() -> None:
    # HARDENING 9: a CAPA listing glued to the greeting is unsolicited.
    server = ScriptedServer(b"+OK hi\r\n+OK\r\nSASL PLAIN\r\n.\r\n", [(b"CAPA", b"+OK\r\n.\r\n")])
    session = ClientSession(tls_active=False)
    with pytest.raises(p.RemoteProtocolError):
        drive(session.open(), server)
    assert server.received == b""
    assert not session.usable


def test_unsolicited_line_after_a_reply_breaks_the_session() -> None:
    # HARDENING 9: a line that came with a reply is never read as the reply
    # to the next command; the next command is not even sent.
    server = FakeServer([message(1)])
    session = logged_in(server)
    real = server.answer

    def chatty(cmd: p.Command) -> None:
        real(cmd)
        server.out += b"+OK surprise\r\n"

    server.answer = chatty  # type: ignore[method-assign]
    drive(session.noop(), server)
    sent = len(server.received)
    with pytest.raises(p.RemoteProtocolError):
        drive(session.stat(), server)
    assert len(server.received) == sent
    with pytest.raises(Pop3Error, match="unusable"):
        drive(session.noop(), server)


# ---------------------------------------------------------------------------
# STLS (HARDENING 29-32)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_starttls_upgrades_and_asks_capa_again(mode: str) -> None:
    server = FakeServer(stls=True, timestamp=STAMP, sasl=("PLAIN",))
    session = ClientSession(tls_active=False, starttls=True)
    run = drive(session.open(), server, mode=mode)
    assert session.tls_active and server.conn.tls_active
    assert server.sent_lines() == [b"CAPA", b"STLS", b"CAPA"]
    assert session.tls_info == TLSInfo(channel_bindings=CB)
    assert session.cached_capabilities is not None
    assert not session.cached_capabilities.stls
    assert session.last_status_line == b"+OK Begin TLS"
    # HARDENING 31: the plaintext greeting's APOP timestamp is forgotten.
    assert session.apop_timestamp is None
    assert sum(isinstance(r, StartTLS) for r in run.requests) == 1


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([(b"CAPA", b"+OK\r\nUSER\r\n.\r\n")], id="stls-stripped"),
        pytest.param(
            [(b"CAPA", b"+OK\r\nSTLS\r\n.\r\n"), (b"STLS", b"-ERR not now\r\n")], id="stls-refused"
        ),
        pytest.param([(b"CAPA", b"-ERR what\r\n")], id="capa-fails"),
        pytest.param([(b"CAPA", None)], id="capa-closes"),
    ],
)
def test_required_tls_aborts_before_any_credential(
    script: list[tuple[bytes, bytes | None]],
) -> None:
    # HARDENING 30.
    server = ScriptedServer(b"+OK hi " + STAMP.encode() + b"\r\n", script)
    session = ClientSession(tls_active=False, starttls=True, allow_insecure=True)
    with pytest.raises(Pop3TLSError):
        drive(session.open(), server)
    assert not session.usable
    for method in ("USER", "APOP", "PLAIN"):
        with pytest.raises(Pop3Error):
            drive(session.login(USER, PASSWORD, mechanism=method), server)
    sent = bytes(server.received)
    assert not re.search(rb"USER|PASS|APOP|AUTH", sent)
    assert PASSWORD.encode() not in sent


@pytest.mark.parametrize("mode", MODES)
def test_response_injected_after_stls_ok_aborts(mode: str) -> None:
    # HARDENING 29: "+OK Begin TLS\r\n+OK\r\n.\r\n" in one read or byte by
    # byte. In one read the engine sees the glued bytes; byte by byte they
    # are still unsent when the handshake starts, which then fails (a real
    # handshake would read them as TLS records).
    server = ScriptedServer(
        b"+OK hi\r\n",
        [(b"CAPA", b"+OK\r\nSTLS\r\n.\r\n"), (b"STLS", b"+OK Begin TLS\r\n+OK\r\n.\r\n")],
    )
    session = ClientSession(tls_active=False, starttls=True)
    with pytest.raises((p.RemoteProtocolError, Pop3TLSError)):
        drive(session.open(), server, mode=mode)
    assert not server.tls_started
    assert not session.usable
    assert server.sent_lines() == [b"CAPA", b"STLS"]


def test_pre_tls_capa_that_hid_mechanisms_has_no_effect() -> None:
    # HARDENING 31: an attacker strips SCRAM from the plaintext CAPA; after
    # TLS the real list is asked for and used.
    server = FakeServer(stls=True, sasl=("SCRAM-SHA-256", "PLAIN"))
    real_caps = server.caps

    def stripped() -> p.Capabilities:
        caps = real_caps()
        if server.conn.tls_active:
            return caps
        return p.Capabilities(
            [(k, v) for k, v in caps.items_ if k != "SASL"] + [("SASL", ("PLAIN",))]
        )

    server.caps = stripped  # type: ignore[method-assign]
    session = ClientSession(tls_active=False, starttls=True)
    drive(session.open(), server)
    drive(session.login(USER, PASSWORD), server)
    assert session.mechanism == "SCRAM-SHA-256"


def test_apop_greeting_and_stls_means_stls_first_and_no_apop() -> None:
    # HARDENING 32 (and 31: the timestamp came before TLS).
    server = FakeServer(stls=True, timestamp=STAMP, sasl=())
    session = ClientSession(tls_active=False, starttls=True)
    drive(session.open(), server)
    with pytest.raises(Pop3Error, match="APOP is not available"):
        drive(session.login(USER, PASSWORD, mechanism="APOP"), server)
    drive(session.login(USER, PASSWORD), server)
    lines = server.sent_lines()
    assert lines.index(b"STLS") < lines.index(b"USER alice")
    assert not any(line.startswith(b"APOP") for line in lines)
    assert session.mechanism == "USER"


def test_starttls_handshake_failure_breaks_the_session() -> None:
    server = FakeServer(stls=True)
    server.start_tls = lambda: False  # type: ignore[method-assign]
    session = ClientSession(tls_active=False, starttls=True)
    with pytest.raises(Pop3TLSError):
        drive(session.open(), server)
    assert session.broken is not None


def test_optional_starttls_refused_leaves_plaintext_usable() -> None:
    server = FakeServer(stls=False, sasl=())
    session = opened(server, allow_insecure=True)
    with pytest.raises(Pop3TLSError, match="does not offer STLS"):
        drive(session.starttls(), server)
    assert session.usable
    drive(session.login(USER, PASSWORD), server)
    assert session.state is p.State.TRANSACTION


# ---------------------------------------------------------------------------
# login
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "mechanism", ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "USER"]
)
def test_login_with_each_mechanism(mechanism: str, mode: str) -> None:
    server = FakeServer([message(1)])
    session = opened(server, tls_active=True)
    drive(session.login(USER, PASSWORD, mechanism=mechanism), server, mode=mode)
    assert session.state is p.State.TRANSACTION
    assert session.mechanism == mechanism
    assert drive(session.stat(), server).result == (1, p.wire_size([message(1)]))


def test_automatic_choice_prefers_scram_sha_256() -> None:
    server = FakeServer()
    session = opened(server, tls_active=True)
    drive(session.login(USER, PASSWORD), server)
    assert session.mechanism == "SCRAM-SHA-256"


def test_scram_plus_with_channel_binding_from_tls_info() -> None:
    server = FakeServer(sasl=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"), channel_binding=CB)
    session = opened(server, tls_active=True, tls_info=TLSInfo(channel_bindings=CB))
    drive(session.login(USER, PASSWORD), server)
    assert session.mechanism == "SCRAM-SHA-256-PLUS"


def test_scram_plus_fails_on_a_different_channel() -> None:
    # The server's channel differs from the client's (a man in the middle).
    server = FakeServer(sasl=("SCRAM-SHA-256-PLUS",), channel_binding=CB)
    other = {"tls-server-end-point": b"\x22" * 32}
    session = opened(server, tls_active=True, tls_info=TLSInfo(channel_bindings=other))
    with pytest.raises(Pop3Error) as info:
        drive(session.login(USER, PASSWORD), server)
    assert info.value.is_("AUTH")
    assert session.state is p.State.AUTHORIZATION


def test_scram_without_plus_signals_y_when_server_has_channel_binding() -> None:
    # RFC 5802 §6: the client has binding data but the server offers no
    # -PLUS, so it says "y"; a server that does support binding (a stripped
    # -PLUS) fails it.
    server = FakeServer(sasl=("SCRAM-SHA-256",), channel_binding=CB)
    session = opened(server, tls_active=True, tls_info=TLSInfo(channel_bindings=CB))
    with pytest.raises(Pop3Error):
        drive(session.login(USER, PASSWORD), server)
    server2 = FakeServer(sasl=("SCRAM-SHA-256",))
    session2 = opened(server2, tls_active=True, tls_info=TLSInfo(channel_bindings=CB))
    drive(session2.login(USER, PASSWORD), server2)
    assert session2.mechanism == "SCRAM-SHA-256"


@pytest.mark.parametrize("name", ["XOAUTH2", "OAUTHBEARER"])
def test_token_login(name: str) -> None:
    server = FakeServer(sasl=(name, "PLAIN"), tokens=True)
    session = opened(server, tls_active=True, host="pop.example", port=995)
    drive(session.login(USER, token=TOKEN), server)
    assert session.mechanism == name


def test_wrong_password_raises_with_auth_code_and_stays_usable() -> None:
    server = FakeServer(sasl=("PLAIN",))
    session = opened(server, tls_active=True)
    with pytest.raises(Pop3Error) as info:
        drive(session.login(USER, "wrong"), server)
    assert info.value.is_("AUTH")
    assert session.usable and session.state is p.State.AUTHORIZATION
    # Failed credentials are not retried in another form.
    assert sum(line.startswith(b"AUTH") for line in server.sent_lines()) == 1
    drive(session.login(USER, PASSWORD), server)
    assert session.state is p.State.TRANSACTION


def test_initial_response_only_when_it_fits_255_octets() -> None:
    server = FakeServer(sasl=("PLAIN",))
    session = opened(server, tls_active=True)
    drive(session.login(USER, PASSWORD), server)
    first = server.sent_lines()[1]
    assert first.startswith(b"AUTH PLAIN ") and len(first) + 2 <= 255

    long_password = "p" * 300
    server = FakeServer(sasl=("PLAIN",))
    server.table = PasswordTable({USER: long_password})
    session = opened(server, tls_active=True)
    drive(session.login(USER, long_password), server)
    lines = server.sent_lines()
    assert lines[1] == b"AUTH PLAIN"
    assert session.state is p.State.TRANSACTION


def test_no_initial_response_when_capa_lists_no_sasl() -> None:
    # RFC 5034 §3: without SASL in CAPA, never an initial response.
    server = FakeServer(sasl=("PLAIN",))
    real = server.caps
    server.caps = lambda: p.Capabilities([(k, v) for k, v in real().items_ if k != "SASL"])  # type: ignore[method-assign]
    session = opened(server, tls_active=True)
    drive(session.login(USER, PASSWORD, mechanism="PLAIN"), server)
    assert server.sent_lines()[1] == b"AUTH PLAIN"
    assert session.state is p.State.TRANSACTION


def test_rejected_one_line_form_is_retried_in_two_steps() -> None:
    server = FakeServer(sasl=("XOAUTH2",), tokens=True, reject_initial_response=True)
    session = opened(server, tls_active=True)
    drive(session.login(USER, token=TOKEN), server)
    auths = [line for line in server.sent_lines() if line.startswith(b"AUTH")]
    assert auths[0].startswith(b"AUTH XOAUTH2 ") and auths[1] == b"AUTH XOAUTH2"
    assert session.state is p.State.TRANSACTION


@pytest.mark.parametrize("code", [b"", b"[AUTH] "])
def test_refused_two_step_form_is_retried_on_one_line_past_255_octets(code: bytes) -> None:
    # A long token does not fit RFC 5034's 255 octets, so the two-step form
    # comes first; a server that refuses it outright (no "+ " at all) gets the
    # one-line form once, unless its refusal is final ([AUTH]).
    token = "ya29." + "t" * 400
    ir = b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode())
    script: list[tuple[bytes, bytes | None]] = [
        (b"CAPA", b"+OK\r\nSASL XOAUTH2\r\n.\r\n"),
        (b"AUTH XOAUTH2", b"-ERR " + code + b"initial response required\r\n"),
    ]
    if not code:
        script.append((b"AUTH XOAUTH2 " + ir, b"+OK welcome\r\n"))
    server = ScriptedServer(b"+OK hi\r\n", script)
    session = opened(server, tls_active=True)
    if code:
        with pytest.raises(Pop3Error, match="initial response required"):
            drive(session.login(USER, token=token), server)
        assert session.state is p.State.AUTHORIZATION
    else:
        drive(session.login(USER, token=token), server)
        assert session.state is p.State.TRANSACTION and session.mechanism == "XOAUTH2"
    auths = [line for line in server.received.split(b"\r\n") if line.startswith(b"AUTH")]
    assert auths[0] == b"AUTH XOAUTH2"
    assert auths[1:] == ([] if code else [b"AUTH XOAUTH2 " + ir])


def test_malformed_challenge_is_cancelled() -> None:
    server = ScriptedServer(
        b"+OK hi\r\n",
        [
            (b"CAPA", b"+OK\r\nSASL CRAM-MD5\r\nUSER\r\n.\r\n"),
            (b"AUTH CRAM-MD5", b"+ !!notbase64!!\r\n"),
            (b"*", b"-ERR cancelled\r\n"),
            (b"USER", b"+OK\r\n"),
            (b"PASS", b"+OK in\r\n"),
        ],
    )
    session = opened(server, tls_active=True)
    with pytest.raises(Pop3Error, match="not valid base64"):
        drive(session.login(USER, PASSWORD), server)
    assert session.usable
    drive(session.login(USER, PASSWORD, mechanism="USER"), server)
    assert session.state is p.State.TRANSACTION


def test_mechanism_error_is_cancelled() -> None:
    # A SCRAM server-first whose nonce does not extend the client's.
    bogus = b64encode(b"r=other,s=" + b64encode(b"salt") + b",i=4096")
    server = ScriptedServer(
        b"+OK hi\r\n",
        [
            (b"CAPA", b"+OK\r\nSASL SCRAM-SHA-256\r\n.\r\n"),
            (b"AUTH SCRAM-SHA-256", b"+ " + bogus + b"\r\n"),
            (b"*", b"-ERR cancelled\r\n"),
        ],
    )
    session = opened(server, tls_active=True)
    with pytest.raises(Pop3Error, match="cancelled"):
        drive(session.login(USER, PASSWORD), server)
    assert session.usable and session.state is p.State.AUTHORIZATION
    assert server.sent_lines()[-1] == b"*"


def test_scram_ok_without_server_proof_is_not_trusted() -> None:
    class Skipping(FakeServer):
        def sasl_step(self, step: object) -> None:
            if isinstance(step, Challenge) and step.data.startswith(b"v="):
                self.finish(True)  # +OK without sending the signature
            else:
                super().sasl_step(step)

    server = Skipping(sasl=("SCRAM-SHA-256",))
    session = opened(server, tls_active=True)
    with pytest.raises(Pop3Error, match="not trusted"):
        drive(session.login(USER, PASSWORD), server)
    assert not session.usable
    with pytest.raises(Pop3Error):
        drive(session.stat(), server)


def test_plaintext_secrets_refused_without_tls() -> None:
    # HARDENING 39: nothing is sent.
    server = FakeServer(sasl=("PLAIN", "LOGIN"), timestamp=STAMP)
    session = opened(server)
    for mechanism in (None, "PLAIN", "LOGIN", "USER", "APOP"):
        with pytest.raises(Pop3TLSError):
            drive(session.login(USER, PASSWORD, mechanism=mechanism), server)
    assert server.sent_lines() == [b"CAPA"]
    assert session.usable


def test_challenge_response_mechanisms_allowed_without_tls() -> None:
    server = FakeServer(sasl=("SCRAM-SHA-1", "PLAIN"))
    session = opened(server)
    drive(session.login(USER, PASSWORD), server)
    assert session.mechanism == "SCRAM-SHA-1"


def test_allow_insecure_permits_plaintext() -> None:
    server = FakeServer(sasl=("PLAIN",))
    session = opened(server, allow_insecure=True)
    drive(session.login(USER, PASSWORD), server)
    assert session.mechanism == "PLAIN"


def test_apop_automatic_only_under_tls() -> None:
    # HARDENING 40: under implicit TLS the greeting's timestamp is usable.
    server = FakeServer(sasl=(), timestamp=STAMP)
    session = opened(server, tls_active=True)
    drive(session.login(USER, PASSWORD), server)
    assert session.mechanism == "APOP"
    # Without TLS, even with allow_insecure, APOP is not chosen by itself.
    server = FakeServer(sasl=(), timestamp=STAMP)
    session = opened(server, allow_insecure=True)
    drive(session.login(USER, PASSWORD), server)
    assert session.mechanism == "USER"


def test_apop_refused_for_a_timestamp_that_is_not_a_msg_id() -> None:
    # HARDENING 8: 2 KB of "<" is read in linear time and gives no APOP.
    server = ScriptedServer(b"+OK " + b"<" * 2000 + b"\r\n", [(b"CAPA", b"-ERR\r\n")])
    session = opened(server, tls_active=True)
    assert session.apop_timestamp is None
    with pytest.raises(Pop3Error, match="APOP is not available"):
        drive(session.login(USER, PASSWORD, mechanism="APOP"), server)


def test_control_characters_in_credentials_refused_before_sending() -> None:
    # HARDENING 11.
    server = FakeServer(sasl=())
    session = opened(server, tls_active=True)
    with pytest.raises((p.LocalProtocolError, ValueError)):
        drive(session.login("al\r\nice", PASSWORD), server)
    assert server.sent_lines() == [b"CAPA"]


# ---------------------------------------------------------------------------
# transaction
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_listing_and_retrieval(mode: str) -> None:
    msgs = [message(i, 200 + 50 * i) for i in range(1, 6)]
    server = FakeServer(msgs)
    session = logged_in(server)
    assert drive(session.stat(), server, mode=mode).result == (5, p.wire_size(msgs))
    sizes = drive(session.list(), server, mode=mode).result
    assert sizes == {i: p.wire_size([m]) for i, m in enumerate(msgs, 1)}
    assert drive(session.list(3), server, mode=mode).result == sizes[3]
    assert drive(session.uidl(), server, mode=mode).result == {i: f"uid{i}" for i in range(1, 6)}
    assert drive(session.uidl(2), server, mode=mode).result == "uid2"
    for i, m in enumerate(msgs, 1):
        assert drive(session.retrieve(i), server, mode=mode).result == crlf(m)
    top = drive(session.top(1, 1), server, mode=mode).result
    assert top == b"Subject: message 1\r\n\r\n.leading dot\r\n"


@pytest.mark.parametrize("mode", MODES)
def test_retrieve_stream_delivers_pieces(mode: str) -> None:
    msg = message(1, 5000)
    server = FakeServer([msg])
    session = logged_in(server)
    run = drive(session.retrieve_stream(1), server, mode=mode)
    assert b"".join(run.chunks) == crlf(msg)
    assert run.result == len(crlf(msg))
    if mode == "bytewise":
        assert len(run.chunks) > 100


def test_err_on_retr_keeps_session_usable() -> None:
    server = FakeServer([message(1)])
    session = logged_in(server)
    with pytest.raises(Pop3Error, match="no such message"):
        drive(session.retrieve(7), server)
    assert session.usable
    assert drive(session.retrieve(1), server).result == crlf(message(1))


def test_bad_arguments_raise_before_sending() -> None:
    server = FakeServer([message(1)])
    session = logged_in(server)
    before = len(server.received)
    for gen in (session.retrieve(0), session.top(1, -1), session.list(2**40)):
        with pytest.raises(ValueError):
            drive(gen, server)
    assert len(server.received) == before
    assert session.usable


def test_delete_reset_noop_quit() -> None:
    msgs = [message(i) for i in range(1, 4)]
    server = FakeServer(msgs)
    session = logged_in(server)
    drive(session.delete(2), server)
    assert drive(session.stat(), server).result[0] == 2
    drive(session.reset(), server)
    assert drive(session.stat(), server).result[0] == 3
    drive(session.noop(), server)
    drive(session.delete(1), server)
    assert drive(session.quit(), server).result is True
    assert len(server.messages) == 2
    assert session.state is p.State.CLOSED
    with pytest.raises(Pop3Error):
        drive(session.noop(), server)


def test_quit_without_ok_reports_uncertain_deletions() -> None:
    # PROTOCOL §12.8: the server just closes.
    server = ScriptedServer(
        b"+OK hi\r\n",
        [(b"CAPA", b"-ERR\r\n"), (b"USER", b"+OK\r\n"), (b"PASS", b"+OK\r\n"), (b"QUIT", None)],
    )
    session = opened(server, allow_insecure=True)
    drive(session.login(USER, PASSWORD), server)
    assert drive(session.quit(), server).result is False


def test_quit_err_in_update_is_false() -> None:
    server = ScriptedServer(
        b"+OK hi\r\n",
        [
            (b"CAPA", b"-ERR\r\n"),
            (b"USER", b"+OK\r\n"),
            (b"PASS", b"+OK\r\n"),
            (b"QUIT", b"-ERR [SYS/TEMP] some deleted messages not removed\r\n"),
        ],
    )
    session = opened(server, allow_insecure=True)
    drive(session.login(USER, PASSWORD), server)
    assert drive(session.quit(), server).result is False


# ---------------------------------------------------------------------------
# deadlines and broken sessions (HARDENING 10, 48)
# ---------------------------------------------------------------------------


def test_receive_budget_is_command_timeout_plus_progress() -> None:
    msg = message(1, 70_000)
    server = FakeServer([msg])
    session = logged_in(server, command_timeout=5.0, min_transfer_rate=1000.0)
    seen: list[float | None] = []
    drive(
        session.retrieve(1),
        server,
        mode="random",
        on_request=lambda r: seen.append(r.timeout) if isinstance(r, Receive) else None,
    )
    assert seen[0] == 5.0
    # Each read's budget grows by received/min_transfer_rate, never shrinks.
    assert seen == sorted(seen)
    assert seen[-1] is not None and seen[-1] > 5.0 + 60.0


def test_greeting_uses_its_own_timeout() -> None:
    server = FakeServer()
    seen: list[float | None] = []
    session = ClientSession(tls_active=True, greeting_timeout=3.0, command_timeout=9.0)
    drive(
        session.open(),
        server,
        on_request=lambda r: seen.append(r.timeout) if isinstance(r, Receive) else None,
    )
    assert seen[0] == 3.0 and seen[-1] is not None and seen[-1] >= 9.0


def test_timeout_breaks_the_session() -> None:
    server = ScriptedServer(b"+OK hi\r\n", [(b"CAPA", b"+OK\r\nUSER\r\n")])  # never ends
    session = ClientSession(tls_active=True)
    with pytest.raises(Pop3TimeoutError):
        drive(session.open(), server)
    assert isinstance(Pop3TimeoutError("x"), TimeoutError)
    with pytest.raises(Pop3Error, match="unusable"):
        drive(session.login(USER, PASSWORD), server)


def test_timeout_mid_pipeline_is_never_resumed() -> None:
    msgs = [message(i, 2000) for i in range(1, 9)]
    server = FakeServer(msgs)
    session = logged_in(server)
    reads = 0

    class Stall:
        """Hands over the first few reads, then goes silent."""

        def __init__(self, inner: FakeServer) -> None:
            self.inner = inner
            self.closed = False

        def feed(self, data: bytes) -> None:
            self.inner.feed(data)

        def take(self, n: int | None) -> bytes:
            nonlocal reads
            reads += 1
            return self.inner.take(100) if reads < 20 else b""

    with pytest.raises(Pop3TimeoutError):
        drive(session.retrieve_many(range(1, 9)), Stall(server))
    assert session.broken is not None
    with pytest.raises(Pop3Error, match="unusable"):
        drive(session.retrieve(1), server)


def test_abandoned_operation_breaks_the_session() -> None:
    server = FakeServer([message(1, 5000)])
    session = logged_in(server)
    gen = session.retrieve_stream(1)
    result: object = None
    for _ in range(6):
        req = gen.send(result)
        if isinstance(req, Send):
            server.feed(req.data)
        result = server.take(50) if isinstance(req, Receive) else None
    gen.close()
    assert session.broken is not None
    with pytest.raises(Pop3Error, match="unusable"):
        drive(session.noop(), server)


# ---------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["whole", "random"])
def test_retrieve_many_pipelines_in_windows(mode: str) -> None:
    msgs = [message(i, 500) for i in range(1, 41)]
    server = FakeServer(msgs)
    session = logged_in(server)
    run = drive(session.retrieve_many(range(1, 41), window=8), server, mode=mode)
    assert run.messages == [(i, crlf(m)) for i, m in enumerate(msgs, 1)]
    assert run.result == 40
    sends = [r.data for r in run.requests if isinstance(r, Send)]
    counts = [s.count(b"RETR ") for s in sends]
    assert counts[0] == 8 and max(counts) == 8 and sum(counts) == 40
    assert len(sends) < 40  # one write per batch, not per message


def test_retrieve_many_without_pipelining_is_one_at_a_time() -> None:
    msgs = [message(i) for i in range(1, 6)]
    server = FakeServer(msgs, pipelining=False)
    session = logged_in(server)
    run = drive(session.retrieve_many([5, 3, 1]), server)
    assert [m for m, _ in run.messages] == [5, 3, 1]
    sends = [r.data for r in run.requests if isinstance(r, Send)]
    assert all(s.count(b"RETR ") == 1 for s in sends)


def test_retrieve_many_error_drains_then_raises() -> None:
    msgs = [message(i) for i in range(1, 6)]
    server = FakeServer(msgs)
    session = logged_in(server)
    wanted = [1, 2, 9, 3, 4, 5, 1, 2, 3, 4]
    got: list[int] = []

    def seen(req: object) -> None:
        if isinstance(req, DeliverMessage):
            got.append(req.msg)

    with pytest.raises(Pop3Error, match="no such message"):
        drive(session.retrieve_many(wanted, window=4), server, on_request=seen)
    # Window 4, refilled at half: 1 2 9 3 went out, then 4 5 while 9 was
    # still unanswered; after the -ERR nothing more was asked for, and what
    # was asked for was read and delivered.
    retrs = [line for line in server.sent_lines() if line.startswith(b"RETR")]
    assert retrs == [b"RETR %d" % n for n in (1, 2, 9, 3, 4, 5)]
    assert got == [1, 2, 3, 4, 5]
    assert session.usable
    assert drive(session.retrieve(5), server).result == crlf(msgs[4])


@pytest.mark.parametrize("mode", MODES)
def test_retrieve_many_stream_asks_for_the_next_while_one_streams(mode: str) -> None:
    msgs = [message(i, 3000) for i in range(1, 7)]
    server = FakeServer(msgs)
    session = logged_in(server)
    run = drive(session.retrieve_many_stream([2, 4, 6, 1]), server, mode=mode)
    got = run.streamed()
    assert list(got) == [2, 4, 6, 1]
    assert all(got[n] == crlf(msgs[n - 1]) for n in got)
    assert run.result == 4
    assert run.messages == []  # nothing was held whole
    sends = [r.data for r in run.requests if isinstance(r, Send)]
    assert sends[0].count(b"RETR ") == 2
    retrs = [line for line in server.sent_lines() if line.startswith(b"RETR")]
    assert retrs == [b"RETR 2", b"RETR 4", b"RETR 6", b"RETR 1"]


def test_retrieve_many_stream_error_drains_then_raises() -> None:
    msgs = [message(i, 2000) for i in range(1, 4)]
    server = FakeServer(msgs)
    session = logged_in(server)
    requests: list[object] = []
    with pytest.raises(Pop3Error, match="no such message"):
        drive(session.retrieve_many_stream([1, 9, 2, 3]), server, on_request=requests.append)
    partial = Run()
    partial.requests = requests
    got = partial.streamed()
    # RETR 2 was asked for before the -ERR to 9 was read: delivered; 3 not.
    assert list(got) == [1, 2] and got[2] == crlf(msgs[1])
    retrs = [line for line in server.sent_lines() if line.startswith(b"RETR")]
    assert retrs == [b"RETR 1", b"RETR 9", b"RETR 2"]
    assert session.usable


def test_retrieve_many_stream_without_pipelining_is_one_at_a_time() -> None:
    msgs = [message(i) for i in range(1, 4)]
    server = FakeServer(msgs, pipelining=False)
    session = logged_in(server)
    run = drive(session.retrieve_many_stream([3, 1]), server)
    assert list(run.streamed()) == [3, 1]
    sends = [r.data for r in run.requests if isinstance(r, Send)]
    assert all(s.count(b"RETR ") <= 1 for s in sends)


def test_delete_many_pipelined() -> None:
    msgs = [message(i) for i in range(1, 31)]
    server = FakeServer(msgs)
    session = logged_in(server)
    assert drive(session.delete_many(range(1, 31, 2)), server).result == 15
    assert drive(session.stat(), server).result[0] == 15
    with pytest.raises(Pop3Error):
        drive(session.delete_many([2, 1, 4]), server)  # 1 is deleted already
    assert drive(session.stat(), server).result[0] == 13


def test_window_is_bounded_by_max_pipeline() -> None:
    msgs = [message(i) for i in range(1, 21)]
    server = FakeServer(msgs)
    session = logged_in(server, limits=p.Limits(max_pipeline=4))
    run = drive(session.retrieve_many(range(1, 21), window=64), server)
    assert len(run.messages) == 20
    sends = [r.data for r in run.requests if isinstance(r, Send)]
    assert max(s.count(b"RETR ") for s in sends) == 4


# ---------------------------------------------------------------------------
# raw access (used by the poplib-compatible layer)
# ---------------------------------------------------------------------------


def test_execute_returns_events_and_raw_status_lines() -> None:
    server = FakeServer([message(1)])
    session = opened(server, tls_active=True)
    event = drive(session.execute(p.User(USER)), server).result
    assert event == p.Ok("send PASS") and session.last_status_line == b"+OK send PASS"
    drive(session.execute(p.Pass(PASSWORD)), server)
    assert session.state is p.State.TRANSACTION
    start, body = drive(session.execute_body(p.Retr(1)), server).result
    assert isinstance(start, p.MessageStart) and body == crlf(message(1))
    assert session.last_status_line == b"+OK follows"
    with pytest.raises(Pop3Error):
        drive(session.execute(p.Dele(5)), server)
    assert session.last_status_line == b"-ERR no such message"


def test_execute_continues_a_sasl_exchange() -> None:
    server = FakeServer(sasl=("PLAIN",))
    session = opened(server, tls_active=True)
    challenge = drive(session.execute(p.Auth("PLAIN")), server).result
    assert challenge == p.AuthChallenge(b"")
    ok = drive(session.execute(p.AuthResponse(f"\0{USER}\0{PASSWORD}".encode())), server).result
    assert isinstance(ok, p.Ok) and session.state is p.State.TRANSACTION


def test_execute_applies_the_plaintext_policy() -> None:
    server = FakeServer()
    session = opened(server)
    with pytest.raises(Pop3TLSError):
        drive(session.execute(p.Pass("x")), server)
    with pytest.raises(Pop3TLSError):
        drive(session.execute(p.Auth("PLAIN", b"\0a\0b")), server)


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------

_LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(
        st.one_of(_LINE, st.sampled_from([b".", b"..", b".x", b"", b". "])), max_size=30
    ),
    lf=st.booleans(),
    seed=st.integers(0, 1000),
    mode=st.sampled_from(MODES),
)
def test_any_message_comes_back_exactly(lines: list[bytes], lf: bool, seed: int, mode: str) -> None:
    stored = (b"\n" if lf else b"\r\n").join(lines)
    server = FakeServer([stored, stored + b"\r\nend"])
    session = logged_in(server)
    run = drive(session.retrieve_many([1, 2]), server, mode=mode, seed=seed)
    assert run.messages == [(1, crlf(stored)), (2, crlf(stored + b"\r\nend"))]
