"""Credential store, credential files, mechanism policy and failure delays
(pop3proto._auth)."""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from collections.abc import Callable

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3proto._auth import (
    AuthCapabilities,
    CredentialFileError,
    FailureDelay,
    PasswordTable,
    apop_available,
    choose_client_mechanism,
    client_may_use_apop,
    format_entry,
    format_verifier,
    hash_password,
    load_credentials,
    make_scram_verifier,
    parse_file,
    parse_secret,
    parse_verifier,
    plaintext_allowed,
    server_mechanisms,
    verify_apop,
    verify_user_pass,
)
from pop3proto._sasl import (
    AUTH_FAILED,
    INVALID_ENCODING,
    INVALID_IDENTITY,
    MIN_SCRAM_ITERATIONS,
    SaslError,
    Scram,
    ScramCredentials,
    ScramServer,
    Success,
    apop_digest,
    b64decode_strict,
    prepare_identity,
)

APOP_STAMP = b"<1896.697170952@dbc.mtview.ca.us>"
APOP_DIGEST = "c4c9334bac560ecc979e58001b3e22fb"


# --------------------------------------------------------------------------------------
# Verifiers (HARDENING 43)
# --------------------------------------------------------------------------------------


def test_verifier_matches_rfc5802_vector() -> None:
    creds = make_scram_verifier("pencil", "SHA-1", 4096, salt=b64decode_strict(b"QSXCR+Q6sek8bf92"))
    salted = hashlib.pbkdf2_hmac("sha1", b"pencil", creds.salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha1").digest()
    assert creds.stored_key == hashlib.sha1(client_key).digest()
    assert creds.server_key == hmac.new(salted, b"Server Key", "sha1").digest()
    assert (creds.hash_name, creds.iterations) == ("SHA-1", 4096)


def test_verifier_iteration_floor() -> None:
    for iterations in (0, 1, 1000, MIN_SCRAM_ITERATIONS - 1):
        with pytest.raises(ValueError):
            make_scram_verifier("pw", "SHA-256", iterations)
    assert make_scram_verifier("pw", "SHA-256", 5000).iterations == 5000
    with pytest.raises(ValueError):
        make_scram_verifier("pw", "MD5")
    with pytest.raises(ValueError):
        make_scram_verifier("pw", "SHA-256", salt=b"")


def test_verifier_salts_are_random() -> None:
    a, b = make_scram_verifier("pw"), make_scram_verifier("pw")
    assert a.salt != b.salt and a.stored_key != b.stored_key
    assert len(a.salt) == 16 and len(a.stored_key) == 32


def test_verifier_store_holds_no_plaintext() -> None:
    password = "Very-Secret-Passw0rd"
    text = format_entry("carol", [make_scram_verifier(password, h) for h in ("SHA-256", "SHA-1")])
    assert password not in text and password.lower() not in text.lower()
    (secrets,) = parse_file(text).values()
    assert all(isinstance(s, ScramCredentials) for s in secrets)
    for creds in secrets:
        assert isinstance(creds, ScramCredentials)
        assert creds.iterations >= MIN_SCRAM_ITERATIONS
        # Only salt, iteration count, StoredKey and ServerKey are kept.
        assert [a.name for a in attrs.fields(ScramCredentials)] == [
            "hash_name",
            "iterations",
            "salt",
            "stored_key",
            "server_key",
        ]


def test_hash_password_secret() -> None:
    secret = hash_password("hunter2")
    assert "hunter2" not in secret
    parsed = parse_secret(secret)
    assert [s.hash_name for s in parsed] == ["SHA-256", "SHA-1"]  # type: ignore[union-attr]
    table = load_credentials(f"dave:{secret}\n")
    assert table.check_password("dave", "hunter2")
    assert not table.check_password("dave", "hunter3")


def test_verifier_text_round_trip() -> None:
    creds = make_scram_verifier("pw", "SHA-256", 4096, salt=b"0123456789abcdef")
    text = format_verifier(creds)
    assert text.startswith("{SCRAM-SHA-256}4096$MDEyMzQ1Njc4OWFiY2RlZg==$")
    assert parse_verifier(text) == creds


@pytest.mark.parametrize(
    "text",
    [
        "{SCRAM-SHA-256}1000$AAAA$" + "A" * 43 + "=$" + "A" * 43 + "=",  # too few iterations
        "{SCRAM-SHA-256}04096$AAAA$" + "A" * 43 + "=$" + "A" * 43 + "=",
        "{SCRAM-SHA-256}4096$AAAA$AAAA$AAAA",  # wrong key size
        "{SCRAM-SHA-256}4096$$" + "A" * 43 + "=$" + "A" * 43 + "=",  # empty salt
        "{SCRAM-SHA-256}4096$A$" + "A" * 43 + "=$" + "A" * 43 + "=",  # bad base64
        "{SCRAM-SHA-256}4096$AAAA$" + "A" * 43 + "=",  # missing field
        "{SCRAM-SHA-512}4096$AAAA$AAAA$AAAA",
        "{SCRAM-SHA-1}x$AAAA$AAAA$AAAA",
    ],
)
def test_bad_verifiers_rejected(text: str) -> None:
    with pytest.raises(CredentialFileError):
        parse_verifier(text)


# --------------------------------------------------------------------------------------
# Credential file format
# --------------------------------------------------------------------------------------


def test_parse_file_forms() -> None:
    v256 = format_verifier(make_scram_verifier("s3cret", "SHA-256"))
    v1 = format_verifier(make_scram_verifier("s3cret", "SHA-1"))
    text = (
        "# comment\r\n"
        "\n"
        "alice:correct horse: battery staple \r\n"
        "bob:{PLAIN}{braced}\n"
        f"carol:{v256},{v1}\n"
        "   \n"
        "dave:{not a scheme\n"
        "Mu\u0308ller:pässwörd"
    )
    entries = parse_file(text)
    assert entries["alice"] == ("correct horse: battery staple ",)
    assert entries["bob"] == ("{braced}",)
    assert [c.hash_name for c in entries["carol"]] == ["SHA-256", "SHA-1"]  # type: ignore[union-attr]
    assert entries["dave"] == ("{not a scheme",)
    assert entries[unicodedata.normalize("NFC", "Mu\u0308ller")] == ("pässwörd",)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("alice:pw\nno-colon-here\n", 2),
        ("alice:pw\nalice:other\n", 2),
        ("alice:\n", 1),
        ("alice:{PLAIN}\n", 1),
        ("# c\n\nalice:{UNKNOWN}secret\n", 3),
        (":pw\n", 1),
        ("al\x01ice:pw\n", 1),
        ("a" * 1024 + ":pw\n", 1),
        ("alice:{SCRAM-SHA-1}4096$AAAA$AAAA$AAAA\n", 1),
    ],
)
def test_parse_file_errors_name_the_line(text: str, line: int) -> None:
    with pytest.raises(CredentialFileError) as info:
        parse_file(text)
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}:")


def test_parse_file_error_never_shows_the_secret() -> None:
    with pytest.raises(CredentialFileError) as info:
        parse_file("alice:{BOGUS}TopSecretValue\n")
    assert "TopSecretValue" not in str(info.value)


def test_duplicate_verifier_hash_rejected() -> None:
    v = format_verifier(make_scram_verifier("pw", "SHA-1"))
    with pytest.raises(CredentialFileError):
        parse_file(f"alice:{v},{v}\n")


def test_format_entry_rules() -> None:
    assert format_entry("alice", "pw") == "alice:pw"
    assert format_entry("alice", "{x}") == "alice:{PLAIN}{x}"
    for user, secret in [("a:b", "pw"), ("#a", "pw"), ("a", "p\nw"), ("a", "p\rw"), ("a", "")]:
        with pytest.raises(CredentialFileError):
            format_entry(user, secret)
    weak = ScramCredentials("SHA-256", 1000, b"s", b"k" * 32, b"k" * 32)
    with pytest.raises(CredentialFileError):
        format_entry("a", weak)
    with pytest.raises(CredentialFileError):
        format_entry("a", [])


file_users = st.text(
    st.characters(codec="utf-8", categories=["L", "N", "P", "S"], exclude_characters=":#"),
    min_size=1,
    max_size=20,
)
file_passwords = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\r\n\0"),
    min_size=1,
    max_size=30,
)


@given(user=file_users, password=file_passwords)
def test_format_then_parse_round_trip(user: str, password: str) -> None:
    try:
        key = prepare_identity(user)
    except SaslError:
        with pytest.raises(CredentialFileError):
            format_entry(user, password)
        return
    line = format_entry(user, password)
    assert "\n" not in line
    assert parse_file(line + "\n") == {key: (password,)}


# --------------------------------------------------------------------------------------
# PasswordTable
# --------------------------------------------------------------------------------------

VERIFIER_ONLY = PasswordTable(
    {
        "alice": "wonderland",
        "bob": [make_scram_verifier("builder", "SHA-256"), make_scram_verifier("builder", "SHA-1")],
        "mrose": "tanstaaf",
    }
)


def test_plaintext_user_every_check() -> None:
    table = VERIFIER_ONLY
    assert table.check_password("alice", "wonderland")
    assert not table.check_password("alice", "Wonderland")
    digest = hmac.new(b"wonderland", b"<c@h>", "md5").hexdigest()
    assert table.check_cram_md5("alice", b"<c@h>", digest)
    assert table.check_cram_md5("alice", b"<c@h>", digest.upper())
    assert not table.check_cram_md5("alice", b"<c@h>", "0" * 32)
    assert table.check_apop("mrose", APOP_STAMP, APOP_DIGEST)
    assert not table.check_apop("mrose", APOP_STAMP, "0" * 32)
    derived = table.scram_credentials("alice", "SHA-256")
    assert derived is table.scram_credentials("alice", "SHA-256")  # cached, stable salt
    assert derived.iterations == MIN_SCRAM_ITERATIONS


def test_verifier_only_user() -> None:
    table = VERIFIER_ONLY
    assert table.check_password("bob", "builder")  # SaltedPassword recomputed
    assert not table.check_password("bob", "builderx")
    digest = hmac.new(b"builder", b"<c@h>", "md5").hexdigest()
    assert not table.check_cram_md5("bob", b"<c@h>", digest)
    assert not table.check_apop("bob", APOP_STAMP, apop_digest(APOP_STAMP, "builder"))
    client = Scram("SHA-1", "bob", "builder")
    server = ScramServer("SHA-1", table)
    step = server.start(client.initial_response())
    step = server.step(client.respond(step.data))  # type: ignore[union-attr]
    step = server.step(client.respond(step.data))  # type: ignore[union-attr]
    assert step == Success("bob")


def test_unknown_user_takes_the_same_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """HARDENING 36: the same PBKDF2 work for an unknown user as for a stored one."""
    table = PasswordTable({"bob": make_scram_verifier("builder", "SHA-256", 6000)})
    calls: list[int] = []
    real = hashlib.pbkdf2_hmac

    def spy(
        name: str, password: bytes, salt: bytes, iterations: int, dklen: int | None = None
    ) -> bytes:
        calls.append(iterations)
        return real(name, password, salt, iterations, dklen)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", spy)
    assert not table.check_password("bob", "wrong")
    known = list(calls)
    calls.clear()
    assert not table.check_password("nobody", "wrong")
    assert calls == known == [6000]
    assert table.scram_credentials("nobody", "SHA-256").iterations == 6000


def test_unknown_user_decoy_scram_credentials() -> None:
    table = VERIFIER_ONLY
    a, b = table.scram_credentials("nobody", "SHA-1"), table.scram_credentials("nobody", "SHA-1")
    assert a.salt == b.salt and len(a.stored_key) == 20
    assert a.salt != table.scram_credentials("someone", "SHA-1").salt
    # Another table has another secret key, so decoy salts do not leak across servers.
    assert PasswordTable({"x": "y"}).scram_credentials("nobody", "SHA-1").salt != a.salt


@pytest.mark.parametrize("hash_name", ["SHA-1", "SHA-256"])
def test_shared_salt_key_hides_whether_a_plaintext_user_exists(hash_name: str) -> None:
    # Tables sharing a salt_key (a credential file read again) give a name
    # the same made-up salt and iteration count whether it is stored in
    # plaintext or unknown; and a name in another spelling that prepares to
    # the same identity gets the same salt too.
    key = bytes(range(32))
    with_carol = PasswordTable({"carol": "pw", "x": "y"}, salt_key=key)
    without = PasswordTable({"x": "y"}, salt_key=key)
    a = with_carol.scram_credentials("carol", hash_name)
    b = without.scram_credentials("carol", hash_name)
    assert (a.salt, a.iterations) == (b.salt, b.iterations)
    assert without.scram_credentials("car\u00adol", hash_name).salt == b.salt
    assert PasswordTable({"x": "y"}).scram_credentials("carol", hash_name).salt != b.salt
    with pytest.raises(ValueError, match="salt_key"):
        PasswordTable({"x": "y"}, salt_key=b"short")


def test_compare_digest_used_by_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """HARDENING 37."""
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    table = PasswordTable(
        {"alice": "wonderland", "bob": make_scram_verifier("builder")}, tokens={"alice": "tok"}
    )
    checks: list[Callable[[], object]] = [
        lambda: table.check_password("alice", "wonderland"),
        lambda: table.check_password("bob", "builder"),
        lambda: table.check_password("nobody", "x"),
        lambda: table.check_cram_md5("alice", b"<a@b>", "0" * 32),
        lambda: table.check_apop("alice", b"<a@b>", "0" * 32),
        lambda: table.check_token("alice", "tok"),
        lambda: table.check_token(None, "tok"),
        lambda: verify_user_pass(table, "alice", "wonderland"),
        lambda: verify_apop(table, "alice", b"<a@b>", "0" * 32),
    ]
    for check in checks:
        calls.clear()
        check()
        assert calls


def test_tokens_and_proxies() -> None:
    table = PasswordTable(
        {"alice": "pw", "shared": "pw"},
        tokens={"alice": ["t1", "t2"], "svc": "t3"},
        proxies={"alice": ["shared", "ghost"]},
    )
    assert table.check_token("alice", "t1") == "alice"
    assert table.check_token("alice", "t2") == "alice"
    assert table.check_token("alice", "t3") is None
    assert table.check_token("svc", "t3") == "svc"
    assert table.check_token(None, "t3") == "svc"
    assert table.check_token(None, "nope") is None
    assert table.check_token("nobody", "t1") is None
    assert table.may_act_as("alice", "shared")
    assert not table.may_act_as("alice", "ghost")  # no such user
    assert not table.may_act_as("shared", "alice")
    assert table.user_exists("svc") and table.user_exists("alice")
    assert not table.user_exists("ghost") and not table.user_exists("a\r\nb")


def test_table_keys_are_prepared() -> None:
    table = PasswordTable({"Mu\u0308ller": "pw", "I\u00adX": "pw2"})
    assert table.check_password("M\u00fcller", "pw")
    assert table.check_password("IX", "pw2")
    assert verify_user_pass(table, "Mu\u0308ller".encode(), b"pw") == Success("M\u00fcller")


def test_table_rejects_bad_entries() -> None:
    weak = ScramCredentials("SHA-256", 10, b"s", b"k" * 32, b"k" * 32)
    for entries in [
        {"a\nb": "pw"},
        {"a": ""},
        {"a": "p\rw"},
        {"a": ["pw", "other"]},
        {"a": weak},
        {"a": []},
        {"a": [make_scram_verifier("x", "SHA-1"), make_scram_verifier("y", "SHA-1")]},
    ]:
        with pytest.raises(ValueError):
            PasswordTable(entries)  # type: ignore[arg-type]


def test_capabilities() -> None:
    assert VERIFIER_ONLY.capabilities() == AuthCapabilities(
        password=True, plaintext_secrets=True, scram=frozenset({"SHA-1", "SHA-256"})
    )
    only_256 = PasswordTable({"bob": make_scram_verifier("b")}, tokens={"bob": "t"})
    caps = only_256.capabilities()
    assert caps.scram == {"SHA-256"} and not caps.plaintext_secrets and caps.token
    assert PasswordTable({}, allow_external=True).capabilities().external
    assert not PasswordTable({}).capabilities().password


# --------------------------------------------------------------------------------------
# USER/PASS and APOP
# --------------------------------------------------------------------------------------


def test_verify_user_pass() -> None:
    table = VERIFIER_ONLY
    assert verify_user_pass(table, "alice", "wonderland") == Success("alice")
    assert verify_user_pass(table, b"bob", b"builder") == Success("bob")
    wrong, unknown = verify_user_pass(table, "alice", "x"), verify_user_pass(table, "nobody", "x")
    assert wrong == unknown == AUTH_FAILED
    assert verify_user_pass(table, b"\xffalice", b"x") == INVALID_ENCODING
    assert verify_user_pass(table, "alice", b"\xc3") == INVALID_ENCODING
    assert verify_user_pass(table, "ali\r\nce", "x") == INVALID_IDENTITY
    assert verify_user_pass(table, "alice", "w" * 5000) == AUTH_FAILED
    assert verify_user_pass(table, "alice", "") == AUTH_FAILED


def test_verify_apop() -> None:
    table = VERIFIER_ONLY
    assert verify_apop(table, "mrose", APOP_STAMP, APOP_DIGEST) == Success("mrose")
    assert verify_apop(table, b"mrose", APOP_STAMP, APOP_DIGEST.upper().encode()) == Success(
        "mrose"
    )
    results = {
        verify_apop(table, "mrose", APOP_STAMP, "0" * 32),
        verify_apop(table, "nobody", APOP_STAMP, APOP_DIGEST),
        verify_apop(table, "mrose", APOP_STAMP, "xyz"),
        verify_apop(table, "mrose", b"<other@stamp>", APOP_DIGEST),
        verify_apop(table, "bob", APOP_STAMP, apop_digest(APOP_STAMP, "builder")),
    }
    assert results == {AUTH_FAILED}
    assert verify_apop(table, "mr\rose", APOP_STAMP, APOP_DIGEST) == INVALID_IDENTITY


def test_apop_policy() -> None:
    caps = VERIFIER_ONLY.capabilities()
    assert not apop_available(caps)  # off by default (HARDENING 40)
    assert apop_available(caps, enabled=True)
    assert not apop_available(AuthCapabilities(plaintext_secrets=False), enabled=True)
    assert not client_may_use_apop(APOP_STAMP, tls_active=False)
    assert client_may_use_apop(APOP_STAMP, tls_active=True)
    assert not client_may_use_apop(None, tls_active=True)


# --------------------------------------------------------------------------------------
# Mechanism policy (HARDENING 39)
# --------------------------------------------------------------------------------------

FULL = AuthCapabilities(
    password=True,
    plaintext_secrets=True,
    scram=frozenset({"SHA-1", "SHA-256"}),
    token=True,
    external=True,
)


def test_server_mechanisms_without_tls() -> None:
    names = server_mechanisms(FULL, False, False, False)
    assert names == ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5"]
    # Channel-binding data cannot exist without TLS; -PLUS stays hidden.
    assert server_mechanisms(FULL, False, False, True) == names
    allowed = server_mechanisms(FULL, False, True, False)
    assert {"PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"} <= set(allowed)
    assert "EXTERNAL" not in allowed


def test_server_mechanisms_with_tls() -> None:
    names = server_mechanisms(FULL, True, False, True, external_available=True)
    assert names == [
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-1",
        "CRAM-MD5",
        "PLAIN",
        "LOGIN",
        "OAUTHBEARER",
        "XOAUTH2",
        "EXTERNAL",
    ]
    assert "EXTERNAL" not in server_mechanisms(FULL, True, False, True)
    no_cb = server_mechanisms(FULL, True, False, False)
    assert not any(n.endswith("-PLUS") for n in no_cb)
    verifiers = AuthCapabilities(scram=frozenset({"SHA-256"}))
    assert server_mechanisms(verifiers, True, False, False) == ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
    assert "APOP" not in names


def test_plaintext_allowed() -> None:
    assert plaintext_allowed(tls_active=True, allow_plaintext=False)
    assert plaintext_allowed(tls_active=False, allow_plaintext=True)
    assert not plaintext_allowed(tls_active=False, allow_plaintext=False)


ALL = [
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-1",
    "CRAM-MD5",
    "PLAIN",
    "LOGIN",
    "OAUTHBEARER",
    "XOAUTH2",
    "EXTERNAL",
]


def test_choose_client_mechanism_preference_order() -> None:
    def choose(offered: list[str], **kw: bool) -> str | None:
        base = {"have_password": True, "tls_active": True, "channel_binding_available": True}
        base.update(kw)
        return choose_client_mechanism(offered, **base)

    expected_order = ALL[:7]
    offered = list(reversed(ALL[:7]))
    for expected in expected_order:
        assert choose(offered) == expected
        offered.remove(expected)
    assert choose([]) is None
    assert choose(["scram-sha-1", "plain"]) == "SCRAM-SHA-1"
    assert choose(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], channel_binding_available=False) == (
        "SCRAM-SHA-256"
    )
    assert choose(ALL, have_token=True) == "OAUTHBEARER"
    assert choose(["XOAUTH2", "PLAIN"], have_token=True, have_password=False) == "XOAUTH2"
    assert choose(ALL, have_client_cert=True) == "EXTERNAL"
    assert choose(["PLAIN"], have_password=False) is None


def test_choose_client_mechanism_never_plaintext_without_tls() -> None:
    kw = {"have_password": True, "have_token": True, "tls_active": False}
    assert choose_client_mechanism(["PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"], **kw) is None
    assert choose_client_mechanism(["PLAIN", "CRAM-MD5"], **kw) == "CRAM-MD5"
    assert choose_client_mechanism(["PLAIN", "LOGIN"], **kw, allow_insecure=True) == "PLAIN"
    # No -PLUS and no EXTERNAL without TLS, whatever the caller claims.
    assert (
        choose_client_mechanism(
            ["SCRAM-SHA-256-PLUS", "EXTERNAL"],
            have_password=True,
            have_client_cert=True,
            tls_active=False,
            channel_binding_available=True,
        )
        is None
    )


@given(
    offered=st.lists(st.sampled_from([*ALL, "DIGEST-MD5", "NTLM", "GSSAPI"]), unique=True),
    have_password=st.booleans(),
    have_token=st.booleans(),
    have_client_cert=st.booleans(),
    tls_active=st.booleans(),
    allow_insecure=st.booleans(),
    channel_binding_available=st.booleans(),
)
def test_choose_client_mechanism_properties(
    offered: list[str],
    have_password: bool,
    have_token: bool,
    have_client_cert: bool,
    tls_active: bool,
    allow_insecure: bool,
    channel_binding_available: bool,
) -> None:
    choice = choose_client_mechanism(
        offered,
        have_password=have_password,
        have_token=have_token,
        have_client_cert=have_client_cert,
        tls_active=tls_active,
        allow_insecure=allow_insecure,
        channel_binding_available=channel_binding_available,
    )
    if choice is None:
        return
    assert choice in offered
    if choice in ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"):
        assert tls_active or allow_insecure
    if choice.endswith("-PLUS"):
        assert tls_active and channel_binding_available
    if choice == "EXTERNAL":
        assert tls_active and have_client_cert
    if choice in ("OAUTHBEARER", "XOAUTH2"):
        assert have_token
    if choice.startswith("SCRAM") or choice in ("CRAM-MD5", "PLAIN", "LOGIN"):
        assert have_password


@settings(max_examples=50)
@given(
    caps=st.builds(
        AuthCapabilities,
        password=st.booleans(),
        plaintext_secrets=st.booleans(),
        scram=st.frozensets(st.sampled_from(["SHA-1", "SHA-256"])),
        token=st.booleans(),
        external=st.booleans(),
    ),
    tls=st.booleans(),
    allow=st.booleans(),
    cb=st.booleans(),
)
def test_server_mechanisms_properties(
    caps: AuthCapabilities, tls: bool, allow: bool, cb: bool
) -> None:
    names = server_mechanisms(caps, tls, allow, cb, external_available=True)
    assert len(names) == len(set(names))
    if not (tls or allow):
        assert not {"PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"} & set(names)
    if not (tls and cb):
        assert not any(n.endswith("-PLUS") for n in names)
    for name in names:
        if name.endswith("-PLUS"):
            assert name.removesuffix("-PLUS") in names


# --------------------------------------------------------------------------------------
# Failure delay (HARDENING 38)
# --------------------------------------------------------------------------------------


def test_failure_delay_grows_and_caps() -> None:
    policy = FailureDelay()
    assert policy.delay_for("192.0.2.1") == 0.0
    delays = [policy.record_failure("192.0.2.1") for _ in range(6)]
    assert delays == [2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert policy.delay_for("192.0.2.1") == 15.0
    assert policy.delay_for("192.0.2.2") == 0.0
    policy.record_success("192.0.2.1")
    assert policy.delay_for("192.0.2.1") == 0.0
    assert policy.record_failure("192.0.2.1") == 2.0


def test_failure_delay_zero_base_for_tests() -> None:
    policy = FailureDelay(base=0)
    assert [policy.record_failure("a") for _ in range(3)] == [0.0, 0.0, 0.0]


def test_failure_delay_many_failures_do_not_overflow() -> None:
    policy = FailureDelay(base=1, maximum=30, factor=10)
    for _ in range(5000):
        delay = policy.record_failure("a")
    assert delay == 30.0


def test_failure_delay_memory_is_bounded() -> None:
    policy = FailureDelay(max_tracked=100)
    for i in range(20_000):
        policy.record_failure(f"10.0.{i // 256}.{i % 256}")
    assert len(policy) == 100
    assert policy.delay_for("10.0.0.0") == 0.0  # oldest evicted
    assert policy.delay_for(f"10.0.{19_999 // 256}.{19_999 % 256}") == 2.0


def test_failure_delay_forgets_old_failures_with_a_clock() -> None:
    now = [1000.0]
    policy = FailureDelay(clock=lambda: now[0], forget_after=60)
    policy.record_failure("a")
    policy.record_failure("a")
    assert policy.delay_for("a") == 4.0
    now[0] += 61
    assert policy.delay_for("a") == 0.0
    assert policy.record_failure("a") == 2.0


@pytest.mark.parametrize(
    "kwargs",
    [{"base": -1}, {"base": 5, "maximum": 1}, {"factor": 0.5}, {"max_tracked": 0}],
)
def test_failure_delay_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FailureDelay(**kwargs)  # type: ignore[arg-type]


def test_unknown_user_and_wrong_password_same_delay() -> None:
    """HARDENING 36: the delay depends on the address, not on which check failed."""
    policy = FailureDelay()
    table = VERIFIER_ONLY
    results = []
    for user in ("alice", "nobody"):
        result = verify_user_pass(table, user, "wrong")
        results.append((result, policy.record_failure(f"addr-{user}")))
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "name", ["../alice", "alice/../../etc", "/etc/passwd", "%2e%2e/alice", "ali\0ce", "a" * 1024]
)
def test_path_like_user_names_never_authenticate(name: str) -> None:
    """HARDENING 42 at this level: such names are refused or simply unknown; a Success
    only ever names a user of the table."""
    table = PasswordTable({"alice": "wonderland"})
    assert verify_user_pass(table, name, "wonderland") in (AUTH_FAILED, INVALID_IDENTITY)
    assert not table.user_exists(name)
