"""Shared helpers for the engine tests: feeding bytes in chunks, and a
``ConnectionPair`` that links a client and a server engine."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import pop3proto as p

BACKENDS = ("python", "cffi")


def chunkings(data: bytes, seed: int = 0) -> Iterator[tuple[str, list[bytes]]]:
    """The same bytes whole, in random chunks, and one byte at a time."""
    yield "whole", [data]
    rng = random.Random(seed)
    chunks = []
    i = 0
    while i < len(data):
        n = rng.randint(1, 9)
        chunks.append(data[i : i + n])
        i += n
    yield "random", chunks
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]


def drain(conn: p.Connection) -> list[p.Event]:
    """Every event available now (stops at NEED_DATA or PAUSED)."""
    out: list[p.Event] = []
    while True:
        event = conn.next_event()
        if event is p.NEED_DATA or event is p.PAUSED:
            return out
        out.append(event)  # type: ignore[arg-type]
        if isinstance(event, p.ConnectionClosed):
            return out


def merge_data(events: Iterable[p.Event]) -> list[p.Event]:
    """Join consecutive ``Data`` events, so event lists compare however the
    bytes were chunked."""
    out: list[p.Event] = []
    for event in events:
        if isinstance(event, p.Data) and out and isinstance(out[-1], p.Data):
            out[-1] = p.Data(out[-1].data + event.data)
        elif isinstance(event, p.Data) and not event.data:
            continue
        else:
            out.append(event)
    return out


def feed(conn: p.Connection, chunks: Iterable[bytes]) -> list[p.Event]:
    """Feed chunks one by one, draining events after each."""
    events: list[p.Event] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events.extend(drain(conn))
    return merge_data(events)


def client_after_greeting(greeting: bytes = b"+OK ready\r\n", **kw: object) -> p.Connection:
    conn = p.Connection(p.CLIENT, **kw)  # type: ignore[arg-type]
    conn.receive_data(greeting)
    assert isinstance(conn.next_event(), p.Greeting)
    return conn


def logged_in_client(**kw: object) -> p.Connection:
    """A client in TRANSACTION (USER/PASS answered +OK)."""
    conn = client_after_greeting(**kw)
    conn.send(p.User("u"))
    conn.receive_data(b"+OK\r\n")
    assert conn.next_event() == p.Ok()
    conn.send(p.Pass("pw"))
    conn.receive_data(b"+OK\r\n")
    assert conn.next_event() == p.Ok()
    assert conn.state is p.State.TRANSACTION
    return conn


class ConnectionPair:
    """A client and a server engine talking to each other in memory.

    Every call checks that what one side sent is received by the other as an
    equal event."""

    def __init__(self, **server_kw: object) -> None:
        self.client = p.Connection(p.CLIENT)
        self.server = p.Connection(p.SERVER, **server_kw)  # type: ignore[arg-type]

    def reply(self, *events: p.Event) -> list[p.Event]:
        """Server sends ``events``; returns what the client receives."""
        data = b"".join(self.server.send(e) for e in events)
        self.client.receive_data(data)
        return merge_data(drain(self.client))

    def command(self, cmd: p.Command) -> p.Event:
        """Client sends ``cmd``; the server must receive exactly it."""
        self.server.receive_data(self.client.send(cmd))
        got = self.server.next_event()
        assert got == cmd, (got, cmd)
        return got

    def greet(self, greeting: p.Greeting | None = None) -> None:
        greeting = greeting or p.Greeting("ready")
        assert self.reply(greeting) == [greeting]

    def login(self) -> None:
        self.greet()
        self.command(p.User("user"))
        assert self.reply(p.Ok()) == [p.Ok()]
        self.command(p.Pass("secret"))
        assert self.reply(p.Ok("in")) == [p.Ok("in")]
        assert self.client.state is self.server.state is p.State.TRANSACTION
