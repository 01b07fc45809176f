"""Fetching a whole mailbox from Dovecot: our blocking client (pipelined)
against the standard library's poplib and curl, in the same run.

    python benchmarks/bench_client.py [--scale 1.0] [--repeat 1] [--tls] [--json]

Two mailboxes on a private loopback Dovecot (started and filled with
``tests/peers.py``): A holds 2000 messages of 50 KB, B 20 messages of 5 MB
(``--scale`` shrinks both counts). With ``--tls`` the blocking client also
runs as it was before its TLS low-water mark (``ours-nolw``: a wake-up per
few TLS records instead of per 64 KiB), for the ratio of the two. Each
client runs in its own process and
retrieves every message once; the table gives MB/s (message octets as
returned, wall time from process start to exit, so start-up and imports
count) and the client's CPU seconds (user + system, from
``resource.getrusage(RUSAGE_CHILDREN)`` around the process), with ratios
against poplib. curl has no pipelining and opens one POP3 session per
message (its URL glob). With ``--repeat`` the best run of each is kept.
curl writes each message to a file (its byte counts are measured from
them). Timings never fail anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PASSWORD = "secret"

# ---------------------------------------------------------------------------
# the clients, each run as ``bench_client.py --child NAME ...``
# ---------------------------------------------------------------------------


def child_ours(
    host: str, port: int, user: str, count: int, cafile: str | None, low_water: bool = True
) -> int:
    import ssl

    from pop3proto.bindings.sync import connect

    total = 0
    if cafile:
        ctx = ssl.create_default_context(cafile=cafile)
        client = connect(host, port, ssl_context=ctx, timeout=120)
    else:
        client = connect(host, port, tls=False, allow_insecure=True, timeout=120)
    if not low_water:
        client._low_water = None  # as where SO_RCVLOWAT is missing
    with client:
        client.login(user, PASSWORD, mechanism="USER")
        for _, data in client.retrieve_many(range(1, count + 1), window=16):
            total += len(data)
    return total


def child_poplib(host: str, port: int, user: str, count: int, cafile: str | None) -> int:
    import poplib
    import ssl

    total = 0
    if cafile:
        ctx = ssl.create_default_context(cafile=cafile)
        client: poplib.POP3 = poplib.POP3_SSL(host, port, context=ctx, timeout=120)
    else:
        client = poplib.POP3(host, port, timeout=120)
    # Real mail has lines longer than poplib's 2048-octet cap.
    poplib._MAXLINE = 1 << 20  # type: ignore[attr-defined]
    client.user(user)
    client.pass_(PASSWORD)
    for n in range(1, count + 1):
        _, lines, _ = client.retr(n)
        total += sum(len(line) + 2 for line in lines)
    client.quit()
    return total


def child_ours_nolw(host: str, port: int, user: str, count: int, cafile: str | None) -> int:
    return child_ours(host, port, user, count, cafile, low_water=False)


CHILDREN = {"ours": child_ours, "ours-nolw": child_ours_nolw, "poplib": child_poplib}


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


#: The children's environment. Python children keep compiled bytecode in a
#: private cache (set up by ``main``), as an installed package would have it:
#: with PYTHONDONTWRITEBYTECODE every run would compile the package anew.
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_measured(cmd: list[str]) -> tuple[float, float, bytes]:
    """Wall seconds, child CPU seconds and stdout of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, check=False, cwd=ROOT, env=_ENV)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def python_client(
    name: str, host: str, port: int, user: str, count: int, cafile: str | None
) -> tuple[float, float, int]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    cmd += [host, str(port), user, str(count), cafile or ""]
    wall, cpu, out = run_measured(cmd)
    return wall, cpu, int(out.strip())


def curl_client(
    host: str, port: int, user: str, count: int, cafile: str | None
) -> tuple[float, float, int]:
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("curl is not installed (Debian: apt-get install curl)")
    scheme = "pop3s" if cafile else "pop3"
    with tempfile.TemporaryDirectory(prefix="pop3proto-bench-curl-") as out:
        cmd = [curl, "--silent", "--show-error", "--user", f"{user}:{PASSWORD}"]
        if cafile:
            cmd += ["--cacert", cafile]
        # One file per message: curl's size_download is wrong for POP3
        # transfers after the first of a run, so the files are measured.
        cmd += ["--output", os.path.join(out, "#1"), f"{scheme}://{host}:{port}/[1-{count}]"]
        wall, cpu, _ = run_measured(cmd)
        total = sum(entry.stat().st_size for entry in os.scandir(out))
    return wall, cpu, total


def import_cpu(statement: str) -> float:
    """CPU seconds of a process that only starts and runs ``statement``."""
    _, cpu, _ = run_measured([sys.executable, "-c", statement])
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the mailboxes")
    parser.add_argument("--repeat", type=int, default=1, help="runs per client (best kept)")
    parser.add_argument("--tls", action="store_true", help="implicit TLS instead of plaintext")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        host, port, user, count, ca_arg = rest
        total = CHILDREN[args.child](host, int(port), user, int(count), ca_arg or None)
        print(total)
        return

    sys.path.insert(0, str(ROOT / "tests"))
    from peers import running_dovecot  # type: ignore[import-not-found]

    boxes = [
        ("A", max(1, round(2000 * args.scale)), 50_000),
        ("B", max(1, round(20 * args.scale)), 5_000_000),
    ]
    rows = []
    work = tempfile.mkdtemp(prefix="pop3proto-bench-")
    _ENV["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    try:
        with running_dovecot(Path(work)) as dovecot:
            cafile = str(dovecot.cafile) if args.tls else None
            port = dovecot.tls_port if args.tls else dovecot.port
            for box, count, size in boxes:
                user = f"bench{box.lower()}"
                print(f"filling mailbox {box}: {count} x {size} octets ...", file=sys.stderr)
                manifest = dovecot.fill(user, count, size)
                expected = sum(m.returned_size for m in manifest)
                # Warm Dovecot's index and the page cache before timing.
                python_client("ours", "127.0.0.1", port, user, count, cafile)
                names = ("ours", "ours-nolw") if args.tls else ("ours",)
                for name in (*names, "poplib", "curl"):
                    best: tuple[float, float, int] | None = None
                    for _ in range(args.repeat):
                        if name == "curl":
                            got = curl_client("127.0.0.1", port, user, count, cafile)
                        else:
                            got = python_client(name, "127.0.0.1", port, user, count, cafile)
                        if best is None or got[0] < best[0]:
                            best = got
                    assert best is not None
                    wall, cpu, nbytes = best
                    rows.append(
                        {
                            "mailbox": f"{box} {count}x{size // 1000}KB",
                            "client": name,
                            "seconds": wall,
                            "cpu": cpu,
                            "bytes": nbytes,
                            "expected": expected,
                            "mb_s": nbytes / wall / 1e6,
                        }
                    )
        ours_start = min(import_cpu("import pop3proto.bindings.sync") for _ in range(3))
        std_start = min(import_cpu("import poplib, ssl") for _ in range(3))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, args.tls)
    for row in rows:
        if row["client"] == "ours-nolw":
            ours = next(r for r in rows if r["mailbox"] == row["mailbox"] and r["client"] == "ours")
            print(
                f"{row['mailbox']}: TLS low-water mark on/off: CPU "
                f"x{float(ours['cpu']) / float(row['cpu']):.2f}, MB/s "  # type: ignore[arg-type]
                f"x{float(ours['mb_s']) / float(row['mb_s']):.2f}"  # type: ignore[arg-type]
            )
    print(
        f"\nstart-up and imports alone: {ours_start:.2f} CPU s for pop3proto.bindings.sync, "
        f"{std_start:.2f} for poplib (both included above)"
    )
    if args.json:
        print(json.dumps(rows, indent=1))


def print_table(rows: list[dict[str, object]], tls: bool) -> None:
    print(f"\nfetching whole mailboxes from Dovecot over {'TLS' if tls else 'plaintext'}")
    header = (
        f"{'mailbox':<16} {'client':<10} {'MB/s':>8} {'x poplib':>9} "
        f"{'CPU s':>7} {'CPU x poplib':>13} {'bytes ok':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next(r for r in rows if r["mailbox"] == row["mailbox"] and r["client"] == "poplib")
        speed = float(row["mb_s"]) / float(base["mb_s"])  # type: ignore[arg-type]
        cpu = float(row["cpu"]) / float(base["cpu"])  # type: ignore[arg-type]
        ok = "yes" if row["bytes"] == row["expected"] else f"{row['bytes']}"
        print(
            f"{row['mailbox']:<16} {row['client']:<10} {float(row['mb_s']):>8.1f} "  # type: ignore[arg-type]
            f"{speed:>9.2f} {float(row['cpu']):>7.2f} {cpu:>13.2f} {ok:>9}"  # type: ignore[arg-type]
        )


if __name__ == "__main__":
    main()
