"""SASL mechanisms, APOP helpers, strict base64 and SASLprep (pop3proto._sasl)."""

from __future__ import annotations

import base64
import hmac
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pop3proto._auth import PasswordTable, make_scram_verifier
from pop3proto._sasl import (
    AUTH_FAILED,
    CANCELLED,
    CB_DOWNGRADE,
    CB_MISMATCH,
    CB_UNSUPPORTED,
    EXTENSION_UNSUPPORTED,
    FAILURE_REASONS,
    INVALID_ENCODING,
    INVALID_IDENTITY,
    MALFORMED,
    NOT_AUTHORIZED,
    RESPONSE_TOO_LONG,
    TOO_MANY_ROUNDS,
    UNEXPECTED_INITIAL_RESPONSE,
    Challenge,
    ClientMechanism,
    CramMD5,
    CramMD5Server,
    External,
    ExternalServer,
    Failure,
    Login,
    LoginServer,
    OAuthBearer,
    OAuthBearerServer,
    Plain,
    PlainServer,
    SaslError,
    Scram,
    ScramServer,
    ServerMechanism,
    ServerStep,
    Success,
    XOAuth2,
    XOAuth2Server,
    apop_digest,
    apop_timestamp,
    b64decode_strict,
    b64encode,
    client_mechanism,
    make_timestamp,
    normalize_secret,
    prepare_identity,
    saslprep,
    server_mechanism,
)

B64 = base64.b64decode


def exchange(
    client: ClientMechanism, server: ServerMechanism, *, use_ir: bool = True
) -> ServerStep:
    """Run a client mechanism against a server mechanism; the final server step."""
    step = server.start(client.initial_response() if use_ir else None)
    while isinstance(step, Challenge):
        try:
            answer = client.respond(step.data)
        except SaslError:
            return server.cancel()
        step = server.step(answer)
    if isinstance(step, Success):
        client.check_success()
    return step


# --------------------------------------------------------------------------------------
# base64
# --------------------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_b64_round_trip(data: bytes) -> None:
    assert b64decode_strict(b64encode(data)) == data
    assert b64encode(data) == base64.b64encode(data)


@pytest.mark.parametrize(
    "bad",
    [
        b"=AAA",
        b"AAA=BBB=",
        b"AAAA====",
        b"A===",
        b"AAA",
        b"AA=A",
        b"AA-A",
        b"AA_A",
        b"AA A",
        b"AAA\n",
        b"AB==",  # non-zero padding bits
        b"AAF=",
        b"\xc3\xa9AA",
        b"=",
        b"==",
    ],
)
def test_b64_strict_rejects(bad: bytes) -> None:
    with pytest.raises(SaslError):
        b64decode_strict(bad)


def test_b64_strict_accepts_padding_forms() -> None:
    assert b64decode_strict(b"") == b""
    assert b64decode_strict(b"AA==") == b"\x00"
    assert b64decode_strict(b"AAA=") == b"\x00\x00"
    assert b64decode_strict(b"dGVzdAB0ZXN0AHRlc3Q=") == b"test\0test\0test"
    assert issubclass(SaslError, ValueError)


@given(st.binary(max_size=40))
def test_b64_strict_only_accepts_canonical(data: bytes) -> None:
    try:
        decoded = b64decode_strict(data)
    except SaslError:
        return
    assert base64.b64encode(decoded) == data


# --------------------------------------------------------------------------------------
# SASLprep (RFC 4013 §3 examples)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "prepared"),
    [
        ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),
        ("a\u00a0b", "a b"),  # non-ASCII space -> SPACE
    ],
)
def test_saslprep_rfc4013_examples(raw: str, prepared: str) -> None:
    assert saslprep(raw) == prepared


@pytest.mark.parametrize("raw", ["\u0007", "\u0627\u0031", "a\ue000", "a\ufffe"])
def test_saslprep_rfc4013_prohibited(raw: str) -> None:
    with pytest.raises(SaslError):
        saslprep(raw)


def test_saslprep_unassigned_only_in_queries() -> None:
    unassigned = "\u0221"  # unassigned in Unicode 3.2
    with pytest.raises(SaslError):
        saslprep(unassigned)
    assert saslprep(unassigned, allow_unassigned=True) == unassigned


def test_normalize_secret_falls_back_to_raw() -> None:
    assert normalize_secret("pass\u00adword") == "password"
    assert normalize_secret("tab\there") == "tab\there"  # prohibited -> used as is
    assert normalize_secret("\u00ad") == "\u00ad"  # empty after mapping -> used as is


@pytest.mark.parametrize(
    "name",
    ["", "us\rer", "us\ner", "us\0er", "a\x7f", "x" * 1024, "\u00ad", "é" * 300],
)
def test_prepare_identity_rejects(name: str) -> None:
    with pytest.raises(SaslError):
        prepare_identity(name)


# --------------------------------------------------------------------------------------
# Test vectors (PROTOCOL.md §9, §4), both directions
# --------------------------------------------------------------------------------------


def test_plain_vectors() -> None:
    assert b64encode(Plain("user", "pencil").initial_response()) == b"AHVzZXIAcGVuY2ls"
    client = Plain("test", "test", authzid="test")
    assert b64encode(client.initial_response()) == b"dGVzdAB0ZXN0AHRlc3Q="
    table = PasswordTable({"user": "pencil", "test": "test"})
    assert PlainServer(table).start(B64("AHVzZXIAcGVuY2ls")) == Success("user")
    # RFC 5034 §6 second example: no initial response, empty challenge "+ ".
    server = PlainServer(table)
    assert server.start(None) == Challenge(b"")
    assert server.step(B64("dGVzdAB0ZXN0AHRlc3Q=")) == Success("test")
    assert server.done


def test_plain_client_answers_empty_challenge_once() -> None:
    client = Plain("user", "pencil")
    assert client.respond(b"") == b"\0user\0pencil"
    with pytest.raises(SaslError):
        client.respond(b"")
    with pytest.raises(SaslError):
        Plain("user", "pencil").respond(b"something")


def test_login_vector() -> None:
    table = PasswordTable({"tim": "tanstaaftanstaaf"})
    server = LoginServer(table)
    client = Login("tim", "tanstaaftanstaaf")
    assert client.initial_response() is None
    first = server.start(None)
    assert first == Challenge(B64("VXNlcm5hbWU6"))
    assert isinstance(first, Challenge)
    answer = client.respond(first.data)
    assert b64encode(answer) == b"dGlt"
    second = server.step(answer)
    assert second == Challenge(B64("UGFzc3dvcmQ6"))
    assert isinstance(second, Challenge)
    answer = client.respond(second.data)
    assert b64encode(answer) == b"dGFuc3RhYWZ0YW5zdGFhZg=="
    assert server.step(answer) == Success("tim")


CRAM_CHALLENGE = B64("PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+")


def test_cram_md5_vector() -> None:
    assert CRAM_CHALLENGE == b"<1896.697170952@postoffice.reston.mci.net>"
    client = CramMD5("tim", "tanstaaftanstaaf")
    assert client.initial_response() is None
    answer = client.respond(CRAM_CHALLENGE)
    assert b64encode(answer) == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
    server = CramMD5Server(PasswordTable({"tim": "tanstaaftanstaaf"}), challenge=CRAM_CHALLENGE)
    assert server.start(None) == Challenge(CRAM_CHALLENGE)
    assert server.step(B64("dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw")) == Success("tim")


def test_cram_md5_server_challenge_is_msg_id() -> None:
    server = CramMD5Server(PasswordTable({"tim": "x"}), hostname="pop.example.org")
    step = server.start(None)
    assert isinstance(step, Challenge)
    assert apop_timestamp(step.data) == step.data
    assert step.data.endswith(b"@pop.example.org>")


SHA1_SERVER_FIRST = b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
SHA1_CLIENT_FINAL = (
    b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
)
SHA1_SERVER_FINAL = b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="


def test_scram_sha1_rfc5802_vector_client() -> None:
    client = Scram("SHA-1", "user", "pencil", nonce="fyko+d2lbbFgONRv9qkxdawL")
    assert client.name == "SCRAM-SHA-1"
    assert client.initial_response() == b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
    assert client.respond(SHA1_SERVER_FIRST) == SHA1_CLIENT_FINAL
    with pytest.raises(SaslError):
        client.check_success()  # no v= yet
    assert client.respond(SHA1_SERVER_FINAL) == b""
    client.check_success()


def test_scram_sha1_rfc5802_vector_server() -> None:
    verifier = make_scram_verifier("pencil", "SHA-1", 4096, salt=B64("QSXCR+Q6sek8bf92"))
    server = ScramServer("SHA-1", PasswordTable({"user": verifier}), nonce="3rfcNHYJY1ZVvWVs7j")
    assert server.start(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL") == Challenge(SHA1_SERVER_FIRST)
    assert server.step(SHA1_CLIENT_FINAL) == Challenge(SHA1_SERVER_FINAL)
    assert not server.done
    assert server.step(b"") == Success("user")


SHA256_WIRE = {
    "ir": b"biwsbj11c2VyLHI9ck9wck5HZndFYmVSV2diTkVrcU8=",
    "server_first": (
        b"cj1yT3ByTkdmd0ViZVJXZ2JORWtxTyVodllEcFdVYTJSYVRDQWZ1eEZJbGopaE5sRiRrMCxzPVcyMlph"
        b"SjBTTlk3c29Fc1VFamI2Z1E9PSxpPTQwOTY="
    ),
    "client_final": (
        b"Yz1iaXdzLHI9ck9wck5HZndFYmVSV2diTkVrcU8laHZZRHBXVWEyUmFUQ0FmdXhGSWxqKWhObEYkazAs"
        b"cD1kSHpiWmFwV0lrNGpVaE4rVXRlOXl0YWc5empmTUhnc3FtbWl6N0FuZFZRPQ=="
    ),
    "server_final": b"dj02cnJpVFJCaTIzV3BSUi93dHVwK21NaFVaVW4vZEI1bkxUSlJzamw5NUc0PQ==",
}


def test_scram_sha256_rfc7677_vector_both_directions() -> None:
    client = Scram("SHA-256", "user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert b64encode(client.initial_response()) == SHA256_WIRE["ir"]
    answer = client.respond(b64decode_strict(SHA256_WIRE["server_first"]))
    assert b64encode(answer) == SHA256_WIRE["client_final"]
    assert client.respond(b64decode_strict(SHA256_WIRE["server_final"])) == b""
    client.check_success()

    verifier = make_scram_verifier("pencil", "SHA-256", 4096, salt=B64("W22ZaJ0SNY7soEsUEjb6gQ=="))
    server = ScramServer(
        "SHA-256", PasswordTable({"user": verifier}), nonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    )
    step = server.start(b64decode_strict(SHA256_WIRE["ir"]))
    assert step == Challenge(b64decode_strict(SHA256_WIRE["server_first"]))
    step = server.step(b64decode_strict(SHA256_WIRE["client_final"]))
    assert step == Challenge(b64decode_strict(SHA256_WIRE["server_final"]))
    assert server.step(b"") == Success("user")


OAUTH_TOKEN = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
OAUTH_IR = (
    b"bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9cG9wLmV4YW1wbGUuY29tAXBvcnQ9OTk1AWF1dGg9QmVhcmVy"
    b"IHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
)
OAUTH_ERROR = (
    b"eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGFtcGxlX3Njb3BlIiwib3BlbmlkLWNvbmZp"
    b"Z3VyYXRpb24iOiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxsLWtub3duL29wZW5pZC1jb25maWd1cmF0aW9uIn0="
)


def test_oauthbearer_vector_success() -> None:
    client = OAuthBearer("user@example.com", OAUTH_TOKEN, host="pop.example.com", port=995)
    assert b64encode(client.initial_response()) == OAUTH_IR
    table = PasswordTable({"user@example.com": "pw"}, tokens={"user@example.com": OAUTH_TOKEN})
    assert OAuthBearerServer(table).start(B64(OAUTH_IR)) == Success("user@example.com")


def test_oauthbearer_vector_error() -> None:
    table = PasswordTable({"user@example.com": "pw"}, tokens={"user@example.com": "other"})
    server = OAuthBearerServer(
        table,
        scope="example_scope",
        openid_configuration="https://example.com/.well-known/openid-configuration",
    )
    step = server.start(B64(OAUTH_IR))
    assert step == Challenge(B64(OAUTH_ERROR))
    client = OAuthBearer("user@example.com", OAUTH_TOKEN, host="pop.example.com", port=995)
    answer = client.respond(B64(OAUTH_ERROR))
    assert b64encode(answer) == b"AQ=="
    assert client.error_status == "invalid_token"
    assert server.step(answer) == AUTH_FAILED
    with pytest.raises(SaslError):
        client.check_success()


XOAUTH2_TOKEN = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
XOAUTH2_IR = (
    b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNr"
    b"QmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
)


def test_xoauth2_vector_both_directions() -> None:
    client = XOAuth2("someuser@example.com", XOAUTH2_TOKEN)
    assert b64encode(client.initial_response()) == XOAUTH2_IR
    good = PasswordTable({}, tokens={"someuser@example.com": XOAUTH2_TOKEN})
    assert XOAuth2Server(good).start(B64(XOAUTH2_IR)) == Success("someuser@example.com")
    # Two-step form (Microsoft 365): AUTH XOAUTH2, "+ ", then the message.
    server = XOAuth2Server(good)
    assert server.start(None) == Challenge(b"")
    assert server.step(client.respond(b"")) == Success("someuser@example.com")


def test_xoauth2_error_answered_with_empty_line() -> None:
    table = PasswordTable({}, tokens={"someuser@example.com": "another-token"})
    server = XOAuth2Server(table, scope="https://mail.google.com/")
    step = server.start(B64(XOAUTH2_IR))
    assert isinstance(step, Challenge)
    assert b'"status":"400"' in step.data and b"mail.google.com" in step.data
    client = XOAuth2("someuser@example.com", XOAUTH2_TOKEN)
    assert client.respond(step.data) == b""
    assert client.error_status == "400"
    assert server.step(b"") == AUTH_FAILED
    with pytest.raises(SaslError):
        client.check_success()


def test_apop_vector() -> None:
    greeting = b"POP3 server ready <1896.697170952@dbc.mtview.ca.us>"
    stamp = apop_timestamp(greeting)
    assert stamp == b"<1896.697170952@dbc.mtview.ca.us>"
    assert apop_digest(stamp, "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"


def test_external_forms() -> None:
    table = PasswordTable({"user": "pw", "cert-owner": "pw"}, proxies={"cert-owner": ["user"]})
    assert External().initial_response() == b""
    assert External("user").initial_response() == b"user"
    assert exchange(External(), ExternalServer(table, "cert-owner")) == Success("cert-owner")
    assert exchange(External("user"), ExternalServer(table, "cert-owner")) == Success("user")
    assert exchange(External("user"), ExternalServer(table, "user")) == Success("user")
    assert exchange(External(), ExternalServer(table, None)) == AUTH_FAILED
    assert exchange(External(), ExternalServer(table, "stranger")) == AUTH_FAILED
    assert exchange(External("cert-owner"), ExternalServer(table, "user")) == NOT_AUTHORIZED
    server = ExternalServer(table, "user")
    assert server.start(None) == Challenge(b"")
    assert server.step(b"") == Success("user")


# --------------------------------------------------------------------------------------
# Our client against our server, every mechanism
# --------------------------------------------------------------------------------------

TABLE = PasswordTable(
    {"alice": "wonderland", "bob": [make_scram_verifier("builder", "SHA-256")]},
    tokens={"alice": "tok-alice"},
)


@pytest.mark.parametrize("use_ir", [True, False])
@pytest.mark.parametrize(
    ("client", "server", "user"),
    [
        (lambda: Plain("alice", "wonderland"), lambda: PlainServer(TABLE), "alice"),
        (lambda: Login("alice", "wonderland"), lambda: LoginServer(TABLE), "alice"),
        (lambda: CramMD5("alice", "wonderland"), lambda: CramMD5Server(TABLE), "alice"),
        (
            lambda: Scram("SHA-1", "alice", "wonderland"),
            lambda: ScramServer("SHA-1", TABLE),
            "alice",
        ),
        (
            lambda: Scram("SHA-256", "alice", "wonderland"),
            lambda: ScramServer("SHA-256", TABLE),
            "alice",
        ),
        (lambda: Scram("SHA-256", "bob", "builder"), lambda: ScramServer("SHA-256", TABLE), "bob"),
        (lambda: Plain("bob", "builder"), lambda: PlainServer(TABLE), "bob"),
        (lambda: Login("bob", "builder"), lambda: LoginServer(TABLE), "bob"),
        (lambda: OAuthBearer("alice", "tok-alice"), lambda: OAuthBearerServer(TABLE), "alice"),
        (lambda: OAuthBearer("", "tok-alice"), lambda: OAuthBearerServer(TABLE), "alice"),
        (lambda: XOAuth2("alice", "tok-alice"), lambda: XOAuth2Server(TABLE), "alice"),
        (lambda: External(), lambda: ExternalServer(TABLE, "alice"), "alice"),
    ],
)
def test_client_against_server(client, server, user: str, use_ir: bool) -> None:  # type: ignore[no-untyped-def]
    assert exchange(client(), server(), use_ir=use_ir) == Success(user)


@pytest.mark.parametrize(
    ("client", "server"),
    [
        (lambda: Plain("alice", "wrong"), lambda: PlainServer(TABLE)),
        (lambda: Login("alice", "wrong"), lambda: LoginServer(TABLE)),
        (lambda: CramMD5("alice", "wrong"), lambda: CramMD5Server(TABLE)),
        (lambda: Scram("SHA-256", "alice", "wrong"), lambda: ScramServer("SHA-256", TABLE)),
        (lambda: Scram("SHA-256", "bob", "wrong"), lambda: ScramServer("SHA-256", TABLE)),
        (lambda: Scram("SHA-1", "bob", "builder"), lambda: ScramServer("SHA-1", TABLE)),
        (lambda: CramMD5("bob", "builder"), lambda: CramMD5Server(TABLE)),
        (lambda: Plain("bob", "wrong"), lambda: PlainServer(TABLE)),
        (lambda: OAuthBearer("alice", "bad"), lambda: OAuthBearerServer(TABLE)),
        (lambda: OAuthBearer("", "bad"), lambda: OAuthBearerServer(TABLE)),
        (lambda: XOAuth2("alice", "bad"), lambda: XOAuth2Server(TABLE)),
    ],
)
def test_wrong_credentials_fail(client, server) -> None:  # type: ignore[no-untyped-def]
    assert exchange(client(), server()) == AUTH_FAILED


@pytest.mark.parametrize("hash_name", ["SHA-1", "SHA-256"])
@pytest.mark.parametrize("cb_type", ["tls-exporter", "tls-server-end-point", "tls-unique"])
def test_scram_plus_matching_channel_binding(hash_name: str, cb_type: str) -> None:
    data = bytes(range(32))
    client = Scram(hash_name, "alice", "wonderland", channel_binding=(cb_type, data), plus=True)
    assert client.name == f"SCRAM-{hash_name}-PLUS"
    assert client.initial_response().startswith(f"p={cb_type},,".encode())
    server = ScramServer(hash_name, TABLE, plus=True, channel_binding=(cb_type, data))
    assert server.name == client.name
    assert exchange(client, server) == Success("alice")


def test_scram_plus_mismatching_channel_binding_fails() -> None:
    client = Scram(
        "SHA-256", "alice", "wonderland", channel_binding=("tls-exporter", b"A" * 32), plus=True
    )
    server = ScramServer("SHA-256", TABLE, plus=True, channel_binding=("tls-exporter", b"B" * 32))
    assert exchange(client, server) == CB_MISMATCH


def test_scram_plus_unsupported_type_fails() -> None:
    client = Scram(
        "SHA-256", "alice", "wonderland", channel_binding=("tls-unique", b"A" * 12), plus=True
    )
    server = ScramServer("SHA-256", TABLE, plus=True, channel_binding={"tls-exporter": b"A" * 32})
    assert exchange(client, server) == CB_UNSUPPORTED


def test_scram_plus_server_with_several_binding_types() -> None:
    bindings = {"tls-exporter": b"E" * 32, "tls-server-end-point": b"S" * 32}
    for cb_type, data in bindings.items():
        client = Scram("SHA-256", "alice", "wonderland", channel_binding=(cb_type, data), plus=True)
        server = ScramServer("SHA-256", TABLE, plus=True, channel_binding=bindings)
        assert exchange(client, server) == Success("alice")


def test_scram_y_flag_downgrade_detected() -> None:
    # Client has CB data but did not see -PLUS (stripped by an attacker): flag "y".
    client = Scram("SHA-256", "alice", "wonderland", channel_binding=("tls-exporter", b"x"))
    assert client.initial_response().startswith(b"y,,")
    server = ScramServer("SHA-256", TABLE, channel_binding=("tls-exporter", b"x"))
    assert exchange(client, server) == CB_DOWNGRADE
    # A server without channel binding accepts "y" (c= is then "eSws").
    client = Scram("SHA-256", "alice", "wonderland", channel_binding=("tls-exporter", b"x"))
    assert exchange(client, ScramServer("SHA-256", TABLE)) == Success("alice")


def test_scram_n_flag_when_plus_offered_but_bare_chosen() -> None:
    client = Scram(
        "SHA-256",
        "alice",
        "wonderland",
        channel_binding=("tls-exporter", b"x"),
        server_offers_plus=True,
    )
    assert client.initial_response().startswith(b"n,,")
    server = ScramServer("SHA-256", TABLE, channel_binding=("tls-exporter", b"x"))
    assert exchange(client, server) == Success("alice")


def test_scram_flag_and_mechanism_must_agree() -> None:
    plus_server = ScramServer("SHA-256", TABLE, plus=True, channel_binding=("tls-exporter", b"x"))
    assert exchange(Scram("SHA-256", "alice", "wonderland"), plus_server) == CB_MISMATCH
    client = Scram(
        "SHA-256", "alice", "wonderland", channel_binding=("tls-exporter", b"x"), plus=True
    )
    bare = ScramServer("SHA-256", TABLE, channel_binding=("tls-exporter", b"x"))
    assert exchange(client, bare) == CB_MISMATCH


def test_scram_c_attribute_always_checked() -> None:
    server = ScramServer("SHA-256", TABLE)
    client = Scram("SHA-256", "alice", "wonderland")
    first = server.start(client.initial_response())
    assert isinstance(first, Challenge)
    final = client.respond(first.data)
    assert final.startswith(b"c=biws,")
    assert server.step(final.replace(b"c=biws,", b"c=eSws,")) == CB_MISMATCH


def test_scram_authzid() -> None:
    table = PasswordTable({"alice": "wonderland", "shared": "x"}, proxies={"alice": ["shared"]})
    client = Scram("SHA-256", "alice", "wonderland", authzid="shared")
    assert exchange(client, ScramServer("SHA-256", table)) == Success("shared")
    client = Scram("SHA-256", "alice", "wonderland", authzid="bob")
    assert exchange(client, ScramServer("SHA-256", TABLE)) == NOT_AUTHORIZED


def test_scram_saslname_escaping_round_trip() -> None:
    table = PasswordTable({"a,b=c": "pw"})
    client = Scram("SHA-1", "a,b=c", "pw")
    assert b"n=a=2Cb=3Dc," in client.initial_response()
    assert exchange(client, ScramServer("SHA-1", table)) == Success("a,b=c")


def test_plain_authzid_policy() -> None:
    table = PasswordTable({"alice": "wonderland", "shared": "x"}, proxies={"alice": ["shared"]})
    assert exchange(Plain("alice", "wonderland", "shared"), PlainServer(table)) == Success("shared")
    assert exchange(Plain("alice", "wonderland", "alice"), PlainServer(table)) == Success("alice")
    assert exchange(Plain("alice", "wonderland", "bob"), PlainServer(TABLE)) == NOT_AUTHORIZED


# --------------------------------------------------------------------------------------
# Property: random user names and passwords round-trip through every mechanism
# --------------------------------------------------------------------------------------

identity_text = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=16
)
password_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\0\r\n"),
    min_size=1,
    max_size=24,
)


def _usable(user: str) -> str:
    try:
        return prepare_identity(user)
    except SaslError:
        assume(False)
        raise


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    user=identity_text,
    password=password_text,
    mechanism=st.sampled_from(["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]),
)
def test_random_credentials_round_trip(user: str, password: str, mechanism: str) -> None:
    prepared = _usable(user)
    table = PasswordTable({user: password})
    client = client_mechanism(mechanism, user=user, password=password)
    server = server_mechanism(mechanism, table)
    assert server is not None
    assert exchange(client, server) == Success(prepared)
    wrong = client_mechanism(mechanism, user=user, password=password + "x")
    server = server_mechanism(mechanism, table)
    assert server is not None
    assert exchange(wrong, server) == AUTH_FAILED


@settings(max_examples=25, deadline=None)
@given(user=identity_text, password=password_text)
def test_random_credentials_with_verifier_only_store(user: str, password: str) -> None:
    prepared = _usable(user)
    table = PasswordTable({user: [make_scram_verifier(password, "SHA-256")]})
    assert exchange(Scram("SHA-256", user, password), ScramServer("SHA-256", table)) == Success(
        prepared
    )
    assert exchange(Plain(user, password), PlainServer(table)) == Success(prepared)


@settings(max_examples=50)
@given(
    user=identity_text,
    token=st.text(st.characters(codec="ascii", min_codepoint=0x21), min_size=1, max_size=40),
)
def test_random_tokens_round_trip(user: str, token: str) -> None:
    prepared = _usable(user)
    table = PasswordTable({}, tokens={user: token})
    assert exchange(OAuthBearer(user, token), OAuthBearerServer(table)) == Success(prepared)
    assert exchange(XOAuth2(user, token), XOAuth2Server(table)) == Success(prepared)


# --------------------------------------------------------------------------------------
# Hardening (HARDENING 20, 36, 37, 41, 43)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "make_client"),
    [
        ("PLAIN", lambda u: Plain(u, "wrong")),
        ("LOGIN", lambda u: Login(u, "wrong")),
        ("CRAM-MD5", lambda u: CramMD5(u, "wrong")),
        ("SCRAM-SHA-1", lambda u: Scram("SHA-1", u, "wrong", nonce="abc")),
        ("SCRAM-SHA-256", lambda u: Scram("SHA-256", u, "wrong", nonce="abc")),
        ("OAUTHBEARER", lambda u: OAuthBearer(u, "wrong")),
        ("XOAUTH2", lambda u: XOAuth2(u, "wrong")),
    ],
)
def test_unknown_user_and_wrong_password_look_the_same(mechanism, make_client) -> None:  # type: ignore[no-untyped-def]
    def transcript(user: str) -> list[object]:
        server = server_mechanism(mechanism, TABLE)
        assert server is not None
        client = make_client(user)
        steps: list[object] = []
        step = server.start(client.initial_response())
        while isinstance(step, Challenge):
            # Keep only the shape of challenges: salts and nonces differ per user.
            steps.append(("challenge", len(step.data) > 0))
            try:
                step = server.step(client.respond(step.data))
            except SaslError:
                step = server.cancel()
        steps.append(step)
        return steps

    known, unknown = transcript("alice"), transcript("nobody")
    assert known == unknown
    assert known[-1] == AUTH_FAILED


def test_scram_unknown_user_gets_stable_plausible_salt() -> None:
    def server_first(user: str) -> bytes:
        step = ScramServer("SHA-256", TABLE).start(f"n,,n={user},r=abc".encode())
        assert isinstance(step, Challenge)
        return step.data

    first, again = server_first("nobody"), server_first("nobody")
    salt, iterations = first.split(b",")[1:3]
    assert again.split(b",")[1] == salt
    assert server_first("bob").split(b",")[2] == iterations == b"i=4096"
    assert server_first("someone-else").split(b",")[1] != salt


def test_secrets_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def spy(a, b):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    cases: list[tuple[ClientMechanism, ServerMechanism]] = [
        (Plain("alice", "wonderland"), PlainServer(TABLE)),
        (Plain("bob", "builder"), PlainServer(TABLE)),
        (CramMD5("alice", "wonderland"), CramMD5Server(TABLE)),
        (Scram("SHA-256", "alice", "wonderland"), ScramServer("SHA-256", TABLE)),
        (OAuthBearer("alice", "tok-alice"), OAuthBearerServer(TABLE)),
        (XOAuth2("alice", "tok-alice"), XOAuth2Server(TABLE)),
    ]
    for client, server in cases:
        calls.clear()
        assert isinstance(exchange(client, server), Success)
        assert calls, f"{server.name} did not use hmac.compare_digest"


class _Chatty(ServerMechanism):
    """A mechanism that never stops challenging, to test the round cap."""

    name = "X-CHATTY"

    def _client_first(self, data: bytes) -> ServerStep:
        return Challenge(b"more")

    def _next(self, data: bytes) -> ServerStep:
        return Challenge(b"more")


def test_hundred_rounds_fail() -> None:
    server = _Chatty()
    steps = [server.start(b"")] + [server.step(b"x") for _ in range(server.max_rounds)]
    assert all(isinstance(s, Challenge) for s in steps)
    assert server.step(b"x") == TOO_MANY_ROUNDS
    assert server.done
    with pytest.raises(SaslError):
        for _ in range(100):
            server.step(b"x")


def test_client_refuses_endless_challenges() -> None:
    client = Login("alice", "wonderland")
    client.respond(b"Username:")
    client.respond(b"Password:")
    with pytest.raises(SaslError):
        client.respond(b"Again:")

    class Endless(ClientMechanism):
        name = "X-ENDLESS"

        def initial_response(self) -> bytes | None:
            return None

        def _respond(self, challenge: bytes) -> bytes:
            return b""

    endless = Endless()
    with pytest.raises(SaslError):
        for _ in range(100):
            endless.respond(b"more")
    assert endless._rounds == endless.max_rounds + 1


@pytest.mark.parametrize(
    "make_server",
    [
        lambda: PlainServer(TABLE),
        lambda: ScramServer("SHA-256", TABLE),
        lambda: OAuthBearerServer(TABLE),
        lambda: XOAuth2Server(TABLE),
        lambda: ExternalServer(TABLE, "alice"),
    ],
)
def test_65k_answer_fails(make_server) -> None:  # type: ignore[no-untyped-def]
    assert make_server().start(b"\0alice\0" + b"w" * 65 * 1024) == RESPONSE_TOO_LONG
    server = make_server()
    assert server.start(None) == Challenge(b"")
    assert server.step(b"a" * 66560) == RESPONSE_TOO_LONG


@pytest.mark.parametrize("bad_user", ["ali\rce", "ali\nce", "alice\r\n", "\x00alice", "a" * 1024])
def test_control_characters_in_identities_fail(bad_user: str) -> None:
    raw = bad_user.encode()
    assert PlainServer(TABLE).start(b"\0" + raw + b"\0wonderland") in (INVALID_IDENTITY, MALFORMED)
    assert PlainServer(TABLE).start(raw + b"\0alice\0wonderland") in (INVALID_IDENTITY, MALFORMED)
    login = LoginServer(TABLE)
    login.start(None)
    login.step(raw)
    assert login.step(b"wonderland") == INVALID_IDENTITY
    scram = ScramServer("SHA-256", TABLE)
    assert scram.start(b"n,,n=" + raw + b",r=abc") == INVALID_IDENTITY
    assert ScramServer("SHA-256", TABLE).start(b"n,a=" + raw + b",n=alice,r=abc") in (
        INVALID_IDENTITY,
        MALFORMED,
    )
    assert XOAuth2Server(TABLE).start(b"user=" + raw + b"\x01auth=Bearer tok-alice\x01\x01") in (
        INVALID_IDENTITY,
        MALFORMED,
    )
    assert OAuthBearerServer(TABLE).start(
        b"n,a=" + raw + b",\x01auth=Bearer tok-alice\x01\x01"
    ) in (INVALID_IDENTITY, MALFORMED)
    cram = CramMD5Server(TABLE)
    cram.start(None)
    assert cram.step(raw + b" " + b"0" * 32) in (INVALID_IDENTITY, MALFORMED)
    assert ExternalServer(TABLE, "alice").start(raw) in (INVALID_IDENTITY, MALFORMED)


@pytest.mark.parametrize("value", ["ali\rce", "ali\nce", "ali\0ce"])
def test_client_refuses_control_characters_in_credentials(value: str) -> None:
    for build in (
        lambda: Plain(value, "pw"),
        lambda: Plain("user", value),
        lambda: Plain("user", "pw", value),
        lambda: Login(value, "pw"),
        lambda: Login("user", value),
        lambda: CramMD5(value, "pw"),
        lambda: Scram("SHA-256", value, "pw"),
        lambda: Scram("SHA-256", "user", value),
        lambda: OAuthBearer(value, "tok"),
        lambda: XOAuth2("user", value),
        lambda: External(value),
    ):
        with pytest.raises(SaslError):
            build()


@pytest.mark.parametrize(
    ("make_server", "message"),
    [
        (lambda: PlainServer(TABLE), b"\0al\xffice\0wonderland"),
        (lambda: ScramServer("SHA-256", TABLE), b"n,,n=\xc3(,r=abc"),
        (lambda: OAuthBearerServer(TABLE), b"n,,\x01auth=Bearer \xff\x01\x01"),
        (lambda: XOAuth2Server(TABLE), b"user=\xe2\x28\xa1\x01auth=Bearer x\x01\x01"),
        (lambda: ExternalServer(TABLE, "alice"), b"\xc0\xaf"),
    ],
)
def test_invalid_utf8_fails(make_server, message: bytes) -> None:  # type: ignore[no-untyped-def]
    assert make_server().start(message) == INVALID_ENCODING


def test_invalid_utf8_in_login_and_cram() -> None:
    login = LoginServer(TABLE)
    login.start(None)
    assert login.step(b"\xff") == INVALID_ENCODING
    cram = CramMD5Server(TABLE)
    cram.start(None)
    assert cram.step(b"\xff " + b"0" * 32) == INVALID_ENCODING


def test_server_first_mechanism_refuses_initial_response() -> None:
    assert LoginServer(TABLE).start(b"alice") == UNEXPECTED_INITIAL_RESPONSE
    assert LoginServer(TABLE).start(b"") == UNEXPECTED_INITIAL_RESPONSE
    assert CramMD5Server(TABLE).start(b"alice") == UNEXPECTED_INITIAL_RESPONSE


def test_client_first_mechanism_without_initial_response_gets_empty_challenge() -> None:
    for name in ("PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256", "OAUTHBEARER", "XOAUTH2", "EXTERNAL"):
        server = server_mechanism(name, TABLE, external_identity="alice")
        assert server is not None
        assert server.start(None) == Challenge(b"")


def test_cancel() -> None:
    server = ScramServer("SHA-256", TABLE)
    server.start(None)
    assert server.cancel() == CANCELLED
    assert server.done
    with pytest.raises(SaslError):
        server.step(b"")


def test_start_twice_is_a_local_error() -> None:
    server = PlainServer(TABLE)
    server.start(None)
    with pytest.raises(SaslError):
        server.start(None)
    with pytest.raises(SaslError):
        PlainServer(TABLE).step(b"")


@pytest.mark.parametrize(
    "message",
    [
        b"x,,n=alice,r=abc",
        b"n,,m=ext,n=alice,r=abc",
        b"n,,n=alice",
        b"n,,r=abc,n=alice",
        b"n,,n=alice,r=",
        b"n,,n=alice,r=a,b",
        b"n,b=x,n=alice,r=abc",
        b"n,,n=al=ice,r=abc",
        b"n,,n=alice,r=ab\x7fc",
        b"",
        b"n",
    ],
)
def test_scram_server_rejects_bad_client_first(message: bytes) -> None:
    step = ScramServer("SHA-256", TABLE).start(message)
    assert isinstance(step, Failure)
    assert step in (MALFORMED, EXTENSION_UNSUPPORTED, INVALID_IDENTITY)
    if message.startswith(b"n,,m="):
        assert step == EXTENSION_UNSUPPORTED


def test_scram_server_rejects_bad_client_final() -> None:
    def started() -> tuple[ScramServer, Scram, bytes]:
        server = ScramServer("SHA-256", TABLE)
        client = Scram("SHA-256", "alice", "wonderland")
        first = server.start(client.initial_response())
        assert isinstance(first, Challenge)
        return server, client, client.respond(first.data)

    server, _, final = started()
    assert server.step(final.replace(b",r=", b",r=x")) == MALFORMED  # nonce changed
    server, _, final = started()
    assert server.step(final.split(b",p=")[0]) == MALFORMED  # no proof
    server, _, final = started()
    assert server.step(final[:-4] + b"A===") == MALFORMED  # bad base64 proof
    server, _, final = started()
    assert server.step(final.split(b",p=")[0] + b",p=AAAA") == AUTH_FAILED  # short proof
    server, _, final = started()
    assert isinstance(server.step(final), Challenge)
    assert server.step(b"not empty") == MALFORMED  # answer to v= must be empty


def test_scram_client_checks_the_server() -> None:
    def client() -> Scram:
        return Scram("SHA-1", "user", "pencil", nonce="fyko+d2lbbFgONRv9qkxdawL")

    good = SHA1_SERVER_FIRST
    for bad in [
        good.replace(b"r=fyko+d2lbbFgONRv9qkxdawL3rfc", b"r=xyko+d2lbbFgONRv9qkxdawL3rfc"),
        b"r=fyko+d2lbbFgONRv9qkxdawL,s=QSXCR+Q6sek8bf92,i=4096",  # nonce not extended
        good.replace(b"i=4096", b"i=1"),
        good.replace(b"i=4096", b"i=4294967295"),
        good.replace(b"i=4096", b"i=04096"),
        good.replace(b"s=QSXCR+Q6sek8bf92", b"s=QSXCR+Q6sek8bf9"),
        b"m=x," + good,
        b"s=QSXCR+Q6sek8bf92," + good,
        b"\xff",
    ]:
        with pytest.raises(SaslError):
            client().respond(bad)
    c = client()
    c.respond(good)
    with pytest.raises(SaslError):
        c.respond(b"v=" + base64.b64encode(b"\0" * 20))  # wrong server signature
    c = client()
    c.respond(good)
    with pytest.raises(SaslError, match="invalid-proof"):
        c.respond(b"e=invalid-proof")
    c = client()
    c.respond(good)
    with pytest.raises(SaslError):
        c.check_success()  # "+OK" without v= is a failure
    c = client()
    c.respond(good)
    c.respond(SHA1_SERVER_FINAL)
    with pytest.raises(SaslError):
        c.respond(b"")  # nothing may follow v=


def test_scram_client_error_text_is_sanitised() -> None:
    c = Scram("SHA-1", "user", "pencil", nonce="fyko+d2lbbFgONRv9qkxdawL")
    c.respond(SHA1_SERVER_FIRST)
    with pytest.raises(SaslError) as info:
        c.respond(b"e=\x1b[31mevil")
    assert "\x1b" not in str(info.value) and "other-error" in str(info.value)


def test_scram_client_answers_empty_first_challenge_with_client_first() -> None:
    client = Scram("SHA-256", "alice", "wonderland", nonce="n0nce")
    assert client.respond(b"") == client.initial_response() == b"n,,n=alice,r=n0nce"


def test_oauthbearer_server_edge_cases() -> None:
    assert OAuthBearerServer(TABLE).start(b"\x01") == AUTH_FAILED
    for message in [
        b"p=tls-unique,,\x01auth=Bearer tok-alice\x01\x01",
        b"n,,\x01host=x\x01\x01",  # no auth
        b"n,,\x01auth=Basic abc\x01\x01",
        b"n,,\x01auth=Bearer tok-alice\x01",  # missing final ^A
        b"n,,auth=Bearer tok-alice\x01\x01",
        b"n,,\x011=2\x01auth=Bearer tok-alice\x01\x01",
        b"n,,\x01auth=Bearer \x01\x01",
    ]:
        assert OAuthBearerServer(TABLE).start(message) == MALFORMED
    ok = b"n,,\x01host=pop.example.com\x01port=995\x01auth=bearer tok-alice\x01\x01"
    assert OAuthBearerServer(TABLE).start(ok) == Success("alice")
    server = OAuthBearerServer(TABLE)
    assert isinstance(server.start(b"n,a=alice,\x01auth=Bearer nope\x01\x01"), Challenge)
    assert server.step(b"\x01") == AUTH_FAILED


def test_oauthbearer_client_two_step_and_errors() -> None:
    client = OAuthBearer("alice", "tok-alice")
    assert (
        client.respond(b"")
        == client.initial_response()
        == b"n,a=alice,\x01auth=Bearer tok-alice\x01\x01"
    )
    client.check_success()
    client = OAuthBearer("alice", "tok")
    assert client.respond(b"not json") == b"\x01"
    assert client.error_status is None
    with pytest.raises(SaslError):
        client.respond(b"{}")
    with pytest.raises(SaslError):
        OAuthBearer("alice", "tok\x01")
    with pytest.raises(SaslError):
        OAuthBearer("alice", "tok", port=70000)


def test_failure_reasons_are_fixed_texts() -> None:
    assert AUTH_FAILED.code == "AUTH"
    for reason in FAILURE_REASONS:
        assert reason.isascii() and reason.isprintable()


mechanism_names = st.sampled_from(
    [
        "PLAIN",
        "LOGIN",
        "CRAM-MD5",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256-PLUS",
        "OAUTHBEARER",
        "XOAUTH2",
        "EXTERNAL",
    ]
)


@settings(max_examples=300)
@given(
    name=mechanism_names,
    ir=st.none() | st.binary(max_size=200),
    answers=st.lists(st.binary(max_size=200), max_size=12),
)
def test_fuzzed_client_messages_never_raise_or_echo(
    name: str, ir: bytes | None, answers: list[bytes]
) -> None:
    server = server_mechanism(
        name, TABLE, channel_binding=("tls-exporter", b"cb"), external_identity="alice"
    )
    assert server is not None
    step = server.start(ir)
    for answer in answers:
        if server.done:
            break
        step = server.step(answer)
    if isinstance(step, Failure):
        assert step.reason in FAILURE_REASONS
    if isinstance(step, Success):
        # Only EXTERNAL (no secret) or a genuine client message can succeed.
        assert name == "EXTERNAL"


@settings(max_examples=200)
@given(
    name=mechanism_names,
    user=st.text(max_size=30),
    blob=st.binary(max_size=60),
)
def test_fuzzed_structured_messages(name: str, user: str, blob: bytes) -> None:
    raw = user.encode("utf-8", "surrogatepass")
    for message in (
        b"n,,n=" + raw + b",r=" + blob,
        b"\0" + raw + b"\0" + blob,
        b"user=" + raw + b"\x01auth=Bearer " + blob + b"\x01\x01",
    ):
        server = server_mechanism(
            name, TABLE, channel_binding=("tls-exporter", b"cb"), external_identity="bob"
        )
        assert server is not None
        result = server.start(message)
        if isinstance(result, Failure):
            assert result.reason in FAILURE_REASONS


# --------------------------------------------------------------------------------------
# APOP timestamps
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "greeting",
    [
        b"POP3 ready",
        b"POP3 ready <>",
        b"ready <abc>",
        b"ready <a b@c>",
        b"ready <a@b@c>",
        b"ready <@host>",
        b"ready <local@>",
        b"ready <a\x01@b>",
        b"ready <\xc3\xa9@b>",
        b"ready <<a@b>",
        b"ready <a@b",
        b"ready a@b>",
        b"ready <a@b\x7f>",
    ],
)
def test_apop_timestamp_rejects_non_msg_id(greeting: bytes) -> None:
    assert apop_timestamp(greeting) is None


@pytest.mark.parametrize(
    ("greeting", "stamp"),
    [
        (b"<1.2@h>", b"<1.2@h>"),
        (b"[IN-USE] x <p.c@h.example> trailing", b"<p.c@h.example>"),
        (b"ready <a@b> <c@d>", b"<a@b>"),
        (b"ready <a@b> >>", b"<a@b>"),
    ],
)
def test_apop_timestamp_extracts(greeting: bytes, stamp: bytes) -> None:
    assert apop_timestamp(greeting) == stamp


@pytest.mark.parametrize(
    "hostile",
    [
        b"<" * 100_000,
        b"<" * 100_000 + b">",
        b"<a" * 50_000,
        b"<" + b"@" * 100_000 + b">",
        b"+OK " + b"<" * 100_000 + b"a@b>",
    ],
)
def test_apop_timestamp_linear_time_on_hostile_input(hostile: bytes) -> None:
    started = time.perf_counter()
    for _ in range(10):
        apop_timestamp(hostile)
    assert time.perf_counter() - started < 1.0


@given(st.binary(max_size=200))
def test_apop_timestamp_result_is_a_msg_id_from_the_greeting(greeting: bytes) -> None:
    stamp = apop_timestamp(greeting)
    if stamp is not None:
        assert stamp in greeting
        assert stamp.startswith(b"<") and stamp.endswith(b">")
        inner = stamp[1:-1]
        assert inner.count(b"@") == 1 and all(0x21 <= b <= 0x7E for b in inner)
        assert b"<" not in inner and b">" not in inner


def test_make_timestamp() -> None:
    stamps = {make_timestamp("pop.example.org") for _ in range(50)}
    assert len(stamps) == 50
    for stamp in stamps:
        assert apop_timestamp(b"+OK ready " + stamp) == stamp
    for bad in ["", "a b", "a<b", "a@b", "h\u00e9"]:
        with pytest.raises(SaslError):
            make_timestamp(bad)


def test_apop_digest_normalises_secret() -> None:
    stamp = b"<1.2@h>"
    assert apop_digest(stamp, "pass\u00adword") == apop_digest(stamp, "password")
    assert len(apop_digest(stamp, "x")) == 32


# --------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------


def test_client_mechanism_factory() -> None:
    cb = ("tls-exporter", b"x" * 32)
    assert isinstance(client_mechanism("plain", user="u", password="p"), Plain)
    assert isinstance(client_mechanism("LOGIN", user="u", password="p"), Login)
    assert isinstance(client_mechanism("Cram-MD5", user="u", password="p"), CramMD5)
    assert isinstance(client_mechanism("XOAUTH2", user="u", token="t"), XOAuth2)
    assert isinstance(client_mechanism("OAUTHBEARER", user="u", token="t"), OAuthBearer)
    assert isinstance(client_mechanism("EXTERNAL", user="u"), External)
    scram = client_mechanism("scram-sha-256-plus", user="u", password="p", channel_binding=cb)
    assert scram.name == "SCRAM-SHA-256-PLUS"
    assert scram.initial_response().startswith(b"p=tls-exporter,,")  # type: ignore[union-attr]
    bare = client_mechanism("SCRAM-SHA-1", user="u", password="p", channel_binding=cb)
    assert bare.initial_response().startswith(b"y,,")  # type: ignore[union-attr]
    seen_plus = client_mechanism(
        "SCRAM-SHA-1", user="u", password="p", channel_binding=cb, server_offers_plus=True
    )
    assert seen_plus.initial_response().startswith(b"n,,")  # type: ignore[union-attr]
    for name, kwargs in [
        ("DIGEST-MD5", {"password": "p"}),
        ("PLAIN", {}),
        ("XOAUTH2", {"password": "p"}),
        ("SCRAM-SHA-256-PLUS", {"password": "p"}),
        ("SCRAM-SHA-512", {"password": "p"}),
    ]:
        with pytest.raises(SaslError):
            client_mechanism(name, user="u", **kwargs)  # type: ignore[arg-type]


def test_server_mechanism_factory() -> None:
    assert server_mechanism("DIGEST-MD5", TABLE) is None
    assert server_mechanism("SCRAM-SHA-256-PLUS", TABLE) is None
    plus = server_mechanism("scram-sha-256-plus", TABLE, channel_binding=("tls-exporter", b"x"))
    assert plus is not None and plus.name == "SCRAM-SHA-256-PLUS"
    for name in ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "OAUTHBEARER", "XOAUTH2", "EXTERNAL"):
        mech = server_mechanism(name.lower(), TABLE)
        assert mech is not None and mech.name == name


def test_scram_verifier_repr_hides_keys() -> None:
    verifier = make_scram_verifier("pencil", "SHA-256")
    assert verifier.stored_key.hex() not in repr(verifier)
    assert "pencil" not in repr(TABLE.scram_credentials("alice", "SHA-256"))
