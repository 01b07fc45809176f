"""Events: value semantics, response codes, capabilities."""

from __future__ import annotations

import pytest

import pop3proto as p


def test_events_are_values() -> None:
    assert p.Retr(1) == p.Retr(1) and p.Retr(1) != p.Retr(2)
    assert hash(p.Ok("x")) == hash(p.Ok("x"))
    with pytest.raises(AttributeError):
        p.Retr(1).msg = 2  # type: ignore[misc]


def test_secrets_never_in_repr() -> None:
    assert "hunter2" not in repr(p.Pass("hunter2"))
    assert "hunter2" not in repr(p.Auth("PLAIN", b"\0u\0hunter2"))
    assert "hunter2" not in repr(p.AuthResponse(b"hunter2"))


def test_response_code_levels() -> None:
    code = p.ResponseCode.parse("sys/temp/extra")
    assert code.levels == ("SYS", "TEMP", "EXTRA")
    assert code.is_("SYS/TEMP") and code.is_("sys") and not code.is_("SYS/PERM")
    assert str(p.ResponseCode.parse("LOGIN-DELAY 900")) == "LOGIN-DELAY 900"


def test_capabilities_mapping() -> None:
    caps = p.Capabilities(
        [("sasl", ("PLAIN", "login")), ("EXPIRE", ("0", "USER")), ("LOGIN-DELAY", ("x",))]
    )
    assert dict(caps) == {
        "SASL": ("PLAIN", "login"),
        "EXPIRE": ("0", "USER"),
        "LOGIN-DELAY": ("x",),
    }
    assert caps.sasl == ("PLAIN", "LOGIN")
    assert caps.expire == (0, True)
    assert caps.login_delay is None  # not a number: ignored, not guessed
    assert 5 not in caps and "Sasl" in caps
    assert p.Capabilities().implementation is None
