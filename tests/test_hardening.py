"""The hardening bank, case by case: every one of its 58 cases is proven here
or by a named test elsewhere.

* ``COVERED`` maps a case number to the tests (``path::[Class::]function``)
  that prove it elsewhere; :func:`test_index_covered_tests_exist` imports each
  module and checks each name, so the index cannot rot.
* ``test_case_NN_*`` below prove the rest (and strengthen some covered ones):
  the TLS, login and limit cases against every binding (sync, asyncio, trio)
  through the malicious peers of ``malicious.py``, and on both engine backends
  where bytes are parsed.
* ``NOT_AUTOMATED`` says why a case cannot be tested here (empty when every
  case is).
* :func:`test_index_is_complete` checks that together they cover 1..58.

The data-safety cases under process kills and disk faults (53, 56, 57) are in
``test_faults.py``; the load cases (46, 47 at scale) in ``test_load.py``.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hmac
import importlib
import os
import re
import ssl
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from malicious import (
    BINDINGS,
    CLOSE,
    STALL,
    STARTTLS,
    ClientOps,
    Flood,
    MaliciousClient,
    MaliciousServer,
    Trickle,
    client_call,
    serving,
)
from pop3proto.bindings import cli
from pop3proto.bindings.maildrop import Maildir, MaildropError, MemoryMaildrop

import pop3proto as p
from pop3proto._auth import FailureDelay, PasswordTable, parse_file

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# =====================================================================================
# the index
# =====================================================================================

C = "tests/test_connection.py"
COVERED: dict[int, list[str]] = {
    1: [
        f"{C}::TestQuitAndEof::test_hardening_01_status_line_past_limit",
        f"{C}::TestQuitAndEof::test_hardening_01_eof_before_crlf",
    ],
    2: [
        f"{C}::TestMultiline::test_hardening_02_endless_body_stops_at_cap",
        "tests/test_cli.py::test_fetch_cap_hit_mid_body_delivers_and_deletes_nothing_of_it",
    ],
    3: [
        f"{C}::TestMultiline::test_hardening_03_eof_mid_body",
        f"{C}::TestMultiline::test_hardening_03_body_ending_with_dotdot_is_not_an_end",
        "tests/test_cli.py::test_fetch_message_cut_mid_body_is_neither_delivered_nor_deleted",
    ],
    4: [
        f"{C}::TestMultiline::test_hardening_04_dots_byte_exact",
        f"{C}::TestMultiline::test_hardening_04_every_split_offset",
        "tests/test_core.py::test_unstuff_vectors_at_every_split",
    ],
    5: [
        f"{C}::TestStatusLines::test_hardening_05_bad_status_lines_rejected",
        f"{C}::TestStatusLines::test_checklist_05_tolerant_ok_forms",
    ],
    6: [f"{C}::TestListings::test_hardening_06_bad_numbers_rejected"],
    7: [
        f"{C}::TestListings::test_hardening_07_bad_uids_rejected",
        f"{C}::TestListings::test_hardening_07_uidl_for_another_message_rejected",
        "tests/test_uidstore.py::test_escape_round_trips_and_is_printable",
        "tests/test_uidstore.py::test_hostile_user_cannot_leave_the_store_directory",
    ],
    8: [
        f"{C}::TestGreeting::test_hardening_08_greeting_of_many_angle_brackets_is_linear",
        f"{C}::TestGreeting::test_checklist_04_timestamp_not_msgid_shaped_means_no_apop",
        "tests/test_sasl.py::test_apop_timestamp_linear_time_on_hostile_input",
        "tests/test_client.py::test_apop_refused_for_a_timestamp_that_is_not_a_msg_id",
    ],
    9: [
        f"{C}::TestPipelining::test_hardening_09_extra_line_after_reply_not_credited",
        f"{C}::TestPipelining::test_hardening_09_listing_glued_to_greeting",
        "tests/test_client.py::test_data_glued_to_greeting_is_never_credited_to_capa",
        "tests/test_client.py::test_unsolicited_line_after_a_reply_breaks_the_session",
    ],
    10: [
        f"{C}::TestPipelining::test_hardening_10_out_of_sync_replies_close",
        "tests/test_client.py::test_timeout_mid_pipeline_is_never_resumed",
    ],
    11: [
        f"{C}::TestClientSend::test_hardening_11_control_characters_refused",
        f"{C}::TestClientSend::test_hardening_11_uid_style_extension_args_refused",
        "tests/test_client.py::test_control_characters_in_credentials_refused_before_sending",
        "tests/test_sasl.py::test_client_refuses_control_characters_in_credentials",
    ],
    12: [
        f"{C}::TestStatusLines::test_hardening_12_escape_sequences_kept_and_sanitised",
        "tests/test_client.py::test_escape_sequences_in_err_text_are_sanitised_in_str",
        "tests/test_sasl.py::test_scram_client_error_text_is_sanitised",
    ],
    13: [
        f"{C}::TestServerParsing::test_hardening_13_255_octet_command_accepted",
        f"{C}::TestServerParsing::test_hardening_13_overlong_line_named_limit",
    ],
    14: [f"{C}::TestServerParsing::test_hardening_14_line_ends"],
    15: [
        f"{C}::TestServerParsing::test_hardening_15_bad_message_numbers",
        f"{C}::TestServerParsing::test_hardening_15_huge_top_count",
    ],
    16: [
        "tests/test_session.py::test_checklist_14_numbering_fixed_and_deleted_hidden",
        "tests/test_session.py::test_checklist_16_update_only_lists_marked",
        "tests/test_server.py::test_transaction_rules_and_update_after_quit",
    ],
    17: [
        f"{C}::TestServerParsing::test_hardening_17_wrong_state_commands",
        f"{C}::TestServerParsing::test_hardening_17_user_after_login_and_auth_after_login",
    ],
    18: [
        f"{C}::TestServerParsing::test_hardening_18_bad_commands_disconnect",
        "tests/test_server.py::test_hardening_18_bad_commands_then_disconnect",
    ],
    19: [
        f"{C}::TestServerReplies::test_hardening_19_stored_messages_normalised",
        "tests/test_session.py::test_wire_size_matches_sent_content",
        "tests/test_server.py::test_retr_and_top_stream_stuffed_crlf",
    ],
    20: [f"{C}::TestServerParsing::test_hardening_20_nothing_echoed"],
    # Compiled core: the C splitter/stuffer/unstuffer against the pure twin.
    # Coverage-guided fuzzing under ASan/UBSan is tests/fuzz/run.sh; the engine
    # fuzzer (both backends) is test_case_21 below.
    21: [
        "tests/test_ccore.py::test_unstuff_matches_pure_on_random_chunking",
        "tests/test_ccore.py::test_stuff_matches_pure_on_random_chunking",
        "tests/test_ccore.py::test_parse_listing_chunked_matches_pure",
    ],
    22: [
        "tests/test_ccore.py::test_dot_line_split_at_every_offset",
        "tests/test_ccore.py::test_one_byte_feeds_give_the_same_stream",
        "tests/test_ccore.py::test_pattern_at_every_position_of_the_vector_blocks",
    ],
    23: [
        "tests/test_ccore.py::test_numbers_ending_at_buffer_end_are_not_extended",
        "tests/test_ccore.py::test_undecided_dot_at_buffer_end_is_not_resolved_by_later_bytes",
        "tests/test_ccore.py::test_out_of_range_indices_are_refused_by_both",
    ],
    24: [
        "tests/test_core.py::test_hardening_24_worst_case_growth",
        "tests/test_ccore.py::test_stuffing_worst_case_growth",
        "tests/test_ccore.py::test_listing_limits_accepted_at_their_edges",
    ],
    25: ["tests/test_ccore.py::test_embedded_nul_is_data"],
    26: [
        "tests/test_ccore.py::test_bytearray_can_be_resized_after_every_call",
        "tests/test_ccore.py::test_reference_counts_are_balanced",
        "tests/test_ccore.py::test_calls_from_several_threads_on_separate_buffers",
    ],
    27: [
        f"{C}::TestServerReplies::test_hardening_27_stls_injection_one_segment",
        "tests/test_server.py::test_hardening_27_stls_injection_ends_session",
    ],
    28: [
        "tests/test_aio.py::test_hardening_28_plaintext_buffered_before_the_handshake_fails_the_upgrade"
    ],
    29: [
        f"{C}::TestStls::test_hardening_29_response_injection_one_read",
        f"{C}::TestStls::test_hardening_29_response_injection_byte_at_a_time",
    ],
    30: ["tests/test_client.py::test_required_tls_aborts_before_any_credential"],
    31: ["tests/test_client.py::test_pre_tls_capa_that_hid_mechanisms_has_no_effect"],
    32: ["tests/test_client.py::test_apop_greeting_and_stls_means_stls_first_and_no_apop"],
    33: ["tests/test_server.py::test_hardening_33_stls_without_certificate_and_twice"],
    34: ["tests/test_sync_client.py::test_stalled_tls_handshake_is_cut_off"],
    35: ["tests/test_sync_client.py::test_bad_certificates_are_refused"],
    36: [
        "tests/test_server.py::test_hardening_36_38_same_reply_and_growing_delay",
        "tests/test_auth.py::test_unknown_user_and_wrong_password_same_delay",
        "tests/test_sasl.py::test_unknown_user_and_wrong_password_look_the_same",
    ],
    37: [
        "tests/test_sasl.py::test_secrets_compared_with_compare_digest",
        "tests/test_auth.py::test_compare_digest_used_by_table",
    ],
    38: ["tests/test_auth.py::test_failure_delay_grows_and_caps"],
    39: [
        "tests/test_server.py::test_hardening_39_no_plaintext_login_without_tls",
        "tests/test_client.py::test_plaintext_secrets_refused_without_tls",
    ],
    40: [
        "tests/test_auth.py::test_apop_policy",
        "tests/test_client.py::test_apop_automatic_only_under_tls",
    ],
    41: [
        "tests/test_sasl.py::test_hundred_rounds_fail",
        "tests/test_sasl.py::test_65k_answer_fails",
        "tests/test_sasl.py::test_control_characters_in_identities_fail",
        "tests/test_sasl.py::test_fuzzed_client_messages_never_raise_or_echo",
    ],
    42: [
        "tests/test_auth.py::test_path_like_user_names_never_authenticate",
        "tests/test_uidstore.py::test_hostile_user_cannot_leave_the_store_directory",
    ],
    43: [
        "tests/test_auth.py::test_verifier_store_holds_no_plaintext",
        "tests/test_auth.py::test_verifier_iteration_floor",
    ],
    44: [
        "tests/test_sync_server.py::test_hardening_44_45_deadlines",
        "tests/test_aio.py::test_hardening_44_login_deadline_holds_while_bytes_trickle_in",
        "tests/test_trio.py::test_hardening_44_login_deadline_holds_while_bytes_trickle_in",
        "tests/test_server.py::test_hardening_44_login_deadline_counts_from_connect",
    ],
    45: [
        "tests/test_sync_server.py::test_hardening_44_45_deadlines",
        "tests/test_aio.py::test_hardening_45_idle_timeout_after_login_closes_without_a_reply",
        "tests/test_trio.py::test_hardening_45_idle_timeout_after_login",
        "tests/test_server.py::test_hardening_45_idle_timeout_after_login",
    ],
    46: [
        "tests/test_aio.py::test_hardening_46_server_buffers_are_bounded_when_the_client_never_reads",
        "tests/test_trio.py::test_hardening_46_server_stops_reading_when_the_client_never_reads",
        "tests/test_load.py::test_case_46_pipelined_flood_with_bounded_server_memory",
    ],
    47: [
        "tests/test_sync_server.py::test_hardening_47_connection_cap",
        "tests/test_aio.py::test_hardening_47_connections_capped_per_address_and_user",
        "tests/test_trio.py::test_hardening_47_connections_capped_per_address",
        "tests/test_load.py::test_case_47_thousand_connections_held_while_others_are_served",
    ],
    48: [
        "tests/test_aio.py::test_hardening_48_trickling_server_trips_the_command_deadline",
        "tests/test_trio.py::test_hardening_48_trickling_server_trips_the_command_deadline",
        "tests/test_sync_client.py::test_trickling_body_trips_the_command_deadline",
        "tests/test_sync_client.py::test_trickling_status_line_trips_the_command_deadline",
    ],
    49: [
        f"{C}::TestListings::test_hardening_49_listing_past_entry_cap",
        f"{C}::TestListings::test_hardening_49_huge_listing_line_capped",
        f"{C}::TestCapa::test_hardening_49_too_many_capa_lines",
    ],
    50: [
        "tests/test_maildrop.py::test_second_open_reads_no_message",
        "tests/test_cli.py::test_large_messages_stream_straight_to_disk",
    ],
    51: [
        "tests/test_server.py::test_hardening_51_no_deletion_without_quit",
        "tests/test_sync_server.py::test_hardening_51_drop_after_dele_keeps_everything",
        "tests/test_aio.py::test_hardening_51_dele_without_quit_leaves_the_maildrop_intact",
        "tests/test_trio.py::test_hardening_51_dele_without_quit_leaves_the_maildrop_intact",
    ],
    52: [
        "tests/test_server.py::test_checklist_21_hardening_52_failed_removal_answers_sys_temp",
        "tests/test_trio.py::test_hardening_52_failed_removal_answers_err",
        "tests/test_maildrop.py::test_commit_failure_reported_after_trying_all",
    ],
    53: [
        "tests/test_maildrop.py::test_kill_during_commit_leaves_each_message_intact_or_gone",
        "tests/test_faults.py::test_case_53_server_killed_at_every_deletion_step",
    ],
    54: [
        "tests/test_server.py::test_checklist_13_hardening_54_second_session_gets_in_use",
        "tests/test_aio.py::test_hardening_54_second_session_gets_in_use",
        "tests/test_trio.py::test_hardening_54_55_new_mail_next_session_and_stable_uids",
        "tests/test_sync_server.py::test_quit_applies_deletions_and_54_in_use",
    ],
    55: [
        "tests/test_trio.py::test_hardening_54_55_new_mail_next_session_and_stable_uids",
        "tests/test_maildrop.py::test_uids_valid_unique_and_stable_across_sessions",
        "tests/test_maildrop.py::test_uids_never_reused_after_deletion",
        "tests/test_maildrop.py::test_uid_stable_across_move_to_cur_and_flag_changes",
    ],
    56: [
        "tests/test_cli.py::test_fetch_killed_before_its_uids_are_committed_fetches_nothing_twice",
        "tests/test_uidstore.py::test_intents_are_resolved_against_the_maildir",
        "tests/test_faults.py::test_case_56_fetch_killed_at_every_step",
    ],
    57: [
        "tests/test_cli.py::test_fetch_disk_error_stops_without_any_dele",
        "tests/test_faults.py::test_case_57_disk_errors_stop_before_any_dele",
        "tests/test_faults.py::test_case_57_real_full_file_system",
    ],
    58: [
        "tests/test_uidstore.py::test_add_fsyncs_before_returning",
        "tests/test_uidstore.py::test_record_is_durable_after_commit_with_one_rename",
    ],
}

#: Cases that cannot be proven by an automated test here, with the reason.
NOT_AUTOMATED: dict[int, str] = {}

CASE_TEST = re.compile(r"^test_case_(\d\d)_")


def _new_tests() -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, value in globals().items():
        m = CASE_TEST.match(name)
        if m and callable(value):
            out.setdefault(int(m.group(1)), []).append(name)
    return out


def _resolve(test_id: str) -> object:
    path, *names = test_id.split("::")
    file = ROOT / path
    assert file.is_file(), f"{test_id}: no file {path}"
    assert file.parent == TESTS, f"{test_id}: not a module of tests/"
    module = importlib.import_module(file.stem)
    obj: object = module
    for name in names:
        assert hasattr(obj, name), f"{test_id}: {name} not found"
        obj = getattr(obj, name)
    assert callable(obj) and names[-1].startswith("test_"), test_id
    return obj


def test_index_covered_tests_exist() -> None:
    """Every test named in COVERED exists (module imported, name looked up)."""
    missing = []
    for case, ids in sorted(COVERED.items()):
        assert ids, f"case {case}: empty list"
        for test_id in ids:
            try:
                _resolve(test_id)
            except (AssertionError, ImportError) as exc:
                missing.append(f"case {case}: {exc}")
    assert not missing, "\n".join(missing)


def test_index_is_complete() -> None:
    """COVERED, the test_case_NN tests here and NOT_AUTOMATED together cover
    exactly the cases 1..58, and a case not automated has a real reason."""
    new = _new_tests()
    union = set(COVERED) | set(new) | set(NOT_AUTOMATED)
    assert union == set(range(1, 59)), sorted(union ^ set(range(1, 59)))
    for case, why in NOT_AUTOMATED.items():
        assert case not in new and case not in COVERED, case
        assert len(why) > 40, f"case {case}: say why it cannot be automated"
    # The cases the bank singles out each have a test of their own here.
    for case in (21, 25, *range(27, 44), 47, 49, 50, 58):
        assert case in new, f"case {case} has no test_case_{case:02d}_* here"


def test_index_matches_the_bank_numbering() -> None:
    """The faults and load tests named in COVERED are the ones those files
    define, so renaming one there breaks this index, not silently the bank."""
    for case, ids in COVERED.items():
        for test_id in ids:
            if "::test_case_" in test_id:
                name = test_id.rsplit("::", 1)[1]
                assert name.startswith(f"test_case_{case:02d}_"), (case, test_id)


# =====================================================================================
# shared fixtures
# =====================================================================================

USER, PASSWORD = "alice", "secret"
MESSAGES = [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\n.dot\r\n"]


@dataclass(frozen=True)
class Certs:
    ca: trustme.CA
    server: ssl.SSLContext
    client: ssl.SSLContext
    der: bytes


def _server_ctx(ca: trustme.CA, *names: str, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names, **kw).configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def certs() -> Certs:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode("ascii"))
    return Certs(ca, server, client, der)


def config(**kw: Any) -> p.ServerConfig:
    base: dict[str, Any] = {
        "authenticator": PasswordTable({USER: PASSWORD}),
        "failure_delay": FailureDelay(base=0.0),
    }
    base.update(kw)
    return p.ServerConfig(**base)


def memory() -> MemoryMaildrop:
    return MemoryMaildrop({USER: MESSAGES})


CLIENT_ERRORS = (p.ProtocolError, p.Pop3Error)
CAPA_STLS = b"+OK\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n"
CREDENTIAL_VERBS = (b"USER", b"PASS", b"AUTH", b"APOP")


def credentials_sent(lines: list[bytes]) -> list[bytes]:
    return [line for line in lines if line.split(b" ", 1)[0].upper() in CREDENTIAL_VERBS]


def login(ops: ClientOps, **kw: Any) -> str:
    ops.call("login", USER, PASSWORD, **kw)
    return str(ops.session.mechanism)


# =====================================================================================
# Compiled core (21, 25)
# =====================================================================================


def test_case_21_engine_fuzz_short_run_on_both_backends(backend: str) -> None:
    """A short run of the engine fuzzer (tests/fuzz/engine_fuzz.py, which CI
    runs longer): both roles, random and mutated input, only events or
    RemoteProtocolError."""
    engine_fuzz = importlib.import_module("fuzz.engine_fuzz")
    stats = engine_fuzz.run(seconds=1.5, seed=21, backend=backend)
    assert stats.inputs > 100, stats
    assert stats.events > 0 and stats.remote_errors > 0, stats
    assert stats.failures == [], stats.failures[:3]


BANNED_C = re.compile(
    r"\b(strlen|strnlen|strcpy|strncpy|strcat|strncat|strcmp|strncmp|strchr|strrchr|strstr"
    r"|strtol|strtoul|strtoll|strtoull|atoi|atol|sscanf|sprintf|strdup|strtok)\s*\("
)


def test_case_25_no_c_string_functions_on_wire_data(backend: str) -> None:
    """The C core never uses NUL-terminated string functions (a NUL in wire
    data is data), and NULs at every position come back as data."""
    sources = sorted((ROOT / "pop3proto").glob("_speedups*.[ch]"))
    assert sources, "the compiled core's sources are missing"
    for src in sources:
        text = re.sub(r"/\*.*?\*/|//[^\n]*", "", src.read_text(), flags=re.S)
        assert not BANNED_C.findall(text), (src.name, BANNED_C.findall(text))
    body = b"a\x00b\r\n\x00\r\n.\x00\r\n..\x00\r\n\x00.\r\n"
    for cut in range(len(body) + 1):
        conn = p.Connection(p.CLIENT)
        conn.receive_data(b"+OK hi\r\n")
        conn.next_event()
        conn.send(p.User("u"))
        conn.receive_data(b"+OK\r\n")
        conn.next_event()
        conn.send(p.Pass("p"))
        conn.receive_data(b"+OK\r\n")
        conn.next_event()
        conn.send(p.Retr(1))
        events: list[p.Event] = []
        for chunk in (b"+OK\r\n" + body[:cut], body[cut:] + b".\r\n"):
            conn.receive_data(chunk)
            while True:
                ev = conn.next_event()
                if ev is p.NEED_DATA:
                    break
                events.append(ev)  # type: ignore[arg-type]
        data = b"".join(ev.data for ev in events if isinstance(ev, p.Data))
        assert data == b"a\x00b\r\n\x00\r\n\x00\r\n.\x00\r\n\x00.\r\n", cut
        assert isinstance(events[-1], p.EndOfMessage)


# =====================================================================================
# TLS upgrade (27-35): every binding, against malicious peers
# =====================================================================================


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("wire", [b"STLS\r\nCAPA\r\n", b"STLS\nCAPA\n", b"STLS\r\nUSER alice\r\n"])
def test_case_27_stls_with_a_command_in_the_same_segment(
    binding: str, wire: bytes, certs: Certs, backend: str
) -> None:
    """The command glued to STLS is never answered, in plaintext or inside
    TLS: the connection is closed."""
    with (
        serving(binding, memory(), config(stls_available=True), ssl_context=certs.server) as srv,
        MaliciousClient(srv.port) as c,
    ):
        assert c.line().startswith(b"+OK")
        c.send(wire)
        after = c.rest()
    assert b"+OK" not in after  # neither "Begin TLS" nor an answer to CAPA/USER
    assert b"\r\nSTLS" not in after and b"\r\n." not in after


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_28_plaintext_in_a_second_segment_before_the_client_hello(
    binding: str, certs: Certs, backend: str
) -> None:
    with (
        serving(binding, memory(), config(stls_available=True), ssl_context=certs.server) as srv,
        MaliciousClient(srv.port) as c,
    ):
        assert c.line().startswith(b"+OK")
        assert c.command(b"STLS").startswith(b"+OK")
        c.send(b"CAPA\r\n", b"USER alice\r\n", gap=0.05)  # where the ClientHello belongs
        after = c.rest()
    # A TLS alert record may come back; never a POP3 answer.
    assert b"+OK" not in after and b"-ERR" not in after and b"USER" not in after


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("trickled", [False, True], ids=["one-read", "byte-at-a-time"])
def test_case_29_response_glued_after_begin_tls_aborts_the_client(
    binding: str, trickled: bool, certs: Certs, backend: str
) -> None:
    injected = b"+OK Begin TLS\r\n+OK\r\n.\r\n"
    stls: list[Any] = [Trickle(injected, 0.002) if trickled else injected, STARTTLS]
    server = MaliciousServer(replies={"CAPA": [CAPA_STLS], "STLS": stls}, tls=certs.server)
    with server, pytest.raises(CLIENT_ERRORS):
        client_call(binding, server.port, login, starttls=True, ssl_context=certs.client)
    assert server.wait_peers()[0].lines == [b"CAPA", b"STLS"]


STRIPPED: dict[str, dict[str, Any]] = {
    "stls-hidden": {"CAPA": [b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n"]},
    "stls-refused": {"CAPA": [CAPA_STLS], "STLS": [b"-ERR not today\r\n"]},
    "capa-fails": {"CAPA": [b"-ERR what\r\n"]},
    "closed-on-stls": {"CAPA": [CAPA_STLS], "STLS": [CLOSE]},
}


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("attack", sorted(STRIPPED))
def test_case_30_required_tls_stripped_sends_no_credential(
    binding: str, attack: str, certs: Certs
) -> None:
    server = MaliciousServer(b"+OK hi <1.2@x>\r\n", STRIPPED[attack], default=(b"+OK\r\n",))
    with server, pytest.raises(CLIENT_ERRORS) as info:
        client_call(binding, server.port, login, starttls=True, ssl_context=certs.client)
    # A refusal is a TLS error; a connection closed on STLS a broken session.
    assert isinstance(info.value, p.Pop3TLSError) or attack == "closed-on-stls"
    assert credentials_sent(server.wait_peers()[0].lines) == []
    assert all(not peer.tls for peer in server.peers)


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize(
    "before",
    [
        b"+OK\r\nSTLS\r\nSASL X-NOTHING\r\n.\r\n",
        b"+OK\r\nSTLS\r\nSASL SCRAM-SHA-256 PLAIN\r\n.\r\n",
    ],
    ids=["pre-tls-hid-plain", "pre-tls-claimed-scram"],
)
def test_case_31_capabilities_asked_again_after_tls(
    binding: str, before: bytes, certs: Certs, backend: str
) -> None:
    """Only the CAPA answered inside TLS counts: a mechanism hidden before TLS
    is used, one claimed before TLS is not, and the plaintext greeting's APOP
    timestamp is forgotten."""
    server = MaliciousServer(
        b"+OK hi <1.2@x>\r\n",
        {"CAPA": [before], "STLS": [b"+OK go\r\n", STARTTLS]},
        tls_replies={"CAPA": [b"+OK\r\nSASL PLAIN\r\n.\r\n"], "AUTH": [b"+OK in\r\n"]},
        tls=certs.server,
    )

    def body(ops: ClientOps) -> str:
        assert ops.tls_active
        with pytest.raises(p.Pop3Error, match="APOP"):
            ops.call("login", USER, PASSWORD, mechanism="APOP")
        return login(ops)

    with server:
        mechanism = client_call(binding, server.port, body, starttls=True, ssl_context=certs.client)
    lines = server.wait_peers()[0].lines
    assert mechanism == "PLAIN"
    assert lines[:3] == [b"CAPA", b"STLS", b"CAPA"]
    assert lines[3].startswith(b"AUTH PLAIN") and len(lines) == 4


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_32_apop_greeting_and_stls_means_stls_first(binding: str, certs: Certs) -> None:
    server = MaliciousServer(
        b"+OK hi <1896.697170952@dbc.mtview.ca.us>\r\n",
        {"CAPA": [b"+OK\r\nSTLS\r\nUSER\r\n.\r\n"], "STLS": [b"+OK go\r\n", STARTTLS]},
        tls_replies={"CAPA": [b"+OK\r\nUSER\r\n.\r\n"], "USER": [b"+OK\r\n"], "PASS": [b"+OK\r\n"]},
        tls=certs.server,
    )
    with server:
        mechanism = client_call(
            binding, server.port, login, starttls=True, ssl_context=certs.client
        )
    lines = server.wait_peers()[0].lines
    assert mechanism == "USER"
    assert lines == [b"CAPA", b"STLS", b"CAPA", b"USER alice", b"PASS secret"]


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_33_stls_refused_twice_after_login_and_without_certificate(
    binding: str, certs: Certs, backend: str
) -> None:
    with serving(binding, memory(), config(stls_available=True), ssl_context=certs.server) as srv:
        with MaliciousClient(srv.port) as c:  # twice
            c.line()
            assert c.command(b"STLS").startswith(b"+OK")
            c.starttls(certs.client)
            assert c.command(b"STLS").startswith(b"-ERR")
            assert c.command(b"USER alice").startswith(b"+OK")  # still usable
            assert c.command(b"PASS secret").startswith(b"+OK")
        with MaliciousClient(srv.port) as c:  # after login
            c.line()
            assert c.command(b"USER alice").startswith(b"+OK")
            assert c.command(b"PASS secret").startswith(b"+OK")
            assert c.command(b"STLS").startswith(b"-ERR")
            assert c.command(b"STAT").startswith(b"+OK 2 ")
        with MaliciousClient(srv.port) as c:  # a failed handshake ends the connection
            c.line()
            assert c.command(b"STLS").startswith(b"+OK")
            c.send(b"\x16\x03\x01\x00\x10not a client hello at all\r\nCAPA\r\n")
            waited = c.closed_within(5.0)
            assert waited is not None
    with serving(binding, memory(), config()) as srv, MaliciousClient(srv.port) as c:
        c.line()
        assert c.command(b"STLS").startswith(b"-ERR")  # no certificate configured
        assert c.command(b"CAPA").startswith(b"+OK")


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_34_stalled_handshake_closed_at_a_deadline(binding: str, certs: Certs) -> None:
    with serving(
        binding,
        memory(),
        config(stls_available=True),
        ssl_context=certs.server,
        handshake_timeout=0.4,
        implicit_tls=True,
    ) as srv:
        with MaliciousClient(srv.port) as c:  # STLS, then no ClientHello
            c.line()
            assert c.command(b"STLS").startswith(b"+OK")
            waited = c.closed_within(5.0)
            assert waited is not None and 0.3 <= waited < 3.0
        assert srv.tls_port is not None
        with MaliciousClient(srv.tls_port) as c:  # implicit TLS, no ClientHello
            waited = c.closed_within(5.0)
            assert waited is not None and 0.3 <= waited < 3.0
    # The client side: the server says "Begin TLS" and then never answers.
    server = MaliciousServer(replies={"CAPA": [CAPA_STLS], "STLS": [b"+OK go\r\n", STALL]})
    start = time.monotonic()
    with server, pytest.raises(p.Pop3Error):
        client_call(
            binding, server.port, login, starttls=True, ssl_context=certs.client, timeout=0.5
        )
    assert time.monotonic() - start < 4.0


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("bad", ["wrong-host-name", "self-signed", "expired"])
def test_case_35_bad_certificates_refused_unless_the_caller_says_so(
    binding: str, bad: str, certs: Certs
) -> None:
    if bad == "wrong-host-name":
        ctx = _server_ctx(certs.ca, "pop.example.org")
    elif bad == "self-signed":
        ctx = _server_ctx(trustme.CA(), "127.0.0.1")
    else:
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
        ctx = _server_ctx(certs.ca, "127.0.0.1", not_after=past)
    server = MaliciousServer([STARTTLS, b"+OK hi\r\n"], {"CAPA": [CAPA_STLS]}, tls=ctx)
    with server, pytest.raises(p.Pop3TLSError, match="certificate"):
        client_call(binding, server.port, login, tls=True, ssl_context=certs.client)
    assert credentials_sent(server.commands) == []
    lax = ssl.create_default_context()
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    with MaliciousServer([STARTTLS, b"+OK hi\r\n"], {"CAPA": [CAPA_STLS]}, tls=ctx) as server:
        assert client_call(
            binding, server.port, lambda ops: ops.tls_active, tls=True, ssl_context=lax
        )


# =====================================================================================
# Authentication (36-43): every server binding, every client binding
# =====================================================================================


def _failed_login(port: int, user: bytes) -> tuple[bytes, bytes, float]:
    """USER reply, PASS reply and the seconds the PASS reply took."""
    with MaliciousClient(port) as c:
        c.line()
        user_reply = c.command(b"USER " + user)
        start = time.monotonic()
        pass_reply = c.command(b"PASS wrong")
        return user_reply, pass_reply, time.monotonic() - start


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_36_unknown_user_and_wrong_password_look_the_same(binding: str) -> None:
    """Same USER reply, same PASS reply, same delay (each measured on a fresh
    server, so neither inherits the other's failure count)."""
    seen = {}
    for user in (b"nobody", b"alice"):
        cfg = config(failure_delay=FailureDelay(base=0.3))
        with serving(binding, memory(), cfg) as srv:
            seen[user] = _failed_login(srv.port, user)
    (u1, r1, t1), (u2, r2, t2) = seen[b"nobody"], seen[b"alice"]
    assert u1 == u2 and r1 == r2 and r1.startswith(b"-ERR [AUTH]")
    assert 0.25 <= t1 < 1.5 and 0.25 <= t2 < 1.5 and abs(t1 - t2) < 0.2


class _SpyCompare:
    def __init__(self) -> None:
        self.calls = 0
        self.real = hmac.compare_digest

    def __call__(self, a: Any, b: Any) -> bool:
        self.calls += 1
        return self.real(a, b)


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_37_every_login_method_compares_with_compare_digest(
    binding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right and wrong secrets, for each login method through a real server:
    every decision goes through hmac.compare_digest."""
    spy = _SpyCompare()
    monkeypatch.setattr(hmac, "compare_digest", spy)
    cfg = config(apop=True, allow_plaintext=True)
    methods = ["USER", "APOP", "PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]
    with serving(binding, memory(), cfg) as srv:
        for mechanism in methods:
            for password, ok in ((PASSWORD, True), ("wrong", False)):
                before = spy.calls

                def attempt(ops: ClientOps, m: str = mechanism, pw: str = password) -> None:
                    ops.call("login", USER, pw, mechanism=m)

                if ok:
                    client_call("sync", srv.port, attempt, allow_insecure=True)
                else:
                    with pytest.raises(p.Pop3Error):
                        client_call("sync", srv.port, attempt, allow_insecure=True)
                assert spy.calls > before, (mechanism, ok)


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_38_failure_delay_before_err_grows_per_address(binding: str) -> None:
    cfg = config(failure_delay=FailureDelay(base=0.08, factor=2.0, maximum=1.0))
    with serving(binding, memory(), cfg) as srv:
        runs = [_failed_login(srv.port, b"alice") for _ in range(3)]
    replies = {reply for _, reply, _ in runs}
    waits = [t for _, _, t in runs]
    assert len(replies) == 1
    assert waits[0] >= 0.07 and waits[1] >= waits[0] + 0.05 and waits[2] >= waits[1] + 0.12


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_39_plaintext_logins_refused_without_tls_both_sides(binding: str) -> None:
    cfg = config(allow_plaintext_loopback=False)
    with serving(binding, memory(), cfg) as srv, MaliciousClient(srv.port) as c:
        c.line()
        capa = c.command(b"CAPA")
        capa += c.until_dot()
        assert b"\r\nUSER\r\n" not in capa and b"PLAIN" not in capa
        assert c.command(b"USER alice").startswith(b"-ERR [AUTH]")
        plain = base64.b64encode(b"\0alice\0secret")
        assert c.command(b"AUTH PLAIN " + plain).startswith(b"-ERR")
        assert c.command(b"AUTH LOGIN").startswith(b"-ERR")
    # The client: nothing leaves without TLS unless allow_insecure was passed.
    server = MaliciousServer(
        replies={"CAPA": [b"+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"]}, default=(b"+OK\r\n",)
    )
    with server:
        for mechanism in (None, "PLAIN", "LOGIN", "USER"):
            with pytest.raises(p.Pop3TLSError):
                client_call(binding, server.port, functools.partial(login, mechanism=mechanism))
        assert credentials_sent(server.commands) == []
        used = client_call(binding, server.port, login, allow_insecure=True)
    assert used == "PLAIN" and credentials_sent(server.commands)[0].startswith(b"AUTH PLAIN")


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_40_apop_off_by_default_and_never_without_tls(binding: str) -> None:
    with serving(binding, memory(), config()) as srv, MaliciousClient(srv.port) as c:
        greeting = c.line()
        assert b"<" not in greeting  # no timestamp offered
        digest = b"0123456789abcdef0123456789abcdef"
        assert c.command(b"APOP alice " + digest).startswith(b"-ERR")
    server = MaliciousServer(
        b"+OK hi <1896.697170952@dbc.mtview.ca.us>\r\n",
        {"CAPA": [b"+OK\r\nUSER\r\n.\r\n"]},
        default=(b"+OK\r\n",),
    )
    with server:
        # Asked for by name without TLS: refused before a byte is sent.
        with pytest.raises(p.Pop3TLSError):
            client_call(binding, server.port, lambda ops: login(ops, mechanism="APOP"))
        # Even with allow_insecure, the automatic choice is never APOP.
        used = client_call(binding, server.port, login, allow_insecure=True)
    assert used == "USER"
    assert not any(line.startswith(b"APOP") for line in server.commands)


SASL_ATTACKS = {
    "cr-in-identity": [b"AUTH PLAIN " + base64.b64encode(b"\0al\rice\0secret")],
    "nul-in-authcid": [b"AUTH PLAIN " + base64.b64encode(b"\0al\0\0ice\0secret")],
    "authzid-not-authcid": [b"AUTH PLAIN " + base64.b64encode(b"MARKbob\0alice\0secret")],
    "bad-base64": [b"AUTH PLAIN !!MARK!!"],
    "cancel": [b"AUTH PLAIN", b"*"],
    "answer-65k": [b"AUTH PLAIN", b"QUFB" * (65 * 1024 // 4 + 16)],
    "initial-response-past-limit": [b"AUTH PLAIN " + b"TUFSSw" * 12000],
    "many-rounds": [b"AUTH LOGIN"] + [b"TUFSSw=="] * 100,
}


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("attack", sorted(SASL_ATTACKS))
def test_case_41_hostile_sasl_gets_err_and_no_echo(binding: str, attack: str, backend: str) -> None:
    """CR/LF/NUL in identities, authzid ≠ authcid, bad base64, cancel, a
    65 KiB answer, an overlong initial response, endless rounds: -ERR,
    never a login, nothing echoed (``MARK`` is never sent back)."""
    with serving(binding, memory(), config()) as srv, MaliciousClient(srv.port) as c:
        c.line()
        c.send(*(line + b"\r\n" for line in SASL_ATTACKS[attack]), b"STAT\r\nQUIT\r\n")
        answer = c.rest()
    lines = answer.split(b"\r\n")
    assert b"-ERR" in answer
    oks = [line for line in lines if line.startswith(b"+OK")]
    # Never logged in: at most the QUIT of AUTHORIZATION is +OK, as the last line.
    assert len(oks) <= 1 and (not oks or lines[-2] == oks[0]), lines[-5:]
    assert b"MARK" not in answer and b"TUFSSw" not in answer
    assert all(len(line) < 600 for line in lines)


class _AnyUserTable(PasswordTable):
    """Accepts every user name with the password ``pw``: the maildrop alone
    must then keep hostile names inside the root."""

    def check_password(self, user: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), b"pw")


HOSTILE_USERS = [
    b"../outside",
    b"..",
    b"a/../../outside",
    b"/etc",
    b"%2e%2e%2foutside",
    b"..\\outside",
    b".hidden",
    b"x" * 1024,
    "caf\u00e9/../..".encode(),
]


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_42_user_names_never_leave_the_maildir_root(binding: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for sub in ("cur", "new", "tmp"):
        (root / "alice" / sub).mkdir(parents=True)
    (root / "alice" / "new" / "1.M1.h").write_bytes(b"Subject: x\n\nbody\n")
    cfg = config(authenticator=_AnyUserTable({"alice": "pw"}))
    with serving(binding, Maildir(root), cfg) as srv:
        for name in HOSTILE_USERS:
            with MaliciousClient(srv.port) as c:
                c.line()
                user = c.command(b"USER " + name)
                if user.startswith(b"+OK"):
                    assert c.command(b"PASS pw").startswith(b"-ERR"), name
                assert b"outside" not in user
        with MaliciousClient(srv.port) as c:  # NUL inside a name is refused at USER
            c.line()
            assert c.command(b"USER a\x00b").startswith(b"-ERR")
        with MaliciousClient(srv.port) as c:  # the root still serves its real user
            c.line()
            c.command(b"USER alice")
            assert c.command(b"PASS pw").startswith(b"+OK")
            assert c.command(b"STAT").startswith(b"+OK 1 ")
    outside = [path for path in tmp_path.rglob("*") if root not in (path, *path.parents)]
    assert outside == []
    assert sorted(os.listdir(root)) == ["alice"]
    for name in HOSTILE_USERS:
        with pytest.raises(MaildropError):
            Maildir(root).open(name.decode("utf-8"))


def test_case_43_verifier_store_holds_salt_count_and_keys_only(tmp_path: Path) -> None:
    """What ``pop3proto passwd`` writes: per hash the iteration count
    (≥ 4096), salt, StoredKey and ServerKey; never the password nor anything
    a login could be replayed with (SaltedPassword, ClientKey)."""
    import hashlib

    path = tmp_path / "users"
    password = "correct horse battery"
    cli.set_password(str(path), "alice", password)
    text = path.read_text()
    user, secret = text.strip().split(":", 1)
    assert user == "alice" and "\n" not in text.strip()
    forbidden = [password.encode()]
    verifiers = secret.split(",")
    assert {v.split("}")[0] for v in verifiers} == {"{SCRAM-SHA-256", "{SCRAM-SHA-1"}
    for verifier in verifiers:
        scheme, rest = verifier[1:].split("}", 1)
        fields = rest.split("$")
        assert len(fields) == 4, verifier  # iterations, salt, StoredKey, ServerKey
        iterations = int(fields[0])
        salt, stored, server = (base64.b64decode(f) for f in fields[1:])
        assert iterations >= 4096 and len(salt) >= 16
        h = scheme.removeprefix("SCRAM-").replace("-", "").lower()
        salted = hashlib.pbkdf2_hmac(h, password.encode(), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", h).digest()
        assert stored == hashlib.new(h, client_key).digest()
        assert server == hmac.new(salted, b"Server Key", h).digest()
        forbidden += [salted, client_key]
    raw = path.read_bytes()
    for secret_bytes in forbidden:
        assert secret_bytes not in raw
        assert base64.b64encode(secret_bytes) not in raw
        assert secret_bytes.hex().encode() not in raw.lower()
    # ... and the store works: SCRAM and a presented password both log in.
    table = PasswordTable(dict(parse_file(text)))
    with serving("sync", memory(), config(authenticator=table)) as srv:
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN", "USER"):

            def scram_or_plain(ops: ClientOps, m: str = mechanism) -> None:
                ops.call("login", USER, password, mechanism=m)

            client_call("sync", srv.port, scram_or_plain, allow_insecure=True)


# =====================================================================================
# Resource limits (47, 49, 50)
# =====================================================================================


@pytest.mark.parametrize("binding", BINDINGS)
def test_case_47_connections_capped_per_address_and_per_user(binding: str) -> None:
    limiter = p.ConnectionLimiter(per_address=3, per_user=1)
    maildrop = MemoryMaildrop({USER: MESSAGES, "bob": MESSAGES})
    cfg = config(limiter=limiter, authenticator=PasswordTable({USER: PASSWORD, "bob": "pw"}))
    with serving(binding, maildrop, cfg) as srv:
        crowd = [MaliciousClient(srv.port) for _ in range(3)]
        try:
            for c in crowd:
                assert c.line().startswith(b"+OK")
            with MaliciousClient(srv.port) as extra:  # the fourth from this address
                refused = extra.rest()
            assert refused.startswith(b"-ERR") and refused.count(b"\r\n") == 1
            first, second, third = crowd
            first.command(b"USER alice")
            assert first.command(b"PASS secret").startswith(b"+OK")
            second.command(b"USER alice")  # a second session for the same user
            assert second.command(b"PASS secret").startswith(b"-ERR")
            third.command(b"USER bob")  # another user is not affected
            assert third.command(b"PASS pw").startswith(b"+OK")
            assert first.command(b"QUIT").startswith(b"+OK")
            first.rest()
            second.command(b"USER alice")  # the user's slot is free again
            assert second.command(b"PASS secret").startswith(b"+OK")
        finally:
            for c in crowd:
                c.close()
        for _ in range(200):  # the address slots come back when sessions end
            with MaliciousClient(srv.port) as again:
                if again.line().startswith(b"+OK"):
                    break
            time.sleep(0.02)
        else:
            raise AssertionError("the address slots were never released")


def _listing(count: int) -> bytes:
    return b"".join(b"%d 10\r\n" % n for n in range(1, count + 1)) + b".\r\n"


LIMIT_ATTACKS: dict[str, tuple[dict[str, Any], str]] = {
    "capa-lines": (
        {"CAPA": [[b"+OK\r\n", Flood(b"X-JUNK value\r\n", 10_000_000)]]},
        "connect",
    ),
    "listing-entries": (
        {"LIST": [[b"+OK\r\n" + _listing(1500)]]},
        "list",
    ),
    "uidl-100mb": (
        {"UIDL": [[b"+OK\r\n1 ", Flood(b"a" * 65536, 100 * 1024 * 1024)]]},
        "uidl",
    ),
    "retr-100mb-line": (
        {"LIST": [[b"+OK 1 10\r\n"]], "RETR": [[b"+OK\r\n", Flood(b"b" * 65536, 100 << 20)]]},
        "retrieve",
    ),
}


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("attack", sorted(LIMIT_ATTACKS))
def test_case_49_oversized_replies_capped_with_a_clear_error(
    binding: str, attack: str, backend: str
) -> None:
    """A CAPA flood, a listing past the entry cap, a 100 MB UIDL reply: the
    client stops with an error naming the limit, having read a bounded
    amount. (The listing cap is set to 1,000 here; the default, 1,000,000,
    is the same code path.) A 100 MB message body is not a limit breach:
    it streams and is capped by ``max_message_size``."""
    replies, step = LIMIT_ATTACKS[attack]
    base: dict[str, Any] = {"CAPA": [b"+OK\r\nUSER\r\nUIDL\r\n.\r\n"]}
    base.update(replies)
    server = MaliciousServer(replies=base, default=(b"+OK\r\n",))
    limits = p.Limits(max_listing_entries=1000, max_message_size=1 << 20)

    def body(ops: ClientOps) -> None:
        login(ops)
        if step == "list":
            ops.call("list")
        elif step == "uidl":
            ops.call("uidl")
        elif step == "retrieve":
            ops.call("retrieve", 1)

    with server, pytest.raises(CLIENT_ERRORS) as info:
        client_call(binding, server.port, body, allow_insecure=True, limits=limits)
    peers = server.wait_peers()
    assert all(peer.flooded < 24 * 1024 * 1024 for peer in peers)
    named = {
        "capa-lines": "max_capa_lines",
        "listing-entries": "max_listing_entries",
        "uidl-100mb": "max_line",
        "retr-100mb-line": "max_message_size",
    }[attack]
    text = str(info.value) + repr(info.value.__cause__) + repr(info.value.__context__)
    assert named in text or "UID" in text, text
    assert credentials_sent(server.commands)[:1] == ([] if step == "connect" else [b"USER alice"])


def test_case_50_huge_maildrop_stat_fast_and_big_message_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A maildrop of 5,000 files: a second session's STAT reads no message
    and is fast. A 24 MB message: RETR streams through server and client in
    constant memory (tracemalloc peak of both, in this process, < 12 MB)."""
    import hashlib

    from pop3proto.bindings import maildrop as md

    root = tmp_path / "root"
    for sub in ("cur", "new", "tmp"):
        (root / "alice" / sub).mkdir(parents=True)
    new = root / "alice" / "new"
    for i in range(5_000):
        (new / f"{i}.M{i}.h").write_bytes(b"Subject: %d\n\nx\n" % i)
    reads: list[str] = []
    real_size = md._file_size

    def counting(fd_dir: int, name: str) -> int | None:
        reads.append(name)
        size: int | None = real_size(fd_dir, name)
        return size

    monkeypatch.setattr(md, "_file_size", counting)
    with serving("sync", Maildir(root), config()) as srv:

        def stat(ops: ClientOps) -> tuple[int, int]:
            login(ops)
            result: tuple[int, int] = ops.call("stat")
            return result

        assert client_call("sync", srv.port, stat, allow_insecure=True)[0] == 5_000
        reads.clear()
        start = time.monotonic()
        assert client_call("sync", srv.port, stat, allow_insecure=True)[0] == 5_000
        assert time.monotonic() - start < 2.0
        assert reads == []
    # The big message, in a maildrop of its own.
    for old in new.iterdir():
        old.unlink()
    line = b"." + b"y" * 998 + b"\n"  # every line dot-stuffed on the wire
    count = 24 * 1024 * 1024 // len(line)
    with (new / "big.M1.h").open("wb") as f:
        f.write(b"Subject: big\n\n")
        for _ in range(count // 1000):
            f.write(line * 1000)
    expected = hashlib.sha256()
    expected.update(b"Subject: big\r\n\r\n")
    wire_line = line.replace(b"\n", b"\r\n")
    for _ in range(count // 1000):
        expected.update(wire_line * 1000)

    class Sink:
        def __init__(self) -> None:
            self.hash = hashlib.sha256()
            self.size = 0

        def write(self, data: bytes) -> int:
            self.hash.update(data)
            self.size += len(data)
            return len(data)

    sink = Sink()
    with serving("sync", Maildir(root), config()) as srv:

        def retr(ops: ClientOps) -> None:
            login(ops)
            ops.call("retrieve_into", 1, sink)

        tracemalloc.start()
        try:
            client_call("sync", srv.port, retr, allow_insecure=True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert sink.size > 24_000_000
    assert sink.hash.hexdigest() == expected.hexdigest()
    assert peak < 12 * 1024 * 1024, peak


# =====================================================================================
# Data safety: the client's order of durability (58)
# =====================================================================================


def test_case_58_fetch_durability_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per message: write to tmp/, fsync the file, link into new/, fsync
    new/, record the UID (the store rewritten: write + fsync + rename); every
    DELE after the last record."""
    from pop3proto.bindings import _sync_client

    messages = [b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(4)]
    maildrop = MemoryMaildrop({USER: messages})
    target = tmp_path / "Maildir"
    trace: list[tuple[str, str]] = []

    def where(fd: int) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    real = {name: getattr(os, name) for name in ("write", "fsync", "link", "rename")}
    tmp_dir, new_dir = str(target / "tmp"), str(target / "new")
    store_dir = str(target / "pop3proto-uids")

    def write(fd: int, data: Any) -> int:
        path = where(fd)
        if path.startswith(tmp_dir + "/"):
            trace.append(("write", os.path.basename(path)))
        elif path.startswith(store_dir + "/"):
            trace.append(("store-write", ""))
        return int(real["write"](fd, data))

    def fsync(fd: int) -> None:
        path = where(fd)
        if path.startswith(tmp_dir + "/"):
            trace.append(("fsync-file", os.path.basename(path)))
        elif path == new_dir:
            trace.append(("fsync-new", ""))
        elif path.startswith(store_dir + "/"):
            trace.append(("store-fsync", ""))
        real["fsync"](fd)

    def link(src: str, dst: str, **kw: Any) -> None:
        trace.append(("link", os.path.basename(src)))
        real["link"](src, dst, **kw)

    def rename(src: str, dst: str, **kw: Any) -> None:
        trace.append(("rename", os.path.basename(str(src))))
        real["rename"](src, dst, **kw)

    real_delete_many = _sync_client.Client.delete_many
    real_delete = _sync_client.Client.delete

    def delete_many(self: Any, msgs: Any, window: int = 16) -> int:
        msgs = list(msgs)
        trace.extend(("DELE", str(m)) for m in msgs)
        return int(real_delete_many(self, msgs, window))

    def delete(self: Any, msg: int) -> None:
        trace.append(("DELE", str(msg)))
        real_delete(self, msg)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(_sync_client.Client, "delete_many", delete_many)
    monkeypatch.setattr(_sync_client.Client, "delete", delete)
    monkeypatch.setenv("POP3_PASSWORD", PASSWORD)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with serving("sync", maildrop, config()) as srv:
        code = cli.main(["fetch", f"pop3://alice@127.0.0.1:{srv.port}", "--maildir", str(target)])
    monkeypatch.undo()
    assert code == 0 and maildrop.contents(USER) == []
    assert len(os.listdir(target / "new")) == len(messages)
    names = list(dict.fromkeys(name for step, name in trace if step == "link"))
    assert len(names) == len(messages)
    kinds = [step for step, _ in trace]
    first_dele = kinds.index("DELE")
    assert kinds.count("DELE") == len(messages)
    # (After QUIT the store is pruned: a rewrite, which is not a record.)
    assert "link" not in kinds[first_dele:] and "write" not in kinds[first_dele:]
    for name in names:
        steps = [i for i, (step, n) in enumerate(trace) if n == name]
        w = [i for i in steps if trace[i][0] == "write"]
        f = [i for i in steps if trace[i][0] == "fsync-file"]
        ln = [i for i in steps if trace[i][0] == "link"]
        assert w and f and ln and max(w) < f[0] < ln[0], trace
        new_sync = next(i for i in range(ln[0], len(trace)) if trace[i][0] == "fsync-new")
        record = next(i for i in range(new_sync, len(trace)) if trace[i][0] == "store-fsync")
        assert trace[record - 1][0] == "store-write" and record < first_dele
        renamed = next(i for i in range(record, len(trace)) if trace[i][0] == "rename")
        assert renamed < first_dele
