"""SASL mechanisms for both roles, APOP helpers, strict base64 and SASLprep.

Everything here is I/O-free and works on raw bytes: the connection engine does the
base64 framing of AUTH lines (RFC 5034 §4) and hands the mechanisms decoded data.

Client side: a :class:`ClientMechanism` produces the initial response and answers
challenges; :meth:`ClientMechanism.check_success` is called when ``+OK`` arrives and
raises :class:`SaslError` if the server did not prove itself (SCRAM).

Server side: a :class:`ServerMechanism` turns each client message into exactly one
:data:`ServerStep` — :class:`Challenge`, :class:`Success` or :class:`Failure`. It never
raises on anything a client sends, caps the number of rounds and the size of each
answer, and a :class:`Failure` reason is always one of a fixed set of texts, so nothing
the client sent is ever echoed back (HARDENING 20, 41).
"""

from __future__ import annotations

import abc
import base64
import hashlib
import hmac
import json
import os
import secrets
import stringprep
import unicodedata
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

import attrs

from ._codec import SaslError, apop_timestamp, b64decode_strict, b64encode

if TYPE_CHECKING:
    from ._auth import Authenticator

__all__ = [
    "AUTH_FAILED",
    "CANCELLED",
    "CB_DOWNGRADE",
    "CB_MISMATCH",
    "CB_UNSUPPORTED",
    "CHANNEL_BINDING_TYPES",
    "EXTENSION_UNSUPPORTED",
    "FAILURE_REASONS",
    "INVALID_ENCODING",
    "INVALID_IDENTITY",
    "MALFORMED",
    "MAX_IDENTITY_OCTETS",
    "MAX_SCRAM_ITERATIONS",
    "MAX_SECRET_OCTETS",
    "MAX_TOKEN_OCTETS",
    "MIN_SCRAM_ITERATIONS",
    "NOT_AUTHORIZED",
    "RESPONSE_TOO_LONG",
    "SCRAM_HASHES",
    "TOO_MANY_ROUNDS",
    "UNEXPECTED_INITIAL_RESPONSE",
    "Challenge",
    "ChannelBinding",
    "ClientMechanism",
    "CramMD5",
    "CramMD5Server",
    "External",
    "ExternalServer",
    "Failure",
    "Login",
    "LoginServer",
    "OAuthBearer",
    "OAuthBearerServer",
    "Plain",
    "PlainServer",
    "SaslError",
    "Scram",
    "ScramCredentials",
    "ScramServer",
    "ServerMechanism",
    "ServerStep",
    "Success",
    "XOAuth2",
    "XOAuth2Server",
    "apop_digest",
    "apop_timestamp",
    "authenticate_password",
    "b64decode_strict",
    "b64encode",
    "client_mechanism",
    "derive_scram_credentials",
    "make_timestamp",
    "normalize_secret",
    "prepare_identity",
    "saslprep",
    "server_mechanism",
]


# --------------------------------------------------------------------------------------
# Limits and constants
# --------------------------------------------------------------------------------------

#: Longest user name / authorization identity accepted, in UTF-8 octets. RFC 4616 §2
#: requires at least 255; a 1 KiB name is refused (HARDENING 42).
MAX_IDENTITY_OCTETS: Final = 512
#: Longest password accepted, in UTF-8 octets.
MAX_SECRET_OCTETS: Final = 1024
#: Longest bearer token accepted, in UTF-8 octets (OAuth tokens are long).
MAX_TOKEN_OCTETS: Final = 16384
#: Lowest SCRAM iteration count created or accepted (RFC 5802 §5.1, RFC 7677 §4).
MIN_SCRAM_ITERATIONS: Final = 4096
#: Highest SCRAM iteration count a client agrees to compute (a hostile server could
#: otherwise ask for billions of PBKDF2 rounds).
MAX_SCRAM_ITERATIONS: Final = 1_000_000

#: SCRAM hash names (as in the mechanism name) mapped to hashlib names.
SCRAM_HASHES: Final[Mapping[str, str]] = {"SHA-1": "sha1", "SHA-256": "sha256"}
#: Channel-binding types this library knows by name (RFC 5929, RFC 9266).
CHANNEL_BINDING_TYPES: Final = ("tls-exporter", "tls-server-end-point", "tls-unique")

_SCRAM_DIGEST_SIZES: Final[Mapping[str, int]] = {"SHA-1": 20, "SHA-256": 32}
_MAX_NONCE: Final = 256
_MAX_SALT: Final = 256

ChannelBinding = tuple[str, bytes]


# --------------------------------------------------------------------------------------
# SASLprep (RFC 4013) and identity preparation
# --------------------------------------------------------------------------------------

_UCD32 = unicodedata.ucd_3_2_0

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def _printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()


def saslprep(text: str, *, allow_unassigned: bool = False) -> str:
    """Prepare *text* with the SASLprep profile of stringprep (RFC 4013).

    ``allow_unassigned=False`` treats *text* as a stored string, ``True`` as a query.
    Raises :class:`SaslError` for prohibited characters (controls, private use, ...),
    unassigned code points in a stored string, or bidi rule violations. Printable
    ASCII is returned unchanged.
    """
    if _printable_ascii(text):
        return text
    mapped = []
    for ch in text:
        if stringprep.in_table_c12(ch):
            mapped.append(" ")  # RFC 4013 §2.1: non-ASCII space -> SPACE
        elif not stringprep.in_table_b1(ch):  # commonly mapped to nothing
            mapped.append(ch)
    result = _UCD32.normalize("NFKC", "".join(mapped))
    for ch in result:
        if any(table(ch) for table in _PROHIBITED):
            raise SaslError("SASLprep: prohibited character")
        if not allow_unassigned and stringprep.in_table_a1(ch):
            raise SaslError("SASLprep: unassigned code point")
    # RFC 3454 §6: bidirectional text rules.
    if any(stringprep.in_table_d1(ch) for ch in result):
        if any(stringprep.in_table_d2(ch) for ch in result):
            raise SaslError("SASLprep: mixed bidirectional text")
        if not (stringprep.in_table_d1(result[0]) and stringprep.in_table_d1(result[-1])):
            raise SaslError("SASLprep: bidirectional text must start and end right-to-left")
    return result


def normalize_secret(secret: str) -> str:
    """The form of a password that is hashed or compared: SASLprep as a stored string.

    RFC 5802 §2.2 ``Normalize()``. When preparation fails (a control character, an
    unassigned code point) or yields an empty string, the password is used as is, so
    every password still works; both roles of this library use this one function.
    """
    try:
        prepared = saslprep(secret)
    except SaslError:
        return secret
    return prepared or secret


def _has_control(text: str) -> bool:
    return any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in text)


def prepare_identity(name: str) -> str:
    """Validate and prepare a user name or authorization identity.

    Refuses (with :class:`SaslError`) an empty name, control characters (CR, LF, NUL and
    the other C0/C1 controls), more than :data:`MAX_IDENTITY_OCTETS` octets of UTF-8 and
    names that SASLprep (as a query, RFC 4013) rejects. Returns the prepared name, which
    is what credential stores are keyed by.
    """
    if not name:
        raise SaslError("empty identity")
    if _has_control(name):
        raise SaslError("control character in identity")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_IDENTITY_OCTETS:
        raise SaslError("identity too long")
    prepared = saslprep(name, allow_unassigned=True)
    if not prepared:
        raise SaslError("identity is empty after preparation")
    if len(prepared.encode("utf-8", "surrogatepass")) > MAX_IDENTITY_OCTETS:
        raise SaslError("identity too long")
    return prepared


def _check_client_text(value: str, what: str, *, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise SaslError(f"{what} must be a str")
    if not value and not allow_empty:
        raise SaslError(f"{what} is empty")
    if "\0" in value or "\r" in value or "\n" in value:
        raise SaslError(f"{what} contains NUL, CR or LF")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SaslError(f"{what} is not valid Unicode text") from None


def _encode_saslname(name: str) -> str:
    # RFC 5802 §7: "," and "=" are escaped inside saslname.
    return name.replace("=", "=3D").replace(",", "=2C")


def _decode_saslname(text: str) -> str:
    if "=" not in text:
        return text
    pieces = text.split("=")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if piece.startswith("2C"):
            out.append("," + piece[2:])
        elif piece.startswith("3D"):
            out.append("=" + piece[2:])
        else:
            raise SaslError("invalid saslname escape")
    return "".join(out)


def _valid_nonce(nonce: str) -> bool:
    # RFC 5802 §7: printable ASCII except ",".
    return 0 < len(nonce) <= _MAX_NONCE and _printable_ascii(nonce) and "," not in nonce


def _valid_cb_type(name: str) -> bool:
    # RFC 5056 §7: channel-binding type names are letters, digits, "." and "-".
    return 0 < len(name) <= 64 and name.isascii() and all(ch.isalnum() or ch in ".-" for ch in name)


def _is_attribute(text: str) -> bool:
    return len(text) >= 2 and text[1] == "=" and text[0].isascii() and text[0].isalpha()


# --------------------------------------------------------------------------------------
# APOP (RFC 1939 §7) and msg-id style timestamps
# --------------------------------------------------------------------------------------


def apop_digest(timestamp: bytes, secret: str) -> str:
    """The APOP digest: lower-case hex MD5 of the timestamp (angle brackets included)
    followed by the secret as UTF-8 (prepared with :func:`normalize_secret`)."""
    data = bytes(timestamp) + normalize_secret(secret).encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def make_timestamp(domain: str = "localhost") -> bytes:
    """A fresh msg-id style string ``<random.random@domain>`` for an APOP greeting or a
    CRAM-MD5 challenge (RFC 1939 §7, RFC 2195 §2). Unique with overwhelming probability;
    uses no clock. Raises :class:`SaslError` if *domain* is not a plain host name."""
    if not domain or not _printable_ascii(domain) or any(c in domain for c in " <>@"):
        raise SaslError("invalid domain for a timestamp")
    stamp = f"<{secrets.randbelow(10**10)}.{secrets.randbelow(10**12)}@{domain}>"
    return stamp.encode("ascii")


# --------------------------------------------------------------------------------------
# SCRAM primitives
# --------------------------------------------------------------------------------------


@attrs.frozen(repr=False)
class ScramCredentials:
    """What a server stores for SCRAM (RFC 5802 §2.2): no plaintext, no SaltedPassword.

    ``hash_name`` is ``"SHA-1"`` or ``"SHA-256"``; ``stored_key`` and ``server_key``
    have the hash's digest size. The repr hides the keys.
    """

    hash_name: str
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:
        return f"ScramCredentials(hash_name={self.hash_name!r}, iterations={self.iterations})"


def _hashlib_name(hash_name: str) -> str:
    try:
        return SCRAM_HASHES[hash_name]
    except KeyError:
        raise SaslError("unsupported SCRAM hash") from None


def _salted_password(hash_name: str, password: str, salt: bytes, iterations: int) -> bytes:
    secret = normalize_secret(password).encode("utf-8")
    return hashlib.pbkdf2_hmac(_hashlib_name(hash_name), secret, salt, iterations)


def _hmac(hash_name: str, key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, SCRAM_HASHES[hash_name]).digest()


def _hash(hash_name: str, data: bytes) -> bytes:
    return hashlib.new(SCRAM_HASHES[hash_name], data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def derive_scram_credentials(
    hash_name: str, password: str, salt: bytes, iterations: int
) -> ScramCredentials:
    """Compute StoredKey and ServerKey from a password (RFC 5802 §3).

    No policy here (see ``make_scram_verifier`` for the iteration floor and a random
    salt); raises :class:`SaslError` for an unknown hash name or iterations < 1.
    """
    if iterations < 1:
        raise SaslError("iteration count must be positive")
    salted = _salted_password(hash_name, password, salt, iterations)
    client_key = _hmac(hash_name, salted, b"Client Key")
    return ScramCredentials(
        hash_name=hash_name,
        iterations=iterations,
        salt=bytes(salt),
        stored_key=_hash(hash_name, client_key),
        server_key=_hmac(hash_name, salted, b"Server Key"),
    )


# --------------------------------------------------------------------------------------
# Client mechanisms
# --------------------------------------------------------------------------------------


class ClientMechanism(abc.ABC):
    """The client half of one SASL exchange.

    ``initial_response()`` is side-effect free and returns the same value every time:
    ``None`` for a server-first mechanism (nothing is sent with AUTH), ``b""`` for an
    empty initial response. Whether or not the engine sent it, an empty first challenge
    is answered with the client-first message. ``respond()`` answers one challenge or
    raises :class:`SaslError` (the caller then cancels with ``*``); more than
    ``max_rounds`` challenges is an error. ``check_success()`` is called on ``+OK`` and
    raises :class:`SaslError` if the exchange is not a proven success.
    """

    name: str
    max_rounds: int = 10

    def __init__(self) -> None:
        self._rounds = 0

    @abc.abstractmethod
    def initial_response(self) -> bytes | None:
        """The client-first message, or ``None`` for a server-first mechanism."""

    def respond(self, challenge: bytes) -> bytes:
        """The answer to one decoded server challenge."""
        self._rounds += 1
        if self._rounds > self.max_rounds:
            raise SaslError("too many SASL challenges")
        return self._respond(bytes(challenge))

    @abc.abstractmethod
    def _respond(self, challenge: bytes) -> bytes: ...

    def check_success(self) -> None:
        """Raise :class:`SaslError` unless ``+OK`` is acceptable at this point."""
        return None


class Plain(ClientMechanism):
    """PLAIN (RFC 4616): ``authzid NUL authcid NUL password``, client-first."""

    name = "PLAIN"

    def __init__(self, user: str, password: str, authzid: str = "") -> None:
        super().__init__()
        _check_client_text(user, "user name", allow_empty=False)
        _check_client_text(password, "password", allow_empty=False)
        _check_client_text(authzid, "authorization identity", allow_empty=True)
        self._message = f"{authzid}\0{user}\0{password}".encode()

    def initial_response(self) -> bytes:
        return self._message

    def _respond(self, challenge: bytes) -> bytes:
        if challenge or self._rounds > 1:
            raise SaslError("unexpected PLAIN challenge")
        return self._message


class Login(ClientMechanism):
    """LOGIN (draft-murchison-sasl-login): user name, then password; server-first.

    Challenge texts are ignored, as the draft says (§2.1); a third challenge is an error.
    """

    name = "LOGIN"

    def __init__(self, user: str, password: str) -> None:
        super().__init__()
        _check_client_text(user, "user name", allow_empty=False)
        _check_client_text(password, "password", allow_empty=False)
        self._answers = (user.encode(), password.encode())

    def initial_response(self) -> bytes | None:
        return None

    def _respond(self, challenge: bytes) -> bytes:
        if self._rounds > len(self._answers):
            raise SaslError("unexpected LOGIN challenge")
        return self._answers[self._rounds - 1]


class CramMD5(ClientMechanism):
    """CRAM-MD5 (RFC 2195): ``user SP hex(HMAC-MD5(password, challenge))``; server-first."""

    name = "CRAM-MD5"

    def __init__(self, user: str, password: str) -> None:
        super().__init__()
        _check_client_text(user, "user name", allow_empty=False)
        _check_client_text(password, "password", allow_empty=False)
        self._user = user
        self._key = normalize_secret(password).encode()

    def initial_response(self) -> bytes | None:
        return None

    def _respond(self, challenge: bytes) -> bytes:
        if self._rounds > 1:
            raise SaslError("unexpected CRAM-MD5 challenge")
        if not challenge:
            raise SaslError("empty CRAM-MD5 challenge")
        digest = hmac.new(self._key, challenge, "md5").hexdigest()
        return f"{self._user} {digest}".encode()


class Scram(ClientMechanism):
    """SCRAM-SHA-1 / SCRAM-SHA-256 and their -PLUS forms (RFC 5802, RFC 7677, RFC 9266).

    ``channel_binding`` is ``(type, data)`` from the TLS layer. With ``plus=True`` the
    client binds to it (gs2 flag ``p=type``, name ``...-PLUS``); without, the flag is
    ``y`` when the client has channel-binding data but ``server_offers_plus`` is false
    (RFC 5802 §6: the server detects a stripped -PLUS), else ``n``. The client checks
    that the server nonce extends its own, refuses iteration counts outside
    ``[min_iterations, max_iterations]``, and verifies the server signature ``v=``;
    ``check_success()`` fails unless that verification happened.
    """

    def __init__(
        self,
        hash_name: str,
        user: str,
        password: str,
        *,
        authzid: str = "",
        channel_binding: ChannelBinding | None = None,
        plus: bool = False,
        server_offers_plus: bool = False,
        nonce: str | None = None,
        min_iterations: int = MIN_SCRAM_ITERATIONS,
        max_iterations: int = MAX_SCRAM_ITERATIONS,
    ) -> None:
        super().__init__()
        _hashlib_name(hash_name)
        _check_client_text(user, "user name", allow_empty=False)
        _check_client_text(password, "password", allow_empty=False)
        _check_client_text(authzid, "authorization identity", allow_empty=True)
        self.hash_name = hash_name
        self.name = f"SCRAM-{hash_name}" + ("-PLUS" if plus else "")
        cb_data = b""
        if plus:
            if channel_binding is None:
                raise SaslError("a -PLUS mechanism needs channel-binding data")
            cb_type, cb_data = channel_binding
            if not _valid_cb_type(cb_type):
                raise SaslError("invalid channel-binding type name")
            flag = "p=" + cb_type
        elif channel_binding is not None and not server_offers_plus:
            flag = "y"
        else:
            flag = "n"
        if nonce is None:
            nonce = base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        elif not _valid_nonce(nonce):
            raise SaslError("invalid SCRAM nonce")
        authz = "a=" + _encode_saslname(authzid) if authzid else ""
        self._gs2_header = f"{flag},{authz},".encode()
        self._cbind_input = self._gs2_header + bytes(cb_data)
        self._nonce = nonce
        self._first_bare = f"n={_encode_saslname(user)},r={nonce}".encode()
        self._password = password
        self._min_iterations = min_iterations
        self._max_iterations = max_iterations
        self._server_signature = b""
        self._state = "first"  # -> "final" -> "verified"

    def initial_response(self) -> bytes:
        return self._gs2_header + self._first_bare

    def _respond(self, challenge: bytes) -> bytes:
        if self._state == "first":
            if not challenge:
                return self.initial_response()
            return self._client_final(challenge)
        if self._state == "final":
            return self._verify_server_final(challenge)
        raise SaslError("unexpected challenge after the SCRAM server signature")

    def _client_final(self, server_first: bytes) -> bytes:
        try:
            text = server_first.decode("ascii")
        except UnicodeDecodeError:
            raise SaslError("SCRAM server-first message is not ASCII") from None
        fields = text.split(",")
        if fields[0].startswith("m="):
            raise SaslError("SCRAM server requires an unsupported extension")
        if (
            len(fields) < 3
            or not fields[0].startswith("r=")
            or not fields[1].startswith("s=")
            or not fields[2].startswith("i=")
            or not all(_is_attribute(f) for f in fields[3:])
        ):
            raise SaslError("malformed SCRAM server-first message")
        nonce = fields[0][2:]
        if not _valid_nonce(nonce) or not nonce.startswith(self._nonce) or nonce == self._nonce:
            raise SaslError("SCRAM server nonce does not extend the client nonce")
        salt = b64decode_strict(fields[1][2:].encode())
        if not salt or len(salt) > _MAX_SALT:
            raise SaslError("invalid SCRAM salt")
        digits = fields[2][2:]
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 10 or digits[0] == "0":
            raise SaslError("invalid SCRAM iteration count")
        iterations = int(digits)
        if not self._min_iterations <= iterations <= self._max_iterations:
            raise SaslError("SCRAM iteration count outside the accepted range")

        h = self.hash_name
        salted = _salted_password(h, self._password, salt, iterations)
        client_key = _hmac(h, salted, b"Client Key")
        stored_key = _hash(h, client_key)
        without_proof = b"c=" + b64encode(self._cbind_input) + b",r=" + nonce.encode()
        auth_message = self._first_bare + b"," + server_first + b"," + without_proof
        proof = _xor(client_key, _hmac(h, stored_key, auth_message))
        self._server_signature = _hmac(h, _hmac(h, salted, b"Server Key"), auth_message)
        self._state = "final"
        return without_proof + b",p=" + b64encode(proof)

    def _verify_server_final(self, server_final: bytes) -> bytes:
        try:
            text = server_final.decode("ascii")
        except UnicodeDecodeError:
            raise SaslError("SCRAM server-final message is not ASCII") from None
        first = text.split(",", 1)[0]
        if first.startswith("e="):
            value = first[2:]
            known = value if value.replace("-", "").isalpha() and len(value) < 64 else ""
            raise SaslError(f"SCRAM server reported an error: {known or 'other-error'}")
        if not first.startswith("v="):
            raise SaslError("malformed SCRAM server-final message")
        signature = b64decode_strict(first[2:].encode())
        if not hmac.compare_digest(signature, self._server_signature):
            raise SaslError("SCRAM server signature does not verify")
        self._state = "verified"
        return b""

    def check_success(self) -> None:
        if self._state != "verified":
            raise SaslError("server accepted SCRAM without proving it knows the password")


class _BearerToken(ClientMechanism):
    """What OAUTHBEARER and XOAUTH2 share: one client-first message; a JSON
    error challenge is answered with ``_ERROR_REPLY``, its ``status`` kept in
    :attr:`error_status`, and ``+OK`` after it is refused by
    ``check_success()``."""

    _ERROR_REPLY: bytes

    def __init__(self, message: bytes) -> None:
        super().__init__()
        self._message = message
        self._state = "first"
        #: ``status`` from the server's error challenge, if one arrived.
        self.error_status: str | None = None

    def initial_response(self) -> bytes:
        return self._message

    def _respond(self, challenge: bytes) -> bytes:
        if self._state == "first":
            if not challenge:
                return self._message
            self._state = "error"
            self.error_status = _json_status(challenge)
            return self._ERROR_REPLY
        raise SaslError(f"unexpected {self.name} challenge")

    def check_success(self) -> None:
        if self._state == "error":
            raise SaslError(f"server accepted {self.name} after reporting an error")


class OAuthBearer(_BearerToken):
    """OAUTHBEARER (RFC 7628), client-first.

    An error challenge (JSON) is answered with ``b"\\x01"``; its ``status`` is kept in
    :attr:`error_status`, and ``+OK`` after it is refused by ``check_success()``.
    """

    name = "OAUTHBEARER"
    # RFC 7628 §3.2.3: the client answers an error with a single ^A.
    _ERROR_REPLY = b"\x01"

    def __init__(
        self, user: str, token: str, host: str | None = None, port: int | None = None
    ) -> None:
        _check_client_text(user, "user name", allow_empty=True)
        _check_client_text(token, "token", allow_empty=False)
        if "\x01" in token or "\x01" in user:
            raise SaslError("OAUTHBEARER fields cannot contain ^A")
        pairs = []
        if host is not None:
            _check_client_text(host, "host", allow_empty=False)
            if "\x01" in host:
                raise SaslError("OAUTHBEARER fields cannot contain ^A")
            pairs.append(f"host={host}\x01")
        if port is not None:
            if not 0 < port < 65536:
                raise SaslError("port out of range")
            pairs.append(f"port={port}\x01")
        pairs.append(f"auth=Bearer {token}\x01")
        authz = "a=" + _encode_saslname(user) if user else ""
        super().__init__(f"n,{authz},\x01{''.join(pairs)}\x01".encode())


class XOAuth2(_BearerToken):
    """XOAUTH2 (Google, Microsoft 365): ``user=U ^A auth=Bearer T ^A ^A``, client-first.

    An error challenge (JSON) is answered with an empty line, as Google requires.
    """

    name = "XOAUTH2"
    _ERROR_REPLY = b""  # an empty line, as Google requires

    def __init__(self, user: str, token: str) -> None:
        _check_client_text(user, "user name", allow_empty=False)
        _check_client_text(token, "token", allow_empty=False)
        if "\x01" in token or "\x01" in user:
            raise SaslError("XOAUTH2 fields cannot contain ^A")
        super().__init__(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


class External(ClientMechanism):
    """EXTERNAL (RFC 4422 App. A): the authorization identity, possibly empty."""

    name = "EXTERNAL"

    def __init__(self, authzid: str = "") -> None:
        super().__init__()
        _check_client_text(authzid, "authorization identity", allow_empty=True)
        self._message = authzid.encode()

    def initial_response(self) -> bytes:
        return self._message

    def _respond(self, challenge: bytes) -> bytes:
        if challenge or self._rounds > 1:
            raise SaslError("unexpected EXTERNAL challenge")
        return self._message


def _json_status(challenge: bytes) -> str | None:
    try:
        doc = json.loads(challenge.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    status = doc.get("status") if isinstance(doc, dict) else None
    return status if isinstance(status, str) and _printable_ascii(status) else None


_CLIENT_NAMES: Final = (
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-256-PLUS",
    "OAUTHBEARER",
    "XOAUTH2",
    "EXTERNAL",
)


def client_mechanism(
    name: str,
    *,
    user: str,
    password: str | None = None,
    token: str | None = None,
    authzid: str = "",
    channel_binding: ChannelBinding | None = None,
    server_offers_plus: bool = False,
    host: str | None = None,
    port: int | None = None,
    nonce: str | None = None,
) -> ClientMechanism:
    """Build the client mechanism called *name* (case-insensitive).

    Raises :class:`SaslError` for an unknown name, a missing password or token, or a
    -PLUS name without channel-binding data. ``server_offers_plus`` says whether the
    server advertised the -PLUS form of the chosen SCRAM mechanism.
    """
    upper = name.upper()
    if upper not in _CLIENT_NAMES:
        raise SaslError("unsupported SASL mechanism")
    if upper in ("OAUTHBEARER", "XOAUTH2"):
        if token is None:
            raise SaslError(f"{upper} needs a token")
        if upper == "OAUTHBEARER":
            return OAuthBearer(user, token, host, port)
        return XOAuth2(user, token)
    if upper == "EXTERNAL":
        return External(authzid)
    if password is None:
        raise SaslError(f"{upper} needs a password")
    if upper == "PLAIN":
        return Plain(user, password, authzid)
    if upper == "LOGIN":
        return Login(user, password)
    if upper == "CRAM-MD5":
        return CramMD5(user, password)
    plus = upper.endswith("-PLUS")
    hash_name = upper[len("SCRAM-") :].removesuffix("-PLUS")
    return Scram(
        hash_name,
        user,
        password,
        authzid=authzid,
        channel_binding=channel_binding,
        plus=plus,
        server_offers_plus=server_offers_plus or plus,
        nonce=nonce,
    )


# --------------------------------------------------------------------------------------
# Server steps
# --------------------------------------------------------------------------------------


@attrs.frozen
class Challenge:
    """Send ``data`` to the client as a ``+ base64`` line and wait for its answer."""

    data: bytes


@attrs.frozen
class Success:
    """Authentication succeeded; the session acts as ``user`` (a prepared identity)."""

    user: str


@attrs.frozen
class Failure:
    """Authentication failed: answer ``-ERR``, with response code ``code`` if not None.

    ``reason`` is one of a fixed set of texts; it never contains client data.
    """

    reason: str
    code: str | None = None


ServerStep = Challenge | Success | Failure

# The only failures a server mechanism returns. Unknown user and wrong password are
# the same object on purpose (HARDENING 36).
AUTH_FAILED: Final = Failure("authentication failed", "AUTH")
NOT_AUTHORIZED: Final = Failure("not authorized to act as that identity", "AUTH")
INVALID_IDENTITY: Final = Failure("invalid user name or authorization identity", "AUTH")
INVALID_ENCODING: Final = Failure("invalid UTF-8 in SASL message", None)
MALFORMED: Final = Failure("malformed SASL message", None)
UNEXPECTED_INITIAL_RESPONSE: Final = Failure("mechanism does not take an initial response", None)
TOO_MANY_ROUNDS: Final = Failure("too many SASL rounds", None)
RESPONSE_TOO_LONG: Final = Failure("SASL response too long", None)
CANCELLED: Final = Failure("authentication cancelled", None)
EXTENSION_UNSUPPORTED: Final = Failure("SCRAM extension not supported", None)
CB_DOWNGRADE: Final = Failure("server supports channel binding", "AUTH")
CB_UNSUPPORTED: Final = Failure("channel binding type not supported", "AUTH")
CB_MISMATCH: Final = Failure("channel binding mismatch", "AUTH")
#: Every failure reason a server mechanism can produce.
FAILURE_REASONS: Final = frozenset(
    f.reason
    for f in (
        AUTH_FAILED,
        NOT_AUTHORIZED,
        INVALID_IDENTITY,
        INVALID_ENCODING,
        MALFORMED,
        UNEXPECTED_INITIAL_RESPONSE,
        TOO_MANY_ROUNDS,
        RESPONSE_TOO_LONG,
        CANCELLED,
        EXTENSION_UNSUPPORTED,
        CB_DOWNGRADE,
        CB_UNSUPPORTED,
        CB_MISMATCH,
    )
)


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def authenticate_password(
    authenticator: Authenticator, user: str, password: str, authzid: str = ""
) -> Success | Failure:
    """Check a presented user name and password (USER/PASS, PLAIN, LOGIN).

    The password is always checked (the authenticator does equal work for unknown users),
    and an unknown user gets the same :data:`AUTH_FAILED` as a wrong password. A
    non-empty *authzid* other than the user needs ``authenticator.may_act_as``.
    """
    try:
        authcid = prepare_identity(user)
        authz = prepare_identity(authzid) if authzid else ""
    except SaslError:
        return INVALID_IDENTITY
    if len(password.encode("utf-8", "surrogatepass")) > MAX_SECRET_OCTETS or not password:
        return AUTH_FAILED
    if not authenticator.check_password(authcid, password):
        return AUTH_FAILED
    if authz and authz != authcid and not authenticator.may_act_as(authcid, authz):
        return NOT_AUTHORIZED
    return Success(authz or authcid)


class ServerMechanism(abc.ABC):
    """The server half of one SASL exchange.

    Call :meth:`start` once with the decoded initial response (``None`` if AUTH had
    none), then :meth:`step` with each decoded client answer until a :class:`Success`
    or :class:`Failure` comes back; :meth:`cancel` when the client sends ``*``. A
    client-first mechanism without an initial response answers with an empty
    :class:`Challenge`; a server-first one given an initial response fails (RFC 5034
    §4). More than ``max_rounds`` answers, or an answer over ``max_response`` octets,
    fails. Nothing a client sends makes these methods raise; calling them out of order
    raises :class:`SaslError`. Exceptions raised by the authenticator propagate.
    """

    name: str
    client_first: bool = True
    max_rounds: int = 10
    max_response: int = 65536

    def __init__(self) -> None:
        self._started = False
        self._done = False
        self._rounds = 0
        self._awaiting_first = False

    @property
    def done(self) -> bool:
        """True once a :class:`Success` or :class:`Failure` was returned."""
        return self._done

    def start(self, initial_response: bytes | None) -> ServerStep:
        """Begin the exchange (the AUTH command)."""
        if self._started:
            raise SaslError("SASL exchange already started")
        self._started = True
        if not self.client_first:
            if initial_response is not None:
                return self._finish(UNEXPECTED_INITIAL_RESPONSE)
            return self._finish(self._server_first())
        if initial_response is None:
            self._awaiting_first = True
            return Challenge(b"")
        return self._run(bytes(initial_response), self._client_first)

    def step(self, response: bytes) -> ServerStep:
        """Process the client's answer to the last challenge."""
        if not self._started or self._done:
            raise SaslError("no SASL exchange in progress")
        self._rounds += 1
        if self._rounds > self.max_rounds:
            return self._finish(TOO_MANY_ROUNDS)
        if self._awaiting_first:
            self._awaiting_first = False
            return self._run(bytes(response), self._client_first)
        return self._run(bytes(response), self._next)

    def cancel(self) -> Failure:
        """The client sent ``*``: the exchange ends in failure (RFC 5034 §4)."""
        self._done = True
        return CANCELLED

    def _run(self, data: bytes, handler: Callable[[bytes], ServerStep]) -> ServerStep:
        if len(data) > self.max_response:
            return self._finish(RESPONSE_TOO_LONG)
        return self._finish(handler(data))

    def _finish(self, result: ServerStep) -> ServerStep:
        if not isinstance(result, Challenge):
            self._done = True
        return result

    def _client_first(self, data: bytes) -> ServerStep:
        """Handle the first client message (client-first mechanisms)."""
        return MALFORMED

    def _server_first(self) -> ServerStep:
        """The first challenge (server-first mechanisms)."""
        return MALFORMED

    @abc.abstractmethod
    def _next(self, data: bytes) -> ServerStep:
        """Handle a later client message."""


class PlainServer(ServerMechanism):
    """Server PLAIN (RFC 4616): one client message, checked by the authenticator."""

    name = "PLAIN"

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self._auth = authenticator

    def _client_first(self, data: bytes) -> ServerStep:
        parts = data.split(b"\0")
        if len(parts) != 3:
            return MALFORMED
        fields = [_utf8(p) for p in parts]
        authzid, authcid, password = fields
        if authzid is None or authcid is None or password is None:
            return INVALID_ENCODING
        return authenticate_password(self._auth, authcid, password, authzid)

    def _next(self, data: bytes) -> ServerStep:
        return MALFORMED


class LoginServer(ServerMechanism):
    """Server LOGIN: challenges ``Username:`` then ``Password:`` (draft §2.2)."""

    name = "LOGIN"
    client_first = False

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self._auth = authenticator
        self._user: str | None = None

    def _server_first(self) -> ServerStep:
        return Challenge(b"Username:")

    def _next(self, data: bytes) -> ServerStep:
        text = _utf8(data)
        if text is None:
            return INVALID_ENCODING
        if self._user is None:
            self._user = text
            return Challenge(b"Password:")
        return authenticate_password(self._auth, self._user, text)


class CramMD5Server(ServerMechanism):
    """Server CRAM-MD5 (RFC 2195). Needs plaintext-equivalent secrets in the authenticator.

    ``challenge`` overrides the random ``<n.n@hostname>`` challenge (for test vectors).
    """

    name = "CRAM-MD5"
    client_first = False

    def __init__(
        self,
        authenticator: Authenticator,
        *,
        hostname: str = "localhost",
        challenge: bytes | None = None,
    ) -> None:
        super().__init__()
        self._auth = authenticator
        self._challenge = bytes(challenge) if challenge is not None else make_timestamp(hostname)

    def _server_first(self) -> ServerStep:
        return Challenge(self._challenge)

    def _next(self, data: bytes) -> ServerStep:
        text = _utf8(data)
        if text is None:
            return INVALID_ENCODING
        user, sep, digest = text.rpartition(" ")
        digest = digest.lower()
        if not sep or len(digest) != 32 or not all(c in "0123456789abcdef" for c in digest):
            return MALFORMED
        try:
            user = prepare_identity(user)
        except SaslError:
            return INVALID_IDENTITY
        if not self._auth.check_cram_md5(user, self._challenge, digest):
            return AUTH_FAILED
        return Success(user)


_FAKE_SALT_KEY: Final = secrets.token_bytes(32)


def _fake_scram_credentials(hash_name: str, user: str) -> ScramCredentials:
    # RFC 5802 §9: for an unknown user, answer as if the user existed. The salt is stable
    # per user name (so two probes look like a real account); the keys are random and
    # never verify.
    salt = hmac.new(_FAKE_SALT_KEY, f"{hash_name}\0{user}".encode(), "sha256").digest()[:16]
    size = _SCRAM_DIGEST_SIZES[hash_name]
    return ScramCredentials(
        hash_name=hash_name,
        iterations=MIN_SCRAM_ITERATIONS,
        salt=salt,
        stored_key=os.urandom(size),
        server_key=os.urandom(size),
    )


def _channel_bindings(
    channel_binding: ChannelBinding | Mapping[str, bytes] | None,
) -> dict[str, bytes]:
    if channel_binding is None:
        return {}
    if isinstance(channel_binding, tuple):
        cb_type, data = channel_binding
        return {cb_type: bytes(data)}
    return {k: bytes(v) for k, v in channel_binding.items()}


class ScramServer(ServerMechanism):
    """Server SCRAM-SHA-1 / SCRAM-SHA-256 and -PLUS (RFC 5802, RFC 7677, RFC 9266).

    ``channel_binding`` is the TLS channel-binding data the binding can supply, as
    ``(type, data)`` or a mapping of several types. When it is present the server
    supports channel binding, so a client flag ``y`` fails (downgrade, RFC 5802 §6). A
    -PLUS instance requires flag ``p=`` with a supplied type; the bare one refuses
    ``p=``. ``c=`` is always checked. The server signature is sent as a final
    :class:`Challenge` ``v=...``; the client's empty answer then gives :class:`Success`
    (RFC 5034 §4). An unknown user gets a stable fake salt and, after the proof, the
    same failure as a wrong password. ``nonce`` fixes the server nonce part (tests).
    """

    def __init__(
        self,
        hash_name: str,
        authenticator: Authenticator,
        *,
        plus: bool = False,
        channel_binding: ChannelBinding | Mapping[str, bytes] | None = None,
        nonce: str | None = None,
    ) -> None:
        super().__init__()
        _hashlib_name(hash_name)
        self._bindings = _channel_bindings(channel_binding)
        if plus and not self._bindings:
            raise SaslError("a -PLUS mechanism needs channel-binding data")
        if nonce is not None and not _valid_nonce(nonce):
            raise SaslError("invalid SCRAM nonce")
        self.hash_name = hash_name
        self.name = f"SCRAM-{hash_name}" + ("-PLUS" if plus else "")
        self._plus = plus
        self._auth = authenticator
        self._server_nonce = nonce
        self._state = "first"
        self._gs2_header = b""
        self._cbind_data = b""
        self._first_bare = b""
        self._server_first_msg = b""
        self._nonce = ""
        self._user = ""
        self._authzid = ""
        self._creds: ScramCredentials | None = None

    def _client_first(self, data: bytes) -> ServerStep:
        text = _utf8(data)
        if text is None:
            return INVALID_ENCODING
        parts = text.split(",", 2)
        if len(parts) != 3:
            return MALFORMED
        flag, authz_part, bare = parts
        if flag == "n":
            if self._plus:
                return CB_MISMATCH
            self._cbind_data = b""
        elif flag == "y":
            if self._bindings:
                return CB_DOWNGRADE
            self._cbind_data = b""
        elif flag.startswith("p="):
            cb_type = flag[2:]
            if not self._plus:
                return CB_MISMATCH
            if cb_type not in self._bindings:
                return CB_UNSUPPORTED
            self._cbind_data = self._bindings[cb_type]
        else:
            return MALFORMED
        fields = bare.split(",")
        if fields[0].startswith("m="):
            return EXTENSION_UNSUPPORTED
        if (
            len(fields) < 2
            or not fields[0].startswith("n=")
            or not fields[1].startswith("r=")
            or not all(_is_attribute(f) for f in fields[2:])
        ):
            return MALFORMED
        if authz_part and not authz_part.startswith("a="):
            return MALFORMED
        client_nonce = fields[1][2:]
        if not _valid_nonce(client_nonce):
            return MALFORMED
        try:
            user = prepare_identity(_decode_saslname(fields[0][2:]))
            authzid = prepare_identity(_decode_saslname(authz_part[2:])) if authz_part else ""
        except SaslError:
            return INVALID_IDENTITY
        creds = self._auth.scram_credentials(user, self.hash_name)
        if creds is None or creds.hash_name != self.hash_name:
            creds = _fake_scram_credentials(self.hash_name, user)
        server_nonce = self._server_nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._nonce = client_nonce + server_nonce
        self._server_first_msg = (
            f"r={self._nonce},s={base64.b64encode(creds.salt).decode()},i={creds.iterations}"
        ).encode()
        self._gs2_header = data[: len(data) - len(bare.encode())]
        self._first_bare = bare.encode()
        self._user, self._authzid, self._creds = user, authzid, creds
        self._state = "final"
        return Challenge(self._server_first_msg)

    def _next(self, data: bytes) -> ServerStep:
        if self._state == "final":
            return self._client_final(data)
        # After v=, the client's answer must be empty (RFC 5034 §4).
        return Success(self._authzid or self._user) if not data else MALFORMED

    def _client_final(self, data: bytes) -> ServerStep:
        text = _utf8(data)
        if text is None:
            return INVALID_ENCODING
        cut = text.rfind(",p=")
        if cut < 0:
            return MALFORMED
        without_proof, proof_text = text[:cut], text[cut + 3 :]
        fields = without_proof.split(",")
        if (
            len(fields) < 2
            or not fields[0].startswith("c=")
            or not fields[1].startswith("r=")
            or not all(_is_attribute(f) for f in fields[2:])
        ):
            return MALFORMED
        try:
            cbind = b64decode_strict(fields[0][2:].encode())
            proof = b64decode_strict(proof_text.encode())
        except SaslError:
            return MALFORMED
        if fields[1][2:] != self._nonce:
            return MALFORMED
        if not hmac.compare_digest(cbind, self._gs2_header + self._cbind_data):
            return CB_MISMATCH
        creds = self._creds
        assert creds is not None
        h = self.hash_name
        auth_message = (
            self._first_bare + b"," + self._server_first_msg + b"," + without_proof.encode()
        )
        signature = _hmac(h, creds.stored_key, auth_message)
        if len(proof) != len(signature):
            return AUTH_FAILED
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(_hash(h, client_key), creds.stored_key):
            return AUTH_FAILED
        if (
            self._authzid
            and self._authzid != self._user
            and not self._auth.may_act_as(self._user, self._authzid)
        ):
            return NOT_AUTHORIZED
        self._state = "verified"
        return Challenge(b"v=" + b64encode(_hmac(h, creds.server_key, auth_message)))


def _parse_kvpairs(body: str) -> dict[str, str] | None:
    # "key=value^A"* ; keys are 1*ALPHA (RFC 7628 §3.1).
    items = body.split("\x01")
    if items[-1] != "":
        return None
    result: dict[str, str] = {}
    for item in items[:-1]:
        key, eq, value = item.partition("=")
        if not eq or not key or not (key.isascii() and key.isalpha()):
            return None
        result.setdefault(key, value)
    return result


def _bearer_token(auth_value: str) -> str | None:
    scheme, sep, token = auth_value.partition(" ")
    token = token.strip(" ")
    if not sep or scheme.lower() != "bearer" or not token:
        return None
    if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_OCTETS:
        return None
    return token


class OAuthBearerServer(ServerMechanism):
    """Server OAUTHBEARER (RFC 7628).

    The token is checked with ``authenticator.check_token``; on failure the server sends
    a JSON error challenge (``status`` ``invalid_token``, plus ``scope`` and
    ``openid-configuration`` when given) and fails after the client's answer.
    """

    name = "OAUTHBEARER"

    def __init__(
        self,
        authenticator: Authenticator,
        *,
        scope: str | None = None,
        openid_configuration: str | None = None,
    ) -> None:
        super().__init__()
        self._auth = authenticator
        error: dict[str, str] = {"status": "invalid_token"}
        if scope is not None:
            error["scope"] = scope
        if openid_configuration is not None:
            error["openid-configuration"] = openid_configuration
        self._error = json.dumps(error, separators=(",", ":")).encode()

    def _client_first(self, data: bytes) -> ServerStep:
        if data == b"\x01":
            return AUTH_FAILED  # RFC 7628 §3.2.3: a lone ^A may fail without discovery
        text = _utf8(data)
        if text is None:
            return INVALID_ENCODING
        parts = text.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y"):
            return MALFORMED
        _, authz_part, rest = parts
        if authz_part and not authz_part.startswith("a="):
            return MALFORMED
        if len(rest) < 2 or not rest.startswith("\x01") or not rest.endswith("\x01"):
            return MALFORMED
        pairs = _parse_kvpairs(rest[1:-1])
        if pairs is None or "auth" not in pairs:
            return MALFORMED
        token = _bearer_token(pairs["auth"])
        if token is None:
            return MALFORMED
        try:
            authzid = prepare_identity(_decode_saslname(authz_part[2:])) if authz_part else ""
        except SaslError:
            return INVALID_IDENTITY
        owner = self._auth.check_token(authzid or None, token)
        if owner is None or (
            authzid and owner != authzid and not self._auth.may_act_as(owner, authzid)
        ):
            return Challenge(self._error)
        return Success(authzid or owner)

    def _next(self, data: bytes) -> ServerStep:
        # Whatever the client answers to the error challenge (it should be ^A).
        return AUTH_FAILED


class XOAuth2Server(ServerMechanism):
    """Server XOAUTH2: ``user=...^Aauth=Bearer ...^A^A``; on failure a JSON error
    challenge (``status``, ``schemes``, ``scope``), then failure after the client's
    (empty) answer."""

    name = "XOAUTH2"

    def __init__(self, authenticator: Authenticator, *, scope: str | None = None) -> None:
        super().__init__()
        self._auth = authenticator
        error: dict[str, str] = {"status": "400", "schemes": "Bearer"}
        if scope is not None:
            error["scope"] = scope
        self._error = json.dumps(error, separators=(",", ":")).encode()

    def _client_first(self, data: bytes) -> ServerStep:
        text = _utf8(data)
        if text is None:
            return INVALID_ENCODING
        if not text.endswith("\x01\x01"):
            return MALFORMED
        pairs = _parse_kvpairs(text[:-1])
        if pairs is None or "user" not in pairs or "auth" not in pairs:
            return MALFORMED
        token = _bearer_token(pairs["auth"])
        if token is None:
            return MALFORMED
        try:
            user = prepare_identity(pairs["user"])
        except SaslError:
            return INVALID_IDENTITY
        owner = self._auth.check_token(user, token)
        if owner != user:
            return Challenge(self._error)
        return Success(user)

    def _next(self, data: bytes) -> ServerStep:
        return AUTH_FAILED


class ExternalServer(ServerMechanism):
    """Server EXTERNAL (RFC 4422 App. A).

    ``external_identity`` is supplied by the binding (e.g. from a verified TLS client
    certificate); ``None`` means no external credentials, so the exchange fails. An empty
    authorization identity means "act as the external identity"; another one needs
    ``authenticator.may_act_as``. The resulting user must exist.
    """

    name = "EXTERNAL"

    def __init__(self, authenticator: Authenticator, external_identity: str | None) -> None:
        super().__init__()
        self._auth = authenticator
        self._identity = external_identity

    def _client_first(self, data: bytes) -> ServerStep:
        text = _utf8(data)
        if text is None:
            return INVALID_ENCODING
        try:
            authzid = prepare_identity(text) if text else ""
        except SaslError:
            return INVALID_IDENTITY
        if self._identity is None:
            return AUTH_FAILED
        identity = self._identity
        if authzid and authzid != identity and not self._auth.may_act_as(identity, authzid):
            return NOT_AUTHORIZED
        user = authzid or identity
        if not self._auth.user_exists(user):
            return AUTH_FAILED
        return Success(user)

    def _next(self, data: bytes) -> ServerStep:
        return MALFORMED


def server_mechanism(
    name: str,
    authenticator: Authenticator,
    *,
    channel_binding: ChannelBinding | Mapping[str, bytes] | None = None,
    external_identity: str | None = None,
    hostname: str = "localhost",
    oauth_scope: str | None = None,
) -> ServerMechanism | None:
    """A fresh server mechanism for *name* (case-insensitive), or ``None`` if this
    library has no such mechanism or it cannot run (a -PLUS name without
    channel-binding data). Whether the mechanism is *allowed* (TLS, policy) is for
    ``server_mechanisms`` to decide; check the name against that list first."""
    upper = name.upper()
    if upper == "PLAIN":
        return PlainServer(authenticator)
    if upper == "LOGIN":
        return LoginServer(authenticator)
    if upper == "CRAM-MD5":
        return CramMD5Server(authenticator, hostname=hostname)
    if upper == "OAUTHBEARER":
        return OAuthBearerServer(authenticator, scope=oauth_scope)
    if upper == "XOAUTH2":
        return XOAuth2Server(authenticator, scope=oauth_scope)
    if upper == "EXTERNAL":
        return ExternalServer(authenticator, external_identity)
    for hash_name in SCRAM_HASHES:
        base = f"SCRAM-{hash_name}"
        if upper in (base, base + "-PLUS"):
            plus = upper != base
            if plus and not channel_binding:
                return None
            return ScramServer(hash_name, authenticator, plus=plus, channel_binding=channel_binding)
    return None
