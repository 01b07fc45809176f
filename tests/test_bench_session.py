"""benchmarks/bench_session.py runs end to end (a smoke run, no timing checked)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_session.py"


def test_bench_session_runs_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pop3proto._ccore", reason="compiled core not built")
    spec = importlib.util.spec_from_file_location("bench_session", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_session"] = module
    try:
        spec.loader.exec_module(module)
        # The sessions really run: a full one sends the greeting, 16 replies
        # and 10 messages of 3 KB.
        assert module.server_session(module.make_config(), module.memory_maildrop()) > 30_000
        assert module.main(["--sessions", "3", "--repeat", "1", "--messages", "20"]) == 0
    finally:
        sys.modules.pop("bench_session", None)
    out = capsys.readouterr().out
    for case in ("memory maildrop", "Maildir", "client, 20 RETR"):
        assert case in out
