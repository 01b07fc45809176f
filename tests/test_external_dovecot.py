"""SASL EXTERNAL against a real server: a private Dovecot that asks for TLS
client certificates and takes the user from a verified certificate's
commonName, through the blocking and asyncio clients and ``pop3proto fetch``."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from peers import DovecotServer, running_dovecot
from pop3proto.bindings import aio
from pop3proto.bindings.cli import main
from pop3proto.bindings.sync import connect

import pop3proto as p
from pop3proto import Pop3Error

pytestmark = pytest.mark.peers

USER = "certuser"


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert_dovecot(
    tmp_path_factory: pytest.TempPathFactory, client_ca: trustme.CA
) -> Iterator[DovecotServer]:
    work = tmp_path_factory.mktemp("external-dovecot")
    client_ca.cert_pem.write_to_path(str(work / "client-ca.pem"))
    with running_dovecot(work, client_ca=work / "client-ca.pem") as server:
        server.fill(USER, 3, 2500)
        yield server


def _ctx(dovecot: DovecotServer, ca: trustme.CA | None, name: str = USER) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(dovecot.cafile))
    if ca is not None:
        ca.issue_cert(f"{name}@example.org", common_name=name).configure_cert(ctx)
    return ctx


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_external_login_with_dovecot(cert_dovecot: DovecotServer, client_ca: trustme.CA) -> None:
    with connect(
        "127.0.0.1", cert_dovecot.tls_port, ssl_context=_ctx(cert_dovecot, client_ca)
    ) as c:
        caps = c.capabilities()
        assert caps is not None and "EXTERNAL" in caps.sasl
        c.login(USER, external=True)  # no password, no token
        assert c.session.mechanism == "EXTERNAL"
        assert c.state is p.State.TRANSACTION
        manifest = cert_dovecot.manifest(USER)
        assert all(manifest.matches(n, c.retrieve(n)) for n in (1, 2, 3))


def test_external_with_an_untrusted_certificate_is_refused(cert_dovecot: DovecotServer) -> None:
    # Signed by a CA Dovecot does not trust: the handshake completes, the
    # login is refused with a typed error, and the session stays usable.
    ctx = _ctx(cert_dovecot, trustme.CA())
    with connect("127.0.0.1", cert_dovecot.tls_port, ssl_context=ctx) as c:
        with pytest.raises(Pop3Error):
            c.login(USER, external=True, mechanism="EXTERNAL")
        assert c.state is p.State.AUTHORIZATION
        c.login(USER, "secret")
        assert c.stat()[0] == 3


def test_asyncio_client_external_with_dovecot(
    cert_dovecot: DovecotServer, client_ca: trustme.CA
) -> None:
    async def go() -> list[bytes]:
        ctx = _ctx(cert_dovecot, client_ca)
        async with await aio.connect("127.0.0.1", cert_dovecot.tls_port, ssl_context=ctx) as c:
            await c.login(USER, external=True, mechanism="EXTERNAL")
            return [await c.retrieve(n) for n in (1, 2, 3)]

    manifest = cert_dovecot.manifest(USER)
    got = asyncio.run(go())
    assert all(manifest.matches(n, data) for n, data in zip((1, 2, 3), got, strict=True))


def test_fetch_with_a_client_certificate_from_dovecot(
    cert_dovecot: DovecotServer,
    client_ca: trustme.CA,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_secrets: None,
) -> None:
    pem = tmp_path / "me.pem"
    cert = client_ca.issue_cert(f"{USER}@example.org", common_name=USER)
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    url = f"pop3s://{USER};AUTH=EXTERNAL@127.0.0.1:{cert_dovecot.tls_port}"
    argv = ["fetch", url, "--maildir", str(tmp_path / "md"), "--keep"]
    argv += ["--cafile", str(cert_dovecot.cafile), "--cert", str(pem)]
    assert main(argv) == 0, capsys.readouterr().err
    got = sorted(_sha(f.read_bytes()) for f in (tmp_path / "md" / "new").iterdir())
    manifest = cert_dovecot.manifest(USER)
    assert got == sorted(manifest[n].sha256 for n in (1, 2, 3))
