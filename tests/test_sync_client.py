"""The blocking client (``pop3proto.bindings.sync``) over real sockets.

Against the private Dovecot fixture: every message of a filled mailbox
checked against the manifest's SHA-256, STLS, implicit TLS with the fixture's
CA, TOP, UIDL, pipelined batches, every mechanism Dovecot offers. Against
small scripted servers on 127.0.0.1 (``LineServer``): certificate checks
(HARDENING 35), STLS injection and stripping on a real TLS stack (29, 30),
trickling servers and deadlines (48), a server that closes on CAPA.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme
from peers import DOVECOT_MECHANISMS, DovecotServer
from pop3proto.bindings import sync
from pop3proto.bindings._common import _signature_hash, server_end_point
from pop3proto.bindings._sync_client import BULK_LOW_WATER, tls_info_for
from pop3proto.bindings.sync import (
    Client,
    Pop3Error,
    Pop3TimeoutError,
    Pop3TLSError,
    connect,
)

import pop3proto as p

# ---------------------------------------------------------------------------
# a scripted server on a real socket
# ---------------------------------------------------------------------------


class Peer:
    """The server's end of one connection: send bytes, read lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self.lines: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self._buf:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("client closed")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        line = line.rstrip(b"\r")
        self.lines.append(line)
        return line

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self._buf, "plaintext after STLS"
        self.sock = context.wrap_socket(self.sock, server_side=True)

    def trickle(self, data: bytes, delay: float) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            self.sock.sendall(data[i : i + 1])
            time.sleep(delay)


class LineServer:
    """Accepts ``count`` connections on 127.0.0.1, one after the other, and
    runs ``handler(peer)`` for each; ``tls`` makes it implicit TLS. Errors
    in the handler (a client that went away) are kept in ``errors``."""

    def __init__(
        self,
        handler: Callable[[Peer], None],
        *,
        count: int = 1,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.count = count
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        for _ in range(self.count):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(10)
            try:
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                peer = Peer(conn)
                self.peers.append(peer)
                self.handler(peer)
            except Exception as exc:
                self.errors.append(exc)
            finally:
                with contextlib.suppress(OSError):
                    conn.close()

    def __enter__(self) -> LineServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self.thread.join(15)


def serve_capa_and_quit(peer: Peer, greeting: bytes = b"+OK hello\r\n") -> None:
    peer.send(greeting)
    while True:
        try:
            line = peer.line()
        except (EOFError, OSError):
            return
        if line == b"CAPA":
            peer.send(b"+OK\r\nUSER\r\n.\r\n")
        elif line == b"QUIT":
            peer.send(b"+OK bye\r\n")
            return
        else:
            peer.send(b"-ERR no\r\n")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names, **kw).configure_cert(ctx)
    return ctx


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


# ---------------------------------------------------------------------------
# the module's surface
# ---------------------------------------------------------------------------


def test_sync_module_reexports_the_client() -> None:
    assert sync.connect is connect and sync.Client is Client
    assert issubclass(Pop3TimeoutError, TimeoutError)
    assert issubclass(Pop3TLSError, Pop3Error)


# ---------------------------------------------------------------------------
# TLS certificate checks (HARDENING 35)
# ---------------------------------------------------------------------------


def test_implicit_tls_with_a_trusted_certificate(ca: trustme.CA) -> None:
    with (
        LineServer(serve_capa_and_quit, tls=server_context(ca, "127.0.0.1")) as srv,
        connect("127.0.0.1", srv.port, ssl_context=client_context(ca), timeout=5) as c,
    ):
        assert c.tls_active
        assert c.greeting == p.Greeting("hello")
        info = c.session.tls_info
        assert info is not None
        der = c.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert der is not None
        assert info.channel_bindings["tls-server-end-point"] == hashlib.sha256(der).digest()
    assert srv.peers[0].lines[-1] == b"QUIT"


@pytest.mark.parametrize(
    "case",
    ["wrong-host-name", "untrusted", "expired"],
)
def test_bad_certificates_are_refused(ca: trustme.CA, case: str) -> None:
    if case == "wrong-host-name":
        server_ctx = server_context(ca, "pop.example.org")
        client_ctx: ssl.SSLContext | None = client_context(ca)
    elif case == "untrusted":
        server_ctx = server_context(trustme.CA(), "127.0.0.1")
        client_ctx = None  # the default context: system roots only
    else:
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
        server_ctx = server_context(ca, "127.0.0.1", not_after=past)
        client_ctx = client_context(ca)
    with (
        LineServer(serve_capa_and_quit, tls=server_ctx) as srv,
        pytest.raises(Pop3TLSError, match="certificate"),
    ):
        connect("127.0.0.1", srv.port, ssl_context=client_ctx, timeout=5)
    # ... unless the caller passes a context of its own that accepts it.
    lax = ssl.create_default_context()
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    with (
        LineServer(serve_capa_and_quit, tls=server_ctx) as srv,
        connect("127.0.0.1", srv.port, ssl_context=lax, timeout=5) as c,
    ):
        assert c.tls_active and c.greeting is not None


def test_stls_to_a_wrong_host_name_sends_no_credentials(ca: trustme.CA) -> None:
    tls = server_context(ca, "pop.example.org")

    def handler(peer: Peer) -> None:
        peer.send(b"+OK hello\r\n")
        assert peer.line() == b"CAPA"
        peer.send(b"+OK\r\nSTLS\r\nUSER\r\n.\r\n")
        assert peer.line() == b"STLS"
        peer.send(b"+OK go\r\n")
        with contextlib.suppress(ssl.SSLError, OSError):
            peer.starttls(tls)
            peer.line()

    with LineServer(handler) as srv, pytest.raises(Pop3TLSError):
        connect("127.0.0.1", srv.port, starttls=True, ssl_context=client_context(ca), timeout=5)
    assert srv.peers[0].lines == [b"CAPA", b"STLS"]


# ---------------------------------------------------------------------------
# STLS injection and stripping on a real TLS stack (HARDENING 29, 30)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("trickled", [False, True])
def test_response_injected_after_stls_is_refused(ca: trustme.CA, trickled: bool) -> None:
    tls = server_context(ca, "127.0.0.1")

    def handler(peer: Peer) -> None:
        peer.send(b"+OK hello\r\n")
        assert peer.line() == b"CAPA"
        peer.send(b"+OK\r\nSTLS\r\nUSER\r\n.\r\n")
        assert peer.line() == b"STLS"
        if trickled:
            peer.send(b"+OK Begin TLS\r\n")
            peer.trickle(b"+OK\r\n.\r\n", 0.01)
        else:
            peer.send(b"+OK Begin TLS\r\n+OK\r\n.\r\n")
        with contextlib.suppress(EOFError, OSError, ssl.SSLError):
            peer.starttls(tls)
            peer.line()

    with LineServer(handler) as srv, pytest.raises((p.RemoteProtocolError, Pop3TLSError)):
        c = connect("127.0.0.1", srv.port, starttls=True, ssl_context=client_context(ca), timeout=5)
        c.login("alice", "secret")
    assert srv.peers[0].lines == [b"CAPA", b"STLS"]


@pytest.mark.parametrize("reply", [b"+OK\r\nUSER\r\n.\r\n", b"-ERR no CAPA\r\n"])
def test_stls_stripped_aborts_before_credentials(reply: bytes) -> None:
    def handler(peer: Peer) -> None:
        peer.send(b"+OK hello <1.2@x>\r\n")
        assert peer.line() == b"CAPA"
        peer.send(reply)
        with contextlib.suppress(EOFError, OSError):
            peer.line()

    with LineServer(handler) as srv, pytest.raises(Pop3TLSError):
        connect("127.0.0.1", srv.port, starttls=True, timeout=5)
    assert srv.peers[0].lines == [b"CAPA"]


# ---------------------------------------------------------------------------
# deadlines (HARDENING 34, 48)
# ---------------------------------------------------------------------------


def login_then(body: Callable[[Peer], None]) -> Callable[[Peer], None]:
    def handler(peer: Peer) -> None:
        peer.send(b"+OK hello\r\n")
        assert peer.line() == b"CAPA"
        peer.send(b"+OK\r\nUSER\r\n.\r\n")
        assert peer.line().startswith(b"USER")
        peer.send(b"+OK\r\n")
        assert peer.line().startswith(b"PASS")
        peer.send(b"+OK in\r\n")
        with contextlib.suppress(OSError):
            body(peer)

    return handler


@contextlib.contextmanager
def _tls_client(srv: LineServer, ca: trustme.CA) -> Iterator[Client]:
    with connect("127.0.0.1", srv.port, ssl_context=client_context(ca), timeout=5) as c:
        c.login("u", "p", mechanism="USER")
        yield c


def _bulk_body(size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxy\r\n"
    return (line * (size // len(line) + 1))[:size].rsplit(b"\r\n", 1)[0] + b"\r\n"


@pytest.mark.parametrize("pause", [0.0, 0.3])
def test_tls_stream_uses_a_low_water_mark_and_never_waits_past_the_data(
    ca: trustme.CA, monkeypatch: pytest.MonkeyPatch, pause: float
) -> None:
    # A 3 MB message streamed over TLS switches the socket to wake only per
    # BULK_LOW_WATER; the stream's end (and a pause mid-stream, less than a
    # low-water mark in flight) is read at once, not after the command
    # timeout; the next small reply switches it back.
    body = _bulk_body(3_000_000)
    first = 100_000

    def serve(peer: Peer) -> None:
        assert peer.line() == b"RETR 1"
        peer.send(b"+OK\r\n" + body[:first])
        time.sleep(pause)
        peer.send(body[first:] + b".\r\n")
        assert peer.line() == b"NOOP"
        time.sleep(pause)
        peer.send(b"+OK\r\n")
        assert peer.line() == b"QUIT"
        peer.send(b"+OK\r\n")

    switched: list[bool] = []
    real = Client._set_low_water

    def spy(self: Client, sock: socket.socket, on: bool) -> None:
        real(self, sock, on)
        switched.append(on)
        value = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        assert value == (BULK_LOW_WATER if on else 1)

    monkeypatch.setattr(Client, "_set_low_water", spy)
    server = LineServer(login_then(serve), tls=server_context(ca, "127.0.0.1"))
    with (
        server as srv,
        connect("127.0.0.1", srv.port, ssl_context=client_context(ca), timeout=5) as c,
    ):
        c.login("u", "p", mechanism="USER")
        t0 = time.monotonic()
        assert c.retrieve(1) == body
        c.noop()
        elapsed = time.monotonic() - t0
    assert switched[0] is True and switched[-1] is False
    assert elapsed < 4  # the 5 s command timeout never ran out
    assert not server.errors


def test_tls_stream_without_a_low_water_mark(
    ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where SO_RCVLOWAT cannot be set, the client reads as before.
    body = _bulk_body(1_000_000)

    def serve(peer: Peer) -> None:
        assert peer.line() == b"RETR 1"
        peer.send(b"+OK\r\n" + body + b".\r\n")
        assert peer.line() == b"QUIT"
        peer.send(b"+OK\r\n")

    monkeypatch.delattr(socket, "SO_RCVLOWAT")
    server = LineServer(login_then(serve), tls=server_context(ca, "127.0.0.1"))
    with (
        server as srv,
        connect("127.0.0.1", srv.port, ssl_context=client_context(ca), timeout=5) as c,
    ):
        c.login("u", "p", mechanism="USER")
        assert c.retrieve(1) == body
        assert c._low_water is None
    assert not server.errors


def test_trickling_body_trips_the_command_deadline() -> None:
    # HARDENING 48: a byte every 50 ms keeps every read short, but the
    # command as a whole must finish within its deadline.
    def body(peer: Peer) -> None:
        assert peer.line() == b"RETR 1"
        peer.send(b"+OK\r\n")
        peer.trickle(b"x" * 200, 0.05)

    with LineServer(login_then(body)) as srv:
        c = connect("127.0.0.1", srv.port, tls=False, allow_insecure=True, timeout=0.8)
        c.login("alice", "secret")
        started = time.monotonic()
        with pytest.raises(Pop3TimeoutError):
            c.retrieve(1)
        elapsed = time.monotonic() - started
        assert 0.7 < elapsed < 2.5
        assert c.closed
        with pytest.raises(Pop3Error):
            c.noop()


def test_trickling_status_line_trips_the_command_deadline() -> None:
    def body(peer: Peer) -> None:
        assert peer.line() == b"STAT"
        peer.trickle(b"+OK 1 " + b"1" * 100, 0.05)

    with LineServer(login_then(body)) as srv:
        c = connect("127.0.0.1", srv.port, tls=False, allow_insecure=True, timeout=0.6)
        c.login("alice", "secret")
        started = time.monotonic()
        with pytest.raises(Pop3TimeoutError):
            c.stat()
        assert time.monotonic() - started < 2.0


def test_greeting_deadline() -> None:
    def handler(peer: Peer) -> None:
        with contextlib.suppress(EOFError, OSError):
            peer.line()  # never greets; waits for the client to go away

    with LineServer(handler) as srv:
        started = time.monotonic()
        with pytest.raises(Pop3TimeoutError):
            connect("127.0.0.1", srv.port, tls=False, timeout=10, greeting_timeout=0.4)
        assert time.monotonic() - started < 2.0


def test_stalled_tls_handshake_is_cut_off() -> None:
    # HARDENING 34: the server accepts and never answers the ClientHello.
    def handler(peer: Peer) -> None:
        with contextlib.suppress(OSError):
            while peer.sock.recv(4096):
                pass

    with LineServer(handler) as srv:
        started = time.monotonic()
        with pytest.raises(Pop3TimeoutError):
            connect("127.0.0.1", srv.port, tls=True, timeout=0.5)
        assert time.monotonic() - started < 2.0


def test_operation_deadline_covers_the_whole_call() -> None:
    # Every reply is quick (0.15 s), but a batch of ten is not.
    def body(peer: Peer) -> None:
        while True:
            line = peer.line()
            if line.startswith((b"NOOP", b"DELE")):
                time.sleep(0.15)
                peer.send(b"+OK\r\n")

    with LineServer(login_then(body)) as srv:
        c = connect(
            "127.0.0.1", srv.port, tls=False, allow_insecure=True, timeout=5, operation_timeout=0.5
        )
        c.login("alice", "secret")
        for _ in range(5):  # 0.75 s in all: each call has its own budget
            c.noop()
        started = time.monotonic()
        with pytest.raises(Pop3TimeoutError, match="operation"):
            c.delete_many(range(1, 11))  # one call: ten round trips
        assert time.monotonic() - started < 1.2
        assert c.closed


def test_server_closing_on_capa_is_reconnected_without_capa() -> None:
    def handler(peer: Peer) -> None:
        peer.send(b"+OK hello\r\n")
        line = peer.line()
        if line == b"CAPA":
            return  # closes the connection
        assert line == b"USER alice"
        peer.send(b"+OK\r\n")
        assert peer.line() == b"PASS secret"
        peer.send(b"+OK\r\n")
        assert peer.line() == b"QUIT"
        peer.send(b"+OK\r\n")

    with (
        LineServer(handler, count=2) as srv,
        connect("127.0.0.1", srv.port, tls=False, allow_insecure=True, timeout=5) as c,
    ):
        assert c.session.cached_capabilities is None
        c.login("alice", "secret")
        assert c.session.mechanism == "USER"
    assert [peer.lines for peer in srv.peers] == [
        [b"CAPA"],
        [b"USER alice", b"PASS secret", b"QUIT"],
    ]


def test_plaintext_login_refused_without_allow_insecure() -> None:
    with (
        LineServer(serve_capa_and_quit) as srv,
        connect("127.0.0.1", srv.port, tls=False, timeout=5) as c,
        pytest.raises(Pop3TLSError),
    ):
        c.login("alice", "secret")
    assert srv.peers[0].lines == [b"CAPA", b"QUIT"]


# ---------------------------------------------------------------------------
# channel binding
# ---------------------------------------------------------------------------


def _certificate(hash_name: str | None, key_kind: str) -> bytes:
    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    from cryptography.x509.oid import NameOID

    key: Any
    if key_kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pop.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if hash_name == "sha1":
        # Current libraries refuse to sign with SHA-1: sign with SHA-256 and
        # rename the algorithm (sha256WithRSA -> sha1WithRSA); only the
        # identifier matters here, not the signature.
        der = _certificate("sha256", key_kind)
        return der.replace(bytes.fromhex("2a864886f70d01010b"), bytes.fromhex("2a864886f70d010105"))
    algorithm = None if hash_name is None else getattr(hashes, hash_name.upper())()
    if key_kind == "pss":
        cert = builder.sign(
            key,
            algorithm,
            rsa_padding=padding.PSS(padding.MGF1(algorithm), padding.PSS.DIGEST_LENGTH),
        )
    else:
        cert = builder.sign(key, algorithm)
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("hash_name", "key_kind", "expected"),
    [
        ("sha256", "rsa", "sha256"),
        ("sha384", "rsa", "sha384"),
        ("sha512", "rsa", "sha512"),
        ("sha1", "rsa", "sha256"),  # RFC 5929 §4.1: SHA-1 -> SHA-256
        ("sha384", "ec", "sha384"),
        ("sha512", "ec", "sha512"),
        ("sha384", "pss", "sha384"),
        (None, "ed25519", "sha256"),  # no single hash: SHA-256
    ],
)
def test_tls_server_end_point_uses_the_signature_hash(
    hash_name: str | None, key_kind: str, expected: str
) -> None:
    from cryptography import x509

    der = _certificate(hash_name, key_kind)
    parsed = x509.load_der_x509_certificate(der)
    if hash_name is not None:
        assert parsed.signature_hash_algorithm is not None
        assert parsed.signature_hash_algorithm.name == hash_name
    assert _signature_hash(der) == expected
    assert server_end_point(der) == hashlib.new(expected, der).digest()


def test_tls_server_end_point_of_garbage_is_sha256() -> None:
    for junk in (b"", b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x01\x02\x03"):
        assert server_end_point(junk) == hashlib.sha256(junk).digest()


def test_tls_unique_only_below_tls_1_3(ca: trustme.CA) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        server_ctx = server_context(ca, "127.0.0.1")
        server_ctx.maximum_version = version
        with (
            LineServer(serve_capa_and_quit, tls=server_ctx) as srv,
            connect("127.0.0.1", srv.port, ssl_context=client_context(ca), timeout=5) as c,
        ):
            assert isinstance(c.sock, ssl.SSLSocket)
            bindings = tls_info_for(c.sock).channel_bindings
            assert "tls-server-end-point" in bindings
            assert ("tls-unique" in bindings) == (version is ssl.TLSVersion.TLSv1_2)
            assert "tls-exporter" not in bindings


# ---------------------------------------------------------------------------
# Dovecot
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dovecot_ctx(dovecot: DovecotServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(dovecot.cafile))


def _open(dovecot: DovecotServer, ctx: ssl.SSLContext, **kw: Any) -> Client:
    kw.setdefault("timeout", 30)
    return connect("127.0.0.1", dovecot.tls_port, ssl_context=ctx, **kw)


@pytest.mark.peers
@pytest.mark.usefixtures("backend")
def test_every_message_of_a_mailbox_matches_the_manifest(
    dovecot: DovecotServer, dovecot_ctx: ssl.SSLContext, backend: str
) -> None:
    user = f"full-{backend}"
    manifest = dovecot.fill(user, 120, 9000)
    with _open(dovecot, dovecot_ctx) as c:
        c.login(user, "secret")
        count, size = c.stat()
        assert count == len(manifest) and size == manifest.total_size
        sizes = c.list()
        assert sizes == {m.number: m.size for m in manifest}
        got = dict(c.retrieve_many(sorted(sizes), window=16))
    assert sorted(got) == sorted(sizes)
    for info in manifest:
        data = got[info.number]
        assert hashlib.sha256(data).hexdigest() == info.sha256, info.number
        assert len(data) == info.returned_size


@pytest.mark.peers
def test_large_messages_every_way(dovecot: DovecotServer, dovecot_ctx: ssl.SSLContext) -> None:
    manifest = dovecot.fill("big", 3, 1_500_000)
    with _open(dovecot, dovecot_ctx) as c:
        c.login("big", "secret")
        assert manifest.matches(1, c.retrieve(1))
        sink = io.BytesIO()
        assert c.retrieve_into(2, sink) == manifest[2].returned_size
        assert manifest.matches(2, sink.getvalue())
        pieces = list(c.iter_retrieve(3))
        assert len(pieces) > 1 and manifest.matches(3, b"".join(pieces))


@pytest.mark.peers
def test_large_messages_pipelined_into_files(
    dovecot: DovecotServer, dovecot_ctx: ssl.SSLContext
) -> None:
    manifest = dovecot.fill("bigmany", 4, 700_000)
    files: dict[int, io.BytesIO] = {}

    def open_file(msg: int) -> io.BytesIO:
        assert msg not in files and all(f.tell() for f in files.values())
        files[msg] = io.BytesIO()
        return files[msg]

    with _open(dovecot, dovecot_ctx) as c:
        c.login("bigmany", "secret")
        done = list(c.retrieve_many_into([4, 2, 3, 1], open_file))
        assert [n for n, _ in done] == [4, 2, 3, 1]
        for n, size in done:
            assert size == manifest[n].returned_size
            assert manifest.matches(n, files[n].getvalue())
        assert c.stat()[0] == 4  # still usable

        def no_room(msg: int) -> io.BytesIO:
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space"):
            list(c.retrieve_many_into([1, 2], no_room))
        assert c.closed


@pytest.mark.peers
def test_starttls_with_dovecot(dovecot: DovecotServer, dovecot_ctx: ssl.SSLContext) -> None:
    manifest = dovecot.fill("stls", 12, 3000)
    with connect(
        "localhost", dovecot.port, starttls=True, ssl_context=dovecot_ctx, timeout=30
    ) as c:
        assert c.tls_active
        caps = c.capabilities()
        assert caps is not None and not caps.stls
        assert c.session.apop_timestamp is None  # the greeting was plaintext
        c.login("stls", "secret")
        for n, data in c.retrieve_many(range(1, 13)):
            assert manifest.matches(n, data)


@pytest.mark.peers
def test_top_and_uidl(dovecot: DovecotServer, dovecot_ctx: ssl.SSLContext) -> None:
    manifest = dovecot.fill("topuidl", 8, 4000)
    with _open(dovecot, dovecot_ctx) as c:
        c.login("topuidl", "secret")
        uids = c.uidl()
        assert sorted(uids) == list(range(1, 9)) and len(set(uids.values())) == 8
        for n in (1, 5):
            assert c.uidl(n) == uids[n]
            full = manifest.expected(n)
            head, _, body = full.partition(b"\r\n\r\n")
            for lines in (0, 3):
                wanted = (
                    head
                    + b"\r\n\r\n"
                    + b"".join(line + b"\r\n" for line in body.split(b"\r\n")[:lines])
                )
                assert c.top(n, lines) == wanted
    with _open(dovecot, dovecot_ctx) as c:  # UIDs are stable across sessions
        c.login("topuidl", "secret")
        assert c.uidl() == uids


@pytest.mark.peers
@pytest.mark.parametrize("mechanism", [*DOVECOT_MECHANISMS, "APOP", "USER", None])
def test_every_mechanism_dovecot_offers(
    dovecot: DovecotServer, dovecot_ctx: ssl.SSLContext, mechanism: str | None
) -> None:
    manifest = dovecot.fill("mechs", 2, 1000)
    with _open(dovecot, dovecot_ctx) as c:
        c.login("mechs", "secret", mechanism=mechanism)
        assert c.session.mechanism == (mechanism or "SCRAM-SHA-256")
        assert manifest.matches(2, c.retrieve(2))


@pytest.mark.peers
def test_wrong_password_with_dovecot(dovecot: DovecotServer, dovecot_ctx: ssl.SSLContext) -> None:
    dovecot.add_user("wrongpw", "right")
    with _open(dovecot, dovecot_ctx) as c:
        with pytest.raises(Pop3Error) as info:
            c.login("wrongpw", "wrong")
        assert info.value.is_("AUTH")
        c.login("wrongpw", "right")
        assert c.state is p.State.TRANSACTION


@pytest.mark.peers
def test_plaintext_port_uses_a_challenge_mechanism(dovecot: DovecotServer) -> None:
    dovecot.fill("plainport", 1, 500)
    with connect("127.0.0.1", dovecot.port, tls=False, timeout=30) as c:
        with pytest.raises(Pop3TLSError):
            c.login("plainport", "secret", mechanism="PLAIN")
        c.login("plainport", "secret")
        assert c.session.mechanism == "SCRAM-SHA-256"


@pytest.mark.peers
def test_deletions_apply_only_on_a_clean_exit(
    dovecot: DovecotServer, dovecot_ctx: ssl.SSLContext
) -> None:
    dovecot.fill("deleter", 6, 800)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), _open(dovecot, dovecot_ctx) as c:
        c.login("deleter", "secret")
        c.delete_many([1, 2, 3])
        raise Boom
    with _open(dovecot, dovecot_ctx) as c:
        c.login("deleter", "secret")
        assert c.stat()[0] == 6
        assert c.delete_many([1, 2]) == 2
        c.delete(6)
        c.reset()
        c.delete(3)
        assert c.quit() is True
        assert c.closed
    with _open(dovecot, dovecot_ctx) as c:
        c.login("deleter", "secret")
        assert c.stat()[0] == 5


@pytest.mark.peers
def test_leaving_an_iteration_early_closes(
    dovecot: DovecotServer, dovecot_ctx: ssl.SSLContext
) -> None:
    dovecot.fill("early", 4, 200_000)
    c = _open(dovecot, dovecot_ctx)
    c.login("early", "secret")
    for _ in c.iter_retrieve(1):
        break
    assert c.closed
    with pytest.raises(Pop3Error):
        c.stat()
    c = _open(dovecot, dovecot_ctx)
    c.login("early", "secret")
    for n, _data in c.retrieve_many([1, 2, 3, 4]):
        if n == 2:
            break
    assert c.closed


@pytest.mark.peers
def test_retrieve_into_a_failing_file_closes(
    dovecot: DovecotServer, dovecot_ctx: ssl.SSLContext
) -> None:
    dovecot.fill("diskfull", 1, 100_000)

    class Full(io.RawIOBase):
        def write(self, data: Any) -> int:
            raise OSError(28, "No space left on device")

    with _open(dovecot, dovecot_ctx) as c:
        c.login("diskfull", "secret")
        with pytest.raises(OSError, match="No space"):
            c.retrieve_into(1, Full())
        assert c.closed
