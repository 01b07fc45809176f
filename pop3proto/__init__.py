"""pop3proto: a Sans-IO POP3 engine for clients and servers.

Bytes in, events out, bytes back; no sockets, threads, clocks or files::

    import pop3proto as p

    conn = p.Connection(p.CLIENT)
    conn.receive_data(b"+OK ready\\r\\n")
    conn.next_event()            # Greeting(text='ready', ...)
    sock.sendall(conn.send(p.Capa()))

The I/O lives in ``pop3proto.bindings`` (blocking sockets, asyncio, trio).
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._connection import CLIENT, SERVER, Connection, Role
from ._core import BACKEND
from ._events import (
    Apop,
    Auth,
    AuthCancel,
    AuthChallenge,
    AuthResponse,
    Capa,
    Capabilities,
    Command,
    ConnectionClosed,
    Data,
    Dele,
    DropListing,
    EndOfMessage,
    Err,
    Event,
    ExtensionCommand,
    Greeting,
    InvalidCommand,
    Lang,
    LanguageListing,
    List,
    MalformedChallenge,
    MechanismListing,
    MessageStart,
    Noop,
    Ok,
    Pass,
    Quit,
    Reply,
    ResponseCode,
    Retr,
    Rset,
    ScanListing,
    ScanListings,
    StartTLS,
    Stat,
    Stls,
    Top,
    Uidl,
    UniqueIdListing,
    UniqueIdListings,
    User,
    Utf8,
)
from ._limits import Limits
from ._requests import (
    TIMED_OUT,
    MaildropFailure,
    Pop3Error,
    Pop3TimeoutError,
    Pop3TLSError,
    TLSInfo,
)
from ._state import State

if TYPE_CHECKING:
    from ._server import ConnectionLimiter, ServerConfig, SessionSummary, serve_session
    from ._session import Mailbox, Retrieve, TopFilter, Update, wire_size
from ._util import (
    NEED_DATA,
    PAUSED,
    LimitExceeded,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)

__version__ = "0.1.0"

# The server driver and the maildrop rules (what only a server needs) load on
# first use, so a client pays nothing for them at start-up.
_LAZY = {
    "ConnectionLimiter": "_server",
    "ServerConfig": "_server",
    "SessionSummary": "_server",
    "serve_session": "_server",
    "Mailbox": "_session",
    "Retrieve": "_session",
    "TopFilter": "_session",
    "Update": "_session",
    "wire_size": "_session",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'pop3proto' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BACKEND",
    "CLIENT",
    "NEED_DATA",
    "PAUSED",
    "SERVER",
    "TIMED_OUT",
    "Apop",
    "Auth",
    "AuthCancel",
    "AuthChallenge",
    "AuthResponse",
    "Capa",
    "Capabilities",
    "Command",
    "Connection",
    "ConnectionClosed",
    "ConnectionLimiter",
    "Data",
    "Dele",
    "DropListing",
    "EndOfMessage",
    "Err",
    "Event",
    "ExtensionCommand",
    "Greeting",
    "InvalidCommand",
    "Lang",
    "LanguageListing",
    "LimitExceeded",
    "Limits",
    "List",
    "LocalProtocolError",
    "Mailbox",
    "MaildropFailure",
    "MalformedChallenge",
    "MechanismListing",
    "MessageStart",
    "Noop",
    "Ok",
    "Pass",
    "Pop3Error",
    "Pop3TLSError",
    "Pop3TimeoutError",
    "ProtocolError",
    "Quit",
    "RemoteProtocolError",
    "Reply",
    "ResponseCode",
    "Retr",
    "Retrieve",
    "Role",
    "Rset",
    "ScanListing",
    "ScanListings",
    "ServerConfig",
    "SessionSummary",
    "StartTLS",
    "Stat",
    "State",
    "Stls",
    "TLSInfo",
    "Top",
    "TopFilter",
    "Uidl",
    "UniqueIdListing",
    "UniqueIdListings",
    "Update",
    "User",
    "Utf8",
    "serve_session",
    "wire_size",
]
