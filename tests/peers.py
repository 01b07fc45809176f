"""Real POP3 peers on loopback for the test suite.

* :class:`DovecotServer`, :func:`running_dovecot` and the session-scoped
  ``dovecot`` fixture: a private Dovecot 2.3 POP3 server on 127.0.0.1
  (plaintext + STLS port and implicit-TLS port, both ephemeral) with its whole
  configuration and state in one directory, stopped by its pid.
* :func:`generate_message`, :func:`fill_maildir` and :class:`Manifest`: a
  deterministic test-mail generator whose messages exercise POP3's edge cases,
  and the record of what a client must get back for each message.
* :func:`run_curl`, :func:`run_curl_retr`, :func:`run_mpop`,
  :func:`run_fetchmail`: drive real POP3 clients against *any* POP3 server
  (Dovecot here, the project's own server elsewhere).
* :func:`normalise_delivered`: turn what mpop/fetchmail delivered back into
  the exact bytes the server sent, so it can be compared with a manifest.

Missing third-party programs make the calling test skip with a reason that
names the Debian package; under ``CI=true`` they fail the test instead, because
``.ci/run`` installs them and a silent skip there would hide a broken install.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import email.utils
import grp
import hashlib
import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = [
    "CLIENT_RECEIVED_MARKERS",
    "DOVECOT_MECHANISMS",
    "DeliveredMessage",
    "DovecotServer",
    "Manifest",
    "MessageInfo",
    "PeerError",
    "dovecot",
    "fill_maildir",
    "free_port",
    "generate_message",
    "normalise_delivered",
    "require_program",
    "run_curl",
    "run_curl_retr",
    "run_fetchmail",
    "run_mpop",
    "running_dovecot",
    "wire_form",
]

LOOPBACK = "127.0.0.1"

#: SASL mechanisms the Dovecot fixture offers (APOP is offered in the greeting).
DOVECOT_MECHANISMS: tuple[str, ...] = (
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
)

_PACKAGES = {
    "dovecot": "dovecot-core dovecot-pop3d",
    "curl": "curl",
    "mpop": "mpop",
    "fetchmail": "fetchmail",
    "openssl": "openssl",
}


class PeerError(RuntimeError):
    """A real peer (server or client program) failed; the message carries its output."""


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(what: str) -> None:
    """Skip the calling test (fail it under CI) because *what* is missing."""
    if _in_ci():
        pytest.fail(f"{what} (CI=true: .ci/run should have installed it)", pytrace=False)
    pytest.skip(what)


def require_program(name: str) -> str:
    """Return the path of the program *name*; skip the test (fail under CI) if it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is None:
        pkg = _PACKAGES.get(name, name)
        _unavailable(f"{name} is not installed (Debian: apt-get install {pkg})")
        raise AssertionError("unreachable")  # pragma: no cover
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (ask the kernel for one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------------
# Test mail
# ---------------------------------------------------------------------------

_BASE_TIME = 1_700_000_000

_WORD_TEXT = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
    "zulu mailbox maildrop octet greeting banner capability pipeline retrieve listing "
    "unique identifier session transaction update authorization mechanism challenge "
    "response timestamp digest message header body line terminator stuffing client "
    "server socket buffer engine event state reply command argument parameter limit "
    "queue spool folder archive quota deliver forward reply notice report summary "
    "north south east west river valley mountain forest meadow harbour island bridge"
)
_WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())

# More body lines that POP3 must dot-stuff (besides ".", ".." and "...").
_DOT_LINES: tuple[bytes, ...] = (
    b". a line that starts with a dot and a space",
    b".starts-with-a-dot",
    b"..starts with two dots",
    b".\ttab after the dot",
    b".dot line with trailing spaces   ",
)

_UTF8_LINES: tuple[str, ...] = (
    "Grüße aus Köln: Ärger, Öl und Übermut; façade, naïve, coöperate.",
    "Ελληνικά: καλημέρα κόσμε — русский: съешь ещё этих булок.",
    "日本語のメール、中文邮件、한국어 메일 — \U0001f4ec \U0001f4e8 \u2709",
)

# Raw ISO-8859-1 bytes: invalid as UTF-8, must pass through untouched.
_LATIN1_LINES: tuple[bytes, ...] = (
    b"Latin-1, not UTF-8: Gr\xfc\xdfe, caf\xe9, \xbfQu\xe9 tal?, \xa3 5, \xe0 bient\xf4t \xff",
    b"\xe9\xe8\xea\xeb at the start, and a lone \xa0 no-break space",
)


def _words_line(rng: random.Random, lo: int = 30, hi: int = 76) -> bytes:
    target = rng.randint(lo, hi)
    out: list[str] = []
    length = 0
    while length < target:
        w = rng.choice(_WORDS)
        out.append(w)
        length += len(w) + 1
    return " ".join(out).encode("ascii")


def _exact_line(rng: random.Random, n: int, first: bytes = b"") -> bytes:
    """A line of exactly *n* octets (no terminator)."""
    line = bytearray(first)
    while len(line) < n:
        line += rng.choice(_WORDS).encode("ascii") + b" "
    del line[n:]
    if line.endswith(b" "):  # keep trailing whitespace out of the long lines
        line[-1:] = b"x"
    return bytes(line)


def generate_message(user: str, number: int, size: int, seed: int = 0) -> bytes:
    """Return test message *number* for *user*, as stored in a Maildir (LF line ends).

    Deterministic in (user, number, size, seed).  The result is about *size*
    octets (never less than the few hundred octets the edge cases need), has
    no NUL and no CR octet (so LF and CRLF forms convert losslessly), and
    covers, by message number:

    * every message: lines ``.``, ``..``, ``...``, lines starting with ``.``,
      empty lines, a UTF-8 line; even numbers a raw Latin-1 line; a 998-octet
      line when *size* >= 1500 or *number* % 7 == 0, every 3rd of those starting
      with ``.`` (999 octets once stuffed);
    * *number* % 4 == 0, or *size* >= 256 KiB: multipart/mixed with a base64
      attachment;
    * *number* % 10 == 0: last line is ``.`` with no final newline;
      *number* % 10 == 5: last line ``..end`` with no final newline;
      *number* % 10 == 7: no final newline after an ordinary line;
      *number* % 10 == 3: last line is ``.`` followed by a newline;
      otherwise an ordinary last line and a final newline.
    """
    if number < 1 or size < 0:
        raise ValueError("number must be >= 1 and size >= 0")
    rng = random.Random(f"pop3proto-testmail:{seed}:{user}:{number}:{size}")
    multipart = number % 4 == 0 or size >= 256 * 1024
    when = email.utils.formatdate(_BASE_TIME + number * 61, usegmt=True)
    subject = (
        f"=?UTF-8?B?{base64.b64encode(f'Grüße #{number}'.encode()).decode()}?="
        if number % 3 == 0
        else f"Test message {number} for {user}"
    )
    boundary = f"=_pop3proto_{number:06d}_{rng.getrandbits(32):08x}"
    headers = [
        f"Return-Path: <sender{number % 13}@example.org>",
        f"Received: from mx{number % 3}.example.org (mx{number % 3}.example.org "
        f"[192.0.2.{number % 250 + 1}])",
        f"\tby pop3.example.test with ESMTPS id {rng.getrandbits(40):010X}",
        f"\tfor <{user}@example.test>; {when}",
        f"Message-ID: <{number}.{seed}.{rng.getrandbits(48):012x}@pop3proto.example.test>",
        f"Date: {when}",
        f'From: "Sender {number % 13}" <sender{number % 13}@example.org>',
        f"To: {user}@example.test",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
        f"X-Test-Message: {number}; size={size}; seed={seed}",
    ]
    if multipart:
        headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    else:
        headers.append("Content-Type: text/plain; charset=utf-8")
        headers.append("Content-Transfer-Encoding: 8bit")
    head = [h.encode("utf-8") for h in headers]

    text: list[bytes] = [f"Hello {user},".encode(), b"", _words_line(rng)]
    rot = [_DOT_LINES[(number + k) % len(_DOT_LINES)] for k in range(3)]
    text += [b"..", rot[0], b"...", rot[1], b".", rot[2], b""]
    text.append(b"")
    text.append(_UTF8_LINES[number % len(_UTF8_LINES)].encode("utf-8"))
    if number % 2 == 0:
        text.append(_LATIN1_LINES[(number // 2) % len(_LATIN1_LINES)])
    text.append(b"")
    if size >= 1500 or number % 7 == 0:
        text.append(_exact_line(rng, 998, b"." if number % 3 == 0 else b""))
        text.append(b"")

    def used(lines: list[bytes]) -> int:
        return sum(len(x) + 1 for x in lines)

    tail = _tail(number)
    budget = size - used(head) - 1 - used(text) - used(tail)
    text_budget = min(max(budget // 8, 0), 16 * 1024) if multipart else budget
    filled = 0
    run = 0
    while filled < text_budget:
        line = _words_line(rng)
        if rng.random() < 0.02:
            line = b"." + line
        text.append(line)
        filled += len(line) + 1
        run += 1
        if run >= rng.randint(3, 9):
            text.append(b"")
            filled += 1
            run = 0

    lines = [*head, b""]
    if multipart:
        mark = b"--" + boundary.encode("ascii")
        lines += [b"This is a multi-part message in MIME format.", b"", mark]
        lines += [b"Content-Type: text/plain; charset=utf-8"]
        lines += [b"Content-Transfer-Encoding: 8bit", b""]
        lines += text
        lines += [b"", mark]
        lines += [f'Content-Type: application/octet-stream; name="data{number}.bin"'.encode()]
        lines += [b"Content-Transfer-Encoding: base64"]
        lines += [f'Content-Disposition: attachment; filename="data{number}.bin"'.encode(), b""]
        closing = [mark + b"--", b""]
        # base64 in 76-column lines: 57 raw octets take 77 octets with the LF
        left = size - used(lines) - used(closing) - used(tail)
        enc = base64.b64encode(rng.randbytes(max(left * 57 // 77, 57)))
        lines += [enc[i : i + 76] for i in range(0, len(enc), 76)]
        lines += closing
    else:
        lines += text
    lines += tail
    data = b"\n".join(lines)
    if number % 10 not in (0, 5, 7):
        data += b"\n"
    return data


def _tail(number: int) -> list[bytes]:
    end = number % 10
    if end == 0:
        return [b"-- ", b"Sender", b"."]
    if end == 5:
        return [b"-- ", b"Sender", b"..end"]
    if end == 3:
        return [b"-- ", b"Sender", b"."]
    return [b"-- ", b"Sender", b"Last ordinary line"]


def wire_form(stored: bytes) -> bytes:
    """Return what a POP3 client must hand back for a stored (LF) message.

    That is the CRLF form after dot-unstuffing, with CRLF appended when the
    stored message lacks a final newline (the server must add one before the
    terminating ``.`` line).
    """
    crlf = stored.replace(b"\n", b"\r\n")
    return crlf if crlf.endswith(b"\r\n") else crlf + b"\r\n"


@dataclass(frozen=True)
class MessageInfo:
    """What a POP3 client must see for one message.

    ``size`` is the octet count of the stored message with every LF as CRLF
    (what Dovecot reports in LIST/STAT; no CRLF added for a missing final
    newline); ``sha256`` is the hex SHA-256 of :func:`wire_form` (what RETR
    must yield after dot-unstuffing); ``returned_size`` is that form's length;
    ``filename`` is the Maildir file name as written (Dovecot renames the file
    when it sets flags).
    """

    number: int
    size: int
    returned_size: int
    sha256: str
    final_newline: bool
    filename: str


@dataclass(frozen=True)
class Manifest:
    """The messages :func:`fill_maildir` wrote, keyed by POP3 message number (1-based).

    :meth:`expected` regenerates a message's exact expected bytes, so large
    mailboxes need not be held in memory.
    """

    user: str
    size: int
    seed: int
    messages: Mapping[int, MessageInfo] = field(repr=False)

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Iterator[MessageInfo]:
        return iter(self.messages[n] for n in sorted(self.messages))

    def __getitem__(self, number: int) -> MessageInfo:
        return self.messages[number]

    @property
    def total_size(self) -> int:
        """Sum of ``size`` over all messages (what STAT reports)."""
        return sum(m.size for m in self.messages.values())

    def stored(self, number: int) -> bytes:
        """The message as written to the Maildir (LF line ends)."""
        if number not in self.messages:
            raise KeyError(number)
        return generate_message(self.user, number, self.size, self.seed)

    def expected(self, number: int) -> bytes:
        """The exact bytes a client must return for message *number* (see :func:`wire_form`)."""
        return wire_form(self.stored(number))

    def matches(self, number: int, data: bytes) -> bool:
        """True if *data* is exactly what message *number* must be retrieved as."""
        info = self.messages.get(number)
        return (
            info is not None
            and len(data) == info.returned_size
            and hashlib.sha256(data).hexdigest() == info.sha256
        )

    def to_json(self) -> str:
        """The manifest as JSON (``messages`` is a list ordered by number)."""
        return json.dumps(
            {
                "user": self.user,
                "size": self.size,
                "seed": self.seed,
                "count": len(self),
                "total_size": self.total_size,
                "messages": [dataclasses.asdict(m) for m in self],
            },
            indent=1,
        )


def fill_maildir(
    maildir: Path,
    user: str,
    count: int,
    size: int,
    seed: int = 0,
    owner: tuple[int, int] | None = None,
) -> Manifest:
    """Replace the contents of *maildir* with *count* generated messages of about *size* octets.

    Removes existing messages and Dovecot's index/uidlist files so that POP3
    message *i* is generated message *i*.  Files are named with Dovecot's
    ``,S=`` and ``,W=`` size fields, in ascending order.  With *owner*
    (uid, gid) everything written is chowned to it.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    maildir.mkdir(parents=True, exist_ok=True)
    for sub in ("cur", "new", "tmp"):
        shutil.rmtree(maildir / sub, ignore_errors=True)
    for p in maildir.iterdir():
        if p.name.startswith("dovecot") or p.name in ("maildirfolder", "subscriptions"):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir()
    infos: dict[int, MessageInfo] = {}
    for n in range(1, count + 1):
        data = generate_message(user, n, size, seed)
        vsize = len(data) + data.count(b"\n")
        name = f"{_BASE_TIME + n}.M{n:06d}P{seed % 100000}.pop3proto,S={len(data)},W={vsize}:2,"
        tmp = maildir / "tmp" / name
        tmp.write_bytes(data)
        os.utime(tmp, (_BASE_TIME + n, _BASE_TIME + n))
        tmp.rename(maildir / "cur" / name)
        back = wire_form(data)
        infos[n] = MessageInfo(
            number=n,
            size=vsize,
            returned_size=len(back),
            sha256=hashlib.sha256(back).hexdigest(),
            final_newline=data.endswith(b"\n"),
            filename=name,
        )
    if owner is not None:
        uid, gid = owner
        os.chown(maildir, uid, gid)
        for root, dirs, files in os.walk(maildir):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, gid)
    return Manifest(user=user, size=size, seed=seed, messages=infos)


# ---------------------------------------------------------------------------
# Dovecot
# ---------------------------------------------------------------------------

_DOVECOT_LIBEXEC = Path("/usr/lib/dovecot")


def _make_certs(ssl_dir: Path) -> tuple[Path, Path, Path]:
    """Write ``ca.pem``, and ``cert.pem``/``key.pem`` for localhost/127.0.0.1 signed by it.

    Returns (cafile, certfile, keyfile).  Uses ``trustme`` when installed,
    otherwise the openssl CLI (self-signed: the certificate is its own CA).
    """
    ssl_dir.mkdir(parents=True, exist_ok=True)
    cafile, certfile, keyfile = ssl_dir / "ca.pem", ssl_dir / "cert.pem", ssl_dir / "key.pem"
    try:
        import trustme
    except ImportError:
        openssl = require_program("openssl")
        cmd = [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-sha256",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(keyfile),
            "-out",
            str(certfile),
        ]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace")
            raise PeerError(f"openssl req failed: {msg}") from None
        shutil.copyfile(certfile, cafile)
    else:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
        ca.cert_pem.write_to_path(str(cafile))
        leaf.private_key_pem.write_to_path(str(keyfile))
        with certfile.open("wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
    keyfile.chmod(0o600)
    return cafile, certfile, keyfile


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class DovecotServer:
    """A private Dovecot POP3 server on 127.0.0.1, configured and stopped by this object.

    Everything lives under ``base``: ``dovecot.conf``, ``passwd.d/USER``
    (``{PLAIN}`` passwords, so USER/PASS, APOP and every mechanism in
    :data:`DOVECOT_MECHANISMS` work), ``ssl/`` (``cafile`` verifies the
    server's certificate for ``localhost`` and ``127.0.0.1``), ``mail/USER``
    (Maildirs), ``dovecot.log``.  ``port`` serves plaintext POP3 with STLS,
    ``tls_port`` implicit TLS.  Plaintext auth is allowed, failed logins are
    not delayed, and one user may hold 1000 sessions at once.

    As root the mail belongs to the ``dovecot`` system user (Dovecot refuses
    mail access as uid 0) and login processes run chrooted as ``dovenull``;
    as another user everything runs as that user.

    ``login_mode`` is ``"secure"`` (Dovecot's defaults: a new ``pop3-login``
    process per connection and a new ``pop3`` process per session) or
    ``"perf"`` (Dovecot's "high-performance" mode: long-lived login processes,
    ``service_count = 0`` with ``process_min_avail`` = CPU count, and reused
    ``pop3`` processes, with limits raised for 1000 concurrent sessions).
    """

    base: Path
    #: the default user, created at :meth:`start`
    user: str = "alice"
    password: str = "secret"
    #: every user and their password
    users: dict[str, str] = field(default_factory=dict)
    #: ``"secure"`` (Dovecot's defaults) or ``"perf"`` (high-performance login)
    login_mode: str = "secure"
    #: When set, OAUTHBEARER and XOAUTH2 are offered too, their bearer tokens
    #: checked by POSTing them to this RFC 7662 introspection URL (which must
    #: answer ``{"active": true, "username": USER}`` for a valid token).
    oauth2_introspection_url: str = ""
    #: When set, EXTERNAL is offered too: a client certificate signed by this
    #: CA (PEM) logs in as its commonName (no CRL is required).
    client_ca: Path | None = None
    host: str = field(default=LOOPBACK, init=False)
    #: plaintext POP3 with STLS; 0 until :meth:`start`
    port: int = field(default=0, init=False)
    #: implicit TLS (pop3s); 0 until :meth:`start`
    tls_port: int = field(default=0, init=False)
    _run_dir: Path | None = field(default=None, init=False, repr=False)
    _tmp_run: bool = field(default=False, init=False, repr=False)
    _manifests: dict[str, Manifest] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base = Path(self.base).resolve()
        if self.login_mode not in ("secure", "perf"):
            raise ValueError(f"login_mode must be 'secure' or 'perf', not {self.login_mode!r}")

    # -- paths -------------------------------------------------------------
    @property
    def cafile(self) -> Path:
        """PEM file with the CA that signed the server certificate (for clients to verify)."""
        return self.base / "ssl" / "ca.pem"

    @property
    def certfile(self) -> Path:
        """The server's certificate chain (PEM), valid for ``localhost`` and ``127.0.0.1``."""
        return self.base / "ssl" / "cert.pem"

    @property
    def keyfile(self) -> Path:
        return self.base / "ssl" / "key.pem"

    @property
    def config_file(self) -> Path:
        return self.base / "dovecot.conf"

    @property
    def passwd_dir(self) -> Path:
        """One passwd-file per user (``passwd.d/USER``, ``{PLAIN}`` passwords)."""
        return self.base / "passwd.d"

    @property
    def log_file(self) -> Path:
        return self.base / "dovecot.log"

    @property
    def run_dir(self) -> Path:
        """Dovecot's ``base_dir`` (sockets and the pid file)."""
        if self._run_dir is None:
            run = self.base / "run"
            # Unix socket paths are limited to 107 octets; the longest Dovecot
            # creates here is about 30 octets below base_dir.
            if len(os.fsencode(run)) > 70:
                run = Path(tempfile.mkdtemp(prefix="pop3dc-"))
                self._tmp_run = True
            self._run_dir = run
        return self._run_dir

    @property
    def pid_file(self) -> Path:
        """Dovecot master's pid file."""
        return self.run_dir / "master.pid"

    @property
    def pid(self) -> int | None:
        """The master's pid if it is running with this instance's config, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        if os.fsencode(self.config_file) not in cmdline.split(b"\0"):
            return None  # the pid was reused by something else
        return pid

    def maildir(self, user: str) -> Path:
        """The Maildir of *user*."""
        return self.base / "mail" / user

    def manifest(self, user: str) -> Manifest:
        """The manifest of the last :meth:`fill` of *user*."""
        return self._manifests[user]

    # -- identities ---------------------------------------------------------
    @property
    def _root(self) -> bool:
        return os.geteuid() == 0

    def _mail_owner(self) -> tuple[int, int]:
        if self._root:
            try:
                pw = pwd.getpwnam("dovecot")
            except KeyError:
                _unavailable("the 'dovecot' system user is missing (install dovecot-core)")
                raise
            return pw.pw_uid, pw.pw_gid
        return os.getuid(), os.getgid()

    # -- users and mail -----------------------------------------------------
    def add_user(self, name: str, password: str = "secret") -> None:
        """Create user *name*, or change their password; effective for the next login.

        *name* is 1-64 of ``A-Z a-z 0-9 . _ + @ -``, not starting with ``.``;
        *password* is printable ASCII without ``:``.  Raises ValueError otherwise.
        Changing a password may take up to a second: Dovecot rereads a
        passwd-file at most once a second.
        """
        if not re.fullmatch(r"[A-Za-z0-9_+@-][A-Za-z0-9._+@-]{0,63}", name):
            raise ValueError(f"unusable user name: {name!r}")
        if not re.fullmatch(r"[\x20-\x7e]*", password) or ":" in password:
            raise ValueError(f"unusable password for {name!r}")
        changed = name in self.users and self.users[name] != password
        self.users[name] = password
        self._write_passwd(name, changed)
        maildir = self.maildir(name)
        if not maildir.exists():
            fill_maildir(maildir, name, 0, 0, owner=self._mail_owner())

    def fill(self, user: str, count: int, size: int, seed: int = 0) -> Manifest:
        """Replace *user*'s mailbox with *count* messages of about *size* octets.

        Adds *user* (password ``secret``) if unknown.  POP3 message *i* is
        generated message *i*; the returned manifest says what each must be
        retrieved as.  A copy is written to ``mail/USER.manifest.json``.
        Do not call it while a session of *user* is open.
        """
        if user not in self.users:
            self.add_user(user)
        manifest = fill_maildir(
            self.maildir(user), user, count, size, seed, owner=self._mail_owner()
        )
        (self.base / "mail" / f"{user}.manifest.json").write_text(manifest.to_json())
        self._manifests[user] = manifest
        return manifest

    def _write_passwd(self, name: str, changed: bool) -> None:
        # A file per user: Dovecot stats a passwd-file at most once a second and
        # rereads it only if its mtime or size changed, but a path it has not
        # seen (a new user) is read at once.
        self.passwd_dir.mkdir(exist_ok=True)
        path = self.passwd_dir / name
        tmp = path.with_name(f".{name}.new")
        tmp.write_text(f"{name}:{{PLAIN}}{self.users[name]}::::::\n")
        tmp.chmod(0o644)
        if changed:
            old = path.stat().st_mtime_ns
            os.utime(tmp, ns=(old - 10**9, old - 10**9))  # surely a different mtime
        tmp.replace(path)
        if changed and self.pid is not None:
            time.sleep(1.05 - time.time() % 1)  # past any lookup made this second

    # -- lifecycle ------------------------------------------------------------
    def _config(self) -> str:
        uid, gid = self._mail_owner()
        if self._root:
            internal_user, internal_group, login_user, chroot = (
                "dovecot",
                "dovecot",
                "dovenull",
                "login",
            )
        else:
            me = pwd.getpwuid(os.getuid()).pw_name
            internal_user = login_user = me
            try:
                internal_group = grp.getgrgid(os.getgid()).gr_name
            except KeyError:
                internal_group = str(os.getgid())
            chroot = ""
        b = self.base
        login_extra = pop3_extra = anvil_extra = oauth2_passdb = ""
        mechanisms = [m.lower() for m in DOVECOT_MECHANISMS] + ["apop"]
        if self.oauth2_introspection_url:
            oauth2_conf = b / "oauth2.conf.ext"
            oauth2_conf.write_text(
                "introspection_mode = post\n"
                f"introspection_url = {self.oauth2_introspection_url}\n"
                "username_attribute = username\n"
                "active_attribute = active\n"
                "active_value = true\n"
            )
            oauth2_conf.chmod(0o644)
            mechanisms += ["oauthbearer", "xoauth2"]
            oauth2_passdb = f"""
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2_conf}
}}"""
        client_certs = external_passdb = ""
        if self.client_ca is not None:
            mechanisms.append("external")
            client_certs = f"""
ssl_ca = <{self.client_ca}
ssl_verify_client_cert = yes
ssl_require_crl = no
auth_ssl_username_from_cert = yes
"""
            # EXTERNAL checks an empty password: the verified certificate is
            # the only credential, so its passdb answers "no password".
            external_passdb = """
passdb {
  driver = static
  mechanisms = external
  args = nopassword=y
}"""
        if self.login_mode == "perf":
            cpus = os.cpu_count() or 1
            login_extra = f"""\
  service_count = 0
  process_min_avail = {cpus}
  client_limit = 1200
  vsz_limit = 1G
"""
            pop3_extra = f"""\
service pop3 {{
  service_count = 0
  process_min_avail = {cpus * 4}
  process_limit = 1200
}}
service auth {{
  client_limit = 4096
}}
"""
            anvil_extra = "  client_limit = 4096\n"
        return f"""\
# Private loopback-only POP3 test server written by tests/peers.py.
instance_name = pop3proto-test-{self.port}
base_dir = {self.run_dir}
state_dir = {b}/state
log_path = {self.log_file}
info_log_path = {self.log_file}
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}

protocols = pop3
listen = {self.host}
ssl = yes
ssl_cert = <{self.certfile}
ssl_key = <{self.keyfile}
disable_plaintext_auth = no{client_certs}
auth_mechanisms = {" ".join(mechanisms)}
auth_verbose = yes
# Tests log in wrongly on purpose: no 2 s failure delay, no per-IP penalty.
auth_failure_delay = 0
mail_location = maildir:{b}/mail/%u
mail_max_userip_connections = 1000

{external_passdb}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_dir}/%u
}}{oauth2_passdb}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={b}/mail/%u
}}

service pop3-login {{
  chroot = {chroot}
  inet_listener pop3 {{
    address = {self.host}
    port = {self.port}
  }}
  inet_listener pop3s {{
    address = {self.host}
    port = {self.tls_port}
    ssl = yes
  }}
{login_extra}}}
service anvil {{
  chroot = {"empty" if self._root else ""}
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
{anvil_extra}}}
{pop3_extra}"""

    def _check_traversable(self) -> None:
        """As root, make sure the mail user can reach ``base``; raise PeerError if not.

        Dovecot's auth and mail processes run as the ``dovecot`` user and must
        traverse every directory above ``base`` (pytest's own temporary
        directories are mode 0700 and pytest resets that at each start, which
        is why the ``dovecot`` fixture puts a root-run server elsewhere).
        """
        if not self._root:
            return
        for d in self.base.parents:
            if not d.stat().st_mode & stat.S_IXOTH:
                raise PeerError(
                    f"{d} is not traversable by the dovecot user; as root, start "
                    "DovecotServer in a directory every user can traverse (e.g. under /tmp)"
                )

    def start(self, timeout: float = 30.0) -> None:
        """Configure and start Dovecot; return once both ports greet with ``+OK``.

        Skips the calling test (fails it under ``CI=true``) when Dovecot 2.3 is
        not installed; raises :class:`PeerError` with the log when it will not start.
        """
        dovecot = require_program("dovecot")
        for part in ("pop3", "pop3-login", "auth"):
            if not (_DOVECOT_LIBEXEC / part).exists():
                _unavailable(
                    f"{_DOVECOT_LIBEXEC / part} is missing "
                    "(Debian: apt-get install dovecot-core dovecot-pop3d)"
                )
        version = _run([dovecot, "--version"], 30).stdout.decode(errors="replace").strip()
        if not version.startswith("2.3."):
            _unavailable(f"Dovecot 2.3 is needed (its configuration format), found {version!r}")
        for sub in ("mail", "state"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self._check_traversable()
        _make_certs(self.base / "ssl")
        self.users.setdefault(self.user, self.password)
        for name, password in list(self.users.items()):
            self.add_user(name, password)
        uid, gid = self._mail_owner()
        os.chown(self.base / "mail", uid, gid)

        last_error = ""
        for _attempt in range(5):
            self.port = free_port()
            self.tls_port = free_port()
            while self.tls_port == self.port:
                self.tls_port = free_port()
            self.config_file.write_text(self._config())
            stderr_path = self.base / "dovecot.stderr"
            # The daemon must not inherit our pipes: anything reading them to
            # EOF would wait for Dovecot to exit.
            with stderr_path.open("wb") as err:
                rc = subprocess.call(
                    [dovecot, "-c", str(self.config_file)],
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    timeout=timeout,
                )
            if rc == 0 and self._wait_ready(timeout):
                atexit.register(self.stop)
                return
            last_error = stderr_path.read_text(errors="replace") + self._log_tail()
            self.stop()
            if "Address already in use" not in last_error:
                break
        raise PeerError(f"Dovecot did not start (config {self.config_file}):\n{last_error}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pending = {self.port: False, self.tls_port: True}
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        while pending and time.monotonic() < deadline:
            for port, tls in list(pending.items()):
                try:
                    with socket.create_connection((self.host, port), timeout=2) as s:
                        if tls:
                            with ctx.wrap_socket(s, server_hostname="localhost") as t:
                                greeting = t.recv(64)
                        else:
                            greeting = s.recv(64)
                except OSError:
                    continue
                if greeting.startswith(b"+OK"):
                    del pending[port]
            if pending:
                if self.pid is None and time.monotonic() > deadline - timeout + 2:
                    return False  # the master has gone (see the log)
                time.sleep(0.05)
        return not pending

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Dovecot by the pid in its pid file (TERM, then KILL); idempotent."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._tmp_run and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    def __enter__(self) -> DovecotServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_dovecot(
    workdir: Path,
    user: str = "alice",
    password: str = "secret",
    login_mode: str = "secure",
    oauth2_introspection_url: str = "",
    client_ca: Path | None = None,
) -> Iterator[DovecotServer]:
    """Start a :class:`DovecotServer` for *workdir* (a test's temporary directory); stop it after.

    *user*/*password* is the first user (see :class:`DovecotServer`).  As a
    normal user the server lives in *workdir* itself.  As root it cannot:
    Dovecot's unprivileged processes must traverse the path, and pytest keeps
    its base directory at mode 0700 (and resets it whenever another pytest
    run starts).  Then the server lives in a fresh ``pop3proto-dovecot-*``
    directory under the system temporary directory, *workdir* holds a
    ``server`` symlink to it while it runs, and at the end ``dovecot.log`` is
    copied into *workdir* and the rest removed.
    """
    if os.geteuid() == 0:
        base = Path(tempfile.mkdtemp(prefix="pop3proto-dovecot-"))
        base.chmod(0o755)
        (workdir / "server").symlink_to(base)
    else:
        base = workdir
    server = DovecotServer(
        base=base,
        user=user,
        password=password,
        login_mode=login_mode,
        oauth2_introspection_url=oauth2_introspection_url,
        client_ca=client_ca,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if base != workdir:
            with contextlib.suppress(OSError):
                shutil.copyfile(server.log_file, workdir / "dovecot.log")
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    """A running private Dovecot (see :class:`DovecotServer` and :func:`running_dovecot`).

    Shared by the whole session.  User ``alice``/``secret`` exists with an
    empty mailbox.  Tests that fill mailboxes should use their own user names
    (``fill`` replaces a mailbox).
    """
    with running_dovecot(tmp_path_factory.mktemp("dovecot")) as server:
        yield server


# ---------------------------------------------------------------------------
# Real clients
# ---------------------------------------------------------------------------


def _run(
    cmd: Sequence[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
    ok: Sequence[int] = (0,),
) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise PeerError(f"{cmd[0]} timed out after {timeout} s: {shlex.join(cmd)}") from e
    if proc.returncode not in ok:
        raise PeerError(
            f"{shlex.join(cmd)} exited with {proc.returncode}\n"
            f"stderr: {proc.stderr.decode(errors='replace')}"
        )
    return proc


def _curl_common(
    user: str | None,
    password: str | None,
    cafile: str | os.PathLike[str] | None,
    starttls: bool,
    timeout: float,
    args: Sequence[str],
) -> list[str]:
    cmd = [require_program("curl"), "--silent", "--show-error", "--max-time", str(timeout)]
    if user is not None:
        cmd += ["--user", f"{user}:{password or ''}"]
    if cafile is not None:
        cmd += ["--cacert", os.fspath(cafile)]
    if starttls:
        cmd.append("--ssl-reqd")
    cmd += list(args)
    return cmd


def run_curl(
    url: str,
    *,
    user: str | None = None,
    password: str | None = None,
    cafile: str | os.PathLike[str] | None = None,
    starttls: bool = False,
    args: Sequence[str] = (),
    timeout: float = 60.0,
) -> bytes:
    """Run curl on one ``pop3://`` or ``pop3s://`` URL and return what it printed.

    ``pop3://host:port/`` gives the LIST reply body, ``pop3://host:port/N``
    message N (curl un-stuffs dots and drops the terminating ``.`` line, so
    this is the message as the server meant it).  *starttls* requires STLS on
    a ``pop3://`` URL (``--ssl-reqd``); *cafile* verifies the server; *args*
    are extra curl options (e.g. ``["--login-options", "AUTH=CRAM-MD5"]``,
    ``["--request", "UIDL"]``).  Raises :class:`PeerError` if curl fails.
    """
    cmd = _curl_common(user, password, cafile, starttls, timeout, args)
    cmd.append(url)
    return _run(cmd, timeout + 10).stdout


def run_curl_retr(
    base_url: str,
    numbers: Sequence[int],
    *,
    user: str | None = None,
    password: str | None = None,
    cafile: str | os.PathLike[str] | None = None,
    starttls: bool = False,
    args: Sequence[str] = (),
    timeout: float = 120.0,
) -> dict[int, bytes]:
    """Retrieve messages *numbers* with one curl run (one POP3 session per message).

    *base_url* is ``pop3://host:port`` or ``pop3s://host:port``.  Returns the
    bytes curl delivered for each number.  Raises :class:`PeerError` if curl fails.
    """
    if not numbers:
        return {}
    with tempfile.TemporaryDirectory(prefix="pop3curl-") as out:
        cmd = _curl_common(user, password, cafile, starttls, timeout, args)
        for n in numbers:
            cmd += ["--output", os.path.join(out, f"{n}.eml"), f"{base_url.rstrip('/')}/{n}"]
        _run(cmd, timeout + 10)
        return {n: Path(out, f"{n}.eml").read_bytes() for n in numbers}


@dataclass(frozen=True)
class DeliveredMessage:
    """One message as a real client delivered it (file content, unmodified)."""

    path: Path
    data: bytes


def _read_dir(directory: Path) -> list[DeliveredMessage]:
    return [DeliveredMessage(p, p.read_bytes()) for p in sorted(directory.iterdir()) if p.is_file()]


def run_mpop(
    host: str,
    port: int,
    user: str,
    password: str,
    maildir: str | os.PathLike[str],
    *,
    tls: bool = False,
    starttls: bool = False,
    cafile: str | os.PathLike[str] | None = None,
    auth: str = "user",
    pipelining: str = "auto",
    extra_config: Sequence[str] = (),
    timeout: float = 120.0,
) -> list[DeliveredMessage]:
    """Fetch every message with mpop in keep mode, delivering to the Maildir *maildir*.

    *tls* means implicit TLS (pop3s), *starttls* means STLS is required; with
    neither, TLS is off.  The certificate is checked against *cafile* (or the
    system's CAs).
    *auth* is mpop's ``auth`` value (``user``, ``plain``, ``cram-md5``,
    ``scram-sha-1``, ``on`` for the best offered, ...).  The config and UIDL
    files go to a fresh temporary directory, so every run fetches everything.

    Returns the messages this run delivered, in delivery order (= message
    number order); messages already in *maildir* are left alone.
    mpop alters them: LF line ends, and a ``Received:`` header prepended;
    :func:`normalise_delivered` undoes both.
    """
    if tls and starttls:
        raise ValueError("choose tls (implicit) or starttls, not both")
    mpop = require_program("mpop")
    out = Path(maildir)
    for sub in ("cur", "new", "tmp"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    before = {p.name for sub in ("cur", "new") for p in (out / sub).iterdir()}
    with tempfile.TemporaryDirectory(prefix="pop3mpop-") as work:
        conf = Path(work, "mpoprc")
        lines = [
            "defaults",
            "account test",
            f"host {host}",
            f"port {port}",
            f"user {_mpop_quote(user)}",
            f"password {_mpop_quote(password)}",
            f"auth {auth}",
            f"tls {'on' if tls or starttls else 'off'}",
            f"tls_starttls {'on' if starttls else 'off'}",
            f"pipelining {pipelining}",
            "keep on",
            "only_new off",
            f"uidls_file {_mpop_quote(str(Path(work, 'uidls')))}",
            f"delivery maildir {_mpop_quote(str(out.resolve()))}",
            f"timeout {int(timeout)}",
        ]
        if tls or starttls:
            trust = _mpop_quote(os.fspath(cafile)) if cafile is not None else "system"
            lines.append(f"tls_trust_file {trust}")
        lines += list(extra_config)
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        _run([mpop, "--quiet", "-C", str(conf), "test"], timeout + 10)
    # mpop names Maildir files by delivery time, then a counter: sorted = delivery order.
    new = [m for m in _read_dir(out / "new") + _read_dir(out / "cur") if m.path.name not in before]
    return sorted(new, key=_maildir_order)


def _mpop_quote(value: str) -> str:
    """A double-quoted mpop configuration argument (mpop strips the outer quotes only)."""
    if any(c in value for c in "\r\n\0"):
        raise ValueError("configuration values cannot hold line breaks or NUL")
    return f'"{value}"'


def _fetchmail_quote(value: str) -> str:
    """A double-quoted fetchmailrc string.

    fetchmail's strings cannot hold their own quote character, but it decodes
    C-style escapes inside them: ``\\\\`` and octal ``\\042`` for ``"``.
    """
    if any(c in value for c in "\r\n\0"):
        raise ValueError("configuration values cannot hold line breaks or NUL")
    return '"' + value.replace("\\", "\\\\").replace('"', "\\042") + '"'


def _maildir_order(m: DeliveredMessage) -> tuple[int, ...]:
    # "<secs>.M<usecs>P<pid>Q<n>.host" (mpop): order by the numbers in the unique part.
    digits: list[int] = []
    cur = ""
    for ch in m.path.name.split(",")[0].split(":")[0]:
        if ch.isdigit():
            cur += ch
        elif cur:
            digits.append(int(cur))
            cur = ""
    if cur:
        digits.append(int(cur))
    return tuple(digits)


# fetchmail runs the MDA once per message and waits for it, so counting the
# files already delivered gives the next sequence number.
_FETCHMAIL_MDA = """\
set -eu -C
n=$(ls -1 "$1" | wc -l)
cat > "$1/$(printf '%06d' $((n + 1))).eml"
"""


def run_fetchmail(
    host: str,
    port: int,
    user: str,
    password: str,
    outdir: str | os.PathLike[str],
    *,
    tls: bool = False,
    starttls: bool = False,
    cafile: str | os.PathLike[str] | None = None,
    auth: str = "password",
    tls_name: str | None = None,
    extra_options: Sequence[str] = (),
    timeout: float = 120.0,
) -> list[DeliveredMessage]:
    """Fetch every message with fetchmail in keep mode; one file per message in *outdir*.

    Delivery is through an MDA that writes each message to ``outdir/NNNNNN.eml``
    in delivery order (*outdir* must be empty or absent).  *tls* means implicit
    TLS (``ssl``), *starttls* means STLS is required (``sslproto tls1.2+``);
    with neither, TLS is off.  The
    certificate is checked against *cafile* whenever TLS is used, for the
    name *tls_name* if given (fetchmail ignores IP-address subjectAltNames, so
    pass ``"localhost"`` when *host* is ``127.0.0.1``).  *auth* is
    fetchmail's ``auth`` value (``password`` = USER/PASS, ``cram-md5``,
    ``any``, ...), or ``apop`` (fetchmail's ``proto APOP``); *extra_options*
    are more fetchmail keywords for the ``options`` clause.

    fetchmail alters messages: LF line ends and a prepended ``Received:``
    header; :func:`normalise_delivered` undoes both.  Exit code 1 ("no mail")
    gives an empty list; other failures raise :class:`PeerError`.
    """
    if tls and starttls:
        raise ValueError("choose tls (implicit) or starttls, not both")
    fetchmail = require_program("fetchmail")
    out = Path(outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ValueError(f"{out} must be empty")
    with tempfile.TemporaryDirectory(prefix="pop3fetchmail-") as work:
        mda = Path(work, "deliver.sh")
        mda.write_text(_FETCHMAIL_MDA)
        mda_cmd = f"/bin/sh {shlex.quote(str(mda))} {shlex.quote(str(out))}"
        proto = "APOP" if auth.lower() == "apop" else "POP3"
        if tls or starttls:
            tls_opts = ["ssl" if tls else "sslproto 'tls1.2+'", "sslcertck"]
            if cafile is not None:
                tls_opts.append(f"sslcertfile {_fetchmail_quote(os.fspath(cafile))}")
        else:
            tls_opts = ["sslproto ''", "no sslcertck"]
        if tls_name is not None and (tls or starttls):
            tls_opts.append(f"sslcommonname {_fetchmail_quote(tls_name)}")
        auth_opt = "" if proto == "APOP" else f"auth {auth}"
        rc = "\n".join(
            [
                "set no syslog",
                "set no bouncemail",
                f"poll {host} with proto {proto} port {port} {auth_opt} timeout {int(timeout)}",
                f"  user {_fetchmail_quote(user)} there with password {_fetchmail_quote(password)}"
                f" is {_fetchmail_quote(user)} here",
                f"  options keep fetchall no rewrite {' '.join([*tls_opts, *extra_options])}",
                f"  mda {_fetchmail_quote(mda_cmd)}",
                "",
            ]
        )
        rcfile = Path(work, "fetchmailrc")
        fd = os.open(rcfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(rc)
        env = dict(os.environ, FETCHMAILHOME=work, HOME=work)
        env.pop("FETCHMAILUSER", None)
        _run(
            [
                fetchmail,
                "--nodetach",
                "--fetchmailrc",
                str(rcfile),
                "--idfile",
                str(Path(work, "fetchids")),
                "--pidfile",
                str(Path(work, "fetchmail.pid")),
            ],
            timeout + 10,
            env=env,
            ok=(0, 1),
        )
    return _read_dir(out)


#: Text in the ``Received:`` header field that mpop and fetchmail prepend.
CLIENT_RECEIVED_MARKERS: tuple[bytes, ...] = (b"(mpop-", b"(fetchmail-")


def normalise_delivered(data: bytes, markers: Sequence[bytes] = CLIENT_RECEIVED_MARKERS) -> bytes:
    """Undo what mpop/fetchmail did to a message, giving back the bytes the server sent.

    What they change (mpop 1.4, fetchmail 6.4, Maildir/MDA delivery):

    * line ends become LF;
    * mpop puts a ``Received: from HOST ... by NAME (mpop-VERSION) with POP3``
      field at the very top;
    * fetchmail puts ``Received: from HOST ... by NAME with POP3
      (fetchmail-VERSION)`` after the message's leading ``Return-Path:``
      field (which it rewrites to the same value) or at the top.

    This removes, from the header section only, every ``Received:`` field
    (with its continuation lines) that contains one of *markers*, and turns LF
    into CRLF.  Exact for messages without CR octets (all generated test mail)
    whose ``Return-Path:``, if any, comes first.  A CRLF in *data* is first
    folded to LF, so a client that kept CRLF is handled too.
    """
    data = data.replace(b"\r\n", b"\n")
    end = data.find(b"\n\n")
    head, body = (data, b"") if end < 0 else (data[: end + 1], data[end + 1 :])
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    kept = [
        f for f in fields if not (f[:9].lower() == b"received:" and any(m in f for m in markers))
    ]
    return (b"".join(kept) + body).replace(b"\n", b"\r\n")
