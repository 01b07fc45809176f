"""Race pop3proto against the established POP3 programs, in one run.

    python benchmarks/race.py [--quick] [--runs 3] [--duration 10] [--json FILE]
                              [--parts client,server] [--clients LIST] [--servers LIST]
                              [--client-tls plain,tls] [--load-modes plain,stls,tls]
                              [--concurrency 200,1000] [--box-a 2000x50000] [--box-b 20x5000000]

1. Client race. A private loopback Dovecot (``tests/peers.py``, default
   login mode) serves mailbox A (user ``boxa``, 2000 x 50 KB) and mailbox B
   (user ``boxb``, 20 x 5 MB), over plaintext and implicit TLS. Each client
   runs as its own process and retrieves every message, deleting nothing:

   ``fetch-shm``/``fetch-disk``: ``pop3proto fetch --keep`` into a Maildir on
   tmpfs (``/dev/shm``) or on disk (under ``$TMPDIR``), a fresh Maildir and UID
   store per run (``--no-stls`` on the plaintext port, as the others do not
   upgrade); ``mpop-shm``/``mpop-disk``: mpop (pipelining on, keep on,
   ``only_new off``) into the same places; ``fetchmail``: ``--keep --all`` to
   ``bsmtp /dev/null``; ``getmail``: getmail6 into a Maildir on disk
   (``read_all``, no delete; run as root it delivers as ``nobody``, as it
   refuses root); ``poplib``: a small stdlib client (``RETR 1..N``). All log
   in with USER/PASS (``fetch`` through ``;AUTH=+USER`` in its URL).

   Per run: wall time from start to exit, the client's CPU (user+sys of the
   process and its children, from ``os.wait4``), its peak RSS (``/usr/bin/time
   -f %M`` when present: ``ru_maxrss`` of a child forked from this process
   would include this process's own memory), and Dovecot's CPU (its process
   tree, from ``/proc``). One warm-up run per client (checked: every message
   delivered, and for ``fetch`` every file's SHA-256 matches the manifest),
   then ``--runs`` rounds that run every client in turn; medians. MB = 10^6
   octets of LIST sizes, as in the baselines.

2. Server race. ``pop3proto serve`` (asyncio on uvloop, ``--workers`` 1 and
   2, Maildirs on disk, a credential file with the load users' plaintext
   passwords, like Dovecot's passdb) against a second Dovecot in its
   "high-performance" login mode (``login_mode="perf"``), all started before
   the race (``serve --max-per-address`` above the concurrency, since every
   session comes from 127.0.0.1; Dovecot allows 1000 sessions per user and
   address) and loaded in turn by the same client (``benchmarks/race_load.py``,
   one process, uvloop): ``--concurrency`` sessions at once for
   ``--duration`` seconds, worker *i* logged in as ``load{i:04d}`` (10
   messages of ~3 KB each), each session connect, greeting, [STLS],
   USER/PASS, STAT, UIDL, RETR 1..10, QUIT; plaintext, STLS and implicit
   TLS. Reported: sessions/s completed inside the window, session and login
   latency percentiles, errors, server and client CPU per session, ratios to
   Dovecot.

Client and servers share the machine's cores. Prints two Markdown tables and
whether each target was met; ``--json FILE`` writes everything, every run
included. Servers listen on 127.0.0.1 only and are stopped by pid; every
loop is bounded. ``--quick`` shrinks everything to a one-minute smoke run.
Missing third-party clients are left out with a note; Dovecot is required.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PASSWORD = "secret"
LOOPBACK = "127.0.0.1"
SHM = Path("/dev/shm")

CLIENTS = ("fetch-shm", "fetch-disk", "mpop-shm", "mpop-disk", "fetchmail", "getmail", "poplib")
SERVERS = ("dovecot", "serve-w1", "serve-w2")
LOAD_MODES = ("plain", "stls", "tls")
#: messages per load user and their size
LOAD_MESSAGES = (10, 3000)
#: a client run taking longer than this is killed and counted as failed
CLIENT_TIMEOUT = 300.0

#: The children's environment: compiled bytecode is cached (privately, see
#: ``main``), as an installed package would have it.
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _note(text: str) -> None:
    print(f"race: {text}", file=sys.stderr, flush=True)


# ====================================================================== measuring


@dataclass
class Measured:
    """One finished child process."""

    wall: float
    user: float
    sys: float
    rss_mb: float | None
    code: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def _time_program() -> str | None:
    for path in ("/usr/bin/time", "/bin/time"):
        if os.access(path, os.X_OK):
            return path
    return None


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = CLIENT_TIMEOUT,
    rss: bool = True,
) -> Measured:
    """Run ``cmd`` to its end (killed after ``timeout``): wall, CPU, peak RSS, output."""
    timer_prog = _time_program() if rss else None
    with tempfile.TemporaryDirectory(prefix="pop3proto-race-run-") as tmp:
        out_path, err_path, rss_path = (os.path.join(tmp, n) for n in ("out", "err", "rss"))
        argv = list(cmd)
        if timer_prog is not None:
            argv = [timer_prog, "-f", "%M", "-o", rss_path, *argv]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env if env is not None else _ENV,
                start_new_session=True,
            )
            expired = threading.Event()

            def kill() -> None:
                expired.set()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group this call created

            timer = threading.Timer(timeout, kill)
            timer.start()
            try:
                _pid, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        rss_mb: float | None = None
        if timer_prog is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                lines = Path(rss_path).read_text().split()
                rss_mb = int(lines[-1]) / 1024.0
        return Measured(
            wall=wall,
            user=usage.ru_utime,
            sys=usage.ru_stime,
            rss_mb=rss_mb,
            code=proc.returncode,
            stdout=Path(out_path).read_text(errors="replace"),
            stderr=Path(err_path).read_text(errors="replace")[-3000:],
            timed_out=expired.is_set(),
        )


_HZ = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int | None) -> float | None:
    """CPU seconds used so far by process ``root`` and all its descendants,
    including the children they have reaped (``/proc``); None if it is gone."""
    if root is None:
        return None
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                text = f.read()
        except OSError:
            continue
        rest = text[text.rindex(b")") + 2 :].split()
        ppid = int(rest[1])
        cpu = sum(int(x) for x in rest[11:15]) / _HZ  # utime stime cutime cstime
        stats[int(entry)] = (ppid, cpu)
    if root not in stats:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    seen: set[int] = set()
    while todo and len(seen) < 100_000:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# ====================================================================== client race


@dataclass
class Box:
    """A mailbox on Dovecot: ``count`` messages of about ``size`` octets."""

    name: str
    user: str
    count: int
    size: int
    octets: int = 0  # sum of LIST sizes
    returned: int = 0  # sum of the octets a client hands back
    sha256: frozenset[str] = frozenset()


@dataclass
class Job:
    """One client on one mailbox over one transport."""

    client: str
    place: str
    cmd: list[str]
    env: dict[str, str]
    prep: Callable[[], None]
    check: Callable[[Measured, bool], str | None]
    runs: list[dict[str, Any]] = field(default_factory=list)
    warmup: dict[str, Any] | None = None


def _fresh_maildir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True)


def _count_new(path: Path) -> int:
    try:
        return sum(1 for e in os.scandir(path / "new") if e.is_file())
    except OSError:
        return -1


def _check_maildir(path: Path, box: Box, verify: bool) -> Callable[[Measured, bool], str | None]:
    def check(m: Measured, first: bool) -> str | None:
        if m.code != 0:
            return f"exit {m.code}: {m.stderr.strip()[-300:]}"
        got = _count_new(path)
        if got != box.count:
            return f"{got} files in new/, want {box.count}"
        if verify and first:
            digests = set()
            for e in os.scandir(path / "new"):
                with open(e.path, "rb") as f:
                    digests.add(hashlib.sha256(f.read()).hexdigest())
            if digests != set(box.sha256):
                return "delivered files differ from the manifest"
        return None

    return check


def _check_exit(m: Measured, _first: bool) -> str | None:
    return None if m.code == 0 else f"exit {m.code}: {m.stderr.strip()[-300:]}"


def _script(name: str) -> str | None:
    """The real executable ``name`` next to this interpreter (not a shim), or on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _unprivileged() -> tuple[str, int, int] | None:
    """(name, uid, gid) of the "nobody" account, if there is one."""
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return pw.pw_name, pw.pw_uid, pw.pw_gid


def _mpop_value(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_job(
    client: str, box: Box, tls: bool, dovecot: Any, places: dict[str, Path], work: Path
) -> Job | None:
    """The :class:`Job` for ``client`` on ``box``; None when the program is missing."""
    port = dovecot.tls_port if tls else dovecot.port
    ca = str(dovecot.cafile)
    tag = f"{client}-{box.name}-{'tls' if tls else 'plain'}"
    place = "disk" if client.endswith("disk") or client == "getmail" else "shm"
    if client in ("fetchmail", "poplib"):
        place = "-"
    scratch = work / "jobs" / tag
    scratch.mkdir(parents=True, exist_ok=True)
    if client.startswith("fetch-"):
        exe = _script("pop3proto")
        base = [exe] if exe else [sys.executable, "-m", "pop3proto.bindings"]
        md = places[place] / f"{tag}-maildir"
        scheme = "pop3s" if tls else "pop3"
        # USER/PASS like every other client here (fetch's default is the
        # strongest mechanism offered: SCRAM, a PBKDF2 run on both sides).
        cmd = [*base, "fetch", f"{scheme}://{box.user};AUTH=+USER@{LOOPBACK}:{port}"]
        cmd += ["--maildir", str(md), "--keep", "--quiet"]
        cmd += ["--cafile", ca] if tls else ["--no-stls"]
        return Job(
            client,
            place,
            cmd,
            dict(_ENV, POP3_PASSWORD=PASSWORD),
            lambda: shutil.rmtree(md, ignore_errors=True),
            _check_maildir(md, box, verify=True),
        )
    if client.startswith("mpop-"):
        mpop = shutil.which("mpop")
        if mpop is None:
            return None
        md = places[place] / f"{tag}-maildir"
        uidls = places[place] / f"{tag}-uidls"
        conf = scratch / "mpoprc"
        lines = [
            "defaults",
            f"host {LOOPBACK}",
            f"port {port}",
            "timeout 120",
            "auth user",
            f"user {_mpop_value(box.user)}",
            f"password {_mpop_value(PASSWORD)}",
            f"tls {'on' if tls else 'off'}",
            "tls_starttls off",
            *([f"tls_trust_file {_mpop_value(ca)}"] if tls else []),
            "pipelining on",
            "keep on",
            "only_new off",
            "received_header off",
            "account race",
            f"delivery maildir {_mpop_value(str(md))}",
            f"uidls_file {_mpop_value(str(uidls))}",
        ]
        _write_private(conf, "\n".join(lines) + "\n")

        def prep_mpop() -> None:
            _fresh_maildir(md)
            with contextlib.suppress(FileNotFoundError):
                uidls.unlink()

        return Job(
            client,
            place,
            [mpop, "--quiet", "-C", str(conf), "race"],
            dict(_ENV),
            prep_mpop,
            _check_maildir(md, box, verify=False),
        )
    if client == "fetchmail":
        fetchmail = shutil.which("fetchmail")
        if fetchmail is None:
            return None
        me = pwd.getpwuid(os.getuid()).pw_name
        if tls:
            tls_opts = f'ssl sslcertck sslcertfile "{ca}" sslcommonname "localhost"'
        else:
            tls_opts = "sslproto '' no sslcertck"
        rc = scratch / "fetchmailrc"
        _write_private(
            rc,
            "set no syslog\nset no bouncemail\n"
            f"poll {LOOPBACK} with proto POP3 port {port} auth password timeout 120\n"
            f'  user "{box.user}" there with password "{PASSWORD}" is "{me}" here\n'
            f"  options keep fetchall no rewrite {tls_opts}\n"
            "  bsmtp /dev/null\n",
        )
        ids = scratch / "fetchids"
        cmd = [fetchmail, "--nodetach", "--silent", "--fetchmailrc", str(rc)]
        cmd += ["--idfile", str(ids), "--pidfile", str(scratch / "fetchmail.pid")]
        env = dict(_ENV, FETCHMAILHOME=str(scratch), HOME=str(scratch))
        env.pop("FETCHMAILUSER", None)
        return Job(
            client,
            place,
            cmd,
            env,
            lambda: ids.unlink(missing_ok=True),
            _check_exit,
        )
    if client == "getmail":
        getmail = _script("getmail")
        if getmail is None:
            return None
        md = places[place] / f"{tag}-maildir"
        gdir = scratch / "getmail"
        rc = scratch / "getmailrc"
        retriever = "SimplePOP3SSLRetriever" if tls else "SimplePOP3Retriever"
        # getmail forks a delivery process per message and refuses to deliver as
        # root: as root it delivers as "nobody", into a Maildir "nobody" owns.
        owner = _unprivileged() if os.geteuid() == 0 else None
        if os.geteuid() == 0 and owner is None:
            return None
        _write_private(
            rc,
            f"[retriever]\ntype = {retriever}\nserver = {LOOPBACK}\nport = {port}\n"
            f"username = {box.user}\npassword = {PASSWORD}\n"
            + (f"ca_certs = {ca}\nssl_cert_hostname = localhost\n" if tls else "")
            + f"\n[destination]\ntype = Maildir\npath = {md}/\n"
            + (f"user = {owner[0]}\n" if owner else "")
            + "\n[options]\nverbose = 0\nread_all = true\ndelete = false\n"
            "delivered_to = false\nreceived = false\nmessage_log_syslog = false\n",
        )

        def prep_getmail() -> None:
            _fresh_maildir(md)
            if owner is not None:
                for path in (md, md / "cur", md / "new", md / "tmp"):
                    os.chown(path, owner[1], owner[2])
            shutil.rmtree(gdir, ignore_errors=True)
            gdir.mkdir()

        return Job(
            client,
            place,
            [getmail, "--quiet", "--rcfile", str(rc), "--getmaildir", str(gdir)],
            dict(_ENV),
            prep_getmail,
            _check_maildir(md, box, verify=False),
        )
    if client == "poplib":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "poplib"]
        cmd += [LOOPBACK, str(port), box.user, str(box.count), ca if tls else ""]

        def check_poplib(m: Measured, _first: bool) -> str | None:
            if m.code != 0:
                return f"exit {m.code}: {m.stderr.strip()[-300:]}"
            got = int(m.stdout.strip() or -1)
            return None if got == box.returned else f"{got} octets, want {box.returned}"

        return Job(client, place, cmd, dict(_ENV), lambda: None, check_poplib)
    raise ValueError(f"unknown client {client!r}")


def child_poplib(host: str, port: int, user: str, count: int, cafile: str) -> int:
    """Log in, RETR 1..count one at a time, QUIT; returns the octets received."""
    import poplib
    import ssl

    poplib._MAXLINE = 1 << 20  # type: ignore[attr-defined]  # real mail has long lines
    if cafile:
        ctx = ssl.create_default_context(cafile=cafile)
        client: poplib.POP3 = poplib.POP3_SSL(host, port, context=ctx, timeout=120)
    else:
        client = poplib.POP3(host, port, timeout=120)
    client.user(user)
    client.pass_(PASSWORD)
    total = 0
    for n in range(1, count + 1):
        _resp, lines, _octets = client.retr(n)
        total += sum(len(line) + 2 for line in lines)
    client.quit()
    return total


def _one_run(job: Job, dovecot_pid: int | None, first: bool) -> dict[str, Any]:
    job.prep()
    s0 = tree_cpu(dovecot_pid)
    m = run_measured(job.cmd, env=job.env)
    s1 = tree_cpu(dovecot_pid)
    problem = "timed out" if m.timed_out else job.check(m, first)
    return {
        "wall_s": m.wall,
        "user_s": m.user,
        "sys_s": m.sys,
        "cpu_s": m.cpu,
        "rss_mb": m.rss_mb,
        "server_cpu_s": (s1 - s0) if s0 is not None and s1 is not None else None,
        "ok": problem is None,
        "problem": problem,
    }


def client_race(
    args: argparse.Namespace, work: Path, boxes: list[Box], places: dict[str, Path]
) -> list[dict[str, Any]]:
    from peers import running_dovecot  # type: ignore[import-not-found,unused-ignore]

    rows: list[dict[str, Any]] = []
    (work / "dovecot-client").mkdir()
    with running_dovecot(work / "dovecot-client") as dovecot:
        for box in boxes:
            _note(f"filling mailbox {box.name}: {box.count} x {box.size} octets")
            manifest = dovecot.fill(box.user, box.count, box.size)
            box.octets = manifest.total_size
            box.returned = sum(m.returned_size for m in manifest)
            box.sha256 = frozenset(m.sha256 for m in manifest)
            # Dovecot indexes the Maildir and sets \Seen on the first pass.
            child_poplib(LOOPBACK, dovecot.port, box.user, box.count, "")
            for tls in args.client_tls:
                jobs: list[Job] = []
                for client in args.clients:
                    job = make_job(client, box, tls == "tls", dovecot, places, work)
                    if job is None:
                        _note(f"{client} is not installed: left out")
                        continue
                    jobs.append(job)
                label = f"{box.name} {tls}"
                for job in jobs:
                    _note(f"{label}: warm-up {job.client}")
                    job.warmup = _one_run(job, dovecot.pid, first=True)
                    if not job.warmup["ok"]:
                        _note(f"  {job.client} failed: {job.warmup['problem']}")
                for r in range(args.runs):
                    _note(f"{label}: round {r + 1}/{args.runs}")
                    for job in jobs:
                        job.runs.append(_one_run(job, dovecot.pid, first=False))
                for job in jobs:
                    rows.append(_client_row(job, box, tls))
                for path in places.values():  # free tmpfs between rounds of mail
                    for entry in path.iterdir():
                        shutil.rmtree(entry, ignore_errors=True)
    _add_client_ratios(rows)
    return rows


def _client_row(job: Job, box: Box, tls: str) -> dict[str, Any]:
    good = [r for r in job.runs if r["ok"]]
    wall = _median([r["wall_s"] for r in good])
    row: dict[str, Any] = {
        "mailbox": box.name,
        "messages": box.count,
        "octets": box.octets,
        "tls": tls,
        "client": job.client.split("-")[0],
        "name": job.client,
        "place": job.place,
        "runs_ok": len(good),
        "runs": len(job.runs),
        "wall_s": wall,
        "mb_per_s": box.octets / 1e6 / wall if wall else None,
        "msgs_per_s": box.count / wall if wall else None,
        "cpu_s": _median([r["cpu_s"] for r in good]),
        "user_s": _median([r["user_s"] for r in good]),
        "sys_s": _median([r["sys_s"] for r in good]),
        "rss_mb": _median([r["rss_mb"] for r in good]),
        "server_cpu_s": _median([r["server_cpu_s"] for r in good]),
        "spread": (max(r["wall_s"] for r in good) / min(r["wall_s"] for r in good))
        if good
        else None,
        "warmup": job.warmup,
        "each_run": job.runs,
        "problems": sorted({r["problem"] for r in job.runs if r["problem"]}),
        "command": job.cmd,
    }
    return row


def _add_client_ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if row["client"] != "fetch":
            continue
        peer = next(
            (
                r
                for r in rows
                if r["client"] == "mpop"
                and r["mailbox"] == row["mailbox"]
                and r["tls"] == row["tls"]
                and r["place"] == row["place"]
            ),
            None,
        )
        if peer is None or not peer["mb_per_s"] or not row["mb_per_s"]:
            continue
        row["vs_mpop"] = {
            "mb_per_s": row["mb_per_s"] / peer["mb_per_s"],
            "cpu": row["cpu_s"] / peer["cpu_s"] if peer["cpu_s"] else None,
        }


def startup_costs(runs: int) -> dict[str, dict[str, float | None]]:
    """Median wall and CPU seconds of programs that only start and exit:
    how much of each client's figures is start-up (the interpreter and the
    imports, for the Python ones)."""
    exe = _script("pop3proto")
    probes = {
        "pop3proto --version": [exe] if exe else [sys.executable, "-m", "pop3proto.bindings"],
        "python -c pass": [sys.executable, "-c", "pass"],
        "mpop --version": [shutil.which("mpop") or ""],
    }
    probes["pop3proto --version"].append("--version")
    probes["mpop --version"].append("--version")
    out: dict[str, dict[str, float | None]] = {}
    for name, cmd in probes.items():
        if not cmd[0]:
            continue
        runs_done = [run_measured(cmd) for _ in range(runs + 1)][1:]
        out[name] = {
            "wall_s": _median([m.wall for m in runs_done]),
            "cpu_s": _median([m.cpu for m in runs_done]),
            "rss_mb": _median([m.rss_mb for m in runs_done]),
        }
    return out


# ====================================================================== server race


class ServeProcess:
    """``pop3proto serve`` as a child process on 127.0.0.1 (ports picked by
    the kernel), stopped by its pid."""

    def __init__(self, argv: list[str], log_dir: Path, name: str) -> None:
        self.argv = argv
        self.out_path = log_dir / f"{name}.stdout"
        self.err_path = log_dir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.tls_port = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=_ENV
            )
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"listening on (pop3s?)://127\.0\.0\.1:(\d+)")
        while time.monotonic() < deadline:
            found = dict(pattern.findall(self.out_path.read_text(errors="replace")))
            if "pop3" in found and "pop3s" in found:
                self.port, self.tls_port = int(found["pop3"]), int(found["pop3s"])
                time.sleep(0.5)  # the workers start listening after the announcement
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{' '.join(self.argv[:3])} did not start: "
            + self.err_path.read_text(errors="replace")[-2000:]
        )

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        kids: list[int] = []
        with contextlib.suppress(OSError, ValueError):
            text = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
            kids = [int(x) for x in text.split()]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for pid in kids:  # workers the master could not stop
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _load(
    port: int,
    mode: str,
    concurrency: int,
    duration: float,
    users: int,
    cafile: str,
    timeout: float,
    max_sessions: int = 1_000_000,
) -> tuple[dict[str, Any], Measured]:
    cmd = [sys.executable, str(HERE / "race_load.py"), "--port", str(port), "--mode", mode]
    cmd += ["--cafile", cafile, "--users", str(users), "--concurrency", str(concurrency)]
    cmd += ["--duration", str(duration), "--timeout", str(timeout), "--retr", "10"]
    cmd += ["--max-sessions", str(max_sessions)]
    m = run_measured(cmd, timeout=duration + 2 * timeout + 60, rss=False)
    try:
        report: dict[str, Any] = json.loads(m.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {"sessions_per_s": 0.0, "errors": -1, "error_samples": [m.stderr[-500:]]}
    return report, m


def server_race(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from peers import fill_maildir, running_dovecot  # type: ignore[import-not-found,unused-ignore]

    users = max(args.concurrency)
    count, size = LOAD_MESSAGES
    names = [f"load{i:04d}" for i in range(users)]
    rows: list[dict[str, Any]] = []
    servers: dict[str, ServeProcess] = {}
    (work / "dovecot-server").mkdir()
    with running_dovecot(work / "dovecot-server", login_mode="perf") as dovecot:
        _note(f"server race: {users} users with {count} x {size} octets each, twice")
        mail_root = work / "serve-mail"
        for name in names:
            if "dovecot" in args.servers:
                dovecot.fill(name, count, size)
            fill_maildir(mail_root / name, name, count, size)
        users_file = work / "serve-users"
        _write_private(users_file, "".join(f"{n}:{{PLAIN}}{PASSWORD}\n" for n in names))
        exe = _script("pop3proto")
        base = [exe] if exe else [sys.executable, "-m", "pop3proto.bindings"]
        try:
            for server in args.servers:
                if server == "dovecot":
                    continue
                workers = int(server.removeprefix("serve-w"))
                argv = [*base, "serve", "--listen", f"{LOOPBACK}:0"]
                argv += ["--tls-listen", f"{LOOPBACK}:0", "--maildir", str(mail_root)]
                argv += ["--users", str(users_file), "--cert", str(dovecot.certfile)]
                argv += ["--key", str(dovecot.keyfile), "--workers", str(workers)]
                # Every load session comes from 127.0.0.1: lift the per-address
                # cap (50 by default), as the Dovecot side lifts its per-user one.
                argv += ["--failure-delay", "0", "--max-per-address", str(users + 100)]
                servers[server] = ServeProcess(argv, work, server)
                servers[server].start()

            def ports(server: str) -> tuple[int, int, int | None]:
                if server == "dovecot":
                    return dovecot.port, dovecot.tls_port, dovecot.pid
                s = servers[server]
                return s.port, s.tls_port, s.pid

            ca = str(dovecot.cafile)
            for server in args.servers:  # warm up: every maildrop once
                port, _tls_port, _pid = ports(server)
                _note(f"server race: warm-up of {server}")
                report, _m = _load(port, "plain", users, 60, users, ca, 30, max_sessions=users)
                if report.get("errors"):
                    _note(f"  warm-up errors: {report.get('error_samples')}")
            for conc in args.concurrency:
                for mode in args.load_modes:
                    for server in args.servers:
                        port, tls_port, pid = ports(server)
                        time.sleep(args.pause)
                        _note(f"server race: {server}, {conc} sessions at once, {mode}")
                        c0 = tree_cpu(pid)
                        report, m = _load(
                            tls_port if mode == "tls" else port,
                            mode,
                            conc,
                            args.duration,
                            users,
                            ca,
                            args.session_timeout,
                        )
                        c1 = tree_cpu(pid)
                        rows.append(_server_row(server, conc, mode, report, m, c0, c1))
                        if report.get("errors"):
                            _note(f"  errors: {report.get('error_samples')}")
        finally:
            for s in servers.values():
                s.stop()
    _add_server_ratios(rows)
    return rows


def _server_row(
    server: str,
    conc: int,
    mode: str,
    report: dict[str, Any],
    m: Measured,
    c0: float | None,
    c1: float | None,
) -> dict[str, Any]:
    ok = report.get("sessions_ok", 0) or 0
    server_cpu = (c1 - c0) if c0 is not None and c1 is not None else None
    return {
        "server": server,
        "concurrency": conc,
        "mode": mode,
        "sessions_per_s": report.get("sessions_per_s", 0.0),
        "sessions_ok": ok,
        "latency_ms": report.get("latency_ms", {}),
        "login_ms": report.get("login_ms", {}),
        "errors": report.get("errors", -1),
        "errors_by_phase": report.get("errors_by_phase", {}),
        "error_samples": report.get("error_samples", []),
        "server_cpu_s": server_cpu,
        "server_cpu_ms_per_session": server_cpu * 1000 / ok
        if server_cpu is not None and ok
        else None,
        "client_cpu_s": m.cpu,
        "client_cpu_ms_per_session": m.cpu * 1000 / ok if ok else None,
        "load": report,
    }


def _add_server_ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if row["server"] == "dovecot":
            continue
        base = next(
            (
                r
                for r in rows
                if r["server"] == "dovecot"
                and r["concurrency"] == row["concurrency"]
                and r["mode"] == row["mode"]
            ),
            None,
        )
        if base is None or not base["sessions_per_s"]:
            continue
        p99, base_p99 = row["latency_ms"].get("p99"), base["latency_ms"].get("p99")
        cpu, base_cpu = row["server_cpu_ms_per_session"], base["server_cpu_ms_per_session"]
        row["vs_dovecot"] = {
            "sessions_per_s": row["sessions_per_s"] / base["sessions_per_s"],
            "p99": p99 / base_p99 if p99 and base_p99 else None,
            "cpu_per_session": cpu / base_cpu if cpu and base_cpu else None,
        }


# ====================================================================== report


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def client_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| mailbox | transport | client | Maildir on | MB/s | msgs/s | wall s "
        "| client CPU s (user+sys) | peak RSS MB | Dovecot CPU s | fetch vs mpop (MB/s, CPU) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        vs = r.get("vs_mpop")
        ratio = f"x{_f(vs['mb_per_s'])}, x{_f(vs['cpu'])}" if vs else ""
        note = "" if r["runs_ok"] == r["runs"] else f" ({r['runs_ok']}/{r['runs']} ok)"
        cpu = f"{_f(r['cpu_s'])} ({_f(r['user_s'])}+{_f(r['sys_s'])})"
        out.append(
            f"| {r['mailbox']} {r['messages']}x{r['octets'] // max(r['messages'], 1) // 1000}KB "
            f"| {r['tls']} | {r['name']}{note} | {r['place']} | {_f(r['mb_per_s'], 0)} "
            f"| {_f(r['msgs_per_s'], 0)} | {_f(r['wall_s'], 3)} | {cpu} | {_f(r['rss_mb'], 0)} "
            f"| {_f(r['server_cpu_s'])} | {ratio} |"
        )
    return "\n".join(out)


def server_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| server | concurrent | transport | sessions/s | p50 ms | p99 ms | login p50/p99 ms "
        "| errors | server CPU ms/session | client CPU ms/session "
        "| vs Dovecot (sessions/s, p99, server CPU/session) |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lat, login = r["latency_ms"], r["login_ms"]
        vs = r.get("vs_dovecot")
        ratio = (
            f"x{_f(vs['sessions_per_s'])}, x{_f(vs['p99'])}, x{_f(vs['cpu_per_session'])}"
            if vs
            else ""
        )
        out.append(
            f"| {r['server']} | {r['concurrency']} | {r['mode']} | {_f(r['sessions_per_s'], 0)} "
            f"| {_f(lat.get('p50'), 0)} | {_f(lat.get('p99'), 0)} "
            f"| {_f(login.get('p50'), 0)} / {_f(login.get('p99'), 0)} | {r['errors']} "
            f"| {_f(r['server_cpu_ms_per_session'])} | {_f(r['client_cpu_ms_per_session'])} "
            f"| {ratio} |"
        )
    return "\n".join(out)


def load_ceiling(rows: list[dict[str, Any]]) -> str:
    """What the one-process load client could drive at most, per transport: the
    sessions/s ratios cannot go past that, whatever the server."""
    parts = []
    for mode in LOAD_MODES:
        mine = [r for r in rows if r["mode"] == mode]
        cost = _median([r["client_cpu_ms_per_session"] for r in mine])
        best = max((r["sessions_per_s"] for r in mine if r["server"] == "dovecot"), default=0.0)
        if cost:
            parts.append(
                f"{mode} {cost:.2f} ms/session, at most ~{1000 / cost:.0f} sessions/s on a "
                f"whole core (Dovecot's best {best:.0f}/s)"
            )
    return "Load client CPU: " + "; ".join(parts) + "." if parts else ""


def targets(client_rows: list[dict[str, Any]], server_rows: list[dict[str, Any]]) -> list[str]:
    """One line per target: what was wanted, what was measured, met or missed."""
    lines: list[str] = []
    for r in client_rows:
        vs = r.get("vs_mpop")
        if not vs:
            continue
        what = f"fetch vs mpop, mailbox {r['mailbox']}, {r['tls']}, Maildir on {r['place']}"
        mb, cpu = vs["mb_per_s"], vs["cpu"]
        lines.append(f"{'met   ' if mb >= 1.0 else 'MISSED'} MB/s >= 1x mpop: x{mb:.2f} ({what})")
        if cpu is not None:
            verdict = "met   " if cpu <= 0.8 else "MISSED"
            lines.append(f"{verdict} CPU <= 0.8x mpop: x{cpu:.2f} ({what})")
    for r in server_rows:
        vs = r.get("vs_dovecot")
        if not vs:
            continue
        want = 3.0 if r["mode"] == "plain" else 1.5
        what = f"{r['server']}, {r['concurrency']} at once, {r['mode']}"
        s = vs["sessions_per_s"]
        lines.append(
            f"{'met   ' if s >= want else 'MISSED'} sessions/s >= {want}x Dovecot: "
            f"x{s:.2f} ({what})"
        )
        lines.append(
            f"{'met   ' if r['errors'] == 0 else 'MISSED'} zero errors: {r['errors']} ({what})"
        )
        if vs["p99"] is not None:
            verdict = "met   " if vs["p99"] < 1.0 else "MISSED"
            lines.append(f"{verdict} p99 below Dovecot's: x{vs['p99']:.2f} ({what})")
    return lines


def _versions() -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    probes = {
        "dovecot": ["dovecot", "--version"],
        "mpop": ["mpop", "--version"],
        "fetchmail": ["fetchmail", "--version"],
        "getmail": [_script("getmail") or "getmail", "--version"],
    }
    for name, cmd in probes.items():
        path = shutil.which(cmd[0]) or shutil.which(cmd[0], path="/usr/sbin:/sbin")
        if path is None:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run(
                [path, *cmd[1:]], capture_output=True, timeout=20, check=False, env=_ENV
            )
            text = (p.stdout or p.stderr).decode(errors="replace").strip().splitlines()
            if text:
                found[name] = text[0][:100]
    with contextlib.suppress(ImportError):
        import uvloop

        found["uvloop"] = str(getattr(uvloop, "__version__", "?"))
    return found


# ====================================================================== main


def _list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items

    return parse


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of numbers") from None
    if not values or any(not 1 <= v <= 2000 for v in values):
        raise argparse.ArgumentTypeError("each must be 1..2000")
    return values


def _box(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or not (1 <= int(m.group(1)) <= 100_000 and 1 <= int(m.group(2)) <= 50_000_000):
        raise argparse.ArgumentTypeError("COUNTxSIZE, e.g. 2000x50000")
    return int(m.group(1)), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Race pop3proto fetch and serve against mpop, fetchmail, getmail6, "
        "poplib and Dovecot on this machine.",
    )
    p.add_argument("--quick", action="store_true", help="small mailboxes, 1 run, short load")
    p.add_argument("--runs", type=int, help="timed runs per client (default 3; --quick 1)")
    p.add_argument("--duration", type=float, help="seconds per load run (default 10; --quick 2)")
    p.add_argument("--json", metavar="FILE", help="write every result as JSON")
    p.add_argument("--parts", type=_list(("client", "server")), default=["client", "server"])
    p.add_argument("--clients", type=_list(CLIENTS), default=list(CLIENTS))
    p.add_argument("--client-tls", type=_list(("plain", "tls")), default=["plain", "tls"])
    p.add_argument("--servers", type=_list(SERVERS), default=list(SERVERS))
    p.add_argument("--load-modes", type=_list(LOAD_MODES), default=list(LOAD_MODES))
    p.add_argument("--concurrency", type=_ints, help="default 200,1000; --quick 20")
    p.add_argument("--box-a", type=_box, help="mailbox A (default 2000x50000; --quick 40x50000)")
    p.add_argument("--box-b", type=_box, help="mailbox B (default 20x5000000; --quick 2x1000000)")
    p.add_argument("--session-timeout", type=float, default=30.0, help="per load session")
    p.add_argument("--pause", type=float, help="seconds between load runs (default 2)")
    return p


def _defaults(args: argparse.Namespace) -> None:
    q = args.quick
    args.runs = args.runs if args.runs is not None else (1 if q else 3)
    args.duration = args.duration if args.duration is not None else (2.0 if q else 10.0)
    args.concurrency = args.concurrency or ([20] if q else [200, 1000])
    args.box_a = args.box_a or ((40, 50_000) if q else (2000, 50_000))
    args.box_b = args.box_b or ((2, 1_000_000) if q else (20, 5_000_000))
    args.pause = args.pause if args.pause is not None else (0.5 if q else 2.0)
    if not 1 <= args.runs <= 20:
        raise SystemExit("race: --runs must be 1..20")
    if not 0 < args.duration <= 300:
        raise SystemExit("race: --duration must be in (0, 300]")
    if not 0 < args.session_timeout <= 120 or not 0 <= args.pause <= 60:
        raise SystemExit("race: --session-timeout must be in (0, 120], --pause in [0, 60]")


def _dovecot_missing() -> str | None:
    if shutil.which("dovecot") is None and shutil.which("dovecot", path="/usr/sbin:/sbin") is None:
        return "dovecot is not installed (Debian: apt-get install dovecot-core dovecot-pop3d)"
    if not Path("/usr/lib/dovecot/pop3").exists():
        return "/usr/lib/dovecot/pop3 is missing (Debian: apt-get install dovecot-pop3d)"
    return None


@contextlib.contextmanager
def _workspace() -> Iterator[tuple[Path, dict[str, Path]]]:
    work = Path(tempfile.mkdtemp(prefix="pop3proto-race-"))
    shm_base = SHM if SHM.is_dir() else work
    shm = Path(tempfile.mkdtemp(prefix="pop3proto-race-", dir=shm_base))
    disk = work / "disk"
    disk.mkdir()
    # Traversable (not listable) by other users: getmail run as root delivers
    # as "nobody" (configuration files stay 0600).
    for path in (work, shm, disk):
        path.chmod(0o711)
    try:
        yield work, {"shm": shm, "disk": disk}
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    arglist = list(sys.argv[1:] if argv is None else argv)
    if arglist[:2] == ["--child", "poplib"]:
        return _child(arglist[2:])
    args = build_parser().parse_args(arglist)
    _defaults(args)
    missing = _dovecot_missing()
    if missing:
        _note(f"{missing}: nothing to race against")
        return 3
    sys.path.insert(0, str(ROOT / "tests"))
    started = time.time()
    load_before = os.getloadavg()
    versions = _versions()
    client_rows: list[dict[str, Any]] = []
    server_rows: list[dict[str, Any]] = []
    startup: dict[str, dict[str, float | None]] = {}
    with _workspace() as (work, places):
        _ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        boxes = [
            Box("A", "boxa", *args.box_a),
            Box("B", "boxb", *args.box_b),
        ]
        if "client" in args.parts:
            client_rows = client_race(args, work, boxes, places)
            startup = startup_costs(max(args.runs, 3))
        if "server" in args.parts:
            server_rows = server_race(args, work)
    goals = targets(client_rows, server_rows)
    cpus = os.cpu_count()
    print(
        f"\n## pop3proto race ({cpus} CPUs, load average {load_before[0]:.2f} at the start, "
        f"{time.time() - started:.0f} s)\n"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
    if client_rows:
        print(
            "### Clients: retrieve every message from Dovecot, keep them (median of "
            f"{args.runs} run{'s' if args.runs != 1 else ''} after a warm-up)\n"
        )
        print(client_table(client_rows) + "\n")
        if startup:
            parts = [
                f"{name}: {_f(v['cpu_s'])} s CPU, {_f(v['wall_s'], 3)} s"
                for name, v in startup.items()
            ]
            print("Start-up alone (included above): " + "; ".join(parts) + "\n")
    if server_rows:
        print(
            f"### Servers: {', '.join(args.servers)} under the same load "
            f"({args.duration:g} s per run, RETR 1..10 of ~3 KB per session)\n"
        )
        print(server_table(server_rows) + "\n")
        print(load_ceiling(server_rows) + "\n")
    if goals:
        print("### Targets\n")
        print("\n".join(f"    {g}" for g in goals))
    if args.json:
        doc = {
            "command": ["benchmarks/race.py", *arglist],
            "started": started,
            "cpus": cpus,
            "loadavg_at_start": load_before,
            "versions": versions,
            "settings": vars(args),
            "client_race": client_rows,
            "startup": startup,
            "server_race": server_rows,
            "targets": goals,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    failed = [r for r in client_rows if r["runs_ok"] == 0] + [
        r for r in server_rows if not r["sessions_ok"]
    ]
    return 1 if failed else 0


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="race.py --child poplib")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("user")
    parser.add_argument("count", type=int)
    parser.add_argument("cafile")
    a = parser.parse_args(argv)
    print(child_poplib(a.host, a.port, a.user, a.count, a.cafile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
