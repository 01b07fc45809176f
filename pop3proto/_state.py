"""The POP3 session state, for both roles, in one table.

Both the client and the server engine derive the session state from the
command/reply pairs they have seen, through ``SessionState`` below; nothing
here asks which role it plays. A command that is not allowed is a lookup miss.
"""

from __future__ import annotations

import enum

from . import _events as ev

__all__ = ["SessionState", "State"]


class State(enum.Enum):
    """The POP3 session state (RFC 1939 §3), plus the engine's own end states."""

    #: Before the greeting has been seen.
    GREETING = "GREETING"
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    #: QUIT was sent in TRANSACTION; deletions are being applied.
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"
    ERROR = "ERROR"

    # Members are singletons compared by identity: hash them by identity too
    # (Enum's own __hash__ is Python code, run on every state-table lookup).
    __hash__ = object.__hash__


_A = State.AUTHORIZATION
_T = State.TRANSACTION

#: RFC 1939 §3-§7, RFC 2449 §5, RFC 2595 §4, RFC 5034 §4, RFC 6856 §2-3
#: (PROTOCOL.md §2.1): which command is allowed in which state.
ALLOWED: dict[State, frozenset[type[ev.Command]]] = {
    _A: frozenset(
        {
            ev.User,
            ev.Pass,
            ev.Apop,
            ev.Auth,
            ev.Stls,
            ev.Capa,
            ev.Utf8,
            ev.Lang,
            ev.Quit,
            ev.ExtensionCommand,
        }
    ),
    _T: frozenset(
        {
            ev.Capa,
            ev.Lang,
            ev.Quit,
            ev.Stat,
            ev.List,
            ev.Uidl,
            ev.Retr,
            ev.Top,
            ev.Dele,
            ev.Noop,
            ev.Rset,
            ev.ExtensionCommand,
        }
    ),
}

#: State changes when a command is *issued* (before its reply).
ON_COMMAND: dict[tuple[State, type[ev.Command]], State] = {
    (_T, ev.Quit): State.UPDATE,
}

#: State changes when a command gets a positive reply.
ON_SUCCESS: dict[tuple[State, type[ev.Command]], State] = {
    (_A, ev.Pass): _T,
    (_A, ev.Apop): _T,
    (_A, ev.Auth): _T,
    (_A, ev.Quit): State.CLOSED,
    (State.UPDATE, ev.Quit): State.CLOSED,
}

#: State changes when a command gets ``-ERR``. RFC 1939 §6: after QUIT the
#: session ends whatever the outcome of UPDATE.
ON_FAILURE: dict[tuple[State, type[ev.Command]], State] = {
    (_A, ev.Quit): State.CLOSED,
    (State.UPDATE, ev.Quit): State.CLOSED,
}

#: Commands after which nothing may be pipelined until the reply (and, for
#: STLS, the handshake) is done: RFC 2449 §6.6, RFC 2595 §4, RFC 5034 §4.
BARRIERS: frozenset[type[ev.Command]] = frozenset({ev.Stls, ev.Auth, ev.Quit})


class SessionState:
    """The session state that both ends track.

    ``state`` is the POP3 state; ``user_accepted`` says that the last
    AUTHORIZATION command was a successful USER (RFC 1939 §7: PASS is allowed
    only then); ``tls_active`` and ``utf8`` are the session's modes.
    """

    __slots__ = ("state", "tls_active", "user_accepted", "utf8")

    def __init__(self, *, tls_active: bool = False) -> None:
        self.state = State.GREETING
        self.user_accepted = False
        self.tls_active = tls_active
        self.utf8 = False

    def refusal(self, command: ev.Command, state: State | None = None) -> str | None:
        """Why ``command`` may not be issued now (in ``state``, by default the
        current one), or None when it may. The text is safe to send."""
        state = self.state if state is None else state
        kind = type(command)
        if kind not in ALLOWED.get(state, frozenset()):
            return "command not valid in this state"
        if kind is ev.Pass and not self.user_accepted:
            return "PASS must follow a successful USER"
        if kind is ev.Stls and (self.tls_active or self.utf8):
            # RFC 2595 §4: not when TLS is active; RFC 6856 §2.1: not after UTF8.
            return "STLS not permitted now"
        return None

    def greeting(self, ok: bool) -> None:
        """The greeting was seen: ``+OK`` opens AUTHORIZATION, ``-ERR`` ends it."""
        self.state = State.AUTHORIZATION if ok else State.CLOSED

    def issued(self, command: ev.Command) -> None:
        """``command`` has been sent (client) or received (server)."""
        self.state = ON_COMMAND.get((self.state, type(command)), self.state)

    def replied(self, command: ev.Command, ok: bool) -> None:
        """``command`` got its final reply."""
        kind = type(command)
        table = ON_SUCCESS if ok else ON_FAILURE
        self.state = table.get((self.state, kind), self.state)
        if self.state is _A:
            # RFC 1939 §7: PASS only right after a successful USER.
            self.user_accepted = kind is ev.User and ok
        if ok and kind is ev.Utf8:
            self.utf8 = True
        if self.state is not _A:
            self.user_accepted = False

    def project(self, command: ev.Command, state: State) -> State:
        """The state after ``command`` issued in ``state`` succeeds: what a
        client may assume for the commands it pipelines behind it."""
        state = ON_COMMAND.get((state, type(command)), state)
        return ON_SUCCESS.get((state, type(command)), state)
