"""Load: 1,000 concurrent connections and a 10,000-command pipelined flood
against our server in a subprocess, whose memory (VmRSS) is measured, while
other clients' sessions keep completing (HARDENING 46, 47).

Each server runs in its own process so its resident size is its own; the
test raises its open-file limit for the thousand sockets (the server inherits
it). Everything is on 127.0.0.1 and bounded in count and time.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from malicious import client_call

CONNECTIONS = 1000
OTHERS = 12
MESSAGE = b"Subject: load\r\n\r\n" + b"0123456789abcdef" * 640 + b"\r\n"  # ~10 KB

SERVER = r"""
import asyncio, sys, threading
import pop3proto as p
from pop3proto._auth import FailureDelay, PasswordTable
from pop3proto.bindings.maildrop import MemoryMaildrop

binding, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
message = b"Subject: load\r\n\r\n" + b"0123456789abcdef" * (size // 16) + b"\r\n"
users = {f"user{i}": "pw" for i in range(count)}
config = p.ServerConfig(
    authenticator=PasswordTable(users),
    failure_delay=FailureDelay(base=0.0),
    limiter=p.ConnectionLimiter(per_address=100_000, per_user=100),
)
maildrop = MemoryMaildrop({u: [message] * 3 for u in users})
kw = dict(config=config, listen=("127.0.0.1", 0), backlog=4096)
if binding == "sync":
    from pop3proto.bindings.sync import Server
    srv = Server(maildrop, **kw).start()
    print(srv.addresses[0][1], flush=True)
    threading.Event().wait()
else:
    from pop3proto.bindings.aio import Server
    async def main():
        srv = Server(maildrop, **kw)
        await srv.start()
        print(srv.addresses[0][1], flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    assert m is not None
    return int(m.group(1))


@pytest.fixture(scope="module", autouse=True)
def enough_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * CONNECTIONS
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the open-file limit is {hard}; {want} are needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def server_process(binding: str) -> Iterator[tuple[int, int]]:
    """Our server of ``binding`` in a subprocess: ``(pid, port)``; stopped by its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, binding, str(OTHERS + 2), "10240"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield proc.pid, port
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def full_session(port: int, user: str) -> int:
    """Log in, fetch every message, QUIT; returns the octets retrieved."""

    def body(ops: object) -> int:
        ops.call("login", user, "pw")  # type: ignore[attr-defined]
        got = [ops.call("retrieve", n) for n in (1, 2, 3)]  # type: ignore[attr-defined]
        return sum(len(m) for m in got)

    return int(client_call("sync", port, body, allow_insecure=True, timeout=20.0))


def run_others(port: int) -> list[int | BaseException]:
    """OTHERS full sessions in threads; each result is octets or the error."""
    results: list[int | BaseException] = [0] * OTHERS

    def one(i: int) -> None:
        try:
            results[i] = full_session(port, f"user{i}")
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(OTHERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("binding", ["aio", "sync"])
def test_case_47_thousand_connections_held_while_others_are_served(binding: str) -> None:
    """1,000 connections open at once (each greeted), the server's memory
    stays bounded, and other clients' sessions complete meanwhile."""
    with server_process(binding) as (pid, port):
        base = rss_kib(pid)
        held: list[socket.socket] = []
        sel = selectors.DefaultSelector()
        try:
            for _ in range(CONNECTIONS):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.setblocking(False)
                held.append(s)
                sel.register(s, selectors.EVENT_READ)
            greeted: set[socket.socket] = set()
            deadline = time.monotonic() + 30
            while len(greeted) < CONNECTIONS and time.monotonic() < deadline:
                for key, _ in sel.select(1.0):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock.recv(4096).startswith(b"+OK"):
                        greeted.add(sock)
                        sel.unregister(sock)
            assert len(greeted) == CONNECTIONS
            results = run_others(port)
            assert results == [len(MESSAGE) * 3] * OTHERS, results
            grown = rss_kib(pid) - base
            print(f"{binding}: {grown} KiB for {CONNECTIONS} connections")
            assert grown < 150 * 1024, f"{grown} KiB for {CONNECTIONS} connections"
        finally:
            sel.close()
            for s in held:
                s.close()


def test_case_46_pipelined_flood_with_bounded_server_memory() -> None:
    """10,000 pipelined ``RETR 1`` (≈100 MB of replies) from a client that
    never reads: the server stops reading once its output backs up, its
    memory stays bounded, and other clients are served meanwhile."""
    with server_process("aio") as (pid, port):
        flood = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            assert flood.recv(4096).startswith(b"+OK")
            flood.sendall(b"USER user%d\r\nPASS pw\r\n" % (OTHERS + 1))
            time.sleep(0.2)
            base = rss_kib(pid)
            wire = b"RETR 1\r\n" * 10_000
            flood.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 3.0
            while sent < len(wire) and time.monotonic() < deadline:
                try:
                    sent += flood.send(wire[sent : sent + 65536])
                except BlockingIOError:
                    time.sleep(0.01)
            peak = base
            results = run_others(port)
            for _ in range(10):
                peak = max(peak, rss_kib(pid))
                time.sleep(0.05)
            assert results == [len(MESSAGE) * 3] * OTHERS, results
            print(f"server grew {peak - base} KiB under the flood")
            assert peak - base < 16 * 1024, f"server grew {peak - base} KiB"
        finally:
            flood.close()
