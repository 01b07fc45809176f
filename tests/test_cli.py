"""The ``pop3proto`` command line: every subcommand in-process through
``main([...])`` and once as ``python -m pop3proto.bindings``; ``fetch``
against our server, a scripted faulty server and Dovecot."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import poplib
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from peers import free_port, wire_form
from pop3proto.bindings import cli
from pop3proto.bindings._common import is_loopback
from pop3proto.bindings._sync_client import connect
from pop3proto.bindings.cli import PopUrl, UsageError, main, parse_address, parse_pop_url
from pop3proto.bindings.maildrop import Maildir, MemoryMaildrop
from pop3proto.bindings.sync import Server
from pop3proto.bindings.uidstore import UidStore

import pop3proto as p
from pop3proto._auth import FailureDelay, PasswordTable, load_credentials

SUMMARY = re.compile(
    r"^fetched (\d+) messages? \((\d+) bytes\) from (\S+); deleted (\d+); kept (\d+)"
)
LISTEN = re.compile(r"^pop3proto: listening on (pop3s?)://127\.0\.0\.1:(\d+)$")
DEMO = cli.demo_messages()


def run_module(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pop3proto.bindings", *args],
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 60),
        **kw,
    )


# ====================================================================== fixtures


def demo_config(**kw: Any) -> p.ServerConfig:
    base: dict[str, Any] = {
        "authenticator": cli.demo_authenticator(2),
        "failure_delay": FailureDelay(base=0.0),
    }
    base.update(kw)
    return p.ServerConfig(**base)


@contextlib.contextmanager
def running(maildrop: Any, config: p.ServerConfig) -> Iterator[int]:
    srv = Server(maildrop, config=config, listen=("127.0.0.1", 0))
    with srv:
        yield srv.addresses[0][1]


@pytest.fixture
def demo() -> Iterator[tuple[MemoryMaildrop, int]]:
    md = cli.demo_maildrop(2)
    with running(md, demo_config()) as port:
        yield md, port


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POP3_PASSWORD", "demo")
    monkeypatch.delenv("POP3_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no stray ~/.netrc


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    return {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}


def delivered(maildir: Path) -> list[bytes]:
    """Files in new/, in delivery order (the Q counter of the unique name)."""
    files = sorted(
        (maildir / "new").iterdir(),
        key=lambda f: int(re.search(r"Q(\d+)R", f.name).group(1)),  # type: ignore[union-attr]
    )
    return [f.read_bytes() for f in files]


def store_uids(maildir: Path, port: int, user: str = "demo") -> set[str]:
    with UidStore.for_maildir(maildir, "127.0.0.1", port, user) as store:
        return set(store)


def server_uids(port: int, user: str = "demo") -> set[str]:
    with connect("127.0.0.1", port, tls=False, allow_insecure=True) as c:
        c.login(user, "demo")
        return set(c.uidl().values())


def fetch(
    capsys: pytest.CaptureFixture[str], url: str, maildir: Path, *extra: str
) -> tuple[int, str, str]:
    code = main(["fetch", url, "--maildir", str(maildir), *extra])
    out, err = capsys.readouterr()
    return code, out, err


# ====================================================================== URLs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pop3://alice@example.org", PopUrl("pop3", "example.org", 110, "alice", None)),
        ("pop3s://alice@example.org", PopUrl("pop3s", "example.org", 995, "alice", None)),
        ("pop://bob@Mail.Example.ORG:1110/", PopUrl("pop3", "mail.example.org", 1110, "bob")),
        ("pop3://a%40b.c;AUTH=*@h", PopUrl("pop3", "h", 110, "a@b.c", None)),
        ("pop3://u;auth=+apop@h", PopUrl("pop3", "h", 110, "u", "+APOP")),
        ("pop3://u;AUTH=+USER@h", PopUrl("pop3", "h", 110, "u", "+USER")),
        ("pop3://u;AUTH=scram-sha-256@h", PopUrl("pop3", "h", 110, "u", "SCRAM-SHA-256")),
        ("pop3://u;AUTH=SCRAM%2DSHA%2D1@h", PopUrl("pop3", "h", 110, "u", "SCRAM-SHA-1")),
        ("pop3s://j%C3%BCrgen@[::1]:9995", PopUrl("pop3s", "::1", 9995, "j\u00fcrgen", None)),
        ("pop3://h", PopUrl("pop3", "h", 110, None, None)),
        ("pop3://;AUTH=PLAIN@h", PopUrl("pop3", "h", 110, None, "PLAIN")),
    ],
)
def test_pop_urls(text: str, expected: PopUrl) -> None:
    assert parse_pop_url(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "imap://u@h",
        "pop3:/u@h",
        "pop3://u:secret@h",
        "pop3://u@h/INBOX",
        "pop3://u@h?x=1",
        "pop3://u@h#f",
        "pop3://u@h:0",
        "pop3://u@h:65536",
        "pop3://u@h:",
        "pop3://u@h:x1",
        "pop3://u@",
        "pop3://u@[::1",
        "pop3://u@[zz]:1",
        "pop3://u%0D%0AQUIT@h",
        "pop3://u%ZZ@h",
        "pop3://u%FF@h",
        "pop3://u;AUTH=@h",
        "pop3://u;FOO=X@h",
        "pop3://u;AUTH=+KERBEROS@h",
        "pop3://u;AUTH=BAD NAME@h",
        "pop3://u@h h",
        "pop3://" + "a" * 3000,
    ],
)
def test_bad_pop_urls(text: str) -> None:
    with pytest.raises(UsageError):
        parse_pop_url(text)


@given(st.text(min_size=1, max_size=40).filter(lambda s: s.isprintable()))
def test_url_user_round_trips_through_escaping(user: str) -> None:
    from urllib.parse import quote

    url = parse_pop_url(f"pop3s://{quote(user, safe='')};AUTH=*@pop.example.org:995")
    assert url.user == user
    assert url.mechanism is None and url.tls


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("::1%lo", True),
        ("0:0:0:0:0:0:0:1", True),
        ("128.0.0.1", False),
        ("10.0.0.1", False),
        ("::2", False),
        ("::ffff:127.0.0.1", False),
        ("localhost", False),  # a name, not a literal: resolved elsewhere
        ("127.0.0", False),
        ("127.0.0.1.2", False),
        ("", False),
        ("127.0.0.1\x00", False),
    ],
)
def test_is_loopback_literals(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_help_is_sized_by_columns(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    def longest_line(columns: str) -> int:
        monkeypatch.setenv("COLUMNS", columns)
        assert cli.main(["fetch", "--help"]) == 0
        return max(len(line) for line in capsys.readouterr().out.splitlines())

    narrow, wide = longest_line("50"), longest_line("160")
    assert narrow < 60 < 100 < wide <= 160


def test_mechanism_for_login() -> None:
    assert parse_pop_url("pop3://u;AUTH=+APOP@h").mechanism == "APOP"
    assert parse_pop_url("pop3://u;AUTH=+USER@h").mechanism == "USER"
    assert parse_pop_url("pop3://u;AUTH=CRAM-MD5@h").mechanism == "CRAM-MD5"
    assert parse_pop_url("pop3s://u@h:1").display() == "pop3s://u@h:1"
    assert parse_pop_url("pop3s://u@[::1]:1").display() == "pop3s://u@[::1]:1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("0.0.0.0:110", ("0.0.0.0", 110)),
        ("[::1]:995", ("::1", 995)),
        ("[::1]", ("::1", 7)),
        ("localhost", ("localhost", 7)),
        (":2110", ("127.0.0.1", 2110)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text, 7) == expected


@pytest.mark.parametrize("text", ["h:x", "h:70000", "[::1", "[::1]x", "[::1]:-1"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_address(text, 7)


# ====================================================================== credentials


def test_password_from_environment_then_netrc(tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine h login alice password from-netrc\ndefault login x password y\n")
    netrc.chmod(0o600)
    url = parse_pop_url("pop3://alice@h")
    assert cli.find_credentials(url, environ={"POP3_PASSWORD": "env"}, netrc_file=str(netrc)) == (
        "alice",
        "env",
        None,
    )
    assert cli.find_credentials(url, environ={}, netrc_file=str(netrc)) == (
        "alice",
        "from-netrc",
        None,
    )
    # No user in the URL: netrc names it.
    assert cli.find_credentials(parse_pop_url("pop3://h"), environ={}, netrc_file=str(netrc)) == (
        "alice",
        "from-netrc",
        None,
    )
    # netrc's entry is for another login: not used; no terminal: a clear error.
    with pytest.raises(UsageError, match="POP3_PASSWORD"):
        cli.find_credentials(
            parse_pop_url("pop3://bob@h"),
            environ={},
            netrc_file=str(netrc),
            interactive=False,
        )
    with pytest.raises(UsageError, match="names no user"):
        cli.find_credentials(
            parse_pop_url("pop3://other"), environ={}, netrc_file=str(tmp_path / "none")
        )


def test_password_prompt_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    asked: list[str] = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt: (asked.append(prompt), "typed")[1])
    got = cli.find_credentials(
        parse_pop_url("pop3://u@h"), environ={}, netrc_file="/nonexistent", interactive=True
    )
    assert got == ("u", "typed", None)
    assert asked == ["Password for u@h: "]


def creds(url: str, **kw: Any) -> cli.Credentials:
    kw.setdefault("environ", {})
    kw.setdefault("netrc_file", "/nonexistent")
    kw.setdefault("interactive", False)
    return cli.find_credentials(parse_pop_url(url), **kw)


def test_password_and_token_commands_print_the_first_line() -> None:
    got = creds("pop3://u@h", password_command="printf 'pw one\\r\\nsecond line\\n'")
    assert got == ("u", "pw one", None)
    # An explicit command wins over the environment.
    got = creds("pop3://u@h", password_command="echo cmd", environ={"POP3_PASSWORD": "env"})
    assert got.password == "cmd"
    got = creds("pop3://u;AUTH=XOAUTH2@h", token_command="echo ya29.tok")
    assert got == ("u", None, "ya29.tok")
    # Without ;AUTH= a token command chooses a bearer-token login.
    assert creds("pop3://u@h", token_command="echo t1") == ("u", None, "t1")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("echo hunter2; exit 3", "exited with status 3"),
        ("kill -TERM $$", "stopped by signal 15"),
        ("printf '\\nhunter2\\n'", "nothing on its first line"),
        ("true", "nothing on its first line"),
        ("printf 'hunter2\\377\\n'", "not UTF-8"),
        (f"{sys.executable} -c \"print('x' * 70000)\"", "more than 65536 octets"),
    ],
)
def test_secret_command_failures_never_show_the_output(command: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        creds("pop3://u@h", password_command=command)
    assert "hunter2" not in str(info.value) and "--password-command" in str(info.value)


@pytest.mark.parametrize("background", [False, True])
def test_secret_command_time_limit(monkeypatch: pytest.MonkeyPatch, background: bool) -> None:
    # Also when a background child holds its output open: the limit is the
    # command's, not the pipe's.
    monkeypatch.setattr(cli, "SECRET_COMMAND_TIMEOUT", 0.3)
    command = ("sleep 8 & " if background else "") + "exec sleep 8"
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=r"took more than 0\.3 s"):
        creds("pop3://u;AUTH=OAUTHBEARER@h", token_command=command)
    assert time.monotonic() - t0 < 5


def test_secret_command_done_while_a_background_child_holds_its_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A helper that starts a daemon sharing its stdout (an agent): its answer
    # counts once it exits; the daemon is not waited for.
    monkeypatch.setattr(cli, "SECRET_COMMAND_TIMEOUT", 3.0)
    got = creds("pop3://u@h", password_command="sleep 8 & echo from-helper")
    assert got == ("u", "from-helper", None)


def test_token_sources_and_what_they_are_for() -> None:
    env = {"POP3_TOKEN": "envtok", "POP3_PASSWORD": "envpw"}
    assert creds("pop3://u;AUTH=OAUTHBEARER@h", environ=env) == ("u", None, "envtok")
    # Without ;AUTH= both environment credentials go to the login (the token
    # where the server offers a token mechanism); a named password mechanism
    # ignores the token, and an explicit token command the password.
    assert creds("pop3://u@h", environ=env) == ("u", "envpw", "envtok")
    assert creds("pop3://u@h", environ={"POP3_TOKEN": "t"}) == ("u", None, "t")
    assert creds("pop3://u@h", environ=env, token_command="echo t2") == ("u", None, "t2")
    assert creds("pop3://u;AUTH=SCRAM-SHA-256@h", environ=env) == ("u", "envpw", None)
    # An explicit --password-command wins over a token in the environment.
    assert creds("pop3://u@h", environ=env, password_command="echo c") == ("u", "c", None)
    with pytest.raises(UsageError, match=r"XOAUTH2 needs a bearer token: set \$POP3_TOKEN"):
        creds("pop3://u;AUTH=XOAUTH2@h", environ={"POP3_PASSWORD": "pw"})
    with pytest.raises(UsageError, match="use --token-command"):
        creds("pop3://u;AUTH=XOAUTH2@h", password_command="echo pw")
    with pytest.raises(UsageError, match=r"not ;AUTH=\+USER"):
        creds("pop3://u;AUTH=+USER@h", token_command="echo t")
    # The user may come from ~/.netrc for a token too.
    with pytest.raises(UsageError, match="names no user"):
        creds("pop3://h", environ=env)


# ====================================================================== passwd


def write_users(path: Path, *pairs: tuple[str, str]) -> None:
    for user, pw in pairs:
        with monkeypatched_stdin(pw + "\n"):
            assert main(["passwd", "--file", str(path), user]) == 0


@contextlib.contextmanager
def monkeypatched_stdin(text: str) -> Iterator[None]:
    old = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = old


def login_works(table: Any, user: str, password: str, mechanism: str) -> bool:
    md = MemoryMaildrop({user: [b"Subject: x\n\nhi\n"]})
    config = p.ServerConfig(authenticator=table, failure_delay=FailureDelay(base=0.0))
    with (
        running(md, config) as port,
        connect("127.0.0.1", port, tls=False, allow_insecure=True) as c,
    ):
        try:
            c.login(user, password, mechanism=mechanism)
        except p.Pop3Error:
            return False
        assert c.session.mechanism == mechanism
        return c.stat() == (1, len(wire_form(b"Subject: x\n\nhi\n")))


def test_passwd_writes_scram_verifiers_that_log_in(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# our users\ncarol:plain pass\n")
    write_users(users, ("alice", "correct horse"), ("bob", "b0b"))
    text = users.read_text()
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    lines = text.splitlines()
    assert lines[:2] == ["# our users", "carol:plain pass"]
    verifier = r"\{SCRAM-SHA-256\}4096\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+"
    verifier1 = verifier.replace("256", "1")
    assert re.fullmatch(rf"alice:{verifier},{verifier1}", lines[2])
    assert lines[3].startswith("bob:{SCRAM-SHA-256}")
    assert "correct horse" not in text and "b0b" not in text
    table = load_credentials(text)
    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-1", "USER"):
        assert login_works(table, "alice", "correct horse", mech)
    assert not login_works(table, "alice", "wrong", "SCRAM-SHA-256")
    # Replacing a password keeps the line's place and the other users.
    write_users(users, ("alice", "new one"))
    lines2 = users.read_text().splitlines()
    assert len(lines2) == 4 and lines2[3] == lines[3] and lines2[2] != lines[2]
    table2 = load_credentials(users.read_text())
    assert login_works(table2, "alice", "new one", "SCRAM-SHA-256")
    assert not login_works(table2, "alice", "correct horse", "SCRAM-SHA-256")
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temporary left


def test_passwd_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users"
    with monkeypatched_stdin("pw\n"):
        assert main(["passwd", "--file", str(users), "a:b"]) == 2
    with monkeypatched_stdin(""):
        assert main(["passwd", "--file", str(users), "alice"]) == 2
    with monkeypatched_stdin("pw\n"):
        assert main(["passwd", "--file", str(users), "--iterations", "100", "alice"]) == 2
    assert not users.exists()
    users.write_text("broken line without colon\n")
    with monkeypatched_stdin("pw\n"):
        assert main(["passwd", "--file", str(users), "alice"]) == 2
    assert users.read_text() == "broken line without colon\n"
    err = capsys.readouterr().err
    assert "line 1" in err and "pw" not in err.replace("passwd", "")


def test_passwd_prompts_twice_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    answers = iter(["one", "two"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt: next(answers))
    with pytest.raises(UsageError, match="do not match"):
        cli._read_new_password(io.StringIO(), interactive=True)
    answers = iter(["same", "same"])
    assert cli._read_new_password(io.StringIO(), interactive=True) == "same"


def test_passwd_subprocess(tmp_path: Path) -> None:
    users = tmp_path / "users"
    proc = run_module("passwd", "--file", str(users), "dave", input="s3cret\n")
    assert proc.returncode == 0, proc.stderr
    assert "added 'dave'" in proc.stderr
    table = load_credentials(users.read_text())
    assert login_works(table, "dave", "s3cret", "SCRAM-SHA-1")


# ====================================================================== serve


def read_listen_lines(proc: subprocess.Popen[str], count: int) -> list[tuple[str, int]]:
    assert proc.stdout is not None
    out = []
    for _ in range(count):
        line = proc.stdout.readline().rstrip("\n")
        m = LISTEN.match(line)
        assert m, f"unexpected start line {line!r}"
        out.append((m.group(1), int(m.group(2))))
    return out


@contextlib.contextmanager
def serve_process(*args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pop3proto.bindings", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(10)
    assert time.monotonic() - started < 10
    assert proc.stderr is not None
    return code, proc.stderr.read()


def test_serve_demo_subprocess_start_line_and_sigterm() -> None:
    with serve_process("--listen", "127.0.0.1:0") as proc:
        [(scheme, port)] = read_listen_lines(proc, 1)
        assert scheme == "pop3"
        assert proc.stdout is not None
        assert "user 'demo' password 'demo'" in proc.stdout.readline()
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("demo")
        client.pass_("demo")
        count, _ = client.stat()
        assert count == len(DEMO)
        client.quit()
        code, err = stop(proc)
    assert code == 0
    assert "user=demo" in err and "stopped" in err
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO pop3proto\.server: ", err, re.M)


def test_serve_in_process_until_sigterm(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    seen: list[Any] = []

    def visit() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client = poplib.POP3("127.0.0.1", port, timeout=5)  # greeting: started
                break
            except OSError:
                time.sleep(0.05)
        else:
            seen.append("never started")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        client.user("demo1")
        client.pass_("demo")
        seen.append(client.stat())
        client.quit()
        os.kill(os.getpid(), signal.SIGTERM)

    guard = signal.signal(signal.SIGTERM, lambda *_: None)  # never let it kill pytest
    try:
        t = threading.Thread(target=visit)
        t.start()
        code = main(["serve", "--listen", f"127.0.0.1:{port}", "--log-level", "warning"])
        t.join(10)
    finally:
        signal.signal(signal.SIGTERM, guard)
    assert code == 0
    assert len(seen) == 1 and seen[0][0] == len(DEMO), seen
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"pop3proto: listening on pop3://127.0.0.1:{port}"


def test_serve_tls_listeners_and_fetch_over_pop3s(
    certs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], password: None
) -> None:
    with serve_process(
        "--listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--cert",
        str(certs["cert"]),
        "--key",
        str(certs["key"]),
    ) as proc:
        lines = read_listen_lines(proc, 2)
        assert [s for s, _ in lines] == ["pop3", "pop3s"]
        tls_port = lines[1][1]
        code, _out, err = fetch(
            capsys,
            f"pop3s://demo@127.0.0.1:{tls_port}",
            tmp_path / "md",
            "--keep",
            "--cafile",
            str(certs["ca"]),
        )
        assert code == 0, err
        assert delivered(tmp_path / "md") == [wire_form(m) for m in DEMO]
        # Plaintext port: STLS is offered and used (the certificate is verified).
        code, _, err = fetch(
            capsys, f"pop3://demo@127.0.0.1:{lines[0][1]}", tmp_path / "md2", "--keep"
        )
        assert code == 4 and "TLS" in err  # no --cafile: the test CA is not trusted
        code, _, err = fetch(
            capsys,
            f"pop3://demo@127.0.0.1:{lines[0][1]}",
            tmp_path / "md2",
            "--keep",
            "--cafile",
            str(certs["ca"]),
        )
        assert code == 0, err
        code, _ = stop(proc)
    assert code == 0


def test_serve_maildir_with_passwd_users_scram_login(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    Maildir(root).add("erin", b"Subject: stored\n\nline\n.dot\n")
    users = tmp_path / "users"
    write_users(users, ("erin", "pa55word"))
    with serve_process(
        "--listen", "127.0.0.1:0", "--maildir", str(root), "--users", str(users)
    ) as proc:
        [(_, port)] = read_listen_lines(proc, 1)
        for mech in ("SCRAM-SHA-256", "SCRAM-SHA-1"):
            with connect("127.0.0.1", port, tls=False) as c:
                c.login("erin", "pa55word", mechanism=mech)
                assert c.retrieve(1) == b"Subject: stored\r\n\r\nline\r\n.dot\r\n"
        with connect("127.0.0.1", port, tls=False) as c, pytest.raises(p.Pop3Error):
            c.login("erin", "wrong", mechanism="SCRAM-SHA-256")
        # Changed while it runs: a new user and a new password, no restart.
        Maildir(root).add("frank", b"Subject: new\n\nhi\n")
        write_users(users, ("frank", "n3w-user"), ("erin", "n3w-pass"))
        assert _eventually_logs_in(port, "frank", "n3w-user")
        assert _eventually_logs_in(port, "erin", "n3w-pass")
        with connect("127.0.0.1", port, tls=False) as c, pytest.raises(p.Pop3Error):
            c.login("erin", "pa55word", mechanism="SCRAM-SHA-256")
        code, err = stop(proc)
    assert code == 0
    assert "read again" in err


def _eventually_logs_in(port: int, user: str, password: str, within: float = 10.0) -> bool:
    """The server checks its credential file at most once a second."""
    deadline = time.monotonic() + within
    while True:
        with connect("127.0.0.1", port, tls=False) as c:
            try:
                c.login(user, password, mechanism="SCRAM-SHA-256")
            except p.Pop3Error:
                if time.monotonic() > deadline:
                    return False
            else:
                return True
        time.sleep(0.2)


def _listening_pids(port: int) -> set[int]:
    """The processes holding a TCP socket listening on ``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    pids = set()
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pids.add(int(proc_dir.name))
    return pids


def test_serve_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    for user in ("w1", "w2", "w3"):
        Maildir(root).add(user, b"Subject: w\n\nbody\n")
    users = tmp_path / "users"
    users.write_text("w1:pw\nw2:pw\nw3:pw\n")
    with serve_process(
        "--listen",
        "127.0.0.1:0",
        "--maildir",
        str(root),
        "--users",
        str(users),
        "--workers",
        "2",
    ) as proc:
        [(_, port)] = read_listen_lines(proc, 1)
        for user in ("w1", "w2", "w3", "w1"):
            with connect("127.0.0.1", port, tls=False) as c:
                c.login(user, "pw")
                assert c.stat()[0] == 1
        children_file = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        children = [int(x) for x in children_file.read_text().split()]
        assert len(children) == 2
        if hasattr(socket, "SO_REUSEPORT"):
            # Each worker listens on its own socket (SO_REUSEPORT); the parent
            # no longer listens at all.
            assert _listening_pids(port) == set(children)
        code, _ = stop(proc)
    assert code == 0
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-listen", "127.0.0.1:0"], "--tls-listen needs --cert"),
        (["--maildir", "."], "--maildir needs --users"),
        (["--users", "x"], "--users needs --maildir"),
        (["--workers", "2"], "--workers needs --maildir"),
        (["--listen", "127.0.0.1:x"], "bad port"),
        (["--expire", "soon"], "--expire"),
        (["--cert", "/nonexistent.pem"], "certificate"),
        (["--max-per-address", "0"], "--max-per-address must be at least 1"),
        (["--max-per-user", "0"], "--max-per-user must be at least 1"),
    ],
)
def test_serve_usage_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *args]) == 2
    assert message in capsys.readouterr().err


def test_serve_connection_caps_reach_the_server_config() -> None:
    from pop3proto.bindings.cli import _serve_setup, build_parser

    args = build_parser().parse_args(["serve", "--max-per-address", "7", "--max-per-user", "3"])
    limiter = _serve_setup(args).config.limiter
    assert (limiter.per_address, limiter.per_user) == (7, 3)


def test_serve_workarounds_reach_the_server_config() -> None:
    from pop3proto.bindings.cli import _serve_setup, build_parser

    parse = build_parser().parse_args
    config = _serve_setup(parse(["serve"])).config
    assert not config.oe_ns_eoh and not config.outlook_no_nuls
    config = _serve_setup(parse(["serve", "--workaround", "oe-ns-eoh"])).config
    assert config.oe_ns_eoh and not config.outlook_no_nuls
    both = ["serve", "--workaround", "oe-ns-eoh", "--workaround", "outlook-no-nuls"]
    config = _serve_setup(parse(both)).config
    assert config.oe_ns_eoh and config.outlook_no_nuls


def test_serve_unknown_workaround_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workaround", "netscape-everything"]) == 2
    assert "--workaround" in capsys.readouterr().err


def test_oe_ns_eoh_over_a_socket_sizes_match_what_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], password: None
) -> None:
    """A header-only message through a real server: RETR adds the empty
    line, LIST counted it, and fetch (which checks RETR against LIST)
    stores what was sent."""
    stored = [b"Subject: headers only\r\n", b"Subject: x\r\n\r\nbody\r\n"]
    md = MemoryMaildrop({"demo": stored})
    with running(md, demo_config(oe_ns_eoh=True)) as port:
        with connect("127.0.0.1", port, tls=False, allow_insecure=True) as c:
            c.login("demo", "demo")
            sizes = c.list()
            first, second = c.retrieve(1), c.retrieve(2)
        assert first == b"Subject: headers only\r\n\r\n"
        assert second == stored[1]
        assert sizes == {1: len(first), 2: len(second)}
        code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "M", "--keep")
    assert code == 0, err
    got = sorted(f.read_bytes() for f in (tmp_path / "M" / "new").iterdir())
    assert got == sorted([first, second])


def test_serve_bad_users_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users"
    users.write_text("ok:pw\nnot a line\n")
    assert main(["serve", "--maildir", str(tmp_path), "--users", str(users)]) == 2
    assert "line 2" in capsys.readouterr().err


# ====================================================================== fetch: our server


def test_fetch_delivers_byte_exact_then_deletes(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
) -> None:
    md, port = demo
    uids = server_uids(port)
    code, out, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "Maildir")
    assert code == 0, err
    m = SUMMARY.match(out.strip())
    assert m, out
    fetched, octets, host, deleted, kept = m.groups()
    expected = [wire_form(x) for x in DEMO]
    assert (int(fetched), int(octets), host, int(deleted), int(kept)) == (
        len(DEMO),
        sum(map(len, expected)),
        "127.0.0.1",
        len(DEMO),
        0,
    )
    assert delivered(tmp_path / "Maildir") == expected
    assert md.contents("demo") == []  # deleted on the server
    assert md.contents("demo1") == DEMO  # other accounts untouched
    assert list((tmp_path / "Maildir" / "tmp").iterdir()) == []
    assert (tmp_path / "Maildir" / "cur").is_dir()
    # Deleted for sure (QUIT +OK): the store forgot them again.
    assert store_uids(tmp_path / "Maildir", port) == set()
    assert uids and len(uids) == len(DEMO)
    for f in (tmp_path / "Maildir" / "new").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert not any(u in f.name for u in uids)


def test_fetch_keep_only_new_and_refetch(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
) -> None:
    md, port = demo
    url = f"pop3://demo@127.0.0.1:{port}"
    target = tmp_path / "Maildir"
    code, out, _ = fetch(capsys, url, target, "--keep")
    assert code == 0 and out.startswith(f"fetched {len(DEMO)} messages")
    assert out.strip().endswith(f"deleted 0; kept {len(DEMO)}")
    assert store_uids(target, port) == server_uids(port)
    code, out, _ = fetch(capsys, url, target, "--keep")
    assert code == 0 and out.startswith("fetched 0 messages (0 bytes)")
    md.add("demo", b"Subject: late\n\nnew mail\n")
    code, out, _ = fetch(capsys, url, target, "--keep", "-q")
    assert code == 0 and out == ""  # quiet
    assert len(delivered(target)) == len(DEMO) + 1
    assert delivered(target)[-1] == b"Subject: late\r\n\r\nnew mail\r\n"
    code, out, _ = fetch(capsys, url, target, "--keep", "--no-only-new")
    assert code == 0 and out.startswith(f"fetched {len(DEMO) + 1} messages")
    # Without --keep: nothing new to fetch, everything delivered before is deleted.
    code, out, _ = fetch(capsys, url, target)
    assert code == 0
    assert (
        out.strip()
        == f"fetched 0 messages (0 bytes) from 127.0.0.1; deleted {len(DEMO) + 1}; kept 0"
    )
    assert md.contents("demo") == []
    assert store_uids(target, port) == set()


def test_fetch_lf_line_ends(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
) -> None:
    _, port = demo
    code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "md", "--lf")
    assert code == 0, err
    assert delivered(tmp_path / "md") == [wire_form(m).replace(b"\r\n", b"\n") for m in DEMO]


def test_lf_conversion_across_chunk_boundaries(tmp_path: Path) -> None:
    data = b"a\r\nb\r\n\r\nc\rd\r\n\r"
    for cut in range(len(data) + 1):
        delivery = cli._Delivery(str(tmp_path / f"m{cut}"), lf=True)
        msg = delivery.begin()
        msg.write(data[:cut])
        msg.write(data[cut:])
        name = msg.finish()
        assert (tmp_path / f"m{cut}" / "new" / name).read_bytes() == b"a\nb\n\nc\rd\n\r"
        delivery.close()


def test_fetch_max_size_leaves_big_messages(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
) -> None:
    md, port = demo
    limit = 3000
    small = [m for m in DEMO if len(wire_form(m)) <= limit]
    assert 0 < len(small) < len(DEMO)
    code, out, err = fetch(
        capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "md", "--max-size", str(limit)
    )
    assert code == 1
    assert "over --max-size" in err
    assert delivered(tmp_path / "md") == [wire_form(m) for m in small]
    assert md.contents("demo") == [m for m in DEMO if m not in small]  # not deleted
    assert out.strip().endswith(f"failed {len(DEMO) - len(small)}")


def test_fetch_auth_and_connection_failures(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    password: None,
) -> None:
    md, port = demo
    monkeypatch.setenv("POP3_PASSWORD", "wrong")
    code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "md")
    assert code == 3 and "login as 'demo'" in err and "wrong" not in err
    monkeypatch.setenv("POP3_PASSWORD", "demo")
    code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{free_port()}", tmp_path / "md")
    assert code == 4 and "cannot connect" in err
    code, _, err = fetch(capsys, f"pop3://demo;AUTH=+APOP@127.0.0.1:{port}", tmp_path / "md")
    assert code == 3 and "APOP" in err
    # A non-loopback server must offer STLS unless --insecure.
    monkeypatch.setattr(cli, "_is_loopback_literal", lambda host: False)
    code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "md")
    assert code == 4 and "--insecure" in err
    code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "md", "--insecure")
    assert code == 0, err
    assert md.contents("demo") == []


def test_fetch_password_from_netrc_and_no_terminal(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, port = demo
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("POP3_PASSWORD", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "md")
    assert code == 2 and "POP3_PASSWORD" in err and "not a terminal" in err
    netrc = home / ".netrc"
    netrc.write_text("machine 127.0.0.1 login demo password demo\n")
    netrc.chmod(0o600)
    code, out, err = fetch(capsys, f"pop3://127.0.0.1:{port}", tmp_path / "md", "--keep")
    assert code == 0, err
    assert out.startswith(f"fetched {len(DEMO)} messages")


def test_fetch_refuses_while_another_fetch_holds_the_account(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
) -> None:
    md, port = demo
    with UidStore.for_maildir(tmp_path / "md", "127.0.0.1", port, "demo"):
        code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "md")
    assert code == 1 and "in use" in err
    assert md.contents("demo") == DEMO


@contextlib.contextmanager
def running_tls(table: PasswordTable, ctx: ssl.SSLContext) -> Iterator[tuple[MemoryMaildrop, int]]:
    """The demo maildrop over implicit TLS only, logins checked by ``table``."""
    md = cli.demo_maildrop(0)
    config = demo_config(authenticator=table)
    srv = Server(md, config=config, listen=None, tls_listen=("127.0.0.1", 0), ssl_context=ctx)
    with srv:
        yield md, srv.addresses[0][1]


@pytest.fixture
def token_server(certs: dict[str, Path]) -> Iterator[tuple[MemoryMaildrop, int]]:
    """User demo logs in with password "demo" or bearer token "tok-1"."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(certs["cert"]), str(certs["key"]))
    with running_tls(PasswordTable({"demo": "demo"}, tokens={"demo": "tok-1"}), ctx) as server:
        yield server


@pytest.mark.parametrize("auth", [";AUTH=XOAUTH2", ";AUTH=OAUTHBEARER", ""])
def test_fetch_with_a_bearer_token(
    token_server: tuple[MemoryMaildrop, int],
    certs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_secrets: None,
    auth: str,
) -> None:
    md, port = token_server
    url = f"pop3s://demo{auth}@127.0.0.1:{port}"
    ca = ("--cafile", str(certs["ca"]))
    # A wrong token: refused, exit 3, nothing delivered or deleted.
    code, _, err = fetch(capsys, url, tmp_path / "md", *ca, "--token-command", "echo tok-2")
    assert code == 3 and "tok-2" not in err, err
    assert not list((tmp_path / "md" / "new").glob("*")) and md.contents("demo") == DEMO
    code, out, err = fetch(capsys, url, tmp_path / "md", *ca, "--token-command", "echo tok-1")
    assert code == 0, err
    assert out.startswith(f"fetched {len(DEMO)} messages")
    assert delivered(tmp_path / "md") == [wire_form(x) for x in DEMO]
    assert md.contents("demo") == []


def test_fetch_with_a_stray_token_still_logs_in_with_the_password(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    password: None,
) -> None:
    # $POP3_TOKEN set for some other account; this server offers no token
    # mechanism, so the password from the environment is used.
    _, port = demo
    monkeypatch.setenv("POP3_TOKEN", "for-another-account")
    code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "md", "--keep")
    assert code == 0, err


def test_bench_with_a_bearer_token(
    token_server: tuple[MemoryMaildrop, int],
    certs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, port = token_server
    monkeypatch.setenv("POP3_TOKEN", "tok-1")
    url = f"pop3s://demo;AUTH=OAUTHBEARER@127.0.0.1:{port}"
    argv = ["bench", url, "--cafile", str(certs["ca"]), "--sessions", "3", "--concurrency", "1"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sessions"] == 3 and sum(report["errors"].values()) == 0
    monkeypatch.setenv("POP3_TOKEN", "tok-2")
    assert main([*argv, "--json"]) != 0
    report = json.loads(capsys.readouterr().out)
    assert report["sessions"] == 0 and report["errors"]["login"] == 3


def test_fetch_with_a_client_certificate_and_external(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_secrets: None
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL  # asked for, not required
    ca.configure_trust(server_ctx)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for name in ("demo", "mallory"):
        cert = ca.issue_cert(f"{name}@example.org", common_name=name)
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / f"{name}.pem"))
    table = PasswordTable({"demo": "demo"}, allow_external=True)
    with running_tls(table, server_ctx) as (md, port):
        url = f"pop3s://demo;AUTH=EXTERNAL@127.0.0.1:{port}"
        ca_arg = ("--cafile", str(tmp_path / "ca.pem"))
        # A certificate for somebody without a maildrop: refused, nothing delivered.
        mallory = ("--cert", str(tmp_path / "mallory.pem"))
        code, _, err = fetch(capsys, url, tmp_path / "md", *ca_arg, *mallory)
        assert code == 3, err
        assert md.contents("demo") == DEMO
        # No password anywhere: the certificate is the credential.
        demo = ("--cert", str(tmp_path / "demo.pem"))
        code, _, err = fetch(capsys, url, tmp_path / "md", *ca_arg, *demo)
        assert code == 0, err
    assert delivered(tmp_path / "md") == [wire_form(x) for x in DEMO]
    assert md.contents("demo") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pop3s://u;AUTH=EXTERNAL@h"], "give --cert"),
        (["pop3s://u@h", "--key", "k.pem"], "--key needs --cert"),
        (["pop3s://u;AUTH=EXTERNAL@h", "--cert", "/nonexistent.pem"], "--cert /nonexistent.pem"),
        (
            ["pop3s://u;AUTH=EXTERNAL@h", "--cert", "c.pem", "--password-command", "echo x"],
            "EXTERNAL takes no",
        ),
    ],
)
def test_client_certificate_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = fetch(capsys, args[0], tmp_path / "md", *args[1:])
    assert code == 2 and message in err


def test_fetch_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fetch", "pop3://u:pw@h", "--maildir", str(tmp_path)]) == 2
    assert "no passwords" in capsys.readouterr().err
    assert main(["fetch", "pop3://u@h"]) == 2  # --maildir is required
    assert main(["fetch", "pop3://u@h", "--maildir", str(tmp_path), "--window", "0"]) == 2
    assert main(["--version"]) == 0
    assert "pop3proto" in capsys.readouterr().out


# ---------------------------------------------------------------- disk faults


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.mark.parametrize("fault", ["fsync", "write", "link", "dirsync"])
def test_fetch_disk_error_stops_without_any_dele(
    fault: str,
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    password: None,
) -> None:
    """HARDENING 57: ENOSPC/EIO while delivering → no DELE, tmp/ cleaned,
    non-zero exit; a later run finishes the job."""
    md, port = demo
    target = tmp_path / "Maildir"
    tmpdir = str(target / "tmp")
    newdir = str(target / "new")
    calls = {"n": 0}
    real_fsync, real_write, real_link = os.fsync, os.write, os.link

    def enospc() -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fsync(fd: int) -> None:
        path = _fd_path(fd)
        if fault == "fsync" and path.startswith(tmpdir + "/"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second message
                raise enospc()
        if fault == "dirsync" and path == newdir:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    def write(fd: int, data: Any) -> int:
        if fault == "write" and _fd_path(fd).startswith(tmpdir + "/"):
            return_n = real_write(fd, bytes(data)[:10])  # a short write, then no space
            calls["n"] += 1
            if calls["n"] > 1:
                raise enospc()
            return return_n
        return real_write(fd, data)

    def link(*args: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_link(*args, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)
    if fault == "link":
        monkeypatch.setattr(os, "link", link)
    code, _out, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", target)
    assert code == 1
    assert "without deleting anything" in err
    assert md.contents("demo") == DEMO  # no DELE reached the server
    assert list((target / "tmp").iterdir()) == []
    got = delivered(target)
    assert got == [wire_form(m) for m in DEMO[: len(got)]]
    # Messages are made durable in batches and a failed batch is taken back
    # out whole: nothing at or after the failing message is in new/.
    assert len(got) <= {"fsync": 1, "write": 0, "link": 1, "dirsync": 0}[fault]
    assert len(store_uids(target, port)) == len(got)
    monkeypatch.undo()
    monkeypatch.setenv("POP3_PASSWORD", "demo")
    code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", target)
    assert code == 0, err
    assert delivered(target) == [wire_form(m) for m in DEMO]
    assert md.contents("demo") == []


def test_fetch_killed_before_its_uids_are_committed_fetches_nothing_twice(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    password: None,
) -> None:
    """HARDENING 56: killed after the messages reached new/ but before the UID
    store was committed: nothing lost, and the intents the store wrote first
    mean not even one message is fetched twice."""
    md, port = demo
    target = tmp_path / "Maildir"

    def killed(self: UidStore) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(UidStore, "commit", killed)
    assert main(["fetch", f"pop3://demo@127.0.0.1:{port}", "--maildir", str(target)]) == 130
    capsys.readouterr()
    assert md.contents("demo") == DEMO  # no DELE
    assert len(delivered(target)) == len(DEMO)
    assert list((target / "tmp").iterdir()) == []
    # The user reads one message meanwhile: moved to cur/ with a flag.
    first = next((target / "new").iterdir())
    first.rename(target / "cur" / (first.name + ":2,S"))
    monkeypatch.undo()
    monkeypatch.setenv("POP3_PASSWORD", "demo")
    code, out, _ = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", target)
    assert code == 0
    assert out.startswith("fetched 0 messages")
    assert len(delivered(target)) == len(DEMO) - 1
    assert md.contents("demo") == []  # deleted now that the UIDs are recorded


def test_fetch_delete_after_days_and_server_expire(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], password: None
) -> None:
    md = cli.demo_maildrop(0)
    with running(md, demo_config(expire="2")) as port:
        url = f"pop3://demo@127.0.0.1:{port}"
        target = tmp_path / "Maildir"
        code, out, err = fetch(capsys, url, target, "--delete-after-days", "5")
        assert code == 0
        assert "EXPIRE" in err and "--delete-after-days 5" in err
        assert out.strip().endswith(f"deleted 0; kept {len(DEMO)}")
        # Age two of the deliveries by ten days.
        store_file = next((target / "pop3proto-uids").glob("demo@*_[0-9]*[0-9]"))
        lines = store_file.read_text().splitlines()
        old = int(time.time()) - 10 * 86400
        lines[1] = f"{old} {lines[1].split(' ', 1)[1]}"
        lines[2] = f"{old} {lines[2].split(' ', 1)[1]}"
        store_file.write_text("\n".join(lines) + "\n")
        code, out, _ = fetch(capsys, url, target, "--delete-after-days", "5")
        assert code == 0
        assert (
            out.strip()
            == f"fetched 0 messages (0 bytes) from 127.0.0.1; deleted 2; kept {len(DEMO) - 2}"
        )
        assert md.contents("demo") == DEMO[2:]
        assert len(store_uids(target, port)) == len(DEMO) - 2


# ---------------------------------------------------------------- a faulty server


class ScriptedServer:
    """A minimal POP3 server that misbehaves on purpose: ``faults[msg]`` is
    ``"cut"`` (close in the middle of the body), ``"err"`` (answer -ERR),
    ``"size"`` (LIST reports a wrong size) or ``"small"`` (LIST reports 10
    octets); ``faults[0] == "nouidl"`` refuses UIDL. Records every command."""

    def __init__(self, messages: list[bytes], faults: dict[int, str]) -> None:
        self.messages = messages
        self.faults = faults
        self.commands: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                self._session(conn)

    def _size(self, n: int) -> int:
        size = len(self.messages[n - 1])
        if self.faults.get(n) == "small":
            return 10
        return size + 1000 if self.faults.get(n) == "size" else size

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(b"+OK scripted\r\n")
        buf = b""
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\r\n" in buf:
                raw, buf = buf.split(b"\r\n", 1)
                line = raw.decode()
                self.commands.append(line)
                word, _, arg = line.partition(" ")
                word = word.upper()
                if word == "CAPA":
                    conn.sendall(b"+OK\r\nUSER\r\nUIDL\r\nPIPELINING\r\n.\r\n")
                elif word in ("USER", "PASS", "NOOP", "RSET"):
                    conn.sendall(b"+OK\r\n")
                elif word == "LIST":
                    body = b"".join(
                        b"%d %d\r\n" % (n, self._size(n)) for n in range(1, len(self.messages) + 1)
                    )
                    conn.sendall(b"+OK\r\n" + body + b".\r\n")
                elif word == "UIDL" and self.faults.get(0) == "nouidl":
                    conn.sendall(b"-ERR no UIDL here\r\n")
                elif word == "UIDL":
                    body = b"".join(
                        b"%d uid-%d\r\n" % (n, n) for n in range(1, len(self.messages) + 1)
                    )
                    conn.sendall(b"+OK\r\n" + body + b".\r\n")
                elif word == "RETR":
                    n = int(arg)
                    fault = self.faults.get(n)
                    msg = self.messages[n - 1]
                    if fault == "err":
                        conn.sendall(b"-ERR [SYS/TEMP] cannot read message\r\n")
                    elif fault == "cut":
                        conn.sendall(b"+OK\r\n" + msg[: len(msg) // 2])
                        return
                    else:
                        conn.sendall(b"+OK\r\n" + msg + b".\r\n")
                elif word == "DELE":
                    conn.sendall(b"+OK\r\n")
                elif word == "QUIT":
                    conn.sendall(b"+OK bye\r\n")
                    return
                else:
                    conn.sendall(b"-ERR unknown\r\n")

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[dict[int, str]], ScriptedServer]]:
    servers: list[ScriptedServer] = []
    messages = [b"Subject: m%d\r\n\r\n" % n + b"line of text\r\n" * 50 for n in range(1, 5)]

    def make(faults: dict[int, str]) -> ScriptedServer:
        srv = ScriptedServer(messages, faults)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()


def test_fetch_message_cut_mid_body_is_neither_delivered_nor_deleted(
    scripted: Callable[[dict[int, str]], ScriptedServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
) -> None:
    srv = scripted({2: "cut"})
    target = tmp_path / "md"
    code, _out, err = fetch(capsys, f"pop3://u@127.0.0.1:{srv.port}", target)
    assert code == 1
    assert "connection" in err
    assert delivered(target) == [srv.messages[0]]
    assert not any(c.startswith("DELE") for c in srv.commands)
    assert list((target / "tmp").iterdir()) == []
    with UidStore.for_maildir(target, "127.0.0.1", srv.port, "u") as store:
        assert set(store) == {"uid-1"}
    # Next run (the server behaves now): message 1 is not fetched again, all deleted.
    srv.faults.clear()
    srv.commands.clear()
    code, _, _ = fetch(capsys, f"pop3://u@127.0.0.1:{srv.port}", target)
    assert code == 0
    assert delivered(target) == srv.messages
    assert [c for c in srv.commands if c.startswith(("RETR", "DELE"))] == [
        "RETR 2",
        "RETR 3",
        "RETR 4",
        "DELE 1",
        "DELE 2",
        "DELE 3",
        "DELE 4",
    ]


@pytest.mark.parametrize("streamed", [False, True], ids=["held", "streamed"])
def test_fetch_err_for_one_message_keeps_it_and_delivers_the_rest(
    scripted: Callable[[dict[int, str]], ScriptedServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
    monkeypatch: pytest.MonkeyPatch,
    streamed: bool,
) -> None:
    if streamed:  # every message counts as large: pipelined into files
        monkeypatch.setattr(cli, "STREAM_THRESHOLD", 1)
    srv = scripted({2: "err"})
    code, out, err = fetch(capsys, f"pop3://u@127.0.0.1:{srv.port}", tmp_path / "md")
    assert code == 1
    assert "message 2 not retrieved" in err and "SYS/TEMP" in err
    assert delivered(tmp_path / "md") == [srv.messages[0], srv.messages[2], srv.messages[3]]
    assert "DELE 2" not in srv.commands
    assert {"DELE 1", "DELE 3", "DELE 4", "QUIT"} <= set(srv.commands)
    assert out.strip().endswith("deleted 3; kept 1; failed 1")


def test_fetch_size_mismatch_is_a_warning_never_framing(
    scripted: Callable[[dict[int, str]], ScriptedServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
) -> None:
    srv = scripted({3: "size"})
    code, _, err = fetch(capsys, f"pop3://u@127.0.0.1:{srv.port}", tmp_path / "md")
    assert code == 0
    assert "message 3: LIST said" in err
    assert delivered(tmp_path / "md") == srv.messages


def test_fetch_cap_hit_mid_body_delivers_and_deletes_nothing_of_it(
    scripted: Callable[[dict[int, str]], ScriptedServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
) -> None:
    """HARDENING 2: LIST under-reports message 2, the body passes --max-size:
    the engine's cap stops it; nothing of it is delivered, nothing deleted."""
    srv = scripted({2: "small"})
    code, _, err = fetch(
        capsys, f"pop3://u@127.0.0.1:{srv.port}", tmp_path / "md", "--max-size", "300"
    )
    assert code == 1 and "max_message_size" in err
    assert delivered(tmp_path / "md") == []  # messages 1, 3, 4 are over 300: not asked for
    assert "RETR 2" in srv.commands
    assert not any(c.startswith("DELE") for c in srv.commands)
    assert list((tmp_path / "md" / "tmp").iterdir()) == []


def test_fetch_without_uidl(
    scripted: Callable[[dict[int, str]], ScriptedServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
) -> None:
    srv = scripted({0: "nouidl"})
    code, _, err = fetch(capsys, f"pop3://u@127.0.0.1:{srv.port}", tmp_path / "md", "--keep")
    assert code == 0
    assert "no UIDL" in err and "every run will fetch every message" in err
    code, out, _ = fetch(capsys, f"pop3://u@127.0.0.1:{srv.port}", tmp_path / "md")
    assert code == 0 and out.startswith("fetched 4 messages")
    assert len(delivered(tmp_path / "md")) == 8
    assert [c for c in srv.commands if c.startswith("DELE")] == [f"DELE {n}" for n in range(1, 5)]


def test_large_messages_stream_straight_to_disk(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    password: None,
) -> None:
    md, port = demo
    monkeypatch.setattr(cli, "STREAM_THRESHOLD", 1000)  # two demo messages are "large" now
    assert sum(len(wire_form(m)) >= 1000 for m in DEMO) == 2
    code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "md", "--keep")
    assert code == 0, err
    assert delivered(tmp_path / "md") == [wire_form(m) for m in DEMO]
    code, _, err = fetch(capsys, f"pop3://demo1@127.0.0.1:{port}", tmp_path / "lf", "--lf")
    assert code == 0, err
    assert delivered(tmp_path / "lf") == [wire_form(m).replace(b"\r\n", b"\n") for m in DEMO]
    assert md.contents("demo1") == []
    # A disk error while streaming: nothing deleted, tmp/ clean.
    real_write = os.write
    target = str(tmp_path / "fail" / "tmp") + "/"

    def write(fd: int, data: Any) -> int:
        big = len(data) > 3000 or os.fstat(fd).st_size > 3000  # only the attachment
        if _fd_path(fd).startswith(target) and big:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        # After the whole body arrived: the connection is still usable.
        if _fd_path(fd).startswith(target) and os.fstat(fd).st_size > 3000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    for fault in ("write", "fsync"):
        with monkeypatch.context() as patch:
            patch.setattr(os, fault, {"write": write, "fsync": fsync}[fault])
            code, _, err = fetch(capsys, f"pop3://demo@127.0.0.1:{port}", tmp_path / "fail")
        assert code == 1 and "without deleting anything" in err
        assert list((tmp_path / "fail" / "tmp").iterdir()) == []
        assert delivered(tmp_path / "fail") == [wire_form(m) for m in DEMO[:2]]
        assert md.contents("demo") == DEMO


def test_delivery_falls_back_to_rename_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(*args: Any, **kw: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    delivery = cli._Delivery(str(tmp_path / "md"), lf=False)
    name = delivery.deliver(b"Subject: x\r\n\r\nbody\r\n")
    delivery.close()
    assert (tmp_path / "md" / "new" / name).read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    assert list((tmp_path / "md" / "tmp").iterdir()) == []


def test_progress_only_when_asked() -> None:
    stream = io.StringIO()
    progress = cli._Progress(True, 3, stream)
    progress.update(1, 2_500_000)
    progress.end()
    assert stream.getvalue() == "\rpop3proto: 1/3 messages, 2.5 MB  \n"
    quiet = io.StringIO()
    off = cli._Progress(False, 3, quiet)
    off.update(1, 10)
    off.end()
    assert quiet.getvalue() == ""


def test_store_forgets_uids_once_the_server_is_empty(
    demo: tuple[MemoryMaildrop, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    password: None,
) -> None:
    _, port = demo
    url = f"pop3://demo@127.0.0.1:{port}"
    assert fetch(capsys, url, tmp_path / "md", "--keep")[0] == 0
    assert len(store_uids(tmp_path / "md", port)) == len(DEMO)
    with connect("127.0.0.1", port, tls=False, allow_insecure=True) as c:  # another client
        c.login("demo", "demo")
        c.delete_many(range(1, len(DEMO) + 1))
    code, out, _ = fetch(capsys, url, tmp_path / "md", "--keep")
    assert code == 0 and out.strip().endswith("deleted 0; kept 0")
    assert store_uids(tmp_path / "md", port) == set()


def test_fetch_subprocess(demo: tuple[MemoryMaildrop, int], tmp_path: Path) -> None:
    md, port = demo
    env = dict(os.environ, POP3_PASSWORD="demo", HOME=str(tmp_path))
    proc = run_module(
        "fetch", f"pop3://demo@127.0.0.1:{port}", "--maildir", str(tmp_path / "md"), env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert SUMMARY.match(proc.stdout.strip())
    assert delivered(tmp_path / "md") == [wire_form(m) for m in DEMO]
    assert md.contents("demo") == []


def test_plaintext_fetch_imports_nothing_it_does_not_use(
    demo: tuple[MemoryMaildrop, int], tmp_path: Path
) -> None:
    """Start-up is most of a short fetch: a plaintext USER/PASS run loads
    neither TLS, SASL, the maildrops, nor what argparse, URL decoding,
    host name encoding or random names would pull in unasked."""
    _md, port = demo
    # Only what the run itself loads counts (an editable install's import
    # hook, for one, loads pathlib and with it urllib.parse at start-up).
    code = (
        "import sys; before = set(sys.modules); from pop3proto.bindings import cli; "
        "rc = cli.main(sys.argv[1:]); print(' '.join(sorted(set(sys.modules) - before))); "
        "sys.exit(rc)"
    )
    env = dict(os.environ, POP3_PASSWORD="demo", HOME=str(tmp_path))
    url = f"pop3://demo;AUTH=+USER@127.0.0.1:{port}"
    args = ["fetch", url, "--maildir", str(tmp_path / "md"), "--no-stls", "--keep", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split())
    assert {"pop3proto.bindings._sync_client", "pop3proto.bindings.uidstore"} <= loaded
    unwanted = {
        "ssl",
        "pop3proto._sasl",
        "pop3proto._server",
        "pop3proto._session",
        "pop3proto.bindings.maildrop",
        "shutil",
        "secrets",
        "urllib.parse",
        "encodings.idna",
        "ipaddress",
    }
    assert loaded & unwanted == set()
    assert len(delivered(tmp_path / "md")) == len(DEMO)


# ====================================================================== fetch: Dovecot


def _sha_set(maildir: Path) -> list[str]:
    return sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in (maildir / "new").iterdir())


@pytest.mark.peers
def test_fetch_from_dovecot(
    dovecot: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = dovecot.fill("clifetch", 14, 4000, seed=11)
    monkeypatch.setenv("POP3_PASSWORD", "secret")
    monkeypatch.setenv("HOME", str(tmp_path))
    target = tmp_path / "Maildir"
    ca = str(dovecot.cafile)
    tls_url = f"pop3s://clifetch@127.0.0.1:{dovecot.tls_port}"
    code, out, err = fetch(capsys, tls_url, target, "--keep", "--cafile", ca)
    assert code == 0, err
    assert _sha_set(target) == sorted(m.sha256 for m in manifest)
    for n, data in enumerate(delivered(target), 1):
        assert manifest.matches(n, data)
    with connect(
        "127.0.0.1", dovecot.tls_port, ssl_context=ssl.create_default_context(cafile=ca)
    ) as c:
        c.login("clifetch", "secret")
        dovecot_uids = set(c.uidl().values())
    with UidStore.for_maildir(target, "127.0.0.1", dovecot.tls_port, "clifetch") as store:
        assert set(store) == dovecot_uids and len(dovecot_uids) == len(manifest)
    # On the plaintext port of a loopback server, STLS is used when offered.
    plain = cli.parse_pop_url(f"pop3://clifetch@127.0.0.1:{dovecot.port}")
    client = cli._open_client(plain, cafile=ca, insecure=False, timeout=10)
    assert client.tls_active
    client.close()
    code, out, _ = fetch(capsys, tls_url, target, "--keep", "--cafile", ca)
    assert code == 0 and out.startswith("fetched 0 messages")
    # Over STLS on the plaintext port (another account key), this time deleting.
    code, out, err = fetch(
        capsys, f"pop3://clifetch@127.0.0.1:{dovecot.port}", target, "--cafile", ca, "--window", "4"
    )
    assert code == 0, err
    assert out.strip().endswith(f"deleted {len(manifest)}; kept 0")
    assert len(delivered(target)) == 2 * len(manifest)
    left = [f for sub in ("cur", "new") for f in (dovecot.maildir("clifetch") / sub).iterdir()]
    assert left == []


@pytest.mark.peers
def test_fetch_from_dovecot_with_named_mechanisms(
    dovecot: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = dovecot.fill("climech", 3, 1500, seed=3)
    monkeypatch.setenv("POP3_PASSWORD", "secret")
    monkeypatch.setenv("HOME", str(tmp_path))
    ca = str(dovecot.cafile)
    for i, mech in enumerate(["CRAM-MD5", "SCRAM-SHA-1", "PLAIN", "+USER", "+APOP"]):
        target = tmp_path / f"md{i}"
        url = f"pop3s://climech;AUTH={mech}@127.0.0.1:{dovecot.tls_port}"
        code, _, err = fetch(capsys, url, target, "--keep", "--cafile", ca)
        assert code == 0, (mech, err)
        assert [manifest.matches(n, d) for n, d in enumerate(delivered(target), 1)] == [True] * 3


# ====================================================================== bench


def test_bench_json_report(
    demo: tuple[MemoryMaildrop, int], capsys: pytest.CaptureFixture[str], password: None
) -> None:
    _, port = demo
    code = main(
        [
            "bench",
            f"pop3://demo@127.0.0.1:{port}",
            "--json",
            "--sessions",
            "12",
            "--concurrency",
            "2",
            "--spread",
            "2",
            "--retr",
            "3",
            "--duration",
            "30",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["sessions"] == 12 and report["sessions_failed"] == 0
    assert report["messages"] == 36
    assert report["bytes"] == 12 * sum(len(wire_form(m)) for m in DEMO[:3])
    assert report["errors"] == dict.fromkeys(
        ["connect", "login", "stat", "list", "uidl", "capa", "noop", "rset", "top", "retr", "quit"],
        0,
    )
    assert report["mix"] == ["stat", "uidl", "retr"]
    for kind in ("session", "login"):
        lat = report["latency_ms"][kind]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert report["latency_ms"]["login"]["p50"] <= report["latency_ms"]["session"]["p99"]
    assert report["sessions_per_s"] > 0 and report["mb_per_s"] > 0
    assert report["concurrency"] == 2 and report["pipelining"] is True
    assert report["server"] == f"127.0.0.1:{port}"


def test_bench_mix_runs_each_step(
    demo: tuple[MemoryMaildrop, int], capsys: pytest.CaptureFixture[str], password: None
) -> None:
    """TOP and RETR bodies are counted as received; the other steps leave
    the maildrop as it was (bench never deletes)."""
    _, port = demo
    with connect("127.0.0.1", port, tls=False, allow_insecure=True) as c:
        c.login("demo1", "demo")
        before = c.uidl()
        tops = sum(len(c.top(i, 1)) for i in (1, 2))
        retrs = sum(len(c.retrieve(i)) for i in (1, 2))
    args = ["bench", f"pop3://demo@127.0.0.1:{port}", "--json", "--sessions", "4"]
    args += ["--concurrency", "1", "--spread", "1", "--retr", "2", "--top-lines", "1"]
    code = main([*args, "--mix", "top,noop,list,capa,rset,uidl,retr,noop"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["mix"] == ["top", "noop", "list", "capa", "rset", "uidl", "retr", "noop"]
    assert report["sessions"] == 4 and report["sessions_failed"] == 0
    assert report["messages"] == 4 * 4
    assert report["bytes"] == 4 * (tops + retrs)
    with connect("127.0.0.1", port, tls=False, allow_insecure=True) as c:
        c.login("demo1", "demo")
        assert c.uidl() == before
    # TOP alone (no STAT first): the message count comes from STAT by itself.
    code = main([*args, "--mix", "top", "--top-lines", "0"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["messages"] == 4 * 2


@pytest.mark.parametrize(
    ("mix", "message"), [("stat,dele", "unknown step 'dele'"), ("retr,,", "unknown step ''")]
)
def test_bench_mix_usage_errors(
    mix: str, message: str, capsys: pytest.CaptureFixture[str], password: None
) -> None:
    assert main(["bench", "pop3://demo@127.0.0.1:110", "--mix", mix]) == 2
    assert message in capsys.readouterr().err


def test_bench_errors_by_phase_and_time_bound(
    demo: tuple[MemoryMaildrop, int],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    password: None,
) -> None:
    _, port = demo
    monkeypatch.setenv("POP3_PASSWORD", "wrong")
    code = main(
        [
            "bench",
            f"pop3://demo@127.0.0.1:{port}",
            "--json",
            "--sessions",
            "3",
            "--concurrency",
            "1",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["errors"]["login"] == 3 and report["sessions"] == 0
    assert report["error_samples"] and report["error_samples"][0].startswith("login:")
    monkeypatch.setenv("POP3_PASSWORD", "demo")
    started = time.monotonic()
    code = main(
        [
            "bench",
            f"pop3://demo@127.0.0.1:{port}",
            "--json",
            "--sessions",
            "1000000",
            "--duration",
            "0.5",
            "--concurrency",
            "1",
            "--pipelining",
            "off",
        ]
    )
    elapsed = time.monotonic() - started
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["pipelining"] is False
    assert 0 < report["sessions"] < 1000000
    assert elapsed < 5


def test_bench_refuses_remote_servers(capsys: pytest.CaptureFixture[str], password: None) -> None:
    assert main(["bench", "pop3://demo@192.0.2.1:110", "--duration", "1"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert main(["bench", "pop3://demo@127.0.0.1:110", "--concurrency", "0"]) == 2


def test_bench_subprocess(demo: tuple[MemoryMaildrop, int], tmp_path: Path) -> None:
    _, port = demo
    env = dict(os.environ, POP3_PASSWORD="demo", HOME=str(tmp_path))
    proc = run_module(
        "bench", f"pop3://demo@127.0.0.1:{port}", "--sessions", "5", "--concurrency", "1", env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert re.match(
        rf"bench 127\.0\.0\.1:{port}: 5 sessions in [\d.]+ s "
        r"\([\d.]+/s, [\d.]+ MB/s, 25 messages\)",
        proc.stdout,
    )


# ====================================================================== demo


def test_demo_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    started = time.monotonic()
    code = main(["demo", "--bench-seconds", "1", "--maildir", str(tmp_path / "kept")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert time.monotonic() - started < 10
    assert re.search(r"demo: serving the demo maildrop on pop3://127\.0\.0\.1:\d+", out)
    assert f"fetched {len(DEMO)} messages" in out
    assert re.search(r"demo: bench 127\.0\.0\.1:\d+: [1-9]\d* sessions", out)
    assert delivered(tmp_path / "kept") == [wire_form(m) for m in DEMO]


def test_demo_subprocess_is_quick() -> None:
    started = time.monotonic()
    proc = run_module("demo", timeout=30)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 10
    assert re.search(r"done in \d+\.\d s", proc.stdout)


def test_demo_messages_are_realistic() -> None:
    assert len(DEMO) >= 5
    for m in DEMO:
        assert b"\nMessage-ID: <" in m and m.startswith(b"Return-Path: <")
    assert any(b"\n.\n" in m for m in DEMO)  # needs dot-stuffing
    assert any(not m.endswith(b"\n") for m in DEMO)  # no final newline
    assert max(map(len, DEMO)) > 20000  # an attachment
    assert cli.demo_messages() == DEMO  # deterministic
    table = cli.demo_authenticator(1)
    assert isinstance(table, PasswordTable) and table.user_exists("demo1")


@pytest.mark.parametrize(
    ("url", "extra", "message"),
    [
        ("pop3s://demo@127.0.0.1:1", [], "--no-stls is for pop3:// URLs"),
        ("pop3://demo@192.0.2.1:1", [], "--no-stls needs --insecure"),
    ],
)
def test_fetch_no_stls_rules(
    url: str, extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = fetch(capsys, url, tmp_path / "Maildir", "--no-stls", *extra)
    assert code == 2
    assert message in err
