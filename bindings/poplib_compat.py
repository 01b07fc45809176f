"""The standard library's ``poplib`` interface on pop3proto's client.

``POP3`` and ``POP3_SSL`` take poplib's constructor arguments, have its
methods and return what it returns (``(response, lines, octets)`` tuples of
bytes, response lines as bytes), and raise its ``error_proto``. A program
written for poplib runs unchanged with ``import pop3proto.bindings.poplib_compat
as poplib``; underneath, replies are framed and un-stuffed by the engine in
bulk rather than line by line.

Differences from poplib, each on purpose:

* No 2048-octet line limit: long lines in real mail are retrieved, not
  refused (the engine's own limits bound memory instead).
* TLS verifies certificates and host names by default
  (``ssl.create_default_context()``, honouring ``SSL_CERT_FILE``); poplib's
  default context does not. Pass your own ``context`` to change that.
* ``apop`` only accepts a greeting timestamp shaped like ``<local@domain>``
  (CVE-2007-1558), and after ``stls()`` the plaintext greeting's timestamp is
  not used.
* Protocol violations (an unsolicited line, data injected after STLS, a
  duplicated unique-id) raise ``error_proto`` instead of being read as
  replies, and the connection is closed.
* ``set_debuglevel`` output never shows a password.
* Timeouts raise ``TimeoutError`` (``socket.timeout``) as poplib does, and
  ``timeout`` bounds a whole reply rather than each read.
"""

from __future__ import annotations

import socket
import ssl
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from pop3proto import _events as ev
from pop3proto._requests import Pop3Error, Pop3TimeoutError, Pop3TLSError
from pop3proto._sasl import apop_digest, b64decode_strict, b64encode
from pop3proto._util import ProtocolError

from ._sync_client import Client

__all__ = ["POP3", "POP3_SSL", "error_proto"]

#: Standard ports, as in poplib.
POP3_PORT = 110
POP3_SSL_PORT = 995
CR = b"\r"
LF = b"\n"
CRLF = CR + LF
#: poplib's line limit. Kept as a name for programs that set it (getmail
#: does); this module has no such limit.
_MAXLINE = 2048
HAVE_SSL = True

T = TypeVar("T")
#: What poplib's multi-line commands return: (response, lines, octets).
LongResponse = tuple[bytes, list[bytes], int]
Params = list[str]
#: The standard library's "no timeout given" marker (poplib's default).
_DEFAULT_TIMEOUT: Any = getattr(socket, "_GLOBAL_DEFAULT_TIMEOUT", object())


class error_proto(Exception):
    """An error reply or a broken exchange: ``args[0]`` is the server's
    ``-ERR`` line (bytes) when there was one, as in poplib."""


def _lines(body: bytes) -> list[bytes]:
    """A body split as poplib splits it: at LF, with one CRLF, LF, or a
    leading CR (poplib's ``CR...LF`` case) removed per line."""
    parts = body.split(b"\n")
    last = parts.pop()
    out = []
    for part in parts:
        if part.endswith(b"\r"):
            out.append(part[:-1])
        elif part.startswith(b"\r"):
            out.append(part[1:])
        else:
            out.append(part)
    if last:
        out.append(last)
    return out


def _number(which: object) -> int | None:
    if isinstance(which, int) and not isinstance(which, bool):
        return which if 1 <= which <= 0x7FFFFFFF else None
    if isinstance(which, (str, bytes)):
        text = which.decode("ascii", "replace") if isinstance(which, bytes) else which
        if text.isascii() and text.isdigit() and not text.startswith("0") and len(text) <= 10:
            value = int(text)
            return value if value <= 0x7FFFFFFF else None
    return None


class POP3:
    """A POP3 connection with poplib's interface (see the module docstring).

    Connects and reads the greeting on construction. Plaintext logins are
    allowed, as in poplib: the caller chose a plaintext connection."""

    encoding = "UTF-8"

    def __init__(
        self,
        host: str,
        port: int = POP3_PORT,
        timeout: Any = _DEFAULT_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self._tls_established = False
        sys.audit("poplib.connect", self, host, port)
        self._debugging = 0
        self.file: Any = None
        self._client: Client | None = None
        self.sock: socket.socket | None = self._create_socket(timeout)
        seconds = socket.getdefaulttimeout() if timeout is _DEFAULT_TIMEOUT else timeout
        self._client = Client(
            self.sock,
            host=host,
            port=port,
            allow_insecure=True,
            timeout=seconds,
            capa=False,
            ssl_context=getattr(self, "context", None),
        )
        self._call(self._client.open)
        self.welcome = self._client.session.last_status_line

    # ------------------------------------------------------------ internals

    def _create_socket(self, timeout: Any) -> socket.socket:
        if timeout is not None and not timeout:
            raise ValueError("Non-blocking socket (timeout=0) is not supported")
        return socket.create_connection((self.host, self.port), timeout)

    @property
    def _live(self) -> Client:
        if self._client is None or self._client.closed:
            raise error_proto("-ERR EOF")
        return self._client

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one client operation with poplib's errors."""
        client = self._client
        assert client is not None
        client.session.last_status_line = b""
        try:
            return fn(*args)
        except Pop3TimeoutError as exc:
            raise TimeoutError(str(exc)) from exc
        except Pop3TLSError as exc:
            cause = exc.__cause__
            if isinstance(cause, (ssl.SSLError, ssl.CertificateError)):
                raise cause from None
            raise error_proto(self._error_line(exc)) from exc
        except Pop3Error as exc:
            raise error_proto(self._error_line(exc)) from exc
        except ProtocolError as exc:
            raise error_proto(f"-ERR {exc}") from exc
        finally:
            if client.closed:
                self.sock = None

    def _error_line(self, exc: Pop3Error) -> bytes:
        assert self._client is not None
        line = self._client.session.last_status_line
        if line[:1] == b"-":
            return line
        code = f"[{exc.code}] " if exc.code is not None else ""
        return f"-ERR {code}{exc.text}".encode("utf-8", "surrogateescape")

    def _debug_cmd(self, line: str) -> None:
        if self._debugging:
            if line[:5].upper() == "PASS ":
                line = "PASS ********"
            elif line[:5].upper() == "APOP ":
                line = " ".join(line.split(" ")[:2]) + " ********"
            print("*cmd*", repr(line))

    def _debug_resp(self, resp: bytes) -> bytes:
        if self._debugging > 1:
            print("*resp*", repr(resp))
        return resp

    def _short(self, cmd: ev.Command, line: str) -> bytes:
        self._debug_cmd(line)
        client = self._live
        event = self._call(lambda: client._run(client.session.execute(cmd)))
        if isinstance(event, ev.ConnectionClosed):
            raise error_proto("-ERR EOF")
        return self._debug_resp(client.session.last_status_line)

    def _long(self, cmd: ev.Command, line: str) -> LongResponse:
        self._debug_cmd(line)
        client = self._live
        _, body = self._call(lambda: client._run(client.session.execute_body(cmd)))
        resp = self._debug_resp(client.session.last_status_line)
        return resp, _lines(body), len(body)

    def _listing(self, cmd: ev.List | ev.Uidl, line: str) -> LongResponse:
        self._debug_cmd(line)
        client = self._live
        event = self._call(lambda: client._run(client.session.execute(cmd)))
        resp = self._debug_resp(client.session.last_status_line)
        if isinstance(event, ev.ScanListings):
            lines = [b"%d %d" % entry for entry in event.entries]
        else:
            assert isinstance(event, ev.UniqueIdListings)
            lines = [b"%d %s" % (msg, uid.encode("ascii")) for msg, uid in event.entries]
        return resp, lines, sum(len(line) + 2 for line in lines)

    @staticmethod
    def _word(value: object) -> str:
        return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)

    def _msg_command(self, keyword: str, which: object, *rest: object) -> ev.Command:
        """A typed command for a valid message number, else the line as
        given (the server answers -ERR, as it would to poplib)."""
        n = _number(which)
        if n is not None and all(_number(r) is not None or r == 0 for r in rest):
            extra = [int(str(r)) for r in rest]
            if keyword == "LIST":
                return ev.List(n)
            if keyword == "UIDL":
                return ev.Uidl(n)
            if keyword == "RETR":
                return ev.Retr(n)
            if keyword == "DELE":
                return ev.Dele(n)
            if keyword == "TOP":
                return ev.Top(n, extra[0])
        args = tuple(self._word(a) for a in (which, *rest))
        return ev.ExtensionCommand(keyword, args, multiline=keyword in ("RETR", "TOP"))

    # ------------------------------------------------------------ poplib API

    def getwelcome(self) -> bytes:
        """The server's greeting line."""
        welcome: bytes = self.welcome
        return welcome

    def set_debuglevel(self, level: int) -> None:
        """1: print commands (passwords hidden); 2: also responses."""
        self._debugging = level

    def user(self, user: str) -> bytes:
        """USER: returns the response line."""
        return self._short(ev.User(self._word(user)), f"USER {user}")

    def pass_(self, pswd: str) -> bytes:
        """PASS: returns the response line."""
        return self._short(ev.Pass(self._word(pswd)), f"PASS {pswd}")

    def stat(self) -> tuple[int, int]:
        """STAT: ``(message count, mailbox size)``."""
        self._debug_cmd("STAT")
        client = self._live
        event = self._call(lambda: client._run(client.session.execute(ev.Stat())))
        self._debug_resp(client.session.last_status_line)
        assert isinstance(event, ev.DropListing)
        if self._debugging:
            print("*stat*", repr(client.session.last_status_line.split()))
        return event.count, event.size

    def list(self, which: object = None) -> Any:
        """LIST: ``(response, [b"msg octets", ...], octets)``, or the
        response line for one message."""
        if which is not None:
            cmd = self._msg_command("LIST", which)
            return self._short(cmd, f"LIST {which}")
        return self._listing(ev.List(), "LIST")

    def retr(self, which: object) -> LongResponse:
        """RETR: ``(response, lines, octets)``."""
        return self._long(self._msg_command("RETR", which), f"RETR {which}")

    def dele(self, which: object) -> bytes:
        """DELE: the response line."""
        return self._short(self._msg_command("DELE", which), f"DELE {which}")

    def noop(self) -> bytes:
        """NOOP: the response line."""
        return self._short(ev.Noop(), "NOOP")

    def rset(self) -> bytes:
        """RSET: the response line."""
        return self._short(ev.Rset(), "RSET")

    def quit(self) -> bytes:
        """QUIT, then close: the response line."""
        try:
            return self._short(ev.Quit(), "QUIT")
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection without QUIT."""
        client, self._client = self._client, None
        self.file = None
        self.sock = None
        if client is not None:
            client.close()

    def rpop(self, user: str) -> bytes:
        """RPOP: the response line."""
        return self._short(ev.ExtensionCommand("RPOP", (self._word(user),)), f"RPOP {user}")

    def apop(self, user: str, password: str) -> bytes:
        """APOP with the greeting's timestamp: the response line."""
        stamp = self._live.session.apop_timestamp
        if stamp is None:
            raise error_proto("-ERR APOP not supported by server")
        digest = apop_digest(stamp, password)
        return self._short(ev.Apop(self._word(user), digest), f"APOP {user} {digest}")

    def top(self, which: object, howmuch: object) -> LongResponse:
        """TOP: ``(response, lines, octets)``."""
        return self._long(self._msg_command("TOP", which, howmuch), f"TOP {which} {howmuch}")

    def uidl(self, which: object = None) -> Any:
        """UIDL: ``(response, [b"msg uid", ...], octets)``, or the response
        line for one message."""
        if which is not None:
            return self._short(self._msg_command("UIDL", which), f"UIDL {which}")
        return self._listing(ev.Uidl(), "UIDL")

    def utf8(self) -> bytes:
        """UTF8 (RFC 6856): the response line."""
        return self._short(ev.Utf8(), "UTF8")

    def capa(self) -> dict[str, Params]:
        """CAPA as ``{tag: [parameters]}``."""
        self._debug_cmd("CAPA")
        client = self._live
        try:
            event = self._call(lambda: client._run(client.session.execute(ev.Capa())))
        except error_proto:
            raise error_proto("-ERR CAPA not supported by server") from None
        assert isinstance(event, ev.Capabilities)
        return {tag: list(params) for tag, params in event.items_}

    def stls(self, context: ssl.SSLContext | None = None) -> bytes:
        """STLS (RFC 2595): the response line. Verifies the certificate and
        host name unless ``context`` says otherwise."""
        if self._tls_established:
            raise error_proto("-ERR TLS session already established")
        caps = self.capa()
        if "STLS" not in caps:
            raise error_proto("-ERR STLS not supported by server")
        client = self._live
        self._debug_cmd("STLS")
        self._call(client.starttls, context or ssl.create_default_context())
        self.sock = client.sock
        self._tls_established = True
        return self._debug_resp(client.session.last_status_line)

    # ------------------------------------------------------------ raw commands

    def _shortcmd(self, line: str) -> bytes:
        """Send a command line and return its one-line response; continues
        a SASL exchange when the last response was a ``+`` challenge."""
        client = self._live
        session = client.session
        if session.conn.outstanding and isinstance(session.conn.outstanding[0], ev.Auth):
            self._debug_cmd("<SASL answer>")
            if line.strip() == "*":
                cmd: ev.Command = ev.AuthCancel()
            else:
                try:
                    cmd = ev.AuthResponse(b64decode_strict(line.strip().encode("ascii")))
                except (ValueError, UnicodeEncodeError):
                    raise error_proto("-ERR invalid base64 in SASL answer") from None
            return self._sasl_step(cmd)
        keyword, _, rest = line.partition(" ")
        upper = keyword.upper()
        if upper == "AUTH":
            mech, _, ir = rest.strip().partition(" ")
            initial = None
            if ir:
                try:
                    initial = b"" if ir == "=" else b64decode_strict(ir.encode("ascii"))
                except (ValueError, UnicodeEncodeError):
                    raise error_proto("-ERR invalid base64 in initial response") from None
            self._debug_cmd(f"AUTH {mech}")
            return self._sasl_step(ev.Auth(mech.upper(), initial))
        return self._short(self._parse_line(line), line)

    def _sasl_step(self, cmd: ev.Command) -> bytes:
        client = self._live
        event = self._call(lambda: client._run(client.session.execute(cmd)))
        if isinstance(event, ev.AuthChallenge):
            return self._debug_resp(b"+ " + b64encode(event.data))
        return self._debug_resp(client.session.last_status_line)

    def _longcmd(self, line: str) -> LongResponse:
        """Send a command line whose ``+OK`` is followed by data lines."""
        keyword, _, rest = line.partition(" ")
        upper = keyword.upper()
        args = rest.split()
        if upper in ("LIST", "UIDL") and not args:
            return self._listing(ev.List() if upper == "LIST" else ev.Uidl(), line)
        if upper in ("RETR", "TOP") and args:
            return self._long(self._msg_command(upper, *args), line)
        cmd = ev.ExtensionCommand(upper, tuple(args), multiline=True)
        return self._long(cmd, line)

    def _parse_line(self, line: str) -> ev.Command:
        keyword, _, rest = line.partition(" ")
        upper = keyword.upper()
        args = rest.split()
        simple: dict[str, Callable[[], ev.Command]] = {
            "STAT": ev.Stat,
            "NOOP": ev.Noop,
            "RSET": ev.Rset,
            "QUIT": ev.Quit,
            "UTF8": ev.Utf8,
            "CAPA": ev.Capa,
        }
        if upper in simple and not args:
            return simple[upper]()
        if upper == "USER" and len(args) == 1:
            return ev.User(args[0])
        if upper == "PASS" and rest:
            return ev.Pass(rest)
        if upper == "APOP" and len(args) == 2:
            return ev.Apop(args[0], args[1])
        if upper in ("LIST", "UIDL", "DELE") and len(args) == 1:
            return self._msg_command(upper, args[0])
        return ev.ExtensionCommand(upper, tuple(args))


class POP3_SSL(POP3):
    """POP3 over implicit TLS (port 995), with poplib's arguments.

    ``keyfile``/``certfile`` (deprecated, as in poplib) load a client
    certificate into the default context; ``context`` replaces it."""

    def __init__(
        self,
        host: str,
        port: int = POP3_SSL_PORT,
        keyfile: str | None = None,
        certfile: str | None = None,
        timeout: Any = _DEFAULT_TIMEOUT,
        context: ssl.SSLContext | None = None,
    ) -> None:
        if context is not None and keyfile is not None:
            raise ValueError("context and keyfile arguments are mutually exclusive")
        if context is not None and certfile is not None:
            raise ValueError("context and certfile arguments are mutually exclusive")
        if keyfile is not None or certfile is not None:
            warnings.warn(
                "keyfile and certfile are deprecated, use a custom context instead",
                DeprecationWarning,
                2,
            )
        self.keyfile = keyfile
        self.certfile = certfile
        if context is None:
            context = ssl.create_default_context()
            if certfile is not None:
                context.load_cert_chain(certfile, keyfile)
        self.context = context
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: Any) -> socket.socket:
        sock = super()._create_socket(timeout)
        try:
            return self.context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def stls(self, *args: Any, **kwargs: Any) -> bytes:
        """Always fails: the session is in TLS already."""
        raise error_proto("-ERR TLS session already established")
