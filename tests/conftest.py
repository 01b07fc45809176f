"""Shared pytest configuration for the pop3proto test suite."""

from __future__ import annotations

import pytest

# --- real third-party peers (tests/peers.py) ---------------------------------
# Re-exported so every test module can request the session-scoped `dovecot`
# fixture; import helpers with `from peers import run_curl, ...`.
# (tests/ is not a package: pytest puts it on sys.path, as for `helpers`.)
from peers import dovecot

__all__ = ["dovecot"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "peers: talks to real third-party POP3 programs (Dovecot, curl, mpop, fetchmail); "
        "deselect with -m 'not peers'",
    )


# --- end of real third-party peers --------------------------------------------


# --- engine backends -----------------------------------------------------------
import importlib  # noqa: E402
import os  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pop3proto._core as _core  # noqa: E402


@pytest.fixture(params=["python", "cffi"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test once on the pure-Python core and once on the compiled one.

    The compiled core is required under CI (``.ci/run`` builds it); locally a
    missing build skips with a reason."""
    name = request.param
    module = "pop3proto._purecore" if name == "python" else "pop3proto._ccore"
    try:
        impl = importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"compiled core not built: {exc}")
        pytest.skip(f"compiled core not built: {exc}")
    monkeypatch.setattr(_core, "unstuff", impl.unstuff)
    monkeypatch.setattr(_core, "stuff", impl.stuff)
    monkeypatch.setattr(_core, "parse_listing", impl.parse_listing)
    monkeypatch.setattr(_core, "BACKEND", name)
    yield name


# --- end of engine backends ------------------------------------------------------


# --- credentials ---------------------------------------------------------------------
from pathlib import Path  # noqa: E402


@pytest.fixture
def no_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $POP3_PASSWORD, no $POP3_TOKEN and an empty home (no ~/.netrc): a
    command-line login gets only the credentials its test gives it."""
    monkeypatch.delenv("POP3_PASSWORD", raising=False)
    monkeypatch.delenv("POP3_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))
