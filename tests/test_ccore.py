"""The compiled core against its pure-Python twin.

Every function of ``_ccore`` must give byte-identical results (and identical
``ListingError`` reasons and offsets) to ``_purecore`` on any input, however it
is chunked. Memory-safety cases from the hardening bank (compiled core):
split terminators, numbers at the very end of a buffer, worst-case growth,
embedded NULs, buffers resized between calls and calls from several threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3proto import _purecore as pure

try:
    from pop3proto import _ccore as ccore
except ImportError as exc:  # pragma: no cover - depends on the build
    pytest.skip(
        f"compiled core not built (import pop3proto._ccore failed: {exc}); "
        "build it with `pip install -e .` or `python setup.py build_ext --inplace`",
        allow_module_level=True,
    )

from pop3proto._cspeedups import lib as _lib

BACKENDS = (pure, ccore)
LINE_START = pure.LINE_START
SKIP_LF = pure.SKIP_LF

# The search loops exist in several vector widths (none, SSE2, AVX2), chosen
# by the CPU at run time; these tests run each one this machine has.
SIMD_LEVELS = sorted({_lib.p3_simd_level(level) for level in (0, 1, 2)})
_lib.p3_simd_level(2)


@pytest.fixture(params=SIMD_LEVELS, ids=lambda level: f"simd{level}")
def simd_level(request: pytest.FixtureRequest) -> Any:
    assert _lib.p3_simd_level(request.param) == request.param
    yield request.param
    _lib.p3_simd_level(2)


# --------------------------------------------------------------------------
# Drivers that use the functions the way the engine does.


def feed_unstuff(mod: Any, pieces: list[bytes], prefix: bytes = b"") -> list[tuple[Any, ...]]:
    """Feed pieces into a bytearray receive buffer; bytes left unconsumed are
    presented again with the next piece; consumed bytes are dropped (the
    buffer is compacted) after each call. Returns every call's result."""
    buf = bytearray(prefix)
    start = len(prefix)
    at_line_start = True
    calls: list[tuple[Any, ...]] = []
    for piece in pieces:
        buf += piece
        result = mod.unstuff(buf, start, len(buf), at_line_start)
        calls.append(result)
        _data, stop, done, at_line_start = result
        del buf[:stop]  # must not raise BufferError: the buffer was released
        start = 0
        if done:
            calls.append(("rest", bytes(buf)))
            break
    return calls


def feed_stuff(mod: Any, pieces: list[bytes], dots: bool) -> list[tuple[bytes, int]]:
    state = LINE_START
    calls = []
    for piece in pieces:
        out, state = mod.stuff(piece, state, dots)
        calls.append((out, state))
    return calls


def listing_outcome(
    mod: Any, buf: Any, start: int, end: int, numeric: bool, max_entries: int
) -> tuple[Any, ...]:
    try:
        return ("ok", *mod.parse_listing(buf, start, end, numeric, max_entries))
    except pure.ListingError as exc:
        return ("error", type(exc), exc.reason, exc.offset, str(exc))


def feed_listing(mod: Any, pieces: list[bytes], numeric: bool, max_entries: int) -> list[Any]:
    buf = bytearray()
    calls: list[Any] = []
    remaining = max_entries
    for piece in pieces:
        buf += piece
        outcome = listing_outcome(mod, buf, 0, len(buf), numeric, remaining)
        calls.append(outcome)
        if outcome[0] == "error":
            break
        _tag, msgs, _values, stop, done = outcome
        remaining -= len(msgs)
        del buf[:stop]
        if done:
            break
    return calls


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


# --------------------------------------------------------------------------
# Strategies.

_ATOMS = st.sampled_from(
    [
        b".",
        b"..",
        b"...",
        b"\r\n",
        b"\n",
        b"\r",
        b"\r\n.\r\n",
        b"\r\n..",
        b"\r\r\n",
        b"\n.\n",
        b".\r",
        b"\x00",
        b"\xff\xfe\x80",
        b"From: a@example.org",
        b"text ",
        b" ",
    ]
)
_LONG = st.builds(
    lambda n, c: c * n, st.integers(0, 5000), st.sampled_from([b"x", b".", b"\n", b"\r\n."])
)
bodies = st.lists(_ATOMS | st.binary(max_size=40) | _LONG, max_size=40).map(b"".join)
chunkings = st.lists(st.integers(0, 6000), max_size=12)

_UIDS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=72).map(str.encode)
_WS = st.sampled_from([b" ", b"\t", b"  ", b" \t"])
_NUMBER = st.one_of(
    st.integers(0, 1000),
    st.integers(0, pure.MAX_NUMBER),
    st.just(pure.MAX_NUMBER),
    st.just(pure.MAX_NUMBER + 1),
    st.just(10**19),
    st.just(10**20),
)


@st.composite
def listing_lines(draw: st.DrawFn, numeric: bool) -> bytes:
    lead = draw(st.sampled_from([b"", b" ", b"\t"]))
    msg = str(draw(_NUMBER)).encode()
    if draw(st.booleans()):
        msg = b"0" * draw(st.integers(1, 20)) + msg
    sep = draw(_WS | st.just(b""))
    if numeric:
        value = str(draw(_NUMBER)).encode()
        tail = draw(st.sampled_from([b"", b" octets", b"\t", b"x", b" \x00", b"\r"]))
    else:
        value = draw(_UIDS)
        tail = draw(st.sampled_from([b"", b" ", b"\t", b" x", b"\x00", b"\x7f", b"\r"]))
    end = draw(st.sampled_from([b"\r\n", b"\n"]))
    line = lead + msg + sep + value + tail
    if draw(st.integers(0, 9)) == 0:
        line = draw(st.binary(max_size=30))
    return line + end


@st.composite
def listings(draw: st.DrawFn, numeric: bool) -> bytes:
    lines = draw(st.lists(listing_lines(numeric), max_size=20))
    tail = draw(st.sampled_from([b".\r\n", b".\n", b"", b".", b". \r\n", b"..\r\n"]))
    return b"".join(lines) + tail + draw(st.sampled_from([b"", b"1 2\r\n", b"+OK\r\n"]))


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------
# Differential property tests.


@FAST
@given(body=bodies, cuts=chunkings, prefix=st.binary(max_size=5))
def test_unstuff_matches_pure_on_random_chunking(
    body: bytes, cuts: list[int], prefix: bytes
) -> None:
    pieces = split_at(body + b"\r\n.\r\n", cuts)
    expected = feed_unstuff(pure, pieces, prefix)
    assert feed_unstuff(ccore, pieces, prefix) == expected
    # The terminator is always found, so the stream ends as done.
    assert expected[-1][0] == "rest"


@FAST
@given(body=bodies, cuts=chunkings)
def test_unstuff_matches_pure_without_terminator(body: bytes, cuts: list[int]) -> None:
    pieces = split_at(body, cuts)
    assert feed_unstuff(ccore, pieces) == feed_unstuff(pure, pieces)


@FAST
@given(body=bodies, start=st.integers(0, 50), at_line_start=st.booleans(), data=st.data())
def test_unstuff_single_call_any_range(
    body: bytes, start: int, at_line_start: bool, data: st.DataObject
) -> None:
    end = data.draw(st.integers(0, len(body)))
    for buf in (body, bytearray(body), memoryview(body)):
        assert ccore.unstuff(buf, start, end, at_line_start) == pure.unstuff(
            body, start, end, at_line_start
        )


@FAST
@given(body=bodies, cuts=chunkings, dots=st.booleans())
def test_stuff_matches_pure_on_random_chunking(body: bytes, cuts: list[int], dots: bool) -> None:
    pieces = split_at(body, cuts)
    expected = feed_stuff(pure, pieces, dots)
    assert feed_stuff(ccore, pieces, dots) == expected
    # Round trip: the stuffed stream un-stuffs to the CRLF form of the content.
    if dots:
        state = expected[-1][1] if expected else LINE_START
        wire = b"".join(out for out, _ in expected) + pure.stuff_end(state)
        crlf = b"".join(out for out, _ in feed_stuff(ccore, pieces, False))
        if not state & LINE_START:
            crlf += b"\r\n"
        assert ccore.unstuff(wire, 0, len(wire), True) == (crlf, len(wire), True, True)


@FAST
@given(data=bodies, state=st.integers(0, 3) | st.integers(-(2**70), 2**70), dots=st.booleans())
def test_stuff_any_state_and_buffer_type(data: bytes, state: int, dots: bool) -> None:
    expected = pure.stuff(data, state, dots)
    for buf in (data, bytearray(data), memoryview(data)):
        out, new_state = ccore.stuff(buf, state, dots)
        assert (out, new_state) == expected
        assert type(out) is bytes


@pytest.mark.parametrize("numeric", [True, False])
@FAST
@given(data=st.data())
def test_parse_listing_matches_pure(numeric: bool, data: st.DataObject) -> None:
    listing = data.draw(listings(numeric))
    max_entries = data.draw(st.sampled_from([0, 1, 3, 10**6, 2**70]))
    start = data.draw(st.integers(0, len(listing)))
    end = data.draw(st.integers(start, len(listing)))
    for buf in (listing, bytearray(listing), memoryview(listing)):
        assert listing_outcome(ccore, buf, start, end, numeric, max_entries) == listing_outcome(
            pure, listing, start, end, numeric, max_entries
        )


@pytest.mark.parametrize("numeric", [True, False])
@FAST
@given(data=st.data())
def test_parse_listing_chunked_matches_pure(numeric: bool, data: st.DataObject) -> None:
    listing = data.draw(listings(numeric))
    pieces = split_at(listing, data.draw(chunkings))
    max_entries = data.draw(st.sampled_from([2, 5, 10**6]))
    assert feed_listing(ccore, pieces, numeric, max_entries) == feed_listing(
        pure, pieces, numeric, max_entries
    )


@pytest.mark.parametrize(
    ("listing", "numeric", "reason", "offset"),
    [
        (b"1 2\r\nx 3\r\n", True, "expected a decimal number", 5),
        (b"12345678901234567890 3\r\n", True, "number too long", 0),
        (b"1 9223372036854775808\r\n", True, "number too large", 0),
        (b"0 3\r\n", True, "message number 0", 0),
        (b"1\r\n", True, "expected a space after the message number", 0),
        (b"1 2x\r\n", True, "junk after the size", 0),
        (b"1 \r\n", False, "empty unique-id", 0),
        (b"1 " + b"u" * 71 + b"\r\n", False, "unique-id longer than 70 octets", 0),
        (b"1 ab\x00cd\r\n", False, "unique-id has an invalid octet", 0),
        (b"1 a\r\n2 b\r\n3 c\r\n", False, "too many listing entries", 10),
    ],
)
def test_listing_errors_have_the_same_reason_and_offset(
    listing: bytes, numeric: bool, reason: str, offset: int
) -> None:
    for mod in BACKENDS:
        with pytest.raises(pure.ListingError) as info:
            mod.parse_listing(listing, 0, len(listing), numeric, 2)
        assert (info.value.reason, info.value.offset, str(info.value)) == (reason, offset, reason)


def test_listing_limits_accepted_at_their_edges() -> None:
    uid = bytes(range(0x21, 0x21 + 70))
    listing = b"9223372036854775807 9223372036854775807 octets\r\n"
    for mod in BACKENDS:
        assert mod.parse_listing(listing, 0, len(listing), True, 1) == (
            [pure.MAX_NUMBER],
            [pure.MAX_NUMBER],
            len(listing),
            False,
        )
        line = b" 7\t " + uid + b" \t\r\n.\r\n"
        assert mod.parse_listing(line, 0, len(line), False, 1) == ([7], [uid], len(line), True)


# --------------------------------------------------------------------------
# Split terminators and one-byte feeds (hardening case 22).


@pytest.mark.parametrize("pattern", [b"\r\n.\r\n", b"\r\n..", b"\r\r\n", b"\n.\n", b"\r\n.\r"])
def test_dot_line_split_at_every_offset(pattern: bytes, simd_level: int) -> None:
    body = b"head" + pattern + b"tail\r\n..x\r\n.\r\n"
    for cut in range(len(body) + 1):
        pieces = [body[:cut], body[cut:]]
        assert feed_unstuff(ccore, pieces) == feed_unstuff(pure, pieces)
        assert feed_stuff(ccore, pieces, True) == feed_stuff(pure, pieces, True)
    for cut1 in range(len(body)):
        for cut2 in range(cut1, len(body)):
            pieces = [body[:cut1], body[cut1:cut2], body[cut2:]]
            assert feed_unstuff(ccore, pieces) == feed_unstuff(pure, pieces)


def test_one_byte_feeds_give_the_same_stream(simd_level: int) -> None:
    body = b"a\r\n..b\r\n.\rc\r\n\r\r\n..\r\n.\n\x00.\r\n.\r\n"
    pieces = [body[i : i + 1] for i in range(len(body))]
    calls = feed_unstuff(ccore, pieces)
    assert calls == feed_unstuff(pure, pieces)
    # A dot before anything but a line end is a stuffing dot (".\rc" too);
    # ".\n" ends the body (tolerated bare LF).
    assert b"".join(c[0] for c in calls if c[0] != "rest") == b"a\r\n.b\r\n\rc\r\n\r\r\n.\r\n"
    # Feeding stopped on the byte that completed the terminator.
    assert calls[-1] == ("rest", b"")
    assert len(calls) - 1 == body.index(b"\n.\n") + 3
    assert feed_stuff(ccore, pieces, True) == feed_stuff(pure, pieces, True)


@pytest.mark.parametrize(
    "pattern", [b"\n..x", b"\n.\r\n", b"\n.\n", b"\n.", b"\n.\r", b"\r\n", b"\n"]
)
def test_pattern_at_every_position_of_the_vector_blocks(pattern: bytes, simd_level: int) -> None:
    # The vector loops read 64 positions (and one byte more) per round: put
    # the pattern at every offset across three rounds, with the buffer ending
    # right after it, and after it with more bytes that must not be read.
    backing_tail = b".\r\n\n.."
    for pad in range(0, 200):
        wire = b"a" * pad + pattern
        backing = wire + backing_tail
        for buf in (wire, memoryview(backing)[: len(wire)], bytearray(wire)):
            for start in (0, 1):
                if start > len(wire):
                    continue
                for als in (True, False):
                    assert ccore.unstuff(buf, start, len(wire), als) == pure.unstuff(
                        wire, start, len(wire), als
                    )
        assert ccore.stuff(wire, 0) == pure.stuff(wire, 0)
        assert ccore.stuff(wire, LINE_START) == pure.stuff(wire, LINE_START)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, cuts=chunkings)
def test_every_vector_level_gives_the_same_stream(body: bytes, cuts: list[int]) -> None:
    pieces = split_at(body + b"\r\n.\r\n", cuts)
    expected = feed_unstuff(pure, pieces)
    expected_stuff = feed_stuff(pure, pieces, True)
    try:
        for level in SIMD_LEVELS:
            _lib.p3_simd_level(level)
            assert feed_unstuff(ccore, pieces) == expected
            assert feed_stuff(ccore, pieces, True) == expected_stuff
    finally:
        _lib.p3_simd_level(2)


@pytest.mark.parametrize("drops", [0, 1, 2, 8, 9, 500])
def test_any_number_of_stuffed_lines_in_one_buffer(drops: int) -> None:
    lines = [b"..dot %d" % i if i < drops else b"line %d" % i for i in range(max(drops, 3) + 5)]
    wire = b"\r\n".join(lines) + b"\r\n.\r\nnext"
    expected_data = b"\r\n".join(line[1:] if line[:2] == b".." else line for line in lines)
    for buf in (wire, bytearray(wire), memoryview(wire)):
        result = ccore.unstuff(buf, 0, len(wire), True)
        assert result == pure.unstuff(wire, 0, len(wire), True)
        assert result == (expected_data + b"\r\n", len(wire) - 4, True, True)
    grow = bytearray(wire)
    ccore.unstuff(grow, 0, len(grow), True)
    grow += b"x" * 100_000  # resizable: the call released the buffer


# --------------------------------------------------------------------------
# No read past the end of a buffer (hardening case 23).


def test_numbers_ending_at_buffer_end_are_not_extended() -> None:
    # The bytes after `end` are digits, a dot or a line end: reading them
    # would change the result.
    backing = b"1 123\n4567\r\n"
    for mod in BACKENDS:
        assert mod.parse_listing(backing, 0, 6, True, 10) == ([1], [123], 6, False)
        assert mod.parse_listing(memoryview(backing)[:6], 0, 6, True, 10) == ([1], [123], 6, False)
        # The line is incomplete at `end`: nothing is parsed.
        assert mod.parse_listing(memoryview(backing)[:5], 0, 5, True, 10) == ([], [], 0, False)
        assert mod.parse_listing(backing, 6, 10, True, 10) == ([], [], 6, False)
    exact = bytes(b"1 12345678901234567\r\n"[:21])
    for mod in BACKENDS:
        assert mod.parse_listing(exact, 0, len(exact), True, 10)[1] == [12345678901234567]


def test_undecided_dot_at_buffer_end_is_not_resolved_by_later_bytes(simd_level: int) -> None:
    backing = b"abc\r\n.\r\nMORE"
    for mod in BACKENDS:
        for end in (6, 7):
            view = memoryview(backing)[:end]
            assert mod.unstuff(view, 0, end, True) == (b"abc\r\n", 5, False, True)
            assert mod.unstuff(backing, 0, end, True) == (b"abc\r\n", 5, False, True)
        assert mod.unstuff(backing, 0, 8, True) == (b"abc\r\n", 8, True, True)
        # A CR at the end of a chunk is sent as CRLF; the LF after `end` is unseen.
        assert mod.stuff(memoryview(b"a\r\nb")[:2], LINE_START) == (b"a\r\n", SKIP_LF | LINE_START)


def test_out_of_range_indices_are_refused_by_both() -> None:
    for mod in BACKENDS:
        with pytest.raises(IndexError):
            mod.unstuff(b"abc", 0, 4, True)
        with pytest.raises(IndexError):
            mod.unstuff(b"abc", -1, 2, True)
        with pytest.raises(IndexError):
            mod.parse_listing(b"1 2\n", 0, 5, True, 10)
        # An empty range touches nothing.
        assert mod.unstuff(b"abc", 5, 5, False) == (b"", 5, False, False)
        assert mod.parse_listing(b"abc", 5, 5, True, 1) == ([], [], 5, False)


# --------------------------------------------------------------------------
# Worst-case growth and embedded NULs (hardening cases 24, 25).


@pytest.mark.parametrize("unit", [b".\r\n", b".\n", b".\r", b"\n", b"\r", b"."])
def test_stuffing_worst_case_growth(unit: bytes, simd_level: int) -> None:
    data = unit * 300_000
    out, state = ccore.stuff(data, LINE_START)
    assert (out, state) == pure.stuff(data, LINE_START)
    if unit in (b".\n", b".\r", b"\n", b"\r"):
        assert len(out) == 2 * len(data)
    # And back: every stuffed line loses its extra dot again.
    wire = out + pure.stuff_end(state)
    back = ccore.unstuff(wire, 0, len(wire), True)
    assert back == pure.unstuff(wire, 0, len(wire), True)
    assert back[2] is True


def test_unstuffing_all_dot_lines(simd_level: int) -> None:
    wire = b"..\r\n" * 200_000 + b".\r\n"
    data, stop, done, at_line_start = ccore.unstuff(wire, 0, len(wire), True)
    assert data == b".\r\n" * 200_000
    assert (stop, done, at_line_start) == (len(wire), True, True)


def test_embedded_nul_is_data() -> None:
    wire = b"a\x00b\r\n.\x00\r\n..\x00\r\n\x00.\r\n.\r\n"
    for mod in BACKENDS:
        assert mod.unstuff(wire, 0, len(wire), True) == (
            b"a\x00b\r\n\x00\r\n.\x00\r\n\x00.\r\n",
            len(wire),
            True,
            True,
        )
        assert mod.stuff(b"\x00\n.\x00", LINE_START) == (b"\x00\r\n..\x00", 0)
        listing = b"1 2\x00\r\n"
        with pytest.raises(pure.ListingError, match="junk after the size"):
            mod.parse_listing(listing, 0, len(listing), True, 10)


# --------------------------------------------------------------------------
# Buffers released, reference counts, threads (hardening case 26).


def test_bytearray_can_be_resized_after_every_call() -> None:
    buf = bytearray(b"1 2\r\nbad\r\n")
    with pytest.raises(pure.ListingError):
        ccore.parse_listing(buf, 0, len(buf), True, 10)
    buf += b"more"  # raises BufferError if the buffer were still exported
    ccore.unstuff(buf, 0, len(buf), True)
    del buf[:3]
    ccore.stuff(buf, LINE_START)
    buf.clear()
    with pytest.raises(IndexError):
        ccore.unstuff(buf, 0, 1, True)
    buf.extend(b"x")
    assert buf == b"x"


def test_reference_counts_are_balanced() -> None:
    body = bytearray(b"a\r\n..b\r\n" * 100 + b".\r\n")
    listing = bytearray(b"1 uid-a\r\n2 uid-b\r\n.\r\n")
    before = (sys.getrefcount(body), sys.getrefcount(listing))
    for _ in range(1000):
        ccore.unstuff(body, 0, len(body), True)
        ccore.stuff(body, LINE_START)
        ccore.parse_listing(listing, 0, len(listing), False, 10)
        with pytest.raises(pure.ListingError):
            ccore.parse_listing(body, 0, len(body), True, 10)
    assert (sys.getrefcount(body), sys.getrefcount(listing)) == before


def test_calls_from_several_threads_on_separate_buffers() -> None:
    def body(seed: int) -> bytes:
        lines = [(b"." * (i % 3)) + b"line %d of %d" % (i, seed) for i in range(2000)]
        return b"\r\n".join(lines) + b"\r\n.\r\n"

    def listing(seed: int) -> bytes:
        return b"".join(b"%d uid-%d-%d\r\n" % (i + 1, seed, i) for i in range(3000)) + b".\r\n"

    jobs: list[tuple[Callable[[], Any], Any]] = []
    for seed in range(8):
        b, lst = body(seed), listing(seed)
        pieces = split_at(b, list(range(0, len(b), 777 + seed)))
        jobs.append((partial(feed_unstuff, ccore, pieces), feed_unstuff(pure, pieces)))
        jobs.append((partial(feed_stuff, ccore, pieces, True), feed_stuff(pure, pieces, True)))
        jobs.append(
            (
                partial(ccore.parse_listing, bytearray(lst), 0, len(lst), False, 10**6),
                pure.parse_listing(lst, 0, len(lst), False, 10**6),
            )
        )
    failures: list[str] = []

    def run(job: Callable[[], Any], expected: Any) -> None:
        for _ in range(20):
            if job() != expected:
                failures.append("mismatch")
                return

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# --------------------------------------------------------------------------
# Backend selection.


def test_backend_is_cffi_when_compiled() -> None:
    from pop3proto import _core

    if os.environ.get("POP3PROTO_PUREPYTHON"):
        assert _core.BACKEND == "python"
    else:
        assert _core.BACKEND == "cffi"
        assert _core.unstuff is ccore.unstuff


def test_environment_variable_forces_the_pure_path() -> None:
    code = "from pop3proto import _core; print(_core.BACKEND, _core.unstuff.__module__)"
    env = dict(os.environ, POP3PROTO_PUREPYTHON="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["python", "pop3proto._purecore"]
