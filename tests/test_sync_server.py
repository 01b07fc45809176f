"""The blocking-socket server against real clients (poplib, curl, mpop,
fetchmail) and raw sockets, serving Maildirs and in-memory maildrops."""

from __future__ import annotations

import poplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from peers import (
    fill_maildir,
    normalise_delivered,
    run_curl,
    run_curl_retr,
    run_fetchmail,
    run_mpop,
)
from pop3proto.bindings.maildrop import Maildir, MaildropLocked, MemoryMaildrop
from pop3proto.bindings.sync import Server

import pop3proto as p
from pop3proto._auth import FailureDelay, PasswordTable

pytestmark = pytest.mark.usefixtures("backend")

USERS = {"alice": "secret", "bob": "hunter2"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    d = tmp_path_factory.mktemp("certs")
    cafile = d / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return {"server": server_ctx, "client": client_ctx, "cafile": cafile}


def config(**kw: object) -> p.ServerConfig:
    base: dict[str, object] = {
        "authenticator": PasswordTable(USERS),
        "failure_delay": FailureDelay(base=0.0),
        "stls_available": True,
    }
    base.update(kw)
    return p.ServerConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def maildir(tmp_path: Path) -> tuple[Maildir, object]:
    root = tmp_path / "mail"
    manifest = fill_maildir(root / "alice", "alice", 12, 6000)
    return Maildir(root), manifest


@pytest.fixture
def server(maildir: tuple[Maildir, object], certs: dict[str, object]) -> Iterator[Server]:
    md, _ = maildir
    srv = Server(
        md,
        config=config(),
        listen=("127.0.0.1", 0),
        tls_listen=("127.0.0.1", 0),
        ssl_context=certs["server"],  # type: ignore[arg-type]
    )
    with srv:
        yield srv


def ports(srv: Server) -> tuple[int, int]:
    plain = next(port for _, port, tls in srv.addresses if not tls)
    tls = next(port for _, port, tls in srv.addresses if tls)
    return plain, tls


def test_poplib_plain_stls_and_implicit_tls(
    server: Server, maildir: tuple[Maildir, object], certs: dict[str, object]
) -> None:
    _, manifest = maildir
    plain, tls_port = ports(server)
    ctx = certs["client"]
    for mode in ("plain", "stls", "tls"):
        if mode == "tls":
            c: poplib.POP3 = poplib.POP3_SSL("localhost", tls_port, context=ctx)  # type: ignore[arg-type]
        else:
            c = poplib.POP3("127.0.0.1", plain)
            if mode == "stls":
                c.stls(ctx)  # type: ignore[arg-type]
        c.user("alice")
        c.pass_("secret")
        count, _size = c.stat()
        assert count == len(manifest)  # type: ignore[arg-type]
        for n in range(1, count + 1):
            _resp, lines, _octets = c.retr(n)
            assert manifest.matches(n, b"\r\n".join(lines) + b"\r\n"), (mode, n)  # type: ignore[attr-defined]
        c.quit()


def test_curl_plain_and_pop3s(
    server: Server, maildir: tuple[Maildir, object], certs: dict[str, object]
) -> None:
    _, manifest = maildir
    plain, tls_port = ports(server)
    n = len(manifest)  # type: ignore[arg-type]
    for base, kw in (
        (f"pop3://127.0.0.1:{plain}", {}),
        (f"pop3://127.0.0.1:{plain}", {"starttls": True, "cafile": certs["cafile"]}),
        (f"pop3s://localhost:{tls_port}", {"cafile": certs["cafile"]}),
    ):
        got = run_curl_retr(base, list(range(1, n + 1)), user="alice", password="secret", **kw)  # type: ignore[arg-type]
        for i, data in got.items():
            assert data == manifest.expected(i), (base, i)  # type: ignore[attr-defined]
    listing = run_curl(f"pop3://127.0.0.1:{plain}/", user="alice", password="secret")
    assert listing.count(b"\r\n") == n


def test_mpop_fetches_byte_exact(
    server: Server, maildir: tuple[Maildir, object], certs: dict[str, object], tmp_path: Path
) -> None:
    _, manifest = maildir
    plain, tls_port = ports(server)
    for name, port, kw in (
        ("plain", plain, {}),
        ("stls", plain, {"starttls": True, "cafile": certs["cafile"]}),
        ("tls", tls_port, {"tls": True, "cafile": certs["cafile"]}),
    ):
        out = tmp_path / f"mpop-{name}"
        delivered = run_mpop("127.0.0.1", port, "alice", "secret", out, **kw)  # type: ignore[arg-type]
        got = sorted(normalise_delivered(m.data) for m in delivered)
        want = sorted(manifest.expected(i) for i in range(1, len(manifest) + 1))  # type: ignore[attr-defined, arg-type]
        assert got == want, name


def test_fetchmail_fetches_byte_exact(
    server: Server, maildir: tuple[Maildir, object], certs: dict[str, object], tmp_path: Path
) -> None:
    _, manifest = maildir
    plain, tls_port = ports(server)
    delivered = run_fetchmail("127.0.0.1", plain, "alice", "secret", tmp_path / "fm")
    assert [normalise_delivered(m.data) for m in delivered] == [
        manifest.expected(i)
        for i in range(1, len(manifest) + 1)  # type: ignore[attr-defined, arg-type]
    ]
    delivered = run_fetchmail(
        "127.0.0.1",
        tls_port,
        "alice",
        "secret",
        tmp_path / "fm-tls",
        tls=True,
        cafile=certs["cafile"],
        tls_name="localhost",  # type: ignore[arg-type]
    )
    assert len(delivered) == len(manifest)  # type: ignore[arg-type]


def reopen_count(md: Maildir) -> int:
    """Messages in alice's maildrop, once the server session has let go."""
    deadline = time.monotonic() + 5
    while True:
        try:
            with md.open("alice") as session:
                return len(session.messages)
        except MaildropLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert s.recv(1000).startswith(b"+OK")
    return s


def recv_until_closed(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return out
        if not data:
            return out
        out += data


def test_hardening_27_stls_injection_one_segment(server: Server) -> None:
    plain, _ = ports(server)
    s = raw(plain)
    s.sendall(b"STLS\r\nCAPA\r\n")
    out = recv_until_closed(s)
    assert b"+OK" not in out and b"Capability" not in out and b"TOP" not in out


def test_hardening_28_plaintext_in_second_segment_before_handshake(server: Server) -> None:
    plain, _ = ports(server)
    s = raw(plain)
    s.sendall(b"STLS\r\n")
    assert s.recv(1000).startswith(b"+OK")
    s.sendall(b"CAPA\r\n")  # plaintext where the ClientHello should be
    out = recv_until_closed(s)
    assert b"TOP" not in out and b"UIDL" not in out


def test_hardening_51_drop_after_dele_keeps_everything(
    server: Server, maildir: tuple[Maildir, object]
) -> None:
    md, manifest = maildir
    plain, _ = ports(server)
    c = poplib.POP3("127.0.0.1", plain)
    c.user("alice")
    c.pass_("secret")
    c.dele(1)
    c.dele(2)
    c.close()  # drop the connection without QUIT
    assert reopen_count(md) == len(manifest)  # type: ignore[arg-type]


def test_quit_applies_deletions_and_54_in_use(
    server: Server, maildir: tuple[Maildir, object]
) -> None:
    md, manifest = maildir
    plain, _ = ports(server)
    first = poplib.POP3("127.0.0.1", plain)
    first.user("alice")
    first.pass_("secret")
    second = poplib.POP3("127.0.0.1", plain)
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        second.pass_("secret")
    first.dele(1)
    assert first.quit().startswith(b"+OK")
    assert reopen_count(md) == len(manifest) - 1  # type: ignore[arg-type]


def test_hardening_44_45_deadlines(certs: dict[str, object]) -> None:
    md = MemoryMaildrop({"alice": [b"x\n"]})
    cfg = config(login_timeout=0.5, idle_timeout=0.5)
    with Server(md, config=cfg, listen=("127.0.0.1", 0)) as srv:
        port = srv.addresses[0][1]
        s = raw(port)
        t = time.monotonic()
        with pytest.raises(OSError):
            for _ in range(20):  # trickle bytes: the login deadline still fires
                s.sendall(b"N")
                time.sleep(0.1)
        assert time.monotonic() - t < 5
        c = poplib.POP3("127.0.0.1", port)
        c.user("alice")
        c.pass_("secret")
        time.sleep(0.2)
        c.noop()  # alive before the idle timeout
        time.sleep(1.0)
        with pytest.raises((poplib.error_proto, OSError)):
            c.noop()


def test_hardening_47_connection_cap() -> None:
    md = MemoryMaildrop({"alice": [b"x\n"]})
    cfg = config(limiter=p.ConnectionLimiter(per_address=2))
    with Server(md, config=cfg, listen=("127.0.0.1", 0)) as srv:
        port = srv.addresses[0][1]
        a, b = raw(port), raw(port)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert s.recv(1000).startswith(b"-ERR [SYS/TEMP]")
        a.close()
        b.close()


class _SlowClose:
    """A maildrop session that takes its time to close (the lock is released
    at the end of ``close``), delegating everything else."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def close(self) -> None:
        time.sleep(0.3)
        self._inner.close()  # type: ignore[attr-defined]


class _SlowCloseMaildrop:
    def __init__(self, inner: MemoryMaildrop) -> None:
        self.inner = inner

    def open(self, user: str) -> object:
        return _SlowClose(self.inner.open(user))


@pytest.mark.parametrize("dele", [False, True])
def test_lock_is_released_before_the_quit_reply(dele: bool) -> None:
    """A client that reconnects the moment it reads +OK to QUIT is never
    refused [IN-USE]: the lock goes with the UPDATE, before the reply, even
    when the session's teardown is slow and nothing was deleted."""
    store = MemoryMaildrop({"alice": [b"Subject: a\n\none\n", b"Subject: b\n\ntwo\n"]})
    with Server(_SlowCloseMaildrop(store), config=config(), listen=("127.0.0.1", 0)) as srv:  # type: ignore[arg-type]
        port = srv.addresses[0][1]
        first = poplib.POP3("127.0.0.1", port, timeout=10)
        first.user("alice")
        first.pass_("secret")
        if dele:
            first.dele(1)
        assert first.quit().startswith(b"+OK")
        second = poplib.POP3("127.0.0.1", port, timeout=10)
        second.user("alice")
        assert second.pass_("secret").startswith(b"+OK")  # not -ERR [IN-USE]
        assert second.stat()[0] == (1 if dele else 2)
        second.quit()
