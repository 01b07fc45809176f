"""Kill points and disk faults for the data-safety cases (HARDENING 53, 56, 57).

Run as a program, this wraps the ``pop3proto`` command line with hooks at
named points of its file and protocol steps::

    python tests/faultkit.py --pause-at POINT:N --report FILE -- serve --maildir ...
    python tests/faultkit.py --log FILE -- fetch pop3://... --maildir ...

``--pause-at`` stops the process the N-th time it reaches POINT: it writes
``POINT:N`` to the report file and sleeps, so the caller can SIGKILL it at
exactly that step. ``--log`` runs to the end and writes every point reached,
one per line, so a caller can enumerate every step of a run. The hooks wrap
the calls from outside (``os.unlink``, ``os.fsync``, ``os.link``,
``os.write``, the Maildir commit, the UID store, the client's DELE and
QUIT): the project's code has no hook of its own.

Points (the server's deletion step, then the fetcher's per-message steps)::

    unlink-before unlink-after      a message file in cur/ or new/ removed
    dirsync-before dirsync-after    fsync of a cur/ or new/ directory
    commit-after                    the Maildir commit returned (+OK not sent yet)
    retr                            a retrieved message about to be written
    write-after                     a write into tmp/
    fsync-file-after                fsync of the file in tmp/
    link-after                      link (or rename) into new/
    intent-after                    the intents of a batch written to the UID store
    record-after                    the UIDs committed to the store
    dele-after                      every DELE answered, QUIT not sent
    quit-after                      QUIT answered

As a module it offers the scenarios the tests and ``benchmarks/faults.py``
share: :func:`server_kill_run` and :func:`fetch_kill_run`, each returning a
:class:`Outcome` whose checks must all hold.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
USER, PASSWORD = "alice", "secret"
LISTEN = re.compile(rb"listening on pop3://127\.0\.0\.1:(\d+)")

# =====================================================================================
# the hooks (inside the wrapped process)
# =====================================================================================


class _Points:
    def __init__(self, target: tuple[str, int] | None, report: str | None, log: str | None):
        self.target = target
        self.report = report
        self.log = open(log, "a", buffering=1) if log else None  # noqa: SIM115
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def hit(self, point: str) -> None:
        with self.lock:
            n = self.counts.get(point, 0) + 1
            self.counts[point] = n
            if self.log is not None:
                self.log.write(f"{point}:{n}\n")
            paused = self.target == (point, n)
        if paused:
            assert self.report is not None
            with open(self.report, "w") as f:
                f.write(f"{point}:{n}\n")
            while True:  # the caller kills us here
                time.sleep(3600)


def _fd_path(fd: int | None) -> str:
    if fd is None:
        return ""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def install(points: _Points) -> None:
    """Wrap the calls the points are named after."""
    from pop3proto.bindings import _sync_client, cli, maildrop, uidstore

    real_unlink, real_fsync, real_link = os.unlink, os.fsync, os.link
    real_rename, real_write = os.rename, os.write

    def in_message_dir(fd: int | None) -> bool:
        return os.path.basename(_fd_path(fd)) in ("cur", "new")

    def unlink(path: Any, *, dir_fd: int | None = None) -> None:
        message = in_message_dir(dir_fd)
        if message:
            points.hit("unlink-before")
        real_unlink(path, dir_fd=dir_fd)
        if message:
            points.hit("unlink-after")

    def fsync(fd: Any) -> None:
        path = _fd_path(fd)
        is_dir = os.path.basename(path) in ("cur", "new") and os.path.isdir(path)
        if is_dir:
            points.hit("dirsync-before")
        real_fsync(fd)
        if is_dir:
            points.hit("dirsync-after")
        elif os.path.basename(os.path.dirname(path)) == "tmp":
            points.hit("fsync-file-after")

    def link(*args: Any, **kw: Any) -> None:
        real_link(*args, **kw)
        points.hit("link-after")

    def rename(*args: Any, **kw: Any) -> None:
        real_rename(*args, **kw)
        if os.path.basename(_fd_path(kw.get("dst_dir_fd"))) == "new":
            points.hit("link-after")

    def write(fd: int, data: Any) -> int:
        n = real_write(fd, data)
        if os.path.basename(os.path.dirname(_fd_path(fd))) == "tmp":
            points.hit("write-after")
        return n

    os.unlink, os.fsync, os.link, os.rename = unlink, fsync, link, rename  # type: ignore[assignment,unused-ignore]
    os.write = write

    real_commit = maildrop._MaildirSession.commit

    def commit(self: Any, keys: Any) -> None:
        real_commit(self, keys)
        points.hit("commit-after")

    maildrop._MaildirSession.commit = commit  # type: ignore[method-assign,unused-ignore]

    real_begin = cli._Delivery.begin

    def begin(self: Any, *args: Any, **kw: Any) -> Any:
        points.hit("retr")
        return real_begin(self, *args, **kw)

    cli._Delivery.begin = begin  # type: ignore[method-assign,unused-ignore]

    real_intend, real_commit_uids = uidstore.UidStore.intend, uidstore.UidStore.commit

    def intend(self: Any, pairs: Any) -> None:
        real_intend(self, pairs)
        points.hit("intent-after")

    def commit_uids(self: Any) -> None:
        real_commit_uids(self)
        points.hit("record-after")

    uidstore.UidStore.intend = intend  # type: ignore[method-assign,unused-ignore]
    uidstore.UidStore.commit = commit_uids  # type: ignore[method-assign,unused-ignore]

    real_delete = cli._delete

    def delete(*args: Any, **kw: Any) -> list[int]:
        out: list[int] = real_delete(*args, **kw)
        points.hit("dele-after")
        return out

    cli._delete = delete

    real_quit = _sync_client.Client.quit

    def quit_(self: Any) -> bool:
        ok = bool(real_quit(self))
        points.hit("quit-after")
        return ok

    _sync_client.Client.quit = quit_  # type: ignore[method-assign,unused-ignore]


def _wrapper_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="faultkit.py")
    parser.add_argument("--pause-at", help="POINT:N")
    parser.add_argument("--report", help="file the pause is reported in")
    parser.add_argument("--log", help="file every point reached is appended to")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    target = None
    if ns.pause_at:
        point, n = ns.pause_at.rsplit(":", 1)
        target = (point, int(n))
    install(_Points(target, ns.report, ns.log))
    from pop3proto.bindings import cli

    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    return int(cli.main(args))


# =====================================================================================
# mailboxes
# =====================================================================================


def make_messages(count: int, seed: int = 0, size: int = 600) -> list[bytes]:
    """Distinct messages already in wire form (CRLF, final CRLF), with dot
    lines, so what a client stores is byte-identical to the file."""
    out = []
    for i in range(count):
        body = b"".join(
            b"line %d of message %d seed %d %s\r\n" % (j, i, seed, b"x" * ((i * 7 + j) % 50))
            for j in range(size // 40 + i % 5)
        )
        out.append(b"Subject: message %d\r\nX-Seed: %d\r\n\r\n.dot\r\n..two\r\n" % (i, seed) + body)
    return out


def fill_maildir(root: Path, messages: list[bytes]) -> dict[str, bytes]:
    """``root/alice`` with the messages (alternately in cur/ and new/);
    returns file name → content."""
    box = root / USER
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    files = {}
    for i, data in enumerate(messages):
        name = f"{1_700_000_000 + i}.M{i}P1.host" + (":2,S" if i % 2 else "")
        (box / ("cur" if i % 2 else "new") / name).write_bytes(data)
        files[name] = data
    return files


def maildir_files(box: Path) -> dict[str, bytes]:
    out = {}
    for sub in ("cur", "new"):
        d = box / sub
        if d.is_dir():
            for f in d.iterdir():
                out[f"{sub}/{f.name}"] = f.read_bytes()
    return out


# =====================================================================================
# running the wrapper
# =====================================================================================


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["POP3_PASSWORD"] = PASSWORD
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def wrapped(
    cli_args: list[str], workdir: Path, *, pause_at: str | None = None, log: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The wrapped command line in a subprocess; killed (by its pid) on exit."""
    report = workdir / "paused"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "faultkit.py")]
    if pause_at:
        cmd += ["--pause-at", pause_at, "--report", str(report)]
    if log:
        cmd += ["--log", str(log)]
    proc = subprocess.Popen(
        [*cmd, "--", *cli_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(workdir / "home"),
    )
    try:
        yield proc, report
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def wait_paused(proc: subprocess.Popen[bytes], report: Path, timeout: float = 20.0) -> str | None:
    """The point the process paused at, or None if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if report.exists():
            text = report.read_text().strip()
            if text:
                return text
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    raise TimeoutError("the process neither paused nor ended")


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# =====================================================================================
# scenario 53: the server killed during the deletion step
# =====================================================================================


@dataclass
class Outcome:
    """What one run showed; ``problems`` must stay empty."""

    point: str
    killed: bool = False
    checked: int = 0
    lost: int = 0
    truncated: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)

    def fail(self, text: str) -> None:
        self.problems.append(f"{self.point}: {text}")


def _serve_args(root: Path, users: Path) -> list[str]:
    return ["serve", "--maildir", str(root), "--users", str(users), "--listen", "127.0.0.1:0"]


def _pop_session(port: int, count: int, timeout: float = 10.0) -> bytes | None:
    """Log in, DELE every message, QUIT; the QUIT reply (None if the
    connection ended without one)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    buf = b""

    def line() -> bytes | None:
        nonlocal buf
        while b"\r\n" not in buf:
            try:
                data = sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            buf += data
        out, buf = buf.split(b"\r\n", 1)
        return out

    try:
        assert (line() or b"").startswith(b"+OK")
        for cmd in (b"USER alice", b"PASS secret"):
            sock.sendall(cmd + b"\r\n")
            assert (line() or b"").startswith(b"+OK"), cmd
        sock.sendall(b"".join(b"DELE %d\r\n" % i for i in range(1, count + 1)))
        for _ in range(count):
            assert (line() or b"").startswith(b"+OK")
        sock.sendall(b"QUIT\r\n")
        return line()
    finally:
        sock.close()


def _server_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = LISTEN.search(line)
    if not m:
        raise RuntimeError(f"server did not start: {line!r}")
    return int(m.group(1))


def server_points(workdir: Path, count: int) -> list[str]:
    """Every point one clean deletion step reaches (in order)."""
    root, users = _server_setup(workdir, count, 0)
    log = workdir / "points.log"
    log.unlink(missing_ok=True)
    with wrapped(_serve_args(root, users), workdir, log=log) as (proc, _):
        reply = _pop_session(_server_port(proc), count)
        assert reply is not None and reply.startswith(b"+OK"), reply
    wanted = ("unlink-", "dirsync-", "commit-")
    return [p for p in log.read_text().split() if p.startswith(wanted)]


def _server_setup(workdir: Path, count: int, seed: int) -> tuple[Path, Path]:
    root = workdir / "root"
    shutil.rmtree(root, ignore_errors=True)
    fill_maildir(root, make_messages(count, seed))
    users = workdir / "users"
    users.write_text(f"{USER}:{PASSWORD}\n")
    return root, users


def server_kill_run(workdir: Path, count: int, point: str, seed: int = 0) -> Outcome:
    """SIGKILL the server paused at ``point`` of its QUIT deletion step; then
    check each message is intact or gone, that the right number are gone,
    that no +OK was sent, and that a new session gets the lock."""
    from pop3proto.bindings.maildrop import Maildir

    out = Outcome(point)
    root, users = _server_setup(workdir, count, seed)
    originals = {name: data for name, data in maildir_files(root / USER).items()}
    by_content = {data: name for name, data in originals.items()}
    with wrapped(_serve_args(root, users), workdir, pause_at=point) as (proc, report):
        port = _server_port(proc)
        result: dict[str, bytes | None] = {}
        session = threading.Thread(target=lambda: result.update(quit=_pop_session(port, count)))
        session.start()
        paused = wait_paused(proc, report)
        if paused != point:
            out.fail(f"did not pause there (ended: {paused})")
            return out
        kill(proc)
        out.killed = True
        session.join(10)
    if result.get("quit") is not None:
        out.fail(f"QUIT answered although the server was killed: {result['quit']!r}")
    now = maildir_files(root / USER)
    for name, data in now.items():
        out.checked += 1
        if originals.get(name) != data:
            out.truncated += 1
            out.fail(f"{name} changed: {len(data)} octets, was {len(originals.get(name, b''))}")
    kind, n = point.rsplit(":", 1)
    gone = len(originals) - len(now)
    expected = {"unlink-before": int(n) - 1, "unlink-after": int(n)}.get(kind, len(originals))
    if gone != expected:
        out.fail(f"{gone} messages gone, expected {expected}")
    out.checked += len(originals) - len(now)
    # The stale lock is reclaimed: a new session opens and reads every survivor.
    try:
        with Maildir(root).open(USER) as session_:
            listed = {m.uid for m in session_.messages}
            for i, info in enumerate(session_.messages):
                with session_.open_message(i) as f:
                    if f.read() not in by_content:
                        out.fail(f"survivor {info.uid} unreadable or changed")
        if len(listed) != len(now):
            out.fail(f"{len(listed)} listed after restart, {len(now)} on disk")
    except Exception as exc:
        out.fail(f"the maildrop could not be opened after the kill: {exc!r}")
    return out


# =====================================================================================
# scenario 56: the fetcher killed at every step
# =====================================================================================


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def sync_server(root: Path) -> Iterator[int]:
    """Our threaded server over the Maildir ``root`` (in this process)."""
    from pop3proto.bindings.maildrop import Maildir
    from pop3proto.bindings.sync import Server

    import pop3proto as p
    from pop3proto._auth import FailureDelay, PasswordTable

    config = p.ServerConfig(
        authenticator=PasswordTable({USER: PASSWORD}), failure_delay=FailureDelay(base=0.0)
    )
    with Server(Maildir(root), config=config, listen=("127.0.0.1", 0)) as srv:
        yield srv.addresses[0][1]


def _fetch_args(port: int, target: Path) -> list[str]:
    return ["fetch", f"pop3://{USER}@127.0.0.1:{port}", "--maildir", str(target), "--timeout", "10"]


def fetch_points(workdir: Path, count: int) -> list[str]:
    """Every point one clean fetch of ``count`` messages reaches (in order)."""
    root = workdir / "server"
    shutil.rmtree(root, ignore_errors=True)
    fill_maildir(root, make_messages(count))
    target = workdir / "fetched"
    shutil.rmtree(target, ignore_errors=True)
    log = workdir / "points.log"
    log.unlink(missing_ok=True)
    with (
        sync_server(root) as port,
        wrapped(_fetch_args(port, target), workdir, log=log) as (
            proc,
            _,
        ),
    ):
        proc.wait(60)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    names = ("intent-", "retr", "write-", "fsync-file-", "link-", "dirsync-after", "record-")
    names += ("dele-", "quit-")
    return [p for p in log.read_text().split() if p.startswith(names)]


def fetch_kill_run(
    workdir: Path,
    count: int,
    point: str | None,
    seed: int = 0,
    finish: Callable[[int, Path], int] | None = None,
    kill_after: float | None = None,
) -> Outcome:
    """Run ``pop3proto fetch`` and SIGKILL it paused at ``point`` (or after
    ``kill_after`` seconds); check nothing is lost or truncated; then fetch
    again to the end (``finish``, default in this process) and check every
    message arrived, at most one of them twice, and the server is empty."""
    out = Outcome(point or f"after {kill_after:.3f}s")
    root = workdir / "server"
    shutil.rmtree(root, ignore_errors=True)
    messages = make_messages(count, seed)
    fill_maildir(root, messages)
    wanted = {_digest(m) for m in messages}
    target = workdir / "fetched"
    shutil.rmtree(target, ignore_errors=True)
    with sync_server(root) as port:
        with wrapped(_fetch_args(port, target), workdir, pause_at=point) as (proc, report):
            if point is not None:
                paused = wait_paused(proc, report)
                if paused != point:
                    out.fail(f"did not pause there (ended: {paused})")
                    return out
            else:
                assert kill_after is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(kill_after)
            if proc.poll() is None:
                kill(proc)
                out.killed = True
        # Right after the kill: nothing lost, nothing truncated.
        on_server = {_digest(d) for d in maildir_files(root / USER).values()}
        local = (
            [f.read_bytes() for f in (target / "new").iterdir()]
            if (target / "new").is_dir()
            else []
        )
        for data in local:
            out.checked += 1
            if _digest(data) not in wanted:
                out.truncated += 1
                out.fail(f"a delivered file of {len(data)} octets matches no message")
        missing = wanted - on_server - {_digest(d) for d in local}
        out.lost += len(missing)
        if missing:
            out.fail(f"{len(missing)} messages neither on the server nor delivered")
        # Fetch again, to the end.
        code = (finish or _finish_in_process)(port, target)
        if code != 0:
            out.fail(f"the second fetch exited {code}")
    final = [f.read_bytes() for f in (target / "new").iterdir()]
    digests = [_digest(d) for d in final]
    out.checked += len(final)
    lost = wanted - set(digests)
    out.lost += len(lost)
    if lost:
        out.fail(f"{len(lost)} messages lost after the second fetch")
    out.duplicates = len(digests) - len(set(digests))
    if out.duplicates > 1:
        out.fail(f"{out.duplicates} messages fetched twice")
    if set(digests) - wanted:
        out.fail("a delivered file matches no message")
    if maildir_files(root / USER):
        out.fail("messages left on the server after the second fetch")
    return out


def _finish_in_process(port: int, target: Path) -> int:
    from pop3proto.bindings import cli

    old = {k: os.environ.get(k) for k in ("POP3_PASSWORD",)}
    os.environ["POP3_PASSWORD"] = PASSWORD
    try:
        with (
            open(os.devnull, "w") as null,
            contextlib.redirect_stdout(null),
            contextlib.redirect_stderr(null),
        ):
            return int(cli.main(_fetch_args(port, target)))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    sys.exit(_wrapper_main(sys.argv[1:]))
