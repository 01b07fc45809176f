"""The trio binding (``pop3proto.bindings.trio``): the server against the
standard library's poplib, curl, mpop and raw sockets; the client against our
own trio server and against Dovecot.

Every test runs its trio code with ``trio.run`` and is run on both engine
backends. Blocking peers (poplib, curl, mpop) run in worker threads through
``trio.to_thread.run_sync`` while the server runs in the trio thread.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import poplib
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pytest
import trio  # type: ignore[import-untyped,unused-ignore]  # typed from trio 0.23 on
import trustme
from peers import (
    DovecotServer,
    fill_maildir,
    generate_message,
    normalise_delivered,
    run_curl,
    run_curl_retr,
    run_mpop,
    wire_form,
)
from pop3proto.bindings import trio as tc
from pop3proto.bindings.maildrop import (
    Maildir,
    Maildrop,
    MaildropError,
    MaildropSession,
    MemoryMaildrop,
    MessageInfo,
)
from pop3proto.bindings.trio import Server

import pop3proto as p
from pop3proto._auth import FailureDelay, PasswordTable

pytestmark = pytest.mark.usefixtures("backend")

T = TypeVar("T")

USER = "alice"
PASSWORD = "secret"
COUNT = 12
SIZE = 3000


# ---------------------------------------------------------------------------
# Certificates, mailboxes, running a server
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    cafile: Path
    server: ssl.SSLContext
    client: ssl.SSLContext
    der: bytes


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
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
    #: SHA-256 (hex) of the retrieved form of message n, at index n - 1.
    sha256: list[str]
    #: LIST size of message n, at index n - 1.
    sizes: list[int]
    root: Path | None = None


def memory_box(count: int = COUNT, size: int = SIZE) -> Box:
    msgs = [generate_message(USER, n, size) for n in range(1, count + 1)]
    return Box(
        MemoryMaildrop({USER: msgs}),
        [hashlib.sha256(wire_form(m)).hexdigest() for m in msgs],
        [len(m) + m.count(b"\n") for m in msgs],
    )


def maildir_box(root: Path, count: int = COUNT, size: int = SIZE) -> Box:
    manifest = fill_maildir(root / USER, USER, count, size)
    infos = [manifest[n] for n in range(1, count + 1)]
    return Box(Maildir(root), [m.sha256 for m in infos], [m.size for m in infos], root)


@pytest.fixture(params=["memory", "maildir"])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Box:
    return memory_box() if request.param == "memory" else maildir_box(tmp_path)


def make_config(**kw: Any) -> p.ServerConfig:
    kw.setdefault("authenticator", PasswordTable({USER: PASSWORD, "bob": "hunter2"}))
    kw.setdefault("failure_delay", FailureDelay(base=0.0))
    return p.ServerConfig(**kw)


def make_server(
    maildrop: Maildrop, certs: Certs | None = None, *, tls: bool = False, **config: Any
) -> Server:
    config.setdefault("stls_available", certs is not None)
    return Server(
        maildrop,
        listen=("127.0.0.1", 0),
        tls_listen=("127.0.0.1", 0) if tls else None,
        ssl_context=certs.server if certs else None,
        server_certificate=certs.der if certs else None,
        config=make_config(**config),
    )


def port_of(server: Server, implicit: bool = False) -> int:
    return next(port for _, port, tls in server.addresses if tls == implicit)


def with_server(server: Server, client: Callable[[], Awaitable[T]]) -> T:
    """Serve in the background while ``client()`` runs, then cancel the server."""

    async def main() -> T:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            result = await client()
            nursery.cancel_scope.cancel()
        return result

    out: T = trio.run(main)
    return out


def in_thread(fn: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    async def run() -> T:
        result: T = await trio.to_thread.run_sync(fn)
        return result

    return run


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Raw:
    """A byte-level client on a trio stream, for what no real client does."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Raw:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def line(self, timeout: float = 5.0) -> bytes:
        with trio.fail_after(timeout):
            while b"\r\n" not in self.buffer:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(bytes(self.buffer))
                self.buffer += data
        end = self.buffer.index(b"\r\n") + 2
        out = bytes(self.buffer[:end])
        del self.buffer[:end]
        return out

    async def command(self, line: bytes) -> bytes:
        await self.stream.send_all(line + b"\r\n")
        return await self.line()

    async def rest(self, timeout: float = 5.0) -> bytes:
        """Everything until the server closes (fails the test after ``timeout``)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:  # reset by the server
                    data = b""
                if not data:
                    out = bytes(self.buffer)
                    self.buffer.clear()
                    return out
                self.buffer += data

    async def login(self) -> None:
        assert (await self.line()).startswith(b"+OK")
        assert (await self.command(b"USER " + USER.encode())).startswith(b"+OK")
        assert (await self.command(b"PASS " + PASSWORD.encode())).startswith(b"+OK")

    async def close(self) -> None:
        await self.stream.aclose()


# ---------------------------------------------------------------------------
# poplib (standard library) against the trio server
# ---------------------------------------------------------------------------


def poplib_session(port: int, mode: str, certs: Certs) -> poplib.POP3:
    if mode == "tls":
        pop: poplib.POP3 = poplib.POP3_SSL("127.0.0.1", port, context=certs.client, timeout=10)
    else:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        if mode == "stls":
            pop.stls(certs.client)
    pop.user(USER)
    pop.pass_(PASSWORD)
    return pop


def poplib_fetch_all(pop: poplib.POP3) -> tuple[list[int], list[str], list[bytes]]:
    """LIST sizes, SHA-256 of each RETR, and the UIDL lines."""
    sizes = [int(line.split()[1]) for line in pop.list()[1]]
    digests = []
    for n in range(1, len(sizes) + 1):
        _, lines, _ = pop.retr(n)
        digests.append(sha(b"".join(line + b"\r\n" for line in lines)))
    uids = pop.uidl()[1]
    return sizes, digests, uids


@pytest.mark.parametrize("mode", ["plain", "stls", "tls"])
def test_poplib_retrieves_every_message_byte_exact(mode: str, box: Box, certs: Certs) -> None:
    server = make_server(box.maildrop, certs, tls=True)
    port = port_of(server, implicit=mode == "tls")

    def client() -> tuple[list[int], list[str], list[bytes], bytes]:
        pop = poplib_session(port, mode, certs)
        sizes, digests, uids = poplib_fetch_all(pop)
        return sizes, digests, uids, pop.quit()

    sizes, digests, uids, bye = with_server(server, in_thread(client))
    assert sizes == box.sizes
    assert digests == box.sha256
    assert len({u.split()[1] for u in uids}) == COUNT
    assert bye.startswith(b"+OK")


def test_poplib_top_returns_headers_and_lines(certs: Certs) -> None:
    msg = b"From: a\nSubject: top\n\n.dotted\nline two\nline three\n"
    server = make_server(MemoryMaildrop({USER: [msg]}), certs)

    def client() -> tuple[list[bytes], list[bytes]]:
        pop = poplib_session(port_of(server), "stls", certs)
        try:
            return pop.top(1, 0)[1], pop.top(1, 2)[1]
        finally:
            pop.quit()

    head, two = with_server(server, in_thread(client))
    assert head == [b"From: a", b"Subject: top", b""]
    assert two == [b"From: a", b"Subject: top", b"", b".dotted", b"line two"]


# ---------------------------------------------------------------------------
# curl and mpop against the trio server
# ---------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize("scheme", ["pop3s", "stls"])
def test_curl_retrieves_every_message_byte_exact(scheme: str, tmp_path: Path, certs: Certs) -> None:
    box = maildir_box(tmp_path)
    server = make_server(box.maildrop, certs, tls=True)
    implicit = scheme == "pop3s"
    url = f"{'pop3s' if implicit else 'pop3'}://127.0.0.1:{port_of(server, implicit)}"

    def client() -> tuple[bytes, dict[int, bytes]]:
        common: dict[str, Any] = {
            "user": USER,
            "password": PASSWORD,
            "cafile": certs.cafile,
            "starttls": not implicit,
            "timeout": 30.0,
        }
        listing = run_curl(url + "/", **common)
        return listing, run_curl_retr(url, list(range(1, COUNT + 1)), **common)

    listing, got = with_server(server, in_thread(client))
    assert listing.splitlines() == [b"%d %d" % (n, s) for n, s in enumerate(box.sizes, 1)]
    assert [sha(got[n]) for n in range(1, COUNT + 1)] == box.sha256


@pytest.mark.peers
@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_mpop_retrieves_every_message_byte_exact(mode: str, tmp_path: Path, certs: Certs) -> None:
    box = maildir_box(tmp_path / "server")
    server = make_server(box.maildrop, certs, tls=True)
    port = port_of(server, implicit=mode == "tls")

    def client() -> list[bytes]:
        delivered = run_mpop(
            "127.0.0.1",
            port,
            USER,
            PASSWORD,
            tmp_path / "out",
            tls=mode == "tls",
            starttls=mode == "starttls",
            cafile=certs.cafile,
            timeout=30,
        )
        return [normalise_delivered(m.data) for m in delivered]

    got = with_server(server, in_thread(client))
    assert [sha(m) for m in got] == box.sha256


# ---------------------------------------------------------------------------
# TLS upgrade (HARDENING 27, 28, 33, 34)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("wire", [b"STLS\r\nCAPA\r\n", b"STLS\nCAPA\n"])
def test_hardening_27_stls_injection_in_one_segment_is_never_executed(
    wire: bytes, certs: Certs
) -> None:
    server = make_server(MemoryMaildrop({USER: [b"x\n"]}), certs)

    async def client() -> bytes:
        raw = await Raw.connect(port_of(server))
        assert (await raw.line()).startswith(b"+OK")
        await raw.stream.send_all(wire)
        rest = await raw.rest()
        await raw.close()
        return rest

    rest = with_server(server, client)
    assert b"+OK" not in rest  # neither STLS nor CAPA was answered
    assert b"UIDL" not in rest and b"TOP" not in rest
    assert rest.startswith(b"-ERR")


def test_hardening_28_plaintext_after_stls_before_handshake_is_never_executed(
    certs: Certs,
) -> None:
    server = make_server(MemoryMaildrop({USER: [b"x\n"]}), certs)

    async def client() -> tuple[bytes, bytes]:
        raw = await Raw.connect(port_of(server))
        assert (await raw.line()).startswith(b"+OK")
        begin = await raw.command(b"STLS")
        await trio.sleep(0.05)  # a second segment, after the +OK was read
        await raw.stream.send_all(b"CAPA\r\nUSER alice\r\n")
        rest = await raw.rest()
        await raw.close()
        return begin, rest

    begin, rest = with_server(server, client)
    assert begin.startswith(b"+OK")
    assert b"+OK" not in rest and b"UIDL" not in rest and b"-ERR" not in rest


def test_hardening_33_stls_refused_without_certificate_and_after_tls(certs: Certs) -> None:
    plain = make_server(MemoryMaildrop({USER: [b"x\n"]}))

    async def no_cert() -> bytes:
        raw = await Raw.connect(port_of(plain))
        await raw.line()
        reply = await raw.command(b"STLS")
        assert (await raw.command(b"NOOP")).startswith(b"-ERR")  # still talking, plaintext
        await raw.close()
        return reply

    assert with_server(plain, no_cert).startswith(b"-ERR")

    tls = make_server(MemoryMaildrop({USER: [b"x\n"]}), certs, tls=True)

    async def twice() -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(tls, implicit=True))
        wrapped = trio.SSLStream(stream, certs.client, server_hostname="localhost")
        raw = Raw(wrapped)
        await raw.line()
        reply = await raw.command(b"STLS")
        assert (await raw.command(b"CAPA")).startswith(b"+OK")
        await raw.close()
        return reply

    assert with_server(tls, twice).startswith(b"-ERR")


@pytest.mark.parametrize("implicit", [False, True])
def test_hardening_34_stalled_handshake_is_closed_at_the_deadline(
    implicit: bool, certs: Certs
) -> None:
    server = Server(
        MemoryMaildrop({USER: [b"x\n"]}),
        listen=("127.0.0.1", 0),
        tls_listen=("127.0.0.1", 0),
        ssl_context=certs.server,
        config=make_config(stls_available=True),
        handshake_timeout=0.3,
    )

    async def client() -> tuple[float, bytes]:
        raw = await Raw.connect(port_of(server, implicit))
        if not implicit:
            await raw.line()
            assert (await raw.command(b"STLS")).startswith(b"+OK")
        start = trio.current_time()
        rest = await raw.rest(timeout=5.0)  # we never send a ClientHello
        await raw.close()
        return trio.current_time() - start, rest

    waited, rest = with_server(server, client)
    assert 0.2 <= waited < 3.0
    assert rest == b""


# ---------------------------------------------------------------------------
# Resource limits (HARDENING 44-47)
# ---------------------------------------------------------------------------


def test_hardening_44_login_deadline_holds_while_bytes_trickle_in() -> None:
    server = make_server(MemoryMaildrop({USER: [b"x\n"]}), login_timeout=0.5)

    async def client() -> tuple[float, int]:
        raw = await Raw.connect(port_of(server))
        await raw.line()
        start = trio.current_time()
        answered = 0
        with trio.fail_after(5):
            try:
                while True:
                    for byte in b"NOOP\r\n":  # answered -ERR, but never more than 3 bad
                        await raw.stream.send_all(bytes([byte]))
                        await trio.sleep(0.02)
                    await raw.stream.send_all(b"CAPA\r\n")
                    while not (await raw.line()).startswith(b"."):
                        pass
                    answered += 1
            except (EOFError, trio.BrokenResourceError):
                pass
        await raw.close()
        return trio.current_time() - start, answered

    waited, answered = with_server(server, client)
    assert answered >= 1  # the connection was alive and in use
    assert 0.4 <= waited < 3.0


def test_hardening_45_idle_timeout_after_login() -> None:
    server = make_server(MemoryMaildrop({USER: [b"x\n"]}), idle_timeout=0.6)

    async def client() -> tuple[bytes, float, bytes]:
        raw = await Raw.connect(port_of(server))
        await raw.login()
        await trio.sleep(0.3)
        alive = await raw.command(b"NOOP")
        start = trio.current_time()
        rest = await raw.rest(timeout=5.0)
        await raw.close()
        return alive, trio.current_time() - start, rest

    alive, waited, rest = with_server(server, client)
    assert alive.startswith(b"+OK")
    assert 0.5 <= waited < 3.0
    assert rest == b""  # RFC 1939 §3: autologout without a response


def test_hardening_36_38_failed_login_waits_the_same_for_unknown_users() -> None:
    server = make_server(
        MemoryMaildrop({USER: [b"x\n"]}), failure_delay=FailureDelay(base=0.3, maximum=0.3)
    )

    async def client() -> list[tuple[bytes, float]]:
        raw = await Raw.connect(port_of(server))
        await raw.line()
        out = []
        for user in (b"nobody", USER.encode()):
            await raw.command(b"USER " + user)
            start = trio.current_time()
            reply = await raw.command(b"PASS wrong")
            out.append((reply, trio.current_time() - start))
        await raw.close()
        return out

    (unknown, t1), (wrong, t2) = with_server(server, client)
    assert unknown == wrong and unknown.startswith(b"-ERR [AUTH]")
    assert t1 >= 0.25 and t2 >= 0.25


def test_hardening_46_server_stops_reading_when_the_client_never_reads() -> None:
    big = generate_message(USER, 4, 200_000)
    server = make_server(MemoryMaildrop({USER: [big]}))

    async def client() -> tuple[bool, int]:
        raw = await Raw.connect(port_of(server))
        sock = raw.stream.socket  # type: ignore[attr-defined,unused-ignore]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        await raw.login()
        sent = 0
        burst = b"RETR 1\r\n" * 8192
        with trio.move_on_after(2.0) as scope:
            while sent < 64 * 1024 * 1024:
                await raw.stream.send_all(burst)
                sent += len(burst)
        await raw.close()
        return scope.cancelled_caught, sent

    blocked, sent = with_server(server, client)
    assert blocked, f"the server read {sent} bytes of commands without answering them"
    assert sent < 32 * 1024 * 1024


def test_hardening_47_connections_capped_per_address() -> None:
    limiter = p.ConnectionLimiter(per_address=2, per_user=10)
    server = make_server(MemoryMaildrop({USER: [b"x\n"]}), limiter=limiter)

    async def client() -> list[bytes]:
        first, second = await Raw.connect(port_of(server)), await Raw.connect(port_of(server))
        greetings = [await first.line(), await second.line()]
        third = await Raw.connect(port_of(server))
        greetings.append(await third.line())
        await first.close()
        # once a session ends its place is free again
        with trio.fail_after(5):
            while True:
                fourth = await Raw.connect(port_of(server))
                line = await fourth.line()
                await fourth.close()
                if line.startswith(b"+OK"):
                    break
                await trio.sleep(0.05)
        greetings.append(line)
        await second.close()
        await third.close()
        return greetings

    greetings = with_server(server, client)
    assert greetings[0].startswith(b"+OK") and greetings[1].startswith(b"+OK")
    assert greetings[2].startswith(b"-ERR [SYS/TEMP]")
    assert greetings[3].startswith(b"+OK")


# ---------------------------------------------------------------------------
# Data safety (HARDENING 51-55)
# ---------------------------------------------------------------------------


def test_hardening_54_second_session_gets_in_use(box: Box) -> None:
    server = make_server(box.maildrop)

    async def client() -> tuple[bytes, bytes]:
        first = await Raw.connect(port_of(server))
        await first.login()
        second = await Raw.connect(port_of(server))
        await second.line()
        await second.command(b"USER alice")
        refused = await second.command(b"PASS secret")
        assert (await first.command(b"QUIT")).startswith(b"+OK")
        await first.close()
        with trio.fail_after(5):  # the lock is released when the session ends
            while True:
                await second.command(b"USER alice")
                again = await second.command(b"PASS secret")
                if again.startswith(b"+OK"):
                    break
                await trio.sleep(0.05)
        await second.close()
        return refused, again

    refused, again = with_server(server, client)
    assert refused.startswith(b"-ERR [IN-USE]")
    assert again.startswith(b"+OK")


@pytest.mark.parametrize("end", ["drop", "reset", "idle", "shutdown"])
def test_hardening_51_dele_without_quit_leaves_the_maildrop_intact(
    end: str, tmp_path: Path
) -> None:
    box = maildir_box(tmp_path, count=3)
    files = sorted((tmp_path / USER / "cur").iterdir())
    server = make_server(box.maildrop, idle_timeout=0.3 if end == "idle" else 600.0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            raw = await Raw.connect(port_of(server))
            await raw.login()
            for n in (1, 2, 3):
                assert (await raw.command(b"DELE %d" % n)).startswith(b"+OK")
            if end == "drop":
                await raw.close()
            elif end == "reset":
                sock = raw.stream.socket  # type: ignore[attr-defined,unused-ignore]
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                await raw.close()
            elif end == "idle":
                assert await raw.rest() == b""
            nursery.cancel_scope.cancel()  # "shutdown": cancelled mid-session

    trio.run(main)
    assert sorted((tmp_path / USER / "cur").iterdir()) == files
    with box.maildrop.open(USER) as session:  # and the lock was released
        assert len(session.messages) == 3


class FailingCommit:
    """A maildrop whose removals fail."""

    def __init__(self, inner: Maildrop) -> None:
        self.inner = inner

    def open(self, user: str) -> MaildropSession:
        return _FailingSession(self.inner.open(user))


class _FailingSession(MaildropSession):
    def __init__(self, inner: MaildropSession) -> None:
        self.inner = inner

    @property
    def messages(self) -> list[MessageInfo]:
        return list(self.inner.messages)

    def open_message(self, index: int) -> BinaryIO:
        return self.inner.open_message(index)

    def commit(self, keys: Iterable[str]) -> None:
        raise MaildropError("disk on fire")

    def close(self) -> None:
        self.inner.close()

    @property
    def closed(self) -> bool:
        return self.inner.closed


def test_hardening_52_failed_removal_answers_err() -> None:
    store = MemoryMaildrop({USER: [b"a\n", b"b\n"]})
    server = make_server(FailingCommit(store))

    async def client() -> bytes:
        raw = await Raw.connect(port_of(server))
        await raw.login()
        await raw.command(b"DELE 1")
        bye = await raw.command(b"QUIT")
        await raw.close()
        return bye

    assert with_server(server, client).startswith(b"-ERR")
    assert store.contents(USER) == [b"a\n", b"b\n"]


def test_hardening_54_55_new_mail_next_session_and_stable_uids(tmp_path: Path) -> None:
    box = maildir_box(tmp_path, count=2)
    assert isinstance(box.maildrop, Maildir)
    maildir = box.maildrop
    server = make_server(maildir)

    async def session(deliver: bool) -> tuple[bytes, bytes, list[bytes]]:
        raw = await Raw.connect(port_of(server))
        await raw.login()
        before = await raw.command(b"STAT")
        if deliver:
            await trio.to_thread.run_sync(maildir.add, USER, b"Subject: new\n\nhello\n")
        after = await raw.command(b"STAT")
        await raw.stream.send_all(b"UIDL\r\n")
        uids = []
        assert (await raw.line()).startswith(b"+OK")
        while (line := await raw.line()) != b".\r\n":
            uids.append(line)
        assert (await raw.command(b"QUIT")).startswith(b"+OK")
        await raw.close()
        return before, after, uids

    async def client() -> list[tuple[bytes, bytes, list[bytes]]]:
        return [await session(True), await session(False)]

    (before, after, uids1), (before2, _, uids2) = with_server(server, client)
    assert before == after  # numbers never shift mid-session
    assert before.split()[1] == b"2" and before2.split()[1] == b"3"
    assert uids2[:2] == uids1 and len(uids2) == 3


# ---------------------------------------------------------------------------
# Serving and stopping
# ---------------------------------------------------------------------------


def test_serve_reports_addresses_and_cancellation_closes_listeners() -> None:
    server = make_server(MemoryMaildrop({USER: [b"x\n"]}))
    [(host, port, implicit)] = server.addresses
    assert host == "127.0.0.1" and port > 0 and not implicit

    async def main() -> list[tuple[str, int, bool]]:
        async with trio.open_nursery() as nursery:
            started = await nursery.start(server.serve)
            raw = await Raw.connect(port)
            assert (await raw.line()).startswith(b"+OK")
            nursery.cancel_scope.cancel()
        assert await raw.rest() == b""  # the session was ended
        await raw.close()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
        with pytest.raises(RuntimeError):
            await server.serve()
        return list(started)

    assert trio.run(main) == [(host, port, False)]


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="authenticator"):
        Server(MemoryMaildrop(), listen=("127.0.0.1", 0))
    with pytest.raises(ValueError, match="ssl_context"):
        Server(
            MemoryMaildrop(),
            PasswordTable({USER: PASSWORD}),
            listen=None,
            tls_listen=("127.0.0.1", 0),
        )
    server = Server(MemoryMaildrop(), PasswordTable({USER: PASSWORD}), listen=("127.0.0.1", 0))
    assert not server.config.stls_available
    server.close()
    server.close()  # idempotent


# ===========================================================================
# The trio client
# ===========================================================================


class Recording(trio.abc.Stream):  # type: ignore[misc,unused-ignore]
    """A stream that counts the writes going through it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data: bytes | bytearray = await self.inner.receive_some(max_bytes)
        return data

    async def send_eof(self) -> None:  # pragma: no cover - not used
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.inner.aclose()


def client_options(mode: str, certs: Certs) -> dict[str, Any]:
    if mode == "tls":
        return {"tls": True, "ssl_context": certs.client, "timeout": 10.0}
    if mode == "stls":
        return {"starttls": True, "ssl_context": certs.client, "timeout": 10.0}
    return {"tls": False, "timeout": 10.0}


async def fetch_everything(client: tc.Client, count: int) -> dict[str, Any]:
    """Every way the client has to read a maildrop, for comparison."""
    out: dict[str, Any] = {}
    out["stat"] = await client.stat()
    out["list"] = await client.list()
    out["uidl"] = await client.uidl()
    out["uidl1"] = await client.uidl(1)
    out["list1"] = await client.list(1)
    out["retrieve"] = [sha(await client.retrieve(n)) for n in range(1, count + 1)]
    streamed = []
    for n in range(1, count + 1):
        parts = [chunk async for chunk in client.iter_retrieve(n)]
        streamed.append(sha(b"".join(parts)))
    out["iter_retrieve"] = streamed
    into = []
    for n in range(1, count + 1):
        sink = io.BytesIO()
        size = await client.retrieve_into(n, sink)
        assert size == len(sink.getvalue())
        into.append(sha(sink.getvalue()))
    out["retrieve_into"] = into
    files: dict[int, io.BytesIO] = {}
    sizes: dict[int, int] = {}

    async def open_file(n: int) -> io.BytesIO:  # a coroutine function
        files[n] = io.BytesIO()
        return files[n]

    async def complete(n: int, size: int) -> None:
        assert size == len(files[n].getvalue())
        sizes[n] = size

    wanted = range(count, 0, -1)
    assert await client.retrieve_many_into(wanted, open_file, on_complete=complete) == count
    assert list(sizes) == list(wanted)
    out["retrieve_many_into"] = [sha(files[n].getvalue()) for n in range(1, count + 1)]
    out["retrieve_many"] = [
        (msg, sha(data)) async for msg, data in client.retrieve_many(range(1, count + 1))
    ]
    out["top"] = await client.top(1, 0)
    return out


def check_everything(got: dict[str, Any], expected_sha: list[str], sizes: list[int]) -> None:
    count = len(expected_sha)
    assert got["stat"] == (count, sum(sizes))
    assert got["list"] == dict(enumerate(sizes, 1))
    assert got["list1"] == sizes[0]
    assert len(set(got["uidl"].values())) == count and got["uidl1"] == got["uidl"][1]
    for key in ("retrieve", "iter_retrieve", "retrieve_into", "retrieve_many_into"):
        assert got[key] == expected_sha, key
    assert got["retrieve_many"] == list(enumerate(expected_sha, 1))
    top: bytes = got["top"]
    assert top.endswith(b"\r\n\r\n") and b"Subject:" in top and b"Hello" not in top


@pytest.mark.parametrize("mode", ["plain", "stls", "tls"])
def test_client_against_trio_server_every_message(mode: str, tmp_path: Path, certs: Certs) -> None:
    box = maildir_box(tmp_path)
    server = make_server(box.maildrop, certs, tls=True)
    port = port_of(server, implicit=mode == "tls")

    async def client() -> tuple[dict[str, Any], bool, bool]:
        async with tc.connect("127.0.0.1", port, **client_options(mode, certs)) as c:
            await c.login(USER, PASSWORD)
            got = await fetch_everything(c, COUNT)
            tls = c.tls_active
        return got, tls, c.closed

    got, tls, closed = with_server(server, client)
    check_everything(got, box.sha256, box.sizes)
    assert tls == (mode != "plain")
    assert closed


def test_client_retrieve_many_pipelines_in_one_write(tmp_path: Path, certs: Certs) -> None:
    box = maildir_box(tmp_path)
    server = make_server(box.maildrop, certs)

    async def client() -> tuple[list[tuple[int, str]], list[bytes]]:
        stream = Recording(await trio.open_tcp_stream("127.0.0.1", port_of(server)))
        c = tc.Client(stream, host="127.0.0.1", timeout=10.0)
        await c.open()
        await c.login(USER, PASSWORD)
        before = len(stream.writes)
        got = [(n, sha(d)) async for n, d in c.retrieve_many(range(1, COUNT + 1), window=16)]
        writes = stream.writes[before:]
        assert await c.quit()
        return got, writes

    got, writes = with_server(server, client)
    assert got == list(enumerate(box.sha256, 1))
    assert writes == [b"".join(b"RETR %d\r\n" % n for n in range(1, COUNT + 1))]


def test_client_retrieve_many_error_mid_batch(certs: Certs) -> None:
    server = make_server(MemoryMaildrop({USER: [b"one\n", b"two\n", b"three\n"]}))

    async def client() -> tuple[list[tuple[int, bytes]], p.Pop3Error, bytes]:
        async with tc.connect("127.0.0.1", port_of(server), tls=False) as c:
            await c.login(USER, PASSWORD)
            await c.delete(2)
            got: list[tuple[int, bytes]] = []
            with pytest.raises(p.Pop3Error) as failure:
                async for item in c.retrieve_many([1, 2, 3]):
                    got.append(item)
            after = await c.retrieve(3)  # a -ERR does not break the session
            await c.reset()
        return got, failure.value, after

    got, failure, after = with_server(server, client)
    assert got == [(1, b"one\r\n"), (3, b"three\r\n")]
    assert failure.text == "no such message"  # the server's -ERR text, carried as is
    assert after == b"three\r\n"


def test_client_exit_with_exception_skips_quit_so_nothing_is_deleted() -> None:
    store = MemoryMaildrop({USER: [b"a\n", b"b\n"]})
    server = make_server(store)

    class Boom(Exception):
        pass

    async def client() -> None:
        with pytest.raises(Boom):
            async with tc.connect("127.0.0.1", port_of(server), tls=False) as c:
                await c.login(USER, PASSWORD)
                await c.delete(1)
                raise Boom
        assert c.closed
        await trio.sleep(0.1)  # let the server see the end of the session
        with trio.fail_after(5):
            while True:
                try:
                    async with tc.connect("127.0.0.1", port_of(server), tls=False) as c2:
                        await c2.login(USER, PASSWORD)
                        assert await c2.stat() == (2, 6)
                        await c2.delete(2)
                    break
                except p.Pop3Error as exc:  # the first session may still hold the lock
                    assert exc.is_("IN-USE")
                    await trio.sleep(0.05)

    with_server(server, client)
    assert store.contents(USER) == [b"a\n"]  # the clean exit sent QUIT


def test_client_await_connect_and_wrong_password(certs: Certs) -> None:
    server = make_server(MemoryMaildrop({USER: [b"a\n"]}), certs)

    async def client() -> tuple[p.Pop3Error, bool]:
        c = await tc.connect("127.0.0.1", port_of(server), starttls=True, ssl_context=certs.client)
        try:
            with pytest.raises(p.Pop3Error) as refused:
                await c.login(USER, "wrong")
            await c.login(USER, PASSWORD)  # the session goes on after -ERR
            assert c.state is p.State.TRANSACTION
            return refused.value, await c.quit()
        finally:
            await c.aclose()

    refused, bye = with_server(server, client)
    assert refused.is_("AUTH")
    assert bye


def test_client_streams_into_a_trio_file_and_stops_early(tmp_path: Path, certs: Certs) -> None:
    big = generate_message(USER, 4, 300_000)
    server = make_server(MemoryMaildrop({USER: [big, b"small\n"]}), certs, tls=True)

    async def client() -> tuple[bytes, int, bool, type[BaseException]]:
        target = tmp_path / "out.eml"
        c = await tc.connect("127.0.0.1", port_of(server, implicit=True), ssl_context=certs.client)
        await c.login(USER, PASSWORD)
        async with await trio.open_file(target, "wb") as f:
            size = await c.retrieve_into(1, f)
        data = target.read_bytes()
        async with c.iter_retrieve(1) as chunks:
            async for _ in chunks:
                break  # leaving early: the rest cannot be skipped safely
        with pytest.raises(p.Pop3Error) as after:
            await c.noop()
        return data, size, c.closed, type(after.value)

    data, size, closed, error = with_server(server, client)
    assert sha(data) == sha(wire_form(big)) and size == len(data)
    assert closed and error is p.Pop3Error


def test_client_unstarted_iterator_is_harmless_and_failing_sink_closes() -> None:
    big = generate_message(USER, 8, 200_000)
    server = make_server(MemoryMaildrop({USER: [big, b"small\n"]}))

    class Full:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

    async def client() -> tuple[bytes, bool]:
        c = await tc.connect("127.0.0.1", port_of(server), tls=False)
        await c.login(USER, PASSWORD)
        c.iter_retrieve(1)  # never iterated: nothing was sent
        small = await c.retrieve(2)
        with pytest.raises(OSError, match="No space"):
            await c.retrieve_into(1, Full())
        return small, c.closed

    small, closed = with_server(server, client)
    assert small == b"small\r\n"
    assert closed  # HARDENING 57: a failed write never leaves a half-read reply behind


# ---------------------------------------------------------------------------
# The client against scripted servers (deadlines, TLS upgrade)
# ---------------------------------------------------------------------------


def with_script(
    script: Callable[[trio.SocketStream], Awaitable[None]], body: Callable[[int], Awaitable[T]]
) -> T:
    """Run ``body(port)`` against a one-connection-at-a-time scripted server."""

    async def main() -> T:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, script, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            result = await body(port)
            nursery.cancel_scope.cancel()
        return result

    out: T = trio.run(main)
    return out


def test_hardening_48_trickling_server_trips_the_command_deadline() -> None:
    async def script(stream: trio.SocketStream) -> None:
        await stream.send_all(b"+OK ready\r\n")
        await stream.receive_some(1024)  # CAPA
        await stream.send_all(b"-ERR no CAPA\r\n")
        await stream.receive_some(1024)  # CAPA again
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for byte in b"+OK this reply never ends" * 4:  # 5 s of trickle
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.05)

    async def body(port: int) -> tuple[float, bool]:
        c = await tc.connect("127.0.0.1", port, tls=False, timeout=0.4)
        start = trio.current_time()
        with pytest.raises(p.Pop3TimeoutError):
            await c.capabilities(refresh=True)
        waited = trio.current_time() - start
        with pytest.raises(p.Pop3Error):  # HARDENING 10: never resumed
            await c.capabilities(refresh=True)
        return waited, c.closed

    waited, closed = with_script(script, body)
    assert 0.3 <= waited < 2.0
    assert closed


def test_client_operation_timeout_and_cancellation_close_the_connection() -> None:
    async def script(stream: trio.SocketStream) -> None:
        await stream.send_all(b"+OK ready\r\n")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(1024):
                pass  # never answers anything after the greeting

    async def body(port: int) -> tuple[bool, bool]:
        with pytest.raises(p.Pop3TimeoutError):
            await tc.connect("127.0.0.1", port, tls=False, timeout=5, operation_timeout=0.3)
        c = tc.Client(await trio.open_tcp_stream("127.0.0.1", port), host="x", capa=False)
        await c.open()
        with trio.move_on_after(0.2) as scope:
            await c.capabilities(refresh=True)
        assert scope.cancelled_caught
        with pytest.raises(p.Pop3Error):
            await c.stat()
        return c.closed, c.session.usable

    closed, usable = with_script(script, body)
    assert closed and not usable


def test_client_is_used_by_one_task_at_a_time() -> None:
    async def script(stream: trio.SocketStream) -> None:
        await stream.send_all(b"+OK ready\r\n")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(1024):
                pass

    async def body(port: int) -> bool:
        c = tc.Client(await trio.open_tcp_stream("127.0.0.1", port), host="x", capa=False)
        await c.open()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.capabilities, True)
            await trio.sleep(0.05)
            with pytest.raises(trio.BusyResourceError):
                await c.capabilities(True)
            nursery.cancel_scope.cancel()
        return c.closed

    assert with_script(script, body)  # the cancelled command closed the connection


def test_hardening_29_bytes_glued_after_begin_tls_abort(certs: Certs) -> None:
    async def script(stream: trio.SocketStream) -> None:
        await stream.send_all(b"+OK ready\r\n")
        await stream.receive_some(1024)  # CAPA
        await stream.send_all(b"+OK\r\nSTLS\r\nSASL PLAIN\r\n.\r\n")
        await stream.receive_some(1024)  # STLS
        await stream.send_all(b"+OK Begin TLS\r\n+OK\r\n.\r\n")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            assert await stream.receive_some(1024) == b""  # no ClientHello, no login

    async def body(port: int) -> None:
        with pytest.raises(p.RemoteProtocolError):
            await tc.connect("127.0.0.1", port, starttls=True, ssl_context=certs.client)

    with_script(script, body)


def test_hardening_30_required_stls_missing_sends_no_credentials(certs: Certs) -> None:
    seen: list[bytes] = []

    async def script(stream: trio.SocketStream) -> None:
        await stream.send_all(b"+OK ready\r\n")
        await stream.receive_some(1024)  # CAPA
        await stream.send_all(b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some(1024):
                seen.append(data)

    async def body(port: int) -> None:
        with pytest.raises(p.Pop3TLSError):
            await tc.connect("127.0.0.1", port, starttls=True, ssl_context=certs.client)
        await trio.sleep(0.05)

    with_script(script, body)
    assert b"USER" not in b"".join(seen) and b"AUTH" not in b"".join(seen)


def test_client_refuses_a_certificate_it_cannot_verify(certs: Certs) -> None:
    server = make_server(MemoryMaildrop({USER: [b"a\n"]}), certs, tls=True)

    async def client() -> None:
        with pytest.raises(p.Pop3TLSError):  # default context: trustme's CA is unknown
            await tc.connect("127.0.0.1", port_of(server, implicit=True), timeout=5)
        with pytest.raises(p.Pop3TLSError):
            await tc.connect("127.0.0.1", port_of(server), starttls=True, timeout=5)

    with_server(server, client)


# ---------------------------------------------------------------------------
# The trio client against Dovecot
# ---------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize("mode", ["stls", "tls"])
def test_client_against_dovecot_every_message(mode: str, dovecot: DovecotServer) -> None:
    manifest = dovecot.fill("triobox", COUNT, SIZE, seed=5)
    context = ssl.create_default_context(cafile=str(dovecot.cafile))
    port = dovecot.tls_port if mode == "tls" else dovecot.port
    options: dict[str, Any] = {"ssl_context": context, "timeout": 10.0}
    if mode == "stls":
        options["starttls"] = True

    async def client() -> tuple[dict[str, Any], dict[int, str], bool]:
        async with tc.connect(dovecot.host, port, **options) as c:
            await c.login("triobox", dovecot.users["triobox"])
            caps = await c.capabilities()
            assert caps is not None and "PIPELINING" in caps
            got = await fetch_everything(c, COUNT)
            piped = c.session.conn.pipelining
        async with tc.connect(dovecot.host, port, **options) as c:
            await c.login("triobox", dovecot.users["triobox"])
            again = await c.uidl()
        return got, again, piped

    got, again, piped = trio.run(client)
    infos = [manifest[n] for n in range(1, COUNT + 1)]
    check_everything(got, [m.sha256 for m in infos], [m.size for m in infos])
    assert again == got["uidl"]  # stable across sessions
    assert piped
