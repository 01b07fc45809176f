"""Throughput of the hot loops: compiled core vs pure-Python core vs poplib.

All contenders run in one process on the same bytes: a synthetic mailbox
stream (RFC 5322-style messages of 2-100 KB, some lines starting with a dot,
stuffed as a server sends them, each body ending in ``.\\r\\n``) fed in
64 KiB chunks, and LIST/UIDL listings of 1,000,000 entries. Baselines:

* ``memcpy``: a C loop copying the same 64 KiB chunks (the ceiling);
* ``poplib``: the standard library's line-by-line un-stuffing (readline and
  ``startswith(b'..')``) over an in-memory file.

Run ``python benchmarks/bench_core.py [--mb 50] [--repeat 5]``. Prints a table
with ratios; never fails on a timing.
"""

from __future__ import annotations

import argparse
import importlib
import io
import random
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

from pop3proto import _purecore as pure

ccore: ModuleType | None
try:
    from pop3proto import _ccore as ccore
except ImportError as exc:  # pragma: no cover - depends on the build
    ccore = None
    CCORE_MISSING = str(exc)

CHUNK = 64 * 1024
MB = 1e6

_WORDS = (
    b"the of and to in is that for it as was with be by on not he this are or his from at "
    b"which but have an they you were her all she there would their we him been has when "
    b"who will more no if out so said what up its about into than them can only other new "
    b"some could time these two may then do first any my now such like our over man me even "
    b"most made after also did many before must through back years where much your way well"
).split()


def make_message(rng: random.Random, index: int, size: int, dot_rate: float) -> bytes:
    """One RFC 5322-style message of about ``size`` bytes, CRLF line ends;
    about ``dot_rate`` of its body lines start with a dot."""
    lines = [
        b"Return-Path: <sender%d@example.org>" % index,
        b"Received: from mx%d.example.org (mx.example.org [192.0.2.%d])" % (index % 7, index % 250),
        b"\tby pop.example.net with ESMTPS id %08x; Tue, 3 Mar 2026 10:%02d:00 +0000"
        % (index, index % 60),
        b"From: Sender %d <sender%d@example.org>" % (index, index),
        b"To: reader@example.net",
        b"Subject: Report number %d about things" % index,
        b"Date: Tue, 3 Mar 2026 10:%02d:00 +0000" % (index % 60),
        b"Message-ID: <%d.%x@example.org>" % (index, rng.getrandbits(48)),
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=utf-8",
        b"",
    ]
    total = sum(len(x) + 2 for x in lines)
    while total < size:
        r = rng.random()
        if r < dot_rate:
            # Lines a server must stuff: a lone dot, dot-leading text, "..".
            line = rng.choice([b".", b"..", b".signature follows", b"...and so on"])
        elif r < dot_rate + 0.04:
            line = b""
        elif r < dot_rate + 0.23:
            line = bytes(rng.getrandbits(8) % 64 + 48 for _ in range(76))  # base64-like
        else:
            line = b" ".join(rng.choices(_WORDS, k=rng.randint(6, 13)))
        lines.append(line)
        total += len(line) + 2
    return b"\r\n".join(lines) + b"\r\n"


def make_stream(
    target_bytes: int, dot_rate: float = 0.005, seed: int = 1939
) -> tuple[bytes, list[bytes], list[bytes]]:
    """The stuffed wire form of RETR bodies (without the +OK lines), the
    plain messages, and the wire form of each body."""
    rng = random.Random(seed)
    wire: list[bytes] = []
    plain: list[bytes] = []
    total = 0
    index = 0
    while total < target_bytes:
        index += 1
        msg = make_message(rng, index, rng.randint(2_000, 100_000), dot_rate)
        stuffed, state = pure.stuff(msg, pure.LINE_START)
        body = stuffed + pure.stuff_end(state)
        wire.append(body)
        plain.append(msg)
        total += len(body)
    return b"".join(wire), plain, wire


def chunked(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# -------------------------------------------------------------------- loops


def unstuff_loop(unstuff: Callable[..., Any], chunks: list[bytes]) -> tuple[int, int]:
    """Un-stuff a stream of bodies fed chunk by chunk: each chunk is passed as
    it came; undecided bytes at its end are presented again with the next.
    Returns (data bytes, messages)."""
    total = 0
    messages = 0
    at_line_start = True
    leftover = b""
    for chunk in chunks:
        buf = leftover + chunk if leftover else chunk
        start = 0
        end = len(buf)
        while start < end:
            data, stop, done, at_line_start = unstuff(buf, start, end, at_line_start)
            total += len(data)
            undecided = not done and stop < end
            start = stop
            if done:
                messages += 1
            elif undecided:
                break  # "." or ".\r" at the very end: wait for more bytes
        leftover = buf[start:]
    return total, messages


def poplib_loop(stream: bytes) -> tuple[int, int]:
    """poplib's _getlongresp and _getline, minus the socket: readline, strip
    the line end, drop the stuffing dot of lines starting with '..'."""
    maxline = 2048  # poplib._MAXLINE
    f = io.BytesIO(stream)

    def getline() -> tuple[bytes, int]:
        line = f.readline(maxline + 1)
        if len(line) > maxline:
            raise RuntimeError("line too long")
        if not line:
            raise EOFError
        octets = len(line)
        if line[-2:] == b"\r\n":
            return line[:-2], octets
        if line[:1] == b"\r":
            return line[1:-1], octets
        return line[:-1], octets

    total = 0
    messages = 0
    while True:
        try:
            line, o = getline()
        except EOFError:
            break
        lines: list[bytes] = []
        octets = 0
        while line != b".":
            if line.startswith(b".."):
                o = o - 1
                line = line[1:]
            octets = octets + o
            lines.append(line)
            line, o = getline()
        total += octets
        messages += 1
    return total, messages


def load_memcpy() -> Any:
    """A tiny cffi module copying chunks with memcpy (the ceiling)."""
    from cffi import FFI  # type: ignore[import-untyped,unused-ignore]

    ffi = FFI()
    ffi.cdef("uint64_t copy_chunks(const unsigned char *, size_t, size_t, unsigned char *);")
    ffi.set_source(
        "_bench_memcpy",
        """
        #include <string.h>
        #include <stdint.h>
        uint64_t copy_chunks(const unsigned char *src, size_t n, size_t chunk,
                             unsigned char *dst)
        {
            uint64_t sink = 0;
            size_t i;
            for (i = 0; i < n; i += chunk) {
                size_t k = n - i < chunk ? n - i : chunk;
                memcpy(dst, src + i, k);
                sink += dst[k - 1];  /* keep every copy observable */
            }
            return sink;
        }
        """,
        extra_compile_args=["-O2"],
    )
    tmp = tempfile.mkdtemp(prefix="bench_memcpy_")
    ffi.compile(tmpdir=tmp)
    sys.path.insert(0, tmp)
    try:
        return importlib.import_module("_bench_memcpy")
    finally:
        sys.path.remove(tmp)


# ------------------------------------------------------------ measurement


def interleaved(
    contenders: list[tuple[str, Callable[[], Any], int]],
) -> dict[str, tuple[float, Any]]:
    """Best time and result of each contender, run in round-robin rounds (a
    contender runs in the first ``repeats`` rounds), so that a load change on
    the machine hits every contender alike."""
    best: dict[str, tuple[float, Any]] = {}
    for round_ in range(max(r for _, _, r in contenders)):
        for name, fn, repeats in contenders:
            if round_ >= repeats:
                continue
            t0 = time.perf_counter()
            result = fn()
            t = time.perf_counter() - t0
            if name not in best or t < best[name][0]:
                best[name] = (t, result)
    return best


def make_listing(entries: int, numeric: bool, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    if numeric:
        lines = [b"%d %d\r\n" % (i, rng.randint(2_000, 100_000)) for i in range(1, entries + 1)]
    else:
        # Dovecot-style UIDs: 8 hex digits of UID plus 8 of UIDVALIDITY.
        lines = [b"%d %08x%08x\r\n" % (i, i, 0x5F3A9C21) for i in range(1, entries + 1)]
    return b"".join(lines) + b".\r\n"


def end_to_end(core_unstuff: Callable[..., Any], chunks: list[bytes], count: int) -> int:
    """RETR every message through Connection(CLIENT), pipelined (48 commands
    outstanding), with the given un-stuffing backend; ``chunks`` are the
    server's replies. Returns the body bytes delivered."""
    import pop3proto as p
    from pop3proto import _core

    saved = _core.unstuff
    _core.unstuff = core_unstuff
    try:
        conn = p.Connection(p.CLIENT, pipelining=True)
        conn.receive_data(b"+OK ready\r\n")
        conn.next_event()
        conn.send(p.User("reader"))
        conn.send(p.Pass("secret"))
        conn.receive_data(b"+OK\r\n+OK\r\n")
        while conn.next_event() is not p.NEED_DATA:
            pass
        window = min(48, p.Limits().max_pipeline - 1)
        sent = 0
        while sent < min(window, count):
            sent += 1
            conn.send(p.Retr(sent))
        total = 0
        done = 0
        for chunk in chunks:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is p.NEED_DATA:
                    break
                if isinstance(event, p.Data):
                    total += len(event.data)
                elif isinstance(event, p.EndOfMessage):
                    done += 1
                    if sent < count:
                        sent += 1
                        conn.send(p.Retr(sent))
        if done != count:
            raise RuntimeError(f"end-to-end run finished {done} of {count} messages")
        return total
    finally:
        _core.unstuff = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=50.0, help="size of the mailbox stream")
    ap.add_argument("--repeat", type=int, default=9, help="runs per contender (best is kept)")
    ap.add_argument(
        "--dot-rate", type=float, default=0.005, help="share of body lines starting with a dot"
    )
    ap.add_argument("--entries", type=int, default=1_000_000, help="LIST/UIDL entries")
    args = ap.parse_args(argv)

    stream, plain, bodies = make_stream(int(args.mb * MB), args.dot_rate)
    count = len(bodies)
    chunks = chunked(stream)
    expected = sum(len(m) for m in plain)
    n = len(stream)
    print(
        f"mailbox stream: {n / MB:.1f} MB, {count} messages, {len(chunks)} chunks of "
        f"{CHUNK // 1024} KiB, {100 * args.dot_rate:g}% of body lines dot-stuffed; "
        f"compiled core: {'yes' if ccore else 'no (' + CCORE_MISSING + ')'}"
    )
    try:
        import pop3proto

        has_connection = hasattr(pop3proto, "Connection")
    except ImportError:
        has_connection = False
    replies = b"".join(
        b"+OK %d octets\r\n" % len(msg) + body for msg, body in zip(plain, bodies, strict=True)
    )
    reply_chunks = chunked(replies)

    slow = max(1, args.repeat // 3)
    contenders: list[tuple[str, Callable[[], Any], int]] = []
    try:
        mod = load_memcpy()
        src = mod.ffi.from_buffer(stream)
        dst = mod.ffi.new("unsigned char[]", CHUNK)
        contenders.append(("memcpy", lambda: mod.lib.copy_chunks(src, n, CHUNK, dst), args.repeat))
    except Exception as exc:  # no compiler: the ceiling is just not shown
        print(f"memcpy baseline unavailable: {exc!r}")
    if ccore is not None:
        cu = ccore.unstuff
        contenders.append(("cffi", lambda: unstuff_loop(cu, chunks), args.repeat))
    contenders.append(("python", lambda: unstuff_loop(pure.unstuff, chunks), slow))
    contenders.append(("poplib", lambda: poplib_loop(stream), slow))
    if has_connection:
        if ccore is not None:
            contenders.append(
                ("e2e cffi", lambda: end_to_end(cu, reply_chunks, count), args.repeat)
            )
        contenders.append(
            ("e2e python", lambda: end_to_end(pure.unstuff, reply_chunks, count), slow)
        )
    else:
        print("pop3proto.Connection not available: end-to-end run skipped")
    best = interleaved(contenders)

    for name in ("cffi", "python", "poplib"):
        if name in best and best[name][1] != (expected, count):
            raise RuntimeError(f"{name}: got {best[name][1]}, expected {(expected, count)}")
    for name in ("e2e cffi", "e2e python"):
        if name in best and best[name][1] != expected:
            raise RuntimeError(f"{name}: {best[name][1]} bytes, expected {expected}")
    rate = {
        name: (len(replies) if name.startswith("e2e") else n) / t for name, (t, _) in best.items()
    }

    rows: list[tuple[str, float, str]] = []
    if "memcpy" in rate:
        rows.append(("memcpy (C, 64 KiB chunks)", rate["memcpy"], "ceiling"))
    if "cffi" in rate:
        note = f"{rate['cffi'] / rate['python']:.1f}x pure, "
        note += f"{rate['cffi'] / rate['poplib']:.1f}x poplib"
        if "memcpy" in rate:
            note += f", {100 * rate['cffi'] / rate['memcpy']:.0f}% of memcpy"
        rows.append(("unstuff, compiled (cffi)", rate["cffi"], note))
    rows.append(
        ("unstuff, pure Python", rate["python"], f"{rate['python'] / rate['poplib']:.1f}x poplib")
    )
    rows.append(("poplib line loop (BytesIO)", rate["poplib"], "baseline"))
    if "e2e cffi" in rate:
        note = f"{rate['e2e cffi'] / rate['e2e python']:.1f}x pure, "
        note += f"{rate['e2e cffi'] / rate['poplib']:.1f}x poplib"
        rows.append(("Connection(CLIENT) RETR, cffi", rate["e2e cffi"], note))
    if "e2e python" in rate:
        note = f"{rate['e2e python'] / rate['poplib']:.1f}x poplib"
        rows.append(("Connection(CLIENT) RETR, pure", rate["e2e python"], note))

    print()
    print(f"{'un-stuffing':<34} {'MB/s':>10}  ratio")
    for name, value, note in rows:
        print(f"{name:<34} {value / MB:>10.0f}  {note}")

    print()
    print(f"{'listing (' + format(args.entries, ',') + ' entries)':<34} {'seconds':>10}  ratio")
    for numeric, label in ((True, "LIST"), (False, "UIDL")):
        listing = make_listing(args.entries, numeric)
        size = len(listing)
        cap = args.entries
        runs: list[tuple[str, Callable[[], Any], int]] = [
            ("python", partial(pure.parse_listing, listing, 0, size, numeric, cap), slow)
        ]
        if ccore is not None:
            runs.append(
                ("cffi", partial(ccore.parse_listing, listing, 0, size, numeric, cap), args.repeat)
            )
        got = interleaved(runs)
        t_py, r_py = got["python"]
        if len(r_py[0]) != args.entries or not r_py[3]:
            raise RuntimeError(f"{label}: parsed {len(r_py[0])} entries")
        if "cffi" in got:
            t_c, r_c = got["cffi"]
            if r_c != r_py:
                raise RuntimeError(f"{label}: compiled and pure results differ")
            print(f"{label + ', compiled (cffi)':<34} {t_c:>10.3f}  {t_py / t_c:.1f}x pure")
        print(f"{label + ', pure Python':<34} {t_py:>10.3f}  baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
