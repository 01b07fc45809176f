"""Fuzz the Sans-IO engine for a bounded time: both roles, both backends.

    python tests/fuzz/engine_fuzz.py --seconds 45 [--backend both|python|cffi] [--seed N]
    python tests/fuzz/engine_fuzz.py --atheris --seconds 45     (coverage-guided)

Each input is fed to a ``Connection`` as a client (after sending a pipeline
of commands) and as a server (answering every command as a binding would),
in the chunks the input picks, then EOF. The only allowed outcomes are events
and ``RemoteProtocolError`` (after which the connection is in ``ERROR``).
With ``--backend both`` every input runs on the pure-Python and the compiled
core and the two outcomes must be identical.

The default mode is a seeded mutation loop (no dependency beyond the
project); ``--atheris`` uses atheris' coverage guidance over the engine's
Python code instead. On a failure the input is written to
``engine-fuzz-crash-<hash>`` in the current directory (or ``--crash-dir``)
and the exit status is 1; otherwise a summary line and status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pop3proto as p
import pop3proto._core as _core

ROLES = ("client", "server")

# Replies a client expects for the command plan below, and commands a server
# may receive: the corpus the mutations start from.
CLIENT_SEEDS = [
    b"+OK hi <1.2@x>\r\n+OK\r\n+OK\r\n+OK 2 20\r\n+OK\r\n1 10\r\n2 10\r\n.\r\n"
    b"+OK\r\nbody\r\n..x\r\n.\r\n+OK\r\n1 abc\r\n2 def\r\n.\r\n",
    b"+OK ready\r\n+OK\r\nSASL PLAIN SCRAM-SHA-256\r\nSTLS\r\nPIPELINING\r\nUIDL\r\n"
    b"TOP\r\nEXPIRE 5\r\nLOGIN-DELAY 900\r\n.\r\n+ \r\n+OK\r\n",
    b"+OK\r\n-ERR [AUTH] no\r\n-ERR [IN-USE] busy\r\n+OK Begin TLS\r\n+OK\r\n.\r\n",
    b"+OK\r\n+OK\r\n+OK\r\n+OK 1 5\r\n+OK 2 octets\r\n.\r\r\n..\r\n.\r\n\r\n.\r\n",
    b"+OK \x1b[31mred\xff\r\n+OK\r\n+OK\r\n-ERR\r\n+OK\r\n" + b"1 1\r\n" * 40 + b".\r\n",
]
SERVER_SEEDS = [
    b"CAPA\r\nUSER u\r\nPASS p\r\nSTAT\r\nLIST\r\nUIDL 1\r\nRETR 1\r\nTOP 1 2\r\n"
    b"DELE 1\r\nRSET\r\nNOOP\r\nLIST 2\r\nUIDL\r\nQUIT\r\n",
    b"AUTH PLAIN\r\nAHUAcA==\r\nSTAT\r\nRETR 1\r\nQUIT\r\n",
    b"STLS\r\nCAPA\r\nUSER u\r\nPASS p\r\n",
    b"APOP u 0123456789abcdef0123456789abcdef\r\nUTF8\r\nLANG\r\nLANG en\r\n",
    b"AUTH SCRAM-SHA-256 biwsbj11LHI9YWJj\r\n*\r\nAUTH\r\nUSER u\nPASS p\nRETR 01\r\n",
]
TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b".",
    b"..",
    b"\r\n.\r\n",
    b"\r\n..",
    b"+OK",
    b"-ERR",
    b"+ ",
    b"*",
    b" ",
    b"\t",
    b"<",
    b">",
    b"@",
    b"STLS\r\n",
    b"CAPA\r\n",
    b"RETR 1\r\n",
    b"4294967297",
    b"18446744073709551616",
    b"-1",
    b"0",
    b"01",
    b"1e3",
    b"0x10",
    b"+5",
    b"9" * 40,
    b"\xff\xfe",
    b"\x1b[2J",
    b"=",
    b"[AUTH]",
    b"[SYS/TEMP]",
    b"x" * 300,
]


@dataclass
class Stats:
    """What a run did (``failures`` holds ``(input, traceback)`` pairs)."""

    inputs: int = 0
    events: int = 0
    remote_errors: int = 0
    mismatches: int = 0
    failures: list[tuple[bytes, str]] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"engine-fuzz: {self.inputs} inputs, {self.events} events, "
            f"{self.remote_errors} remote protocol errors, {self.mismatches} backend mismatches, "
            f"{len(self.failures)} failures"
        )


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------


def available_backends() -> list[str]:
    names = ["python"]
    try:
        importlib.import_module("pop3proto._ccore")
    except ImportError:
        pass
    else:
        names.append("cffi")
    return names


def use_backend(name: str) -> None:
    """Point the engine's hot loops at one backend (as the test fixture does)."""
    module = "pop3proto._purecore" if name == "python" else "pop3proto._ccore"
    impl = importlib.import_module(module)
    _core.unstuff = impl.unstuff
    _core.stuff = impl.stuff
    _core.parse_listing = impl.parse_listing
    _core.BACKEND = name


# ---------------------------------------------------------------------------
# one input, one role
# ---------------------------------------------------------------------------

CLIENT_PLAN: list[Callable[[], p.Command]] = [
    lambda: p.User("u"),
    lambda: p.Pass("p"),
    p.Stat,
    p.List,
    lambda: p.Retr(1),
    p.Uidl,
    p.Capa,
    lambda: p.Auth("PLAIN", b"\0u\0p"),
    lambda: p.Top(1, 2),
    lambda: p.List(2),
    lambda: p.Uidl(1),
    p.Stls,
    lambda: p.Dele(1),
    p.Noop,
    p.Rset,
    p.Quit,
]


def _server_replies(cmd: p.Event) -> list[p.Event]:
    if isinstance(cmd, p.User | p.Pass | p.Apop | p.AuthResponse | p.Dele | p.Noop | p.Rset):
        return [p.Ok()]
    if isinstance(cmd, p.Auth):
        return [p.AuthChallenge(b"")] if cmd.mechanism else [p.Err("which?")]
    if isinstance(cmd, p.Capa):
        return [p.Capabilities({"PIPELINING": (), "SASL": ("PLAIN",), "STLS": (), "UIDL": ()})]
    if isinstance(cmd, p.Stls):
        return [p.Ok("Begin TLS")]
    if isinstance(cmd, p.Stat):
        return [p.DropListing(2, 20)]
    if isinstance(cmd, p.List):
        return [
            p.ScanListings([(1, 10), (2, 10)]) if cmd.msg is None else p.ScanListing(cmd.msg, 10)
        ]
    if isinstance(cmd, p.Uidl):
        if cmd.msg is None:
            return [p.UniqueIdListings([(1, "a"), (2, "b")])]
        return [p.UniqueIdListing(cmd.msg, "a")]
    if isinstance(cmd, p.Retr | p.Top):
        return [p.MessageStart(), p.Data(b"x\r\n.y\r\n\r\n.\r\n"), p.EndOfMessage()]
    if isinstance(cmd, p.Quit):
        return [p.Ok("bye")]
    return [p.Err("no")]


def _answer(conn: p.Connection, cmd: p.Event) -> None:
    """Answer like a binding; an answer the engine refuses is replaced by -ERR
    (our driver's choice, not the peer's input), and if even that is refused
    the command stays unanswered."""
    try:
        for reply in _server_replies(cmd):
            conn.send(reply)
    except p.LocalProtocolError:
        with contextlib.suppress(p.LocalProtocolError):
            conn.send(p.Err("no"))


def chunks_of(data: bytes, rng: random.Random) -> list[bytes]:
    mode = rng.randrange(4)
    if mode == 0:
        return [data]
    if mode == 1:
        return [data[i : i + 1] for i in range(len(data))]
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 3 if mode == 2 else 64)
        out.append(data[i : i + n])
        i += n
    return out


def run_one(role: str, data: bytes, chunk_seed: int) -> tuple[Any, ...]:
    """Feed ``data`` to a fresh engine of ``role``; returns the outcome
    (events, error, state) for comparing backends. Raises AssertionError for
    anything but events and RemoteProtocolError."""
    rng = random.Random(chunk_seed)
    conn = p.Connection(p.CLIENT if role == "client" else p.SERVER, pipelining=True)
    events: list[p.Event] = []
    plan = iter(CLIENT_PLAN[chunk_seed % 4 :])
    error = ""

    def send_next(count: int) -> None:
        for _ in range(count):
            factory = next(plan, None)
            if factory is None:
                return
            try:
                conn.send(factory())
            except p.LocalProtocolError:
                continue

    if role == "server":
        conn.send(p.Greeting("hi", "<1.2@x>"))
    try:
        for chunk in [*chunks_of(data, rng), b""]:
            conn.receive_data(chunk)
            for _ in range(100_000):
                ev = conn.next_event()
                if ev is p.NEED_DATA:
                    break
                if ev is p.PAUSED:
                    if role == "server" and conn.current_command is not None:
                        before = conn.current_command
                        conn.send(p.Err("no"))
                        assert conn.current_command is not before or conn.state is p.State.ERROR
                        continue
                    break
                assert isinstance(ev, p.Event), f"not an event: {ev!r}"
                events.append(ev)
                if isinstance(ev, p.ConnectionClosed):
                    break
                if isinstance(ev, p.StartTLS):
                    conn.tls_established()
                elif role == "server" and isinstance(ev, p.Command):
                    _answer(conn, ev)
                elif role == "client" and isinstance(ev, p.Greeting):
                    send_next(5)
                elif (
                    role == "client"
                    and isinstance(ev, p.Reply)
                    and not isinstance(ev, p.MessageStart | p.Data)
                ):
                    send_next(1)
            else:
                raise AssertionError("the engine made no progress")
            if events and isinstance(events[-1], p.ConnectionClosed):
                break
    except p.RemoteProtocolError as exc:
        assert conn.state is p.State.ERROR, f"RemoteProtocolError but state {conn.state}"
        error = f"{type(exc).__name__}: {exc}"
    merged: list[Any] = []
    for ev in events:
        if isinstance(ev, p.Data) and merged and isinstance(merged[-1], p.Data):
            merged[-1] = p.Data(merged[-1].data + ev.data)
        elif not (isinstance(ev, p.Data) and not ev.data):
            merged.append(ev)
    return (tuple(merged), error, conn.state)


def check_input(data: bytes, backends: list[str], stats: Stats) -> None:
    """Run one fuzz input (first byte: role and chunking) on ``backends``."""
    if not data:
        return
    head, body = data[0], data[1:]
    role = ROLES[head & 1]
    stats.inputs += 1
    outcomes = []
    for name in backends:
        use_backend(name)
        try:
            outcomes.append(run_one(role, body, head >> 1))
        except Exception:
            stats.failures.append((data, f"[{name} {role}]\n{traceback.format_exc()}"))
            return
    first = outcomes[0]
    stats.events += len(first[0])
    stats.remote_errors += bool(first[1])
    for name, other in zip(backends[1:], outcomes[1:], strict=True):
        if other != first:
            stats.mismatches += 1
            stats.failures.append(
                (data, f"[{role}] {backends[0]} and {name} differ:\n{first!r}\n{other!r}")
            )


# ---------------------------------------------------------------------------
# the mutation loop
# ---------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 2 and buf:
            del buf[pos : pos + rng.randint(1, 8)]
        elif op == 3 and buf:
            start = rng.randrange(len(buf))
            piece = buf[start : start + rng.randint(1, 32)]
            buf[pos:pos] = piece * rng.randint(1, 4)
        elif op == 4:
            other = rng.choice(corpus)
            cut = rng.randint(0, len(other))
            buf[pos:] = other[cut:]
        elif op == 5:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 6 and buf:
            buf[rng.randrange(len(buf))] = rng.choice(b"\r\n. +-0123456789")
        else:
            buf[pos:pos] = rng.choice(TOKENS) * rng.randint(2, 50)
    return bytes(buf[:8192])


def seeds() -> Iterator[bytes]:
    for i, seed in enumerate(CLIENT_SEEDS):
        yield bytes([i << 1]) + seed
    for i, seed in enumerate(SERVER_SEEDS):
        yield bytes([(i << 1) | 1]) + seed


def run(seconds: float, seed: int = 0, backend: str = "both") -> Stats:
    """Fuzz for ``seconds``: seeds first, then mutations of the corpus (an
    input that produced a new outcome shape joins the corpus)."""
    backends = available_backends() if backend == "both" else [backend]
    saved = (_core.unstuff, _core.stuff, _core.parse_listing, _core.BACKEND)
    rng = random.Random(seed)
    stats = Stats()
    corpus = list(seeds())
    shapes: set[tuple[str, ...]] = set()
    deadline = time.monotonic() + seconds
    try:
        for data in corpus:
            check_input(data, backends, stats)
        while time.monotonic() < deadline and len(stats.failures) < 10:
            parent = rng.choice(corpus)
            head = rng.randrange(256) if rng.random() < 0.2 else parent[0]
            data = bytes([head]) + mutate(parent[1:], rng, [c[1:] for c in corpus])
            before = stats.events, stats.remote_errors
            check_input(data, backends, stats)
            shape = (
                str(head & 1),
                str(stats.events - before[0]),
                str(stats.remote_errors - before[1]),
            )
            if shape not in shapes and len(corpus) < 2000:
                shapes.add(shape)
                corpus.append(data)
    finally:
        _core.unstuff, _core.stuff, _core.parse_listing, _core.BACKEND = saved
    return stats


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def _write_crashes(stats: Stats, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for data, why in stats.failures:
        name = os.path.join(directory, "engine-fuzz-crash-" + hashlib.sha1(data).hexdigest()[:12])
        with open(name, "wb") as f:
            f.write(data)
        print(f"{name}:\n{why}", file=sys.stderr)


def _atheris(seconds: float, backend: str, extra: list[str], corpus: str | None) -> int:
    if corpus is None:
        # libFuzzer ends the process itself: run it in a child, then clean up.
        import shutil
        import subprocess
        import tempfile

        corpus = tempfile.mkdtemp(prefix="engine-fuzz-corpus-")
        try:
            cmd = [sys.executable, os.path.abspath(__file__), "--atheris", "--corpus", corpus]
            cmd += [f"--seconds={seconds}", f"--backend={backend}", *extra]
            return subprocess.run(cmd, check=False).returncode
        finally:
            shutil.rmtree(corpus, ignore_errors=True)

    import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

    atheris.instrument_all()  # coverage of every loaded function, the engine's included
    os.makedirs(corpus, exist_ok=True)
    for i, data in enumerate(seeds()):
        with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
            f.write(data)
    backends = available_backends() if backend == "both" else [backend]
    stats = Stats()

    def one_input(data: bytes) -> None:
        check_input(data, backends, stats)
        if stats.failures:
            _write_crashes(stats, ".")
            raise AssertionError(stats.failures[0][1])

    argv = [sys.argv[0], f"-max_total_time={int(seconds)}", "-max_len=4096", *extra, corpus]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()  # exits the process when the time is up
    return 0  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="time budget")
    parser.add_argument("--seed", type=int, default=int(time.time()) & 0xFFFF)
    parser.add_argument("--backend", choices=["both", "python", "cffi"], default="both")
    parser.add_argument("--crash-dir", default=".", help="where failing inputs are written")
    parser.add_argument("--atheris", action="store_true", help="coverage-guided (needs atheris)")
    parser.add_argument("--corpus", help="atheris corpus directory (default: a temporary one)")
    args, extra = parser.parse_known_args(argv)
    if args.backend == "cffi" and "cffi" not in available_backends():
        print("engine-fuzz: the compiled core is not built", file=sys.stderr)
        return 2
    if args.atheris:
        return _atheris(args.seconds, args.backend, extra, args.corpus)
    print(f"engine-fuzz: seed {args.seed}, backends {args.backend}, {args.seconds:g} s")
    stats = run(args.seconds, args.seed, args.backend)
    print(stats.line())
    if stats.failures:
        _write_crashes(stats, args.crash_dir)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
