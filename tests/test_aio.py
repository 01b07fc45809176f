"""The asyncio binding (``pop3proto.bindings.aio``): the server against the
standard library's poplib, curl, mpop, fetchmail and raw sockets; the client
against our own asyncio server and against Dovecot.

Every test runs its asyncio code on a fresh event loop (uvloop too where a
test says so and uvloop is installed) and on both engine backends. Blocking
peers (poplib, curl, mpop, fetchmail, raw sockets) run in worker threads
through ``asyncio.to_thread`` while the server runs on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import poplib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from peers import (
    DovecotServer,
    fill_maildir,
    generate_message,
    normalise_delivered,
    run_curl,
    run_curl_retr,
    run_fetchmail,
    run_mpop,
    wire_form,
)
from pop3proto.bindings import aio
from pop3proto.bindings.aio import Server, connect
from pop3proto.bindings.maildrop import Maildir, Maildrop, MemoryMaildrop

import pop3proto as p
from pop3proto import _requests as rq
from pop3proto._auth import FailureDelay, PasswordTable

pytestmark = pytest.mark.usefixtures("backend")

T = TypeVar("T")

USER = "alice"
PASSWORD = "secret"
COUNT = 12
SIZE = 3000
LOOPS = ["asyncio", "uvloop"]


# ---------------------------------------------------------------------------
# Event loops, certificates, mailboxes, servers
# ---------------------------------------------------------------------------


def run(main: Callable[[], Awaitable[T]], loop: str = "asyncio", limit: float = 60.0) -> T:
    """Run ``main()`` on a fresh loop of kind ``loop`` (skip when uvloop is
    missing), failing after ``limit`` seconds; leftovers are cancelled."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        ev = uvloop.new_event_loop()
    else:
        ev = asyncio.new_event_loop()
    try:
        return ev.run_until_complete(asyncio.wait_for(main(), limit))
    finally:
        pending = asyncio.all_tasks(ev)
        for task in pending:
            task.cancel()
        if pending:
            ev.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        ev.run_until_complete(ev.shutdown_asyncgens())
        ev.run_until_complete(ev.shutdown_default_executor())
        ev.close()


@dataclass(frozen=True)
class Certs:
    cafile: Path
    server: ssl.SSLContext
    client: ssl.SSLContext
    der: bytes


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    cafile = tmp_path_factory.mktemp("certs") / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode("ascii"))
    return Certs(cafile, server, client, der)


@dataclass
class Box:
    """A maildrop for USER and what a client must get back from it."""

    maildrop: Maildrop
    #: The retrieved (wire, un-stuffed) form of message n, at index n - 1.
    expected: list[bytes]
    #: LIST size of message n, at index n - 1.
    sizes: list[int]
    root: Path | None = None

    def files(self) -> list[str]:
        assert self.root is not None
        d = self.root / USER
        return sorted(os.listdir(d / "cur") + os.listdir(d / "new"))


def memory_box(count: int = COUNT, size: int = SIZE) -> Box:
    msgs = [generate_message(USER, n, size) for n in range(1, count + 1)]
    return Box(
        MemoryMaildrop({USER: msgs}),
        [wire_form(m) for m in msgs],
        [len(m) + m.count(b"\n") for m in msgs],
    )


def maildir_box(root: Path, count: int = COUNT, size: int = SIZE) -> Box:
    manifest = fill_maildir(root / USER, USER, count, size)
    numbers = range(1, count + 1)
    return Box(
        Maildir(root),
        [manifest.expected(n) for n in numbers],
        [manifest[n].size for n in numbers],
        root,
    )


@pytest.fixture(params=["memory", "maildir"])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Box:
    return memory_box() if request.param == "memory" else maildir_box(tmp_path)


def make_config(**kw: Any) -> p.ServerConfig:
    kw.setdefault("authenticator", PasswordTable({USER: PASSWORD, "bob": "hunter2"}))
    kw.setdefault("failure_delay", FailureDelay(base=0.0))
    return p.ServerConfig(**kw)


def make_server(
    maildrop: Maildrop,
    certs: Certs | None = None,
    *,
    handshake_timeout: float = 30.0,
    **config: Any,
) -> Server:
    config.setdefault("stls_available", certs is not None)
    return Server(
        maildrop,
        listen=("127.0.0.1", 0),
        tls_listen=("127.0.0.1", 0) if certs else None,
        ssl_context=certs.server if certs else None,
        server_certificate=certs.der if certs else None,
        config=make_config(**config),
        handshake_timeout=handshake_timeout,
    )


def port_of(server: Server, implicit: bool = False) -> int:
    return next(port for _, port, tls in server.addresses if tls == implicit)


def serve(server: Server, client: Callable[[], Awaitable[T]], loop: str = "asyncio") -> T:
    """Run ``server`` while ``client()`` runs on the same loop, then close it."""

    async def main() -> T:
        async with server:
            return await client()

    return run(main, loop)


def serve_blocking(server: Server, fn: Callable[[], T], loop: str = "asyncio") -> T:
    """Run ``server`` while the blocking ``fn()`` runs in a worker thread."""
    return serve(server, lambda: asyncio.to_thread(fn), loop)


class Raw:
    """A byte-level blocking client, for what no real client does."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(bytes(self.buffer))
            self.buffer += data
        end = self.buffer.index(b"\r\n") + 2
        out = bytes(self.buffer[:end])
        del self.buffer[:end]
        return out

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.line()

    def login(self) -> None:
        assert self.line().startswith(b"+OK")
        self.authenticate()

    def authenticate(self) -> None:
        assert self.command(b"USER " + USER.encode()).startswith(b"+OK")
        assert self.command(b"PASS " + PASSWORD.encode()).startswith(b"+OK")

    def rest(self) -> bytes:
        """Everything until the server closes (a reset counts as closed)."""
        out = bytes(self.buffer)
        self.buffer.clear()
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return out
            if not data:
                return out
            out += data

    def reset(self) -> None:
        """Drop the connection with a TCP reset (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------
# The server against real clients: every message byte-exact
# ---------------------------------------------------------------------------


def poplib_session(
    mode: str, server: Server, certs: Certs, box: Box, *, check_top: bool = True
) -> None:
    if mode == "pop3s":
        pop: poplib.POP3 = poplib.POP3_SSL(
            "127.0.0.1", port_of(server, True), context=certs.client, timeout=10
        )
    else:
        pop = poplib.POP3("127.0.0.1", port_of(server), timeout=10)
        if mode == "stls":
            pop.stls(certs.client)
    try:
        if mode != "plain":
            assert pop.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
        assert pop.getwelcome().startswith(b"+OK")
        caps = pop.capa()
        assert "PIPELINING" in caps and "UIDL" in caps
        assert ("STLS" in caps) == (mode == "plain")
        pop.user(USER)
        pop.pass_(PASSWORD)
        assert pop.stat() == (len(box.expected), sum(box.sizes))
        _resp, listing, _ = pop.list()
        assert [tuple(map(int, x.split())) for x in listing] == [
            (n, s) for n, s in enumerate(box.sizes, 1)
        ]
        _resp, uids, _ = pop.uidl()
        assert len({u.split()[1] for u in uids}) == len(box.expected)
        for n, expected in enumerate(box.expected, 1):
            _resp, lines, _octets = pop.retr(n)
            assert b"".join(line + b"\r\n" for line in lines) == expected, n
        if check_top:
            _resp, lines, _ = pop.top(1, 0)
            head = box.expected[0][: box.expected[0].index(b"\r\n\r\n") + 4]
            assert b"".join(line + b"\r\n" for line in lines) == head
        assert pop.quit().startswith(b"+OK")
    finally:
        pop.close()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_poplib_retrieves_every_message_byte_exact(
    mode: str, loop: str, box: Box, certs: Certs
) -> None:
    server = make_server(box.maildrop, certs)
    serve_blocking(server, lambda: poplib_session(mode, server, certs, box), loop)
    # QUIT without DELE removes nothing.
    if box.root is not None:
        assert len(box.files()) == COUNT


@pytest.mark.peers
@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_curl_retrieves_every_message_byte_exact(mode: str, tmp_path: Path, certs: Certs) -> None:
    b = maildir_box(tmp_path)
    server = make_server(b.maildrop, certs)

    def fetch() -> tuple[bytes, dict[int, bytes]]:
        if mode == "pop3s":
            base = f"pop3s://127.0.0.1:{port_of(server, True)}"
        else:
            base = f"pop3://127.0.0.1:{port_of(server)}"
        kw: dict[str, Any] = dict(
            user=USER, password=PASSWORD, cafile=certs.cafile, starttls=mode == "stls"
        )
        listing = run_curl(base + "/", **kw)
        return listing, run_curl_retr(base, list(range(1, COUNT + 1)), **kw)

    listing, got = serve_blocking(server, fetch)
    assert listing == b"".join(b"%d %d\r\n" % (n, s) for n, s in enumerate(b.sizes, 1))
    assert sorted(got) == list(range(1, COUNT + 1))
    for n, data in got.items():
        assert data == b.expected[n - 1], n


@pytest.mark.peers
@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_mpop_delivers_every_message_byte_exact(mode: str, tmp_path: Path, certs: Certs) -> None:
    b = maildir_box(tmp_path / "server")
    server = make_server(b.maildrop, certs)
    got = serve_blocking(
        server,
        lambda: run_mpop(
            "127.0.0.1",
            port_of(server, mode == "pop3s"),
            USER,
            PASSWORD,
            tmp_path / "out",
            tls=mode == "pop3s",
            starttls=mode == "stls",
            cafile=certs.cafile,
            auth="user",
        ),
    )
    assert [normalise_delivered(m.data) for m in got] == b.expected


@pytest.mark.peers
@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_fetchmail_delivers_every_message_byte_exact(
    mode: str, tmp_path: Path, certs: Certs
) -> None:
    b = maildir_box(tmp_path / "server")
    server = make_server(b.maildrop, certs)
    got = serve_blocking(
        server,
        lambda: run_fetchmail(
            "127.0.0.1",
            port_of(server, mode == "pop3s"),
            USER,
            PASSWORD,
            tmp_path / "out",
            tls=mode == "pop3s",
            starttls=mode == "stls",
            cafile=certs.cafile,
            tls_name="localhost",
        ),
    )
    assert [m.path.name for m in got] == [f"{n:06d}.eml" for n in range(1, COUNT + 1)]
    assert [normalise_delivered(m.data) for m in got] == b.expected
    assert len(b.files()) == COUNT  # fetchmail ran with "keep"


# ---------------------------------------------------------------------------
# TLS upgrade (HARDENING 27, 28, 33, 34)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("wire", [b"STLS\r\nCAPA\r\n", b"STLS\nCAPA\n"])
def test_hardening_27_stls_injection_in_one_segment_is_never_executed(
    wire: bytes, certs: Certs
) -> None:
    server = make_server(memory_box(2).maildrop, certs)

    def attack() -> bytes:
        raw = Raw(port_of(server))
        assert raw.line().startswith(b"+OK")
        raw.sock.sendall(wire)
        return raw.rest()

    after = serve_blocking(server, attack)
    assert b"+OK" not in after  # neither "Begin TLS" nor a CAPA answer
    assert after.startswith(b"-ERR")


@pytest.mark.parametrize("loop", LOOPS)
def test_hardening_28_plaintext_in_a_second_segment_is_never_executed(
    loop: str, certs: Certs
) -> None:
    server = make_server(memory_box(2).maildrop, certs)

    def attack() -> bytes:
        raw = Raw(port_of(server))
        assert raw.line().startswith(b"+OK")
        assert raw.command(b"STLS").startswith(b"+OK")
        raw.sock.sendall(b"CAPA\r\n")  # where the ClientHello belongs
        return raw.rest()

    after = serve_blocking(server, attack, loop)
    # The server's TLS layer may answer with an alert record; never with POP3.
    assert b"+OK" not in after and b"TOP" not in after and b"-ERR" not in after


def test_hardening_28_plaintext_buffered_before_the_handshake_fails_the_upgrade(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server waits (as it would for a slow client to read the +OK) and
    meanwhile the plaintext lands in its buffer: the upgrade must refuse it
    rather than hand it to the engine after the handshake."""
    slow = aio._ServerConnection._flushed

    async def flushed_late(self: aio._ServerConnection) -> bool:
        await asyncio.sleep(0.3)
        return await slow(self)

    started: list[object] = []
    real_start_tls = asyncio.BaseEventLoop.start_tls

    async def spy(self: asyncio.BaseEventLoop, *args: Any, **kw: Any) -> Any:
        started.append(args)
        return await real_start_tls(self, *args, **kw)

    monkeypatch.setattr(aio._ServerConnection, "_flushed", flushed_late)
    monkeypatch.setattr(asyncio.BaseEventLoop, "start_tls", spy)
    server = make_server(memory_box(2).maildrop, certs)

    def attack() -> bytes:
        raw = Raw(port_of(server))
        assert raw.line().startswith(b"+OK")
        assert raw.command(b"STLS").startswith(b"+OK")
        raw.sock.sendall(b"CAPA\r\n")
        return raw.rest()

    assert serve_blocking(server, attack) == b""
    assert started == []  # the handshake was never attempted


def test_hardening_33_stls_refused_after_tls_and_without_certificate(certs: Certs) -> None:
    server = make_server(memory_box(1).maildrop, certs)

    def twice() -> None:
        pop = poplib.POP3("127.0.0.1", port_of(server), timeout=5)
        pop.stls(certs.client)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop._shortcmd("STLS")  # type: ignore[attr-defined]
        pop.user(USER)
        pop.pass_(PASSWORD)  # the session is still usable
        pop.quit()

    serve_blocking(server, twice)
    plain = make_server(memory_box(1).maildrop)

    def without_cert() -> None:
        raw = Raw(port_of(plain))
        raw.line()
        assert raw.command(b"STLS").startswith(b"-ERR")
        assert raw.command(b"NOOP").startswith(b"-ERR")  # still AUTHORIZATION, still talking
        raw.close()

    serve_blocking(plain, without_cert)


@pytest.mark.parametrize("implicit", [True, False])
def test_hardening_34_stalled_handshake_is_closed_at_the_deadline(
    implicit: bool, certs: Certs
) -> None:
    server = make_server(memory_box(1).maildrop, certs, handshake_timeout=0.4)

    def stall() -> float:
        raw = Raw(port_of(server, implicit))
        if not implicit:
            raw.line()
            assert raw.command(b"STLS").startswith(b"+OK")
        start = time.monotonic()
        assert raw.rest() == b""
        return time.monotonic() - start

    waited = serve_blocking(server, stall)
    assert 0.3 <= waited < 3.0


# ---------------------------------------------------------------------------
# Deadlines, caps, backpressure (HARDENING 44-47)
# ---------------------------------------------------------------------------


def test_hardening_44_login_deadline_holds_while_bytes_trickle_in() -> None:
    server = make_server(memory_box(1).maildrop, login_timeout=0.6)

    def trickle() -> float:
        raw = Raw(port_of(server))
        start = time.monotonic()
        raw.line()
        try:
            for byte in b"NOOPNOOPNOOPNOOPNOOPNOOP":
                raw.sock.send(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass
        raw.rest()
        return time.monotonic() - start

    waited = serve_blocking(server, trickle)
    assert 0.5 <= waited < 2.0


def test_hardening_45_idle_timeout_after_login_closes_without_a_reply() -> None:
    server = make_server(memory_box(1).maildrop, idle_timeout=0.6)

    def idle() -> tuple[float, bytes]:
        raw = Raw(port_of(server))
        raw.login()
        time.sleep(0.35)
        assert raw.command(b"NOOP").startswith(b"+OK")  # alive before the timeout
        time.sleep(0.35)
        assert raw.command(b"NOOP").startswith(b"+OK")  # the clock restarted
        start = time.monotonic()
        rest = raw.rest()
        return time.monotonic() - start, rest

    waited, rest = serve_blocking(server, idle)
    assert rest == b""  # RFC 1939 §3: autologout without a response
    assert 0.5 <= waited < 2.0


def test_a_session_of_quick_commands_sets_few_timers() -> None:
    """Waiting for the next command notes a deadline; the connection's one
    timer is only set again for a wait that ends sooner (test 45 above shows
    the deadline still moves with every command)."""
    server = make_server(memory_box(1).maildrop, idle_timeout=30.0)
    timers: list[object] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        real_at = loop.call_at  # asyncio's call_later goes through call_at

        def at(when: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
            timers.append(callback)
            return real_at(when, callback, *args, **kw)

        loop.call_at = at  # type: ignore[method-assign]

        def client() -> None:
            raw = Raw(port_of(server))
            raw.login()
            for _ in range(40):
                assert raw.command(b"NOOP").startswith(b"+OK")
            assert raw.command(b"QUIT").startswith(b"+OK")
            assert raw.rest() == b""

        async with server:
            await asyncio.to_thread(client)

    run(main)
    # The waits' timer(s), the closing linger, the server's close: not 40+.
    assert 1 <= len(timers) <= 8


@pytest.mark.parametrize("loop", LOOPS)
def test_hardening_46_server_buffers_are_bounded_when_the_client_never_reads(loop: str) -> None:
    msg = b"Subject: flood\n\n" + (b"y" * 70 + b"\n") * 60
    server = make_server(MemoryMaildrop({USER: [msg]}))
    n = 10_000
    reply = b"+OK message follows\r\n" + wire_form(msg) + b".\r\n"
    unbounded = n * len(reply)  # what a server without backpressure would hold

    async def main() -> None:
        raw = await asyncio.to_thread(Raw, port_of(server), 20.0)
        await asyncio.to_thread(raw.login)
        await asyncio.to_thread(raw.sock.sendall, b"RETR 1\r\n" * n)
        await until(lambda: len(server._connections) == 1)
        [conn] = server._connections
        peak = 0
        for _ in range(60):  # 0.6 s with the client reading nothing
            assert conn.transport is not None
            held = conn.transport.get_write_buffer_size() + conn._buffered
            peak = max(peak, held)
            await asyncio.sleep(0.01)
        assert conn._writing_paused  # it stopped processing commands
        limit = aio.WRITE_HIGH_WATER + aio.READ_LIMIT + 512 * 1024
        assert peak <= limit < unbounded // 10
        # Now read everything: every reply arrives, byte-exact, in order.
        got = await asyncio.to_thread(read_exactly, raw, n * len(reply))
        assert got == reply * n
        raw.close()

    serve(server, main, loop)


def read_exactly(raw: Raw, size: int) -> bytes:
    out = bytearray(raw.buffer)
    raw.buffer.clear()
    while len(out) < size:
        data = raw.sock.recv(1 << 20)
        if not data:
            break
        out += data
    return bytes(out)


def test_answers_to_one_read_go_out_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[bytes] = []
    real = aio._ServerConnection._drive

    async def counting(self: aio._ServerConnection, gen: Any, runner: Any) -> Any:
        def proxy() -> Any:  # the session, with each Send (one write) noted
            result = None
            while True:
                try:
                    req = gen.send(result)
                except StopIteration as stop:
                    return stop.value
                if isinstance(req, rq.Send):
                    writes.append(req.data)
                result = yield req

        return await real(self, proxy(), runner)

    monkeypatch.setattr(aio._ServerConnection, "_drive", counting)
    b = memory_box(3, 500)
    server = make_server(b.maildrop)

    def pipelined() -> bytes:
        raw = Raw(port_of(server))
        raw.line()
        writes.clear()
        raw.sock.sendall(b"USER alice\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n")
        return raw.rest()

    out = serve_blocking(server, pipelined)
    assert out.count(b"+OK") == 6 and out.endswith(b"+OK bye\r\n")
    assert len(writes) == 1  # everything that arrived together, answered together
    assert b"".join(writes) == out


def test_commands_pipelined_before_a_half_close_are_all_answered() -> None:
    server = make_server(MemoryMaildrop({USER: [b"one\n"]}))

    def half_close() -> bytes:
        raw = Raw(port_of(server))
        raw.line()
        raw.sock.sendall(b"CAPA\r\nUSER alice\r\nPASS secret\r\nRETR 1\r\nQUIT\r\n")
        raw.sock.shutdown(socket.SHUT_WR)
        return raw.rest()

    out = serve_blocking(server, half_close)
    assert b"\r\nPIPELINING\r\n" in out
    assert out.endswith(b"+OK message follows\r\none\r\n.\r\n+OK bye\r\n")


def test_hardening_47_connections_capped_per_address_and_user() -> None:
    limiter = p.ConnectionLimiter(per_address=2, per_user=1)
    server = make_server(MemoryMaildrop({USER: [b"a\n"], "bob": [b"b\n"]}), limiter=limiter)

    def crowd() -> None:
        first, second = Raw(port_of(server)), Raw(port_of(server))
        first.login()
        assert second.line().startswith(b"+OK")
        third = Raw(port_of(server))
        assert third.rest().startswith(b"-ERR [SYS/TEMP]")
        second.command(b"USER " + USER.encode())
        assert second.command(b"PASS " + PASSWORD.encode()).startswith(b"-ERR [IN-USE]")
        assert first.command(b"QUIT").startswith(b"+OK")
        assert first.rest() == b""
        for _ in range(100):  # the slot is freed when the session ends
            fourth = Raw(port_of(server))
            if fourth.line().startswith(b"+OK"):
                break
            fourth.close()
            time.sleep(0.02)
        fourth.authenticate()
        fourth.close()
        second.close()

    serve_blocking(server, crowd)


# ---------------------------------------------------------------------------
# Data safety (HARDENING 51, 52, 54)
# ---------------------------------------------------------------------------


def test_hardening_54_second_session_gets_in_use(box: Box) -> None:
    server = make_server(box.maildrop)

    def two() -> None:
        one = poplib.POP3("127.0.0.1", port_of(server), timeout=5)
        one.user(USER)
        one.pass_(PASSWORD)
        other = poplib.POP3("127.0.0.1", port_of(server), timeout=5)
        other.user(USER)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            other.pass_(PASSWORD)
        other.close()
        assert one.stat()[0] == COUNT
        one.quit()
        again = poplib.POP3("127.0.0.1", port_of(server), timeout=5)
        again.user(USER)
        again.pass_(PASSWORD)  # the lock went with the first session
        again.quit()

    serve_blocking(server, two)


@pytest.mark.parametrize("end", ["reset", "close", "idle", "shutdown"])
def test_hardening_51_dele_without_quit_leaves_the_maildrop_intact(
    end: str, tmp_path: Path
) -> None:
    b = maildir_box(tmp_path, 4, 500)
    before = b.files()
    server = make_server(b.maildrop, idle_timeout=0.3)

    async def main() -> None:
        raw = await asyncio.to_thread(Raw, port_of(server))
        await asyncio.to_thread(raw.login)
        for n in (1, 2, 3):
            assert (await asyncio.to_thread(raw.command, b"DELE %d" % n)).startswith(b"+OK")
        if end == "reset":
            raw.reset()
        elif end == "close":
            raw.close()
        elif end == "idle":
            assert await asyncio.to_thread(raw.rest) == b""
        else:
            await server.close()
            assert await asyncio.to_thread(raw.rest) == b""
        await until(lambda: server.sessions == 0)

    serve(server, main)
    assert b.files() == before
    with b.maildrop.open(USER) as session:  # and the lock was released
        assert len(session.messages) == 4


def test_quit_after_dele_removes_exactly_the_marked_messages(tmp_path: Path) -> None:
    b = maildir_box(tmp_path, 4, 500)
    server = make_server(b.maildrop)

    def session() -> None:
        pop = poplib.POP3("127.0.0.1", port_of(server), timeout=5)
        pop.user(USER)
        pop.pass_(PASSWORD)
        pop.dele(2)
        pop.dele(4)
        assert pop.quit().startswith(b"+OK")

    serve_blocking(server, session)
    with b.maildrop.open(USER) as s:
        assert len(s.messages) == 2
        with s.open_message(0) as f0, s.open_message(1) as f1:
            assert [wire_form(f0.read()), wire_form(f1.read())] == [b.expected[0], b.expected[2]]


def test_close_interrupts_a_failure_delay_and_waits_for_sessions() -> None:
    server = make_server(
        memory_box(1).maildrop, failure_delay=FailureDelay(base=10.0, maximum=10.0)
    )

    async def main() -> float:
        await server.start()
        raw = await asyncio.to_thread(Raw, port_of(server))
        await asyncio.to_thread(raw.line)
        await asyncio.to_thread(raw.command, b"USER alice")
        raw.sock.sendall(b"PASS wrong\r\n")
        await asyncio.sleep(0.2)  # the session now sleeps before its -ERR
        assert server.sessions == 1
        start = time.monotonic()
        await server.close()
        took = time.monotonic() - start
        assert server.sessions == 0
        assert await asyncio.to_thread(raw.rest) == b""  # no -ERR after the shutdown
        return took

    assert run(main) < 1.0


def test_serve_forever_until_close_and_addresses() -> None:
    server = make_server(memory_box(1).maildrop)
    [(host, port, implicit)] = server.addresses
    assert host == "127.0.0.1" and port > 0 and not implicit

    async def main() -> None:
        task = asyncio.create_task(server.serve_forever())
        pop = await asyncio.to_thread(lambda: poplib.POP3("127.0.0.1", port, timeout=5))
        assert pop.getwelcome().startswith(b"+OK")
        await server.close()
        await asyncio.wait_for(task, 5)
        with pytest.raises(OSError):
            await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 2)
        pop.close()

    run(main)


def test_constructor_checks_its_arguments(certs: Certs) -> None:
    md = MemoryMaildrop()
    with pytest.raises(ValueError, match="authenticator"):
        Server(md, listen=("127.0.0.1", 0))
    with pytest.raises(ValueError, match="ssl_context"):
        Server(md, PasswordTable({}), listen=None, tls_listen=("127.0.0.1", 0))
    server = Server(md, PasswordTable({}), listen=("127.0.0.1", 0), ssl_context=certs.server)
    assert server.config.stls_available
    run(server.close)
    with pytest.raises(RuntimeError):
        run(server.start)


# ---------------------------------------------------------------------------
# The asyncio client against our asyncio server
# ---------------------------------------------------------------------------


def client_kw(mode: str, server: Server, certs: Certs) -> dict[str, Any]:
    if mode == "pop3s":
        return dict(port=port_of(server, True), ssl_context=certs.client)
    if mode == "stls":
        return dict(port=port_of(server), starttls=True, ssl_context=certs.client)
    return dict(port=port_of(server), tls=False)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_client_against_our_server_every_message(
    mode: str, loop: str, tmp_path: Path, certs: Certs
) -> None:
    b = maildir_box(tmp_path)
    server = make_server(b.maildrop, certs)

    async def main() -> None:
        async with connect("127.0.0.1", **client_kw(mode, server, certs)) as client:
            assert client.tls_active == (mode != "plain")
            caps = await client.capabilities()
            assert caps is not None and ("STLS" in caps) == (mode == "plain")
            await client.login(USER, PASSWORD)  # SCRAM: fine without TLS too
            assert client.state is p.State.TRANSACTION
            assert await client.stat() == (COUNT, sum(b.sizes))
            assert await client.list() == dict(enumerate(b.sizes, 1))
            assert await client.list(3) == b.sizes[2]
            uids = await client.uidl()
            assert sorted(uids) == list(range(1, COUNT + 1)) and len(set(uids.values())) == COUNT
            assert await client.uidl(2) == uids[2]
            for n in range(1, COUNT + 1):
                assert await client.retrieve(n) == b.expected[n - 1], n
            head = b.expected[0][: b.expected[0].index(b"\r\n\r\n") + 4]
            assert await client.top(1, 0) == head
            got = [(m, d) async for m, d in client.retrieve_many(range(COUNT, 0, -1), window=5)]
            assert got == [(n, b.expected[n - 1]) for n in range(COUNT, 0, -1)]
            chunks = [c async for c in client.iter_retrieve(5)]
            assert b"".join(chunks) == b.expected[4]
            sink = io.BytesIO()
            assert await client.retrieve_into(6, sink) == len(b.expected[5])
            assert sink.getvalue() == b.expected[5]
            files: dict[int, io.BytesIO] = {}
            completed: list[tuple[int, int]] = []

            def open_file(n: int) -> io.BytesIO:  # a plain function
                files[n] = io.BytesIO()
                return files[n]

            wanted = [4, 2, 7, 12]
            delivered = await client.retrieve_many_into(
                wanted, open_file, on_complete=lambda n, size: completed.append((n, size))
            )
            assert delivered == len(wanted)
            assert completed == [(n, len(b.expected[n - 1])) for n in wanted]
            assert [files[n].getvalue() for n in wanted] == [b.expected[n - 1] for n in wanted]
            await client.noop()
            await client.delete(1)
            await client.reset()
            assert await client.delete_many([2, 3]) == 2
        assert client.closed

    serve(server, main, loop)
    assert len(b.files()) == COUNT - 2  # QUIT on exit applied the two deletions


def test_client_await_connect_wrong_password_and_errors(certs: Certs) -> None:
    b = memory_box(2, 500)
    server = make_server(b.maildrop, certs)

    async def main() -> None:
        client = await connect("localhost", port_of(server, True), ssl_context=certs.client)
        with pytest.raises(p.Pop3Error) as info:
            await client.login(USER, "wrong")
        assert info.value.is_("AUTH")
        await client.login(USER, PASSWORD, mechanism="USER")
        with pytest.raises(p.Pop3Error):
            await client.retrieve(99)  # -ERR: the session goes on
        assert await client.retrieve(2) == b.expected[1]
        assert await client.quit() is True
        assert client.closed
        with pytest.raises(p.Pop3Error):
            await client.stat()

    serve(server, main)


def test_client_scram_plus_binds_to_the_tls_channel(certs: Certs) -> None:
    server = make_server(memory_box(1).maildrop, certs)

    async def main() -> None:
        async with connect(
            "127.0.0.1", port_of(server), starttls=True, ssl_context=certs.client
        ) as client:
            caps = await client.capabilities()
            assert caps is not None and "SCRAM-SHA-256-PLUS" in caps.sasl
            await client.login(USER, PASSWORD, mechanism="SCRAM-SHA-256-PLUS")
            assert await client.stat() == (1, sum(memory_box(1).sizes))

    serve(server, main)


def test_client_exit_with_exception_skips_quit_so_nothing_is_deleted() -> None:
    md = MemoryMaildrop({USER: [b"one\n", b"two\n"]})
    server = make_server(md)

    async def main() -> None:
        with contextlib.suppress(KeyError):
            async with connect("127.0.0.1", port_of(server), tls=False) as client:
                await client.login(USER, PASSWORD)
                await client.delete(1)
                raise KeyError("the caller failed")
        assert client.closed
        await until(lambda: server.sessions == 0)

    serve(server, main)
    assert md.contents(USER) == [b"one\n", b"two\n"]


def test_client_leaving_a_stream_early_closes_the_connection() -> None:
    big = b"line of text\n" * 50_000
    server = make_server(MemoryMaildrop({USER: [big, b"small\n"]}))

    async def main() -> None:
        client = await connect("127.0.0.1", port_of(server), tls=False)
        await client.login(USER, PASSWORD)
        async with contextlib.aclosing(client.iter_retrieve(1)) as stream:
            async for _chunk in stream:
                break
        assert client.closed
        with pytest.raises(p.Pop3Error):
            await client.retrieve(2)

    serve(server, main)


def test_client_retrieve_into_awaits_an_async_writer() -> None:
    server = make_server(MemoryMaildrop({USER: [b"x" * 100_000]}))

    class AsyncSink:
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        async def write(self, data: bytes) -> None:
            await asyncio.sleep(0)
            self.parts.append(data)

    async def main() -> None:
        sink = AsyncSink()
        async with connect("127.0.0.1", port_of(server), tls=False) as client:
            await client.login(USER, PASSWORD)
            assert await client.retrieve_into(1, sink) == 100_002
        assert b"".join(sink.parts) == b"x" * 100_000 + b"\r\n"

    serve(server, main)


# ---------------------------------------------------------------------------
# The client against misbehaving servers (HARDENING 29, 30, 35, 48)
# ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_server(
    script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A scripted server on a free loopback port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


CAPA_STLS = b"+OK\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n"


def test_hardening_48_trickling_server_trips_the_command_deadline() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK hi\r\n")
        await reader.readline()  # CAPA
        writer.write(b"-ERR no\r\n")
        await reader.readline()  # CAPA again
        for byte in b"+OK but very slowly, one byte at a time\r\n":
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    async def main() -> float:
        async with fake_server(trickle) as port:
            client = await connect("127.0.0.1", port, tls=False, timeout=0.5)
            start = time.monotonic()
            with pytest.raises(p.Pop3TimeoutError):
                await client.capabilities(refresh=True)
            took = time.monotonic() - start
            assert client.closed
            return took

    assert 0.4 <= run(main) < 2.0


def test_client_operation_timeout_bounds_a_whole_call() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK hi\r\n")
        await reader.readline()
        writer.write(b"-ERR no\r\n")
        await asyncio.sleep(5)

    async def main() -> None:
        async with fake_server(silent) as port:
            client = await connect("127.0.0.1", port, tls=False, timeout=None)
            client.operation_timeout = 0.3
            with pytest.raises(p.Pop3TimeoutError, match="operation"):
                await client.capabilities(refresh=True)
            assert client.closed

    run(main)


@pytest.mark.parametrize("split", [False, True])
def test_hardening_29_bytes_after_begin_tls_abort_the_upgrade(split: bool) -> None:
    async def inject(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK hi\r\n")
        await reader.readline()
        writer.write(CAPA_STLS)
        await reader.readline()  # STLS
        if split:
            writer.write(b"+OK Begin TLS\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        else:
            writer.write(b"+OK Begin TLS\r\n")
        writer.write(b"+OK\r\nUSER\r\n.\r\n")  # plaintext posing as the TLS CAPA
        await reader.read(100)

    async def main() -> None:
        async with fake_server(inject) as port:
            with pytest.raises((p.Pop3TLSError, p.RemoteProtocolError)):
                await connect("127.0.0.1", port, starttls=True, timeout=5)

    run(main)


def test_hardening_30_required_stls_missing_sends_no_credentials() -> None:
    heard: list[bytes] = []

    async def no_stls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK hi\r\n")
        while line := await reader.readline():
            heard.append(line)
            writer.write(b"+OK\r\nUSER\r\n.\r\n" if line.startswith(b"CAPA") else b"-ERR\r\n")

    async def main() -> None:
        async with fake_server(no_stls) as port:
            with pytest.raises(p.Pop3TLSError):
                await connect("127.0.0.1", port, starttls=True, timeout=5)
            await asyncio.sleep(0.05)

    run(main)
    assert heard == [b"CAPA\r\n"]


def test_hardening_35_client_refuses_a_certificate_it_cannot_verify(certs: Certs) -> None:
    server = make_server(memory_box(1).maildrop, certs)
    # A certificate from the trusted CA, but for another name.
    ca = trustme.CA()
    elsewhere = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("pop.example.org").configure_cert(elsewhere)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    misnamed = Server(
        memory_box(1).maildrop,
        PasswordTable({USER: PASSWORD}),
        listen=None,
        tls_listen=("127.0.0.1", 0),
        ssl_context=elsewhere,
    )

    async def main() -> None:
        with pytest.raises(p.Pop3TLSError):  # the system CAs do not know ours
            await connect("127.0.0.1", port_of(server, True), timeout=5)
        with pytest.raises(p.Pop3TLSError):
            await connect("127.0.0.1", port_of(server), starttls=True, timeout=5)
        async with misnamed:
            with pytest.raises(p.Pop3TLSError, match=r"(?i)hostname|match"):
                await connect("127.0.0.1", port_of(misnamed, True), ssl_context=trusting, timeout=5)

    serve(server, main)


# ---------------------------------------------------------------------------
# The asyncio client against Dovecot
# ---------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_client_against_dovecot_every_message(mode: str, dovecot: DovecotServer) -> None:
    user = f"aio{mode}"
    manifest = dovecot.fill(user, 20, 4000)
    context = ssl.create_default_context(cafile=str(dovecot.cafile))

    async def main() -> None:
        if mode == "pop3s":
            kw: dict[str, Any] = dict(port=dovecot.tls_port, ssl_context=context)
        elif mode == "stls":
            kw = dict(port=dovecot.port, starttls=True, ssl_context=context)
        else:
            kw = dict(port=dovecot.port, tls=False, allow_insecure=True)
        async with connect(dovecot.host, timeout=10, **kw) as client:
            assert client.tls_active == (mode != "plain")
            await client.login(user, "secret")
            assert await client.stat() == (len(manifest), manifest.total_size)
            assert await client.list() == {m.number: m.size for m in manifest}
            uids = await client.uidl()
            assert len(set(uids.values())) == len(manifest)
            async for n, data in client.retrieve_many(range(1, len(manifest) + 1)):
                assert manifest.matches(n, data), n
                assert hashlib.sha256(data).hexdigest() == manifest[n].sha256
            top = await client.top(3, 2)
            assert manifest.expected(3).startswith(top)
            assert top.count(b"\r\n") < manifest.expected(3).count(b"\r\n")
            chunks = [c async for c in client.iter_retrieve(7)]
            assert manifest.matches(7, b"".join(chunks))

    run(main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_stalled_tls_handshake_after_stls_ends_at_the_deadline(loop: str) -> None:
    """A server that answers "+OK Begin TLS" and then never handshakes: the
    client gives up at its timeout and is closed then (asyncio's own loop
    does not report the lost connection of an unfinished handshake)."""

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK hi\r\n")
        await reader.readline()
        writer.write(CAPA_STLS)
        await reader.readline()  # STLS
        writer.write(b"+OK Begin TLS\r\n")
        await asyncio.sleep(10)

    async def main() -> float:
        async with fake_server(stall) as port:
            started = time.monotonic()
            with pytest.raises(p.Pop3TLSError):
                await connect("127.0.0.1", port, starttls=True, timeout=0.5)
            return time.monotonic() - started

    # CLOSE_TIMEOUT (2 s) is what a connection never seen to close waits.
    assert run(main, loop) < 1.5
