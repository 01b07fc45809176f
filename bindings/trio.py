"""The trio binding: a POP3 server and a POP3 client on trio streams.

Both run the engine's I/O-free session drivers (``serve_session`` and
``ClientSession``); this module only carries out their requests with trio:
``Send`` is ``await stream.send_all`` (the backpressure is trio's: a session
whose peer does not read waits there, and reads nothing more), ``Receive`` is
``await stream.receive_some`` under a trio deadline, ``StartTLS`` wraps the
existing stream in ``trio.SSLStream``, ``Sleep`` is ``trio.sleep``.

Server::

    server = Server(maildrop, authenticator, listen=("127.0.0.1", 1110))
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.serve)
        ...
        nursery.cancel_scope.cancel()   # every session ends without UPDATE

Maildrop listing and the UPDATE step (``Maildrop.open``, ``commit``) and
opening a message run in worker threads (``trio.to_thread``); a message's
bytes are then read on the trio thread in 64 KiB chunks as they are sent (a
short block per chunk, fine for local disks). Shutting down is cancellation:
cancel the scope that runs ``Server.serve`` and every session ends without
the UPDATE step (RFC 1939 §6: nothing marked for deletion is removed), each
maildrop lock is released.

Client::

    async with connect("pop.example.org") as client:    # implicit TLS, port 995
        await client.login("alice", "secret")
        async for msg, data in client.retrieve_many(await client.list()):
            ...

The client's methods and arguments are those of the blocking client
(``pop3proto.bindings.sync``), as coroutines; streaming is an async iterator
(``iter_retrieve``, ``retrieve_many``). Deadlines are the same: ``timeout``
per command, measured from when the command was sent across every read (a
server that trickles bytes cannot stretch it, HARDENING 48), and
``operation_timeout`` per public call; trio cancellation works too. A
command cut short by a deadline or a cancellation leaves the connection
unusable and closed: a pipeline is never resumed (HARDENING 10).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import ssl
from collections.abc import Callable, Generator, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import trio  # type: ignore[import-untyped,unused-ignore]  # typed from trio 0.23 on

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
    "READ_SIZE",
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

#: Bytes asked of a stream per read.
READ_SIZE = 256 * 1024
#: Seconds a graceful close (TLS close_notify) may take before the socket is dropped.
CLOSE_TIMEOUT = 2.0

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def _receive(stream: trio.abc.Stream, timeout: float | None) -> object:
    """One read: the bytes, ``b""`` at end of stream (or a broken one), or
    ``TIMED_OUT`` when nothing came within ``timeout`` seconds."""
    with trio.move_on_after(math.inf if timeout is None else timeout):
        try:
            data: bytes | bytearray = await stream.receive_some(READ_SIZE)
        except _STREAM_ERRORS:
            return b""
        return data
    return rq.TIMED_OUT


async def _close(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream``, politely when that is quick (TLS close_notify),
    forcefully otherwise. The transport is closed in every case."""
    with trio.move_on_after(CLOSE_TIMEOUT) as scope:
        with contextlib.suppress(*_STREAM_ERRORS):
            await stream.aclose()
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)


class _Link:
    """The stream a session currently talks over (it changes at STLS)."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream


# ======================================================================
# Server
# ======================================================================


class Server(ServerBase):
    """A POP3 server on trio, serving ``maildrop``.

    Takes the same arguments as the blocking ``pop3proto.bindings.sync.Server``
    and behaves the same: ``listen`` is the ``(host, port)`` of the plaintext
    listener (STLS offered when ``ssl_context`` is given), ``tls_listen`` the
    implicit-TLS one (RFC 8314); either may be None; port 0 picks a free port.
    The listening sockets are bound when the object is made, so ``addresses``
    is known at once. ``config`` carries the policy (``ServerConfig``); its
    ``authenticator`` may instead be given as ``authenticator``.
    ``server_certificate`` (DER) enables the tls-server-end-point channel
    binding. ``handshake_timeout`` bounds every TLS handshake (HARDENING 34).

    Run it with ``await server.serve()``, typically as
    ``await nursery.start(server.serve)``; cancel that to stop. A server
    serves once: ``serve`` closes the listeners when it ends. ``close()``
    releases the listeners of a server that will not be served.
    """

    def _setup(self) -> None:
        self._served = False

    def close(self) -> None:
        """Close the listening sockets (idempotent). Sessions already running
        are ended by cancelling ``serve``, not by this."""
        for sock, _ in self._listeners:
            sock.close()

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int, bool]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections and run a session for each, until cancelled.

        ``task_status.started`` is called with ``addresses`` once every
        listener accepts, so ``await nursery.start(server.serve)`` returns
        them. On cancellation every session is ended without UPDATE (no
        message is removed), each maildrop lock is released, and the
        listeners are closed."""
        if self._served:
            raise RuntimeError("a Server serves once; make a new one")
        self._served = True
        try:
            async with trio.open_nursery() as nursery:
                for sock, implicit in self._listeners:
                    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                    handler = functools.partial(self._handle, implicit=implicit)
                    await nursery.start(trio.serve_listeners, handler, [listener])
                task_status.started(self.addresses)
        finally:
            self.close()

    # ------------------------------------------------------------------

    async def _handshake(
        self, stream: trio.abc.Stream
    ) -> tuple[trio.SSLStream[trio.abc.Stream], p.TLSInfo] | None:
        """Run the server side of a TLS handshake on ``stream``; None when it
        failed or did not finish within ``handshake_timeout``."""
        assert self.ssl_context is not None
        tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
        with trio.move_on_after(self.handshake_timeout):  # HARDENING 34
            try:
                await tls.do_handshake()
            except _STREAM_ERRORS as exc:
                log.info("TLS handshake failed: %s", exc)
                return None
            return tls, tls_info(tls, server_side=True, server_cert=self.server_certificate)
        log.info("TLS handshake timed out")
        return None

    async def _handle(self, stream: trio.SocketStream, *, implicit: bool) -> None:
        try:
            peer = str(stream.socket.getpeername()[0])
        except OSError:  # already reset
            await _close(stream)
            return
        link = _Link(stream)
        runner = MaildropRunner(self.maildrop)
        try:
            info = None
            if implicit:
                done = await self._handshake(stream)
                if done is None:
                    return
                link.stream, info = done
            gen = p.serve_session(
                self.config,
                peer=peer,
                loopback=is_loopback(peer),
                tls_info=info,
                clock=trio.current_time,
            )
            log_session(log, await self._run(gen, link, runner))
        except Exception:
            log.exception("session with %s failed", peer)
        finally:
            # Synchronous on purpose: under cancellation an await here would
            # raise before the lock is released. Nothing is removed.
            runner.close()
            await _close(link.stream)

    async def _run(
        self, gen: Generator[rq.Request, Any, p.SessionSummary], link: _Link, runner: MaildropRunner
    ) -> p.SessionSummary | None:
        result: Any = None
        try:
            while True:
                try:
                    req = gen.send(result)
                except StopIteration as stop:
                    summary: p.SessionSummary = stop.value
                    return summary
                result = None
                if isinstance(req, rq.Send):
                    # A client that stops reading is dropped after the idle timeout.
                    with trio.move_on_after(self.config.idle_timeout):
                        try:
                            await link.stream.send_all(req.data)
                        except _STREAM_ERRORS:
                            return None
                        continue
                    return None
                elif isinstance(req, rq.Receive):
                    result = await _receive(link.stream, req.timeout)
                elif isinstance(req, rq.StartTLS):
                    # The engine has already refused any plaintext read past
                    # the STLS line; whatever arrives now goes to the handshake.
                    done = await self._handshake(link.stream)
                    if done is not None:
                        link.stream, result = done
                elif isinstance(req, rq.Sleep):
                    await trio.sleep(req.seconds)
                elif runner.may_block(req):
                    # Removals unlink and fsync: off the trio thread.
                    result = await trio.to_thread.run_sync(runner.run, req)
                elif runner.handles(req):
                    result = runner.run(req)
                else:  # pragma: no cover - the driver yields nothing else
                    raise TypeError(f"unexpected request {req!r}")
        finally:
            gen.close()


# ======================================================================
# Client
# ======================================================================


class _Operation(Generic[T]):
    """One ``ClientSession`` operation in progress: runs its requests until it
    delivers something to the caller or finishes."""

    def __init__(self, client: Client, gen: Driver[T], deadline: float) -> None:
        self.client = client
        self.gen = gen
        self.deadline = deadline
        self.reply: object = None
        self.started = False
        self.done = False
        self.value: T | None = None

    def abandon(self, reason: str) -> bool:
        """Stop the operation. Once it has started, the session is unusable
        from then on (what is still coming can never be credited to a later
        command) and True is returned; an operation that never ran is just
        dropped."""
        if self.done:
            return False
        self.done = True
        self.gen.close()
        if not self.started:
            return False
        self.client.session.abort(reason)
        return True

    async def step(self) -> rq.Request | None:
        """Carry out requests until the session delivers (the request is
        returned) or the operation ends (None; its result is ``value``)."""
        client = self.client
        if self.done:
            return None
        if client._busy:
            raise trio.BusyResourceError("another task is using this POP3 client")
        client._busy = True
        self.started = True
        finished = False
        try:
            while True:
                try:
                    req = self.gen.send(self.reply)
                except StopIteration as stop:
                    finished = self.done = True
                    self.value = stop.value
                    return None
                except BaseException:
                    finished = self.done = True  # the session decided itself
                    raise
                self.reply = None
                kind = type(req)
                if kind is rq.Receive:
                    self.reply = await client._receive(cast(rq.Receive, req).timeout, self.deadline)
                elif kind is rq.Send:
                    await client._send(cast(rq.Send, req).data, self.deadline)
                elif kind is rq.Deliver or kind is DeliverMessage or kind is MessageBoundary:
                    return req
                elif kind is rq.StartTLS:
                    self.reply = await client._starttls(self.deadline)
                else:
                    raise TypeError(f"unknown request {req!r}")
        except BaseException as exc:
            if not finished:
                self.abandon(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            client._busy = False
            if not client.session.usable:
                await client._drop()


class _Deliveries(Generic[T]):
    """An async iterator over what an operation delivers; also an async
    context manager whose exit abandons an unfinished operation."""

    def __init__(self, op: _Operation[Any], convert: Callable[[rq.Request], T]) -> None:
        self._op = op
        self._convert = convert

    def __aiter__(self) -> _Deliveries[T]:
        return self

    async def __anext__(self) -> T:
        req = await self._op.step()
        if req is None:
            raise StopAsyncIteration
        return self._convert(req)

    async def aclose(self) -> None:
        """Stop early: the connection is closed if the operation had not
        finished (the rest of its replies cannot be skipped safely)."""
        op = self._op
        if op.abandon("the caller stopped reading a streamed reply"):
            await op.client._drop()

    async def __aenter__(self) -> _Deliveries[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _chunk(req: rq.Request) -> bytes:
    return cast(rq.Deliver, req).data


def _message(req: rq.Request) -> tuple[int, bytes]:
    msg = cast(DeliverMessage, req)
    return msg.msg, msg.data


class Client(AsyncClientMethods):
    """A POP3 client connection on a trio stream. Use ``connect()`` to make one.

    ``Client(stream, host=...)`` wraps an already connected stream (a
    ``trio.SSLStream`` whose handshake is done, for implicit TLS); call
    ``await open()`` next to read the greeting. The keyword arguments are
    those of ``connect()``. Methods raise ``Pop3Error`` for ``-ERR`` (with
    its response code), ``Pop3TimeoutError`` and ``Pop3TLSError``; the
    engine's ``RemoteProtocolError`` and trio's stream errors pass through.
    After anything but a ``-ERR`` (a timeout, a cancellation, a broken
    stream) the connection is closed and every later call raises. As an
    async context manager it sends QUIT on a normal exit; on an exception or
    cancellation it closes without QUIT, so that the server forgets the
    deletions (RFC 1939 §6). One task at a time may use a client.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
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
        self.stream = stream
        self.host = host
        self.timeout = timeout
        self.operation_timeout = operation_timeout
        self._ssl_context = ssl_context
        tls = isinstance(stream, trio.SSLStream)
        self._session = ClientSession(
            tls_active=tls,
            starttls=starttls,
            allow_insecure=allow_insecure,
            limits=limits,
            command_timeout=timeout,
            greeting_timeout=timeout if greeting_timeout is None else greeting_timeout,
            min_transfer_rate=min_transfer_rate,
            # SSLStream forwards getpeercert/version/get_channel_binding.
            tls_info=tls_info(stream, server_side=False) if tls else None,
            capa=capa,
            host=host,
            port=port,
        )
        self._clock = trio.current_time()
        self._closed = False
        self._busy = False
        self._active: _Operation[Any] | None = None

    # ------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        """The stream is closed."""
        return self._closed

    async def _drop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._session.abort("the connection was closed")
        await trio.aclose_forcefully(self.stream)

    async def aclose(self) -> None:
        """Close the connection without QUIT (idempotent)."""
        if self._active is not None:
            self._active.abandon("the connection was closed")
        await self._drop()

    #: The same as ``aclose()`` (the blocking client's name).
    close = aclose

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

    def _begin(self, gen: Driver[T]) -> _Operation[T]:
        if self._busy:
            gen.close()
            raise trio.BusyResourceError("another task is using this POP3 client")
        if self._closed:
            gen.close()
            raise Pop3Error("the connection is closed")
        previous = self._active
        if previous is not None:
            # An iterator was left unfinished: its replies are still coming.
            previous.abandon("an earlier operation was abandoned mid-reply")
        t = self.operation_timeout
        op = _Operation(self, gen, math.inf if t is None else trio.current_time() + t)
        self._active = op
        return op

    async def _run(self, gen: Driver[T], sink: Callable[[rq.Request], object] | None = None) -> T:
        op = self._begin(gen)
        try:
            while True:
                req = await op.step()
                if req is None:
                    return cast(T, op.value)
                if sink is None:  # pragma: no cover - only streaming operations deliver
                    raise TypeError("unexpected delivery")
                written = sink(req)
                if inspect.isawaitable(written):
                    await written
        except BaseException as exc:
            # The sink failed (or we were cancelled in it): the rest of the
            # reply cannot be skipped safely.
            if op.abandon(f"{type(exc).__name__}: {exc}"):
                await self._drop()
            raise

    def _wait_until(self, timeout: float | None, deadline: float) -> tuple[float, bool]:
        """When the command clock or the operation deadline runs out,
        whichever is first, and whether it is the operation's."""
        at = math.inf if timeout is None else self._clock + timeout
        if deadline < at:
            return deadline, True
        return at, False

    async def _receive(self, timeout: float | None, deadline: float) -> object:
        at, whole = self._wait_until(timeout, deadline)
        with trio.move_on_at(at):
            try:
                data: bytes | bytearray = await self.stream.receive_some(READ_SIZE)
            except trio.BrokenResourceError:
                return b""  # reset, or TLS closed without close_notify
            return data
        if whole:
            raise Pop3TimeoutError("the operation deadline passed")
        return rq.TIMED_OUT

    async def _send(self, data: bytes, deadline: float) -> None:
        now = trio.current_time()
        if deadline <= now:
            raise Pop3TimeoutError("the operation deadline passed")
        self._clock = now
        at, _ = self._wait_until(self.timeout, deadline)
        with trio.move_on_at(at):
            await self.stream.send_all(data)
            return
        raise Pop3TimeoutError("the server did not accept a command in time")

    async def _starttls(self, deadline: float) -> TLSInfo:
        self._clock = trio.current_time()
        at, _ = self._wait_until(self.timeout, deadline)
        context = self._ssl_context or ssl.create_default_context()
        tls = trio.SSLStream(self.stream, context, server_hostname=self.host)
        with trio.move_on_at(at):
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                raise Pop3TLSError(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
            self.stream = tls
            self._clock = trio.current_time()
            return tls_info(tls, server_side=False)
        raise Pop3TimeoutError("the TLS handshake did not finish in time")

    # ------------------------------------------------------------ operations

    def iter_retrieve(self, msg: int) -> _Deliveries[bytes]:
        """An async iterator over a message's pieces as they arrive (nothing
        is held). Stopping early closes the connection: use it as
        ``async with client.iter_retrieve(n) as chunks: async for ...`` to
        close at once; otherwise the next call finds the connection
        unusable and closes it."""
        return _Deliveries(self._begin(self._session.retrieve_stream(msg)), _chunk)

    def retrieve_many(
        self, msgs: Iterable[int], window: int = 16
    ) -> _Deliveries[tuple[int, bytes]]:
        """An async iterator of ``(msg, data)`` for each message of ``msgs``,
        in order, each as soon as it is complete; pipelined (``window`` RETRs
        outstanding) when the server offers PIPELINING. A ``-ERR`` for one
        message raises ``Pop3Error`` after the messages already asked for
        were yielded. Stopping early closes the connection (see
        ``iter_retrieve``)."""
        return _Deliveries(self._begin(self._session.retrieve_many(msgs, window)), _message)


async def _handshake(
    stream: trio.abc.Stream, context: ssl.SSLContext, host: str, timeout: float | None
) -> trio.SSLStream[trio.abc.Stream]:
    tls = trio.SSLStream(stream, context, server_hostname=host)
    with trio.move_on_after(math.inf if timeout is None else timeout):
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise Pop3TLSError(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
        return tls
    raise Pop3TimeoutError("the TLS handshake did not finish in time")


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
        clock=trio.current_time,
    )
    implicit, port, context = plan.implicit, plan.port, plan.context
    for capa, ctimeout, remaining in plan.attempts():
        stream: trio.abc.Stream | None = None
        with trio.move_on_after(math.inf if ctimeout is None else ctimeout):
            stream = await trio.open_tcp_stream(host, port)
        if stream is None:
            raise Pop3TimeoutError(f"connecting to {host}:{port} timed out")
        try:
            if implicit:
                assert context is not None
                stream = await _handshake(stream, context, host, ctimeout)
            client = Client(
                stream,
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
            await trio.aclose_forcefully(stream)
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
    """Connect to a POP3 server: ``async with connect(...) as client`` (QUIT
    on a normal exit), or ``client = await connect(...)``. The client is
    ready: greeting read, CAPA asked, STLS done when asked for.

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
