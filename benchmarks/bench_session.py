"""What one POP3 session costs the engine, without any I/O of the network.

    python benchmarks/bench_session.py [--sessions 2000] [--repeat 5]

Server: ``serve_session`` driven as a binding drives it, one command per
read, for the session the race's load client runs (USER, PASS, STAT, UIDL,
RETR 1..10 of 3 KB, QUIT), on an in-memory maildrop and on a Maildir in a
temporary directory (message files opened and read for real). Client:
``ClientSession.retrieve_many`` of ``--messages`` messages of 50 KB fed in
256 KiB reads. Each runs on the compiled core and on the pure-Python one in this
process; the table gives microseconds per session (and per command) and the
ratio of the two backends. Timings never fail anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pop3proto.bindings._common import MaildropRunner
from pop3proto.bindings.maildrop import Maildir, MemoryMaildrop

import pop3proto as p
from pop3proto import _core, _purecore
from pop3proto import _requests as rq
from pop3proto._auth import FailureDelay, PasswordTable
from pop3proto._client import ClientSession, DeliverMessage

MESSAGE = b"Subject: load test\r\nFrom: a@example.org\r\n\r\n" + b"line of text here\r\n" * 160
USER, PASSWORD = "load", "secret"
SCRIPT = [
    b"USER load\r\n",
    b"PASS secret\r\n",
    b"STAT\r\n",
    b"UIDL\r\n",
    *[b"RETR %d\r\n" % i for i in range(1, 11)],
    b"QUIT\r\n",
]


def use_backend(name: str) -> None:
    """Point the engine's hot loops at one core (as the test suite does)."""
    if name == "python":
        impl: Any = _purecore
    else:
        from pop3proto import _ccore as impl
    _core.unstuff, _core.stuff, _core.parse_listing = impl.unstuff, impl.stuff, impl.parse_listing


def server_session(config: p.ServerConfig, maildrop: Any) -> int:
    """One session through the engine; returns the octets it sent."""
    runner = MaildropRunner(maildrop)
    gen = p.serve_session(config, peer="127.0.0.1", loopback=True, clock=time.monotonic)
    lines = iter(SCRIPT)
    result: Any = None
    sent = 0
    try:
        while True:
            try:
                req = gen.send(result)
            except StopIteration:
                return sent
            result = None
            kind = type(req)
            if kind is rq.Send:
                sent += len(req.data)  # type: ignore[attr-defined]
            elif kind is rq.Receive:
                result = next(lines, b"")
            elif runner.handles(req):
                result = runner.run(req)
            elif kind is not rq.Sleep:
                raise TypeError(f"unexpected request {req!r}")
    finally:
        runner.close()


def make_config() -> p.ServerConfig:
    return p.ServerConfig(
        authenticator=PasswordTable({USER: PASSWORD}),
        failure_delay=FailureDelay(base=0.0),
        allow_plaintext=True,
    )


def memory_maildrop() -> MemoryMaildrop:
    return MemoryMaildrop({USER: [MESSAGE] * 10})


def make_maildir(root: Path) -> Maildir:
    box = root / USER
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    for i in range(10):
        (box / "cur" / f"17000000{i:02d}.M{i}P1.bench:2,S").write_bytes(MESSAGE)
    # Settled directories, as on a server whose mail arrived a while ago.
    past = time.time() - 60
    for sub in ("new", "cur"):
        os.utime(box / sub, (past, past))
    return Maildir(root)


def client_batch(stream: list[bytes], count: int) -> int:
    """``retrieve_many`` over a prepared reply stream; returns messages."""
    session = ClientSession(tls_active=True)
    conn = session.conn
    for reply, cmd in (
        (b"+OK ready\r\n", None),
        (b"+OK\r\nPIPELINING\r\nUSER\r\n.\r\n", p.Capa()),
        (b"+OK\r\n", p.User("u")),
        (b"+OK\r\n", p.Pass("p")),
    ):
        if cmd is not None:
            conn.send(cmd)
        conn.receive_data(reply)
        conn.next_event()
    gen = session.retrieve_many(range(1, count + 1), window=64)
    reads = iter(stream)
    result: Any = None
    got = 0
    while True:
        try:
            req = gen.send(result)
        except StopIteration:
            return got
        result = None
        if type(req) is rq.Receive:
            result = next(reads)
        elif type(req) is DeliverMessage:
            got += 1


def best_of(repeat: int, fn: Callable[[], object], per: int) -> float:
    """Best wall time over ``repeat`` runs of ``per`` calls, per call (s)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(per):
            fn()
        best = min(best, (time.perf_counter() - t) / per)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=2000, help="server sessions per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs (the best is kept)")
    ap.add_argument("--messages", type=int, default=2000, help="messages in the client case")
    args = ap.parse_args(argv)
    try:
        from pop3proto import _ccore  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the build
        print(f"compiled core not built ({exc}): nothing to compare", file=sys.stderr)
        return 1
    config = make_config()
    memory = memory_maildrop()
    reply = b"+OK message follows\r\n" + (b"y" * 70 + b"\r\n") * 700 + b".\r\n"
    count = args.messages
    whole = reply * count
    stream = [whole[i : i + 262144] for i in range(0, len(whole), 262144)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pop3proto-bench-") as tmp:
        maildir = make_maildir(Path(tmp))
        # (name, run once, commands per run, runs per timing)
        cases: list[tuple[str, Callable[[], object], int, int]] = [
            (
                "server session, memory maildrop",
                lambda: server_session(config, memory),
                15,
                args.sessions,
            ),
            ("server session, Maildir", lambda: server_session(config, maildir), 15, args.sessions),
            (f"client, {count} RETR of 50 KB", lambda: client_batch(stream, count), count, 1),
        ]
        for name, fn, commands, per in cases:
            times = {}
            for backend in ("cffi", "python"):
                use_backend(backend)
                times[backend] = best_of(args.repeat, fn, per)
            use_backend("cffi")
            rows.append((name, times["cffi"], times["python"], commands))
    print(f"{'case':34} {'compiled':>12} {'pure':>12} {'per cmd/msg':>12} {'pure/compiled':>14}")
    for name, fast, slow, commands in rows:
        print(
            f"{name:34} {fast * 1e6:10.0f}us {slow * 1e6:10.0f}us "
            f"{fast * 1e6 / commands:10.1f}us {slow / fast:13.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
