"""Base64 and the APOP greeting timestamp: what the connection itself needs of
SASL, kept apart so that a session which never authenticates with SASL does
not import the mechanisms (hashing, JSON, stringprep)."""

from __future__ import annotations

import binascii

__all__ = ["SaslError", "apop_timestamp", "b64decode_strict", "b64encode"]


class SaslError(ValueError):
    """A SASL exchange cannot go on: bad local input, or an invalid message from the peer.

    The text never contains secrets or peer-supplied data.
    """


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64encode(data: bytes) -> bytes:
    """Standard padded base64 of *data*, no line breaks."""
    return binascii.b2a_base64(bytes(data), newline=False)


def b64decode_strict(data: bytes) -> bytes:
    """Decode canonical padded base64, or raise :class:`SaslError`.

    Rejects any character outside the RFC 4648 alphabet, an ``=`` that is not trailing
    padding (``=AAA``, ``AAA=BBB=``), more than two ``=``, a length that is not a multiple
    of four, and non-zero padding bits. ``b""`` decodes to ``b""``. Linear time.
    """
    data = bytes(data)
    if len(data) % 4:
        raise SaslError("invalid base64: length is not a multiple of 4")
    body = data.rstrip(b"=")
    if len(data) - len(body) > 2:
        raise SaslError("invalid base64: too much padding")
    if body.translate(None, _B64_ALPHABET):
        raise SaslError("invalid base64: character outside the alphabet")
    try:
        decoded = binascii.a2b_base64(data)
    except binascii.Error:
        raise SaslError("invalid base64") from None
    # Only the canonical encoding is accepted (RFC 4648 §3.5: pad bits must be zero).
    if binascii.b2a_base64(decoded, newline=False) != data:
        raise SaslError("invalid base64: non-canonical encoding")
    return decoded


def _msg_id_shaped(candidate: bytes) -> bool:
    # "<" local "@" domain ">", printable ASCII without SP, "<" or ">" inside, one "@".
    inner = candidate[1:-1]
    if not (candidate.startswith(b"<") and candidate.endswith(b">")) or not inner:
        return False
    if not all(0x21 <= b <= 0x7E for b in inner) or b"<" in inner or b">" in inner:
        return False
    local, at, domain = inner.partition(b"@")
    return bool(at) and bool(local) and bool(domain) and b"@" not in domain


def apop_timestamp(greeting_text: bytes) -> bytes | None:
    """The APOP timestamp announced in a greeting, or ``None``.

    Takes the first ``<`` and the first ``>`` after it; the result (angle brackets
    included) is returned only when it has msg-id shape ``<local@domain>`` in printable
    ASCII (the CVE-2007-1558 fix). Linear time on any input, no regular expression
    (CVE-2018-1060): two ``find`` calls and one scan.
    """
    text = bytes(greeting_text)
    start = text.find(b"<")
    if start < 0:
        return None
    end = text.find(b">", start + 1)
    if end < 0:
        return None
    candidate = text[start : end + 1]
    return candidate if _msg_id_shaped(candidate) else None
