"""OAUTHBEARER and XOAUTH2 against a real server: a private Dovecot whose
oauth2 passdb checks each bearer token with an RFC 7662 introspection
endpoint run by the test, through the blocking and asyncio clients and
``pop3proto fetch``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shlex
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from peers import DovecotServer, running_dovecot
from pop3proto.bindings import aio
from pop3proto.bindings.cli import main
from pop3proto.bindings.sync import connect

import pop3proto as p
from pop3proto import Pop3Error

pytestmark = pytest.mark.peers

#: A token as long as real ones: the AUTH line would pass RFC 5034's 255
#: octets, so the client sends it after "+ " (two steps).
LONG_TOKEN = "ya29." + "x" * 1200

#: The tokens the introspection endpoint calls active, and whose they are.
TOKENS = {"tok-oauser": "oauser", "tok-other": "someone-else", LONG_TOKEN: "oauser"}


class Introspection:
    """A loopback RFC 7662 endpoint: POST ``token=...``; answers
    ``{"active": true, "username": ...}`` for a token of :data:`TOKENS`."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = min(int(self.headers.get("Content-Length") or 0), 65536)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode("ascii", "replace"))
                token = (form.get("token") or [""])[0]
                outer.seen.append(token)
                user = TOKENS.get(token)
                body = json.dumps(
                    {"active": True, "username": user} if user else {"active": False}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/introspect"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Introspection:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Introspection]:
    with Introspection() as ep:
        yield ep


@pytest.fixture(scope="module")
def oauth_dovecot(
    tmp_path_factory: pytest.TempPathFactory, endpoint: Introspection
) -> Iterator[DovecotServer]:
    with running_dovecot(
        tmp_path_factory.mktemp("oauth-dovecot"), oauth2_introspection_url=endpoint.url
    ) as server:
        server.add_user("oauser", "pw-not-used")
        server.fill("oauser", 3, 2000)
        yield server


def _ctx(dovecot: DovecotServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(dovecot.cafile))


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2", None])
def test_bearer_token_login_with_dovecot(
    oauth_dovecot: DovecotServer, endpoint: Introspection, mechanism: str | None
) -> None:
    with connect("127.0.0.1", oauth_dovecot.tls_port, ssl_context=_ctx(oauth_dovecot)) as c:
        caps = c.capabilities()
        assert caps is not None and {"OAUTHBEARER", "XOAUTH2"} <= set(caps.sasl)
        endpoint.seen.clear()
        # With a token and no password, the strongest token mechanism is chosen.
        c.login("oauser", token="tok-oauser", mechanism=mechanism)
        assert c.session.mechanism == (mechanism or "OAUTHBEARER")
        assert c.state is p.State.TRANSACTION
        assert endpoint.seen == ["tok-oauser"]  # Dovecot really asked the endpoint
        manifest = oauth_dovecot.manifest("oauser")
        assert all(manifest.matches(n, c.retrieve(n)) for n in (1, 2, 3))


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
def test_long_token_in_two_steps_with_dovecot(
    oauth_dovecot: DovecotServer, endpoint: Introspection, mechanism: str
) -> None:
    with connect("127.0.0.1", oauth_dovecot.tls_port, ssl_context=_ctx(oauth_dovecot)) as c:
        endpoint.seen.clear()
        c.login("oauser", token=LONG_TOKEN, mechanism=mechanism)
        assert c.session.mechanism == mechanism and endpoint.seen == [LONG_TOKEN]
        assert c.stat()[0] == 3


@pytest.mark.parametrize("mechanism", ["OAUTHBEARER", "XOAUTH2"])
@pytest.mark.parametrize("token", ["tok-unknown", "tok-other"])
def test_refused_tokens_end_the_exchange_cleanly(
    oauth_dovecot: DovecotServer, mechanism: str, token: str
) -> None:
    # Dovecot answers a refused token with an error challenge (RFC 7628 §3.2.2);
    # the client acknowledges it and gets the -ERR; the session stays usable.
    with connect("127.0.0.1", oauth_dovecot.tls_port, ssl_context=_ctx(oauth_dovecot)) as c:
        with pytest.raises(Pop3Error) as info:
            c.login("oauser", token=token, mechanism=mechanism)
        assert info.value.is_("AUTH") and token not in str(info.value)
        assert c.state is p.State.AUTHORIZATION
        c.login("oauser", token="tok-oauser", mechanism=mechanism)
        assert c.stat()[0] == 3


def test_asyncio_client_bearer_token_with_dovecot(oauth_dovecot: DovecotServer) -> None:
    async def go() -> list[bytes]:
        async with await aio.connect(
            "127.0.0.1", oauth_dovecot.tls_port, ssl_context=_ctx(oauth_dovecot)
        ) as c:
            await c.login("oauser", token="tok-oauser", mechanism="XOAUTH2")
            return [await c.retrieve(n) for n in (1, 2, 3)]

    manifest = oauth_dovecot.manifest("oauser")
    got = asyncio.run(go())
    assert all(manifest.matches(n, data) for n, data in zip((1, 2, 3), got, strict=True))


@pytest.mark.parametrize("auth", [";AUTH=XOAUTH2", ";AUTH=OAUTHBEARER", ""])
def test_fetch_with_a_token_command_from_dovecot(
    oauth_dovecot: DovecotServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_secrets: None,
    auth: str,
) -> None:
    helper = f"{shlex.quote(sys.executable)} -c \"print('tok-oauser')\""
    url = f"pop3s://oauser{auth}@127.0.0.1:{oauth_dovecot.tls_port}"
    argv = ["fetch", url, "--maildir", str(tmp_path / "md"), "--keep"]
    argv += ["--cafile", str(oauth_dovecot.cafile)]
    assert main([*argv, "--token-command", "echo tok-unknown"]) == 3
    assert main([*argv, "--token-command", helper]) == 0, capsys.readouterr().err
    manifest = oauth_dovecot.manifest("oauser")
    got = sorted(
        hashlib.sha256(f.read_bytes()).hexdigest() for f in (tmp_path / "md" / "new").iterdir()
    )
    assert got == sorted(manifest[n].sha256 for n in (1, 2, 3))
