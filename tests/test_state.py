"""The one state table (pop3proto._state)."""

from __future__ import annotations

import pop3proto as p
from pop3proto._state import ALLOWED, SessionState, State


def test_matrix_matches_rfc_1939() -> None:
    auth, trans = ALLOWED[State.AUTHORIZATION], ALLOWED[State.TRANSACTION]
    for cmd in (p.User, p.Pass, p.Apop, p.Auth, p.Stls, p.Utf8):
        assert cmd in auth and cmd not in trans
    for cmd in (p.Stat, p.List, p.Retr, p.Dele, p.Noop, p.Rset, p.Top, p.Uidl):
        assert cmd in trans and cmd not in auth
    for cmd in (p.Capa, p.Lang, p.Quit):
        assert cmd in auth and cmd in trans


def test_transitions() -> None:
    s = SessionState()
    assert s.refusal(p.User("u")) is not None  # before the greeting
    s.greeting(True)
    assert s.refusal(p.Pass("x")) == "PASS must follow a successful USER"
    s.replied(p.User("u"), True)
    assert s.refusal(p.Pass("x")) is None
    s.replied(p.Capa(), True)
    assert s.refusal(p.Pass("x")) is not None  # only *directly* after USER
    s.replied(p.User("u"), True)
    s.replied(p.Pass("x"), True)
    assert s.state is State.TRANSACTION
    s.issued(p.Quit())
    assert s.state is State.UPDATE
    s.replied(p.Quit(), False)
    assert s.state is State.CLOSED


def test_stls_refused_with_tls_or_after_utf8() -> None:
    s = SessionState(tls_active=True)
    s.greeting(True)
    assert s.refusal(p.Stls()) is not None
    s2 = SessionState()
    s2.greeting(True)
    s2.replied(p.Utf8(), True)
    assert s2.refusal(p.Stls()) is not None


def test_err_greeting_closes() -> None:
    s = SessionState()
    s.greeting(False)
    assert s.state is State.CLOSED
