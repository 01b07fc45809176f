"""Every client binding against every server binding (sync, asyncio, trio),
over plaintext, STLS and implicit TLS, with every login method; and curl
against our server with the mechanisms curl speaks."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import trio
import trustme
from peers import run_curl
from pop3proto.bindings import aio as aio_binding
from pop3proto.bindings import sync as sync_binding
from pop3proto.bindings import trio as trio_binding
from pop3proto.bindings.maildrop import MemoryMaildrop

import pop3proto as p
from pop3proto._auth import FailureDelay, PasswordTable

pytestmark = pytest.mark.usefixtures("backend")

MESSAGES = [
    b"Subject: one\n\nfirst\n.\n..dots\n",
    b"Subject: two\r\n\r\n" + b"x" * 70 + b"\r\n" * 3,
    b"Subject: three\n\nno final newline",
]
# Each message's bytes as a client must get them back (CRLF, final CRLF added).
EXPECTED = [
    m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + (b"" if m.endswith(b"\n") else b"\r\n")
    for m in MESSAGES
]
USERS = {"alice": "secret"}
TOKEN = "tok-123"


class Certs:
    def __init__(self) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
        self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server)
        # Client certificates are asked for, not required (for EXTERNAL).
        self.server.verify_mode = ssl.CERT_OPTIONAL
        ca.configure_trust(self.server)
        self.client = ssl.create_default_context()
        ca.configure_trust(self.client)
        self.ca = ca
        self.cert_der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())

    def client_with_cert(self, name: str) -> ssl.SSLContext:
        """A client context presenting a certificate whose commonName is ``name``."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        self.ca.issue_cert(f"{name}@example.com", common_name=name).configure_cert(ctx)
        return ctx


@pytest.fixture(scope="module")
def certs() -> Certs:
    return Certs()


def make_config() -> p.ServerConfig:
    return p.ServerConfig(
        authenticator=PasswordTable(USERS, tokens={"alice": TOKEN}, allow_external=True),
        failure_delay=FailureDelay(base=0.0),
        stls_available=True,
        apop=True,
    )


class Running:
    """A server of one binding running in a background thread."""

    def __init__(
        self,
        kind: str,
        certs: Certs,
        config: p.ServerConfig | None = None,
        messages: list[bytes] = MESSAGES,
    ) -> None:
        self.maildrop = MemoryMaildrop({"alice": messages})
        kw: dict[str, Any] = {
            "config": config or make_config(),
            "listen": ("127.0.0.1", 0),
            "tls_listen": ("127.0.0.1", 0),
            "ssl_context": certs.server,
            "server_certificate": certs.cert_der,
        }
        self.kind = kind
        self._stop: Callable[[], None]
        ready = threading.Event()
        if kind == "sync":
            srv = sync_binding.Server(self.maildrop, **kw).start()
            self.addresses = srv.addresses
            self._stop = srv.close
            return
        if kind == "aio":
            loop = asyncio.new_event_loop()
            aserver = aio_binding.Server(self.maildrop, **kw)
            self.addresses = aserver.addresses

            def run_aio() -> None:
                asyncio.set_event_loop(loop)
                loop.run_until_complete(aserver.start())
                ready.set()
                loop.run_forever()
                loop.run_until_complete(aserver.close())
                loop.close()

            t = threading.Thread(target=run_aio, daemon=True)
            t.start()

            def stop_aio() -> None:
                loop.call_soon_threadsafe(loop.stop)
                t.join(10)

            self._stop = stop_aio
        else:
            tserver = trio_binding.Server(self.maildrop, **kw)
            self.addresses = tserver.addresses
            token_box: list[Any] = []

            async def run_trio() -> None:
                async with trio.open_nursery() as nursery:
                    await nursery.start(tserver.serve)
                    token_box.append((trio.lowlevel.current_trio_token(), nursery.cancel_scope))
                    ready.set()

            t = threading.Thread(target=lambda: trio.run(run_trio), daemon=True)
            t.start()

            def stop_trio() -> None:
                tok, scope = token_box[0]
                tok.run_sync_soon(scope.cancel)
                t.join(10)

            self._stop = stop_trio
        assert ready.wait(10)

    def port(self, tls: bool) -> int:
        return next(port for _, port, implicit in self.addresses if implicit == tls)

    def stop(self) -> None:
        self._stop()


@pytest.fixture(scope="module", params=["sync", "aio", "trio"])
def server(request: pytest.FixtureRequest, certs: Certs) -> Iterator[Running]:
    running = Running(request.param, certs)
    yield running
    running.stop()


# A client session, the same steps in each binding: log in, check the
# listing, retrieve every message (one by one, streamed and pipelined), TOP,
# UIDL, QUIT. Returns what it saw.


def session_sync(port: int, mode: str, certs: Certs, login: dict[str, Any]) -> dict[str, Any]:
    kw = connect_kwargs(mode, certs)
    with sync_binding.connect("localhost" if mode != "plain" else "127.0.0.1", port, **kw) as c:
        c.login("alice", **login)
        out: dict[str, Any] = {"stat": c.stat(), "uidl": c.uidl()}
        out["retr"] = [c.retrieve(i) for i in (1, 2, 3)]
        out["many"] = [data for _msg, data in c.retrieve_many([1, 2, 3])]
        out["stream"] = b"".join(c.iter_retrieve(1))
        out["top"] = c.top(1, 0)
    return out


async def session_async(
    module: Any, port: int, mode: str, certs: Certs, login: dict[str, Any]
) -> dict[str, Any]:
    kw = connect_kwargs(mode, certs)
    async with module.connect("localhost" if mode != "plain" else "127.0.0.1", port, **kw) as c:
        await c.login("alice", **login)
        out: dict[str, Any] = {"stat": await c.stat(), "uidl": await c.uidl()}
        out["retr"] = [await c.retrieve(i) for i in (1, 2, 3)]
        out["many"] = [data async for _msg, data in c.retrieve_many([1, 2, 3])]
        out["stream"] = b"".join([chunk async for chunk in c.iter_retrieve(1)])
        out["top"] = await c.top(1, 0)
    return out


def connect_kwargs(mode: str, certs: Certs) -> dict[str, Any]:
    if mode == "plain":
        return {"tls": False, "allow_insecure": True}
    if mode == "stls":
        return {"tls": False, "starttls": True, "ssl_context": certs.client}
    return {"tls": True, "ssl_context": certs.client}


def run_client(
    kind: str, port: int, mode: str, certs: Certs, login: dict[str, Any]
) -> dict[str, Any]:
    if kind == "sync":
        return session_sync(port, mode, certs, login)
    if kind == "aio":
        return asyncio.run(session_async(aio_binding, port, mode, certs, login))
    return trio.run(session_async, trio_binding, port, mode, certs, login)


def check(out: dict[str, Any]) -> None:
    sizes = [p.wire_size([m]) for m in MESSAGES]
    assert tuple(out["stat"]) == (3, sum(sizes))
    assert out["retr"] == EXPECTED
    assert out["many"] == EXPECTED
    assert out["stream"] == EXPECTED[0]
    assert out["top"] == b"Subject: one\r\n\r\n"
    uids = list(out["uidl"].values())  # {msg: uid}
    assert sorted(out["uidl"]) == [1, 2, 3]
    assert len(set(uids)) == 3


@pytest.mark.parametrize("client", ["sync", "aio", "trio"])
@pytest.mark.parametrize("mode", ["plain", "stls", "tls"])
def test_every_client_against_every_server(
    server: Running, client: str, mode: str, certs: Certs
) -> None:
    port = server.port(mode == "tls")
    check(run_client(client, port, mode, certs, {"password": "secret"}))


@pytest.mark.parametrize("kind", ["sync", "aio", "trio"])
def test_oe_ns_eoh_each_server_binding(kind: str, certs: Certs) -> None:
    """The header-end workaround reads each message at login through the
    binding's maildrop requests; every server binding carries them out."""
    stored = [b"Subject: headers only\n", *MESSAGES]
    config = attrs.evolve(make_config(), oe_ns_eoh=True)
    running = Running(kind, certs, config=config, messages=stored)
    try:
        with sync_binding.connect(
            "127.0.0.1", running.port(False), tls=False, allow_insecure=True
        ) as c:
            c.login("alice", "secret")
            sizes = c.list()
            got = [c.retrieve(i) for i in range(1, len(stored) + 1)]
    finally:
        running.stop()
    assert got == [b"Subject: headers only\r\n\r\n", *EXPECTED]
    # LIST leaves out the CRLF that ends an unended last line (RFC 1939 §11).
    unended = [2 * (not m.endswith(b"\n")) for m in stored]
    assert sizes == {i + 1: len(g) - u for i, (g, u) in enumerate(zip(got, unended, strict=True))}


LOGINS = {
    "USER": {"password": "secret", "mechanism": "USER"},
    "APOP": {"password": "secret", "mechanism": "APOP"},
    "PLAIN": {"password": "secret", "mechanism": "PLAIN"},
    "LOGIN": {"password": "secret", "mechanism": "LOGIN"},
    "CRAM-MD5": {"password": "secret", "mechanism": "CRAM-MD5"},
    "SCRAM-SHA-1": {"password": "secret", "mechanism": "SCRAM-SHA-1"},
    "SCRAM-SHA-256": {"password": "secret", "mechanism": "SCRAM-SHA-256"},
    "SCRAM-SHA-1-PLUS": {"password": "secret", "mechanism": "SCRAM-SHA-1-PLUS"},
    "SCRAM-SHA-256-PLUS": {"password": "secret", "mechanism": "SCRAM-SHA-256-PLUS"},
    "OAUTHBEARER": {"token": TOKEN, "mechanism": "OAUTHBEARER"},
    "XOAUTH2": {"token": TOKEN, "mechanism": "XOAUTH2"},
    "auto": {"password": "secret"},
}


@pytest.mark.parametrize("client", ["sync", "aio", "trio"])
@pytest.mark.parametrize("method", sorted(LOGINS))
def test_every_login_method_each_binding(
    server: Running, client: str, method: str, certs: Certs
) -> None:
    out = run_client(client, server.port(True), "tls", certs, LOGINS[method])
    assert out["retr"] == EXPECTED


@pytest.mark.parametrize("client", ["sync", "aio", "trio"])
@pytest.mark.parametrize("mode", ["stls", "tls"])
def test_external_with_a_client_certificate_each_binding(
    server: Running, client: str, mode: str, certs: Certs
) -> None:
    """SASL EXTERNAL (RFC 4422 App. A): the identity is the verified client
    certificate's commonName; no password is sent."""
    with_cert = Certs.__new__(Certs)
    vars(with_cert).update(vars(certs))
    with_cert.client = certs.client_with_cert("alice")
    out = run_client(client, server.port(mode == "tls"), mode, with_cert, {"external": True})
    assert out["retr"] == EXPECTED
    # A certificate naming nobody who has a maildrop: refused, typed.
    with_cert.client = certs.client_with_cert("mallory")
    with pytest.raises(p.Pop3Error):
        run_client(client, server.port(mode == "tls"), mode, with_cert, {"external": True})
    # No certificate: EXTERNAL is not offered, and the client does not try it.
    with pytest.raises(p.Pop3Error):
        run_client(client, server.port(mode == "tls"), mode, certs, {"external": True})


def test_wrong_password_is_a_typed_auth_error(server: Running, certs: Certs) -> None:
    with pytest.raises(p.Pop3Error) as info:
        session_sync(server.port(True), "tls", certs, {"password": "wrong", "mechanism": "PLAIN"})
    assert info.value.is_("AUTH")


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5", "+APOP", "XOAUTH2", "OAUTHBEARER"])
def test_curl_logs_in_with_each_mechanism(
    server: Running, mech: str, certs: Certs, tmp_path: Any
) -> None:
    cafile = tmp_path / "ca.pem"
    certs.ca.cert_pem.write_to_path(str(cafile))
    url = f"pop3s://localhost:{server.port(True)}/1"
    if mech in ("XOAUTH2", "OAUTHBEARER"):
        args = ["--login-options", f"AUTH={mech}", "--oauth2-bearer", TOKEN]
        data = run_curl(url, user="alice", cafile=cafile, args=args)
    else:
        option = "AUTH=+APOP" if mech == "+APOP" else f"AUTH={mech}"
        data = run_curl(
            url, user="alice", password="secret", cafile=cafile, args=["--login-options", option]
        )
    assert hashlib.sha256(data).digest() == hashlib.sha256(EXPECTED[0]).digest()
