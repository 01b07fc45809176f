"""Coverage-guided fuzzing of the compiled core, with the pure core as oracle.

Run through ``run.sh`` (it builds the extension with clang, AddressSanitizer,
UBSan and libFuzzer coverage, and preloads atheris' sanitizer runtime)::

    tests/fuzz/run.sh 60

An input is ``op, k, k cut positions (2 bytes each), body``. ``op`` picks the
function (bits 0-1: unstuff, stuff, LIST, UIDL), the vector level of the
search loops (bits 2-3), ``dots`` or ``at_line_start`` (bit 4) and whether the
body is also fed byte by byte (bit 5). The body is fed in the chunks the cut
positions make, carrying state and leftover bytes as the engine does; every
call's result must equal the pure core's. Each buffer handed to C is an exact
size allocation (so reading one byte past it is an ASan error, not a NUL).
"""

from __future__ import annotations

import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from build_asan import load_instrumented  # noqa: E402

SEEDS = {
    "unstuff": bytes([16 | 32, 1, 7, 0]) + b"a\r\n..b\r\n.\rc\r\n\r\r\n.\n\x00.\r\n.\r\n",
    "unstuff-long": bytes([16 | 8, 2, 70, 0, 130, 0]) + (b"x" * 63 + b"\n..y") * 3 + b"\r\n.\r\n",
    "stuff": bytes([1 | 16 | 32, 1, 3, 0]) + b".a\n.\r\rb\r\n..\n.",
    "list": bytes([2 | 32, 1, 5, 0]) + b"1 2\r\n 2\t30 octets\r\n9223372036854775807 1\n.\r\n",
    "uidl": bytes([3 | 16, 1, 9, 0]) + b"1 abc\r\n2 " + b"u" * 70 + b" \r\n3 x\x00\r\n.\r\n",
    # Long enough for the vector loops (64 positions a round), at each level.
    **{
        f"unstuff-simd{level}": bytes([level << 2 | 16, 2, 200, 0, 100, 3])
        + b"".join(b"%s line %d\r\n" % (b".." if i % 7 == 0 else b"", i) for i in range(150))
        + b".\r\n"
        for level in (0, 1, 2)
    },
    "stuff-long": bytes([1 | 16, 1, 0, 4]) + b".x\ny\r\rz\r\n" * 200,
}


def write_seeds(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, seed in SEEDS.items():
        with open(os.path.join(directory, f"seed-{name}"), "wb") as f:
            f.write(seed)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(sys.argv[2])
        sys.exit(0)
    _module = load_instrumented(os.environ["P3_FUZZ_MODULE"])

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: E402

from pop3proto import _ccore as ccore  # noqa: E402
from pop3proto import _purecore as pure  # noqa: E402
from pop3proto._cspeedups import ffi, lib  # noqa: E402


def exact(data: bytes) -> Any:
    """A buffer of exactly len(data) bytes (cffi puts the array at the end of
    its allocation), as a memoryview the wrapper accepts."""
    cdata = ffi.new("char[]", max(len(data), 1))
    ffi.memmove(cdata, data, len(data))
    return memoryview(ffi.buffer(cdata, len(data)))


def outcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except pure.ListingError as exc:
        return ("ListingError", exc.reason, exc.offset)
    except IndexError:
        return ("IndexError",)


def check_unstuff(pieces: list[bytes], at_line_start: bool) -> None:
    pending = b""
    state = {"pure": at_line_start, "c": at_line_start}
    for piece in pieces:
        pending += piece
        start = 1 if len(pending) > 1 and pending[0] == 0x78 else 0  # exercise start > 0
        expected = pure.unstuff(pending, start, len(pending), state["pure"])
        got = ccore.unstuff(exact(pending), start, len(pending), state["c"])
        if got != expected:
            raise AssertionError(f"unstuff {pending!r} {start}: {got!r} != {expected!r}")
        _data, stop, done, state["pure"] = expected
        state["c"] = got[3]
        pending = pending[stop:]
        if done:
            state = {"pure": True, "c": True}


def check_stuff(pieces: list[bytes], dots: bool) -> None:
    s_pure = s_c = pure.LINE_START
    for piece in pieces:
        expected = pure.stuff(piece, s_pure, dots)
        got = ccore.stuff(exact(piece), s_c, dots)
        if got != expected:
            raise AssertionError(f"stuff {piece!r}: {got!r} != {expected!r}")
        s_pure, s_c = expected[1], got[1]


def check_listing(pieces: list[bytes], numeric: bool, max_entries: int) -> None:
    pending = b""
    for piece in pieces:
        pending += piece
        expected = outcome(pure.parse_listing, pending, 0, len(pending), numeric, max_entries)
        got = outcome(ccore.parse_listing, exact(pending), 0, len(pending), numeric, max_entries)
        if got != expected:
            raise AssertionError(f"listing {pending!r}: {got!r} != {expected!r}")
        if expected[0] != "ok":
            return
        msgs, _values, stop, done = expected[1]
        max_entries -= len(msgs)
        pending = pending[stop:]
        if done:
            return


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(body[last:p])
        last = p
    pieces.append(body[last:])
    return pieces


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    op, k = data[0], data[1] % 9
    cuts = [int.from_bytes(data[2 + 2 * i : 4 + 2 * i], "little") for i in range(k)]
    body = data[2 + 2 * k :]
    lib.p3_simd_level(op >> 2 & 3)
    flag = bool(op & 16)
    chunkings = [split(body, cuts)]
    if op & 32:
        chunkings.append([body[i : i + 1] for i in range(len(body))])
    for pieces in chunkings:
        kind = op & 3
        if kind == 0:
            check_unstuff(pieces, flag)
        elif kind == 1:
            check_stuff(pieces, flag)
        else:
            check_listing(pieces, kind == 2, 3 if flag else 1_000_000)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
