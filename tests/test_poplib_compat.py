"""``pop3proto.bindings.poplib_compat``: the standard library's poplib
interface on our client.

Three kinds of proof:

* the shapes of CPython's own poplib test cases (Lib/test/test_poplib.py),
  against a dummy server that answers the way that suite's dummy does, for
  ``POP3`` and ``POP3_SSL``;
* the same poplib-using program run with the standard poplib and with ours
  against Dovecot, compared value for value, byte for byte;
* getmail6, a real poplib user, run unchanged with ``poplib`` swapped for
  ours, delivering the same files as with the standard poplib.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import poplib
import pwd
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from peers import DovecotServer
from pop3proto.bindings import poplib_compat
from pop3proto.bindings.poplib_compat import POP3, POP3_SSL, error_proto
from test_sync_client import LineServer, Peer

TIMESTAMP = b"<1896.697170952@dbc.mtview.ca.us>"
LIST_RESP = b"1 1\r\n2 2\r\n3 3\r\n4 4\r\n5 5\r\n.\r\n"
RETR_RESP = (
    b"From: postmaster@python.org\r\nContent-Type: text/plain\r\n"
    b"MIME-Version: 1.0\r\nSubject: Dummy\r\n\r\nline1\r\nline2\r\nline3\r\n.\r\n"
)
RETR_LINES = [
    b"From: postmaster@python.org",
    b"Content-Type: text/plain",
    b"MIME-Version: 1.0",
    b"Subject: Dummy",
    b"",
    b"line1",
    b"line2",
    b"line3",
]


class Dummy:
    """Answers like the dummy server of CPython's poplib tests."""

    def __init__(self, tls_context: ssl.SSLContext, *, implicit: bool) -> None:
        self.tls_context = tls_context
        self.tls_active = implicit
        self.utf8 = False
        self.greeting = b"+OK dummy pop3 server ready. " + TIMESTAMP

    def __call__(self, peer: Peer) -> None:
        peer.send(self.greeting + b"\r\n")
        with contextlib.suppress(EOFError, OSError, ssl.SSLError):
            while self.command(peer, peer.line()):
                pass

    def command(self, peer: Peer, line: bytes) -> bool:
        cmd, _, arg = line.decode("latin-1").partition(" ")
        cmd = cmd.lower()
        out = {
            "stat": "+OK 10 100",
            "dele": "+OK message marked for deletion.",
            "noop": "+OK done nothing.",
            "rpop": "+OK done nothing.",
            "rset": "+OK reset",
        }
        if cmd in out:
            peer.send(out[cmd].encode() + b"\r\n")
        elif cmd == "echo":
            peer.send(arg.encode("latin-1") + b"\r\n")
        elif cmd == "user":
            peer.send(b"+OK password required\r\n" if arg == "guido" else b"-ERR no such user\r\n")
        elif cmd == "pass":
            peer.send(b"+OK 10 messages\r\n" if arg == "python" else b"-ERR wrong password\r\n")
        elif cmd in ("list", "uidl"):
            if arg:
                peer.send(f"+OK {arg} {arg}\r\n".encode())
            else:
                peer.send(b"+OK\r\n" + LIST_RESP)
        elif cmd in ("retr", "top"):
            peer.send(b"+OK %d bytes\r\n" % len(RETR_RESP) + RETR_RESP)
        elif cmd == "apop":
            _, digest = arg.split()
            good = hashlib.md5(TIMESTAMP + b"dummypassword").hexdigest()
            peer.send(b"+OK done nothing.\r\n" if digest == good else b"-ERR bad digest\r\n")
        elif cmd == "capa":
            lines = [b"UIDL", b"IMPLEMENTATION python-testlib-pop-server"]
            if not self.tls_active:
                lines.append(b"STLS")
            peer.send(b"+OK Capability list follows\r\n" + b"".join(x + b"\r\n" for x in lines))
            peer.send(b".\r\n")
        elif cmd == "utf8":
            peer.send(b"+OK I know RFC6856\r\n" if self.utf8 else b"-ERR What is UTF8?!\r\n")
        elif cmd == "stls" and not self.tls_active:
            peer.send(b"+OK Begin TLS negotiation\r\n")
            peer.starttls(self.tls_context)
            self.tls_active = True
        elif cmd == "quit":
            peer.send(b"+OK closing.\r\n")
            return False
        else:
            peer.send(f'-ERR unrecognized POP3 command "{cmd}".\r\n'.encode())
        return True


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class Harness:
    def __init__(self, dummy: Dummy, server: LineServer, client: POP3) -> None:
        self.dummy, self.server, self.client = dummy, server, client

    def login(self) -> None:
        # CPython's dummy takes any command in any order; a real server (and
        # this module, which never sends a command the session state forbids)
        # needs a login before the TRANSACTION commands.
        self.client.user("guido")
        self.client.pass_("python")


@pytest.fixture(params=["POP3", "POP3_SSL"])
def pop(
    request: pytest.FixtureRequest, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> Iterator[Harness]:
    implicit = request.param == "POP3_SSL"
    dummy = Dummy(server_tls, implicit=implicit)
    with LineServer(dummy, tls=server_tls if implicit else None) as server:
        if implicit:
            client: POP3 = POP3_SSL("localhost", server.port, timeout=10, context=client_tls)
        else:
            client = POP3("localhost", server.port, timeout=10)
        try:
            yield Harness(dummy, server, client)
        finally:
            client.close()


# ---------------------------------------------------------------------------
# the shapes of CPython's test_poplib
# ---------------------------------------------------------------------------


def test_getwelcome(pop: Harness) -> None:
    assert pop.client.getwelcome() == b"+OK dummy pop3 server ready. " + TIMESTAMP


def test_exceptions(pop: Harness) -> None:
    with pytest.raises(error_proto) as info:
        pop.client._shortcmd("echo -err")
    assert info.value.args[0] == b"-err"


def test_user(pop: Harness) -> None:
    assert pop.client.user("guido").startswith(b"+OK")
    with pytest.raises(error_proto) as info:
        pop.client.user("invalid")
    assert info.value.args[0] == b"-ERR no such user"


def test_pass_(pop: Harness) -> None:
    with pytest.raises(error_proto, match="PASS must follow"):
        pop.client.pass_("python")  # refused before a byte is sent
    pop.client.user("guido")
    with pytest.raises(error_proto) as info:
        pop.client.pass_("wrong")
    assert info.value.args[0] == b"-ERR wrong password"
    pop.client.user("guido")
    assert pop.client.pass_("python") == b"+OK 10 messages"
    with pytest.raises(error_proto):
        pop.client.user("invalid")  # not after login
    assert [line.split()[0] for line in pop.server.peers[0].lines] == [b"USER", b"PASS"] * 2


def test_stat(pop: Harness) -> None:
    pop.login()
    assert pop.client.stat() == (10, 100)


def test_list(pop: Harness) -> None:
    pop.login()
    assert pop.client.list()[1:] == ([b"1 1", b"2 2", b"3 3", b"4 4", b"5 5"], 25)
    assert pop.client.list("1").endswith(b"OK 1 1")
    assert pop.client.list(2) == b"+OK 2 2"


def test_retr(pop: Harness) -> None:
    pop.login()
    expected = (b"+OK 116 bytes", RETR_LINES, 113)
    assert pop.client.retr("foo") == expected  # poplib passes any argument through
    assert pop.client.retr(1) == expected


def test_long_lines_are_not_refused(pop: Harness) -> None:
    # poplib refuses lines over 2048 octets (its test_too_long_lines); real
    # mail has them, and this module returns them.
    line = "+OK " + "a" * (poplib._MAXLINE + 10)
    assert pop.client._shortcmd(f"echo {line}") == line.encode()


def test_dele(pop: Harness) -> None:
    pop.login()
    assert pop.client.dele("foo").startswith(b"+OK")
    assert pop.client.dele(3) == b"+OK message marked for deletion."


def test_noop_rset_rpop(pop: Harness) -> None:
    pop.login()
    assert pop.client.noop() == b"+OK done nothing."
    assert pop.client.rset() == b"+OK reset"
    assert pop.client.rpop("foo") == b"+OK done nothing."


def test_apop_normal(pop: Harness) -> None:
    assert pop.client.apop("foo", "dummypassword") == b"+OK done nothing."
    with pytest.raises(error_proto):
        pop.client.apop("foo", "wrong")


def test_top(pop: Harness) -> None:
    pop.login()
    assert pop.client.top(1, 1) == (b"+OK 116 bytes", RETR_LINES, 113)


def test_uidl(pop: Harness) -> None:
    pop.login()
    assert pop.client.uidl() == (b"+OK", [b"1 1", b"2 2", b"3 3", b"4 4", b"5 5"], 25)
    assert pop.client.uidl("foo") == b"+OK foo foo"


def test_utf8(pop: Harness) -> None:
    with pytest.raises(error_proto):
        pop.client.utf8()
    pop.dummy.utf8 = True
    assert pop.client.utf8() == b"+OK I know RFC6856"


def test_capa(pop: Harness) -> None:
    capa = pop.client.capa()
    assert capa["IMPLEMENTATION"] == ["python-testlib-pop-server"]
    assert ("STLS" in capa) is not isinstance(pop.client, POP3_SSL)


def test_quit(pop: Harness) -> None:
    assert pop.client.quit() == b"+OK closing."
    assert pop.client.sock is None
    assert pop.client.file is None
    with pytest.raises(error_proto):
        pop.client.noop()


def test_stls(pop: Harness, client_tls: ssl.SSLContext) -> None:
    if isinstance(pop.client, POP3_SSL):
        with pytest.raises(error_proto):
            pop.client.stls()
        return
    assert pop.client.stls(context=client_tls) == b"+OK Begin TLS negotiation"
    assert isinstance(pop.client.sock, ssl.SSLSocket)
    pop.login()
    assert pop.client.stat() == (10, 100)
    with pytest.raises(error_proto, match="already established"):
        pop.client.stls(context=client_tls)


def test_stls_context_checks_the_host_name(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    dummy = Dummy(server_tls, implicit=False)
    with LineServer(dummy, count=2) as server:
        client = POP3("127.0.0.1", server.port, timeout=10)
        with pytest.raises(ssl.CertificateError):
            client.stls(context=client_tls)
        client.close()
        client = POP3("localhost", server.port, timeout=10)
        assert client.stls(context=client_tls) == b"+OK Begin TLS negotiation"
        client.quit()


def test_stls_verifies_by_default(server_tls: ssl.SSLContext) -> None:
    # poplib's default context does not verify; this one does.
    dummy = Dummy(server_tls, implicit=False)
    with LineServer(dummy) as server:
        client = POP3("localhost", server.port, timeout=10)
        with pytest.raises(ssl.SSLError):
            client.stls()
        client.close()


def test_pop3_ssl_context_arguments(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    with pytest.raises(ValueError):
        POP3_SSL("localhost", 1, keyfile="k", context=client_tls)
    with pytest.raises(ValueError):
        POP3_SSL("localhost", 1, certfile="c", context=client_tls)
    dummy = Dummy(server_tls, implicit=True)
    with LineServer(dummy, tls=server_tls) as server:
        client = POP3_SSL("localhost", server.port, context=client_tls)
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.context is client_tls
        assert client.capa()["IMPLEMENTATION"]
        client.quit()


def test_apop_refuses_an_evil_greeting(server_tls: ssl.SSLContext) -> None:
    # CVE-2018-1060 shape: a long run of "<" is read in linear time and is
    # no timestamp; CVE-2007-1558: nor is a timestamp that is not a msg-id.
    for greeting in (b"+OK " + b"<" * 4000, b"+OK dummy <timestamp>"):
        dummy = Dummy(server_tls, implicit=False)
        dummy.greeting = greeting
        with LineServer(dummy) as server:
            client = POP3("localhost", server.port, timeout=10)
            started = time.monotonic()
            with pytest.raises(error_proto, match="APOP not supported"):
                client.apop("a", "kb")
            assert time.monotonic() - started < 1
            client.quit()


@pytest.mark.parametrize("timeout", [None, 7.5])
def test_timeout_value(server_tls: ssl.SSLContext, timeout: float | None) -> None:
    dummy = Dummy(server_tls, implicit=False)
    with LineServer(dummy) as server:
        client = POP3("localhost", server.port, timeout=timeout)
        assert client.sock is not None
        assert client.sock.gettimeout() == timeout
        client.capa()
        assert client.sock.gettimeout() == timeout
        client.quit()
    with pytest.raises(ValueError):
        POP3("localhost", server.port, timeout=0)


def test_module_surface() -> None:
    for name in ("POP3", "POP3_SSL", "error_proto"):
        assert name in poplib_compat.__all__
    assert poplib_compat.POP3_PORT == poplib.POP3_PORT
    assert poplib_compat.POP3_SSL_PORT == poplib.POP3_SSL_PORT
    assert issubclass(error_proto, Exception)


def test_debug_output_hides_passwords(pop: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    pop.client.set_debuglevel(2)
    pop.client.user("guido")
    with pytest.raises(error_proto):
        pop.client.pass_("pythonic")
    pop.client.apop("foo", "dummypassword")
    out = capsys.readouterr().out
    assert "*cmd* 'USER guido'" in out
    assert "*cmd* 'PASS ********'" in out
    assert "*resp* b'+OK done nothing.'" in out
    assert "pythonic" not in out
    assert hashlib.md5(TIMESTAMP + b"dummypassword").hexdigest() not in out


def test_err_greeting_raises_error_proto(server_tls: ssl.SSLContext) -> None:
    dummy = Dummy(server_tls, implicit=False)
    dummy.greeting = b"-ERR [SYS/TEMP] go away"
    with LineServer(dummy) as server, pytest.raises(error_proto) as info:
        POP3("localhost", server.port, timeout=10)
    assert info.value.args[0] == b"-ERR [SYS/TEMP] go away"


# ---------------------------------------------------------------------------
# against Dovecot: the same program with both modules
# ---------------------------------------------------------------------------


def transcript(mod: Any, dovecot: DovecotServer, user: str, implicit: bool) -> list[Any]:
    """What a poplib-using program sees of a whole session."""
    if implicit:
        ctx = ssl.create_default_context(cafile=str(dovecot.cafile))
        client = mod.POP3_SSL("127.0.0.1", dovecot.tls_port, context=ctx, timeout=30)
    else:
        client = mod.POP3("127.0.0.1", dovecot.port, timeout=30)
    seen: list[Any] = [re.sub(rb"<[^>]*>", b"<stamp>", client.getwelcome())]
    seen.append(sorted(client.capa().items()))
    seen.append(client.user(user))
    seen.append(client.pass_("secret"))
    count, _ = client.stat()
    seen += [count, client.list(), client.list(2), client.uidl(), client.uidl(3)]
    seen += [client.retr(n) for n in range(1, count + 1)]
    seen += [client.top(1, 0), client.top(2, 5), client.noop(), client.dele(1), client.rset()]
    for bad in (lambda: client.retr(999), lambda: client.dele("x")):
        try:
            bad()
        except mod.error_proto as exc:
            seen.append(("error", exc.args))
    seen.append(client.quit())
    return seen


@pytest.mark.peers
@pytest.mark.parametrize("implicit", [False, True], ids=["plain", "implicit-tls"])
def test_same_program_same_bytes_as_poplib(dovecot: DovecotServer, implicit: bool) -> None:
    dovecot.fill("compat", 25, 6000)
    ours = transcript(poplib_compat, dovecot, "compat", implicit)
    theirs = transcript(poplib, dovecot, "compat", implicit)
    assert len(ours) == len(theirs) > 30
    for a, b in zip(ours, theirs, strict=True):
        assert a == b


@pytest.mark.peers
def test_stls_and_sasl_through_raw_commands(dovecot: DovecotServer) -> None:
    # getmail's XOAUTH2 path: AUTH, then the answer, through _shortcmd.
    manifest = dovecot.fill("rawsasl", 2, 1000)
    client = POP3("localhost", dovecot.port, timeout=30)
    resp = client.stls(context=ssl.create_default_context(cafile=str(dovecot.cafile)))
    assert resp.startswith(b"+OK")
    assert client._shortcmd("AUTH PLAIN") == b"+ "
    answer = base64.b64encode(b"\0rawsasl\0secret").decode()
    assert client._shortcmd(answer).startswith(b"+OK")
    _, lines, octets = client.retr(2)
    assert octets == manifest[2].returned_size
    assert b"\r\n".join(lines) + b"\r\n" == manifest.expected(2)
    client.quit()


# ---------------------------------------------------------------------------
# getmail6, a real poplib user
# ---------------------------------------------------------------------------

_WRAPPER = """\
import runpy, sys
if sys.argv[1] == "ours":
    from pop3proto.bindings import poplib_compat
    sys.modules["poplib"] = poplib_compat
script = sys.argv[2]
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def _getmail(which: str, dovecot: DovecotServer, user: str, tls: bool) -> list[bytes]:
    # getmail6 installed alongside this interpreter (a venv's bin/), else on PATH.
    script = shutil.which("getmail", path=os.path.dirname(sys.executable)) or shutil.which(
        "getmail"
    )
    if script is None:
        pytest.skip("getmail6 is not installed (pip install getmail6)")
    # As root getmail delivers as another user, who must reach the Maildir:
    # pytest's own temporary directories are private.
    with tempfile.TemporaryDirectory(prefix="pop3proto-getmail-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        return _run_getmail(script, which, dovecot, user, tls, work)


def _run_getmail(
    script: str, which: str, dovecot: DovecotServer, user: str, tls: bool, work: Path
) -> list[bytes]:
    maildir = work / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    deliver_as = ""
    if os.geteuid() == 0:  # getmail refuses to deliver as root
        nobody = pwd.getpwnam("nobody")
        deliver_as = "user = nobody\n"
        for root, _, _ in os.walk(maildir):
            os.chown(root, nobody.pw_uid, nobody.pw_gid)
    kind = "SimplePOP3SSLRetriever" if tls else "SimplePOP3Retriever"
    port = dovecot.tls_port if tls else dovecot.port
    (work / "getmailrc").write_text(
        f"[retriever]\ntype = {kind}\nserver = 127.0.0.1\nport = {port}\n"
        f"username = {user}\npassword = secret\n\n"
        f"[destination]\ntype = Maildir\npath = {maildir}/\n{deliver_as}\n"
        "[options]\nread_all = true\ndelete = false\nreceived = false\n"
        "delivered_to = false\nmessage_log_syslog = false\nverbose = 0\n"
    )
    (work / "wrapper.py").write_text(_WRAPPER)
    env = dict(os.environ, SSL_CERT_FILE=str(dovecot.cafile))
    cmd = [sys.executable, str(work / "wrapper.py"), which, script]
    cmd += ["--rcfile", str(work / "getmailrc"), "--getmaildir", str(work)]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return sorted(path.read_bytes() for path in (maildir / "new").iterdir())


@pytest.mark.peers
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "implicit-tls"])
def test_getmail_delivers_the_same_with_our_poplib(dovecot: DovecotServer, tls: bool) -> None:
    user = f"getmail{int(tls)}"
    manifest = dovecot.fill(user, 30, 5000)
    ours = _getmail("ours", dovecot, user, tls)
    theirs = _getmail("std", dovecot, user, tls)
    assert len(ours) == len(manifest)
    assert ours == theirs
    # What getmail wrote is the stored message (its Return-Path header kept,
    # line ends as LF, a missing final newline added).
    stored = sorted(manifest.stored(m.number).rstrip(b"\n") for m in manifest)
    assert sorted(data.rstrip(b"\n") for data in ours) == stored
