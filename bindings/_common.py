"""What every binding shares: the maildrop side of the server driver's
requests, TLS facts for SASL, and address helpers. No socket code here."""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
from collections.abc import Iterator
from typing import Any, BinaryIO

from pop3proto import MaildropFailure, TLSInfo
from pop3proto import _requests as rq

from .maildrop import Maildrop, MaildropError, MaildropLocked, MaildropSession

__all__ = [
    "MaildropRunner",
    "is_loopback",
    "read_chunks",
    "server_certificate_der",
    "tls_info",
]

#: Bytes read from a stored message at a time.
CHUNK = 64 * 1024


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (where plaintext logins may be allowed)."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
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


class MaildropRunner:
    """Carries out the server driver's maildrop requests (OpenMaildrop,
    OpenMessage, Commit) on a ``Maildrop``, and releases the lock at the end."""

    def __init__(self, maildrop: Maildrop) -> None:
        self.maildrop = maildrop
        self.session: MaildropSession | None = None

    def handles(self, request: rq.Request) -> bool:
        return isinstance(request, (rq.OpenMaildrop, rq.OpenMessage, rq.Commit))

    def run(self, request: rq.Request) -> Any:
        if isinstance(request, rq.OpenMaildrop):
            try:
                self.session = self.maildrop.open(request.user)
            except MaildropLocked:
                return MaildropFailure(in_use=True)
            except MaildropError:
                return MaildropFailure()
            return [(m.size, m.uid) for m in self.session.messages]
        assert self.session is not None
        if isinstance(request, rq.OpenMessage):
            try:
                return read_chunks(self.session.open_message(request.index))
            except MaildropError:
                return None  # removed behind our back: the driver answers -ERR
        if isinstance(request, rq.Commit):
            messages = self.session.messages
            try:
                self.session.commit(messages[i].key for i in request.indexes)
            except MaildropError:
                return False
            return True
        raise TypeError(f"not a maildrop request: {request!r}")

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


def _end_point_hash(der: bytes) -> bytes:
    """RFC 5929 §4.1 tls-server-end-point: the certificate's hash with its
    signature algorithm's hash, MD5 and SHA-1 replaced by SHA-256. Without
    a certificate parser at hand, SHA-256 is used (right for the SHA-256
    signed certificates in use almost everywhere); SHA-384/512 signatures are
    recognised by their algorithm identifiers in the DER."""
    # OIDs of sha384WithRSAEncryption / ecdsa-with-SHA384 and the SHA-512 forms.
    if b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0c" in der or b"\x2a\x86\x48\xce\x3d\x04\x03\x03" in der:
        return hashlib.sha384(der).digest()
    if b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0d" in der or b"\x2a\x86\x48\xce\x3d\x04\x03\x04" in der:
        return hashlib.sha512(der).digest()
    return hashlib.sha256(der).digest()


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
    bindings: dict[str, bytes] = {}
    own_or_peer = server_cert if server_side else sslobj.getpeercert(binary_form=True)
    if own_or_peer:
        bindings["tls-server-end-point"] = _end_point_hash(own_or_peer)
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
    return ssl.PEM_cert_to_DER_cert(pem[start : end + len("-----END CERTIFICATE-----")])
