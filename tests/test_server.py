"""The server session driver (``serve_session``), run without any I/O."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

import pop3proto as p
from pop3proto import _requests as rq
from pop3proto._auth import FailureDelay, PasswordTable
from pop3proto._sasl import apop_digest, client_mechanism

pytestmark = pytest.mark.usefixtures("backend")


class Harness:
    """Drives ``serve_session`` with an in-memory maildrop and clock, and
    parses what it sends with a client engine."""

    def __init__(
        self,
        config: p.ServerConfig | None = None,
        *,
        mail: dict[str, list[bytes]] | None = None,
        tls: bool = False,
        loopback: bool = False,
        peer: str = "192.0.2.1",
        locked: tuple[str, ...] = (),
        commit_ok: bool = True,
        whole: bool = False,
    ) -> None:
        self.config = config or p.ServerConfig(
            authenticator=PasswordTable({"alice": "secret", "bob": "hunter2"}),
            failure_delay=FailureDelay(base=0.0),
            stls_available=True,
            allow_plaintext=True,
        )
        self.mail = (
            mail if mail is not None else {"alice": [b"Subject: 1\n\nbody one\n", b".\n..\nx"]}
        )
        self.locked = set(locked)
        self.commit_ok = commit_ok
        # Messages handed over in one piece (as a maildrop's read_small) or in
        # 7-octet chunks.
        self.whole = whole
        self.now = 0.0
        self.sleeps: list[float] = []
        self.commits: list[tuple[int, ...]] = []
        self.opened: list[int] = []
        self.timeouts: list[float | None] = []
        self.sent = bytearray()
        self.sends = 0
        self.summary: p.SessionSummary | None = None
        self.user: str | None = None
        self.gen = p.serve_session(
            self.config,
            peer=peer,
            loopback=loopback,
            tls_info=p.TLSInfo() if tls else None,
            clock=lambda: self.now,
        )
        self.client = p.Connection(p.CLIENT, pipelining=True)
        self._run(None)

    @property
    def done(self) -> bool:
        return self.summary is not None

    def _chunks(self, data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 7):
            yield data[i : i + 7]

    def _run(self, value: Any) -> None:
        while True:
            try:
                req = self.gen.send(value)
            except StopIteration as stop:
                self.summary = stop.value
                return
            value = None
            if isinstance(req, rq.Send):
                self.sent += req.data
                self.sends += 1
            elif isinstance(req, rq.Receive):
                self.timeouts.append(req.timeout)
                return
            elif isinstance(req, rq.Sleep):
                self.sleeps.append(req.seconds)
                self.now += req.seconds
            elif isinstance(req, rq.OpenMaildrop):
                if req.user in self.locked:
                    value = p.MaildropFailure(in_use=True)
                elif req.user not in self.mail:
                    value = p.MaildropFailure()
                else:
                    self.user = req.user
                    value = [
                        (p.wire_size([m]), hashlib.sha1(m).hexdigest()) for m in self.mail[req.user]
                    ]
            elif isinstance(req, rq.OpenMessage):
                self.opened.append(req.index)
                assert self.user is not None
                data = self.mail[self.user][req.index]
                value = (data,) if self.whole else self._chunks(data)
            elif isinstance(req, rq.Commit):
                self.commits.append(req.indexes)
                value = self.commit_ok
            elif isinstance(req, rq.StartTLS):
                value = p.TLSInfo()
            else:  # pragma: no cover
                raise AssertionError(req)

    def feed(self, data: bytes) -> list[p.Event]:
        """Client bytes in; the client engine's view of the replies out."""
        self._run(data)
        return self.events()

    def events(self) -> list[p.Event]:
        out = bytes(self.sent)
        self.sent.clear()
        if out:
            self.client.receive_data(out)
        events: list[p.Event] = []
        while True:
            ev = self.client.next_event()
            if ev is p.NEED_DATA or ev is p.PAUSED:
                return events
            events.append(ev)  # type: ignore[arg-type]

    def command(self, cmd: p.Command) -> list[p.Event]:
        return self.feed(self.client.send(cmd))

    def login(self, user: str = "alice", password: str = "secret") -> None:
        assert isinstance(self.events()[0], p.Greeting)
        assert self.command(p.User(user)) == [p.Ok("send PASS")]
        [reply] = self.command(p.Pass(password))
        assert isinstance(reply, p.Ok), reply


def random_messages(seed: int, octets: bytes, *, count: int, longest: int) -> list[bytes]:
    """``count`` messages of up to ``longest`` octets drawn from ``octets``."""
    rng = random.Random(seed)
    return [bytes(rng.choice(octets) for _ in range(rng.randrange(longest))) for _ in range(count)]


def body(events: list[p.Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, p.Data))


def test_greeting_and_capabilities() -> None:
    h = Harness()
    [greeting] = h.events()
    assert isinstance(greeting, p.Greeting) and greeting.timestamp is None  # HARDENING 40
    [caps] = h.command(p.Capa())
    assert isinstance(caps, p.Capabilities)
    for tag in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER", "STLS"):
        assert tag in caps
    assert "SCRAM-SHA-256" in caps.sasl and "PLAIN" in caps.sasl


def test_checklist_17_capa_after_login_keeps_sasl_drops_stls() -> None:
    h = Harness()
    h.login()
    [caps] = h.command(p.Capa())
    assert isinstance(caps, p.Capabilities)
    assert "STLS" not in caps and caps.sasl
    assert "TOP" in caps and "UIDL" in caps


def test_transaction_rules_and_update_after_quit() -> None:
    h = Harness(mail={"alice": [b"a\n", b"bb\n", b"ccc\n"]})
    h.login()
    assert h.command(p.Stat()) == [p.DropListing(3, 3 + 4 + 5)]
    assert h.command(p.Dele(2)) == [p.Ok("message 2 deleted")]
    assert h.command(p.Stat()) == [p.DropListing(2, 8)]
    assert h.command(p.List()) == [p.ScanListings([(1, 3), (3, 5)])]
    [err] = h.command(p.Retr(2))
    assert isinstance(err, p.Err)  # HARDENING 16
    assert isinstance(h.command(p.Dele(2))[0], p.Err)
    h.command(p.Rset())
    assert h.command(p.Stat()) == [p.DropListing(3, 12)]
    h.command(p.Dele(1))
    h.command(p.Dele(3))
    assert h.commits == []
    assert h.command(p.Quit()) == [p.Ok("bye")]
    assert h.commits == [(0, 2)]
    assert h.done and h.summary is not None and h.summary.quit


def test_retr_and_top_stream_stuffed_crlf() -> None:
    msg = b"From: a\nSubject: x\n\n.line one\nline two\nline three"
    h = Harness(mail={"alice": [msg]})
    h.login()
    events = h.command(p.Retr(1))
    assert body(events) == b"From: a\r\nSubject: x\r\n\r\n.line one\r\nline two\r\nline three\r\n"
    events = h.command(p.Top(1, 1))
    assert body(events) == b"From: a\r\nSubject: x\r\n\r\n.line one\r\n"
    events = h.command(p.Top(1, 0))
    assert body(events) == b"From: a\r\nSubject: x\r\n\r\n"
    events = h.command(p.Top(1, 99))
    assert body(events).endswith(b"line three\r\n")


def test_quit_without_deletions_still_commits_to_release_the_lock() -> None:
    h = Harness()
    h.login()
    h.command(p.Stat())
    assert h.commits == []
    assert h.command(p.Quit()) == [p.Ok("bye")]
    assert h.commits == [()]  # UPDATE with nothing to remove: the lock goes before +OK
    assert h.summary is not None and h.summary.quit and h.summary.deleted == 0


@pytest.mark.parametrize("end", ["eof", "timeout"])
def test_hardening_51_no_deletion_without_quit(end: str) -> None:
    h = Harness()
    h.login()
    h.command(p.Dele(1))
    if end == "eof":
        h.feed(b"")
    else:
        h._run(p.TIMED_OUT)
    assert h.done and h.commits == []
    assert h.summary is not None and not h.summary.quit and h.summary.ended == end


def test_checklist_21_hardening_52_failed_removal_answers_sys_temp() -> None:
    h = Harness(commit_ok=False)
    h.login()
    h.command(p.Dele(1))
    [reply] = h.command(p.Quit())
    assert isinstance(reply, p.Err) and reply.code == p.ResponseCode(("SYS", "TEMP"))


def test_checklist_13_hardening_54_second_session_gets_in_use() -> None:
    h = Harness(locked=("alice",))
    h.events()
    h.command(p.User("alice"))
    [reply] = h.command(p.Pass("secret"))
    assert isinstance(reply, p.Err) and reply.code == p.ResponseCode(("IN-USE",))
    assert h.client.state is p.State.AUTHORIZATION


def test_hardening_36_38_same_reply_and_growing_delay() -> None:
    config = p.ServerConfig(
        authenticator=PasswordTable({"alice": "secret"}),
        failure_delay=FailureDelay(base=2.0, maximum=15.0),
        allow_plaintext=True,
    )
    h = Harness(config)
    h.events()
    replies = []
    for user in ("nobody", "alice", "alice"):
        h.command(p.User(user))
        replies.extend(h.command(p.Pass("wrong")))
    assert replies[0] == replies[1] == replies[2]
    assert isinstance(replies[0], p.Err) and replies[0].code == p.ResponseCode(("AUTH",))
    assert h.sleeps == [2.0, 4.0, 8.0]


def test_hardening_39_no_plaintext_login_without_tls() -> None:
    config = p.ServerConfig(authenticator=PasswordTable({"alice": "secret"}), stls_available=True)
    h = Harness(config)
    h.events()
    [caps] = h.command(p.Capa())
    assert isinstance(caps, p.Capabilities)
    assert "USER" not in caps and "PLAIN" not in caps.sasl and "STLS" in caps
    [reply] = h.command(p.User("alice"))
    assert isinstance(reply, p.Err) and reply.code == p.ResponseCode(("AUTH",))
    [reply] = h.command(p.Auth("PLAIN", b"\0alice\0secret"))
    assert isinstance(reply, p.Err)
    # after STLS the same login works
    [start] = h.command(p.Stls())
    assert start == p.StartTLS()
    h.client.tls_established()
    [caps] = h.command(p.Capa())
    assert isinstance(caps, p.Capabilities) and "USER" in caps and "STLS" not in caps
    assert h.command(p.User("alice")) == [p.Ok("send PASS")]
    assert isinstance(h.command(p.Pass("secret"))[0], p.Ok)


def test_loopback_allows_plaintext_by_default() -> None:
    config = p.ServerConfig(authenticator=PasswordTable({"alice": "secret"}))
    h = Harness(config, loopback=True)
    h.login()


def test_hardening_27_stls_injection_ends_session() -> None:
    h = Harness()
    h.events()
    h._run(b"STLS\r\nCAPA\r\n")
    assert h.done
    assert h.summary is not None and h.summary.ended == "protocol error"
    assert b"+OK" not in bytes(h.sent)


def test_hardening_33_stls_without_certificate_and_twice() -> None:
    config = p.ServerConfig(authenticator=PasswordTable({"a": "b"}), allow_plaintext=True)
    h = Harness(config)
    h.events()
    assert isinstance(h.command(p.Stls())[0], p.Err)
    h2 = Harness(tls=True)
    h2.events()
    assert isinstance(h2.command(p.Stls())[0], p.Err)
    assert not h2.done


def test_apop_when_enabled() -> None:
    config = p.ServerConfig(authenticator=PasswordTable({"alice": "secret"}), apop=True)
    h = Harness(config, tls=True)
    [greeting] = h.events()
    assert isinstance(greeting, p.Greeting) and greeting.timestamp is not None
    digest = apop_digest(greeting.timestamp.encode(), "secret")
    assert isinstance(h.command(p.Apop("alice", digest))[0], p.Ok)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_sasl_logins(mech: str) -> None:
    h = Harness(tls=True)
    h.events()
    client = client_mechanism(mech, user="alice", password="secret")
    events = h.command(p.Auth(mech, client.initial_response()))
    while events and isinstance(events[0], p.AuthChallenge):
        events = h.feed(h.client.send(p.AuthResponse(client.respond(events[0].data))))
    assert isinstance(events[0], p.Ok), events
    client.check_success()
    assert h.client.state is p.State.TRANSACTION


def test_sasl_cancel_and_unknown_mechanism() -> None:
    h = Harness(tls=True)
    h.events()
    assert isinstance(h.command(p.Auth("X-UNKNOWN"))[0], p.Err)
    [challenge] = h.command(p.Auth("LOGIN"))
    assert isinstance(challenge, p.AuthChallenge)
    [reply] = h.feed(h.client.send(p.AuthCancel()))
    assert isinstance(reply, p.Err)
    assert h.client.state is p.State.AUTHORIZATION


def test_hardening_18_bad_commands_then_disconnect() -> None:
    h = Harness()
    h.events()
    for _ in range(3):
        h._run(b"BOGUS\r\n")
    assert not h.done
    assert bytes(h.sent).count(b"-ERR") == 3
    h._run(b"BOGUS\r\n")
    assert h.done
    assert bytes(h.sent).count(b"-ERR") == 4
    assert bytes(h.sent).endswith(b"-ERR limit exceeded: max_bad_commands_before_login\r\n")


def test_hardening_44_login_deadline_counts_from_connect() -> None:
    h = Harness()
    h.events()
    assert h.timeouts[-1] == 180.0
    h.now = 100.0
    h._run(b"NO")
    assert h.timeouts[-1] == 80.0
    h.now = 179.0
    h._run(b"O")
    assert h.timeouts[-1] == pytest.approx(1.0)


def test_hardening_45_idle_timeout_after_login() -> None:
    h = Harness()
    h.login()
    assert h.timeouts[-1] == 600.0


def test_hardening_47_connections_capped_per_address() -> None:
    config = p.ServerConfig(
        authenticator=PasswordTable({"alice": "secret"}),
        limiter=p.ConnectionLimiter(per_address=2, per_user=1),
        allow_plaintext=True,
        failure_delay=FailureDelay(base=0.0),
    )
    first, second = Harness(config), Harness(config)
    third = Harness(config)
    assert third.done and isinstance(third.events()[0], p.Err)
    first.login()
    second.events()
    second.command(p.User("alice"))
    [reply] = second.command(p.Pass("secret"))
    assert isinstance(reply, p.Err) and reply.code == p.ResponseCode(("IN-USE",))
    first.command(p.Quit())
    assert config.limiter.sessions() == 1


def test_pipelined_commands_answered_in_one_write() -> None:
    h = Harness(mail={"alice": [b"x\n"] * 50})
    h.events()
    before = h.sends
    wire = b"USER alice\r\nPASS secret\r\n" + b"".join(b"RETR %d\r\n" % i for i in range(1, 51))
    h._run(wire)
    assert h.sends - before <= 3
    h.client.send(p.User("alice"))
    h.client.send(p.Pass("secret"))
    for i in range(1, 51):
        h.client.send(p.Retr(i))
    events = h.events()
    assert sum(isinstance(e, p.EndOfMessage) for e in events) == 50


def test_lang_and_utf8() -> None:
    h = Harness()
    h.events()
    assert h.command(p.Lang()) == [p.LanguageListing([("en", "English")])]
    assert isinstance(h.command(p.Lang("fr"))[0], p.Err)
    assert h.command(p.Utf8()) == [p.Ok("UTF8 enabled")]


def test_whole_and_chunked_messages_put_the_same_octets_on_the_wire() -> None:
    """A message handed over in one piece takes the server's one-call path;
    in pieces, the general one. Byte for byte the same wire, for messages
    of every awkward shape (dots, bare CR and LF, no final line end)."""
    msgs = random_messages(11, b"a.\r\n\0", count=200, longest=60)
    msgs += [b"", b".", b"..", b".\r\n", b"\r\n.\r\n", b"x\r\n.", b"a\rb\nc\r\n"]
    wires = []
    for whole in (False, True):
        h = Harness(mail={"alice": msgs}, whole=whole)
        h.login()
        commands = b"".join(b"RETR %d\r\n" % i for i in range(1, len(msgs) + 1))
        h._run(commands + b"TOP 1 0\r\nQUIT\r\n")
        wires.append(bytes(h.sent))
        assert h.done
    assert wires[0] == wires[1]
    assert wires[0].count(b"+OK message follows\r\n") == len(msgs) + 1


@pytest.mark.parametrize("whole", [False, True])
def test_checklist_21_outlook_no_nuls_filter(whole: bool) -> None:
    mail = {"alice": [b"a\0b\n"]}
    plain = Harness(mail=mail, whole=whole)
    plain.login()
    assert body(plain.command(p.Retr(1))) == b"a\0b\r\n"
    cfg = attrs.evolve(plain.config, outlook_no_nuls=True)
    h = Harness(cfg, mail=mail, whole=whole)
    h.login()
    assert body(h.command(p.Retr(1))) == b"a\x80b\r\n"
    assert h.command(p.List(1)) == [p.ScanListing(1, 5)]


EOH_CASES = [
    # stored message, what RETR sends with oe-ns-eoh (CRLF form, unstuffed)
    (b"Subject: a\n\nbody\n", b"Subject: a\r\n\r\nbody\r\n"),
    (b"Subject: b\n", b"Subject: b\r\n\r\n"),
    (b"Subject: c", b"Subject: c\r\n\r\n"),
    (b"", b"\r\n"),
    (b"X: y\r", b"X: y\r\n\r\n"),
    (b"\nbody only\n", b"\r\nbody only\r\n"),
    (b"A: 1\r\nB: 2\r\n\r\n", b"A: 1\r\nB: 2\r\n\r\n"),
    (b"A: 1\r\n.B\r\n", b"A: 1\r\n.B\r\n\r\n"),
]


@pytest.mark.parametrize("whole", [False, True])
def test_checklist_21_oe_ns_eoh_adds_the_missing_header_end(whole: bool) -> None:
    mail = {"alice": [m for m, _ in EOH_CASES]}
    plain = Harness(mail=mail, whole=whole)
    cfg = attrs.evolve(plain.config, oe_ns_eoh=True)
    h = Harness(cfg, mail=mail, whole=whole)
    h.login()
    plain.login()
    for i, (stored, expected) in enumerate(EOH_CASES, 1):
        got = body(h.command(p.Retr(i)))
        assert got == expected, stored
        # Only the empty line is added: without the workaround, the rest.
        before = body(plain.command(p.Retr(i)))
        assert got in (before, before + b"\r\n"), stored
        # LIST counts the added line (RFC 1939 §11 size: the message's
        # octets in CRLF form, without the CRLF ending an unended last line).
        unended = bool(stored) and stored[-1:] not in (b"\r", b"\n")
        [listing] = h.command(p.List(i))
        assert listing == p.ScanListing(i, len(got) - (2 if unended else 0)), stored
        # TOP keeps the whole header section of a message without a body.
        if b"\r\n\r\n" not in b"\r\n" + before:
            assert body(h.command(p.Top(i, 0))) == expected
    [stat] = h.command(p.Stat())
    [plain_stat] = plain.command(p.Stat())
    assert isinstance(stat, p.DropListing) and isinstance(plain_stat, p.DropListing)
    missing = sum(1 for m, e in EOH_CASES if len(e) > len(body_of(m)))
    assert stat.size == plain_stat.size + 2 * missing


def body_of(stored: bytes) -> bytes:
    """RETR's content for ``stored`` without any workaround."""
    h = Harness(mail={"alice": [stored]})
    h.login()
    return body(h.command(p.Retr(1)))


@pytest.mark.parametrize("whole", [False, True])
def test_oe_ns_eoh_listing_matches_what_retr_sends(whole: bool) -> None:
    """Property over many shapes: with the workaround on, every LIST size
    is what RETR then sends, and every message sent has a header end."""
    msgs = random_messages(7, b"ab.\r\n:", count=300, longest=40)
    cfg = attrs.evolve(Harness().config, oe_ns_eoh=True)
    h = Harness(cfg, mail={"alice": msgs}, whole=whole)
    h.login()
    [listing] = h.command(p.List())
    assert isinstance(listing, p.ScanListings)
    sizes = dict(listing.entries)
    for i, stored in enumerate(msgs, 1):
        got = body(h.command(p.Retr(i)))
        assert got.startswith(b"\r\n") or b"\r\n\r\n" in got, stored
        unended = bool(stored) and stored[-1:] not in (b"\r", b"\n")
        assert sizes[i] == len(got) - (2 if unended else 0), stored


def test_checklist_21_codes_and_legacy_auth_listing() -> None:
    h = Harness(tls=True)
    h.events()
    [listing] = h.command(p.Auth(""))
    assert isinstance(listing, p.MechanismListing) and "PLAIN" in listing.mechanisms
    [caps] = h.command(p.Capa())
    assert isinstance(caps, p.Capabilities) and caps.resp_codes and caps.auth_resp_code


def test_checklist_09_mechanisms_through_the_engine_reproduce_vectors() -> None:
    conn = p.Connection(p.CLIENT)
    conn.receive_data(b"+OK ready\r\n")
    conn.next_event()
    plain = client_mechanism("PLAIN", user="user", password="pencil")
    assert (
        conn.send(p.Auth("PLAIN", plain.initial_response())) == b"AUTH PLAIN AHVzZXIAcGVuY2ls\r\n"
    )
    conn.receive_data(b"-ERR no\r\n")
    conn.next_event()
    conn.send(p.Auth("CRAM-MD5"))
    conn.receive_data(b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n")
    challenge = conn.next_event()
    assert isinstance(challenge, p.AuthChallenge)
    cram = client_mechanism("CRAM-MD5", user="tim", password="tanstaaftanstaaf")
    answer = conn.send(p.AuthResponse(cram.respond(challenge.data)))
    assert answer == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n"
