"""Tests of the real-peer fixtures in peers.py: the mail generator, the private
Dovecot server, and the curl/mpop/fetchmail drivers (checked against Dovecot,
so that they can later be trusted against the project's own server)."""

from __future__ import annotations

import hashlib
import poplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peers import (
    DOVECOT_MECHANISMS,
    DovecotServer,
    Manifest,
    PeerError,
    fill_maildir,
    generate_message,
    normalise_delivered,
    require_program,
    run_curl,
    run_curl_retr,
    run_fetchmail,
    run_mpop,
    running_dovecot,
    wire_form,
)

MAILBOX_USER = "peerbox"
MAILBOX_COUNT = 20
MAILBOX_SIZE = 4000


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------
# The generator (no third-party programs needed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 700, 3000, 60_000])
def test_generated_messages_are_deterministic_and_clean(size: int) -> None:
    for n in range(1, 21):
        a = generate_message("bob", n, size, seed=3)
        assert a == generate_message("bob", n, size, seed=3)
        assert a != generate_message("bob", n, size, seed=4)
        assert b"\r" not in a and b"\0" not in a
        assert all(len(line) <= 998 for line in _lines(a))


@pytest.mark.parametrize("size", [3000, 20_000, 300_000])
def test_generated_size_is_close_to_the_request(size: int) -> None:
    for n in range(1, 11):
        got = len(generate_message("bob", n, size))
        assert abs(got - size) <= max(size // 100, 100), (n, got)


def test_generated_messages_cover_the_pop3_edge_cases() -> None:
    msgs = {n: generate_message("carol", n, 3000) for n in range(1, 21)}
    for n, m in msgs.items():
        lines = _lines(m)
        body = lines[lines.index(b"") + 1 :]
        for special in (b".", b"", b"..", b"..."):
            assert special in body, (n, special)
        assert any(line.startswith(b".") and len(line) > 3 for line in body), n
        assert any(len(line) == 998 for line in body), n
        assert "Grüße".encode() in m or "καλημέρα".encode() in m or "日本語".encode() in m
        has_latin1 = any(not _is_utf8(line) for line in body)
        assert has_latin1 == (n % 2 == 0), n
        assert (b"Content-Transfer-Encoding: base64" in m) == (n % 4 == 0), n
        ends = {0: b"\n.", 5: b"\n..end", 7: b"Last ordinary line"}
        if n % 10 in ends:
            assert m.endswith(ends[n % 10]) and not m.endswith(b"\n"), n
        else:
            assert m.endswith(b"\n"), n
        if n % 10 == 3:
            assert m.endswith(b"\n.\n"), n
    # both multipart and single-part messages, some 999-octet stuffed lines
    assert any(
        any(line.startswith(b".") and len(line) == 998 for line in _lines(m)) for m in msgs.values()
    )
    assert generate_message("carol", 4, 300_000).count(b"--=_pop3proto_") == 3


def test_large_messages_are_multipart() -> None:
    m = generate_message("dave", 1, 300_000)
    assert b"multipart/mixed" in m and b"base64" in m


def test_wire_form_converts_line_ends_and_terminates() -> None:
    assert wire_form(b"a\nb\n") == b"a\r\nb\r\n"
    assert wire_form(b"a\n.") == b"a\r\n.\r\n"
    assert wire_form(b"") == b"\r\n"


def test_fill_maildir_writes_messages_in_pop3_order(tmp_path: Path) -> None:
    md = tmp_path / "erin"
    (md / "cur").mkdir(parents=True)
    (md / "cur" / "stale:2,").write_bytes(b"old")
    (md / "dovecot-uidlist").write_text("3 V1 N5\n")
    manifest = fill_maildir(md, "erin", 12, 2500, seed=7)
    files = sorted((md / "cur").iterdir())
    assert [f.name for f in files] == [manifest[n].filename for n in range(1, 13)]
    assert not (md / "dovecot-uidlist").exists()
    assert not any((md / "new").iterdir())
    for n, f in enumerate(files, start=1):
        data = f.read_bytes()
        assert data == generate_message("erin", n, 2500, seed=7)
        info = manifest[n]
        assert info.size == len(data.replace(b"\n", b"\r\n"))
        assert f",S={len(data)},W={info.size}:" in f.name
        back = wire_form(data)
        assert info.sha256 == hashlib.sha256(back).hexdigest()
        assert info.returned_size == len(back)
        assert info.final_newline == data.endswith(b"\n")
        assert manifest.matches(n, back)
        assert not manifest.matches(n, back[:-2])
        assert manifest.expected(n) == back
    assert manifest.total_size == sum(m.size for m in manifest)
    assert not manifest.matches(13, b"")


def _as_client_delivers(wire: bytes, received: bytes, after_return_path: bool) -> bytes:
    """What mpop (top) or fetchmail (after Return-Path) store: LF, one Received on top."""
    lf = wire.replace(b"\r\n", b"\n")
    if after_return_path and lf.startswith(b"Return-Path:"):
        first, rest = lf.split(b"\n", 1)
        return first + b"\n" + received + rest
    return received + lf


@settings(max_examples=60, deadline=None)
@given(
    number=st.integers(1, 40),
    size=st.integers(0, 5000),
    fetchmail_style=st.booleans(),
)
def test_normalise_delivered_restores_the_wire_bytes(
    number: int, size: int, fetchmail_style: bool
) -> None:
    wire = wire_form(generate_message("frank", number, size))
    if fetchmail_style:
        added = (
            b"Received: from 127.0.0.1 [127.0.0.1]\n\tby vm with POP3 (fetchmail-6.4.37)\n"
            b"\tfor <frank@localhost> (single-drop); Fri, 27 Nov 2026 18:09:29 +0000 (UTC)\n"
        )
    else:
        added = (
            b"Received: from 127.0.0.1 (localhost [127.0.0.1])\n\tby vm (mpop-1.4.18) "
            b"with POP3\n\tfor <root>; Fri, 27 Nov 2026 18:09:08 +0000\n"
        )
    delivered = _as_client_delivers(wire, added, fetchmail_style)
    assert delivered != wire
    assert normalise_delivered(delivered) == wire
    # a client that kept CRLF is handled too
    assert normalise_delivered(delivered.replace(b"\n", b"\r\n")) == wire


def test_normalise_delivered_keeps_the_messages_own_received_fields() -> None:
    msg = b"Received: from a by b\n\tfor c\nSubject: x\n\nReceived: (mpop-1) in body\n"
    assert normalise_delivered(msg) == msg.replace(b"\n", b"\r\n")


# ---------------------------------------------------------------------------
# Dovecot
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mailbox(dovecot: DovecotServer) -> Manifest:
    """A filled mailbox shared by the read-only client tests (they all keep mail)."""
    return dovecot.fill(MAILBOX_USER, MAILBOX_COUNT, MAILBOX_SIZE, seed=11)


def _tls_context(dovecot: DovecotServer) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(dovecot.cafile))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


@pytest.fixture
def pop(dovecot: DovecotServer) -> Iterator[poplib.POP3]:
    p = poplib.POP3(dovecot.host, dovecot.port, timeout=10)
    try:
        yield p
    finally:
        p.close()


def _retr_all(p: poplib.POP3, manifest: Manifest) -> None:
    count, total = p.stat()
    assert (count, total) == (len(manifest), manifest.total_size)
    _resp, listing, _ = p.list()
    assert [tuple(map(int, x.split())) for x in listing] == [(m.number, m.size) for m in manifest]
    for info in manifest:
        _resp, lines, _octets = p.retr(info.number)
        data = b"".join(line + b"\r\n" for line in lines)
        assert manifest.matches(info.number, data), info.number


def test_missing_program_skips_locally_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install no-such-pop3-tool"):
        require_program("no-such-pop3-tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-pop3-tool is not installed"):
        require_program("no-such-pop3-tool")
    assert Path(require_program("sh")).name == "sh"


@pytest.mark.peers
def test_dovecot_offers_every_login_method(dovecot: DovecotServer, pop: poplib.POP3) -> None:
    assert dovecot.host == "127.0.0.1"
    assert dovecot.port != dovecot.tls_port
    greeting = pop.getwelcome()
    assert greeting.startswith(b"+OK") and b"<" in greeting  # APOP timestamp
    capa = pop.capa()
    assert "USER" in capa and "STLS" in capa and "PIPELINING" in capa
    assert set(DOVECOT_MECHANISMS) <= set(capa["SASL"])
    assert dovecot.users[dovecot.user] == dovecot.password
    pid = dovecot.pid
    assert pid is not None and dovecot.pid_file.read_text().strip() == str(pid)


@pytest.mark.peers
def test_poplib_stls_retrieves_every_message_exactly(
    dovecot: DovecotServer, mailbox: Manifest, pop: poplib.POP3
) -> None:
    pop.stls(_tls_context(dovecot))
    assert pop.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
    pop.user(MAILBOX_USER)
    pop.pass_(dovecot.users[MAILBOX_USER])
    _retr_all(pop, mailbox)
    pop.quit()


@pytest.mark.peers
def test_poplib_implicit_tls_retrieves_every_message_exactly(
    dovecot: DovecotServer, mailbox: Manifest
) -> None:
    p = poplib.POP3_SSL(dovecot.host, dovecot.tls_port, context=_tls_context(dovecot), timeout=10)
    try:
        p.apop(MAILBOX_USER, dovecot.users[MAILBOX_USER])
        _retr_all(p, mailbox)
        p.quit()
    finally:
        p.close()


@pytest.mark.peers
def test_tls_port_is_not_trusted_without_the_ca(dovecot: DovecotServer) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(
            dovecot.host, dovecot.tls_port, context=ssl.create_default_context(), timeout=10
        )


@pytest.mark.peers
def test_big_messages_survive(dovecot: DovecotServer) -> None:
    manifest = dovecot.fill("bigbox", 2, 1_100_000)
    p = poplib.POP3(dovecot.host, dovecot.port, timeout=30)
    try:
        p.user("bigbox")
        p.pass_("secret")
        _retr_all(p, manifest)
    finally:
        p.close()


@pytest.mark.peers
def test_wrong_password_fails_fast_and_add_user_takes_effect(dovecot: DovecotServer) -> None:
    dovecot.add_user("grace", "first")
    manifest = dovecot.fill("grace", 3, 500)
    for attempt in range(2):
        p = poplib.POP3(dovecot.host, dovecot.port, timeout=10)
        p.user("grace")
        start = time.monotonic()
        with pytest.raises(poplib.error_proto):
            p.pass_("wrong")
        assert time.monotonic() - start < 1.0, attempt  # no auth failure delay
        p.close()
    dovecot.add_user("grace", "second")
    p = poplib.POP3(dovecot.host, dovecot.port, timeout=10)
    try:
        start = time.monotonic()
        p.user("grace")
        p.pass_("second")
        assert time.monotonic() - start < 1.0  # no penalty after the failures
        _retr_all(p, manifest)
    finally:
        p.close()
    with pytest.raises(ValueError):
        dovecot.add_user("bad:name")


@pytest.mark.peers
def test_one_user_can_hold_many_sessions(dovecot: DovecotServer) -> None:
    dovecot.fill("heidi", 1, 300)
    sessions = []
    try:
        for _ in range(15):  # Dovecot's default limit is 10
            p = poplib.POP3(dovecot.host, dovecot.port, timeout=10)
            sessions.append(p)
            p.user("heidi")
            p.pass_("secret")
            assert p.stat()[0] == 1
    finally:
        for p in sessions:
            p.close()


@pytest.mark.peers
def test_stop_ends_the_server_by_its_pid(tmp_path: Path) -> None:
    with running_dovecot(tmp_path, user="ivan", password="pw") as server:
        assert server.users == {"ivan": "pw"}
        pid = server.pid
        port = server.port
        assert pid is not None
        assert Path(f"/proc/{pid}").exists()
        server.stop()
        assert server.pid is None
        assert not Path(f"/proc/{pid}").exists()
        with pytest.raises(OSError), socket.create_connection((server.host, port), timeout=2):
            pass
        server.stop()  # idempotent
    assert (tmp_path / "dovecot.log").exists() or not (tmp_path / "server").is_symlink()


# ---------------------------------------------------------------------------
# Real clients against Dovecot
# ---------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_curl_retrieves_every_message_exactly(
    dovecot: DovecotServer, mailbox: Manifest, mode: str
) -> None:
    if mode == "pop3s":
        base = f"pop3s://{dovecot.host}:{dovecot.tls_port}"
    else:
        base = f"pop3://{dovecot.host}:{dovecot.port}"
    got = run_curl_retr(
        base,
        list(range(1, MAILBOX_COUNT + 1)),
        user=MAILBOX_USER,
        password="secret",
        cafile=dovecot.cafile,
        starttls=mode == "stls",
    )
    assert sorted(got) == list(range(1, MAILBOX_COUNT + 1))
    for n, data in got.items():
        assert mailbox.matches(n, data), n


@pytest.mark.peers
def test_curl_lists_the_manifest_sizes(dovecot: DovecotServer, mailbox: Manifest) -> None:
    listing = run_curl(
        f"pop3://{dovecot.host}:{dovecot.port}/", user=MAILBOX_USER, password="secret"
    )
    assert listing == b"".join(b"%d %d\r\n" % (m.number, m.size) for m in mailbox)


@pytest.mark.peers
@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5", "+APOP"])
def test_curl_logs_in_with(dovecot: DovecotServer, mailbox: Manifest, mech: str) -> None:
    data = run_curl(
        f"pop3://{dovecot.host}:{dovecot.port}/5",
        user=MAILBOX_USER,
        password="secret",
        args=["--login-options", f"AUTH={mech}"],
    )
    assert mailbox.matches(5, data)


@pytest.mark.peers
def test_curl_failure_raises_peer_error(dovecot: DovecotServer, mailbox: Manifest) -> None:
    with pytest.raises(PeerError, match="exited with"):
        run_curl(f"pop3://{dovecot.host}:{dovecot.port}/1", user=MAILBOX_USER, password="nope")


def _check_delivered(manifest: Manifest, delivered: list[bytes]) -> None:
    assert len(delivered) == len(manifest)
    for info, data in zip(manifest, delivered, strict=True):
        assert data != manifest.expected(info.number)  # the client did change it
        assert manifest.matches(info.number, normalise_delivered(data)), info.number


@pytest.mark.peers
@pytest.mark.parametrize(
    ("mode", "auth"),
    [
        ("plain", "user"),
        ("stls", "user"),
        ("pop3s", "user"),
        ("plain", "cram-md5"),
        ("stls", "plain"),
        ("stls", "login"),
        ("stls", "scram-sha-1"),
        ("stls", "scram-sha-256"),
    ],
)
def test_mpop_delivers_every_message(
    dovecot: DovecotServer, mailbox: Manifest, tmp_path: Path, mode: str, auth: str
) -> None:
    got = run_mpop(
        dovecot.host,
        dovecot.tls_port if mode == "pop3s" else dovecot.port,
        MAILBOX_USER,
        "secret",
        tmp_path / "Maildir",
        tls=mode == "pop3s",
        starttls=mode == "stls",
        cafile=dovecot.cafile,
        auth=auth,
    )
    assert all(m.path.parent.parent == tmp_path / "Maildir" for m in got)
    _check_delivered(mailbox, [m.data for m in got])


@pytest.mark.peers
def test_mpop_failure_raises_peer_error(
    dovecot: DovecotServer, mailbox: Manifest, tmp_path: Path
) -> None:
    with pytest.raises(PeerError, match="exited with"):
        run_mpop(dovecot.host, dovecot.port, MAILBOX_USER, "nope", tmp_path / "md")


@pytest.mark.peers
@pytest.mark.parametrize(
    ("mode", "auth"),
    [
        ("plain", "password"),
        ("stls", "password"),
        ("pop3s", "password"),
        ("plain", "apop"),
        ("stls", "cram-md5"),
    ],
)
def test_fetchmail_delivers_every_message(
    dovecot: DovecotServer, mailbox: Manifest, tmp_path: Path, mode: str, auth: str
) -> None:
    got = run_fetchmail(
        dovecot.host,
        dovecot.tls_port if mode == "pop3s" else dovecot.port,
        MAILBOX_USER,
        "secret",
        tmp_path / "out",
        tls=mode == "pop3s",
        starttls=mode == "stls",
        cafile=dovecot.cafile,
        tls_name="localhost",
        auth=auth,
    )
    assert [m.path.name for m in got] == [f"{n:06d}.eml" for n in range(1, MAILBOX_COUNT + 1)]
    _check_delivered(mailbox, [m.data for m in got])


@pytest.mark.peers
def test_clients_cope_with_awkward_passwords(dovecot: DovecotServer, tmp_path: Path) -> None:
    password = 'a "quoted" \\back slash\\ and spaces'
    dovecot.add_user("judy", password)
    manifest = dovecot.fill("judy", 2, 800)
    got = run_mpop(dovecot.host, dovecot.port, "judy", password, tmp_path / "md")
    _check_delivered(manifest, [m.data for m in got])
    got = run_fetchmail(dovecot.host, dovecot.port, "judy", password, tmp_path / "fm")
    _check_delivered(manifest, [m.data for m in got])
    data = run_curl(f"pop3://{dovecot.host}:{dovecot.port}/2", user="judy", password=password)
    assert manifest.matches(2, data)


@pytest.mark.peers
def test_fetchmail_failure_raises_peer_error(
    dovecot: DovecotServer, mailbox: Manifest, tmp_path: Path
) -> None:
    with pytest.raises(PeerError, match="exited with"):
        run_fetchmail(dovecot.host, dovecot.port, MAILBOX_USER, "nope", tmp_path / "out")
