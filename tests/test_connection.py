"""The Connection engine, both roles, both backends.

Tests named ``test_checklist_NN_*`` prove the items of the engine checklist
(PROTOCOL.md §15); ``test_hardening_NN_*`` prove HARDENING.md cases.
"""

from __future__ import annotations

import base64
import itertools
import random

import pytest
from helpers import (
    ConnectionPair,
    chunkings,
    client_after_greeting,
    drain,
    feed,
    logged_in_client,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pop3proto as p

pytestmark = pytest.mark.usefixtures("backend")

HSETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def replay(setup: object, data: bytes) -> list[list[p.Event]]:
    """Feed ``data`` whole, in random chunks and byte by byte to fresh
    connections made by ``setup()``; return the three event lists."""
    results = []
    for _name, chunks in chunkings(data):
        conn = setup()  # type: ignore[operator]
        results.append(feed(conn, chunks))
    return results


def same_every_chunking(setup: object, data: bytes) -> list[p.Event]:
    whole, rnd, bytewise = replay(setup, data)
    assert whole == rnd == bytewise
    return whole


# ================================================================ client side


class TestGreeting:
    def test_plain_greeting(self) -> None:
        conn = p.Connection(p.CLIENT)
        assert conn.state is p.State.GREETING
        conn.receive_data(b"+OK POP3 server ready\r\n")
        assert conn.next_event() == p.Greeting("POP3 server ready")
        assert conn.state is p.State.AUTHORIZATION

    def test_checklist_04_apop_timestamp_extracted(self) -> None:
        conn = p.Connection(p.CLIENT)
        conn.receive_data(b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n")
        g = conn.next_event()
        assert g == p.Greeting("POP3 server ready", "<1896.697170952@dbc.mtview.ca.us>")

    def test_checklist_04_timestamp_not_msgid_shaped_means_no_apop(self) -> None:
        conn = p.Connection(p.CLIENT)
        conn.receive_data(b"+OK hello <not a msg id>\r\n")
        g = conn.next_event()
        assert isinstance(g, p.Greeting) and g.timestamp is None
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Apop("u", "0" * 32))

    def test_greeting_with_code(self) -> None:
        conn = p.Connection(p.CLIENT)
        conn.receive_data(b"+OK [XYZ] hi\r\n")
        assert conn.next_event() == p.Greeting("hi", None, p.ResponseCode(("XYZ",)))

    def test_err_greeting_ends_session(self) -> None:
        conn = p.Connection(p.CLIENT)
        conn.receive_data(b"-ERR [SYS/TEMP] go away\r\n")
        assert conn.next_event() == p.Err("go away", p.ResponseCode(("SYS", "TEMP")))
        assert conn.state is p.State.CLOSED
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Capa())

    def test_no_command_before_greeting(self) -> None:
        conn = p.Connection(p.CLIENT)
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Capa())

    def test_hardening_08_greeting_of_many_angle_brackets_is_linear(self) -> None:
        conn = p.Connection(p.CLIENT)
        conn.receive_data(b"+OK " + b"<" * 7000 + b"\r\n")
        g = conn.next_event()
        assert isinstance(g, p.Greeting) and g.timestamp is None


class TestStatusLines:
    @pytest.mark.parametrize(
        "line", [b"+OKAY\r\n", b"+\r\n", b"-ERRx\r\n", b"\r\n", b"OK\r\n", b"+ OK\r\n"]
    )
    def test_hardening_05_bad_status_lines_rejected(self, line: bytes) -> None:
        conn = client_after_greeting()
        conn.send(p.Noop() if False else p.Capa())
        conn.receive_data(line)
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()
        assert conn.state is p.State.ERROR
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()

    @pytest.mark.parametrize(
        "line,text",
        [
            (b"+ok\r\n", ""),
            (b"+OK\r\n", ""),
            (b"+Ok  spaced \r\n", "spaced "),
            (b"+OK\thi\r\n", "hi"),
            (b"+OK hi\n", "hi"),
            (b"+OK hi\r\r\n", "hi\r"),
        ],
    )
    def test_checklist_05_tolerant_ok_forms(self, line: bytes, text: str) -> None:
        conn = client_after_greeting()
        conn.send(p.User("u"))
        conn.receive_data(line)
        ev = conn.next_event()
        assert isinstance(ev, p.Ok)
        assert ev.text.rstrip("\r") == text.rstrip("\r")

    def test_checklist_05_response_codes_case_insensitive_unknown_levels(self) -> None:
        conn = client_after_greeting()
        conn.send(p.User("u"))
        conn.receive_data(b"-ERR [sys/temp/foo] later\r\n")
        ev = conn.next_event()
        assert isinstance(ev, p.Err) and ev.code is not None
        assert ev.code.is_("SYS/TEMP") and ev.code.is_("sys")
        assert not ev.code.is_("SYS/PERM")
        assert ev.text == "later"

    def test_login_delay_code_with_argument(self) -> None:
        conn = client_after_greeting()
        conn.send(p.User("u"))
        conn.receive_data(b"-ERR [LOGIN-DELAY 900] wait\r\n")
        ev = conn.next_event()
        assert ev == p.Err("wait", p.ResponseCode(("LOGIN-DELAY",), "900"))

    def test_hardening_12_escape_sequences_kept_and_sanitised(self) -> None:
        conn = client_after_greeting()
        conn.send(p.User("u"))
        conn.receive_data(b"-ERR evil \x1b[31m\xff\xfe text\r\n")
        ev = conn.next_event()
        assert isinstance(ev, p.Err)
        assert ev.text.encode("utf-8", "surrogateescape") == b"evil \x1b[31m\xff\xfe text"
        conn2 = client_after_greeting()
        conn2.send(p.Capa())
        conn2.receive_data(b"garbage \x1b[2J\xff\r\n")
        with pytest.raises(p.RemoteProtocolError) as info:
            conn2.next_event()
        assert "\x1b" not in str(info.value) and "\\x1b" in str(info.value)


class TestMultiline:
    RETR_VECTOR = b"+OK 120 octets\r\nSubject: x\r\n\r\n..\r\n...hidden\r\n..end\r\n.\r\n"

    def _retr_client(self) -> p.Connection:
        conn = logged_in_client()
        conn.send(p.Retr(1))
        return conn

    def test_checklist_02_unstuffing_protocol_example(self) -> None:
        events = same_every_chunking(self._retr_client, self.RETR_VECTOR)
        assert events == [
            p.MessageStart("120 octets"),
            p.Data(b"Subject: x\r\n\r\n.\r\n..hidden\r\n.end\r\n"),
            p.EndOfMessage(),
        ]

    def test_checklist_01_bare_lf_accepted(self) -> None:
        data = b"+OK\nline\n..dot\n.\n"
        events = same_every_chunking(self._retr_client, data)
        assert events == [p.MessageStart(), p.Data(b"line\n.dot\n"), p.EndOfMessage()]

    @pytest.mark.parametrize(
        "body,expected",
        [
            (b"..x\r\n.\r\n", b".x\r\n"),
            (b"\r.\r\n.\r\n", b"\r.\r\n"),
            (b".\rx\r\n.\r\n", b"\rx\r\n"),
            (b"a\r\n.\r\n", b"a\r\n"),
            (b".\r\n", b""),
            (b"x.\r\n.\r\n", b"x.\r\n"),
            (b"\x00\xff\r\n.\r\n", b"\x00\xff\r\n"),
        ],
    )
    def test_hardening_04_dots_byte_exact(self, body: bytes, expected: bytes) -> None:
        events = same_every_chunking(self._retr_client, b"+OK\r\n" + body)
        data = b"".join(e.data for e in events if isinstance(e, p.Data))
        assert data == expected
        assert events[-1] == p.EndOfMessage()

    def test_hardening_04_every_split_offset(self) -> None:
        wire = b"+OK\r\nab\r\n..\r\n.c\r\n\r\n.\r\n"
        for cut in range(1, len(wire)):
            conn = self._retr_client()
            events = feed(conn, [wire[:cut], wire[cut:]])
            assert events == [p.MessageStart(), p.Data(b"ab\r\n.\r\nc\r\n\r\n"), p.EndOfMessage()]

    def test_err_is_single_line(self) -> None:
        conn = self._retr_client()
        conn.receive_data(b"-ERR no such message\r\n")
        assert drain(conn) == [p.Err("no such message")]
        assert conn.outstanding == ()

    def test_data_streams_without_holding_the_message(self) -> None:
        conn = self._retr_client()
        conn.receive_data(b"+OK\r\n")
        assert conn.next_event() == p.MessageStart()
        total = 0
        for _ in range(100):
            conn.receive_data(b"x" * 9999 + b"\n")
            ev = conn.next_event()
            assert isinstance(ev, p.Data)
            total += len(ev.data)
            assert len(conn.trailing_data[0]) < 3
        assert total == 100 * 10000

    def test_hardening_03_eof_mid_body(self) -> None:
        for tail in (b"+OK\r\nabc", b"+OK\r\nabc\r\n", b"+OK\r\nabc\r\n.", b"+OK\r\nx\r\n.\r"):
            conn = self._retr_client()
            conn.receive_data(tail)
            drain(conn)
            conn.receive_data(b"")
            with pytest.raises(p.RemoteProtocolError):
                drain(conn)

    def test_hardening_03_body_ending_with_dotdot_is_not_an_end(self) -> None:
        conn = self._retr_client()
        conn.receive_data(b"+OK\r\nabc\r\n..\r\n")
        events = drain(conn)
        assert p.EndOfMessage() not in events
        conn.receive_data(b"")
        with pytest.raises(p.RemoteProtocolError):
            drain(conn)

    def test_hardening_02_endless_body_stops_at_cap(self) -> None:
        conn = logged_in_client(limits=p.Limits(max_message_size=1000))
        conn.send(p.Retr(1))
        conn.receive_data(b"+OK\r\n")
        drain(conn)
        with pytest.raises(p.LimitExceeded) as info:
            for _ in range(100):
                conn.receive_data(b"y" * 99 + b"\n")
                drain(conn)
        assert info.value.limit == "max_message_size"

    def test_top_is_multiline(self) -> None:
        conn = logged_in_client()
        conn.send(p.Top(1, 0))
        conn.receive_data(b"+OK\r\nH: v\r\n\r\n.\r\n")
        assert feed(conn, []) == [] or True
        assert drain(conn) == [p.MessageStart(), p.Data(b"H: v\r\n\r\n"), p.EndOfMessage()]


class TestListings:
    def test_checklist_05_stat(self) -> None:
        conn = logged_in_client()
        conn.send(p.Stat())
        conn.receive_data(b"+OK 2 320\r\n")
        assert conn.next_event() == p.DropListing(2, 320)

    def test_checklist_05_stat_tolerates_leading_zeros_and_trailing_text(self) -> None:
        conn = logged_in_client()
        conn.send(p.Stat())
        conn.receive_data(b"+OK  002  0320 octets\r\n")
        assert conn.next_event() == p.DropListing(2, 320)

    def test_checklist_03_list_with_argument_is_single_line(self) -> None:
        conn = logged_in_client()
        conn.send(p.List(2))
        conn.receive_data(b"+OK 2 200\r\n")
        assert conn.next_event() == p.ScanListing(2, 200)
        assert conn.outstanding == ()

    def test_checklist_03_list_without_argument_is_multiline(self) -> None:
        def setup() -> p.Connection:
            conn = logged_in_client()
            conn.send(p.List())
            return conn

        data = b"+OK 2 messages\r\n1 120\r\n2 200 extra text\r\n.\r\n"
        assert same_every_chunking(setup, data) == [p.ScanListings([(1, 120), (2, 200)])]

    def test_empty_listing(self) -> None:
        conn = logged_in_client()
        conn.send(p.List())
        conn.receive_data(b"+OK\r\n.\r\n")
        assert conn.next_event() == p.ScanListings([])

    def test_uidl_listing(self) -> None:
        def setup() -> p.Connection:
            conn = logged_in_client()
            conn.send(p.Uidl())
            return conn

        data = b"+OK\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n.\r\n"
        assert same_every_chunking(setup, data) == [
            p.UniqueIdListings([(1, "whqtswO00WBw418f9t5JxYwZ"), (2, "QhdPYR:00WBw1Ph7x7")])
        ]

    def test_uidl_single(self) -> None:
        conn = logged_in_client()
        conn.send(p.Uidl(2))
        conn.receive_data(b"+OK 2 QhdPYR:00WBw1Ph7x7\r\n")
        assert conn.next_event() == p.UniqueIdListing(2, "QhdPYR:00WBw1Ph7x7")

    @pytest.mark.parametrize(
        "bad", [b"-1", b"18446744073709551616", b"1e3", b"0x10", b"+5", b"0" * 40 + b"1"]
    )
    def test_hardening_06_bad_numbers_rejected(self, bad: bytes) -> None:
        for cmd, reply in (
            (p.Stat(), b"+OK 1 " + bad + b"\r\n"),
            (p.List(), b"+OK\r\n1 " + bad + b"\r\n.\r\n"),
            (p.List(), b"+OK\r\n" + bad + b" 10\r\n.\r\n"),
            (p.List(1), b"+OK 1 " + bad + b"\r\n"),
        ):
            conn = logged_in_client()
            conn.send(cmd)
            conn.receive_data(reply)
            with pytest.raises(p.RemoteProtocolError):
                drain(conn)

    @pytest.mark.parametrize(
        "listing",
        [
            b"1 " + b"a" * 71 + b"\r\n",
            b"1 \r\n",
            b"1 ab cd\r\n",
            b"1 ab\tcd\r\n",
            b"1 a\x00b\r\n",
            b"1 caf\xc3\xa9\r\n",
            b"1 same\r\n2 same\r\n",
            b"1 a\r\n1 b\r\n",
            b"0 zero\r\n",
        ],
    )
    def test_hardening_07_bad_uids_rejected(self, listing: bytes) -> None:
        conn = logged_in_client()
        conn.send(p.Uidl())
        conn.receive_data(b"+OK\r\n" + listing + b".\r\n")
        with pytest.raises(p.RemoteProtocolError):
            drain(conn)

    def test_hardening_07_uidl_for_another_message_rejected(self) -> None:
        conn = logged_in_client()
        conn.send(p.Uidl(3))
        conn.receive_data(b"+OK 4 abc\r\n")
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()

    def test_uid_of_70_octets_accepted(self) -> None:
        conn = logged_in_client()
        conn.send(p.Uidl())
        conn.receive_data(b"+OK\r\n1 " + b"~" * 70 + b"\r\n.\r\n")
        assert conn.next_event() == p.UniqueIdListings([(1, "~" * 70)])

    def test_hardening_49_listing_past_entry_cap(self) -> None:
        conn = logged_in_client(limits=p.Limits(max_listing_entries=100))
        conn.send(p.List())
        conn.receive_data(b"+OK\r\n" + b"".join(b"%d 1\r\n" % i for i in range(1, 102)))
        with pytest.raises(p.LimitExceeded) as info:
            drain(conn)
        assert info.value.limit == "max_listing_entries"

    def test_listing_of_exactly_the_cap_is_fine(self) -> None:
        conn = logged_in_client(limits=p.Limits(max_listing_entries=100))
        conn.send(p.List())
        conn.receive_data(b"+OK\r\n" + b"".join(b"%d 1\r\n" % i for i in range(1, 101)) + b".\r\n")
        ev = conn.next_event()
        assert isinstance(ev, p.ScanListings) and len(ev.entries) == 100

    def test_hardening_49_huge_listing_line_capped(self) -> None:
        conn = logged_in_client(limits=p.Limits(max_line=1000))
        conn.send(p.Uidl())
        conn.receive_data(b"+OK\r\n1 ")
        drain(conn)
        with pytest.raises(p.LimitExceeded):
            for _ in range(20):
                conn.receive_data(b"a" * 100)
                drain(conn)


class TestCapa:
    RFC_EXAMPLE = (
        b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL CRAM-MD5 KERBEROS_V4\r\n"
        b"RESP-CODES\r\nLOGIN-DELAY 900\r\nPIPELINING\r\nEXPIRE 60\r\nUIDL\r\n"
        b"IMPLEMENTATION Shlemazle-Plotz-v302\r\n.\r\n"
    )

    def test_checklist_05_capa_rfc_example(self) -> None:
        def setup() -> p.Connection:
            conn = client_after_greeting()
            conn.send(p.Capa())
            return conn

        [caps] = same_every_chunking(setup, self.RFC_EXAMPLE)
        assert isinstance(caps, p.Capabilities)
        assert "pipelining" in caps and "Top" in caps and "STLS" not in caps
        assert caps.sasl == ("CRAM-MD5", "KERBEROS_V4")
        assert caps.login_delay == (900, False)
        assert caps.expire == (60, False)
        assert caps.implementation == "Shlemazle-Plotz-v302"
        assert caps.resp_codes and caps.pipelining and not caps.stls
        assert caps["sasl"] == ("CRAM-MD5", "KERBEROS_V4")
        assert list(caps)[:2] == ["TOP", "USER"]

    def test_checklist_05_capa_values(self) -> None:
        conn = client_after_greeting()
        conn.send(p.Capa())
        conn.receive_data(
            b"+OK\r\nexpire NEVER\r\nLOGIN-DELAY 300 USER\r\nUTF8 USER\r\nSTLS\r\n"
            b"AUTH-RESP-CODE\r\nLANG\r\nX-PRIVATE a b\r\n.\r\n"
        )
        caps = conn.next_event()
        assert isinstance(caps, p.Capabilities)
        assert caps.expire == (None, False)
        assert caps.login_delay == (300, True)
        assert caps.utf8 == (True, True)
        assert caps.stls and caps.auth_resp_code and caps.lang
        assert caps["x-private"] == ("a", "b")
        assert conn.capabilities == caps

    def test_capa_err_means_no_capabilities(self) -> None:
        conn = client_after_greeting()
        conn.send(p.Capa())
        conn.receive_data(b"-ERR unknown command\r\n")
        assert conn.next_event() == p.Err("unknown command")
        assert conn.capabilities is None

    def test_hardening_49_too_many_capa_lines(self) -> None:
        conn = client_after_greeting(limits=p.Limits(max_capa_lines=50))
        conn.send(p.Capa())
        conn.receive_data(b"+OK\r\n" + b"X\r\n" * 51 + b".\r\n")
        with pytest.raises(p.LimitExceeded) as info:
            drain(conn)
        assert info.value.limit == "max_capa_lines"


def _pipelining_client() -> p.Connection:
    conn = client_after_greeting()
    conn.send(p.Capa())
    conn.receive_data(b"+OK\r\nPIPELINING\r\nSASL PLAIN\r\n.\r\n")
    assert isinstance(conn.next_event(), p.Capabilities)
    return conn


class TestPipelining:
    def test_checklist_06_one_in_flight_without_pipelining(self) -> None:
        conn = client_after_greeting()
        conn.send(p.User("u"))
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Pass("x"))

    def test_checklist_06_fifo_in_order(self) -> None:
        conn = _pipelining_client()
        for cmd in (p.User("u"), p.Pass("pw"), p.Stat(), p.List(), p.Retr(1), p.Dele(1)):
            conn.send(cmd)
        conn.receive_data(b"+OK\r\n+OK\r\n+OK 1 5\r\n+OK\r\n1 5\r\n.\r\n+OK\r\nabc\r\n.\r\n+OK\r\n")
        assert drain(conn) == [
            p.Ok(),
            p.Ok(),
            p.DropListing(1, 5),
            p.ScanListings([(1, 5)]),
            p.MessageStart(),
            p.Data(b"abc\r\n"),
            p.EndOfMessage(),
            p.Ok(),
        ]
        assert conn.state is p.State.TRANSACTION

    @pytest.mark.parametrize("barrier", [p.Stls(), p.Auth("PLAIN", b"\0u\0p"), p.Quit()])
    def test_checklist_06_never_pipelines_past_barriers(self, barrier: p.Command) -> None:
        conn = _pipelining_client()
        conn.send(barrier)
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Noop())

    def test_checklist_06_unsolicited_data_is_an_error(self) -> None:
        conn = client_after_greeting()
        conn.receive_data(b"+OK surprise\r\n")
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()

    def test_hardening_09_extra_line_after_reply_not_credited(self) -> None:
        conn = client_after_greeting()
        conn.send(p.User("u"))
        conn.receive_data(b"+OK\r\n+OK fake for PASS\r\n")
        assert conn.next_event() == p.Ok()
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()

    def test_hardening_09_listing_glued_to_greeting(self) -> None:
        conn = p.Connection(p.CLIENT)
        conn.receive_data(b"+OK hi\r\n1 100\r\n.\r\n")
        assert isinstance(conn.next_event(), p.Greeting)
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()

    def test_hardening_10_out_of_sync_replies_close(self) -> None:
        conn = _pipelining_client()
        conn.send(p.User("u"))
        conn.send(p.Pass("x"))
        conn.receive_data(b"+OK\r\n1 2\r\n")
        assert conn.next_event() == p.Ok()
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Noop())

    def test_pipeline_depth_is_bounded(self) -> None:
        conn = _pipelining_client()
        conn.send(p.User("u"))
        conn.send(p.Pass("x"))
        for _ in range(p.Limits().max_pipeline - 2):
            conn.send(p.Noop())
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Noop())

    def test_pipelined_retrs_with_replies_in_one_read(self) -> None:
        conn = _pipelining_client()
        conn.send(p.User("u"))
        conn.send(p.Pass("x"))
        for i in range(1, 4):
            conn.send(p.Retr(i))
        wire = b"+OK\r\n+OK\r\n" + b"".join(b"+OK\r\nmsg%d\r\n.\r\n" % i for i in range(1, 4))
        events = same_every_chunking(lambda: _clone_pipeline(), wire)
        datas = [e.data for e in events if isinstance(e, p.Data)]
        assert datas == [b"msg1\r\n", b"msg2\r\n", b"msg3\r\n"]
        assert conn.outstanding[0] == p.User("u")


def _clone_pipeline() -> p.Connection:
    conn = _pipelining_client()
    conn.send(p.User("u"))
    conn.send(p.Pass("x"))
    for i in range(1, 4):
        conn.send(p.Retr(i))
    return conn


class TestAuth:
    def test_checklist_08_initial_response_and_empty(self) -> None:
        conn = _pipelining_client()
        assert conn.send(p.Auth("PLAIN", b"\0user\0pencil")) == b"AUTH PLAIN AHVzZXIAcGVuY2ls\r\n"
        conn2 = _pipelining_client()
        assert conn2.send(p.Auth("EXTERNAL", b"")) == b"AUTH EXTERNAL =\r\n"
        conn3 = _pipelining_client()
        assert conn3.send(p.Auth("login")) == b"AUTH LOGIN\r\n"

    def test_checklist_08_challenges_answers_cancel(self) -> None:
        conn = _pipelining_client()
        conn.send(p.Auth("LOGIN"))
        conn.receive_data(b"+ VXNlcm5hbWU6\r\n")
        assert conn.next_event() == p.AuthChallenge(b"Username:")
        assert conn.send(p.AuthResponse(b"tim")) == b"dGlt\r\n"
        conn.receive_data(b"+\r\n")
        assert conn.next_event() == p.AuthChallenge(b"")
        assert conn.send(p.AuthResponse(b"")) == b"\r\n"
        conn.receive_data(b"+ \r\n")
        assert conn.next_event() == p.AuthChallenge(b"")
        assert conn.send(p.AuthCancel()) == b"*\r\n"
        conn.receive_data(b"-ERR cancelled\r\n")
        assert conn.next_event() == p.Err("cancelled")
        assert conn.state is p.State.AUTHORIZATION

    def test_auth_success_enters_transaction(self) -> None:
        conn = _pipelining_client()
        conn.send(p.Auth("PLAIN", b"\0u\0p"))
        conn.receive_data(b"+OK welcome\r\n")
        assert conn.next_event() == p.Ok("welcome")
        assert conn.state is p.State.TRANSACTION

    @pytest.mark.parametrize("payload", [b"=AAA", b"AAA=BBB", b"A!==", b"AAAA===="])
    def test_checklist_08_malformed_challenge_asks_for_cancel(self, payload: bytes) -> None:
        conn = _pipelining_client()
        conn.send(p.Auth("LOGIN"))
        conn.receive_data(b"+ " + payload + b"\r\n")
        ev = conn.next_event()
        assert isinstance(ev, p.MalformedChallenge)
        assert conn.send(p.AuthCancel()) == b"*\r\n"

    def test_answer_without_challenge_refused(self) -> None:
        conn = _pipelining_client()
        conn.send(p.Auth("LOGIN"))
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.AuthResponse(b"x"))

    def test_challenge_rounds_are_bounded(self) -> None:
        conn = _pipelining_client()
        conn.send(p.Auth("X-LOOP"))
        with pytest.raises(p.LimitExceeded):
            for _ in range(100):
                conn.receive_data(b"+ \r\n")
                assert conn.next_event() == p.AuthChallenge(b"")
                conn.send(p.AuthResponse(b""))

    def test_bare_auth_lists_mechanisms(self) -> None:
        conn = client_after_greeting()
        conn.send(p.Auth(""))
        conn.receive_data(b"+OK\r\nPLAIN\r\nlogin\r\n.\r\n")
        assert conn.next_event() == p.MechanismListing(["PLAIN", "LOGIN"])


class TestStls:
    def _stls_client(self) -> p.Connection:
        conn = client_after_greeting()
        conn.send(p.Capa())
        conn.receive_data(b"+OK\r\nSTLS\r\nUSER\r\n.\r\n")
        conn.next_event()
        conn.send(p.Stls())
        return conn

    def test_checklist_07_starttls_then_capabilities_forgotten(self) -> None:
        conn = self._stls_client()
        conn.receive_data(b"+OK Begin TLS\r\n")
        assert conn.next_event() == p.StartTLS()
        assert conn.next_event() is p.PAUSED
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Capa())
        conn.tls_established()
        assert conn.tls_active and conn.capabilities is None
        conn.send(p.Capa())
        conn.receive_data(b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n")
        caps = conn.next_event()
        assert isinstance(caps, p.Capabilities) and not caps.stls
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Stls())

    def test_hardening_29_response_injection_one_read(self) -> None:
        conn = self._stls_client()
        conn.receive_data(b"+OK Begin TLS\r\n+OK\r\n.\r\n")
        with pytest.raises(p.RemoteProtocolError):
            drain(conn)
        assert conn.state is p.State.ERROR

    def test_hardening_29_response_injection_byte_at_a_time(self) -> None:
        conn = self._stls_client()
        wire = b"+OK Begin TLS\r\n+OK\r\n.\r\n"
        with pytest.raises(p.RemoteProtocolError):
            for i in range(len(wire)):
                conn.receive_data(wire[i : i + 1])
                drain(conn)
        with pytest.raises(p.LocalProtocolError):
            conn.tls_established()

    def test_stls_refused(self) -> None:
        conn = self._stls_client()
        conn.receive_data(b"-ERR no\r\n")
        assert conn.next_event() == p.Err("no")
        assert not conn.tls_active


class TestQuitAndEof:
    def test_checklist_10_quit_acknowledged(self) -> None:
        conn = logged_in_client()
        conn.send(p.Quit())
        conn.receive_data(b"+OK bye\r\n")
        assert conn.next_event() == p.Ok("bye")
        assert conn.quit_acknowledged and conn.state is p.State.CLOSED
        conn.receive_data(b"")
        assert conn.next_event() == p.ConnectionClosed()

    def test_checklist_10_eof_after_quit_without_ok_is_normal_but_uncertain(self) -> None:
        conn = logged_in_client()
        conn.send(p.Quit())
        conn.receive_data(b"")
        assert conn.next_event() == p.ConnectionClosed()
        assert not conn.quit_acknowledged

    def test_eof_with_command_outstanding_is_error(self) -> None:
        conn = logged_in_client()
        conn.send(p.Stat())
        conn.receive_data(b"")
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()

    def test_hardening_01_status_line_past_limit(self) -> None:
        conn = client_after_greeting(limits=p.Limits(max_line=512))
        conn.send(p.Noop() if False else p.Capa())
        with pytest.raises(p.LimitExceeded) as info:
            for _ in range(10):
                conn.receive_data(b"+OK " + b"x" * 100)
                drain(conn)
        assert info.value.limit == "max_line"
        assert len(conn.trailing_data[0]) <= 1024

    def test_hardening_01_eof_before_crlf(self) -> None:
        conn = client_after_greeting()
        conn.send(p.Capa())
        conn.receive_data(b"+OK partial")
        assert conn.next_event() is p.NEED_DATA
        conn.receive_data(b"")
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()

    def test_checklist_10_sizes_never_frame_data(self) -> None:
        conn = logged_in_client()
        conn.send(p.Retr(1))
        conn.receive_data(b"+OK 3 octets\r\n0123456789\r\n.\r\n")
        assert drain(conn)[1] == p.Data(b"0123456789\r\n")


class TestClientSend:
    @pytest.mark.parametrize(
        "cmd",
        [
            p.User("a\r\nDELE 1"),
            p.User("a\nb"),
            p.User("a\0b"),
            p.Pass("x\r\nQUIT"),
            p.Apop("a b", "0" * 32),
            p.User(""),
            p.Lang("en\r\n"),
        ],
    )
    def test_hardening_11_control_characters_refused(self, cmd: p.Command) -> None:
        conn = client_after_greeting()
        with pytest.raises(p.LocalProtocolError):
            conn.send(cmd)
        assert conn.outstanding == ()
        conn.send(p.Capa())  # still usable

    def test_hardening_11_uid_style_extension_args_refused(self) -> None:
        conn = client_after_greeting()
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.ExtensionCommand("XTND", ("a\rb",)))

    def test_checklist_01_crlf_on_every_line(self) -> None:
        conn = _pipelining_client()
        outs = [conn.send(c) for c in (p.User("u"), p.Pass("p w"))]
        assert outs == [b"USER u\r\n", b"PASS p w\r\n"]

    def test_wrong_state_commands_refused_locally(self) -> None:
        conn = client_after_greeting()
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Retr(1))
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Pass("x"))
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Retr(0))

    def test_extension_commands_last_and_sdps_env(self) -> None:
        conn = logged_in_client()
        assert conn.send(p.ExtensionCommand("LAST")) == b"LAST\r\n"
        conn.receive_data(b"+OK 3\r\n")
        assert conn.next_event() == p.Ok("3")
        assert conn.send(p.ExtensionCommand("*ENV", ("1",), multiline=True)) == b"*ENV 1\r\n"
        conn.receive_data(b"+OK\r\nuser@example.com\r\n..x\r\n.\r\n")
        assert drain(conn) == [
            p.MessageStart(),
            p.Data(b"user@example.com\r\n.x\r\n"),
            p.EndOfMessage(),
        ]

    def test_lang_and_utf8(self) -> None:
        conn = client_after_greeting()
        conn.send(p.Lang())
        conn.receive_data(b"+OK\r\nen English\r\nde Deutsch\r\n.\r\n")
        assert conn.next_event() == p.LanguageListing([("en", "English"), ("de", "Deutsch")])
        conn.send(p.Utf8())
        conn.receive_data(b"+OK\r\n")
        assert conn.next_event() == p.Ok()
        assert conn.utf8
        conn.send(p.Lang("de"))
        conn.receive_data("+OK de Sprache geändert\r\n".encode())
        assert conn.next_event() == p.Ok("de Sprache geändert")


# ================================================================ server side


def server(**kw: object) -> p.Connection:
    conn = p.Connection(p.SERVER, **kw)  # type: ignore[arg-type]
    conn.send(p.Greeting("ready"))
    return conn


def logged_in_server(**kw: object) -> p.Connection:
    conn = server(**kw)
    conn.receive_data(b"USER u\r\nPASS p\r\n")
    assert conn.next_event() == p.User("u")
    conn.send(p.Ok())
    assert conn.next_event() == p.Pass("p")
    conn.send(p.Ok())
    assert conn.state is p.State.TRANSACTION
    return conn


class TestServerParsing:
    @pytest.mark.parametrize(
        "line,cmd",
        [
            (b"user bob\r\n", p.User("bob")),
            (b"PASS  two  spaces \r\n", p.Pass(" two  spaces ")),
            (b"Stat\r\n", p.Stat()),
            (b"LIST\r\n", p.List()),
            (b"list 3\r\n", p.List(3)),
            (b"TOP 1 0\r\n", p.Top(1, 0)),
            (b"UIDL 2 \r\n", p.Uidl(2)),
            (b"AUTH PLAIN AHVzZXIAcGVuY2ls\r\n", p.Auth("PLAIN", b"\0user\0pencil")),
            (b"AUTH external =\r\n", p.Auth("EXTERNAL", b"")),
            (b"AUTH\r\n", p.Auth("")),
            (
                b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n",
                p.Apop("mrose", "c4c9334bac560ecc979e58001b3e22fb"),
            ),
            (b"CAPA\n", p.Capa()),
            (b"LANG en\r\n", p.Lang("en")),
        ],
    )
    def test_checklist_12_commands_parsed_case_insensitively(
        self, line: bytes, cmd: p.Command
    ) -> None:
        def setup() -> p.Connection:
            conn = server()
            if isinstance(cmd, p.Pass):
                conn.receive_data(b"USER u\r\n")
                conn.next_event()
                conn.send(p.Ok())
            elif isinstance(cmd, (p.Stat, p.List, p.Uidl, p.Top)):
                conn = logged_in_server()
            return conn

        for events in replay(setup, line):
            assert events == [cmd]

    @pytest.mark.parametrize(
        "arg", [b"0", b"-1", b"01", b"+1", b"4294967297", b"1x", b"1 2", b"", b"\xff"]
    )
    def test_hardening_15_bad_message_numbers(self, arg: bytes) -> None:
        conn = logged_in_server()
        conn.receive_data(b"RETR " + arg + b"\r\n")
        ev = conn.next_event()
        assert isinstance(ev, p.InvalidCommand)
        assert arg not in ev.reason.encode() or not arg
        out = conn.send(p.Err(ev.reason))
        assert out.startswith(b"-ERR ")
        assert conn.state is p.State.TRANSACTION

    def test_hardening_15_huge_top_count(self) -> None:
        conn = logged_in_server()
        conn.receive_data(b"TOP 1 99999999999999999999\r\n")
        assert isinstance(conn.next_event(), p.InvalidCommand)

    @pytest.mark.parametrize(
        "lines",
        [
            [b"RETR 1\r\n"],
            [b"STAT\r\n"],
            [b"PASS x\r\n"],
            [b"USER u\r\n", b"STLS\r\n"],
        ],
    )
    def test_hardening_17_wrong_state_commands(self, lines: list[bytes]) -> None:
        conn = server()
        for line in lines[:-1]:
            conn.receive_data(line)
            conn.next_event()
            conn.send(p.Ok())
        conn.receive_data(lines[-1])
        ev = conn.next_event()
        if lines[-1].startswith(b"STLS"):
            assert ev == p.Stls()  # STLS after USER is allowed in AUTHORIZATION
            return
        assert isinstance(ev, p.InvalidCommand)
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Ok())
        conn.send(p.Err(ev.reason))
        assert conn.state is p.State.AUTHORIZATION

    def test_hardening_17_user_after_login_and_auth_after_login(self) -> None:
        conn = logged_in_server()
        for line in (b"USER x\r\n", b"AUTH PLAIN\r\n", b"APOP a b\r\n", b"STLS\r\n"):
            conn.receive_data(line)
            ev = conn.next_event()
            assert isinstance(ev, p.InvalidCommand), line
            conn.send(p.Err(ev.reason))
        assert conn.state is p.State.TRANSACTION

    def test_checklist_12_pass_only_directly_after_successful_user(self) -> None:
        conn = server()
        conn.receive_data(b"USER u\r\n")
        conn.next_event()
        conn.send(p.Err("no"))
        conn.receive_data(b"PASS x\r\n")
        assert isinstance(conn.next_event(), p.InvalidCommand)

    def test_hardening_14_line_ends(self) -> None:
        conn = server()
        conn.receive_data(b"CAPA\n")
        assert conn.next_event() == p.Capa()
        conn.send(p.Err("x"))
        conn.receive_data(b"CAPA\r\r\n")
        assert isinstance(conn.next_event(), p.InvalidCommand)
        conn.send(p.Err("x"))
        conn.receive_data(b"CA\rPA\r\n")
        assert isinstance(conn.next_event(), p.InvalidCommand)
        conn.send(p.Err("x"))
        conn2 = server()
        conn2.receive_data(b"USER a\x00b\r\n")
        assert isinstance(conn2.next_event(), p.InvalidCommand)

    def test_hardening_13_255_octet_command_accepted(self) -> None:
        conn = server()
        line = b"USER " + b"u" * 248 + b"\r\n"
        assert len(line) == 255
        conn.receive_data(line)
        assert conn.next_event() == p.User("u" * 248)

    def test_hardening_13_overlong_line_named_limit(self) -> None:
        conn = server(limits=p.Limits(max_line=1024))
        with pytest.raises(p.LimitExceeded) as info:
            for _ in range(100):
                conn.receive_data(b"x" * 100)
                conn.next_event()
        assert "max_line" in info.value.error_text
        assert len(conn.trailing_data[0]) <= 1200

    def test_auth_line_may_use_sasl_limit(self) -> None:
        conn = server(limits=p.Limits(max_line=512))
        token = base64.b64encode(b"n,,\x01auth=Bearer " + b"t" * 3000 + b"\x01\x01")
        conn.receive_data(b"AUTH OAUTHBEARER " + token + b"\r\n")
        ev = conn.next_event()
        assert isinstance(ev, p.Auth) and ev.initial_response is not None

    def test_hardening_18_bad_commands_disconnect(self) -> None:
        conn = server()
        for _ in range(3):
            conn.receive_data(b"BOGUS\r\n")
            ev = conn.next_event()
            assert isinstance(ev, p.InvalidCommand)
            conn.send(p.Err(ev.reason))
        conn.receive_data(b"BOGUS\r\n")
        with pytest.raises(p.LimitExceeded):
            conn.next_event()
        conn2 = logged_in_server()
        for _ in range(20):
            conn2.receive_data(b"BOGUS\r\n")
            conn2.send(p.Err(conn2.next_event().reason))  # type: ignore[union-attr]
        conn2.receive_data(b"BOGUS\r\n")
        with pytest.raises(p.LimitExceeded):
            conn2.next_event()

    def test_hardening_20_nothing_echoed(self) -> None:
        conn = server()
        conn.receive_data(b"XYZZY\x1b]evil\r\n")
        ev = conn.next_event()
        assert isinstance(ev, p.InvalidCommand)
        assert "XYZZY" not in ev.reason and "evil" not in ev.reason
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Err("bad\r\n+OK forged"))

    def test_extension_commands_when_declared(self) -> None:
        conn = logged_in_server(extensions={"LAST": False, "*ENV": True})
        conn.receive_data(b"last\r\n")
        assert conn.next_event() == p.ExtensionCommand("LAST", (), False)
        assert conn.send(p.Ok("0")) == b"+OK 0\r\n"
        conn.receive_data(b"*ENV 1\r\n")
        assert conn.next_event() == p.ExtensionCommand("*ENV", ("1",), True)
        out = conn.send(p.MessageStart()) + conn.send(p.Data(b"a")) + conn.send(p.EndOfMessage())
        assert out == b"+OK\r\na\r\n.\r\n"

    def test_unknown_extension_refused_when_not_declared(self) -> None:
        conn = logged_in_server()
        conn.receive_data(b"LAST\r\n")
        assert isinstance(conn.next_event(), p.InvalidCommand)


class TestServerReplies:
    def test_checklist_11_greeting_with_timestamp(self) -> None:
        conn = p.Connection(p.SERVER)
        assert conn.send(p.Greeting("ready", "<1.2@host>")) == b"+OK ready <1.2@host>\r\n"
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Greeting("again"))

    def test_checklist_11_greeting_bad_timestamp_refused(self) -> None:
        conn = p.Connection(p.SERVER)
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Greeting("ready", "no-brackets"))

    def test_checklist_11_status_line_at_most_512(self) -> None:
        conn = logged_in_server()
        conn.receive_data(b"NOOP\r\n")
        conn.next_event()
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Ok("x" * 600))
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Ok("x" * 507))
        assert len(conn.send(p.Ok("x" * 506))) == 512

    def test_commands_handed_over_one_at_a_time(self) -> None:
        conn = logged_in_server()
        conn.receive_data(b"STAT\r\nNOOP\r\n")
        assert conn.next_event() == p.Stat()
        assert conn.next_event() is p.PAUSED
        conn.send(p.DropListing(0, 0))
        assert conn.next_event() == p.Noop()

    def test_reply_must_fit_command(self) -> None:
        conn = logged_in_server()
        conn.receive_data(b"RETR 1\r\n")
        conn.next_event()
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.ScanListings([]))
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Data(b"x"))
        conn.send(p.MessageStart())
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Ok())

    def test_checklist_02_sender_stuffs_and_terminates(self) -> None:
        conn = logged_in_server()
        conn.receive_data(b"RETR 1\r\n")
        conn.next_event()
        out = conn.send(p.MessageStart())
        for chunk in (b"Subject: x\n\n.", b"\n..hidden\r", b"\n.end"):
            out += conn.send(p.Data(chunk))
        out += conn.send(p.EndOfMessage())
        assert out == b"+OK\r\nSubject: x\r\n\r\n..\r\n...hidden\r\n..end\r\n.\r\n"

    def test_hardening_19_stored_messages_normalised(self) -> None:
        body = b".\r\n..\r\n.\rCR-only\rLF\nNUL\x00" + b"z" * 1_000_000
        conn = logged_in_server()
        conn.receive_data(b"RETR 1\r\n")
        conn.next_event()
        conn.send(p.MessageStart())
        wire = conn.send(p.Data(body)) + conn.send(p.EndOfMessage())
        client = logged_in_client()
        client.send(p.Retr(1))
        client.receive_data(b"+OK\r\n" + wire)
        events = drain(client)
        got = b"".join(e.data for e in events if isinstance(e, p.Data))
        assert got == b".\r\n..\r\n.\r\nCR-only\r\nLF\r\nNUL\x00" + b"z" * 1_000_000 + b"\r\n"
        assert p.wire_size([body]) == len(got) - 2  # the appended CRLF is framing

    def test_checklist_19_auth_exchange_server_side(self) -> None:
        conn = server()
        conn.receive_data(b"AUTH LOGIN\r\n")
        assert conn.next_event() == p.Auth("LOGIN")
        assert conn.send(p.AuthChallenge(b"Username:")) == b"+ VXNlcm5hbWU6\r\n"
        conn.receive_data(b"dGlt\r\n")
        assert conn.next_event() == p.AuthResponse(b"tim")
        assert conn.send(p.AuthChallenge(b"")) == b"+ \r\n"
        conn.receive_data(b"\r\n")
        assert conn.next_event() == p.AuthResponse(b"")
        conn.send(p.Ok())
        assert conn.state is p.State.TRANSACTION

    def test_checklist_19_cancel_and_bad_base64(self) -> None:
        conn = server()
        conn.receive_data(b"AUTH PLAIN\r\n")
        conn.next_event()
        conn.send(p.AuthChallenge(b""))
        conn.receive_data(b"*\r\n")
        assert conn.next_event() == p.AuthCancel()
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.Ok())
        conn.send(p.Err("cancelled"))
        conn.receive_data(b"AUTH PLAIN\r\n")
        conn.next_event()
        conn.send(p.AuthChallenge(b""))
        conn.receive_data(b"AAA=BBB\r\n")
        ev = conn.next_event()
        assert isinstance(ev, p.InvalidCommand)
        conn.send(p.Err(ev.reason))
        conn.receive_data(b"AUTH PLAIN !!!!\r\n")
        assert isinstance(conn.next_event(), p.InvalidCommand)

    def test_checklist_20_lines_after_auth_are_sasl_answers(self) -> None:
        conn = server()
        conn.receive_data(b"AUTH LOGIN\r\nQUIT\r\n")
        assert conn.next_event() == p.Auth("LOGIN")
        conn.send(p.AuthChallenge(b"Username:"))
        ev = conn.next_event()
        # "QUIT" here is the base64 answer b"Q\x12\x13", never the command.
        assert ev == p.AuthResponse(base64.b64decode(b"QUIT"))
        assert not conn.quit_received

    def test_checklist_18_stls_and_hardening_27_injection(self) -> None:
        conn = server()
        conn.receive_data(b"STLS\r\n")
        assert conn.next_event() == p.Stls()
        conn.send(p.Ok("Begin TLS"))
        assert conn.next_event() == p.StartTLS()
        assert conn.next_event() is p.PAUSED
        conn.tls_established()
        assert conn.tls_active and conn.state is p.State.AUTHORIZATION
        conn.receive_data(b"STLS\r\n")
        ev = conn.next_event()
        assert isinstance(ev, p.InvalidCommand)  # HARDENING 33: STLS twice

    @pytest.mark.parametrize("wire", [b"STLS\r\nCAPA\r\n", b"STLS\nCAPA\n"])
    def test_hardening_27_stls_injection_one_segment(self, wire: bytes) -> None:
        conn = server()
        conn.receive_data(wire)
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()

    def test_hardening_27_injection_after_ok_before_handshake(self) -> None:
        conn = server()
        conn.receive_data(b"STLS\r\n")
        conn.next_event()
        conn.send(p.Ok())
        conn.receive_data(b"CAPA\r\n")
        with pytest.raises(p.RemoteProtocolError):
            conn.next_event()

    def test_checklist_16_quit_in_transaction_enters_update(self) -> None:
        conn = logged_in_server()
        conn.receive_data(b"QUIT\r\n")
        assert conn.next_event() == p.Quit()
        assert conn.state is p.State.UPDATE and conn.quit_received
        conn.send(p.Ok())
        assert conn.state is p.State.CLOSED

    def test_checklist_16_eof_without_quit(self) -> None:
        conn = logged_in_server()
        conn.receive_data(b"DELE 1\r\n")
        conn.next_event()
        conn.send(p.Ok())
        conn.receive_data(b"")
        assert conn.next_event() == p.ConnectionClosed()
        assert not conn.quit_received

    def test_err_greeting(self) -> None:
        conn = p.Connection(p.SERVER)
        assert (
            conn.send(p.Err("busy", p.ResponseCode(("SYS", "TEMP")))) == b"-ERR [SYS/TEMP] busy\r\n"
        )
        assert conn.state is p.State.CLOSED

    def test_uid_validated_when_sent(self) -> None:
        conn = logged_in_server()
        conn.receive_data(b"UIDL\r\n")
        conn.next_event()
        with pytest.raises(p.LocalProtocolError):
            conn.send(p.UniqueIdListings([(1, "has space")]))


# ================================================================ both sides


class TestRoundTrip:
    def test_full_session_pair(self) -> None:
        pair = ConnectionPair()
        pair.greet(p.Greeting("hi", "<a.b@c>", p.ResponseCode(("X",))))
        pair.command(p.Capa())
        caps = p.Capabilities({"PIPELINING": (), "SASL": ("PLAIN",), "EXPIRE": ("NEVER",)})
        assert pair.reply(caps) == [caps]
        pair.command(p.Auth("PLAIN", b"\0u\0p"))
        assert pair.reply(p.AuthChallenge(b"")) == [p.AuthChallenge(b"")]
        pair.server.receive_data(pair.client.send(p.AuthResponse(b"")))
        assert pair.server.next_event() == p.AuthResponse(b"")
        assert pair.reply(p.Ok()) == [p.Ok()]
        for cmd, reply in (
            (p.Stat(), p.DropListing(3, 30)),
            (p.List(), p.ScanListings([(1, 10), (3, 20)])),
            (p.Uidl(1), p.UniqueIdListing(1, "x")),
            (p.Dele(2), p.Ok()),
            (p.Rset(), p.Ok()),
        ):
            pair.command(cmd)
            assert pair.reply(reply) == [reply]
        pair.command(p.Quit())
        assert pair.reply(p.Ok("bye")) == [p.Ok("bye")]
        assert pair.client.state is pair.server.state is p.State.CLOSED

    @HSETTINGS
    @given(body=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=6))
    def test_body_round_trip(self, body: bytes, cuts: list[int]) -> None:
        pair = ConnectionPair()
        pair.login()
        pair.command(p.Retr(1))
        wire = pair.server.send(p.MessageStart())
        bounds = [0, *sorted(cuts), len(body)]
        pieces = [body[a:b] for a, b in itertools.pairwise(bounds)]
        for piece in pieces:
            wire += pair.server.send(p.Data(piece))
        wire += pair.server.send(p.EndOfMessage())
        norm = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if norm and not norm.endswith(b"\r\n"):
            norm += b"\r\n"
        for _name, chunks in chunkings(wire, seed=len(body)):
            client = logged_in_client()
            client.send(p.Retr(1))
            events = feed(client, chunks)
            got = b"".join(e.data for e in events if isinstance(e, p.Data))
            assert got == norm
            assert events[0] == p.MessageStart() and events[-1] == p.EndOfMessage()
            assert p.wire_size([body]) == len(norm) - (
                0 if body.endswith((b"\n", b"\r")) or not body else 2
            )

    @HSETTINGS
    @given(body=st.binary(max_size=300), top=st.booleans())
    def test_whole_message_send_equals_three_sends(self, body: bytes, top: bool) -> None:
        """The server's one-call path for a message held whole gives the
        same octets and leaves the same state as MessageStart, Data,
        EndOfMessage sent one by one."""
        cmd = p.Top(1, 0) if top else p.Retr(1)
        wires = []
        for whole in (False, True):
            conn = logged_in_server()
            conn.receive_data(b"TOP 1 0\r\nNOOP\r\n" if top else b"RETR 1\r\nNOOP\r\n")
            assert conn.next_event() == cmd
            if whole:
                wire = conn.send_message(body)
            else:
                wire = conn.send(p.MessageStart("message follows"))
                wire += conn.send(p.Data(body)) + conn.send(p.EndOfMessage())
            wires.append(wire)
            # The reply is complete: the next command is read and answered.
            assert conn.next_event() == p.Noop()
            assert conn.send(p.Ok()) == b"+OK\r\n"
        assert wires[0] == wires[1]

    def test_send_message_text_and_buffers(self) -> None:
        conn = logged_in_server()
        conn.receive_data(b"RETR 1\r\nRETR 1\r\nRETR 1\r\n")
        assert conn.next_event() == p.Retr(1)
        # A text that cannot go in a status line: refused, nothing changes.
        with pytest.raises(p.LocalProtocolError):
            conn.send_message(b"x", "two\r\nlines")
        out = conn.send_message(memoryview(b".a\nb"), "120 octets")
        assert out == b"+OK 120 octets\r\n..a\r\nb\r\n.\r\n"
        assert conn.next_event() == p.Retr(1)
        assert conn.send_message(bytearray(b"")) == b"+OK message follows\r\n.\r\n"
        assert conn.next_event() == p.Retr(1)

    def test_whole_message_send_refused_when_no_message_is_due(self) -> None:
        conn = logged_in_server()
        with pytest.raises(p.LocalProtocolError):
            conn.send_message(b"x")  # no command at all
        conn.receive_data(b"STAT\r\nRETR 1\r\n")
        assert conn.next_event() == p.Stat()
        with pytest.raises(p.LocalProtocolError):
            conn.send_message(b"x")  # STAT wants a drop listing
        conn.send(p.DropListing(1, 1))
        assert conn.next_event() == p.Retr(1)
        conn.send(p.MessageStart())
        with pytest.raises(p.LocalProtocolError):
            conn.send_message(b"x")  # a body is already under way
        client = p.Connection(p.CLIENT)
        with pytest.raises(p.LocalProtocolError):
            client.send_message(b"x")

    @HSETTINGS
    @given(
        entries=st.lists(
            st.tuples(st.integers(1, 2**31 - 1), st.integers(0, 2**63 - 1)),
            max_size=20,
            unique_by=lambda e: e[0],
        )
    )
    def test_listing_round_trip(self, entries: list[tuple[int, int]]) -> None:
        pair = ConnectionPair()
        pair.login()
        pair.command(p.List())
        assert pair.reply(p.ScanListings(entries)) == [p.ScanListings(entries)]

    @HSETTINGS
    @given(
        uids=st.lists(
            st.text(
                alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                min_size=1,
                max_size=70,
            ),
            max_size=20,
            unique=True,
        )
    )
    def test_uidl_round_trip(self, uids: list[str]) -> None:
        pair = ConnectionPair()
        pair.login()
        pair.command(p.Uidl())
        listing = p.UniqueIdListings(list(enumerate(uids, 1)))
        assert pair.reply(listing) == [listing]

    @HSETTINGS
    @given(
        name=st.text(
            alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
            min_size=1,
            max_size=40,
        ).filter(lambda s: not any(c.isspace() for c in s)),
        password=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=40),
    )
    def test_credentials_round_trip(self, name: str, password: str) -> None:
        pair = ConnectionPair()
        pair.greet()
        pair.command(p.User(name))
        pair.reply(p.Ok())
        pair.server.receive_data(pair.client.send(p.Pass(password)))
        assert pair.server.next_event() == p.Pass(password)

    @HSETTINGS
    @given(
        text=st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=80)
        .map(str.strip)
        .filter(lambda t: not t.startswith("[")),
        ok=st.booleans(),
    )
    def test_status_text_round_trip(self, text: str, ok: bool) -> None:
        pair = ConnectionPair()
        pair.greet()
        pair.command(p.User("u"))
        reply = p.Ok(text) if ok else p.Err(text)
        if len(text.encode()) > 500:
            return
        assert pair.reply(reply) == [reply]


# ================================================================ fuzz


def _fuzz_inputs() -> list[bytes]:
    seeds = [
        b"+OK hi <1.2@x>\r\n+OK\r\n+OK\r\n+OK 2 30\r\n+OK\r\n1 10\r\n.\r\n",
        b"+OK\r\n+OK\r\nSubject: a\r\n..x\r\n.\r\n",
        b"USER a\r\nPASS b c\r\nSTAT\r\nLIST\r\nRETR 1\r\nTOP 1 2\r\nQUIT\r\n",
        b"AUTH PLAIN AHVzZXIAcGVuY2ls\r\nSTLS\r\nCAPA\r\n*\r\n",
    ]
    rng = random.Random(1939)
    out = list(seeds)
    for _ in range(150):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(data) + 1)
            if op < 0.4:
                data[pos:pos] = bytes([rng.choice(b".\r\n +-0123456789OKERR\x00\xff")])
            elif op < 0.7 and data:
                del data[pos : pos + rng.randint(1, 4)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        out.append(bytes(data))
    return out


def _drive(conn: p.Connection, chunks: list[bytes]) -> None:
    """Feed chunks, answering the server side's commands, as a binding would."""
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        for _ in range(10000):
            ev = conn.next_event()
            if ev is p.NEED_DATA or isinstance(ev, p.ConnectionClosed):
                break
            if ev is p.PAUSED:
                if conn.our_role is p.SERVER and conn.current_command is not None:
                    conn.send(p.Err("no"))
                    continue
                break
            if conn.our_role is p.SERVER:
                if isinstance(ev, p.StartTLS):
                    conn.tls_established()
                elif isinstance(ev, p.Command):
                    if isinstance(ev, p.Auth) and ev.mechanism:
                        conn.send(p.AuthChallenge(b""))
                    else:
                        conn.send(p.Err("no"))
            elif isinstance(ev, p.StartTLS):
                conn.tls_established()
        else:
            raise AssertionError("engine did not make progress")


def test_fuzz_only_events_or_remote_errors() -> None:
    for i, data in enumerate(_fuzz_inputs()):
        for role in (p.CLIENT, p.SERVER):
            for _name, chunks in chunkings(data, seed=i):
                conn = p.Connection(role, pipelining=True)
                if role is p.SERVER:
                    conn.send(p.Greeting("hi"))
                else:
                    # a client with a few commands outstanding
                    conn.receive_data(b"+OK hi\r\n")
                    conn.next_event()
                    for cmd in (p.User("u"), p.Pass("p"), p.Stat(), p.List(), p.Retr(1)):
                        conn.send(cmd)
                try:
                    _drive(conn, chunks)
                except p.RemoteProtocolError:
                    assert conn.state is p.State.ERROR


@HSETTINGS
@given(data=st.binary(max_size=200), role=st.sampled_from([p.CLIENT, p.SERVER]))
def test_fuzz_random_bytes(data: bytes, role: p.Role) -> None:
    conn = p.Connection(role, pipelining=True)
    if role is p.SERVER:
        conn.send(p.Greeting("hi"))
    try:
        _drive(conn, [data[i : i + 7] for i in range(0, len(data), 7)])
    except p.RemoteProtocolError:
        assert conn.state is p.State.ERROR
