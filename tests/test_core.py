"""The line and dot core (pop3proto._core) on both backends: the contract of
``unstuff``, ``stuff`` and ``parse_listing`` as the engine relies on it."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3proto import _core

pytestmark = pytest.mark.usefixtures("backend")
HSET = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def unstuff_all(chunks: list[bytes]) -> tuple[bytes, bool, bytes]:
    """Feed chunks as the engine does (leftover bytes re-presented)."""
    buf = bytearray()
    out = []
    line_start = True
    for chunk in chunks:
        buf += chunk
        data, stop, done, line_start = _core.unstuff(buf, 0, len(buf), line_start)
        out.append(data)
        del buf[:stop]
        if done:
            return b"".join(out), True, bytes(buf)
    return b"".join(out), False, bytes(buf)


def stuff_all(chunks: list[bytes]) -> bytes:
    state = _core.LINE_START
    out = []
    for chunk in chunks:
        data, state = _core.stuff(chunk, state)
        out.append(data)
    return b"".join(out) + _core.stuff_end(state)


@pytest.mark.parametrize(
    "wire,content",
    [
        (b".\r\n", b""),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...x\r\n.\r\n", b"..x\r\n"),
        (b"a\n.\n", b"a\n"),
        (b".a\r\n.\r\n", b"a\r\n"),
        (b"x.\r\n.y\r\n.\r\n", b"x.\r\ny\r\n"),
        (b"\r\r\n.\r\n", b"\r\r\n"),
    ],
)
def test_unstuff_vectors_at_every_split(wire: bytes, content: bytes) -> None:
    for cut in range(len(wire) + 1):
        got, done, rest = unstuff_all([wire[:cut], wire[cut:]])
        assert (got, done, rest) == (content, True, b"")
    assert unstuff_all([wire[i : i + 1] for i in range(len(wire))]) == (content, True, b"")


def test_unstuff_stops_at_terminator_and_leaves_the_rest() -> None:
    got, done, rest = unstuff_all([b"a\r\n.\r\n+OK next\r\n"])
    assert (got, done, rest) == (b"a\r\n", True, b"+OK next\r\n")


def test_unstuff_undecided_dot_is_kept_for_later() -> None:
    buf = bytearray(b"abc\r\n.")
    data, stop, done, line_start = _core.unstuff(buf, 0, len(buf), True)
    assert (data, stop, done, line_start) == (b"abc\r\n", 5, False, True)
    buf = bytearray(b"abc\r\n.\r")
    data, stop, done, line_start = _core.unstuff(buf, 0, len(buf), True)
    assert (data, stop, done) == (b"abc\r\n", 5, False)


def test_unstuff_respects_start_and_end() -> None:
    buf = b"XXXX..y\r\n.\r\nZZZ"
    data, stop, done, _ = _core.unstuff(buf, 4, len(buf) - 3, True)
    assert (data, stop, done) == (b".y\r\n", len(buf) - 3, True)


def test_stuff_sender_rules() -> None:
    assert stuff_all([b"Subject: x\r\n\r\n.\r\n..hidden\r\n.end"]) == (
        b"Subject: x\r\n\r\n..\r\n...hidden\r\n..end\r\n.\r\n"
    )
    assert stuff_all([b""]) == b".\r\n"
    assert stuff_all([b"a\n"]) == b"a\r\n.\r\n"
    assert stuff_all([b"a\r", b"\nb"]) == b"a\r\nb\r\n.\r\n"
    assert stuff_all([b"a\r", b"b"]) == b"a\r\nb\r\n.\r\n"
    assert stuff_all([b"a\n", b".b"]) == b"a\r\n..b\r\n.\r\n"


def test_hardening_24_worst_case_growth() -> None:
    data = b".\n" * 100_000
    out, _ = _core.stuff(data, _core.LINE_START)
    assert out == b"..\r\n" * 100_000


def test_crlf_size_without_dots() -> None:
    out, state = _core.stuff(b".a\nb\rc\r\n", _core.LINE_START, False)
    assert out == b".a\r\nb\r\nc\r\n"
    assert state & _core.LINE_START


@HSET
@given(body=st.binary(max_size=400), data=st.data())
def test_stuff_then_unstuff_round_trip(body: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=5)))
    bounds = [0, *cuts, len(body)]
    wire = stuff_all([body[a:b] for a, b in itertools.pairwise(bounds)])
    norm = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if norm and not norm.endswith(b"\n"):
        norm += b"\r\n"
    wcuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    wb = [0, *wcuts, len(wire)]
    got, done, rest = unstuff_all([wire[a:b] for a, b in itertools.pairwise(wb)])
    assert (got, done, rest) == (norm, True, b"")


def test_parse_listing_numeric_and_uids() -> None:
    buf = b"1 100\r\n2 200 junk\r\n.\r\nrest"
    msgs, values, stop, done = _core.parse_listing(buf, 0, len(buf), True, 10)
    assert (msgs, values, done) == ([1, 2], [100, 200], True)
    assert buf[stop:] == b"rest"
    buf = b"1 abc\n2 d~f \n"
    msgs, values, stop, done = _core.parse_listing(buf, 0, len(buf), False, 10)
    assert (msgs, values, stop, done) == ([1, 2], [b"abc", b"d~f"], len(buf), False)


def test_parse_listing_partial_line_not_consumed() -> None:
    buf = b"1 100\r\n2 2"
    msgs, _values, stop, done = _core.parse_listing(buf, 0, len(buf), True, 10)
    assert (msgs, stop, done) == ([1], 7, False)


@pytest.mark.parametrize(
    "line,numeric",
    [
        (b"x 1", True),
        (b"1", True),
        (b"1 -2", True),
        (b"1 2x", True),
        (b"0 1", True),
        (b"1 " + b"9" * 20, True),
        (b"1 a b", False),
        (b"1 " + b"u" * 71, False),
        (b"1 a\x00", False),
    ],
)
def test_parse_listing_rejects(line: bytes, numeric: bool) -> None:
    buf = b"1 1\r\n" + line + b"\r\n.\r\n"
    with pytest.raises(_core.ListingError) as info:
        _core.parse_listing(buf, 0, len(buf), numeric, 10)
    assert info.value.offset == 5


def test_parse_listing_entry_cap() -> None:
    buf = b"1 1\r\n2 2\r\n3 3\r\n.\r\n"
    with pytest.raises(_core.ListingError) as info:
        _core.parse_listing(buf, 0, len(buf), True, 2)
    assert info.value.reason == "too many listing entries"
    assert _core.parse_listing(buf, 0, len(buf), True, 3)[3] is True
