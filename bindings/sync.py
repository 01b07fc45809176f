"""The blocking-socket binding: a POP3 client and a POP3 server built on the
standard library's ``socket`` and ``ssl``. All protocol decisions come from
the engine's drivers; this module only moves bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._sync_client import (
    CapaClosedError,
    Client,
    Pop3Error,
    Pop3TimeoutError,
    Pop3TLSError,
    connect,
)

if TYPE_CHECKING:
    from ._sync_server import Server

__all__ = [
    "CapaClosedError",
    "Client",
    "Pop3Error",
    "Pop3TLSError",
    "Pop3TimeoutError",
    "Server",
    "connect",
]


def __getattr__(name: str) -> Any:
    # The server loads on first use: a client does not pay for it at start-up.
    if name == "Server":
        from ._sync_server import Server

        return Server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
