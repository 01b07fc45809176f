"""The ``pop3proto`` command line (also ``python -m pop3proto.bindings``).

Subcommands::

    pop3proto serve  [--listen HOST:PORT] [--tls-listen HOST:PORT] [--maildir ROOT]
                     [--users FILE] [--cert PEM --key PEM] ...
    pop3proto fetch  URL --maildir DIR [--keep] [--cafile PEM] ...
    pop3proto bench  URL [--sessions N] [--concurrency C] [--duration S] [--json] ...
    pop3proto passwd [--file FILE] USER
    pop3proto demo

Exit codes (every subcommand):

====  ==================================================================
0     success (``fetch``: every message was delivered)
1     partial or failed delivery, or another runtime failure
2     usage error (bad arguments, bad URL, unreadable configuration)
3     authentication failed
4     connection or TLS failure (could not connect, TLS refused or broken)
130   interrupted (SIGINT)
====  ==================================================================

``serve`` prints one line per listener on start, ``pop3proto: listening on
pop3://HOST:PORT`` (``pop3s://`` for implicit TLS), and exits 0 on SIGINT or
SIGTERM after closing every session without UPDATE (RFC 1939 §6). It runs
the asyncio server (on uvloop when importable; ``--sync`` picks the threaded
one).

TLS for ``fetch`` and ``bench``: ``pop3s://`` is implicit TLS; ``pop3://``
requires STLS unless ``--insecure``, except on loopback (127.0.0.0/8, ::1,
``localhost``), where STLS is used when offered and a plaintext login is
allowed otherwise (``fetch --no-stls`` skips STLS there, or anywhere with
``--insecure``). Certificates are always verified (``--cafile`` adds CAs).

Credentials for ``fetch`` and ``bench``: a password from ``--password-command``
(the first line a shell command prints), ``$POP3_PASSWORD``, ``~/.netrc`` or
a prompt; a bearer token for OAUTHBEARER or XOAUTH2 from ``--token-command``
or ``$POP3_TOKEN``; ``--cert`` (and ``--key``) present a TLS client
certificate, which ``;AUTH=EXTERNAL`` logs in with. See ``find_credentials``.

``fetch`` delivers in the order that loses nothing (HARDENING 56-58): write
``DIR/tmp/<unique>``, fsync, link into ``DIR/new/``, fsync ``DIR/new/``,
record the UID in the account's store (``bindings.uidstore``), and only after
every retrieval DELE and QUIT. A disk error stops it before any DELE.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    import ssl
    import subprocess

    from pop3proto import ServerConfig
    from pop3proto._auth import PasswordTable

    from ._sync_client import Client
    from .maildrop import MemoryMaildrop
    from .uidstore import UidStore

__all__ = [
    "DEFAULT_PORT",
    "DEMO_BENCH_ACCOUNTS",
    "DEMO_PASSWORD",
    "DEMO_USER",
    "EXIT_AUTH",
    "EXIT_CONNECT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "SECRET_COMMAND_LIMIT",
    "SECRET_COMMAND_TIMEOUT",
    "STREAM_THRESHOLD",
    "TOKEN_MECHANISMS",
    "BenchOptions",
    "Credentials",
    "FetchOptions",
    "FetchResult",
    "PopUrl",
    "UsageError",
    "bench_summary",
    "build_parser",
    "demo_authenticator",
    "demo_maildrop",
    "demo_messages",
    "find_credentials",
    "main",
    "parse_address",
    "parse_pop_url",
    "run_bench",
    "run_fetch",
    "run_secret_command",
    "set_password",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_CONNECT = 4
EXIT_INTERRUPTED = 130

#: ``serve``'s plaintext port when no ``--listen`` is given (unprivileged).
DEFAULT_PORT = 1110
#: The embedded demo maildrop's account.
DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
#: Extra demo accounts ``demo1`` … ``demo16`` (same mail, same password), so a
#: ``bench --spread 16`` can run 16 sessions at once without waiting for a
#: maildrop lock.
DEMO_BENCH_ACCOUNTS = 16

#: Messages whose LIST size is at least this are streamed to disk one at a
#: time instead of being held whole in a pipelined batch.
STREAM_THRESHOLD = 4 * 1024 * 1024

PROG = "pop3proto"


class UsageError(Exception):
    """Bad arguments, URL or configuration: exit code 2."""


class _Exit(Exception):
    """Leave a subcommand with an exit code and a message for stderr."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _err(text: str, stream: IO[str] | None = None) -> None:
    print(f"{PROG}: {text}", file=stream or sys.stderr, flush=True)


# ====================================================================== URLs


@dataclass(frozen=True)
class PopUrl:
    """A POP URL (RFC 2384), in its ``pop://``, ``pop3://`` or ``pop3s://``
    form. ``auth`` is None for "any mechanism" (no ``;AUTH=`` or
    ``;AUTH=*``), ``"+APOP"``, ``"+USER"`` (USER/PASS), or an upper-case SASL
    mechanism name. ``user`` is None when the URL names none."""

    scheme: str
    host: str
    port: int
    user: str | None = None
    auth: str | None = None

    @property
    def tls(self) -> bool:
        """Implicit TLS (``pop3s://``)."""
        return self.scheme == "pop3s"

    @property
    def mechanism(self) -> str | None:
        """The ``mechanism`` argument for ``Client.login``: None (strongest
        offered), ``"APOP"``, ``"USER"`` or a SASL name."""
        if self.auth is None:
            return None
        if self.auth.startswith("+"):
            return self.auth[1:]
        return self.auth

    @property
    def external(self) -> bool:
        """``;AUTH=EXTERNAL``: the login is a TLS client certificate's identity."""
        return self.auth == "EXTERNAL"

    def display(self) -> str:
        """The URL without escapes for messages (no password ever)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user is not None else ""
        return f"{self.scheme}://{user}{host}:{self.port}"


_SCHEMES = {"pop": 110, "pop3": 110, "pop3s": 995}
_SASL_NAME = re.compile(r"[A-Z0-9_-]{1,20}\Z")
_REG_NAME = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=%-]+\Z")
_URL_MAX = 2048


def _pct_decode(text: str, what: str) -> str:
    value = text
    if "%" in text:
        if re.search(r"%(?![0-9A-Fa-f]{2})", text):
            raise UsageError(f"bad %-escape in the URL's {what}")
        from urllib.parse import unquote_to_bytes

        try:
            value = unquote_to_bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"the URL's {what} is not UTF-8 once unescaped") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise UsageError(f"control characters in the URL's {what}")
    return value


def parse_pop_url(text: str) -> PopUrl:
    """Parse ``pop3://`` / ``pop3s://`` / ``pop://`` ``[user[;AUTH=mech]@]host[:port]``.

    User name and mechanism are %-decoded (UTF-8); ``;AUTH=*`` means any
    mechanism, ``;AUTH=+APOP`` APOP, ``;AUTH=+USER`` USER/PASS, anything else
    a SASL mechanism name. A password in the URL (``user:pw@``), a path,
    query or fragment, a bad port or host raise ``UsageError`` (RFC 2384
    allows no passwords in URLs)."""
    if len(text) > _URL_MAX:
        raise UsageError("the URL is too long")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise UsageError(f"not a POP URL (want pop3:// or pop3s://): {text!r}")
    if rest.endswith("/"):
        rest = rest[:-1]
    if any(c in rest for c in "/?#") or any(c.isspace() for c in rest):
        raise UsageError("a POP URL has no path, query, fragment or spaces")
    userinfo, at, hostport = rest.rpartition("@")
    user: str | None = None
    auth: str | None = None
    if at:
        enc_user, semi, params = userinfo.partition(";")
        if ":" in enc_user:
            raise UsageError("no passwords in POP URLs (RFC 2384); use $POP3_PASSWORD or ~/.netrc")
        if enc_user:
            user = _pct_decode(enc_user, "user name")
        if semi:
            key, eq, value = params.partition("=")
            if key.lower() != "auth" or not eq or not value:
                raise UsageError("the only URL parameter is ;AUTH=<mechanism>")
            mech = _pct_decode(value, "mechanism").upper()
            if mech == "*":
                auth = None
            elif mech in ("+APOP", "+USER"):
                auth = mech
            elif mech.startswith("+") or not _SASL_NAME.match(mech):
                raise UsageError(f"unknown authentication type in the URL: {mech!r}")
            else:
                auth = mech
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise UsageError("unclosed [ in the URL's host")
        host = hostport[1:end]
        tail = hostport[end + 1 :]
        if tail and not tail.startswith(":"):
            raise UsageError("junk after the URL's [host]")
        port_text = tail[1:] if tail else ""
        if not host or not re.fullmatch(r"[0-9A-Fa-f:.]+", host):
            raise UsageError("bad IPv6 address in the URL")
    else:
        host, colon, port_text = hostport.partition(":")
        if colon and not port_text:
            raise UsageError("empty port in the URL")
        if not host or not _REG_NAME.match(host):
            raise UsageError(f"bad host in the URL: {host!r}")
        host = _pct_decode(host, "host")
    port = _SCHEMES[scheme]
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or not 1 <= int(port_text) <= 65535:
            raise UsageError(f"bad port in the URL: {port_text!r}")
        port = int(port_text)
    return PopUrl("pop3" if scheme == "pop" else scheme, host.lower(), port, user, auth)


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT`` (127.0.0.1) as
    ``(host, port)``; port 0 means any free port. Raises ``UsageError``."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"bad address {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"bad address {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    host = host or "127.0.0.1"
    if port_text == "":
        return host, default_port
    if not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"bad port in {text!r}")
    return host, int(port_text)


def _url_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ====================================================================== credentials


def _is_loopback_literal(host: str) -> bool:
    """A loopback IP literal or ``localhost`` (no DNS lookup)."""
    from ._common import is_loopback

    return host == "localhost" or is_loopback(host)


def _resolves_to_loopback(host: str, port: int) -> bool:
    if _is_loopback_literal(host):
        return True
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    from ._common import is_loopback

    return bool(infos) and all(is_loopback(str(info[4][0])) for info in infos)


#: SASL mechanisms that log in with a bearer token (RFC 7628; Google's and
#: Microsoft's XOAUTH2) instead of a password.
TOKEN_MECHANISMS = frozenset({"OAUTHBEARER", "XOAUTH2"})
#: The most a ``--password-command`` or ``--token-command`` may print.
SECRET_COMMAND_LIMIT = 64 * 1024
#: Seconds a secret command may take (it may ask for a passphrase).
SECRET_COMMAND_TIMEOUT = 120.0


class Credentials(NamedTuple):
    """Who logs in, and with what: a ``password``, a bearer ``token`` for
    OAUTHBEARER / XOAUTH2, both (the token is used where the server offers
    those), or neither for EXTERNAL (a TLS client certificate)."""

    user: str
    password: str | None
    token: str | None = None


def find_credentials(
    url: PopUrl,
    *,
    environ: Mapping[str, str] | None = None,
    netrc_file: str | None = None,
    interactive: bool | None = None,
    password_command: str | None = None,
    token_command: str | None = None,
    client_cert: bool = False,
) -> Credentials:
    """The credentials for ``url``.

    The user is the URL's, else the login of ``~/.netrc``'s entry for the host.
    With ``;AUTH=OAUTHBEARER`` or ``;AUTH=XOAUTH2`` a bearer token is needed:
    the first line ``token_command`` prints, else ``$POP3_TOKEN``. Without
    ``;AUTH=`` such a token is used when one is given that way. Otherwise the
    password is the first line ``password_command`` prints, else
    ``$POP3_PASSWORD`` (also kept beside a ``$POP3_TOKEN`` for a server that
    offers no token mechanism), else ``~/.netrc`` (an entry for the host whose login
    matches the user, or names it), else a terminal prompt. Raises
    ``UsageError`` when a credential cannot be had (never prompts without a
    terminal, never echoes what a command printed). ``;AUTH=EXTERNAL`` needs
    neither: the TLS ``client_cert`` is the credential (the user then names
    only the local record of what was fetched)."""
    env = os.environ if environ is None else environ
    mechanism = url.mechanism
    if url.external:
        if not client_cert:
            raise UsageError("EXTERNAL logs in with a TLS client certificate: give --cert")
        if password_command is not None or token_command is not None:
            raise UsageError("EXTERNAL takes no password or token, only --cert")
    wants_token = mechanism in TOKEN_MECHANISMS
    if token_command is not None and not (mechanism is None or wants_token):
        raise UsageError(
            f"--token-command is for ;AUTH=OAUTHBEARER or ;AUTH=XOAUTH2, not ;AUTH={url.auth}"
        )
    if password_command is not None and wants_token:
        raise UsageError(f"{mechanism} logs in with a bearer token: use --token-command")
    token: str | None = None
    if mechanism is None or wants_token:
        if token_command is not None:
            token = run_secret_command(token_command, "--token-command")
        elif password_command is None:
            token = env.get("POP3_TOKEN") or None
    if wants_token and token is None:
        raise UsageError(f"{mechanism} needs a bearer token: set $POP3_TOKEN or --token-command")
    user = url.user
    password: str | None = None
    needs_password = token is None and not url.external
    if needs_password and password_command is not None:
        password = run_secret_command(password_command, "--password-command")
    elif needs_password:
        password = env.get("POP3_PASSWORD")
    if user is None or (needs_password and password is None):
        entry = _netrc_entry(url.host, netrc_file)
        if entry is not None:
            login, secret = entry
            if user is None and login:
                user = login
            if needs_password and password is None and secret and (not login or login == user):
                password = secret
    if user is None:
        raise UsageError("the URL names no user (pop3://USER@HOST) and ~/.netrc has none")
    if url.external:
        return Credentials(user, None)
    if token is not None:
        # Both from the environment and no ;AUTH=: the client takes the
        # token where the server offers OAUTHBEARER or XOAUTH2, else the password.
        ambient = mechanism is None and token_command is None
        beside = (env.get("POP3_PASSWORD") or None) if ambient else None
        return Credentials(user, beside, token)
    if password is None:
        tty = sys.stdin.isatty() if interactive is None else interactive
        if not tty:
            raise UsageError(
                f"no password for {user}@{url.host}: set $POP3_PASSWORD, use "
                "--password-command or add the host to ~/.netrc (standard input is not "
                "a terminal, so there is no prompt)"
            )
        import getpass

        password = getpass.getpass(f"Password for {user}@{url.host}: ")
    if not password:
        raise UsageError("empty password")
    return Credentials(user, password)


def run_secret_command(command: str, what: str = "the command") -> str:
    """The first line that the shell command ``command`` prints (a password
    or a token from a keyring, ``pass``, ``gpg`` or an OAuth helper).

    Its standard input and error stay the terminal's (it may ask for a
    passphrase). Raises ``UsageError``, naming it as ``what`` and never
    quoting its output, if it cannot start, fails, prints more than
    ``SECRET_COMMAND_LIMIT`` octets, takes longer than
    ``SECRET_COMMAND_TIMEOUT`` seconds, or prints no text (UTF-8) on its
    first line."""
    import subprocess

    try:
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
    except OSError as exc:
        raise UsageError(f"{what} could not start: {exc}") from None
    assert proc.stdout is not None
    try:
        out = _read_secret_output(proc, proc.stdout.fileno())
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.stdout.close()
        status = proc.wait()
    if out is None:
        raise UsageError(f"{what} took more than {SECRET_COMMAND_TIMEOUT:g} s")
    if len(out) > SECRET_COMMAND_LIMIT:
        raise UsageError(f"{what} printed more than {SECRET_COMMAND_LIMIT} octets")
    if status != 0:
        how = f"was stopped by signal {-status}" if status < 0 else f"exited with status {status}"
        raise UsageError(f"{what} {how}")
    first = out.split(b"\n", 1)[0].removesuffix(b"\r")
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} printed a first line that is not UTF-8") from None
    if not text:
        raise UsageError(f"{what} printed nothing on its first line")
    return text


def _read_secret_output(proc: subprocess.Popen[bytes], fd: int) -> bytes | None:
    """What ``proc`` prints, up to one octet past ``SECRET_COMMAND_LIMIT``
    (then it is killed); None, and killed, if it runs past
    ``SECRET_COMMAND_TIMEOUT``. Once it has exited, what is still in the pipe
    is read, but a background child that keeps the pipe open is not waited
    for (nor is one at the time limit)."""
    import selectors

    out = bytearray()
    deadline = time.monotonic() + SECRET_COMMAND_TIMEOUT
    exited_at: float | None = None
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None:
                wait = exited_at + 0.1 - now  # drain what it wrote before exiting
                if wait <= 0:
                    return bytes(out)
            elif now >= deadline:
                proc.kill()
                return None
            else:
                wait = min(deadline - now, 0.1)
            if not sel.select(wait):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return bytes(out)
            out += chunk
            if len(out) > SECRET_COMMAND_LIMIT:
                proc.kill()
                return bytes(out)


def _netrc_entry(host: str, path: str | None) -> tuple[str, str] | None:
    import netrc

    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o077:
        _err(f"warning: {path} is readable by other users; chmod 600 it")
    try:
        found = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError) as exc:
        _err(f"warning: ignoring {path}: {exc}")
        return None
    if found is None:
        return None
    login, _account, password = found
    return login or "", password or ""


# ====================================================================== demo mail


def _demo_attachment() -> str:
    # Deterministic pseudo-random bytes, base64 in 76-column lines.
    import base64
    import hashlib

    blob = b"".join(hashlib.sha256(b"pop3proto demo %d" % i).digest() for i in range(900))
    text = base64.b64encode(blob).decode("ascii")
    return "\n".join(text[i : i + 76] for i in range(0, len(text), 76))


def demo_messages() -> list[bytes]:
    """The embedded demo maildrop: a few realistic messages (plain text, a
    RFC 2047 header, a multipart with a ~28 KB attachment, HTML, and a body
    full of lines POP3 must dot-stuff), LF line ends as a Maildir stores
    them. Deterministic."""
    base = [
        (
            "Mon, 06 Jan 2025 09:12:44 +0000",
            "Alice Example <alice@example.org>",
            "Welcome to pop3proto",
            "text/plain; charset=us-ascii",
            "Hello,\n\nthis maildrop is served by pop3proto's demo server.\n"
            "Try: pop3proto fetch pop3://demo@127.0.0.1:1110 --maildir ./mail\n\n-- \nAlice\n",
        ),
        (
            "Tue, 07 Jan 2025 17:03:10 +0100",
            "=?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.net>",
            "=?UTF-8?B?R3LDvMOfZSBhdXMgTcO8bmNoZW4=?=",
            "text/plain; charset=utf-8",
            "Servus!\n\nDie Umlaute stehen im Kopf, RFC 2047 kodiert.\n",
        ),
        (
            "Wed, 08 Jan 2025 08:00:00 -0500",
            "Reports <reports@example.com>",
            "Quarterly figures (attachment)",
            'multipart/mixed; boundary="=_pop3proto_demo"',
            "This is a multi-part message in MIME format.\n\n--=_pop3proto_demo\n"
            "Content-Type: text/plain; charset=us-ascii\n\nThe figures are attached.\n\n"
            "--=_pop3proto_demo\nContent-Type: application/octet-stream; name=figures.bin\n"
            "Content-Transfer-Encoding: base64\n"
            "Content-Disposition: attachment; filename=figures.bin\n\n"
            + _demo_attachment()
            + "\n--=_pop3proto_demo--\n",
        ),
        (
            "Thu, 09 Jan 2025 12:30:00 +0000",
            "Newsletter <news@example.org>",
            "This week in POP3",
            "text/html; charset=us-ascii",
            "<html><body><h1>This week</h1>\n<p>RFC 1939 is still going strong.</p>\n"
            + "".join(f"<p>Item {i}: pipelining, UIDL, TOP.</p>\n" for i in range(1, 40))
            + "</body></html>\n",
        ),
        (
            "Fri, 10 Jan 2025 23:59:59 +0000",
            "Bob <bob@example.org>",
            "Lines that start with dots",
            "text/plain; charset=us-ascii",
            "These lines test dot-stuffing:\n.\n..\n...\n.hidden\n. \nthe end\n.",
        ),
    ]
    out = []
    for n, (date, sender, subject, ctype, body) in enumerate(base, 1):
        head = (
            f"Return-Path: <{sender.split('<')[-1].rstrip('>')}>\n"
            f"Date: {date}\nFrom: {sender}\nTo: Demo User <demo@pop3proto.invalid>\n"
            f"Subject: {subject}\nMessage-ID: <demo.{n}@pop3proto.invalid>\n"
            f"MIME-Version: 1.0\nContent-Type: {ctype}\n\n"
        )
        out.append((head + body).encode("utf-8"))
    return out


def demo_maildrop(accounts: int = DEMO_BENCH_ACCOUNTS) -> MemoryMaildrop:
    """A ``MemoryMaildrop`` with :func:`demo_messages` for ``demo`` and for
    ``demo1`` … ``demo<accounts>``."""
    from .maildrop import MemoryMaildrop

    messages = demo_messages()
    users = [DEMO_USER] + [f"{DEMO_USER}{i}" for i in range(1, accounts + 1)]
    return MemoryMaildrop({u: messages for u in users})


def demo_authenticator(accounts: int = DEMO_BENCH_ACCOUNTS) -> PasswordTable:
    """Password ``demo`` for every demo account."""
    from pop3proto._auth import PasswordTable

    users = [DEMO_USER] + [f"{DEMO_USER}{i}" for i in range(1, accounts + 1)]
    return PasswordTable(dict.fromkeys(users, DEMO_PASSWORD))


# ====================================================================== serve


def _loop_factory(use_uvloop: bool) -> tuple[Callable[[], Any], str]:
    import asyncio

    if use_uvloop:
        try:
            import importlib

            uvloop = importlib.import_module("uvloop")
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop, "asyncio+uvloop"
    return asyncio.new_event_loop, "asyncio"


def _aio_server_class() -> Any:
    try:
        from . import aio
    except ImportError:  # pragma: no cover - aio ships with the package
        return None
    return getattr(aio, "Server", None)


def _server_ssl_context(cert: str, key: str | None) -> ssl.SSLContext:
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the certificate/key: {exc}") from None
    return ctx


@dataclass
class _ServeSetup:
    maildrop: Any
    config: ServerConfig
    listen: tuple[str, int] | None
    tls_listen: tuple[str, int] | None
    ssl_context: ssl.SSLContext | None
    certificate: bytes | None
    demo: bool


def _serve_setup(args: argparse.Namespace) -> _ServeSetup:
    from pop3proto import ServerConfig
    from pop3proto._auth import CredentialFileError, FailureDelay
    from pop3proto._server import ConnectionLimiter

    from ._common import server_certificate_der
    from .maildrop import Maildir

    listen = parse_address(args.listen, DEFAULT_PORT) if args.listen else None
    tls_listen = parse_address(args.tls_listen, 995) if args.tls_listen else None
    if listen is None and tls_listen is None:
        listen = ("127.0.0.1", DEFAULT_PORT)
    if args.key and not args.cert:
        raise UsageError("--key needs --cert")
    ctx = _server_ssl_context(args.cert, args.key) if args.cert else None
    if tls_listen is not None and ctx is None:
        raise UsageError("--tls-listen needs --cert (and --key)")
    demo = args.maildir is None
    if demo:
        if args.users:
            raise UsageError("--users needs --maildir (the demo maildrop has its own users)")
        maildrop: Any = demo_maildrop()
        authenticator: Any = demo_authenticator()
    else:
        if not os.path.isdir(args.maildir):
            raise UsageError(f"--maildir {args.maildir}: not a directory")
        if not args.users:
            raise UsageError("--maildir needs --users FILE")
        from .credentials import CredentialFile

        try:
            authenticator = CredentialFile(args.users)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --users {args.users}: {exc}") from None
        except (CredentialFileError, ValueError) as exc:
            raise UsageError(f"--users {args.users}: {exc}") from None
        maildrop = Maildir(args.maildir)
    expire = None
    if args.expire is not None:
        value = args.expire.upper()
        if value != "NEVER" and not value.isdigit():
            raise UsageError("--expire takes a number of days or NEVER")
        expire = value
    extra: dict[str, Any] = {}
    if args.failure_delay is not None:
        extra["failure_delay"] = FailureDelay(
            base=args.failure_delay, maximum=max(15.0, args.failure_delay)
        )
    caps = {"per_address": args.max_per_address, "per_user": args.max_per_user}
    for key, value in caps.items():
        if value is not None and value < 1:
            raise UsageError(f"--max-{key.replace('_', '-')} must be at least 1")
    if any(value is not None for value in caps.values()):
        extra["limiter"] = ConnectionLimiter(
            **{key: value for key, value in caps.items() if value is not None}
        )
    for name in args.workaround:
        extra[_WORKAROUNDS[name]] = True
    config = ServerConfig(
        authenticator=authenticator,
        hostname=args.hostname or socket.gethostname() or "localhost",
        stls_available=ctx is not None,
        allow_plaintext=args.allow_plaintext,
        apop=args.apop,
        idle_timeout=args.idle_timeout,
        login_timeout=args.login_timeout,
        expire=expire,
        **extra,
    )
    cert_der = server_certificate_der(args.cert) if args.cert else None
    return _ServeSetup(maildrop, config, listen, tls_listen, ctx, cert_der, demo)


#: ``serve --workaround`` names (Dovecot's) and the ServerConfig switches.
_WORKAROUNDS = {"outlook-no-nuls": "outlook_no_nuls", "oe-ns-eoh": "oe_ns_eoh"}


def _bound(
    addresses: Iterable[tuple[str, int, bool]], tls: bool, wanted: tuple[str, int] | None
) -> tuple[str, int] | None:
    """The address a listener of kind ``tls`` was actually bound to."""
    if wanted is None:
        return None
    return next(((h, port) for h, port, t in addresses if t == tls), wanted)


def _listen_lines(addresses: Iterable[tuple[str, int, bool]]) -> list[str]:
    return [
        f"{PROG}: listening on {'pop3s' if tls else 'pop3'}://{_url_host(host, port)}"
        for host, port, tls in addresses
    ]


def _make_server(setup: _ServeSetup, kind: str, backlog: int, reuse_port: bool = False) -> Any:
    if kind == "sync":
        from ._sync_server import Server as SyncServer

        cls: Any = SyncServer
    else:
        cls = _aio_server_class()
    try:
        return cls(
            setup.maildrop,
            config=setup.config,
            listen=setup.listen,
            tls_listen=setup.tls_listen,
            ssl_context=setup.ssl_context,
            server_certificate=setup.certificate,
            backlog=backlog,
            reuse_port=reuse_port,
        )
    except OSError as exc:
        raise _Exit(EXIT_CONNECT, f"cannot listen: {exc.strerror or exc}") from None


def _run_async(coro_fn: Callable[[], Any], factory: Callable[[], Any]) -> Any:
    """Run ``coro_fn()`` to completion on a new loop made by ``factory``."""
    import asyncio

    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro_fn())
    loop = factory()  # pragma: no cover - Python 3.10
    try:  # pragma: no cover
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro_fn())
    finally:  # pragma: no cover
        asyncio.set_event_loop(None)
        loop.close()


def _serve_until_signal(
    server: Any, kind: str, factory: Callable[[], Any], ready: Callable[[], None]
) -> None:
    """Run ``server`` until SIGINT or SIGTERM, then close it."""
    import signal

    if kind == "sync":
        stop = threading.Event()
        previous = {
            sig: signal.signal(sig, lambda _s, _f: stop.set())
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            server.start()
            ready()
            while not stop.wait(3600):
                pass
        finally:
            server.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return

    async def body() -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        stop_event = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_event.set)
        try:
            await server.start()
            ready()
            await stop_event.wait()
        finally:
            await server.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    _run_async(body, factory)


def _run_workers(
    count: int, run_one: Callable[[], None], on_ready: Callable[[], None] = lambda: None
) -> int:
    """Pre-fork: ``count`` child processes each run ``run_one``; once the
    first ``count`` have called ``ready`` (see :func:`_worker_ready`),
    ``on_ready`` runs in the parent. The parent restarts a child that dies, and
    on SIGINT/SIGTERM stops them all (by pid) and returns."""
    import logging
    import signal

    log = logging.getLogger("pop3proto.server")
    children: dict[int, float] = {}
    stopping = threading.Event()
    ready_r, ready_w = os.pipe()

    def spawn() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                os.close(ready_r)
                _worker_ready.fd = ready_w
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                run_one()
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                os._exit(code)
        children[pid] = time.monotonic()

    def stop(_sig: int, _frame: object) -> None:
        stopping.set()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for _ in range(count):
            spawn()
        os.close(ready_w)
        # Every first-generation worker says it is serving (or dies: EOF).
        got = 0
        with contextlib.suppress(OSError):
            while got < count:
                chunk = os.read(ready_r, count - got)
                if not chunk:
                    break
                got += len(chunk)
        os.close(ready_r)
        on_ready()
        fast_deaths = 0
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            started = children.pop(pid, None)
            if started is None or stopping.is_set():
                continue
            log.warning("worker %d exited (status %d); starting another", pid, status)
            fast_deaths = fast_deaths + 1 if time.monotonic() - started < 1.0 else 0
            if fast_deaths > 5:
                log.error("workers keep dying at start; giving up")
                stop(0, None)
                return EXIT_FAILED
            spawn()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


class _WorkerReady:
    """A worker tells the parent it is serving (once; a no-op elsewhere)."""

    fd = -1

    def __call__(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, b"1")
                os.close(fd)


_worker_ready = _WorkerReady()


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    _setup_logging(args.log_level)
    log = logging.getLogger("pop3proto.server")
    setup = _serve_setup(args)
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.workers > 1 and setup.demo:
        raise UsageError("--workers needs --maildir (each worker would get its own demo maildrop)")
    kind = "sync" if args.sync or _aio_server_class() is None else "aio"
    factory, loop_name = _loop_factory(not args.no_uvloop)
    # Several workers: each gets its own listening socket on the same port
    # (SO_REUSEPORT: the kernel spreads connections evenly); without it they
    # share the parent's.
    reuse_port = args.workers > 1 and hasattr(socket, "SO_REUSEPORT")
    server = _make_server(setup, kind, args.backlog, reuse_port=reuse_port)
    engine = "threads" if kind == "sync" else loop_name
    log.info("pop3proto server starting (%s, %d worker(s))", engine, args.workers)

    def announce() -> None:
        for line in _listen_lines(server.addresses):
            print(line)
        if setup.demo:
            print(
                f"{PROG}: demo maildrop: user {DEMO_USER!r} password {DEMO_PASSWORD!r} "
                f"({len(demo_messages())} messages)"
            )
        sys.stdout.flush()

    if args.workers > 1:
        run_one: Callable[[], None] = lambda: _serve_until_signal(  # noqa: E731
            server, kind, factory, _worker_ready
        )
        started = announce
        if reuse_port:
            # The ports are known now (even for port 0): each worker binds its
            # own socket to them, and the parent's stops listening once they
            # all do, so that no connection waits where nobody accepts.
            pinned = dataclasses.replace(
                setup,
                listen=_bound(server.addresses, False, setup.listen),
                tls_listen=_bound(server.addresses, True, setup.tls_listen),
            )

            def run_own() -> None:
                for sock, _ in server._listeners:
                    sock.close()  # this process's copy only (no shutdown)
                own = _make_server(pinned, kind, args.backlog, reuse_port=True)
                _serve_until_signal(own, kind, factory, _worker_ready)

            def close_then_announce() -> None:
                server._close_listeners()
                announce()

            run_one, started = run_own, close_then_announce
        code = _run_workers(args.workers, run_one, started)
        with contextlib.suppress(Exception):
            if kind == "sync":
                server.close()
            else:  # never started here: closing releases the listeners
                _run_async(server.close, factory)
        log.info("pop3proto server stopped")
        return code
    _serve_until_signal(server, kind, factory, announce)
    log.info("pop3proto server stopped")
    return EXIT_OK


# ====================================================================== passwd


def _read_new_password(stdin: IO[str], interactive: bool) -> str:
    if not interactive:
        line = stdin.readline(64 * 1024 + 1)
        if len(line) > 64 * 1024:
            raise UsageError("password longer than 64 KiB")
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise UsageError("no password on standard input")
        return password
    import getpass

    first = getpass.getpass("New password: ")
    if not first:
        raise UsageError("empty password")
    if getpass.getpass("Retype new password: ") != first:
        raise UsageError("the passwords do not match")
    return first


def _atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` as temporary file, fsync, rename, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def set_password(path: str, user: str, password: str, *, iterations: int = 4096) -> bool:
    """Write or replace ``user``'s line in the credential file ``path`` with
    SCRAM-SHA-256 and SCRAM-SHA-1 verifiers of ``password`` (no plaintext is
    stored), atomically and with mode 0600. Other lines, comments included,
    are kept. Returns True when the user existed. Raises ``UsageError`` for an
    invalid user name or an existing file that does not parse."""
    from pop3proto._auth import (
        CredentialFileError,
        format_entry,
        make_scram_verifier,
        parse_file,
    )
    from pop3proto._sasl import SaslError, prepare_identity

    from .credentials import MAX_CREDENTIAL_FILE

    try:
        entry = format_entry(
            user,
            [
                make_scram_verifier(password, "SHA-256", iterations),
                make_scram_verifier(password, "SHA-1", iterations),
            ],
        )
        wanted = prepare_identity(user)
    except (CredentialFileError, SaslError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            old = fh.read(MAX_CREDENTIAL_FILE + 1)
    except FileNotFoundError:
        old = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if len(old) > MAX_CREDENTIAL_FILE:
        raise UsageError(f"{path} is larger than 16 MiB")
    try:
        parse_file(old)
    except CredentialFileError as exc:
        raise UsageError(f"{path}: {exc}; fix it first") from None
    lines = old.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    found = False
    for i, raw in enumerate(lines):
        line = raw.removesuffix("\r")
        if not line.strip() or line.startswith("#"):
            continue
        name = line.partition(":")[0]
        try:
            same = prepare_identity(name) == wanted
        except SaslError:
            same = False
        if same:
            lines[i] = entry
            found = True
            break
    if not found:
        lines.append(entry)
    text = "\n".join(lines) + "\n"
    parse_file(text)  # never write a file the server cannot read
    _atomic_write(path, text.encode("utf-8"))
    return found


def _cmd_passwd(args: argparse.Namespace) -> int:
    if args.iterations < 4096:
        raise UsageError("--iterations must be at least 4096")
    interactive = sys.stdin.isatty()
    password = _read_new_password(sys.stdin, interactive)
    try:
        existed = set_password(args.file, args.user, password, iterations=args.iterations)
    except OSError as exc:
        raise _Exit(EXIT_FAILED, f"cannot write {args.file}: {exc.strerror or exc}") from None
    verb = "updated" if existed else "added"
    _err(f"{verb} {args.user!r} in {args.file} (SCRAM-SHA-256, SCRAM-SHA-1)")
    return EXIT_OK


# ====================================================================== fetch


class _DiskError(Exception):
    """Writing to the Maildir or the UID store failed: stop, delete nothing."""


#: link() errors meaning "this file system has no hard links".
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
)

_name_lock = threading.Lock()
_name_counter = 0
#: (pid, "R<random>.<host>") for this process: computed once per process, as
#: the host name and the random part do not change between deliveries.
_name_tail: tuple[int, str] | None = None


def _maildir_name() -> str:
    """A Maildir unique name: seconds, microseconds, pid, counter, random, host."""
    global _name_counter, _name_tail
    pid = os.getpid()
    with _name_lock:
        _name_counter += 1
        n = _name_counter
        if _name_tail is None or _name_tail[0] != pid:  # computed anew after fork()
            host = socket.gethostname() or "localhost"
            host = host.replace("/", r"\057").replace(":", r"\072")
            # What secrets.token_hex(4) returns, without importing it.
            _name_tail = (pid, f"R{os.urandom(4).hex()}.{host}")
        tail = _name_tail[1]
    sec, usec = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{sec}.M{usec}P{pid}Q{n}{tail}"


class _Delivery:
    """Maildir delivery in the safe order: ``tmp/<unique>`` → write → fsync →
    link into ``new/`` → fsync ``new/`` → unlink the tmp name. Every tmp file
    it creates is removed on failure (and by :meth:`cleanup`).

    :meth:`deliver` does it all for one message; ``fetch`` instead writes
    each message (:meth:`begin`) and hands it to a :class:`_Syncer`, which
    does the rest in the background while the next messages arrive."""

    _DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

    def __init__(self, path: str, lf: bool) -> None:
        self.path = path
        self.lf = lf
        self._fds: dict[str, int] = {}
        self._pending: set[str] = set()
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            for sub in ("tmp", "new", "cur"):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.join(path, sub), 0o700)
            for sub in ("tmp", "new"):
                self._fds[sub] = os.open(os.path.join(path, sub), self._DIR | os.O_NOFOLLOW)
        except OSError as exc:
            self.close()
            raise UsageError(f"--maildir {path}: {exc.strerror or exc}") from None

    def begin(self, name: str | None = None) -> _TmpMessage:
        """Create ``tmp/<name>`` (a fresh unique name by default) for writing."""
        if name is None:
            name = _maildir_name()
        try:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self._fds["tmp"],
            )
        except OSError as exc:
            raise _DiskError(f"cannot create a file in {self.path}/tmp: {exc.strerror}") from exc
        self._pending.add(name)
        return _TmpMessage(self, name, fd)

    def deliver(self, data: bytes) -> str:
        msg = self.begin()
        try:
            msg.write(data)
            return msg.finish()
        except BaseException:
            msg.abort()
            raise

    def make_durable(self, batch: Sequence[_TmpMessage]) -> None:
        """fsync each written file and link it into ``new/``, then one fsync
        of ``new/`` for the whole batch, then drop the tmp names. On failure
        nothing of the batch stays in ``new/`` (so all of it is fetched
        again) and ``_DiskError`` is raised."""
        linked: list[_TmpMessage] = []
        try:
            for msg in batch:
                msg.sync_and_link()
                linked.append(msg)
            self.sync_new()
        except BaseException:
            for msg in linked:
                with contextlib.suppress(OSError):
                    os.unlink(msg.name, dir_fd=self._fds["new"])
            for msg in batch:
                msg.abort()
            raise
        for msg in batch:
            self._unlink_tmp(msg.name)

    def sync_new(self) -> None:
        try:
            os.fsync(self._fds["new"])
        except OSError as exc:
            raise _DiskError(f"fsync of {self.path}/new: {exc.strerror}") from exc

    def _unlink_tmp(self, name: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=self._fds["tmp"])
        self._pending.discard(name)

    def cleanup(self) -> None:
        """Remove every tmp file this delivery created and did not finish."""
        for name in list(self._pending):
            self._unlink_tmp(name)

    def close(self) -> None:
        self.cleanup()
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


class _TmpMessage:
    """One message being written to ``tmp/`` (file-like: ``write``)."""

    def __init__(self, delivery: _Delivery, name: str, fd: int) -> None:
        self.delivery = delivery
        self.name = name
        self.fd = fd
        self.size = 0
        self._cr = False  # a CR held back for LF conversion across chunks

    def _raw_write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise _DiskError(f"writing to {self.delivery.path}/tmp: {exc.strerror}") from exc

    def write(self, data: bytes) -> int:
        """Append ``data`` (the message as received) to the file."""
        self.size += len(data)
        if self.delivery.lf:
            if self._cr:
                data = b"\r" + data
                self._cr = False
            if data.endswith(b"\r"):
                data = data[:-1]
                self._cr = True
            data = data.replace(b"\r\n", b"\n")
        if data:
            self._raw_write(data)
        return len(data)

    def end(self) -> None:
        """The whole message is written (a held-back CR goes out now)."""
        if self._cr:
            self._cr = False
            self._raw_write(b"\r")

    def sync_and_link(self) -> None:
        """fsync and close the file, link it into ``new/`` (not yet durable
        there: see :meth:`_Delivery.sync_new`)."""
        d = self.delivery
        try:
            self.end()
            try:
                os.fsync(self.fd)
            except OSError as exc:
                raise _DiskError(f"fsync in {d.path}/tmp: {exc.strerror}") from exc
        finally:
            fd, self.fd = self.fd, -1
            if fd >= 0:
                os.close(fd)
        try:
            try:
                os.link(self.name, self.name, src_dir_fd=d._fds["tmp"], dst_dir_fd=d._fds["new"])
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                # A file system without hard links: rename is just as atomic.
                os.rename(self.name, self.name, src_dir_fd=d._fds["tmp"], dst_dir_fd=d._fds["new"])
        except OSError as exc:
            raise _DiskError(f"linking into {d.path}/new: {exc.strerror}") from exc

    def finish(self) -> str:
        """fsync, link into ``new/``, fsync ``new/``; returns the file name."""
        self.delivery.make_durable([self])
        return self.name

    def abort(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self.delivery._unlink_tmp(self.name)


class _Syncer:
    """Makes written messages durable in batches: each batch is fsynced file
    by file, linked into ``new/`` and covered by one fsync of ``new/``
    (:meth:`_Delivery.make_durable`). Batches run in the calling thread
    until one takes longer than :attr:`SLOW` (a real disk); from then on in a
    background thread, while the connection goes on receiving. :meth:`take` hands back the tokens of
    the messages now durable, in the order they were submitted. At most
    ``max_pending`` messages wait (bounded memory and open files); a disk
    error stops the syncer, is raised by the next call, and every message not
    yet durable is taken back out."""

    #: A batch taking longer than this (seconds) moves the work to the thread.
    SLOW = 0.002

    def __init__(self, delivery: _Delivery, max_pending: int = 64) -> None:
        self._delivery = delivery
        self._max = max_pending
        self._cv = threading.Condition()
        self._todo: list[tuple[int, _TmpMessage]] = []
        self._busy = 0
        self._done: list[int] = []
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._bytes = 0
        self._wake_count = 8
        self._wake_bytes = 1 << 20
        # Until a batch is seen to be slow, batches are made durable in the
        # calling thread: on a RAM disk or a fast SSD the thread would cost
        # more than it hides.
        self._inline: list[tuple[int, _TmpMessage]] | None = []

    def _sync_inline(self) -> None:
        assert self._inline is not None
        batch, self._inline = self._inline, []
        started = time.perf_counter()
        try:
            self._delivery.make_durable([msg for _, msg in batch])
        except BaseException as exc:
            self._error = exc
            self._inline = None
            raise
        self._done.extend(token for token, _ in batch)
        if time.perf_counter() - started > self.SLOW:
            self._inline = None  # from now on in the background

    def submit(self, token: int, msg: _TmpMessage) -> None:
        """Hand over a fully written message (``token`` identifies it)."""
        if self._inline is not None:
            self._inline.append((token, msg))
            if len(self._inline) >= self._wake_count or msg.size >= self._wake_bytes:
                self._sync_inline()
            return
        with self._cv:
            while self._error is None and len(self._todo) + self._busy >= self._max:
                self._cv.wait()
            if self._error is not None:
                msg.abort()
                raise self._error
            self._todo.append((token, msg))
            self._bytes += msg.size
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-fsync", daemon=True)
                self._thread.start()
            # Wake the thread for a batch, not for every message: each wake-up
            # costs two thread switches, more than an fsync on a RAM disk.
            if len(self._todo) >= self._wake_count or self._bytes >= self._wake_bytes:
                self._cv.notify_all()

    def take(self) -> list[int]:
        """The tokens made durable since the last call (never raises)."""
        with self._cv:
            done, self._done = self._done, []
        return done

    def flush(self) -> None:
        """Wait until every submitted message is durable; raises the disk
        error that stopped the syncer, if any."""
        if self._inline:
            self._sync_inline()
        with self._cv:
            self._cv.notify_all()
            while self._error is None and (self._todo or self._busy):
                self._cv.wait()
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        """Stop the thread; messages still waiting are taken back out."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cv:
            todo, self._todo = self._todo, []
        todo.extend(self._inline or ())
        self._inline = None
        for _, msg in todo:
            msg.abort()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._todo and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                batch, self._todo = self._todo, []
                self._busy = len(batch)
                self._bytes = 0
            try:
                self._delivery.make_durable([msg for _, msg in batch])
            except BaseException as exc:
                with self._cv:
                    self._error = exc
                    self._busy = 0
                    todo, self._todo = self._todo, []
                    self._cv.notify_all()
                for _, msg in todo:
                    msg.abort()
                return
            with self._cv:
                self._done.extend(token for token, _ in batch)
                self._busy = 0
                self._cv.notify_all()


@dataclass
class FetchOptions:
    """What ``pop3proto fetch`` was asked to do (see ``pop3proto fetch --help``)."""

    url: PopUrl
    maildir: str
    user: str
    #: None when ``token`` logs in instead
    password: str | None
    keep: bool = False
    cafile: str | None = None
    delete_after_days: float | None = None
    only_new: bool = True
    max_size: int | None = None
    insecure: bool = False
    window: int = 16
    lf: bool = False
    timeout: float = 60.0
    progress: bool = False
    #: On ``pop3://``, upgrade with STLS when offered. False logs in without
    #: TLS; ``_cmd_fetch`` allows that only on loopback or with ``insecure``.
    stls: bool = True
    #: A bearer token for OAUTHBEARER or XOAUTH2 (see ``find_credentials``).
    token: str | None = None
    #: A client certificate (chain file, key file or None) for TLS and EXTERNAL.
    client_cert: tuple[str, str | None] | None = None


@dataclass
class FetchResult:
    """What a fetch did. ``exit_code`` follows the module's table."""

    host: str
    listed: int = 0
    fetched: int = 0
    octets: int = 0
    deleted: int = 0
    failed: int = 0
    already: int = 0
    deletions_uncertain: bool = False
    #: Logged in (the counts mean something).
    connected: bool = False
    exit_code: int = EXIT_OK
    errors: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        """Messages left on the server."""
        return self.listed - self.deleted

    def summary(self) -> str:
        """``fetched N messages (X bytes) from HOST; deleted M; kept K``."""
        line = (
            f"fetched {self.fetched} message{'s' if self.fetched != 1 else ''} "
            f"({self.octets} bytes) from {self.host}; deleted {self.deleted}; kept {self.kept}"
        )
        if self.failed:
            line += f"; failed {self.failed}"
        if self.deletions_uncertain:
            line += " (deletions unconfirmed)"
        return line


def _client_ssl_context(
    cafile: str | None, client_cert: tuple[str, str | None] | None = None
) -> ssl.SSLContext:
    """Verifies the server (``cafile`` adds CAs); presents ``client_cert``
    (certificate chain, key file or None for a key inside it) when asked."""
    import ssl

    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--cafile {cafile}: {exc}") from None
    if client_cert is not None:
        try:
            ctx.load_cert_chain(*client_cert)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--cert {client_cert[0]}: {exc}") from None
    return ctx


def _open_client(
    url: PopUrl,
    *,
    cafile: str | None,
    insecure: bool,
    timeout: float,
    max_message_size: int | None = None,
    stls: bool = True,
    client_cert: tuple[str, str | None] | None = None,
) -> Client:
    """Connect for ``url``: implicit TLS for pop3s://; for pop3:// STLS is
    required unless ``insecure`` or the host is loopback, where STLS is used
    when offered (and ``stls``) and plaintext logins are allowed otherwise."""
    from pop3proto._limits import Limits

    from ._sync_client import connect

    limits = Limits(max_message_size=max_message_size) if max_message_size else None
    permissive = insecure or _is_loopback_literal(url.host)
    # Loading the system's CA store takes tens of milliseconds: only when TLS
    # is certain, or a --cafile is to be checked now; else at STLS.
    tls_now = url.tls or cafile or client_cert or not permissive
    ctx = _client_ssl_context(cafile, client_cert) if tls_now else None
    if url.tls:
        return connect(
            url.host, url.port, tls=True, ssl_context=ctx, timeout=timeout, limits=limits
        )
    if permissive:
        client = connect(
            url.host,
            url.port,
            tls=False,
            allow_insecure=True,
            ssl_context=ctx,
            timeout=timeout,
            limits=limits,
        )
        try:
            caps = client.capabilities() if stls else None
            if caps is not None and caps.stls:
                client.starttls(ctx if ctx is not None else _client_ssl_context(cafile))
        except BaseException:
            client.close()
            raise
        return client
    return connect(
        url.host,
        url.port,
        tls=False,
        starttls=True,
        ssl_context=ctx,
        timeout=timeout,
        limits=limits,
    )


def _connect_and_login(
    url: PopUrl,
    user: str,
    password: str | None,
    *,
    token: str | None = None,
    cafile: str | None,
    insecure: bool,
    timeout: float,
    max_message_size: int | None = None,
    stls: bool = True,
    client_cert: tuple[str, str | None] | None = None,
) -> Client:
    """Connected and logged in, or ``_Exit`` with code 4 (connect/TLS) or 3 (login).
    ``;AUTH=EXTERNAL`` logs in with ``client_cert``'s identity."""
    from pop3proto import Pop3Error, Pop3TLSError, ProtocolError

    where = _url_host(url.host, url.port)
    try:
        client = _open_client(
            url,
            cafile=cafile,
            insecure=insecure,
            timeout=timeout,
            max_message_size=max_message_size,
            stls=stls,
            client_cert=client_cert,
        )
    except Pop3TLSError as exc:
        hint = "" if url.tls or insecure else " (use pop3s://, or --insecure to allow plaintext)"
        raise _Exit(EXIT_CONNECT, f"TLS with {where} failed: {exc}{hint}") from None
    except (Pop3Error, ProtocolError, OSError) as exc:  # OSError: ssl.SSLError too
        raise _Exit(EXIT_CONNECT, f"cannot connect to {where}: {exc}") from None
    try:
        client.login(user, password, mechanism=url.mechanism, token=token, external=url.external)
    except Pop3TLSError as exc:
        client.close()
        raise _Exit(EXIT_AUTH, f"login refused without TLS: {exc} (--insecure allows it)") from None
    except (Pop3Error, ValueError) as exc:
        client.close()
        raise _Exit(EXIT_AUTH, f"login as {user!r} at {where} failed: {exc}") from None
    except (ProtocolError, OSError) as exc:
        client.close()
        raise _Exit(EXIT_CONNECT, f"connection to {where} failed during login: {exc}") from None
    return client


class _Progress:
    def __init__(self, enabled: bool, total: int, stream: IO[str]) -> None:
        self.enabled = enabled
        self.total = total
        self.stream = stream
        self.shown = False

    def update(self, done: int, octets: int) -> None:
        if self.enabled:
            self.stream.write(f"\r{PROG}: {done}/{self.total} messages, {octets / 1e6:.1f} MB  ")
            self.stream.flush()
            self.shown = True

    def end(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def run_fetch(opts: FetchOptions, *, stderr: IO[str] | None = None) -> FetchResult:
    """Download the maildrop at ``opts.url`` into the Maildir ``opts.maildir``.

    Per message: written to ``tmp/``, fsynced, linked into ``new/``, ``new/``
    fsynced, its UID recorded in the account's UID store (appended and
    fsynced); only then, after all retrievals, are messages deleted (DELE +
    QUIT) — unless ``keep`` (or ``delete_after_days``, which keeps messages
    that long after their delivery). Messages recorded by an earlier run are
    skipped (``only_new``) and deleted when their time has come. A message
    that fails (``-ERR``, broken body, size cap) is neither delivered nor
    deleted; a disk error stops the fetch without any DELE. Never raises for
    runtime failures: the result carries the exit code and the errors."""
    from pop3proto import Pop3Error, ProtocolError

    from .uidstore import UidStore, UidStoreError

    err = stderr or sys.stderr
    result = FetchResult(host=opts.url.host)
    url = opts.url
    delivery = _Delivery(opts.maildir, opts.lf)
    store: UidStore | None = None
    client: Client | None = None

    def fail(code: int, message: str) -> None:
        result.errors.append(message)
        _err(f"fetch: {message}", err)
        if result.exit_code == EXIT_OK or code == EXIT_FAILED:
            result.exit_code = code

    try:
        try:
            store = UidStore.for_maildir(opts.maildir, url.host, url.port, opts.user)
        except UidStoreError as exc:
            fail(EXIT_FAILED, str(exc))
            return result
        client = _connect_and_login(
            url,
            opts.user,
            opts.password,
            token=opts.token,
            cafile=opts.cafile,
            insecure=opts.insecure,
            timeout=opts.timeout,
            max_message_size=opts.max_size,
            stls=opts.stls,
            client_cert=opts.client_cert,
        )
        result.connected = True
        _fetch_session(client, store, delivery, opts, result, fail, err)
    except _Exit as exc:
        fail(exc.code, exc.message)
    except (Pop3Error, ProtocolError, OSError) as exc:
        fail(EXIT_FAILED, f"connection to {url.host} failed: {exc}")
    finally:
        if client is not None:
            client.close()
        delivery.close()
        if store is not None:
            store.close()
    return result


def _fetch_session(
    client: Client,
    store: UidStore,
    delivery: _Delivery,
    opts: FetchOptions,
    result: FetchResult,
    fail: Callable[[int, str], None],
    err: IO[str],
) -> None:
    from pop3proto import Pop3Error

    from .uidstore import UidStoreError

    keep_new = opts.keep or opts.delete_after_days is not None
    caps = client.capabilities()
    if opts.delete_after_days is not None and caps is not None:
        expire = caps.expire
        if expire is not None and expire[0] is not None and expire[0] < opts.delete_after_days:
            days = expire[0]
            _err(
                f"fetch: warning: the server expires messages after {days} day(s) "
                f"(EXPIRE), before --delete-after-days {opts.delete_after_days:g}",
                err,
            )
    sizes = client.list()
    result.listed = len(sizes)
    have_uidl = True
    try:
        uids: dict[int, str] = client.uidl()
    except Pop3Error as exc:
        if not client.session.usable:
            raise
        uids = {}
        have_uidl = False
        if keep_new:
            _err(f"fetch: warning: no UIDL ({exc}): every run will fetch every message", err)
    if uids:
        if set(uids) != set(sizes):
            fail(EXIT_FAILED, "UIDL and LIST disagree about the messages; nothing fetched")
            return
        if len(set(uids.values())) != len(uids):
            fail(EXIT_FAILED, "the server sent the same UID for two messages; nothing fetched")
            return
    now = time.time()

    def old_enough(uid: str) -> bool:
        if not keep_new:
            return True
        if opts.delete_after_days is None:
            return False
        when = store.delivered_at(uid)
        return when is not None and now - when >= opts.delete_after_days * 86400

    to_fetch: list[int] = []
    to_delete: list[int] = []
    for msg in sorted(sizes):
        uid = uids.get(msg)
        if uid is not None and uid in store:
            result.already += 1
            if opts.only_new:
                if old_enough(uid):
                    to_delete.append(msg)
                continue
        if opts.max_size is not None and sizes[msg] > opts.max_size:
            result.failed += 1
            _err(
                f"fetch: message {msg} is {sizes[msg]} octets, over --max-size: left on the server",
                err,
            )
            continue
        to_fetch.append(msg)

    progress = _Progress(opts.progress, len(to_fetch), err)
    delivered: list[int] = []
    disk_failed = False
    octets: dict[int, int] = {}

    def durable(msgs: list[int]) -> None:
        """These messages are durable in ``new/``: record their UIDs."""
        for msg in msgs:
            uid = uids.get(msg)
            if uid is not None:
                store.record(uid)
            delivered.append(msg)
            result.fetched += 1
            result.octets += octets.pop(msg, 0)
        if msgs:
            progress.update(result.fetched, result.octets)

    def intend(pairs: list[tuple[int, str]]) -> None:
        """Before delivering: note each (message, file name) in the store."""
        try:
            store.intend((uids[msg], name) for msg, name in pairs if msg in uids)
        except UidStoreError as exc:
            raise _DiskError(str(exc)) from exc

    syncer = _Syncer(delivery)
    try:
        finished = False
        try:
            _retrieve_all(
                client,
                to_fetch,
                sizes,
                opts.window,
                delivery,
                syncer,
                intend,
                durable,
                octets,
                result,
                err,
            )
            finished = True
        finally:
            # Whatever stopped the loop, what was written becomes durable and recorded.
            try:
                syncer.flush()
            finally:
                durable(syncer.take())
                syncer.close()
                if not finished:
                    with contextlib.suppress(UidStoreError, OSError):
                        store.commit()
        store.commit()  # every UID durable before any DELE
    except (_DiskError, UidStoreError) as exc:
        disk_failed = True
        with contextlib.suppress(UidStoreError, OSError):
            store.commit()  # keep what did arrive (its intents cover it anyway)
        fail(EXIT_FAILED, f"{exc}; stopped without deleting anything")
    finally:
        progress.end()
    if disk_failed or not client.session.usable:
        if not disk_failed:
            fail(EXIT_FAILED, "the connection broke; nothing was deleted this time")
        return
    if not keep_new:
        to_delete.extend(delivered)
    marked = _delete(client, sorted(to_delete), opts.window, err) if to_delete else []
    quit_ok = client.quit()
    if marked and not quit_ok:
        result.deletions_uncertain = True
        _err("fetch: warning: QUIT was not confirmed: the deletions may not have happened", err)
    elif quit_ok:
        result.deleted = len(marked)
    if have_uidl:
        gone = {uids[m] for m in marked} if quit_ok else set()
        try:
            store.prune(uid for uid in uids.values() if uid not in gone)
        except UidStoreError as exc:
            _err(f"fetch: warning: {exc}", err)
    if result.failed:
        fail(EXIT_FAILED, f"{result.failed} message(s) were not delivered (left on the server)")


def _retrieve_all(
    client: Client,
    msgs: list[int],
    sizes: dict[int, int],
    window: int,
    delivery: _Delivery,
    syncer: _Syncer,
    intend: Callable[[list[tuple[int, str]]], None],
    durable: Callable[[list[int]], None],
    octets: dict[int, int],
    result: FetchResult,
    err: IO[str],
) -> None:
    """Retrieve ``msgs`` in order, pipelined: runs of small messages held
    whole (``retrieve_many``), runs of large ones streamed straight into
    ``tmp/`` (``retrieve_many_into``). Before
    a run its file names go to the UID store as intents; each message, once
    written, goes to ``syncer`` to be made durable, and ``durable`` is told
    of those that are. A message answered ``-ERR`` counts as failed and the
    rest go on; a broken connection or a disk error ends the loop."""
    from pop3proto import Pop3Error

    def check_size(msg: int, size: int) -> None:
        listed = sizes.get(msg, -1)
        if size not in (listed, listed + 2):
            _err(f"fetch: warning: message {msg}: LIST said {listed} octets, RETR gave {size}", err)
        octets[msg] = size

    def hand_over(msg: int, tmp: _TmpMessage, size: int) -> None:
        """``tmp`` holds the whole message: on to be made durable."""
        check_size(msg, size)
        syncer.submit(msg, tmp)
        durable(syncer.take())

    def write(msg: int, data: bytes) -> None:
        tmp = delivery.begin(names[msg])
        try:
            tmp.write(data)
        except BaseException:
            tmp.abort()
            raise
        hand_over(msg, tmp, len(data))

    def skip(msg: int, exc: Pop3Error) -> None:
        """``msg`` was answered -ERR: counted and left on the server (a
        broken connection ends the loop instead)."""
        if not client.session.usable:
            raise exc
        result.failed += 1
        _err(f"fetch: message {msg} not retrieved: {exc}", err)

    def streamed(run: list[int], done: set[int]) -> None:
        """Large messages, pipelined, each streamed into its file in tmp/."""
        open_now: dict[int, _TmpMessage] = {}

        def open_file(msg: int) -> _TmpMessage:
            open_now[msg] = delivery.begin(names[msg])
            return open_now[msg]

        try:
            for msg, size in client.retrieve_many_into(run, open_file):
                hand_over(msg, open_now.pop(msg), size)
                done.add(msg)
        finally:
            for tmp in open_now.values():  # cut short: never delivered
                tmp.abort()

    def whole(run: list[int], done: set[int]) -> None:
        """Small messages, pipelined, each held whole and written at once."""
        for msg, data in client.retrieve_many(run, window):
            write(msg, data)
            done.add(msg)

    i = 0
    while i < len(msgs) and client.session.usable:
        big = sizes[msgs[i]] >= STREAM_THRESHOLD
        run: list[int] = []
        while i < len(msgs) and (sizes[msgs[i]] >= STREAM_THRESHOLD) == big:
            run.append(msgs[i])
            i += 1
        names = {msg: _maildir_name() for msg in run}
        intend(list(names.items()))
        done: set[int] = set()
        try:
            (streamed if big else whole)(run, done)
        except Pop3Error:
            if not client.session.usable:
                raise
            # Some RETR got -ERR: find out which, one at a time.
            for msg in run:
                if msg not in done:
                    try:
                        (streamed if big else whole)([msg], done)
                    except Pop3Error as exc:
                        skip(msg, exc)


def _delete(client: Client, msgs: list[int], window: int, err: IO[str]) -> list[int]:
    """Mark ``msgs`` deleted; returns those marked."""
    from pop3proto import Pop3Error

    try:
        client.delete_many(msgs, window)
        return msgs
    except Pop3Error:
        if not client.session.usable:
            raise
    # Which ones failed? Start over one at a time.
    client.reset()
    marked = []
    for msg in msgs:
        try:
            client.delete(msg)
            marked.append(msg)
        except Pop3Error as exc:
            if not client.session.usable:
                raise
            _err(f"fetch: warning: message {msg} could not be deleted: {exc}", err)
    return marked


def _cmd_fetch(args: argparse.Namespace) -> int:
    url = parse_pop_url(args.url)
    if args.window < 1 or args.window > 64:
        raise UsageError("--window must be 1..64")
    if args.delete_after_days is not None and args.delete_after_days < 0:
        raise UsageError("--delete-after-days must not be negative")
    if args.max_size is not None and args.max_size < 1:
        raise UsageError("--max-size must be positive")
    if args.no_stls and url.tls:
        raise UsageError("--no-stls is for pop3:// URLs (pop3s:// is TLS from the start)")
    if args.no_stls and not (args.insecure or _is_loopback_literal(url.host)):
        raise UsageError("--no-stls needs --insecure unless the server is on loopback")
    creds, client_cert = _login_from(url, args)
    opts = FetchOptions(
        url=url,
        maildir=args.maildir,
        user=creds.user,
        password=creds.password,
        token=creds.token,
        client_cert=client_cert,
        keep=args.keep,
        cafile=args.cafile,
        delete_after_days=args.delete_after_days,
        only_new=args.only_new,
        max_size=args.max_size,
        insecure=args.insecure,
        window=args.window,
        lf=args.lf,
        timeout=args.timeout,
        progress=sys.stderr.isatty() and not args.quiet,
        stls=not args.no_stls,
    )
    result = run_fetch(opts)
    if result.connected and (not args.quiet or result.exit_code != EXIT_OK):
        print(result.summary(), flush=True)
    return result.exit_code


# ====================================================================== bench


@dataclass
class BenchOptions:
    """A bounded load run: at most ``sessions`` sessions and ``duration``
    seconds, ``concurrency`` at a time; each session connects, logs in, runs
    the steps of ``mix`` in order, then QUIT. The steps (:data:`BENCH_STEPS`):
    ``stat``, ``list``, ``uidl``, ``capa``, ``noop``, ``rset`` (one command
    each), ``retr`` (RETR 1..``retr``, pipelined when ``pipelining`` and the
    server offers it) and ``top`` (TOP n ``top_lines`` for n in 1..``retr``);
    a step may repeat. Nothing is ever deleted. With ``spread`` N, worker
    *i* logs in as ``user`` + str(i % N + 1) (for servers that lock a
    maildrop per session, as ours does)."""

    url: PopUrl
    user: str
    #: None when ``token`` logs in instead
    password: str | None
    sessions: int = 1000
    concurrency: int = 8
    duration: float = 10.0
    retr: int = 5
    pipelining: bool = True
    window: int = 16
    cafile: str | None = None
    insecure: bool = False
    timeout: float = 10.0
    spread: int = 0
    mix: tuple[str, ...] = ("stat", "uidl", "retr")
    top_lines: int = 0
    #: A bearer token for OAUTHBEARER or XOAUTH2 (see ``find_credentials``).
    token: str | None = None
    #: A client certificate (chain file, key file or None) for TLS and EXTERNAL.
    client_cert: tuple[str, str | None] | None = None


#: The steps ``bench --mix`` knows, in the order of the report's error counts.
BENCH_STEPS = ("stat", "list", "uidl", "capa", "noop", "rset", "top", "retr")
_PHASES = ("connect", "login", *BENCH_STEPS, "quit")


def parse_mix(text: str) -> tuple[str, ...]:
    """``bench --mix``: comma-separated steps (:data:`BENCH_STEPS`)."""
    steps = tuple(step.strip().lower() for step in text.split(","))
    for step in steps:
        if step not in BENCH_STEPS:
            raise UsageError(f"--mix: unknown step {step!r}; steps are {', '.join(BENCH_STEPS)}")
    return steps


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return round(ordered[k] * 1000.0, 3)

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}


def run_bench(opts: BenchOptions, *, use_uvloop: bool = True) -> dict[str, Any]:
    """Run the load and return the report (the ``--json`` shape)::

        {"url", "server", "client", "concurrency", "mix", "retr", "pipelining",
         "duration_s", "sessions", "sessions_failed", "sessions_unfinished",
         "messages", "bytes", "sessions_per_s", "mb_per_s",
         "latency_ms": {"session": {"p50","p90","p99"}, "login": {...}},
         "errors": {"connect": n, "login": n, ...}, "error_samples": [str]}

    Sessions are tasks on one asyncio event loop (uvloop when importable)
    using the asyncio client. No session starts after ``duration`` seconds
    or once ``sessions`` have started; every command is bounded by
    ``timeout``, and sessions still running a few timeouts after the end
    are cancelled (counted as unfinished), so the run always ends by itself.
    Must not be called from a running event loop."""
    factory, loop_name = _loop_factory(use_uvloop)
    report: dict[str, Any] = _run_async(lambda: _bench(opts), factory)
    report["client"] = loop_name
    return report


async def _bench(opts: BenchOptions) -> dict[str, Any]:
    import asyncio

    from .aio import Client as AioClient
    from .aio import connect

    url = opts.url
    started = 0
    session_times: list[float] = []
    login_times: list[float] = []
    errors = dict.fromkeys(_PHASES, 0)
    samples: list[str] = []
    totals = {"messages": 0, "bytes": 0}
    tls_now = url.tls or opts.client_cert or not opts.insecure
    ctx = _client_ssl_context(opts.cafile, opts.client_cert) if tls_now else None
    loopback = _is_loopback_literal(url.host)
    begin = time.perf_counter()
    deadline = begin + opts.duration

    async def one_session(user: str) -> None:
        phase = "connect"
        t0 = time.perf_counter()
        client: AioClient | None = None
        try:
            if url.tls:
                client = await connect(
                    url.host, url.port, tls=True, ssl_context=ctx, timeout=opts.timeout
                )
            else:
                client = await connect(
                    url.host,
                    url.port,
                    tls=False,
                    starttls=not (opts.insecure or loopback),
                    allow_insecure=opts.insecure or loopback,
                    ssl_context=ctx,
                    timeout=opts.timeout,
                )
            phase = "login"
            await client.login(
                user,
                opts.password,
                mechanism=url.mechanism,
                token=opts.token,
                external=url.external,
            )
            t_login = time.perf_counter() - t0
            count: int | None = None
            got = octets = 0
            for phase in opts.mix:
                if phase == "stat":
                    count, _size = await client.stat()
                elif phase == "list":
                    count = len(await client.list())
                elif phase == "uidl":
                    await client.uidl()
                elif phase == "capa":
                    await client.capabilities(refresh=True)
                elif phase == "noop":
                    await client.noop()
                elif phase == "rset":
                    await client.reset()
                else:  # retr, top: messages 1..K of those there are
                    if count is None:
                        count, _size = await client.stat()
                    wanted = range(1, min(opts.retr, count) + 1)
                    if phase == "top":
                        for msg in wanted:
                            octets += len(await client.top(msg, opts.top_lines))
                            got += 1
                    elif opts.pipelining:
                        async for _msg, data in client.retrieve_many(wanted, opts.window):
                            got += 1
                            octets += len(data)
                    else:
                        for msg in wanted:
                            octets += len(await client.retrieve(msg))
                            got += 1
            phase = "quit"
            await client.quit()
            session_times.append(time.perf_counter() - t0)
            login_times.append(t_login)
            totals["messages"] += got
            totals["bytes"] += octets
        except Exception as exc:
            errors[phase] += 1
            text = f"{phase}: {type(exc).__name__}: {exc}"
            if len(samples) < 5 and text not in samples:
                samples.append(text)
        finally:
            if client is not None:
                client.close()

    async def worker(index: int) -> None:
        nonlocal started
        user = f"{opts.user}{index % opts.spread + 1}" if opts.spread else opts.user
        while started < opts.sessions and time.perf_counter() < deadline:
            started += 1
            await one_session(user)

    tasks = [asyncio.ensure_future(worker(i)) for i in range(opts.concurrency)]
    # Every command is bounded by the timeout: a session in flight at the
    # deadline ends within a few timeouts, or is cancelled.
    hard_stop = deadline + 4 * opts.timeout + 1.0
    _done, pending = await asyncio.wait(tasks, timeout=max(0.0, hard_stop - time.perf_counter()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - begin
    ok = len(session_times)
    return {
        "url": url.display(),
        "server": _url_host(url.host, url.port),
        "client": "asyncio",
        "concurrency": opts.concurrency,
        "mix": list(opts.mix),
        "retr": opts.retr,
        "pipelining": opts.pipelining,
        "duration_s": round(elapsed, 3),
        "sessions": ok,
        "sessions_failed": sum(errors.values()),
        "sessions_unfinished": len(pending),
        "messages": totals["messages"],
        "bytes": totals["bytes"],
        "sessions_per_s": round(ok / elapsed, 2) if elapsed > 0 else 0.0,
        "mb_per_s": round(totals["bytes"] / elapsed / 1e6, 3) if elapsed > 0 else 0.0,
        "latency_ms": {
            "session": _percentiles(session_times),
            "login": _percentiles(login_times),
        },
        "errors": dict(errors),
        "error_samples": list(samples),
    }


def bench_summary(report: dict[str, Any]) -> str:
    """One line: sessions/s, MB/s, latency percentiles, errors."""
    s = report["latency_ms"]["session"]
    lg = report["latency_ms"]["login"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    return (
        f"bench {report['server']}: {report['sessions']} sessions in {report['duration_s']:.1f} s "
        f"({report['sessions_per_s']:.1f}/s, {report['mb_per_s']:.2f} MB/s, "
        f"{report['messages']} messages); session p50/p90/p99 "
        f"{ms(s['p50'])}/{ms(s['p90'])}/{ms(s['p99'])} ms; login p50/p90/p99 "
        f"{ms(lg['p50'])}/{ms(lg['p90'])}/{ms(lg['p99'])} ms; errors {report['sessions_failed']}"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    url = parse_pop_url(args.url)
    if not 1 <= args.concurrency <= 1024:
        raise UsageError("--concurrency must be 1..1024")
    if args.sessions < 1:
        raise UsageError("--sessions must be positive")
    if not 0 < args.duration <= 3600:
        raise UsageError("--duration must be in (0, 3600] seconds")
    if args.retr < 0:
        raise UsageError("--retr must not be negative")
    if args.spread < 0:
        raise UsageError("--spread must not be negative")
    if args.top_lines < 0:
        raise UsageError("--top-lines must not be negative")
    if not args.allow_remote and not _resolves_to_loopback(url.host, url.port):
        raise UsageError(
            f"{url.host} is not a loopback address: pass --allow-remote to load a remote server"
        )
    creds, client_cert = _login_from(url, args)
    opts = BenchOptions(
        url=url,
        user=creds.user,
        password=creds.password,
        token=creds.token,
        client_cert=client_cert,
        sessions=args.sessions,
        concurrency=args.concurrency,
        duration=args.duration,
        retr=args.retr,
        pipelining=args.pipelining == "on",
        window=args.window,
        cafile=args.cafile,
        insecure=args.insecure,
        timeout=args.timeout,
        spread=args.spread,
        mix=parse_mix(args.mix),
        top_lines=args.top_lines,
    )
    report = run_bench(opts, use_uvloop=not args.no_uvloop)
    if args.json:
        print(json.dumps(report, indent=1), flush=True)
    else:
        print(bench_summary(report), flush=True)
        for sample in report["error_samples"]:
            _err(f"bench: {sample}")
    if any("IN-USE" in sample for sample in report["error_samples"]):
        _err(
            "bench: hint: the server locks a maildrop per session; use --spread N with "
            f"accounts {creds.user}1..{creds.user}N (the demo server has {DEMO_BENCH_ACCOUNTS})"
        )
    if report["sessions"] == 0:
        return EXIT_CONNECT if report["errors"]["connect"] else EXIT_FAILED
    return EXIT_OK if report["sessions_failed"] == 0 else EXIT_FAILED


# ====================================================================== demo


class _BackgroundServer:
    """A server running in this process on 127.0.0.1:0 (the asyncio one on
    its own thread when available, else the threaded one)."""

    def __init__(self, maildrop: Any, config: ServerConfig, use_uvloop: bool = True) -> None:
        self.kind = "sync" if _aio_server_class() is None else "aio"
        self._loop: Any = None
        self._thread: threading.Thread | None = None
        if self.kind == "sync":
            from ._sync_server import Server as SyncServer

            self.server: Any = SyncServer(maildrop, config=config, listen=("127.0.0.1", 0))
            self.server.start()
            self.engine = "threads"
            return
        import asyncio

        factory, self.engine = _loop_factory(use_uvloop)
        self.server = _aio_server_class()(maildrop, config=config, listen=("127.0.0.1", 0))
        self._loop = factory()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="pop3proto-demo-server")
        self._thread.start()
        ready.wait(10)
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)

    @property
    def port(self) -> int:
        return int(self.server.addresses[0][1])

    def close(self) -> None:
        if self.kind == "sync":
            self.server.close()
            return
        import asyncio

        try:
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop.close()


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from pop3proto import ServerConfig
    from pop3proto._auth import FailureDelay

    t0 = time.perf_counter()
    config = ServerConfig(authenticator=demo_authenticator(), failure_delay=FailureDelay(base=0.0))
    server = _BackgroundServer(demo_maildrop(), config, use_uvloop=not args.no_uvloop)
    try:
        port = server.port
        print(f"demo: serving the demo maildrop on pop3://127.0.0.1:{port} ({server.engine})")
        url = PopUrl("pop3", "127.0.0.1", port, DEMO_USER)
        with contextlib.ExitStack() as stack:
            target = args.maildir or stack.enter_context(
                tempfile.TemporaryDirectory(prefix="pop3proto-demo-")
            )
            opts = FetchOptions(
                url=url,
                maildir=os.path.join(target, "Maildir") if not args.maildir else target,
                user=DEMO_USER,
                password=DEMO_PASSWORD,
                timeout=10.0,
            )
            result = run_fetch(opts)
            files = sorted(os.listdir(os.path.join(opts.maildir, "new")))
            print(f"demo: fetch: {result.summary()}")
            where = os.path.join(opts.maildir, "new") + ("" if args.maildir else " (temporary)")
            print(f"demo: {len(files)} message files in {where}")
            if result.exit_code != EXIT_OK or len(files) < len(demo_messages()):
                _err("demo: the fetch did not deliver every message")
                return EXIT_FAILED
            # The fetch emptied "demo"; the bench loads demo1..demoN in parallel.
            bench = BenchOptions(
                url=url,
                user=DEMO_USER,
                password=DEMO_PASSWORD,
                sessions=100_000,
                concurrency=4,
                duration=args.bench_seconds,
                retr=len(demo_messages()),
                timeout=5.0,
                spread=DEMO_BENCH_ACCOUNTS,
            )
            report = run_bench(bench, use_uvloop=not args.no_uvloop)
            print(f"demo: {bench_summary(report)}")
            for sample in report["error_samples"]:
                _err(f"demo: bench: {sample}")
            if report["sessions"] == 0:  # a few errors on a loaded machine are not a failure
                return EXIT_FAILED
    finally:
        server.close()
    print(f"demo: done in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK


# ====================================================================== main


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: argparse asks it for every
    argument it adds, and importing shutil (with bz2 and lzma) is a
    noticeable share of a short command's start-up."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized to the terminal without shutil."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_columns() - 2)


class _Parser(argparse.ArgumentParser):
    """An argument parser with that formatter; its subcommands' parsers are
    of the same class, so they have it too."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kw)


def _parser_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run a POP3 server",
        description="Run a POP3 server. "
        "Without --maildir it serves an embedded demo maildrop "
        f"(user {DEMO_USER!r}, password {DEMO_PASSWORD!r}) on "
        f"127.0.0.1:{DEFAULT_PORT}.",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="plaintext (+STLS) listener "
        f"(default 127.0.0.1:{DEFAULT_PORT} when no --tls-listen; port 0 = any)",
    )
    p.add_argument("--tls-listen", metavar="HOST:PORT", help="implicit-TLS listener (needs --cert)")
    p.add_argument("--maildir", metavar="ROOT", help="serve ROOT/<user>/{cur,new,tmp}")
    p.add_argument("--users", metavar="FILE", help='"user:secret" lines (see "passwd")')
    p.add_argument("--cert", metavar="PEM", help="certificate chain (enables STLS)")
    p.add_argument("--key", metavar="PEM", help="private key (default: in --cert)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the listeners (pre-fork; needs --maildir)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=600.0,
        metavar="S",
        help="drop sessions idle this long after login (default 600)",
    )
    p.add_argument(
        "--login-timeout",
        type=_positive_float,
        default=180.0,
        metavar="S",
        help="time allowed from connect to login (default 180)",
    )
    p.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="allow USER/PASS, PLAIN, LOGIN without TLS on any address (loopback always may)",
    )
    p.add_argument("--apop", action="store_true", help="offer APOP (needs plaintext secrets)")
    p.add_argument("--expire", metavar="DAYS|NEVER", help="advertise EXPIRE")
    p.add_argument(
        "--failure-delay",
        type=float,
        metavar="S",
        help="delay after a failed login (default 2 s, doubling)",
    )
    p.add_argument("--hostname", help="name in APOP timestamps (default: this host)")
    p.add_argument(
        "--workaround",
        action="append",
        default=[],
        choices=sorted(_WORKAROUNDS),
        help="a client workaround, as Dovecot's pop3_client_workarounds (repeatable): "
        "outlook-no-nuls sends NUL octets as 0x80, oe-ns-eoh adds a missing header end",
    )
    p.add_argument(
        "--max-per-address",
        type=int,
        metavar="N",
        help="sessions at once from one client address, per worker (default 50)",
    )
    p.add_argument(
        "--max-per-user",
        type=int,
        metavar="N",
        help="sessions at once of one user, per worker (default 10)",
    )
    p.add_argument("--backlog", type=int, default=1024, help="listen backlog (default 1024)")
    p.add_argument("--sync", action="store_true", help="use the threaded blocking server")
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio even if uvloop exists")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default info",
    )
    p.set_defaults(func=_cmd_serve)


def _login_from(
    url: PopUrl, args: argparse.Namespace
) -> tuple[Credentials, tuple[str, str | None] | None]:
    """``fetch``'s and ``bench``'s login options: the credentials and the
    client certificate (chain file, key file or None), if any."""
    if args.key and not args.cert:
        raise UsageError("--key needs --cert")
    client_cert = (args.cert, args.key) if args.cert else None
    creds = find_credentials(
        url,
        password_command=args.password_command,
        token_command=args.token_command,
        client_cert=client_cert is not None,
    )
    return creds, client_cert


def _add_secret_arguments(p: Any) -> None:
    p.add_argument(
        "--password-command",
        metavar="CMD",
        help="run CMD (a shell command) and use the first line it prints as the password",
    )
    p.add_argument(
        "--token-command",
        metavar="CMD",
        help="run CMD and use the first line it prints as an OAuth bearer token "
        "(OAUTHBEARER or XOAUTH2)",
    )
    p.add_argument(
        "--cert",
        metavar="PEM",
        help="TLS client certificate chain (;auth=EXTERNAL logs in with its identity)",
    )
    p.add_argument("--key", metavar="PEM", help="its private key (default: in --cert)")


def _parser_fetch(sub: Any) -> None:
    p = sub.add_parser(
        "fetch",
        help="download a maildrop into a Maildir, safely",
        description="Download messages into a Maildir: each message is on disk "
        "and fsynced, and its UID recorded, before it is deleted on the server. "
        "Password from --password-command, $POP3_PASSWORD, ~/.netrc or a prompt; "
        "a bearer token (;auth=OAUTHBEARER or XOAUTH2) from --token-command or "
        "$POP3_TOKEN; ;auth=EXTERNAL logs in with a TLS client certificate (--cert). "
        "Exit 0 only if every message was delivered.",
    )
    p.add_argument("url", metavar="URL", help="pop3[s]://user[;auth=MECH]@host[:port]")
    p.add_argument("--maildir", required=True, metavar="DIR", help="destination Maildir")
    p.add_argument("--keep", action="store_true", help="leave messages on the server")
    p.add_argument(
        "--delete-after-days",
        type=float,
        metavar="N",
        help="keep messages on the server, delete them N days after delivery",
    )
    p.add_argument(
        "--only-new",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip messages already delivered (by UID; default on)",
    )
    p.add_argument(
        "--max-size",
        type=int,
        metavar="OCTETS",
        help="do not deliver messages larger than this (they stay on the server)",
    )
    p.add_argument("--cafile", metavar="PEM", help="trust these CA certificates")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext logins when the server offers no TLS",
    )
    p.add_argument(
        "--no-stls",
        action="store_true",
        help="on pop3://, log in without TLS even if STLS is offered "
        "(loopback, or with --insecure)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=16,
        metavar="N",
        help="pipelined RETRs outstanding (default 16)",
    )
    p.add_argument(
        "--lf",
        action="store_true",
        help="store LF line ends (default: the bytes exactly as received)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="per-command timeout (default 60)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no summary unless something failed")
    _add_secret_arguments(p)
    p.set_defaults(func=_cmd_fetch)


def _parser_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test a POP3 server (loopback unless --allow-remote)",
        description="Concurrent sessions of connect, login, a mix of commands (by default "
        "STAT, UIDL, RETR 1..K), QUIT; reports sessions/s, MB/s and latency percentiles. "
        "Never deletes anything.",
    )
    p.add_argument("url", metavar="URL", help="pop3[s]://user[;auth=MECH]@host[:port]")
    p.add_argument(
        "--sessions",
        type=int,
        default=1000,
        metavar="N",
        help="stop after N sessions (default 1000)",
    )
    p.add_argument(
        "--concurrency", type=int, default=8, metavar="C", help="sessions at once (default 8)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="S",
        help="stop after S seconds (default 10)",
    )
    p.add_argument(
        "--mix",
        default=",".join(BenchOptions.mix),
        metavar="STEPS",
        help="what each session does after login, in order, then QUIT: comma-separated "
        f"steps of {', '.join(BENCH_STEPS)}; a step may repeat (default %(default)s)",
    )
    p.add_argument(
        "--retr",
        type=int,
        default=5,
        metavar="K",
        help="messages 1..K for the retr and top steps (default 5)",
    )
    p.add_argument(
        "--top-lines",
        type=int,
        default=0,
        metavar="N",
        help="body lines the top step asks for (default 0: headers only)",
    )
    p.add_argument(
        "--pipelining",
        choices=["on", "off"],
        default="on",
        help="pipelined RETRs when offered (default on)",
    )
    p.add_argument("--window", type=int, default=16, metavar="N", help="pipelining window")
    p.add_argument(
        "--spread",
        type=int,
        default=0,
        metavar="N",
        help="log in as USER1..USERN (per worker) for servers that lock a maildrop",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--cafile", metavar="PEM", help="trust these CA certificates")
    p.add_argument("--insecure", action="store_true", help="allow plaintext logins")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="per-command timeout (default 10)",
    )
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback server")
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio even if uvloop exists")
    _add_secret_arguments(p)
    p.set_defaults(func=_cmd_bench)


def _parser_passwd(sub: Any) -> None:
    p = sub.add_parser(
        "passwd",
        help="set a user's password in a credential file",
        description="Write USER's line with SCRAM-SHA-256 and SCRAM-SHA-1 "
        "verifiers (no plaintext). The password is read from standard input "
        "when it is not a terminal, else prompted for twice.",
    )
    p.add_argument("user", metavar="USER")
    p.add_argument(
        "--file",
        default="pop3proto-users",
        metavar="FILE",
        help="credential file (default ./pop3proto-users)",
    )
    p.add_argument("--iterations", type=int, default=4096, help="PBKDF2 iterations (>= 4096)")
    p.set_defaults(func=_cmd_passwd)


def _parser_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="serve, fetch and bench in-process in a few seconds",
    )
    p.add_argument("--maildir", metavar="DIR", help="keep the fetched mail in DIR")
    p.add_argument(
        "--bench-seconds",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="length of the bench (default 2)",
    )
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio even if uvloop exists")
    p.set_defaults(func=_cmd_demo)


_SUBCOMMANDS = {
    "serve": _parser_serve,
    "fetch": _parser_fetch,
    "bench": _parser_bench,
    "passwd": _parser_passwd,
    "demo": _parser_demo,
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser for every subcommand (``only``: for that one alone,
    which is all a run of it needs and spares building the others)."""
    from pop3proto import __version__

    parser = _Parser(
        prog=PROG,
        description="POP3 server, fetcher and load generator built on the pop3proto engine.",
        epilog="Exit codes: 0 ok, 1 partial/failed, 2 usage, 3 auth failed, "
        "4 connection/TLS failed.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    for name, add in _SUBCOMMANDS.items():
        if only is None or name == only:
            add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (never calls ``sys.exit``)."""
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((w for w in words if not w.startswith("-")), None)
    only = command if command in _SUBCOMMANDS else None
    if command is None and "--version" in words and not {"-h", "--help"} & set(words):
        only = ""  # the top-level parser alone answers --version
    parser = build_parser(only)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code: int = args.func(args)
        return code
    except UsageError as exc:
        _err(f"{args.command}: {exc}")
        return EXIT_USAGE
    except _Exit as exc:
        if exc.message:
            _err(f"{args.command}: {exc.message}")
        return exc.code
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stderr.close()
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
