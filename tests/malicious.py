"""Malicious peers for the downgrade, injection and limit tests.

* :class:`MaliciousServer` — a scripted POP3 server on 127.0.0.1: a greeting
  and, per command keyword, a list of actions (bytes written as one TCP
  segment, pauses, a TLS upgrade, a stall, a close). It records every line it
  received, so a test can prove what a client did *not* send.
* :class:`MaliciousClient` — a scripted client: segments written one by one
  (``TCP_NODELAY``, optional sleeps between them), a TLS upgrade on demand,
  and reading until the server closes.
* :func:`serving` runs one of our server bindings (``sync``, ``aio``,
  ``trio``) in a background thread; :func:`client_call` runs a function
  against one of our client bindings and returns its result, hiding whether
  that binding is blocking or async.

Every socket listens or connects on 127.0.0.1 only, every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio  # type: ignore[import-untyped,unused-ignore]
from pop3proto.bindings import aio as aio_binding
from pop3proto.bindings import sync as sync_binding
from pop3proto.bindings import trio as trio_binding

import pop3proto as p

BINDINGS = ("sync", "aio", "trio")

# ---------------------------------------------------------------------------
# scripted actions
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sleep:
    """Pause before the next action."""

    seconds: float


@dataclass(frozen=True)
class Trickle:
    """Write ``data`` one byte per segment, ``delay`` seconds apart."""

    data: bytes
    delay: float = 0.0


@dataclass(frozen=True)
class Flood:
    """Write ``data`` over and over, up to ``limit`` octets or until the peer
    stops reading or closes (the octets written are counted)."""

    data: bytes
    limit: int


class StartTLS:
    """Do the server side of a TLS handshake with the server's context."""


class Stall:
    """Stop answering; keep the connection open until the peer closes it
    (bounded by the server's ``stall_limit``)."""


class Close:
    """Close the connection."""


Action = bytes | Sleep | Trickle | Flood | StartTLS | Stall | Close
Script = Sequence[Action]

STARTTLS = StartTLS()
STALL = Stall()
CLOSE = Close()


def keyword(line: bytes) -> str:
    """The command keyword of ``line``, upper-cased (``""`` for an empty line)."""
    return line.split(b" ", 1)[0].decode("latin-1").upper()


# ---------------------------------------------------------------------------
# the scripted server
# ---------------------------------------------------------------------------


@dataclass
class Peer:
    """What one connection to a :class:`MaliciousServer` saw."""

    lines: list[bytes] = field(default_factory=list)
    #: Set after a StartTLS action completed.
    tls: bool = False
    #: Octets written by Flood actions.
    flooded: int = 0
    #: Why the connection ended ("closed", "eof", "error: ...").
    end: str = ""


class MaliciousServer:
    """A scripted POP3 server on 127.0.0.1 (one thread per connection).

    ``greeting`` is written first. For each received line the script is
    ``tls_replies[KEYWORD]`` once TLS is active (when given), else
    ``replies[KEYWORD]``, else ``default``. A reply given as a list of
    scripts is used in turn, one per use of the command (the last one
    repeats). Lines end at LF (a CR before it is dropped).
    """

    def __init__(
        self,
        greeting: Script | bytes = b"+OK ready\r\n",
        replies: Mapping[str, Sequence[Any]] | None = None,
        *,
        tls_replies: Mapping[str, Sequence[Any]] | None = None,
        default: Script = (b"-ERR no\r\n",),
        tls: ssl.SSLContext | None = None,
        stall_limit: float = 10.0,
    ) -> None:
        self.greeting: Script = (greeting,) if isinstance(greeting, bytes) else greeting
        self.replies = dict(replies or {})
        self.tls_replies = dict(tls_replies or {})
        self.default = default
        self.tls = tls
        self.stall_limit = stall_limit
        self.peers: list[Peer] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> MaliciousServer:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in list(self._socks):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)

    def wait_peers(self, count: int = 1, timeout: float = 5.0) -> list[Peer]:
        """Wait until ``count`` connections have ended; returns every peer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for peer in self.peers if peer.end) >= count:
                break
            time.sleep(0.01)
        return self.peers

    @property
    def commands(self) -> list[bytes]:
        """Every line received, over all connections, in order."""
        return [line for peer in self.peers for line in peer.lines]

    # -- internals ------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.stall_limit)
            peer = Peer()
            self.peers.append(peer)
            self._socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock, peer), daemon=True)
            self._threads.append(t)
            t.start()

    def _script_for(self, line: bytes, peer: Peer, uses: dict[str, int]) -> Script:
        key = keyword(line)
        table = self.tls_replies if peer.tls and key in self.tls_replies else self.replies
        entry = table.get(key)
        if entry is None:
            return self.default
        if entry and isinstance(entry[0], list | tuple):
            n = uses.get(key, 0)
            uses[key] = n + 1
            scripts: list[Script] = list(entry)
            return scripts[min(n, len(scripts) - 1)]
        return entry  # type: ignore[no-any-return,unused-ignore]

    def _serve(self, sock: socket.socket, peer: Peer) -> None:
        conn: socket.socket = sock
        buffer = bytearray()
        uses: dict[str, int] = {}
        try:
            conn = self._run(self.greeting, conn, peer)
            while True:
                while b"\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        peer.end = "eof"
                        return
                    buffer += data
                end = buffer.index(b"\n")
                line = bytes(buffer[:end]).removesuffix(b"\r")
                del buffer[: end + 1]
                peer.lines.append(line)
                conn = self._run(self._script_for(line, peer, uses), conn, peer)
        except _Closed:
            peer.end = "closed"
        except (OSError, ssl.SSLError) as exc:
            peer.end = f"error: {exc}"
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _run(self, script: Iterable[Action], conn: socket.socket, peer: Peer) -> socket.socket:
        for action in script:
            if isinstance(action, bytes):
                conn.sendall(action)
            elif isinstance(action, Sleep):
                time.sleep(action.seconds)
            elif isinstance(action, Trickle):
                for i in range(len(action.data)):
                    conn.sendall(action.data[i : i + 1])
                    if action.delay:
                        time.sleep(action.delay)
            elif isinstance(action, Flood):
                conn.settimeout(2.0)
                try:
                    while peer.flooded < action.limit:
                        conn.sendall(action.data)
                        peer.flooded += len(action.data)
                except (OSError, ssl.SSLError):
                    raise _Closed() from None
            elif isinstance(action, StartTLS):
                assert self.tls is not None, "StartTLS needs tls="
                conn = self.tls.wrap_socket(conn, server_side=True)
                peer.tls = True
            elif isinstance(action, Stall):
                conn.settimeout(self.stall_limit)
                with contextlib.suppress(OSError, ssl.SSLError):
                    while conn.recv(65536):
                        pass
                raise _Closed()
            elif isinstance(action, Close):
                raise _Closed()
            else:  # pragma: no cover - a typo in a script
                raise TypeError(f"unknown action {action!r}")
        return conn


class _Closed(Exception):
    pass


# ---------------------------------------------------------------------------
# the scripted client
# ---------------------------------------------------------------------------


class MaliciousClient:
    """A scripted client on 127.0.0.1: every ``send`` segment is one write
    with ``TCP_NODELAY`` (``gap`` seconds apart), so segment boundaries are
    what the test says."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def __enter__(self) -> MaliciousClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, *segments: bytes, gap: float = 0.0) -> int:
        """Write each segment with its own ``sendall``, sleeping ``gap``
        seconds between them; returns how many were written before the server
        closed or reset the connection (a closed connection is an outcome the
        tests check, not an error)."""
        for i, segment in enumerate(segments):
            if i and gap:
                time.sleep(gap)
            try:
                self.sock.sendall(segment)
            except (BrokenPipeError, ConnectionResetError):
                return i
        return len(segments)

    def line(self) -> bytes:
        """The next CRLF-terminated line (EOFError if the server closed first)."""
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(bytes(self.buffer))
            self.buffer += data
        end = self.buffer.index(b"\r\n") + 2
        out = bytes(self.buffer[:end])
        del self.buffer[:end]
        return out

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.line()

    def until_dot(self) -> bytes:
        """The body of a multi-line reply, up to and with its ``.`` line."""
        out = b""
        while True:
            line = self.line()
            out += line
            if line == b".\r\n":
                return out

    def rest(self) -> bytes:
        """Everything until the server closes (a reset or TLS error counts as closed)."""
        out = bytearray(self.buffer)
        self.buffer.clear()
        while True:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return bytes(out)
            if not data:
                return bytes(out)
            out += data

    def closed_within(self, seconds: float) -> float | None:
        """Seconds until the server closed the connection, or None if it was
        still open after ``seconds``."""
        start = time.monotonic()
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                if time.monotonic() - start > seconds:
                    return None
        except TimeoutError:
            return None
        except OSError:
            pass
        return time.monotonic() - start

    def starttls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        assert not self.buffer, "bytes buffered before the handshake"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)


# ---------------------------------------------------------------------------
# our servers, any binding, in a background thread
# ---------------------------------------------------------------------------


@dataclass
class Serving:
    """A running server of one binding: its plaintext and implicit-TLS ports."""

    binding: str
    port: int
    tls_port: int | None


@contextlib.contextmanager
def serving(
    binding: str,
    maildrop: Any,
    config: p.ServerConfig,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_certificate: bytes | None = None,
    handshake_timeout: float = 30.0,
    implicit_tls: bool = False,
) -> Iterator[Serving]:
    """Run our server of ``binding`` (sync, aio or trio) on 127.0.0.1 until
    the block ends."""
    kw: dict[str, Any] = {
        "config": config,
        "listen": ("127.0.0.1", 0),
        "tls_listen": ("127.0.0.1", 0) if implicit_tls else None,
        "ssl_context": ssl_context,
        "server_certificate": server_certificate,
        "handshake_timeout": handshake_timeout,
    }

    def ports(addresses: list[tuple[str, int, bool]]) -> Serving:
        plain = next(port for _, port, tls in addresses if not tls)
        tls_port = next((port for _, port, tls in addresses if tls), None)
        return Serving(binding, plain, tls_port)

    if binding == "sync":
        with sync_binding.Server(maildrop, **kw) as srv:
            yield ports(srv.addresses)
        return
    ready = threading.Event()
    failure: list[BaseException] = []
    if binding == "aio":
        loop = asyncio.new_event_loop()
        aserver = aio_binding.Server(maildrop, **kw)

        def run_aio() -> None:
            try:
                asyncio.set_event_loop(loop)
                loop.run_until_complete(aserver.start())
                ready.set()
                loop.run_forever()
                loop.run_until_complete(aserver.close())
            except BaseException as exc:  # pragma: no cover - reported below
                failure.append(exc)
                ready.set()
            finally:
                loop.close()

        thread = threading.Thread(target=run_aio, daemon=True)
        thread.start()
        assert ready.wait(10) and not failure, failure
        try:
            yield ports(aserver.addresses)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        return
    if binding != "trio":
        raise ValueError(f"unknown binding {binding!r}")
    tserver = trio_binding.Server(maildrop, **kw)
    box: list[Any] = []

    async def run_trio() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(tserver.serve)
            box.append((trio.lowlevel.current_trio_token(), nursery.cancel_scope))
            ready.set()

    def run_trio_thread() -> None:
        try:
            trio.run(run_trio)
        except BaseException as exc:  # pragma: no cover - reported below
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run_trio_thread, daemon=True)
    thread.start()
    assert ready.wait(10) and not failure, failure
    try:
        yield ports(tserver.addresses)
    finally:
        token, scope = box[0]
        token.run_sync_soon(scope.cancel)
        thread.join(10)


# ---------------------------------------------------------------------------
# our clients, any binding, called as if blocking
# ---------------------------------------------------------------------------


class ClientOps:
    """One client of any binding seen through blocking calls:
    ``ops.call("login", "alice", "pw")`` runs ``client.login`` and returns its
    result (awaited for the async bindings). Made by :func:`client_call`."""

    def __init__(self, client: Any, runner: Callable[[Any], Any]) -> None:
        self.client = client
        self._runner = runner

    def call(self, name: str, *args: Any, **kw: Any) -> Any:
        return self._runner(getattr(self.client, name)(*args, **kw))

    @property
    def tls_active(self) -> bool:
        return bool(self.client.tls_active)

    @property
    def session(self) -> Any:
        return self.client.session


def client_call(
    binding: str,
    port: int,
    body: Callable[[ClientOps], Any],
    **connect_kw: Any,
) -> Any:
    """Connect the client of ``binding`` to 127.0.0.1:``port`` with
    ``connect_kw`` (``tls=False`` unless given), run ``body(ops)`` and close
    the connection without QUIT; returns what ``body`` returned. Exceptions
    of the binding propagate unchanged."""
    connect_kw.setdefault("tls", False)
    connect_kw.setdefault("timeout", 5.0)
    if binding == "sync":
        client = sync_binding.connect("127.0.0.1", port, **connect_kw)
        try:
            return body(ClientOps(client, lambda value: value))
        finally:
            client.close()
    if binding == "aio":

        async def amain() -> Any:
            aclient = await aio_binding.connect("127.0.0.1", port, **connect_kw)
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(
                    None,
                    lambda: body(
                        ClientOps(
                            aclient,
                            lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(30),
                        )
                    ),
                )
            finally:
                await aclient.aclose()

        return asyncio.run(amain())
    if binding == "trio":

        async def tmain() -> Any:
            tclient = await trio_binding.connect("127.0.0.1", port, **connect_kw)
            try:
                return await trio.to_thread.run_sync(
                    lambda: body(
                        ClientOps(tclient, lambda coro: trio.from_thread.run(lambda: coro))
                    )
                )
            finally:
                await tclient.aclose()

        return trio.run(tmain)
    raise ValueError(f"unknown binding {binding!r}")
