"""Data safety under process kills and disk faults (HARDENING 53, 56, 57).

* 53: ``pop3proto serve --maildir`` SIGKILLed at every step of its QUIT
  deletion (before and after each unlink, before and after each directory
  fsync, after the commit and before the ``+OK``): each message intact or
  gone, never truncated, exactly the expected ones gone, no ``+OK``, and the
  lock of the dead process reclaimed by the next session.
* 56: ``pop3proto fetch`` SIGKILLed at every step (after RETR, after the
  write, after the fsync, after the link, after the fsync of new/, after the
  UID store's intents and after its commit, after DELE, after QUIT):
  nothing lost or truncated; a second fetch completes with no message
  fetched twice (the bound HARDENING asks for is one).
* 57: ENOSPC and EIO on write, fsync, link, rename, the fsync of new/ and the
  UID store → no DELE, tmp/ cleaned, exit 1; and a real full file system (a
  1 MiB tmpfs, where mounting is allowed).

The kill points are enumerated from a clean run (``tests/faultkit.py`` logs
every point reached), so "every step" means every step that run took.
``benchmarks/faults.py`` runs the same scenarios with more messages, more
seeds and timed kills, and prints the counts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faultkit
import pytest
from pop3proto.bindings import cli
from pop3proto.bindings.maildrop import MemoryMaildrop
from pop3proto.bindings.sync import Server

import pop3proto as p
from pop3proto._auth import FailureDelay, PasswordTable

COUNT = 2  # one message in cur/, one in new/: every kind of step, twice


@pytest.fixture(scope="module")
def server_points(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    points = faultkit.server_points(tmp_path_factory.mktemp("points"), COUNT)
    assert [x.split(":")[0] for x in points].count("unlink-before") == COUNT
    assert "dirsync-before:1" in points and points[-1] == "commit-after:1"
    return points


@pytest.fixture(scope="module")
def fetch_points(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    points = faultkit.fetch_points(tmp_path_factory.mktemp("points"), COUNT)
    for step in ("retr", "write-after", "fsync-file-after", "link-after"):
        assert f"{step}:{COUNT}" in points, (step, points)
    # One intent write before the batch, one fsync of new/ and one commit of
    # the UID store after it: the batch is durable together.
    for step in ("intent-after", "dirsync-after", "record-after"):
        assert f"{step}:1" in points, (step, points)
    assert points.index("intent-after:1") < points.index("retr:1")
    assert points.index("dirsync-after:1") < points.index("record-after:1")
    assert points[-2:] == ["dele-after:1", "quit-after:1"]
    return points


def test_case_53_server_killed_at_every_deletion_step(
    server_points: list[str], tmp_path: Path
) -> None:
    outcomes = [faultkit.server_kill_run(tmp_path, COUNT, point) for point in server_points]
    problems = [problem for o in outcomes for problem in o.problems]
    assert problems == []
    assert all(o.killed for o in outcomes)
    assert sum(o.checked for o in outcomes) == COUNT * len(server_points)


def test_case_56_fetch_killed_at_every_step(fetch_points: list[str], tmp_path: Path) -> None:
    outcomes = [faultkit.fetch_kill_run(tmp_path, COUNT, point) for point in fetch_points]
    problems = [problem for o in outcomes for problem in o.problems]
    assert problems == []
    assert all(o.killed for o in outcomes)
    assert sum(o.lost for o in outcomes) == 0
    # Killed between link and commit, the intents find the message in new/:
    # not even one is fetched twice.
    assert [o.point for o in outcomes if o.duplicates] == []


# ---------------------------------------------------------------------------
# 57: disk errors
# ---------------------------------------------------------------------------

MESSAGES = faultkit.make_messages(4, seed=57)


@contextlib.contextmanager
def memory_server(messages: list[bytes]) -> Iterator[tuple[MemoryMaildrop, int]]:
    maildrop = MemoryMaildrop({faultkit.USER: messages})
    config = p.ServerConfig(
        authenticator=PasswordTable({faultkit.USER: faultkit.PASSWORD}),
        failure_delay=FailureDelay(base=0.0),
    )
    with Server(maildrop, config=config, listen=("127.0.0.1", 0)) as srv:
        yield maildrop, srv.addresses[0][1]


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def fetch(port: int, target: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(faultkit._fetch_args(port, target))
    return code, capsys.readouterr().err


FAULTS = ["write", "fsync", "link", "rename", "dirsync", "store-write", "store-fsync"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("fault", FAULTS)
def test_case_57_disk_errors_stop_before_any_dele(
    fault: str,
    code: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The second message's ``fault`` fails: exit 1, no DELE, tmp/ empty,
    what was delivered is byte-exact; a later run delivers the rest, none
    twice."""
    target = tmp_path / "Maildir"
    tmp_dir, new_dir = str(target / "tmp"), str(target / "new")
    store_dir = str(target / "pop3proto-uids")
    real = {name: getattr(os, name) for name in ("write", "fsync", "link", "rename")}
    seen: dict[str, int] = {}

    # new/ is fsynced once per batch (the four messages are one): its first
    # fsync fails; every other step fails the second time it is taken.
    nth = 1 if fault == "dirsync" else 2

    def trip(kind: str) -> None:
        seen[kind] = seen.get(kind, 0) + 1
        if kind == fault and seen[kind] == nth:
            raise OSError(code, os.strerror(code))

    def write(fd: int, data: Any) -> int:
        path = _fd_path(fd)
        if path.startswith(tmp_dir + "/"):
            trip("write")
        elif path.startswith(store_dir + "/"):
            trip("store-write")
        return int(real["write"](fd, data))

    def fsync(fd: int) -> None:
        path = _fd_path(fd)
        if path.startswith(tmp_dir + "/"):
            trip("fsync")
        elif path == new_dir:
            trip("dirsync")
        elif path.startswith(store_dir + "/"):
            trip("store-fsync")
        real["fsync"](fd)

    def link(*args: Any, **kw: Any) -> None:
        if fault == "rename":  # a file system without hard links: rename instead
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        trip("link")
        real["link"](*args, **kw)

    def rename(*args: Any, **kw: Any) -> None:
        if os.path.basename(_fd_path(kw.get("dst_dir_fd", -1))) == "new":
            trip("rename")
        real["rename"](*args, **kw)

    monkeypatch.setenv("POP3_PASSWORD", faultkit.PASSWORD)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with memory_server(MESSAGES) as (maildrop, port):
        with monkeypatch.context() as m:
            m.setattr(os, "write", write)
            m.setattr(os, "fsync", fsync)
            m.setattr(os, "link", link)
            m.setattr(os, "rename", rename)
            status, err = fetch(port, target, capsys)
        assert seen.get(fault, 0) >= nth, (fault, seen)  # the fault really fired
        assert status == cli.EXIT_FAILED
        assert "without deleting anything" in err
        assert maildrop.contents(faultkit.USER) == MESSAGES  # no DELE reached the server
        assert list((target / "tmp").iterdir()) == []
        got = [f.read_bytes() for f in (target / "new").iterdir()]
        assert all(data in MESSAGES for data in got)
        assert len(got) <= 2
        status, err = fetch(port, target, capsys)
        assert status == 0, err
        assert maildrop.contents(faultkit.USER) == []
    final = [f.read_bytes() for f in (target / "new").iterdir()]
    assert sorted(final) == sorted(MESSAGES)  # each exactly once


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root with CAP_SYS_ADMIN, as CI has)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"cannot mount a tmpfs as root under CI: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_case_57_real_full_file_system(
    tiny_fs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Eight 300 KB messages into 1 MiB: the disk really fills mid-message;
    nothing is deleted, tmp/ is left empty, what arrived is whole."""
    messages = faultkit.make_messages(8, seed=3, size=300_000)
    target = tiny_fs / "Maildir"
    monkeypatch.setenv("POP3_PASSWORD", faultkit.PASSWORD)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with memory_server(messages) as (maildrop, port):
        status, err = fetch(port, target, capsys)
        assert status == cli.EXIT_FAILED, err
        assert "without deleting anything" in err
        assert "No space left" in err
        assert maildrop.contents(faultkit.USER) == messages
    assert list((target / "tmp").iterdir()) == []
    got = [f.read_bytes() for f in (target / "new").iterdir()]
    assert 1 <= len(got) < len(messages)
    assert all(data in messages for data in got)
