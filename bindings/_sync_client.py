"""A blocking POP3 client on the standard library's ``socket`` and ``ssl``.

Every POP3 decision comes from ``pop3proto``'s ``ClientSession``; this module
opens the connection, runs the TLS handshake, keeps the deadlines and moves
bytes::

    from pop3proto.bindings.sync import connect

    with connect("pop.example.org") as client:      # implicit TLS, port 995
        client.login("alice", "secret")
        for msg, data in client.retrieve_many(client.list()):
            ...

Deadlines (seconds, None for none): ``connect_timeout`` for the TCP connect
(and the implicit-TLS handshake), ``greeting_timeout`` for the greeting,
``timeout`` for each command — measured across reads from when the command
was sent, so a server that trickles bytes cannot stretch it (HARDENING 48);
it grows by one second per ``min_transfer_rate`` octets received so that big
messages on slow links still arrive — and ``operation_timeout`` for a whole
public call (``connect()``, ``login()``, ``retrieve_many()`` …). After a
timeout the connection is closed: a pipeline is never resumed (HARDENING 10).

TLS: certificates and host names are verified (``ssl.create_default_context()``)
unless the caller passes its own ``ssl_context``. Channel-binding data for
SCRAM-PLUS is computed after each handshake: ``tls-server-end-point`` (RFC
5929 §4.1: the certificate hashed with its signature's hash, SHA-256 for MD5
and SHA-1; the signature algorithm is read from the certificate's DER, and
SHA-256 is used for algorithms without a single hash such as Ed25519), and
``tls-unique`` on TLS 1.2 and older. ``tls-exporter`` (RFC 9266) is not
offered: Python's ``ssl`` module has no access to TLS exporters.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeGuard, TypeVar, cast, overload

from pop3proto._client import (
    CapaClosedError,
    ClientSession,
    DeliverMessage,
    Driver,
    MessageBoundary,
)
from pop3proto._events import Capabilities, Greeting
from pop3proto._limits import Limits
from pop3proto._requests import (
    TIMED_OUT,
    Deliver,
    Pop3Error,
    Pop3TimeoutError,
    Pop3TLSError,
    Receive,
    Request,
    Send,
    StartTLS,
    TLSInfo,
)

from ._common import POP3_PORT, POP3S_PORT, ClientBase, ConnectPlan, server_end_point, tls_info

if TYPE_CHECKING:
    import ssl

__all__ = [
    "POP3S_PORT",
    "POP3_PORT",
    "READ_SIZE",
    "CapaClosedError",
    "Client",
    "Pop3Error",
    "Pop3TLSError",
    "Pop3TimeoutError",
    "connect",
    "server_end_point",
    "tls_info_for",
]

#: Bytes asked of the socket per read.
READ_SIZE = 256 * 1024
#: While TLS data streams in (a read found at least this much), a wait for
#: more returns only once this much has arrived (``SO_RCVLOWAT``): one wake-up
#: and one gather per 64 KiB instead of one per few TLS records (fetch over
#: TLS from Dovecot: 9-16 % less CPU for 50 KB and for 5 MB messages).
BULK_LOW_WATER = 64 * 1024
#: ... but never waits longer than this for it (the end of a stream, or a
#: slow peer), in seconds; then it takes what is there.
BULK_WAIT = 0.01

T = TypeVar("T")


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


# ------------------------------------------------------------------ channel binding


def _is_tls(sock: socket.socket) -> TypeGuard[ssl.SSLSocket]:
    """``sock`` is an ``ssl.SSLSocket`` (which it cannot be while the ``ssl``
    module was never imported: a plaintext session does not load it)."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(sock, ssl.SSLSocket)


def _handshake(
    sock: socket.socket, context: ssl.SSLContext, host: str, timeout: float | None
) -> ssl.SSLSocket:
    import ssl

    sock.settimeout(timeout)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except TimeoutError as exc:
        raise Pop3TimeoutError("the TLS handshake did not finish in time") from exc
    except (ssl.SSLError, ssl.CertificateError) as exc:
        raise Pop3TLSError(f"TLS handshake failed: {exc}") from exc
    except OSError as exc:
        raise Pop3TLSError(f"TLS handshake failed: {exc}") from exc


# ------------------------------------------------------------------ the client


class Client(ClientBase):
    """A POP3 client connection (blocking). Use ``connect()`` to make one.

    ``Client(sock, host=...)`` wraps an already connected socket (an
    ``ssl.SSLSocket`` for implicit TLS); call ``open()`` next to read the
    greeting. All keyword arguments are those of ``connect()``. Methods
    raise ``Pop3Error`` for ``-ERR`` (with its response code),
    ``Pop3TimeoutError`` and ``Pop3TLSError``; the engine's
    ``RemoteProtocolError`` and socket errors pass through. After anything
    but a ``-ERR`` the connection is closed and every later call raises.
    As a context manager it sends QUIT on a normal exit; on an exception it
    closes without QUIT, so that the server forgets the deletions (RFC 1939
    §6).
    """

    def __init__(
        self,
        sock: socket.socket,
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
        self.sock: socket.socket = sock
        self.host = host
        self.timeout = timeout
        self.operation_timeout = operation_timeout
        self._ssl_context = ssl_context
        tls = _is_tls(sock)
        self._session = ClientSession(
            tls_active=tls,
            starttls=starttls,
            allow_insecure=allow_insecure,
            limits=limits,
            command_timeout=timeout,
            greeting_timeout=timeout if greeting_timeout is None else greeting_timeout,
            min_transfer_rate=min_transfer_rate,
            tls_info=tls_info_for(sock) if _is_tls(sock) else None,
            capa=capa,
            host=host,
            port=port,
        )
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self._clock = time.monotonic()
        self._closed = False
        #: SO_RCVLOWAT is BULK_LOW_WATER on the socket now; None: not available.
        self._low_water: bool | None = False

    # ------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        """The socket is closed."""
        return self._closed

    def close(self) -> None:
        """Close the socket without QUIT (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._session.abort("the connection was closed")
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and not self._closed and self._session.usable:
                self.quit()
        finally:
            self.close()

    # ------------------------------------------------------------ the loop

    def _deadline(self) -> float | None:
        t = self.operation_timeout
        return None if t is None else time.monotonic() + t

    def _iterate(self, gen: Driver[T], deadline: float | None) -> Generator[Request, None, T]:
        """Run a session generator; yield what it delivers; return its result."""
        if self._closed:
            gen.close()
            raise Pop3Error("the connection is closed")
        result: object = None
        finished = False
        try:
            while True:
                try:
                    req = gen.send(result)
                except StopIteration as stop:
                    finished = True
                    return stop.value  # type: ignore[no-any-return]
                except BaseException:
                    finished = True  # the session raised: it decided itself
                    raise
                result = None
                kind = type(req)
                if kind is Receive:
                    result = self._receive(req.timeout, deadline)  # type: ignore[attr-defined]
                elif kind is Send:
                    self._send(req.data, deadline)  # type: ignore[attr-defined]
                elif kind is Deliver or kind is DeliverMessage or kind is MessageBoundary:
                    yield req
                elif kind is StartTLS:
                    result = self._starttls(deadline)
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
            elif self.timeout is not None or self.operation_timeout is not None:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(self.timeout)

    def _run(self, gen: Driver[T], sink: Callable[[Request], object] | None = None) -> T:
        it = self._iterate(gen, self._deadline())
        try:
            while True:
                try:
                    item = next(it)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                if sink is None:  # pragma: no cover - only batch operations deliver
                    raise TypeError("unexpected delivery")
                sink(item)
        finally:
            it.close()

    def _wait(self, timeout: float | None, deadline: float | None) -> tuple[float | None, bool]:
        """Seconds left on the command clock or the operation deadline,
        whichever ends first, and whether it is the operation's."""
        now = time.monotonic()
        wait = None if timeout is None else self._clock + timeout - now
        if deadline is not None and (wait is None or deadline - now < wait):
            return deadline - now, True
        return wait, False

    def _receive(self, timeout: float | None, deadline: float | None) -> object:
        wait, whole = self._wait(timeout, deadline)
        if wait is not None and wait <= 0:
            return self._late(whole)
        sock = self.sock
        try:
            if self._low_water:
                # Streaming: wait briefly for a whole BULK_LOW_WATER.
                sock.settimeout(BULK_WAIT if wait is None else min(wait, BULK_WAIT))
                try:
                    n = sock.recv_into(self._buf)
                except TimeoutError:
                    self._set_low_water(sock, False)
                    return self._receive(timeout, deadline)
            else:
                sock.settimeout(wait)
                try:
                    n = sock.recv_into(self._buf)
                except TimeoutError:
                    return self._late(whole)
        except ConnectionResetError:
            return b""
        if n and _is_tls(sock):
            # One TLS record per read: gather what is already here.
            n = self._gather_tls(sock, n)
            if self._low_water is not None and (n >= BULK_LOW_WATER) is not self._low_water:
                self._set_low_water(sock, not self._low_water)
        return self._view[:n]

    def _set_low_water(self, sock: socket.socket, on: bool) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, BULK_LOW_WATER if on else 1)
        except (OSError, AttributeError):  # a platform without it: never again
            self._low_water = None
        else:
            self._low_water = on

    def _gather_tls(self, sock: ssl.SSLSocket, n: int) -> int:
        import ssl

        sock.settimeout(0.0)
        view = self._view
        try:
            while n < READ_SIZE:
                k = sock.recv_into(view[n:])
                if not k:
                    break
                n += k
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        except ConnectionResetError:
            pass
        return n

    def _late(self, whole: bool) -> object:
        if whole:
            raise Pop3TimeoutError("the operation deadline passed")
        return TIMED_OUT

    def _send(self, data: bytes, deadline: float | None) -> None:
        wait, _ = self._wait(self.timeout, deadline)
        if wait is not None and wait <= 0:
            raise Pop3TimeoutError("the operation deadline passed")
        self._clock = time.monotonic()
        self.sock.settimeout(wait)
        try:
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise Pop3TimeoutError("the server did not accept a command in time") from exc

    def _starttls(self, deadline: float | None) -> TLSInfo:
        wait, _ = self._wait(self.timeout, deadline)
        self._clock = time.monotonic()
        import ssl

        context = self._ssl_context or ssl.create_default_context()
        tls = _handshake(self.sock, context, self.host, wait)
        self.sock = tls
        self._clock = time.monotonic()
        return tls_info_for(tls)

    # ------------------------------------------------------------ operations

    def open(self) -> Greeting:
        """Read the greeting, ask CAPA, and do STLS when it is required."""
        return self._run(self._session.open())

    def starttls(self, ssl_context: ssl.SSLContext | None = None) -> TLSInfo:
        """Upgrade with STLS now (``connect(starttls=True)`` does it for you)."""
        if ssl_context is not None:
            self._ssl_context = ssl_context
        return self._run(self._session.starttls())

    def capabilities(self, refresh: bool = False) -> Capabilities | None:
        """The server's CAPA reply (cached; ``refresh`` asks again), or None."""
        return self._run(self._session.capabilities(refresh))

    def login(
        self,
        user: str,
        password: str | None = None,
        *,
        mechanism: str | None = None,
        token: str | None = None,
        external: bool = False,
        authzid: str = "",
    ) -> None:
        """Log in with the strongest method both sides support (see
        ``ClientSession.login``); ``mechanism`` forces one (a SASL name,
        ``"APOP"`` or ``"USER"``)."""
        self._run(
            self._session.login(
                user,
                password,
                mechanism=mechanism,
                token=token,
                external=external,
                authzid=authzid,
            )
        )

    def stat(self) -> tuple[int, int]:
        """``(message count, maildrop size)``."""
        return self._run(self._session.stat())

    @overload
    def list(self, msg: None = None) -> dict[int, int]: ...
    @overload
    def list(self, msg: int) -> int: ...

    def list(self, msg: int | None = None) -> dict[int, int] | int:
        """``{msg: size}``, or the size of one message."""
        if msg is None:
            return self._run(self._session.list())
        return self._run(self._session.list(msg))

    @overload
    def uidl(self, msg: None = None) -> dict[int, str]: ...
    @overload
    def uidl(self, msg: int) -> str: ...

    def uidl(self, msg: int | None = None) -> dict[int, str] | str:
        """``{msg: unique-id}``, or the unique-id of one message."""
        if msg is None:
            return self._run(self._session.uidl())
        return self._run(self._session.uidl(msg))

    def retrieve(self, msg: int) -> bytes:
        """The whole message (un-stuffed, line ends as the server sent them)."""
        return self._run(self._session.retrieve(msg))

    def retrieve_into(self, msg: int, file: _Writable) -> int:
        """Stream a message into ``file`` (anything with ``write(bytes)``) as
        it arrives; returns its size. If ``write`` raises, the connection is
        closed (the rest of the message cannot be skipped safely)."""
        return self._run(
            self._session.retrieve_stream(msg),
            lambda req: file.write(req.data),  # type: ignore[attr-defined]
        )

    def iter_retrieve(self, msg: int) -> Iterator[bytes]:
        """Iterate over a message's pieces as they arrive. Leaving the loop
        early closes the connection."""
        it = self._iterate(self._session.retrieve_stream(msg), self._deadline())
        try:
            for req in it:
                yield req.data  # type: ignore[attr-defined]
        finally:
            it.close()

    def top(self, msg: int, lines: int) -> bytes:
        """The header and the first ``lines`` lines of the body."""
        return self._run(self._session.top(msg, lines))

    def delete(self, msg: int) -> None:
        """Mark a message deleted (removed when QUIT succeeds)."""
        self._run(self._session.delete(msg))

    def reset(self) -> None:
        """Unmark every message marked deleted."""
        self._run(self._session.reset())

    def noop(self) -> None:
        """NOOP."""
        self._run(self._session.noop())

    def utf8(self) -> None:
        """Enter UTF-8 mode (RFC 6856)."""
        self._run(self._session.utf8())

    def quit(self) -> bool:
        """QUIT and close. True when the server confirmed with ``+OK`` (the
        deletions were applied); False when it answered ``-ERR`` or just
        closed (deletions uncertain)."""
        try:
            return self._run(self._session.quit())
        finally:
            self.close()

    def retrieve_many(self, msgs: Iterable[int], window: int = 16) -> Iterator[tuple[int, bytes]]:
        """``(msg, data)`` for each message of ``msgs``, in order, each as
        soon as it is complete; pipelined (``window`` RETRs outstanding)
        when the server offers PIPELINING. A ``-ERR`` for one message raises
        ``Pop3Error`` after the messages already asked for were yielded.
        Leaving the loop early closes the connection."""
        it = self._iterate(self._session.retrieve_many(msgs, window), self._deadline())
        try:
            for req in it:
                assert isinstance(req, DeliverMessage)
                yield req.msg, req.data
        finally:
            it.close()

    def retrieve_many_into(
        self,
        msgs: Iterable[int],
        open_file: Callable[[int], _Writable],
        window: int = 2,
    ) -> Iterator[tuple[int, int]]:
        """Stream each message of ``msgs``, in order, into the file that
        ``open_file(msg)`` returns when the message begins (anything with
        ``write(bytes)``; nothing is held in memory), and yield ``(msg,
        size)`` once it is complete. Pipelined when the server offers
        PIPELINING: with the default ``window`` of 2 the next message is
        asked for while one streams, so the server does not wait between
        large messages. A message answered ``-ERR`` gets no file and raises
        ``Pop3Error`` after the messages already asked for were yielded. If
        ``open_file`` or ``write`` raises, or the loop is left early, the
        connection is closed."""
        it = self._iterate(self._session.retrieve_many_stream(msgs, window), self._deadline())
        try:
            write: Callable[[bytes], object] | None = None
            for req in it:
                if type(req) is Deliver:
                    assert write is not None
                    write(req.data)
                    continue
                assert isinstance(req, MessageBoundary)
                if req.size is None:
                    write = open_file(req.msg).write
                else:
                    write = None
                    yield req.msg, req.size
        finally:
            it.close()

    def delete_many(self, msgs: Iterable[int], window: int = 16) -> int:
        """Mark each message of ``msgs`` deleted, pipelined when possible;
        returns how many were marked."""
        return self._run(self._session.delete_many(msgs, window))


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
) -> Client:
    """Connect to a POP3 server and return a ready ``Client`` (greeting read,
    CAPA asked, STLS done when asked for).

    ``tls=True`` (the default) is implicit TLS on port 995 (RFC 8314);
    ``starttls=True`` connects in plaintext (port 110) and requires STLS,
    failing with ``Pop3TLSError`` before any credential is sent when the
    server does not upgrade; ``tls=False`` alone is plaintext, where logins
    that reveal a secret need ``allow_insecure=True``. Certificates and host
    names are verified unless ``ssl_context`` says otherwise.
    ``connect_timeout`` and ``greeting_timeout`` default to ``timeout``.
    A server that closes the connection on CAPA is connected to again
    without CAPA."""
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
    # An ASCII name goes to getaddrinfo as bytes, as it is: a str would go
    # through the "idna" codec first (a long import, and a UnicodeError rather
    # than an OSError for a malformed name). getaddrinfo takes bytes; the
    # type stubs only say str.
    address = cast(str, host.encode("ascii")) if host.isascii() else host
    for capa, ctimeout, remaining in plan.attempts():
        try:
            sock = socket.create_connection((address, port), timeout=ctimeout)
        except TimeoutError as exc:
            raise Pop3TimeoutError(f"connecting to {host}:{port} timed out") from exc
        try:
            if implicit:
                assert context is not None
                sock = _handshake(sock, context, host, ctimeout)
            client = Client(
                sock,
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
            sock.close()
            raise
        try:
            client.open()
        except CapaClosedError:
            client.close()
            continue
        except BaseException:
            client.close()
            raise
        client.operation_timeout = operation_timeout
        return client
    raise CapaClosedError()  # pragma: no cover - the second try sends no CAPA


def tls_info_for(sock: ssl.SSLSocket) -> TLSInfo:
    """The channel-binding data of a finished client handshake."""
    return tls_info(sock, server_side=False)
