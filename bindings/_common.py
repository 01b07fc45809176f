"""What every binding shares: the maildrop side of the server driver's
requests, TLS facts for SASL, and address helpers. No socket code here."""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from pop3proto import MaildropFailure, Pop3TimeoutError, TLSInfo
from pop3proto import _requests as rq
from pop3proto._client import ClientSession
from pop3proto._events import Greeting
from pop3proto._state import State

if TYPE_CHECKING:
    import logging
    import ssl

    from pop3proto._auth import Authenticator
    from pop3proto._server import ServerConfig, SessionSummary

    from .maildrop import (
        Maildrop,
        MaildropError,
        MaildropLocked,
        MaildropSession,
        MemoryMaildrop,
    )

# A client session needs neither ssl (unless it uses TLS) nor the maildrops:
# they are imported where used, which keeps ``pop3proto fetch``'s
# start-up short.

__all__ = [
    "POP3S_PORT",
    "POP3_PORT",
    "ClientBase",
    "ConnectPlan",
    "MaildropRunner",
    "ServerBase",
    "is_loopback",
    "read_chunks",
    "server_certificate_der",
    "server_end_point",
    "tls_info",
]

#: RFC 1939 §3 and RFC 8314 §7.
POP3_PORT = 110
POP3S_PORT = 995

#: Bytes read from a stored message at a time.
CHUNK = 64 * 1024


_IPV6_LOOPBACK = bytes(15) + b"\x01"


def is_loopback(host: str) -> bool:
    """True for an address literal in 127.0.0.0/8, and for ::1 (where
    plaintext logins may be allowed); a zone (``%eth0``) is ignored."""
    # inet_pton rather than ipaddress: this runs for every connection a
    # server accepts, and ipaddress is a long import for a client.
    literal = host.split("%", 1)[0]
    try:
        return socket.inet_pton(socket.AF_INET, literal)[0] == 127
    except (OSError, ValueError):
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, literal) == _IPV6_LOOPBACK
    except (OSError, ValueError):
        return False


def read_chunks(fp: BinaryIO) -> Iterator[bytes]:
    """A stored message as chunks; the file is closed when the iteration ends
    or the iterator is closed."""
    try:
        while True:
            chunk = fp.read(CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        fp.close()


def log_session(log: logging.Logger, summary: SessionSummary | None) -> None:
    """The one log line of a finished session (nothing for one the binding
    cut short: it logs why itself)."""
    if summary is not None:
        log.info(
            "session peer=%s user=%s retrieved=%d octets=%d deleted=%d end=%s",
            summary.peer,
            summary.user,
            summary.retrieved,
            summary.octets,
            summary.deleted,
            summary.ended or "quit",
        )


@functools.cache
def _maildrop_classes() -> tuple[type[MaildropError], type[MaildropLocked], type[MemoryMaildrop]]:
    """``maildrop``'s error classes and ``MemoryMaildrop``, imported when the
    first ``MaildropRunner`` is made (a client never needs that module)."""
    from .maildrop import MaildropError, MaildropLocked, MemoryMaildrop

    return MaildropError, MaildropLocked, MemoryMaildrop


class MaildropRunner:
    """Carries out the server driver's maildrop requests (OpenMaildrop,
    OpenMessage, Commit) on a ``Maildrop``, and releases the lock at the end."""

    def __init__(self, maildrop: Maildrop) -> None:
        self.maildrop = maildrop
        self.session: MaildropSession | None = None
        error, locked, memory = _maildrop_classes()
        self._error, self._locked = error, locked
        self._in_memory = isinstance(maildrop, memory)

    def handles(self, request: rq.Request) -> bool:
        return isinstance(request, (rq.OpenMaildrop, rq.OpenMessage, rq.Commit))

    def may_block(self, request: rq.Request) -> bool:
        """Whether an event loop should hand ``request`` to a worker thread:
        only an UPDATE that removes messages from a maildrop on disk (unlinks
        and fsyncs can stall on a busy disk). Opening a maildrop and reading
        a message are short local work (its index, its directories, one
        file): a hop through a thread costs more than they do, so they run
        inline, as does an UPDATE with nothing to remove (it only releases
        the lock)."""
        return isinstance(request, rq.Commit) and bool(request.indexes) and not self._in_memory

    def run(self, request: rq.Request) -> Any:
        if isinstance(request, rq.OpenMaildrop):
            try:
                self.session = self.maildrop.open(request.user)
            except self._locked:
                return MaildropFailure(in_use=True)
            except self._error:
                return MaildropFailure()
            return [(m.size, m.uid) for m in self.session.messages]
        assert self.session is not None
        if isinstance(request, rq.OpenMessage):
            read_small = getattr(self.session, "read_small", None)
            if read_small is not None:
                data = read_small(request.index, CHUNK)
                if data is not None:
                    return (data,)
            try:
                return read_chunks(self.session.open_message(request.index))
            except self._error:
                return None  # removed behind our back: the driver answers -ERR
        if isinstance(request, rq.Commit):
            # UPDATE: remove, then release the lock before the +OK is sent.
            messages = self.session.messages
            try:
                if request.indexes:
                    self.session.commit(messages[i].key for i in request.indexes)
            except self._error:
                return False
            finally:
                self.close()
            return True
        raise TypeError(f"not a maildrop request: {request!r}")

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


# Signature algorithm OIDs (RFC 3279, 4055, 5758, 8410) -> hash to use for
# tls-server-end-point (RFC 5929 §4.1: MD5 and SHA-1 are replaced by SHA-256).
_SIG_HASHES = {
    "1.2.840.113549.1.1.4": "sha256",  # md5WithRSAEncryption
    "1.2.840.113549.1.1.5": "sha256",  # sha1WithRSAEncryption
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
    "1.2.840.10045.4.1": "sha256",  # ecdsa-with-SHA1
    "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
    "1.2.840.10040.4.3": "sha256",  # dsa-with-sha1
    "2.16.840.1.101.3.4.3.1": "sha224",  # dsa-with-sha224
    "2.16.840.1.101.3.4.3.2": "sha256",  # dsa-with-sha256
}
_HASH_OIDS = {
    "1.3.14.3.2.26": "sha256",  # SHA-1 -> SHA-256
    "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
}
_RSASSA_PSS = "1.2.840.113549.1.1.10"


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``."""
    if pos + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4 or pos + n > len(der):
            raise ValueError("bad DER length")
        length = int.from_bytes(der[pos : pos + n], "big")
        pos += n
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _oid(der: bytes, start: int, end: int) -> str:
    arcs: list[int] = []
    value = 0
    for byte in der[start:end]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        raise ValueError("empty OID")
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(a) for a in head + arcs[1:])


def _signature_hash(der: bytes) -> str:
    """The hash name for tls-server-end-point of a DER certificate."""
    _, start, _ = _tlv(der, 0)  # Certificate
    _, _, tbs_end = _tlv(der, start)  # tbsCertificate
    tag, alg_start, alg_end = _tlv(der, tbs_end)  # signatureAlgorithm
    if tag != 0x30:
        raise ValueError("no signature algorithm")
    tag, oid_start, oid_end = _tlv(der, alg_start)
    if tag != 0x06:
        raise ValueError("no algorithm OID")
    oid = _oid(der, oid_start, oid_end)
    if oid == _RSASSA_PSS:
        # RSASSA-PSS-params: [0] hashAlgorithm, default SHA-1 (RFC 4055 §3.1).
        if oid_end < alg_end:
            tag, p_start, p_end = _tlv(der, oid_end)
            if tag == 0x30 and p_start < p_end:
                tag, h_start, _ = _tlv(der, p_start)
                if tag == 0xA0:
                    _, a_start, _ = _tlv(der, h_start)
                    _, o_start, o_end = _tlv(der, a_start)
                    return _HASH_OIDS.get(_oid(der, o_start, o_end), "sha256")
        return "sha256"
    return _SIG_HASHES.get(oid, "sha256")


@functools.lru_cache(maxsize=16)
def server_end_point(der_certificate: bytes) -> bytes:
    """``tls-server-end-point`` channel-binding data (RFC 5929 §4.1) for the
    server's DER certificate: its hash under the hash of its signature
    algorithm, SHA-256 for MD5/SHA-1 and for algorithms with no single hash
    (Ed25519, Ed448) or that cannot be read. Remembered for the last few
    certificates: a server computes it for its own one on every handshake."""
    try:
        name = _signature_hash(der_certificate)
    except ValueError:
        name = "sha256"
    import hashlib

    return hashlib.new(name, der_certificate).digest()


def tls_info(
    sslobj: ssl.SSLObject | ssl.SSLSocket | Any,
    *,
    server_side: bool,
    server_cert: bytes | None = None,
) -> TLSInfo:
    """What SASL needs from a finished handshake: channel-binding data
    (``tls-server-end-point`` always, ``tls-unique`` below TLS 1.3; Python's
    ``ssl`` does not expose ``tls-exporter``) and the verified client
    certificate's identity for EXTERNAL (its first subject commonName).
    A server passes its own certificate (DER) as ``server_cert``."""
    import ssl

    bindings: dict[str, bytes] = {}
    own_or_peer = server_cert if server_side else sslobj.getpeercert(binary_form=True)
    if own_or_peer:
        bindings["tls-server-end-point"] = server_end_point(own_or_peer)
    version = sslobj.version() or ""
    if version != "TLSv1.3":
        try:
            unique = sslobj.get_channel_binding("tls-unique")
        except (ValueError, ssl.SSLError, AttributeError):
            unique = None
        if unique:
            bindings["tls-unique"] = unique
    identity = None
    if server_side:
        cert = sslobj.getpeercert()
        if cert:
            subject: Any = cert.get("subject", ())
            for rdn in subject:
                for key, value in rdn:
                    if key == "commonName" and identity is None:
                        identity = str(value)
    return TLSInfo(bindings, identity)


def server_certificate_der(certfile: str) -> bytes | None:
    """The DER form of the first certificate in a PEM file (for the server's
    tls-server-end-point channel binding)."""
    try:
        with open(certfile, encoding="ascii") as fh:
            pem = fh.read()
    except (OSError, UnicodeDecodeError):
        return None
    start = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        return None
    import ssl

    return ssl.PEM_cert_to_DER_cert(pem[start : end + len("-----END CERTIFICATE-----")])


class ClientBase:
    """What every client binding shows of its session."""

    _session: ClientSession

    @property
    def session(self) -> ClientSession:
        """The I/O-free session this client drives."""
        return self._session

    @property
    def greeting(self) -> Greeting | None:
        """The server's greeting."""
        return self._session.greeting

    @property
    def tls_active(self) -> bool:
        """The connection runs inside TLS."""
        return self._session.tls_active

    @property
    def state(self) -> State:
        """The POP3 state."""
        return self._session.state


class ServerBase:
    """What every server binding does before serving: the policy (a
    ``ServerConfig``, or one made from ``authenticator``), and the bound,
    listening sockets — the plaintext one (STLS offered when ``ssl_context``
    is given) and the implicit-TLS one (RFC 8314). ``reuse_port`` sets
    SO_REUSEPORT so several processes can share a port."""

    def __init__(
        self,
        maildrop: Maildrop,
        authenticator: Authenticator | None = None,
        *,
        listen: tuple[str, int] | None = ("127.0.0.1", 110),
        tls_listen: tuple[str, int] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_certificate: bytes | None = None,
        config: ServerConfig | None = None,
        backlog: int = 1024,
        handshake_timeout: float = 30.0,
        reuse_port: bool = False,
    ) -> None:
        if config is None:
            if authenticator is None:
                raise ValueError("give an authenticator or a ServerConfig")
            from pop3proto._server import ServerConfig

            config = ServerConfig(
                authenticator=authenticator, stls_available=ssl_context is not None
            )
        if tls_listen is not None and ssl_context is None:
            raise ValueError("implicit TLS needs an ssl_context")
        self.config = config
        self.maildrop = maildrop
        self.ssl_context = ssl_context
        self.server_certificate = server_certificate
        self.handshake_timeout = handshake_timeout
        self.backlog = backlog
        self._listeners: list[tuple[socket.socket, bool]] = []
        try:
            for address, implicit in ((listen, False), (tls_listen, True)):
                if address is None:
                    continue
                family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                self._listeners.append((sock, implicit))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(address)
                sock.listen(backlog)
        except BaseException:
            self._close_listeners()
            raise
        self._addresses = [
            (*sock.getsockname()[:2], implicit) for sock, implicit in self._listeners
        ]
        self._setup()

    def _setup(self) -> None:
        """The binding's own state, made once the listeners are bound."""

    @property
    def addresses(self) -> list[tuple[str, int, bool]]:
        """``(host, port, implicit_tls)`` of each listener."""
        return list(self._addresses)

    def _close_listeners(self) -> None:
        for sock, _ in self._listeners:
            with contextlib.suppress(OSError):
                # shutdown() wakes a thread blocked in accept(); close() alone does not.
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class ConnectPlan:
    """How a client connects, decided once for every binding: the port
    (995 for implicit TLS, 110 otherwise), the TLS context (verifying by
    default), and the attempts — a first one with CAPA and, when a server
    closes the connection on CAPA, a second one without — each with its
    connect deadline cut to what is left of the whole-operation budget."""

    def __init__(
        self,
        port: int | None,
        *,
        tls: bool,
        starttls: bool,
        timeout: float | None,
        ssl_context: ssl.SSLContext | None,
        operation_timeout: float | None,
        connect_timeout: float | None,
        clock: Callable[[], float],
    ) -> None:
        self.implicit = tls and not starttls
        self.port = port if port is not None else (POP3S_PORT if self.implicit else POP3_PORT)
        self.context = ssl_context
        if self.context is None and (self.implicit or starttls):
            import ssl

            self.context = ssl.create_default_context()
        self._timeout = timeout if connect_timeout is None else connect_timeout
        self._budget = operation_timeout
        self._clock = clock
        self._started = clock()

    def attempts(self) -> Iterator[tuple[bool, float | None, float | None]]:
        """``(ask_capa, connect_timeout, remaining_budget)`` for each attempt;
        raises ``Pop3TimeoutError`` when the operation budget is spent."""
        for capa in (True, False):
            ctimeout = self._timeout
            remaining = None
            if self._budget is not None:
                remaining = self._budget - (self._clock() - self._started)
                if remaining <= 0:
                    raise Pop3TimeoutError("the operation deadline passed")
                if ctimeout is None or remaining < ctimeout:
                    ctimeout = remaining
            yield capa, ctimeout, remaining
