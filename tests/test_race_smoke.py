"""Smoke test of ``benchmarks/race.py``: one ``--quick`` run with tiny mailboxes.

It checks that every part of the race works end to end (each client job
delivers every message, each server answers every load session, the tables and
the JSON are written), not how fast anything is. Skips when Dovecot is missing
(fails under ``CI=true``, like every real-peer test); clients that are not
installed are left out by the race itself, and must then be absent from its
results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peers import require_program

pytestmark = pytest.mark.peers

ROOT = Path(__file__).resolve().parent.parent
RACE = ROOT / "benchmarks" / "race.py"
TINY = [
    "--quick",
    "--box-a", "12x20000",
    "--box-b", "2x200000",
    "--duration", "1",
    "--concurrency", "8",
    "--pause", "0.2",
]  # fmt: skip


def _present(client: str) -> bool:
    program = {"mpop": "mpop", "fetchmail": "fetchmail", "getmail": "getmail"}.get(
        client.split("-")[0]
    )
    if program is None:
        return True
    return (Path(sys.executable).parent / program).exists() or shutil.which(program) is not None


def test_quick_race_runs_every_part(tmp_path: Path) -> None:
    require_program("dovecot")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        for program in ("mpop", "fetchmail"):  # .ci/run installs them: no silent gaps
            require_program(program)
    out = tmp_path / "race.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run(
        [sys.executable, str(RACE), *TINY, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    clients = doc["client_race"]
    expected = {c for c in doc["settings"]["clients"] if _present(c)}
    assert {r["name"] for r in clients} == expected
    for row in clients:
        assert row["runs_ok"] == row["runs"] == 1, (row["name"], row["problems"])
        assert row["warmup"]["ok"], (row["name"], row["warmup"]["problem"])
        assert row["mb_per_s"] > 0 and row["cpu_s"] > 0
    fetch = [r for r in clients if r["client"] == "fetch"]
    assert {(r["mailbox"], r["tls"], r["place"]) for r in fetch} == {
        (box, tls, place) for box in "AB" for tls in ("plain", "tls") for place in ("shm", "disk")
    }
    if any(r["client"] == "mpop" for r in clients):
        assert all("vs_mpop" in r for r in fetch)

    servers = doc["server_race"]
    assert {(r["server"], r["mode"]) for r in servers} == {
        (s, m) for s in ("dovecot", "serve-w1", "serve-w2") for m in ("plain", "stls", "tls")
    }
    for row in servers:
        assert row["sessions_ok"] > 0, row
        assert row["errors"] == 0, (row["server"], row["mode"], row["error_samples"])
        # every session fetched its 10 messages
        assert row["load"]["messages"] == 10 * row["sessions_ok"]
        if row["server"] != "dovecot":
            assert row["vs_dovecot"]["sessions_per_s"] > 0

    assert "| mailbox | transport | client |" in proc.stdout
    assert "| server | concurrent | transport |" in proc.stdout
    assert doc["targets"] and all(t.startswith(("met", "MISSED")) for t in doc["targets"])
