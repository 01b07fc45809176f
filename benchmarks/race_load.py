"""A bounded, lean asyncio load client for any POP3 server on loopback.

    python benchmarks/race_load.py --port 1110 [--mode plain|stls|tls] [--cafile PEM]
        [--user 'load{:04d}'] [--users N] [--password secret] [--concurrency 200]
        [--duration 10] [--max-sessions 1000000] [--timeout 30] [--retr 10]
        [--loop uvloop|asyncio]

``--concurrency`` workers run sessions back to back. Each session: connect
(implicit TLS with ``--mode tls``), read the greeting, ``STLS`` and the
handshake (``--mode stls``), ``USER``/``PASS``, ``STAT``, ``UIDL``,
``RETR 1`` .. ``RETR k`` one at a time (k = min(``--retr``, message count)),
``QUIT``, close. Worker *i* logs in as ``--user`` formatted with
``i % --users`` (servers that lock a maildrop per session need one user per
worker). The client parses just enough POP3 to find the end of each reply, so
its own CPU cost stays small and the same for every server.

Bounds: no session starts after ``--duration`` seconds or once
``--max-sessions`` have started; every session has a ``--timeout``; sessions
still running ``--timeout`` + 5 seconds after the end are cancelled (counted
as errors). Only loopback addresses are accepted.

Prints one JSON object: ``sessions_per_s`` counts the sessions that completed
inside the ``--duration`` window; latency percentiles (whole session, and
connect to logged in) are over every completed session; ``errors`` counts
failed sessions by the phase they failed in; ``cpu_s`` is this process's
user+system CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import resource
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any, cast

TERMINATOR = b"\r\n.\r\n"
PHASES = ("connect", "greeting", "stls", "login", "stat", "uidl", "retr", "quit")


class ReplyError(Exception):
    """The server answered ``-ERR`` (or something that is not POP3), or went away."""


class _Conn(asyncio.Protocol):
    """One connection: buffers input and completes one pending reply at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.multi = False
        self.scan = 0
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._poke()

    def eof_received(self) -> bool | None:
        self.gone = True
        self._poke()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._poke()

    def _parse(self) -> bytes | None:
        buf = self.buf
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        if self.multi and buf.startswith(b"+OK"):
            stop = buf.find(TERMINATOR, max(end, self.scan))
            if stop < 0:
                self.scan = max(end, len(buf) - 4)
                return None
            reply = bytes(buf[: stop + 2])
            del buf[: stop + 5]
            return reply
        line = bytes(buf[:end])
        del buf[: end + 2]
        return line

    def _poke(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        reply = self._parse()
        if reply is not None:
            self.waiter = None
            waiter.set_result(reply)
        elif self.gone:
            self.waiter = None
            waiter.set_exception(ReplyError("connection closed by the server"))

    async def reply(self, multi: bool = False) -> bytes:
        """The next reply (status line, or whole multi-line reply); ``-ERR`` raises."""
        self.multi = multi
        self.scan = 0
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self._poke()
        reply = await waiter
        if not reply.startswith(b"+OK"):
            raise ReplyError(repr(reply[:80]))
        return reply

    async def command(self, line: bytes, multi: bool = False) -> bytes:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        cast(asyncio.WriteTransport, self.transport).write(line)
        return await self.reply(multi)


class LoadRun:
    """One bounded load run (see the module docstring); ``report()`` after ``run()``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.ctx: ssl.SSLContext | None = None
        if args.mode != "plain":
            self.ctx = ssl.create_default_context(cafile=args.cafile)
        self.started = 0
        self.latencies: list[float] = []
        self.logins: list[float] = []
        self.ends: list[float] = []
        self.errors = dict.fromkeys(PHASES, 0)
        self.errors["cancelled"] = 0
        self.samples: list[str] = []
        self.messages = 0
        self.octets = 0
        self.begin = 0.0
        self.elapsed = 0.0

    async def session(self, user: bytes, phase: list[str]) -> None:
        a = self.a
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        phase[0] = "connect"
        if a.mode == "tls":
            transport, conn = await loop.create_connection(
                _Conn, a.host, a.port, ssl=self.ctx, server_hostname=a.server_name
            )
        else:
            transport, conn = await loop.create_connection(_Conn, a.host, a.port)
        try:
            phase[0] = "greeting"
            await conn.reply()
            if a.mode == "stls":
                phase[0] = "stls"
                await conn.command(b"STLS\r\n")
                assert self.ctx is not None
                upgraded = await loop.start_tls(
                    transport, conn, self.ctx, server_hostname=a.server_name
                )
                if upgraded is None:
                    raise ReplyError("STLS handshake gave no transport")
                transport = upgraded
                conn.transport = upgraded
            phase[0] = "login"
            await conn.command(b"USER " + user + b"\r\n")
            await conn.command(b"PASS " + a.password.encode() + b"\r\n")
            t_login = time.perf_counter()
            phase[0] = "stat"
            stat = await conn.command(b"STAT\r\n")
            count = int(stat.split()[1])
            phase[0] = "uidl"
            await conn.command(b"UIDL\r\n", multi=True)
            phase[0] = "retr"
            octets = 0
            wanted = min(a.retr, count)
            for n in range(1, wanted + 1):
                octets += len(await conn.command(b"RETR %d\r\n" % n, multi=True))
            phase[0] = "quit"
            await conn.command(b"QUIT\r\n")
        finally:
            transport.close()
        t1 = time.perf_counter()
        self.latencies.append(t1 - t0)
        self.logins.append(t_login - t0)
        self.ends.append(t1 - self.begin)
        self.messages += wanted
        self.octets += octets

    async def worker(self, index: int, deadline: float) -> None:
        a = self.a
        user = a.user.format(index % a.users).encode()
        phase = ["connect"]
        while self.started < a.max_sessions and time.perf_counter() < deadline:
            self.started += 1
            try:
                await asyncio.wait_for(self.session(user, phase), a.timeout)
            except asyncio.CancelledError:
                self.errors["cancelled"] += 1
                raise
            except Exception as exc:
                self.errors[phase[0]] += 1
                text = f"{phase[0]}: {type(exc).__name__}: {exc}"[:200]
                if len(self.samples) < 5 and text not in self.samples:
                    self.samples.append(text)
                await asyncio.sleep(0.05)  # a refused connection must not spin

    async def run(self) -> None:
        a = self.a
        self.begin = time.perf_counter()
        deadline = self.begin + a.duration
        tasks = [asyncio.ensure_future(self.worker(i, deadline)) for i in range(a.concurrency)]
        _done, pending = await asyncio.wait(tasks, timeout=a.duration + a.timeout + 5.0)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self.elapsed = time.perf_counter() - self.begin

    def report(self) -> dict[str, Any]:
        a = self.a
        in_window = sum(1 for t in self.ends if t <= a.duration)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "mode": a.mode,
            "concurrency": a.concurrency,
            "duration_s": a.duration,
            "elapsed_s": round(self.elapsed, 3),
            "sessions_started": self.started,
            "sessions_ok": len(self.latencies),
            "sessions_in_window": in_window,
            "sessions_per_s": round(in_window / a.duration, 2),
            "messages": self.messages,
            "octets": self.octets,
            "latency_ms": percentiles(self.latencies),
            "login_ms": percentiles(self.logins),
            "errors": sum(self.errors.values()),
            "errors_by_phase": {k: v for k, v in self.errors.items() if v},
            "error_samples": self.samples,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        }


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max of ``values`` (seconds) in milliseconds (None if empty)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return round(ordered[k] * 1000.0, 2)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": pick(1.0)}


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["plain", "stls", "tls"], default="plain")
    p.add_argument("--cafile", help="CA file to verify the server (TLS modes)")
    p.add_argument("--server-name", default="localhost", help="name the certificate must have")
    p.add_argument("--user", default="load{:04d}", help="user name, or a template for the index")
    p.add_argument("--users", type=int, default=1_000_000, help="distinct users (index modulus)")
    p.add_argument("--password", default="secret")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-sessions", type=int, default=1_000_000)
    p.add_argument("--timeout", type=float, default=30.0, help="per session")
    p.add_argument("--retr", type=int, default=10)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print("race_load: only loopback IP addresses are accepted", file=sys.stderr)
        return 2
    if not (0 < args.duration <= 600 and 1 <= args.concurrency <= 5000):
        print("race_load: --duration must be in (0, 600], --concurrency 1..5000", file=sys.stderr)
        return 2
    if not (0 < args.timeout <= 120 and 1 <= args.max_sessions <= 10_000_000):
        print("race_load: --timeout must be in (0, 120], --max-sessions positive", file=sys.stderr)
        return 2
    if args.users < 1 or args.retr < 0:
        print("race_load: --users must be positive, --retr not negative", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * args.concurrency + 64))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    run = LoadRun(args)
    loop = _loop_factory(args.loop)()
    try:
        loop.run_until_complete(run.run())
    finally:
        loop.close()
    report = run.report()
    report["loop"] = args.loop
    print(json.dumps(report), flush=True)
    return 0 if report["sessions_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
