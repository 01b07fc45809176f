"""Every limit of DESIGN.md §6 is configurable, named when hit, and hit by a
test here or in test_connection.py."""

from __future__ import annotations

import pytest

import pop3proto as p

pytestmark = pytest.mark.usefixtures("backend")


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        p.Limits(max_line=0)
    assert p.Limits(max_line=100).max_line == 100


def test_max_buffer_named() -> None:
    conn = p.Connection(p.SERVER, limits=p.Limits(max_buffer=1000, max_line=8192))
    conn.send(p.Greeting("hi"))
    conn.receive_data(b"x" * 1500)
    with pytest.raises(p.LimitExceeded) as info:
        conn.next_event()
    assert info.value.limit == "max_buffer"
    assert "max_buffer" in info.value.error_text


def test_max_sasl_line_named() -> None:
    conn = p.Connection(p.SERVER, limits=p.Limits(max_sasl_line=1000))
    conn.send(p.Greeting("hi"))
    conn.receive_data(b"AUTH PLAIN\r\n")
    conn.next_event()
    conn.send(p.AuthChallenge(b""))
    conn.receive_data(b"A" * 2000)
    with pytest.raises(p.LimitExceeded) as info:
        conn.next_event()
    assert info.value.limit == "max_sasl_line"


def test_client_sasl_challenge_limit() -> None:
    conn = p.Connection(p.CLIENT, limits=p.Limits(max_sasl_line=100))
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    conn.send(p.Auth("LOGIN"))
    conn.receive_data(b"+ " + b"A" * 200 + b"\r\n")
    with pytest.raises(p.LimitExceeded):
        conn.next_event()


def test_max_pipeline_is_local() -> None:
    conn = p.Connection(p.CLIENT, pipelining=True, limits=p.Limits(max_pipeline=2))
    conn.receive_data(b"+OK\r\n")
    conn.next_event()
    conn.send(p.Capa())
    conn.send(p.Capa())
    with pytest.raises(p.LocalProtocolError):
        conn.send(p.Capa())
