"""Server-side session rules: Mailbox, TopFilter, wire_size."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pop3proto as p

pytestmark = pytest.mark.usefixtures("backend")
HSET = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def box() -> p.Mailbox:
    return p.Mailbox([(10, "a"), (20, "b"), (30, "c")])


def test_checklist_14_numbering_fixed_and_deleted_hidden() -> None:
    mb = box()
    assert mb.handle(p.Stat()) == p.DropListing(3, 60)
    assert mb.handle(p.Dele(2)) == p.Ok("message 2 deleted")
    assert mb.handle(p.Stat()) == p.DropListing(2, 40)
    assert mb.handle(p.List()) == p.ScanListings([(1, 10), (3, 30)])
    assert mb.handle(p.Uidl()) == p.UniqueIdListings([(1, "a"), (3, "c")])
    assert mb.handle(p.List(3)) == p.ScanListing(3, 30)
    for cmd in (p.List(2), p.Uidl(2), p.Retr(2), p.Top(2, 0), p.Dele(2), p.Retr(0), p.Retr(4)):
        assert isinstance(mb.handle(cmd), p.Err), cmd
    assert mb.handle(p.Rset()) == p.Ok("maildrop has 3 messages (60 octets)")
    assert mb.handle(p.List(2)) == p.ScanListing(2, 20)


def test_checklist_16_update_only_lists_marked() -> None:
    mb = box()
    mb.handle(p.Dele(3))
    mb.handle(p.Dele(1))
    assert mb.handle(p.Quit()) == p.Update((0, 2))
    assert isinstance(p.Mailbox.quit_reply(False), p.Err)
    assert p.Mailbox([]).handle(p.Quit()) == p.Update(())


def test_retrieve_and_top_actions() -> None:
    mb = box()
    assert mb.handle(p.Retr(2)) == p.Retrieve(1, 2, None)
    assert mb.handle(p.Top(3, 5)) == p.Retrieve(2, 3, 5)
    assert mb.handle(p.Noop()) == p.Ok()


def test_checklist_15_uids_validated() -> None:
    with pytest.raises(ValueError):
        p.Mailbox([(1, "has space")])
    with pytest.raises(ValueError):
        p.Mailbox([(1, "x" * 71)])


def top(msg: bytes, n: int, step: int) -> bytes:
    f = p.TopFilter(n)
    out = []
    for i in range(0, len(msg), step):
        out.append(f.feed(msg[i : i + step]))
        if f.done:
            break
    return b"".join(out)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_checklist_15_top_cutting(step: int) -> None:
    msg = b"A: 1\nB: 2\n\nl1\nl2\nl3\n"
    assert top(msg, 0, step) == b"A: 1\r\nB: 2\r\n\r\n"
    assert top(msg, 2, step) == b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n"
    assert top(msg, 99, step) == b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"
    assert top(b"\r\nbody\r\n", 0, step) == b"\r\n"
    assert top(b"H: only headers", 3, step) == b"H: only headers"


@HSET
@given(body=st.binary(max_size=300), step=st.integers(1, 50))
def test_wire_size_matches_sent_content(body: bytes, step: int) -> None:
    norm = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    assert p.wire_size(body[i : i + step] for i in range(0, len(body), step)) == len(norm)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=80) | st.text(max_size=80))
def test_unique_ids_are_1_to_70_octets_of_0x21_to_0x7e(uid: bytes | str) -> None:
    """RFC 1939 §7 and HARDENING 7, checked octet by octet: a text UID with
    anything outside ASCII is refused, never approximated."""
    from pop3proto._wire import check_uid

    raw = uid.encode("utf-8") if isinstance(uid, str) else uid
    valid = 1 <= len(raw) <= 70 and all(0x21 <= b <= 0x7E for b in raw)
    if valid:
        assert check_uid(uid) == raw
        p.Mailbox([(1, raw.decode("ascii"))])
    else:
        with pytest.raises(ValueError):
            check_uid(uid)
