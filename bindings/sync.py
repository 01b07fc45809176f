"""The blocking-socket binding: a POP3 client and a POP3 server built on the
standard library's ``socket`` and ``ssl``. All protocol decisions come from
the engine's drivers; this module only moves bytes."""

from __future__ import annotations

# --- server ---
from ._sync_server import Server

__all__ = ["Server"]

# --- client (re-exported from ._sync_client) ---
from ._sync_client import (
    CapaClosedError,
    Client,
    Pop3Error,
    Pop3TimeoutError,
    Pop3TLSError,
    connect,
)

__all__ += ["CapaClosedError", "Client", "Pop3Error", "Pop3TLSError", "Pop3TimeoutError", "connect"]
# --- end client ---
