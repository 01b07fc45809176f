"""The asyncio binding: a POP3 server and a POP3 client on asyncio, working
unchanged under uvloop.

Both run the engine's I/O-free session drivers (``serve_session`` and
``ClientSession``); this module only carries out their requests with asyncio
transports. Each connection is one ``asyncio.Protocol`` (measured faster than
``asyncio`` streams: the bytes that have arrived reach the engine without a
task switch) plus one task running the driver.

Server::

    server = Server(maildrop, authenticator, listen=("127.0.0.1", 1110))
    async with server:                 # or: await server.serve_forever()
        ...
    # leaving the block ends every session without UPDATE and waits for them

Everything the engine answers to one read goes out in one write. Reading a
connection stops while its output is backed up (above ``WRITE_HIGH_WATER``,
until the client reads) or its unread input is large (``READ_LIMIT``), so a
client that pipelines without reading cannot make the server buffer without
bound (HARDENING 46). The UPDATE step (``commit``) runs in the loop's
default thread pool, since it fsyncs; opening a maildrop (its index makes
that cheap) and reading message bodies (64 KiB chunks as they are sent) are
done on the event-loop thread: short blocks, fine for local disks (serve
maildrops on slow network file systems from several processes instead).

Client::

    async with connect("pop.example.org") as client:   # implicit TLS, port 995
        await client.login("alice", "secret")
        async for msg, data in client.retrieve_many(await client.list()):
            ...

The client's methods and arguments are those of the blocking client
(``pop3proto.bindings.sync``), as coroutines; streaming is an async iterator
(``iter_retrieve``, ``retrieve_many``). Deadlines are the same: ``timeout``
per command, measured from when the command was sent across every read (a
server that trickles bytes cannot stretch it, HARDENING 48), and
``operation_timeout`` per public call. A command cut short by a deadline or
a cancellation leaves the connection unusable and closed: a pipeline is never
resumed (HARDENING 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable
from types import TracebackType
from typing import Any, TypeVar, cast

import pop3proto as p
from pop3proto import _requests as rq
from pop3proto._client import (
    CapaClosedError,
    ClientSession,
    DeliverMessage,
    Driver,
    MessageBoundary,
)
from pop3proto._limits import Limits
from pop3proto._requests import Pop3Error, Pop3TimeoutError, Pop3TLSError, TLSInfo

from ._asyncclient import AsyncClientMethods, Connecting, opened
from ._common import (
    POP3_PORT,
    POP3S_PORT,
    ConnectPlan,
    MaildropRunner,
    ServerBase,
    is_loopback,
    log_session,
    tls_info,
)

__all__ = [
    "POP3S_PORT",
    "POP3_PORT",
    "READ_LIMIT",
    "WRITE_HIGH_WATER",
    "CapaClosedError",
    "Client",
    "Pop3Error",
    "Pop3TLSError",
    "Pop3TimeoutError",
    "Server",
    "connect",
]

T = TypeVar("T")

log = logging.getLogger("pop3proto.server")

#: Unprocessed input (bytes) at which a connection stops reading until the
#: engine has taken what arrived.
READ_LIMIT = 256 * 1024
#: Buffered output (bytes) above which a connection waits for the peer to
#: read before it goes on (the transport's high-water mark).
WRITE_HIGH_WATER = 256 * 1024
#: Seconds the client waits for the server to take a closing QUIT's reply and
#: the connection's end before dropping it.
CLOSE_TIMEOUT = 2.0

_SEND = rq.Send
_RECEIVE = rq.Receive

#: What a wait ended with.
_READY, _LATE, _GONE = "ready", "late", "gone"


def _wake(waiter: asyncio.Future[Any] | None, value: Any = _READY) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


class _Pipe(asyncio.Protocol):
    """One connection's buffering and flow control, shared by the server and
    the client: what arrives is kept until the driver asks for it (reading
    pauses at ``READ_LIMIT``), and writers wait while the output is above the
    high-water mark."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._reading_paused = False
        self._writing_paused = False
        self._eof = False
        self._lost = False
        self._tls = False
        self._receiver: asyncio.Future[Any] | None = None
        self._drainer: asyncio.Future[Any] | None = None
        self._closed: asyncio.Future[None] = loop.create_future()
        self._linger: asyncio.TimerHandle | None = None
        # Lazy timeouts (see _until): when each waiting slot's wait ends,
        # and the one timer that wakes them.
        self._due: dict[str, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    # ------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._tls = transport.get_extra_info("ssl_object") is not None

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= READ_LIMIT and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        _wake(self._receiver)

    def eof_received(self) -> bool:
        self._eof = True
        _wake(self._receiver)
        # Keep a plaintext connection half-open to answer what was pipelined
        # before the peer's FIN (TLS transports cannot half-close).
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        _wake(self._drainer)

    # ------------------------------------------------ for the drivers

    def _gone(self) -> None:
        self._lost = self._eof = True
        _wake(self._receiver, _GONE)
        _wake(self._drainer, _GONE)
        self._disarm()

    def abort(self) -> None:
        """Drop the connection at once and wake whoever waits on it."""
        self._gone()
        if self.transport is not None:
            self.transport.abort()

    def close(self, linger: float) -> None:
        """Close once the buffered output has gone out; drop the connection
        if that has not happened within ``linger`` seconds (a peer that
        reads nothing, a TLS peer that never answers close_notify)."""
        transport = self.transport
        if transport is None or self._lost:
            return
        transport.close()
        if self._linger is None and not self._lost:
            self._linger = self._loop.call_later(linger, self.abort)

    async def _until(self, slot: str, timeout: float | None) -> str:
        """Wait on a fresh future kept in attribute ``slot``: ``_READY`` when
        woken, ``_LATE`` after ``timeout`` seconds, ``_GONE`` when the
        connection went away.

        Timers are lazy: a wait only notes when it ends, and the
        connection's one timer is set again only for a wait that ends before
        it fires. A session of quick commands under a long idle timeout thus
        sets one timer, not one per command; when the timer fires it wakes
        the waits that are due and sets itself for the next one."""
        waiter = self._loop.create_future()
        setattr(self, slot, waiter)
        if timeout is not None:
            at = self._loop.time() + max(timeout, 0.0)
            self._due[slot] = at
            if at < self._timer_at:
                self._arm(at)
        try:
            return cast(str, await waiter)
        finally:
            setattr(self, slot, None)
            self._due.pop(slot, None)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = self._loop.time()
        after = math.inf
        for slot, at in list(self._due.items()):
            if at <= now:
                del self._due[slot]
                _wake(getattr(self, slot), _LATE)
            elif at < after:
                after = at
        if after < math.inf:
            self._arm(after)

    def _disarm(self) -> None:
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused and not self._lost:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    async def receive(self, timeout: float | None) -> bytes | None:
        """What has arrived (at once if anything has), ``b""`` at end of
        stream, None when nothing came within ``timeout`` seconds."""
        while True:
            if self._chunks:
                return self._take()
            if self._eof:
                return b""
            if timeout is not None and timeout <= 0:
                return None
            if await self._until("_receiver", timeout) == _LATE:
                timeout = 0.0

    async def drain(self, timeout: float | None) -> str:
        """Wait while the output is above the high-water mark: ``_READY``,
        ``_LATE`` (the peer read too little for ``timeout`` seconds) or
        ``_GONE``."""
        while self._writing_paused:
            if self._lost:
                return _GONE
            if await self._until("_drainer", timeout) == _LATE and self._writing_paused:
                return _LATE
        return _GONE if self._lost else _READY

    async def upgrade(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None,
        timeout: float | None,
    ) -> asyncio.Transport:
        """Run the TLS handshake on this connection (STLS); raises what the
        handshake raised, the connection dropped. HARDENING 28/29: plaintext
        that arrived after the STLS exchange but before the handshake (a
        later segment) would otherwise be read as if it had come inside TLS;
        its presence fails the upgrade instead."""
        transport = self.transport
        if transport is None or self._lost:
            raise ConnectionError("the connection is closed")
        if self._chunks or self._eof:
            self.abort()
            raise ConnectionError("plaintext arrived after STLS, before the TLS handshake")
        try:
            upgraded = await self._loop.start_tls(
                transport,
                self,
                context,
                server_side=server_side,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        except BaseException:
            self.abort()
            # The transport now belongs to asyncio's TLS protocol, which does
            # not pass connection_lost on for a handshake that never finished:
            # without this, closing would wait CLOSE_TIMEOUT for nothing.
            self.connection_lost(None)
            raise
        if upgraded is None or self._lost:
            self.abort()
            raise ConnectionError("the connection closed during the TLS handshake")
        self.transport = upgraded
        self._tls = True
        return upgraded

    async def wait_closed(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) until the connection is gone."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)


# ======================================================================
# Server
# ======================================================================


class _ServerConnection(_Pipe):
    """One accepted connection: runs ``serve_session`` in a task and carries
    out its requests."""

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._server = server
        self.task: asyncio.Task[None] | None = None
        self._sleeper: asyncio.Future[Any] | None = None
        self._busy: asyncio.Future[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._server
        if server._closing:
            self.abort()
            return
        server._connections.add(self)
        self.task = self._loop.create_task(self._serve())

    def _gone(self) -> None:
        super()._gone()
        _wake(self._sleeper, _GONE)

    # ------------------------------------------------ requests

    async def _drained(self) -> bool:
        """HARDENING 46: no more commands are processed (so nothing more is
        read) until the client takes its output; a client that reads
        nothing for the idle timeout is dropped."""
        outcome = await self.drain(self._server.config.idle_timeout)
        if outcome == _LATE:
            self.abort()
        return outcome == _READY

    async def _flushed(self) -> bool:
        """The output is below the high-water mark (STLS waits for it)."""
        return await self.drain(self._server.config.idle_timeout) == _READY

    async def _start_tls(self) -> p.TLSInfo | None:
        server = self._server
        if server.ssl_context is None or not await self._flushed():
            return None
        try:
            upgraded = await self.upgrade(
                server.ssl_context,
                server_side=True,
                server_hostname=None,
                timeout=server.handshake_timeout,
            )
        except Exception as exc:  # any failure ends the session: the driver says so
            log.info("TLS after STLS failed: %s", exc)
            return None
        return tls_info(
            upgraded.get_extra_info("ssl_object"),
            server_side=True,
            server_cert=server.server_certificate,
        )

    async def _maildrop(self, runner: MaildropRunner, request: rq.Request) -> Any:
        if not runner.may_block(request):
            return runner.run(request)
        job = self._loop.run_in_executor(None, runner.run, request)
        self._busy = job
        result = await asyncio.shield(job)
        self._busy = None
        return result

    async def _sleep(self, seconds: float) -> None:
        if not self._lost:
            await self._until("_sleeper", seconds)

    async def _drive(
        self, gen: Generator[rq.Request, Any, p.SessionSummary], runner: MaildropRunner
    ) -> p.SessionSummary | None:
        result: Any = None
        send = gen.send
        try:
            while True:
                try:
                    req = send(result)
                except StopIteration as stop:
                    summary: p.SessionSummary = stop.value
                    return summary
                result = None
                # Sending and taking what has arrived need no coroutine of
                # their own: they run once or more per command.
                if isinstance(req, _SEND):
                    transport = self.transport
                    if self._lost or transport is None:
                        return None
                    transport.write(req.data)
                    if self._writing_paused and not await self._drained():
                        return None
                elif isinstance(req, _RECEIVE):
                    # What has arrived is handed over without a task switch.
                    if self._chunks:
                        result = self._take()
                    else:
                        data = await self.receive(req.timeout)
                        result = p.TIMED_OUT if data is None else data
                elif isinstance(req, rq.OpenMessage):
                    result = runner.run(req)
                elif isinstance(req, (rq.OpenMaildrop, rq.Commit)):
                    result = await self._maildrop(runner, req)
                elif isinstance(req, rq.StartTLS):
                    result = await self._start_tls()
                elif isinstance(req, rq.Sleep):
                    await self._sleep(req.seconds)
                else:  # pragma: no cover - the driver yields nothing else
                    raise TypeError(f"unexpected request {req!r}")
        finally:
            gen.close()

    async def _serve(self) -> None:
        server = self._server
        transport = self.transport
        assert transport is not None
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if peername else "unknown"
        info = None
        if self._tls:
            info = tls_info(
                transport.get_extra_info("ssl_object"),
                server_side=True,
                server_cert=server.server_certificate,
            )
        runner = MaildropRunner(server.maildrop)
        try:
            gen = p.serve_session(
                server.config,
                peer=peer,
                loopback=is_loopback(peer),
                tls_info=info,
                clock=time.monotonic,
            )
            log_session(log, await self._drive(gen, runner))
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception:
            log.exception("session with %s failed", peer)
        finally:
            busy = self._busy
            if busy is not None and not busy.done():
                # A maildrop call is still running in its thread: release the
                # maildrop once it returns, never under its feet.
                busy.add_done_callback(lambda _job: runner.close())
            else:
                runner.close()
            # The last reply goes out; a client that does not read it within
            # the idle timeout is dropped.
            self.close(server.config.idle_timeout)
            server._connections.discard(self)


class Server(ServerBase):
    """A POP3 server on asyncio (and uvloop), serving ``maildrop``.

    The arguments are those of the blocking ``pop3proto.bindings.sync.Server``:
    ``listen`` is the ``(host, port)`` of the plaintext listener (STLS offered
    when ``ssl_context`` is given), ``tls_listen`` the implicit-TLS one
    (RFC 8314); either may be None; port 0 picks a free port (see
    ``addresses``, known as soon as the object exists). ``config`` carries the
    policy (``ServerConfig``); its ``authenticator`` may instead be given as
    ``authenticator``. ``server_certificate`` is the DER form of the server's
    certificate, for the ``tls-server-end-point`` channel binding.
    ``backlog`` should be at least the expected concurrency (asyncio's own
    default of 100 overflows under load). A TLS handshake (implicit or after
    STLS) that has not finished after ``handshake_timeout`` seconds ends the
    connection (HARDENING 34).

    Use as ``async with Server(...) as server:``, or call ``await start()``
    and ``await close()``; ``await serve_forever()`` serves until ``close()``.
    """

    def _setup(self) -> None:
        for sock, _ in self._listeners:
            sock.setblocking(False)
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[_ServerConnection] = set()
        self._closing = False
        self._closed: asyncio.Event | None = None

    @property
    def sessions(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    async def start(self) -> Server:
        """Start accepting connections on the running loop; returns at once."""
        if self._servers:
            return self
        if self._closing:
            raise RuntimeError("the server is closed")
        loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        for sock, implicit in self._listeners:
            server = await loop.create_server(
                lambda: _ServerConnection(self, loop),
                sock=sock,
                backlog=self.backlog,
                ssl=self.ssl_context if implicit else None,
                ssl_handshake_timeout=self.handshake_timeout if implicit else None,
            )
            self._servers.append(server)
        return self

    async def serve_forever(self) -> None:
        """Accept connections until ``close()`` is called (or this task is
        cancelled, which closes the server)."""
        await self.start()
        assert self._closed is not None
        try:
            await self._closed.wait()
        except asyncio.CancelledError:
            await self.close()
            raise

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every session (without UPDATE: RFC 1939 §6),
        and wait up to ``timeout`` seconds for their tasks; a session still
        running then is cancelled. A maildrop removal already under way in a
        worker thread completes before its maildrop is released."""
        if self._closing:
            if self._closed is not None:
                await self._closed.wait()
            return
        self._closing = True
        for server in self._servers:
            server.close()
        if not self._servers:
            for sock, _ in self._listeners:
                sock.close()
        connections = list(self._connections)
        for conn in connections:
            conn.abort()
        for server in self._servers:
            # Python 3.13+: also drop implicit-TLS connections still in their
            # handshake (they have no session yet).
            abort_clients = getattr(server, "abort_clients", None)
            if abort_clients is not None:
                abort_clients()
        tasks = [c.task for c in connections if c.task is not None and not c.task.done()]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout)
        if self._closed is not None:
            self._closed.set()

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# ======================================================================
# Client
# ======================================================================


def _client_tls_info(transport: asyncio.BaseTransport) -> TLSInfo:
    return tls_info(transport.get_extra_info("ssl_object"), server_side=False)


class Client(AsyncClientMethods):
    """A POP3 client connection on asyncio. Use ``connect()`` to make one.

    All keyword arguments are those of ``connect()``; methods are those of
    the blocking client, as coroutines. Methods raise ``Pop3Error`` for
    ``-ERR`` (with its response code), ``Pop3TimeoutError`` and
    ``Pop3TLSError``; the engine's ``RemoteProtocolError`` and connection
    errors pass through. After anything but a ``-ERR`` the connection is
    closed and every later call raises. As an async context manager it sends
    QUIT on a normal exit; on an exception it closes without QUIT, so that
    the server forgets the deletions (RFC 1939 §6).
    """

    def __init__(
        self,
        pipe: _Pipe,
        *,
        host: str,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        starttls: bool = False,
        allow_insecure: bool = False,
        timeout: float | None = 30.0,
        greeting_timeout: float | None = None,
        operation_timeout: float | None = None,
        min_transfer_rate: float = 16384.0,
        limits: Limits | None = None,
        capa: bool = True,
    ) -> None:
        self._pipe = pipe
        self.host = host
        self.timeout = timeout
        self.operation_timeout = operation_timeout
        self._ssl_context = ssl_context
        transport = pipe.transport
        assert transport is not None
        tls = transport.get_extra_info("ssl_object") is not None
        self._session = ClientSession(
            tls_active=tls,
            starttls=starttls,
            allow_insecure=allow_insecure,
            limits=limits,
            command_timeout=timeout,
            greeting_timeout=timeout if greeting_timeout is None else greeting_timeout,
            min_transfer_rate=min_transfer_rate,
            tls_info=_client_tls_info(transport) if tls else None,
            capa=capa,
            host=host,
            port=port,
        )
        self._clock = time.monotonic()
        self._closed = False
        self._result: Any = None

    # ------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        """The connection is closed."""
        return self._closed

    def close(self) -> None:
        """Close the connection without QUIT (idempotent; does not wait: it
        is dropped if it has not closed within ``CLOSE_TIMEOUT`` seconds)."""
        if self._closed:
            return
        self._closed = True
        self._session.abort("the connection was closed")
        self._pipe.close(CLOSE_TIMEOUT)

    async def aclose(self) -> None:
        """Close the connection without QUIT and wait until it is gone."""
        self.close()
        await self._pipe.wait_closed(CLOSE_TIMEOUT)
        self._pipe.abort()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and not self._closed and self._session.usable:
                await self.quit()
        finally:
            await self.aclose()

    # ------------------------------------------------------------ the loop

    def _deadline(self) -> float | None:
        t = self.operation_timeout
        return None if t is None else time.monotonic() + t

    async def _iterate(
        self, gen: Driver[T], deadline: float | None
    ) -> AsyncGenerator[rq.Request, None]:
        """Run a session generator; yield what it delivers. Its result is
        left in ``self._result``."""
        if self._closed:
            gen.close()
            raise Pop3Error("the connection is closed")
        result: object = None
        finished = False
        pipe = self._pipe
        try:
            while True:
                try:
                    req = gen.send(result)
                except StopIteration as stop:
                    finished = True
                    self._result = stop.value
                    return
                except BaseException:
                    finished = True  # the session raised: it decided itself
                    raise
                result = None
                if isinstance(req, rq.Receive):
                    if pipe._chunks:
                        result = pipe._take()
                    else:
                        result = await self._receive(req.timeout, deadline)
                elif isinstance(req, rq.Send):
                    await self._send(req.data, deadline)
                elif isinstance(req, (rq.Deliver, DeliverMessage, MessageBoundary)):
                    yield req
                elif isinstance(req, rq.StartTLS):
                    result = await self._starttls(deadline)
                else:
                    raise TypeError(f"unknown request {req!r}")
        except BaseException as exc:
            if not finished:
                gen.close()
                self._session.abort(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if not self._session.usable:
                self.close()

    async def _run(self, gen: Driver[T], sink: Callable[[rq.Request], object] | None = None) -> T:
        it = self._iterate(gen, self._deadline())
        try:
            async for item in it:
                if sink is None:  # pragma: no cover - only streaming operations deliver
                    raise TypeError("unexpected delivery")
                done = sink(item)
                if inspect.isawaitable(done):
                    await done
        finally:
            await it.aclose()
        return cast(T, self._result)

    def _wait(self, timeout: float | None, deadline: float | None) -> tuple[float | None, bool]:
        """Seconds left on the command clock or the operation deadline,
        whichever ends first, and whether it is the operation's."""
        now = time.monotonic()
        wait = None if timeout is None else self._clock + timeout - now
        if deadline is not None and (wait is None or deadline - now < wait):
            return deadline - now, True
        return wait, False

    async def _receive(self, timeout: float | None, deadline: float | None) -> object:
        wait, whole = self._wait(timeout, deadline)
        data = await self._pipe.receive(wait)
        if data is None:
            if whole:
                raise Pop3TimeoutError("the operation deadline passed")
            return p.TIMED_OUT
        return data

    async def _send(self, data: bytes, deadline: float | None) -> None:
        wait, _ = self._wait(self.timeout, deadline)
        if wait is not None and wait <= 0:
            raise Pop3TimeoutError("the operation deadline passed")
        self._clock = time.monotonic()
        pipe = self._pipe
        if pipe._lost or pipe.transport is None:
            raise ConnectionResetError("the server closed the connection")
        pipe.transport.write(data)
        if pipe._writing_paused:
            outcome = await pipe.drain(wait)
            if outcome == _LATE:
                raise Pop3TimeoutError("the server did not accept a command in time")
            if outcome == _GONE:
                raise ConnectionResetError("the server closed the connection")

    async def _starttls(self, deadline: float | None) -> TLSInfo:
        wait, _ = self._wait(self.timeout, deadline)
        if wait is not None and wait <= 0:
            raise Pop3TimeoutError("the deadline passed before the TLS handshake")
        self._clock = time.monotonic()
        context = self._ssl_context or ssl.create_default_context()
        try:
            transport = await self._pipe.upgrade(
                context, server_side=False, server_hostname=self.host, timeout=wait
            )
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise Pop3TimeoutError("the TLS handshake did not finish in time") from exc
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            raise Pop3TLSError(f"TLS handshake failed: {exc}") from exc
        self._clock = time.monotonic()
        return _client_tls_info(transport)

    # ------------------------------------------------------------ operations

    async def iter_retrieve(self, msg: int) -> AsyncGenerator[bytes, None]:
        """Iterate over a message's pieces as they arrive. Leaving the loop
        early closes the connection (at once with ``contextlib.aclosing``,
        else when the iterator is finalised)."""
        it = self._iterate(self._session.retrieve_stream(msg), self._deadline())
        try:
            async for req in it:
                yield cast(rq.Deliver, req).data
        finally:
            await it.aclose()
            if self._session.conn.outstanding:
                self.close()

    async def retrieve_many(
        self, msgs: Iterable[int], window: int = 16
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """``(msg, data)`` for each message of ``msgs``, in order, each as
        soon as it is complete; pipelined (``window`` RETRs outstanding)
        when the server offers PIPELINING. A ``-ERR`` for one message raises
        ``Pop3Error`` after the messages already asked for were yielded.
        Leaving the loop early closes the connection."""
        it = self._iterate(self._session.retrieve_many(msgs, window), self._deadline())
        try:
            async for req in it:
                assert isinstance(req, DeliverMessage)
                yield req.msg, req.data
        finally:
            await it.aclose()
            if self._session.conn.outstanding:
                self.close()


async def _open_client(
    host: str,
    port: int | None,
    *,
    tls: bool,
    starttls: bool,
    timeout: float | None,
    ssl_context: ssl.SSLContext | None,
    allow_insecure: bool,
    operation_timeout: float | None,
    limits: Limits | None,
    connect_timeout: float | None,
    greeting_timeout: float | None,
    min_transfer_rate: float,
) -> Client:
    plan = ConnectPlan(
        port,
        tls=tls,
        starttls=starttls,
        timeout=timeout,
        ssl_context=ssl_context,
        operation_timeout=operation_timeout,
        connect_timeout=connect_timeout,
        clock=time.monotonic,
    )
    implicit, port, context = plan.implicit, plan.port, plan.context
    loop = asyncio.get_running_loop()
    for capa, ctimeout, remaining in plan.attempts():
        try:
            _transport, pipe = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Pipe(loop),
                    host,
                    port,
                    ssl=context if implicit else None,
                    server_hostname=host if implicit else None,
                    ssl_handshake_timeout=ctimeout if implicit else None,
                ),
                ctimeout,
            )
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise Pop3TimeoutError(f"connecting to {host}:{port} timed out") from exc
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise Pop3TLSError(f"TLS handshake failed: {exc}") from exc
        try:
            client = Client(
                pipe,
                host=host,
                port=port,
                ssl_context=context,
                starttls=starttls,
                allow_insecure=allow_insecure,
                timeout=timeout,
                greeting_timeout=greeting_timeout,
                operation_timeout=remaining,
                min_transfer_rate=min_transfer_rate,
                limits=limits,
                capa=capa,
            )
        except BaseException:
            pipe.abort()
            raise
        if await opened(client, operation_timeout):
            return client
    raise CapaClosedError()  # pragma: no cover - the second try sends no CAPA


def connect(
    host: str,
    port: int | None = None,
    *,
    tls: bool = True,
    starttls: bool = False,
    timeout: float | None = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    allow_insecure: bool = False,
    operation_timeout: float | None = None,
    limits: Limits | None = None,
    connect_timeout: float | None = None,
    greeting_timeout: float | None = None,
    min_transfer_rate: float = 16384.0,
) -> Connecting[Client]:
    """Connect to a POP3 server: ``client = await connect(...)`` or
    ``async with connect(...) as client:``; the client is ready (greeting
    read, CAPA asked, STLS done when asked for).

    ``tls=True`` (the default) is implicit TLS on port 995 (RFC 8314);
    ``starttls=True`` connects in plaintext (port 110) and requires STLS,
    failing with ``Pop3TLSError`` before any credential is sent when the
    server does not upgrade; ``tls=False`` alone is plaintext, where logins
    that reveal a secret need ``allow_insecure=True``. Certificates and host
    names are verified unless ``ssl_context`` says otherwise.
    ``connect_timeout`` and ``greeting_timeout`` default to ``timeout``.
    A server that closes the connection on CAPA is connected to again
    without CAPA."""
    return Connecting(
        lambda: _open_client(
            host,
            port,
            tls=tls,
            starttls=starttls,
            timeout=timeout,
            ssl_context=ssl_context,
            allow_insecure=allow_insecure,
            operation_timeout=operation_timeout,
            limits=limits,
            connect_timeout=connect_timeout,
            greeting_timeout=greeting_timeout,
            min_transfer_rate=min_transfer_rate,
        )
    )
