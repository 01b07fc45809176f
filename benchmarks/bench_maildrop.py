"""Opening a large Maildir: first session (sizes computed) and later sessions
(sizes from the index), against the floor of listing the directories.

HARDENING 50 asks that STAT stay fast on a maildrop of very many files. A
session has to list ``new/`` and ``cur/`` and stat every file whatever it
does; this measures how close to that floor a session with a warm index gets.

    python benchmarks/bench_maildrop.py [--messages 100000] [--dir DIR] [--keep]

The files are written just before the run, so the first open reads them from
the page cache: on a cold disk it is slower. Timings never fail anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from pop3proto.bindings.maildrop import INDEX_NAME, Maildir


def populate(box: str, count: int) -> int:
    """Write ``count`` LF-stored messages of 0.5 to 4 KB; return their bytes."""
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(box, sub), exist_ok=True)
    body = b"".join(b"line %d of a message body with some text in it\n" % i for i in range(80))
    total = 0
    start = 1_600_000_000
    for i in range(count):
        head = b"From: a@example.org\nSubject: message %d\n\n" % i
        data = head + body[: 500 + (i * 37) % 3500]
        # Half already seen by a mail reader (cur/, with flags), half new.
        if i % 2:
            path = os.path.join(box, "cur", f"{start + i}.M{i}P1.bench:2,S")
        else:
            path = os.path.join(box, "new", f"{start + i}.M{i}P1.bench")
        with open(path, "wb") as f:
            f.write(data)
        total += len(data)
    return total


def listing_floor(box: str) -> float:
    """Time to list both directories and stat each file: what any session
    must pay."""
    t0 = time.perf_counter()
    n = 0
    for sub in ("new", "cur"):
        with os.scandir(os.path.join(box, sub)) as it:
            for entry in it:
                entry.stat(follow_symlinks=False)
                n += 1
    return time.perf_counter() - t0


def open_once(drop: Maildir, user: str) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    with drop.open(user) as session:
        count = len(session.messages)
        size = sum(m.size for m in session.messages)
    return time.perf_counter() - t0, count, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--dir", help="work directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the Maildir afterwards")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    root = args.dir or tempfile.mkdtemp(prefix="bench-maildrop-")
    box = os.path.join(root, "bench")
    try:
        t0 = time.perf_counter()
        stored = populate(box, args.messages)
        t_write = time.perf_counter() - t0
        floor = min(listing_floor(box) for _ in range(3))
        drop = Maildir(root)
        cold, count, size = open_once(drop, "bench")
        warm_runs = [open_once(drop, "bench") for _ in range(3)]
        warm = min(t for t, _, _ in warm_runs)
        assert all(c == count and s == size for _, c, s in warm_runs)
        index_bytes = os.path.getsize(os.path.join(box, INDEX_NAME))
        result = {
            "messages": count,
            "stored_bytes": stored,
            "pop3_octets": size,
            "write_s": round(t_write, 3),
            "listing_floor_s": round(floor, 3),
            "first_open_s": round(cold, 3),
            "cached_open_s": round(warm, 3),
            "first_over_cached": round(cold / warm, 1),
            "cached_over_floor": round(warm / floor, 1),
            "index_bytes": index_bytes,
        }
        if args.json:
            print(json.dumps(result))
        else:
            print(f"maildir: {count} messages, {stored} bytes stored, STAT size {size}")
            print(f"  baseline  list + stat every file      {floor * 1000:9.1f} ms")
            print(
                f"  first open (reads every file)         {cold * 1000:9.1f} ms"
                f"  ({cold / floor:.1f}x baseline)"
            )
            print(
                f"  later opens (size index, {index_bytes // 1024} KiB)"
                f"{'':<{max(0, 8 - len(str(index_bytes // 1024)))}}"
                f"{warm * 1000:9.1f} ms  ({warm / floor:.1f}x baseline,"
                f" {cold / warm:.1f}x faster than the first)"
            )
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
