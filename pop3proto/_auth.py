"""Authentication policy and credentials, I/O-free.

- :class:`Authenticator`: what the server mechanisms ask of a credential store.
- :class:`PasswordTable`: an in-memory store of plaintext passwords and SCRAM verifiers,
  and the credential-file format read by :func:`load_credentials`.
- :func:`server_mechanisms` / :func:`choose_client_mechanism`: which SASL mechanisms a
  server advertises and which one a client picks.
- :func:`verify_user_pass` / :func:`verify_apop`: USER/PASS and APOP checks with the
  same failure for an unknown user and a wrong password.
- :class:`FailureDelay`: how long to wait before answering a failed login.

Credential file format (UTF-8 text, one entry per line)::

    # comments and blank lines are ignored
    alice:correct horse battery staple
    bob:{PLAIN}{a password that starts with a brace}
    carol:{SCRAM-SHA-256}4096$<salt>$<StoredKey>$<ServerKey>,{SCRAM-SHA-1}4096$<salt>$<StoredKey>$<ServerKey>

The user name is everything before the first ``:`` (so it cannot contain one); the
secret is the rest of the line exactly (spaces kept; only the line end is removed). A
secret is a plaintext password, ``{PLAIN}`` followed by a plaintext password, or one or
more SCRAM verifiers separated by ``,``. A verifier is ``{SCRAM-SHA-256}`` or
``{SCRAM-SHA-1}`` then ``iterations$salt$StoredKey$ServerKey`` with the three byte
strings in padded base64 (RFC 5802 §2.2: no plaintext, no SaltedPassword). A secret that
starts with ``{NAME}`` for any other NAME is an error, not a password.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, Protocol

import attrs

from ._sasl import (
    AUTH_FAILED,
    INVALID_ENCODING,
    INVALID_IDENTITY,
    MIN_SCRAM_ITERATIONS,
    SCRAM_HASHES,
    Failure,
    SaslError,
    ScramCredentials,
    Success,
    authenticate_password,
    b64decode_strict,
    b64encode,
    derive_scram_credentials,
    normalize_secret,
    prepare_identity,
)

__all__ = [
    "AuthCapabilities",
    "Authenticator",
    "CredentialFileError",
    "FailureDelay",
    "PasswordTable",
    "Secret",
    "apop_available",
    "choose_client_mechanism",
    "client_may_use_apop",
    "format_entry",
    "format_verifier",
    "hash_password",
    "load_credentials",
    "make_scram_verifier",
    "parse_file",
    "parse_secret",
    "parse_verifier",
    "plaintext_allowed",
    "server_mechanisms",
    "verify_apop",
    "verify_user_pass",
]

#: A stored secret: a plaintext password (``str``) or a SCRAM verifier.
Secret = str | ScramCredentials

_MAX_FILE_ITERATIONS: Final = 2**31 - 1
_DIGEST_SIZES: Final[Mapping[str, int]] = {"SHA-1": 20, "SHA-256": 32}


@attrs.frozen
class AuthCapabilities:
    """What an authenticator can check, which decides the mechanisms a server offers.

    ``password``: presented passwords can be verified (USER/PASS, PLAIN, LOGIN).
    ``plaintext_secrets``: plaintext-equivalent secrets are held (CRAM-MD5, APOP).
    ``scram``: hash names (``"SHA-1"``, ``"SHA-256"``) SCRAM credentials exist for.
    ``token``: bearer tokens can be checked (OAUTHBEARER, XOAUTH2).
    ``external``: identities from TLS client certificates are accepted (EXTERNAL).
    """

    password: bool = True
    plaintext_secrets: bool = False
    scram: frozenset[str] = frozenset()
    token: bool = False
    external: bool = False


class Authenticator(Protocol):
    """The credential lookups the SASL mechanisms and USER/PASS/APOP need.

    User names passed in are prepared with ``prepare_identity``. Every check must take
    the same code path for an unknown user as for a wrong secret, and compare secrets
    with ``hmac.compare_digest``.
    """

    def capabilities(self) -> AuthCapabilities:
        """What this authenticator can check."""
        ...

    def user_exists(self, user: str) -> bool:
        """Whether *user* has a maildrop (used by EXTERNAL)."""
        ...

    def check_password(self, user: str, password: str) -> bool:
        """Whether *password* is *user*'s password."""
        ...

    def scram_credentials(self, user: str, hash_name: str) -> ScramCredentials | None:
        """SCRAM credentials of *user* for *hash_name*; for an unknown user either
        ``None`` or decoy credentials that never verify."""
        ...

    def check_cram_md5(self, user: str, challenge: bytes, digest: str) -> bool:
        """Whether *digest* (lower-case hex) is HMAC-MD5(secret, challenge)."""
        ...

    def check_apop(self, user: str, timestamp: bytes, digest: str) -> bool:
        """Whether *digest* (lower-case hex) is MD5(timestamp || secret)."""
        ...

    def check_token(self, user: str | None, token: str) -> str | None:
        """The user *token* authenticates, or ``None``; with *user* given, ``None``
        unless the token is valid for that user."""
        ...

    def may_act_as(self, authcid: str, authzid: str) -> bool:
        """Whether *authcid* may use the maildrop of another user *authzid*."""
        ...


class CredentialFileError(ValueError):
    """A credential file or entry is invalid. The message names the line, never the
    secret."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


# --------------------------------------------------------------------------------------
# Verifiers and the file format
# --------------------------------------------------------------------------------------


def make_scram_verifier(
    password: str,
    hash_name: str = "SHA-256",
    iterations: int = MIN_SCRAM_ITERATIONS,
    salt: bytes | None = None,
) -> ScramCredentials:
    """A SCRAM verifier for *password*: salt, iterations, StoredKey, ServerKey.

    Raises ``ValueError`` for iterations below 4096, an unknown hash name or an empty
    salt; the salt defaults to 16 random bytes.
    """
    if iterations < MIN_SCRAM_ITERATIONS:
        raise ValueError(f"SCRAM iteration count must be at least {MIN_SCRAM_ITERATIONS}")
    if hash_name not in SCRAM_HASHES:
        raise ValueError("unsupported SCRAM hash")
    if not password:
        raise ValueError("empty password")
    if salt is None:
        salt = os.urandom(16)
    if not salt:
        raise ValueError("empty salt")
    return derive_scram_credentials(hash_name, password, salt, iterations)


def format_verifier(creds: ScramCredentials) -> str:
    """The credential-file text of one verifier:
    ``{SCRAM-<hash>}iterations$salt$StoredKey$ServerKey``."""
    parts = (creds.salt, creds.stored_key, creds.server_key)
    encoded = "$".join(b64encode(p).decode("ascii") for p in parts)
    return f"{{SCRAM-{creds.hash_name}}}{creds.iterations}${encoded}"


def parse_verifier(text: str) -> ScramCredentials:
    """Parse one verifier written by :func:`format_verifier`.

    Raises :class:`CredentialFileError` for an unknown scheme, iterations below 4096,
    bad base64 or keys of the wrong size.
    """
    hash_name = next((h for h in _DIGEST_SIZES if text.startswith(f"{{SCRAM-{h}}}")), None)
    if hash_name is None:
        raise CredentialFileError("unknown secret scheme")
    size = _DIGEST_SIZES[hash_name]
    prefix = f"{{SCRAM-{hash_name}}}"
    fields = text[len(prefix) :].split("$")
    if len(fields) != 4:
        raise CredentialFileError("a SCRAM verifier has four '$'-separated fields")
    digits = fields[0]
    if not (digits.isascii() and digits.isdigit()) or digits[0] == "0" or len(digits) > 10:
        raise CredentialFileError("invalid SCRAM iteration count")
    iterations = int(digits)
    if not MIN_SCRAM_ITERATIONS <= iterations <= _MAX_FILE_ITERATIONS:
        raise CredentialFileError(f"SCRAM iteration count must be at least {MIN_SCRAM_ITERATIONS}")
    try:
        salt, stored_key, server_key = (b64decode_strict(f.encode("ascii")) for f in fields[1:])
    except (SaslError, UnicodeEncodeError):
        raise CredentialFileError("invalid base64 in SCRAM verifier") from None
    if not salt:
        raise CredentialFileError("empty SCRAM salt")
    if len(stored_key) != size or len(server_key) != size:
        raise CredentialFileError("SCRAM key of the wrong size")
    return ScramCredentials(hash_name, iterations, salt, stored_key, server_key)


_SCHEME = re.compile(r"\{[A-Za-z0-9-]{1,40}\}")


def parse_secret(text: str) -> tuple[Secret, ...]:
    """Parse the secret part of a credential line into plaintext or verifiers.

    Raises :class:`CredentialFileError` for an empty secret, an unknown ``{SCHEME}``, a
    bad verifier, or two verifiers for the same hash.
    """
    if text.startswith("{PLAIN}"):
        text = text[len("{PLAIN}") :]
        if not text:
            raise CredentialFileError("empty password")
        return (text,)
    if not text:
        raise CredentialFileError("empty password")
    if _SCHEME.match(text) is None:
        return (text,)
    verifiers = tuple(parse_verifier(part) for part in text.split(","))
    hashes = [v.hash_name for v in verifiers]
    if len(set(hashes)) != len(hashes):
        raise CredentialFileError("two verifiers for the same hash")
    return verifiers


def _check_file_user(user: str) -> str:
    if ":" in user or user.startswith("#") or user != user.strip():
        raise CredentialFileError("user names cannot contain ':' or start with '#' or space")
    try:
        return prepare_identity(user)
    except SaslError as exc:
        raise CredentialFileError(f"invalid user name ({exc})") from None


def format_entry(user: str, secret: Secret | Sequence[ScramCredentials]) -> str:
    """One credential-file line (without the line end) for *user*.

    A plaintext password that starts with ``{`` is written as ``{PLAIN}...`` so it reads
    back unchanged. Raises :class:`CredentialFileError` for user names with ``:``,
    secrets with CR, LF or NUL, or iteration counts below 4096.
    """
    _check_file_user(user)
    if isinstance(secret, str):
        if not secret or any(c in secret for c in "\r\n\0"):
            raise CredentialFileError("password is empty or contains CR, LF or NUL")
        text = "{PLAIN}" + secret if secret.startswith("{") else secret
    else:
        verifiers = (secret,) if isinstance(secret, ScramCredentials) else tuple(secret)
        if not verifiers:
            raise CredentialFileError("no verifier given")
        if any(v.iterations < MIN_SCRAM_ITERATIONS for v in verifiers):
            raise CredentialFileError(
                f"SCRAM iteration count must be at least {MIN_SCRAM_ITERATIONS}"
            )
        text = ",".join(format_verifier(v) for v in verifiers)
    return f"{user}:{text}"


def hash_password(
    password: str,
    *,
    hashes: Sequence[str] = ("SHA-256", "SHA-1"),
    iterations: int = MIN_SCRAM_ITERATIONS,
) -> str:
    """The secret text for *password* stored as SCRAM verifiers only (what a
    ``passwd`` command writes after ``user:``). SCRAM and PLAIN/LOGIN/USER work with it;
    CRAM-MD5 and APOP, which need the plaintext, do not."""
    return ",".join(format_verifier(make_scram_verifier(password, h, iterations)) for h in hashes)


def parse_file(text: str) -> dict[str, tuple[Secret, ...]]:
    """Parse a credential file into prepared user name -> secrets.

    Lines end with LF or CRLF; blank lines and lines starting with ``#`` are skipped.
    Raises :class:`CredentialFileError` (with the line number) for a line without ``:``,
    an invalid or duplicate user name, or an invalid secret.
    """
    result: dict[str, tuple[Secret, ...]] = {}
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, secret = line.partition(":")
        try:
            if not sep:
                raise CredentialFileError("expected 'user:secret'")
            key = _check_file_user(user)
            if key in result:
                raise CredentialFileError("duplicate user name")
            result[key] = parse_secret(secret)
        except CredentialFileError as exc:
            raise CredentialFileError(str(exc), number) from None
    return result


# --------------------------------------------------------------------------------------
# The password table
# --------------------------------------------------------------------------------------


@attrs.frozen(repr=False)
class _Entry:
    plaintext: str | None  # already passed through normalize_secret
    verifiers: Mapping[str, ScramCredentials]

    def preferred(self) -> ScramCredentials:
        return self.verifiers.get("SHA-256") or next(iter(self.verifiers.values()))


def _make_entry(secret_list: Iterable[Secret]) -> _Entry:
    plaintext: str | None = None
    verifiers: dict[str, ScramCredentials] = {}
    for secret in secret_list:
        if isinstance(secret, str):
            if plaintext is not None or not secret:
                raise ValueError("at most one non-empty plaintext password per user")
            if any(c in secret for c in "\0\r\n"):
                raise ValueError("a password cannot contain CR, LF or NUL")
            plaintext = normalize_secret(secret)
        elif isinstance(secret, ScramCredentials):
            if secret.hash_name not in _DIGEST_SIZES:
                raise ValueError("unsupported SCRAM hash")
            if secret.iterations < MIN_SCRAM_ITERATIONS:
                raise ValueError(f"SCRAM iteration count must be at least {MIN_SCRAM_ITERATIONS}")
            size = _DIGEST_SIZES[secret.hash_name]
            if len(secret.stored_key) != size or len(secret.server_key) != size:
                raise ValueError("SCRAM key of the wrong size")
            if secret.hash_name in verifiers:
                raise ValueError("two verifiers for the same hash")
            verifiers[secret.hash_name] = secret
        else:
            raise TypeError("a secret is a str or ScramCredentials")
    if plaintext is None and not verifiers:
        raise ValueError("no secret given")
    return _Entry(plaintext, verifiers)


def _entry_matches(entry: _Entry, password: str) -> bool:
    if entry.plaintext is not None:
        presented = normalize_secret(password).encode("utf-8", "surrogatepass")
        return hmac.compare_digest(presented, entry.plaintext.encode("utf-8", "surrogatepass"))
    creds = entry.preferred()
    derived = derive_scram_credentials(creds.hash_name, password, creds.salt, creds.iterations)
    return hmac.compare_digest(derived.stored_key, creds.stored_key)


class PasswordTable:
    """An :class:`Authenticator` over a mapping user -> secret(s).

    A secret is a plaintext password or :class:`ScramCredentials` (several allowed per
    user, one per hash). With plaintext, every mechanism works (SCRAM credentials are
    derived once, with a random salt, and cached). With verifiers only, SCRAM works and
    presented passwords (USER/PASS, PLAIN, LOGIN) are checked by recomputing the
    SaltedPassword; CRAM-MD5 and APOP fail for that user. ``tokens`` maps users to their
    valid bearer tokens; ``proxies`` maps a user to the users it may act as;
    ``allow_external`` enables EXTERNAL. ``salt_key`` (32 random bytes by default)
    keys the salts made up for unknown users and for users stored in plaintext:
    tables that share it (one file read again) give every name the same salt.

    An unknown user is checked against a decoy secret of the same kind and cost as the
    stored ones (a verifier with the highest iteration count when any user is stored by
    verifier), and gets decoy SCRAM credentials with a salt that is stable per name, so
    neither replies nor timing tell unknown users from wrong passwords. User names are
    keyed by their ``prepare_identity`` form. Raises ``ValueError`` for invalid entries.
    """

    def __init__(
        self,
        entries: Mapping[str, Secret | Iterable[Secret]] | None = None,
        *,
        tokens: Mapping[str, str | Iterable[str]] | None = None,
        proxies: Mapping[str, Iterable[str]] | None = None,
        allow_external: bool = False,
        salt_key: bytes | None = None,
    ) -> None:
        self._entries: dict[str, _Entry] = {}
        for user, value in (entries or {}).items():
            key = self._key_for_table(user)
            items: Iterable[Secret] = (
                (value,) if isinstance(value, (str, ScramCredentials)) else value
            )
            self._entries[key] = _make_entry(items)
        self._tokens: dict[str, tuple[bytes, ...]] = {}
        for user, toks in (tokens or {}).items():
            toks = (toks,) if isinstance(toks, str) else tuple(toks)
            if not all(toks):
                raise ValueError("empty token")
            self._tokens[self._key_for_table(user)] = tuple(t.encode("utf-8") for t in toks)
        self._proxies: dict[str, frozenset[str]] = {
            self._key_for_table(user): frozenset(self._key_for_table(u) for u in targets)
            for user, targets in (proxies or {}).items()
        }
        self._allow_external = allow_external
        self._salt_key = secrets.token_bytes(32) if salt_key is None else salt_key
        if len(self._salt_key) < 16:
            raise ValueError("salt_key must have at least 16 bytes")
        self._derived: dict[tuple[str, str], ScramCredentials] = {}
        self._dummy_token = secrets.token_hex(32).encode("ascii")
        self._dummy_plain = secrets.token_hex(16)
        verifier_only = [e for e in self._entries.values() if e.plaintext is None]
        if verifier_only:
            model = max((e.preferred() for e in verifier_only), key=lambda c: c.iterations)
            decoy = derive_scram_credentials(
                model.hash_name, secrets.token_hex(16), os.urandom(16), model.iterations
            )
            self._dummy = _Entry(None, {decoy.hash_name: decoy})
        else:
            self._dummy = _Entry(self._dummy_plain, {})
        iterations = [c.iterations for e in self._entries.values() for c in e.verifiers.values()]
        self._decoy_iterations = max(iterations, default=MIN_SCRAM_ITERATIONS)

    @staticmethod
    def _key_for_table(user: str) -> str:
        try:
            return prepare_identity(user)
        except SaslError as exc:
            raise ValueError(f"invalid user name ({exc})") from None

    def _find(self, user: str) -> tuple[str, _Entry] | None:
        try:
            key = prepare_identity(user)
        except SaslError:
            return None
        entry = self._entries.get(key)
        return (key, entry) if entry is not None else None

    def __len__(self) -> int:
        return len(self._entries)

    def capabilities(self) -> AuthCapabilities:
        entries = self._entries.values()
        any_plain = any(e.plaintext is not None for e in entries)
        scram = set(SCRAM_HASHES) if any_plain else {h for e in entries for h in e.verifiers}
        return AuthCapabilities(
            password=bool(self._entries),
            plaintext_secrets=any_plain,
            scram=frozenset(scram),
            token=bool(self._tokens),
            external=self._allow_external,
        )

    def user_exists(self, user: str) -> bool:
        try:
            key = prepare_identity(user)
        except SaslError:
            return False
        return key in self._entries or key in self._tokens

    def check_password(self, user: str, password: str) -> bool:
        found = self._find(user)
        # The same computation for an unknown user (HARDENING 36).
        matches = _entry_matches(found[1] if found else self._dummy, password)
        return matches and found is not None

    def scram_credentials(self, user: str, hash_name: str) -> ScramCredentials:
        found = self._find(user)
        if found is not None:
            key, entry = found
            creds = entry.verifiers.get(hash_name)
            if creds is not None:
                return creds
            if entry.plaintext is not None:
                cached = self._derived.get((key, hash_name))
                if cached is None:
                    salt = self._made_up_salt(key, hash_name)
                    cached = derive_scram_credentials(
                        hash_name, entry.plaintext, salt, MIN_SCRAM_ITERATIONS
                    )
                    self._derived[(key, hash_name)] = cached
                return cached
        return self._decoy_scram(user, hash_name)

    def _made_up_salt(self, name: str, hash_name: str) -> bytes:
        """The salt of a user without a stored verifier: the same for a name
        whether it exists (in plaintext) or not, stable while ``salt_key`` is."""
        return hmac.new(self._salt_key, f"{hash_name}\0{name}".encode(), "sha256").digest()[:16]

    def _decoy_scram(self, user: str, hash_name: str) -> ScramCredentials:
        size = _DIGEST_SIZES[hash_name]
        try:
            name = prepare_identity(user)
        except SaslError:
            name = user
        return ScramCredentials(
            hash_name,
            self._decoy_iterations,
            self._made_up_salt(name, hash_name),
            os.urandom(size),
            os.urandom(size),
        )

    def _plain_secret(self, user: str) -> str | None:
        found = self._find(user)
        return found[1].plaintext if found is not None else None

    def check_cram_md5(self, user: str, challenge: bytes, digest: str) -> bool:
        secret = self._plain_secret(user)
        key = (secret if secret is not None else self._dummy_plain).encode("utf-8")
        expected = hmac.new(key, bytes(challenge), "md5").hexdigest().encode("ascii")
        matches = hmac.compare_digest(expected, digest.lower().encode("utf-8", "replace"))
        return matches and secret is not None

    def check_apop(self, user: str, timestamp: bytes, digest: str) -> bool:
        secret = self._plain_secret(user)
        key = (secret if secret is not None else self._dummy_plain).encode("utf-8")
        expected = hashlib.md5(bytes(timestamp) + key, usedforsecurity=False).hexdigest()
        matches = hmac.compare_digest(
            expected.encode("ascii"), digest.lower().encode("utf-8", "replace")
        )
        return matches and secret is not None

    def check_token(self, user: str | None, token: str) -> str | None:
        presented = token.encode("utf-8", "replace")
        if user is not None:
            try:
                key: str | None = prepare_identity(user)
            except SaslError:
                key = None
            stored = self._tokens.get(key, ()) if key is not None else ()
            matched = False
            for candidate in stored or (self._dummy_token,):
                matched |= hmac.compare_digest(candidate, presented)
            return key if matched and stored else None
        owner: str | None = None
        for name, stored in self._tokens.items():
            for candidate in stored:
                if hmac.compare_digest(candidate, presented) and owner is None:
                    owner = name
        return owner

    def may_act_as(self, authcid: str, authzid: str) -> bool:
        try:
            source, target = prepare_identity(authcid), prepare_identity(authzid)
        except SaslError:
            return False
        return target in self._proxies.get(source, frozenset()) and self.user_exists(target)


def load_credentials(
    text: str,
    *,
    tokens: Mapping[str, str | Iterable[str]] | None = None,
    proxies: Mapping[str, Iterable[str]] | None = None,
    allow_external: bool = False,
    salt_key: bytes | None = None,
) -> PasswordTable:
    """A :class:`PasswordTable` from credential-file text (see the module docstring).

    Raises :class:`CredentialFileError` for an invalid file.
    """
    return PasswordTable(
        parse_file(text),
        tokens=tokens,
        proxies=proxies,
        allow_external=allow_external,
        salt_key=salt_key,
    )


# --------------------------------------------------------------------------------------
# USER/PASS and APOP checks
# --------------------------------------------------------------------------------------


def _as_text(value: str | bytes) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return None


def verify_user_pass(
    authenticator: Authenticator, user: str | bytes, password: str | bytes
) -> Success | Failure:
    """Check USER/PASS arguments (RFC 1939 §7, RFC 6856 §2.2).

    Bytes are decoded as strict UTF-8 (invalid -> failure); names are prepared with
    SASLprep. An unknown user and a wrong password give the same failure object.
    """
    name, secret = _as_text(user), _as_text(password)
    if name is None or secret is None:
        return INVALID_ENCODING
    return authenticate_password(authenticator, name, secret)


def verify_apop(
    authenticator: Authenticator, user: str | bytes, timestamp: bytes, digest: str | bytes
) -> Success | Failure:
    """Check an APOP command against the greeting's *timestamp* (RFC 1939 §7).

    An unknown user, a wrong digest, a malformed digest and a user without a plaintext
    secret all give the same failure object.
    """
    name, hexdigest = _as_text(user), _as_text(digest)
    if name is None or hexdigest is None:
        return INVALID_ENCODING
    try:
        prepared = prepare_identity(name)
    except SaslError:
        return INVALID_IDENTITY
    hexdigest = hexdigest.lower()
    well_formed = len(hexdigest) == 32 and all(c in "0123456789abcdef" for c in hexdigest)
    if not authenticator.check_apop(prepared, timestamp, hexdigest) or not well_formed:
        return AUTH_FAILED
    return Success(prepared)


# --------------------------------------------------------------------------------------
# Mechanism policy
# --------------------------------------------------------------------------------------


def plaintext_allowed(*, tls_active: bool, allow_plaintext: bool) -> bool:
    """Whether a plaintext-secret login (USER/PASS, PLAIN, LOGIN, bearer tokens) may be
    used: only under TLS unless explicitly allowed (RFC 5034 §4, RFC 2595 §2)."""
    return tls_active or allow_plaintext


def apop_available(authenticator_capabilities: AuthCapabilities, *, enabled: bool = False) -> bool:
    """Whether a server should put an APOP timestamp in its greeting: only when the
    operator enabled it (off by default, HARDENING 40) and plaintext secrets exist."""
    return enabled and authenticator_capabilities.plaintext_secrets


def client_may_use_apop(timestamp: bytes | None, *, tls_active: bool) -> bool:
    """Whether a client may answer a greeting timestamp with APOP: only a msg-id shaped
    timestamp (see ``apop_timestamp``) and only under TLS (CVE-2007-1558)."""
    return timestamp is not None and tls_active


def server_mechanisms(
    authenticator_capabilities: AuthCapabilities,
    tls_active: bool,
    allow_plaintext: bool,
    channel_binding_available: bool,
    *,
    external_available: bool = False,
) -> list[str]:
    """The SASL mechanisms a server advertises, strongest first.

    SCRAM for each hash with credentials, and its -PLUS form only under TLS with
    channel-binding data; CRAM-MD5 when plaintext secrets are held; PLAIN, LOGIN,
    OAUTHBEARER and XOAUTH2 (plaintext-equivalent secrets on the wire) only under TLS
    unless ``allow_plaintext``; EXTERNAL only under TLS with a client identity
    (``external_available``). APOP is not a SASL mechanism; see :func:`apop_available`.
    """
    caps = authenticator_capabilities
    plain_ok = plaintext_allowed(tls_active=tls_active, allow_plaintext=allow_plaintext)
    names: list[str] = []
    for hash_name in ("SHA-256", "SHA-1"):
        if hash_name in caps.scram:
            if channel_binding_available and tls_active:
                names.append(f"SCRAM-{hash_name}-PLUS")
            names.append(f"SCRAM-{hash_name}")
    if caps.plaintext_secrets:
        names.append("CRAM-MD5")
    if caps.password and plain_ok:
        names += ["PLAIN", "LOGIN"]
    if caps.token and plain_ok:
        names += ["OAUTHBEARER", "XOAUTH2"]
    if caps.external and tls_active and external_available:
        names.append("EXTERNAL")
    return names


def choose_client_mechanism(
    offered: Sequence[str],
    *,
    have_password: bool,
    have_token: bool = False,
    have_client_cert: bool = False,
    tls_active: bool,
    allow_insecure: bool = False,
    channel_binding_available: bool = False,
) -> str | None:
    """The mechanism a client should use among *offered* (case-insensitive), or None.

    Preference: EXTERNAL (with a client certificate under TLS), then OAUTHBEARER >
    XOAUTH2 (with a token), then for a password SCRAM-SHA-256-PLUS > SCRAM-SHA-256 >
    SCRAM-SHA-1-PLUS > SCRAM-SHA-1 > CRAM-MD5 > PLAIN > LOGIN. -PLUS needs TLS and
    channel-binding data; PLAIN, LOGIN and the token mechanisms are never chosen without
    TLS unless ``allow_insecure``. The returned name is upper case.
    """
    available = {name.upper() for name in offered}
    plain_ok = plaintext_allowed(tls_active=tls_active, allow_plaintext=allow_insecure)
    preference: list[str] = []
    if have_client_cert and tls_active:
        preference.append("EXTERNAL")
    if have_token and plain_ok:
        preference += ["OAUTHBEARER", "XOAUTH2"]
    if have_password:
        for hash_name in ("SHA-256", "SHA-1"):
            if channel_binding_available and tls_active:
                preference.append(f"SCRAM-{hash_name}-PLUS")
            preference.append(f"SCRAM-{hash_name}")
        # A challenge-response: the password itself never crosses the wire.
        preference.append("CRAM-MD5")
        if plain_ok:
            preference += ["PLAIN", "LOGIN"]
    return next((name for name in preference if name in available), None)


# --------------------------------------------------------------------------------------
# Failure delay
# --------------------------------------------------------------------------------------


class FailureDelay:
    """How long to wait before answering a failed login, per client address.

    After *n* recorded failures the delay is ``min(maximum, base * factor**(n-1))``
    (default 2 s doubling up to 15 s; ``base=0`` disables it); no failures means 0. A
    success forgets the address. At most ``max_tracked`` addresses are remembered (the
    least recently failed are dropped first), so memory is bounded whatever the number
    of clients. With a ``clock`` (seconds, e.g. ``time.monotonic``), an address whose
    last failure is older than ``forget_after`` starts again from zero.
    """

    def __init__(
        self,
        base: float = 2.0,
        maximum: float = 15.0,
        factor: float = 2.0,
        *,
        max_tracked: int = 10_000,
        clock: Callable[[], float] | None = None,
        forget_after: float = 900.0,
    ) -> None:
        if base < 0 or maximum < base or factor < 1 or max_tracked < 1 or forget_after <= 0:
            raise ValueError("need 0 <= base <= maximum, factor >= 1, max_tracked >= 1")
        self.base, self.maximum, self.factor = base, maximum, factor
        self.max_tracked = max_tracked
        self._clock = clock
        self._forget_after = forget_after
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def _count(self, address: str) -> int:
        record = self._failures.get(address)
        if record is None:
            return 0
        count, when = record
        if self._clock is not None and self._clock() - when > self._forget_after:
            del self._failures[address]
            return 0
        return count

    def delay_for(self, address: str) -> float:
        """Seconds to wait before the ``-ERR`` of a failure from *address*, given the
        failures recorded so far (including the one being answered, if recorded)."""
        count = self._count(address)
        if count == 0 or self.base == 0:
            return 0.0
        return float(min(self.maximum, self.base * self.factor ** min(count - 1, 64)))

    def record_failure(self, address: str) -> float:
        """Count one failed login from *address*; returns the delay to apply now."""
        count = self._count(address) + 1
        now = self._clock() if self._clock is not None else 0.0
        self._failures[address] = (count, now)
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)
        return self.delay_for(address)

    def record_success(self, address: str) -> None:
        """Forget the failures of *address*."""
        self._failures.pop(address, None)
