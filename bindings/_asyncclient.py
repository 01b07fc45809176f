"""The methods the asyncio and trio clients share: each runs one of the
engine's ``ClientSession`` generators through the binding's own ``_run``."""

from __future__ import annotations

import inspect
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, cast, overload

from pop3proto import _requests as rq
from pop3proto._client import CapaClosedError, ClientSession, Driver, MessageBoundary
from pop3proto._events import Capabilities, Greeting
from pop3proto._requests import TLSInfo

from ._common import ClientBase

__all__ = ["AsyncClientMethods", "Connecting", "Writable"]

T = TypeVar("T")


class Writable(Protocol):
    """Where ``retrieve_into`` writes: ``write`` may return a coroutine."""

    def write(self, data: bytes, /) -> object: ...


class AsyncClientMethods(ClientBase):
    """POP3 operations as coroutines, for a binding that provides
    ``_session`` (a ``ClientSession``), ``_ssl_context``, ``_run`` and
    ``aclose``."""

    _session: ClientSession
    _ssl_context: ssl.SSLContext | None

    async def _run(self, gen: Driver[T], sink: Callable[[rq.Request], object] | None = None) -> T:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def open(self) -> Greeting:
        """Read the greeting, ask CAPA, and do STLS when it is required."""
        return await self._run(self._session.open())

    async def starttls(self, ssl_context: ssl.SSLContext | None = None) -> TLSInfo:
        """Upgrade with STLS now (``connect(starttls=True)`` does it for you)."""
        if ssl_context is not None:
            self._ssl_context = ssl_context
        return await self._run(self._session.starttls())

    async def capabilities(self, refresh: bool = False) -> Capabilities | None:
        """The server's CAPA reply (cached; ``refresh`` asks again), or None."""
        return await self._run(self._session.capabilities(refresh))

    async def login(
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
        await self._run(
            self._session.login(
                user,
                password,
                mechanism=mechanism,
                token=token,
                external=external,
                authzid=authzid,
            )
        )

    async def stat(self) -> tuple[int, int]:
        """``(message count, maildrop size)``."""
        return await self._run(self._session.stat())

    @overload
    async def list(self, msg: None = None) -> dict[int, int]: ...
    @overload
    async def list(self, msg: int) -> int: ...

    async def list(self, msg: int | None = None) -> dict[int, int] | int:
        """``{msg: size}``, or the size of one message."""
        if msg is None:
            return await self._run(self._session.list())
        return await self._run(self._session.list(msg))

    @overload
    async def uidl(self, msg: None = None) -> dict[int, str]: ...
    @overload
    async def uidl(self, msg: int) -> str: ...

    async def uidl(self, msg: int | None = None) -> dict[int, str] | str:
        """``{msg: unique-id}``, or the unique-id of one message."""
        if msg is None:
            return await self._run(self._session.uidl())
        return await self._run(self._session.uidl(msg))

    async def retrieve(self, msg: int) -> bytes:
        """The whole message (un-stuffed, line ends as the server sent them)."""
        return await self._run(self._session.retrieve(msg))

    async def retrieve_many_into(
        self,
        msgs: Iterable[int],
        open_file: Callable[[int], Writable | Awaitable[Writable]],
        window: int = 2,
        on_complete: Callable[[int, int], object] | None = None,
    ) -> int:
        """Stream each message of ``msgs``, in order, into the file that
        ``open_file(msg)`` returns (or, when it is a coroutine function,
        gives) when the message begins; nothing is held in memory. Then
        ``on_complete(msg, size)`` is called (and awaited when it returns
        a coroutine). Pipelined like the blocking client's
        ``retrieve_many_into``: the next message is asked for while one
        streams. A message answered ``-ERR`` gets no file and raises
        ``Pop3Error`` once the messages already asked for are delivered; if
        ``open_file``, ``write`` or ``on_complete`` raises, the connection
        is closed. Returns the number of messages delivered."""
        file: Writable | None = None

        async def opening(msg: int) -> None:
            nonlocal file
            opened = open_file(msg)
            file = await opened if inspect.isawaitable(opened) else opened

        def sink(req: rq.Request) -> object:
            nonlocal file
            if type(req) is rq.Deliver:
                assert file is not None
                return file.write(req.data)  # may return a coroutine
            boundary = cast(MessageBoundary, req)
            if boundary.size is None:
                return opening(boundary.msg)
            file = None
            return None if on_complete is None else on_complete(boundary.msg, boundary.size)

        return await self._run(self._session.retrieve_many_stream(msgs, window), sink)

    async def retrieve_into(self, msg: int, file: Writable) -> int:
        """Stream a message into ``file`` as it arrives; returns its size.
        ``file.write(bytes)`` may be a plain method or a coroutine (it is
        awaited then, e.g. a ``trio.wrap_file`` object). If ``write``
        raises, the connection is closed (the rest of the message cannot be
        skipped safely)."""
        return await self._run(
            self._session.retrieve_stream(msg),
            lambda req: file.write(cast(rq.Deliver, req).data),  # may return a coroutine
        )

    async def top(self, msg: int, lines: int) -> bytes:
        """The header and the first ``lines`` lines of the body."""
        return await self._run(self._session.top(msg, lines))

    async def delete(self, msg: int) -> None:
        """Mark a message deleted (removed when QUIT succeeds)."""
        await self._run(self._session.delete(msg))

    async def reset(self) -> None:
        """Unmark every message marked deleted."""
        await self._run(self._session.reset())

    async def noop(self) -> None:
        """NOOP."""
        await self._run(self._session.noop())

    async def utf8(self) -> None:
        """Enter UTF-8 mode (RFC 6856)."""
        await self._run(self._session.utf8())

    async def quit(self) -> bool:
        """QUIT and close. True when the server confirmed with ``+OK`` (the
        deletions were applied); False when it answered ``-ERR`` or just
        closed (deletions uncertain)."""
        try:
            return await self._run(self._session.quit())
        finally:
            await self.aclose()

    async def delete_many(self, msgs: Iterable[int], window: int = 16) -> int:
        """Mark each message of ``msgs`` deleted, pipelined when possible;
        returns how many were marked."""
        return await self._run(self._session.delete_many(msgs, window))


class _Opens(Protocol):
    operation_timeout: float | None

    async def open(self) -> Greeting: ...

    async def aclose(self) -> None: ...


async def opened(client: _Opens, operation_timeout: float | None) -> bool:
    """Open a freshly connected ``client`` (greeting, CAPA, STLS). False when
    the server closed the connection on CAPA, so the caller connects again
    without it; any other failure closes the client and is raised. Then the
    caller's operation timeout applies from here on."""
    try:
        await client.open()
    except CapaClosedError:
        await client.aclose()
        return False
    except BaseException:
        await client.aclose()
        raise
    client.operation_timeout = operation_timeout
    return True


class _Closes(Protocol):
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


C = TypeVar("C", bound=_Closes)


class Connecting(Generic[C]):
    """What an async ``connect()`` returns: ``await`` it for a client, or use
    it as ``async with connect(...) as client:`` (QUIT on a normal exit)."""

    def __init__(self, opening: Callable[[], Coroutine[Any, Any, C]]) -> None:
        self._opening = opening
        self._client: C | None = None

    def __await__(self) -> Generator[Any, None, C]:
        return self._opening().__await__()

    async def __aenter__(self) -> C:
        self._client = await self._opening()
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(exc_type, exc, tb)
