"""Fault-injection harness for data safety (HARDENING 53, 56): many kills,
then counts.

    python benchmarks/faults.py [--messages 5] [--rounds 3] [--timed 40] [--seed 1]

Each round, with fresh messages:

* the server (``pop3proto serve --maildir``) is SIGKILLed at every step of
  its QUIT deletion, enumerated from a clean run;
* ``pop3proto fetch`` is SIGKILLed at every step of a fetch (after RETR,
  write, fsync, link, fsync of new/, UID record, DELE, QUIT);
* then ``--timed`` fetches are SIGKILLed after a random delay instead of at a
  named point (a large streamed message among them), to catch steps the
  named points do not name.

After every kill each message must be intact or gone (never truncated), none
lost, the lock reclaimed, and a second fetch must finish with at most one
message fetched twice. Prints one line per scenario and a total; exits 1 if
any check failed. The machinery is ``tests/faultkit.py``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import faultkit


class Tally:
    def __init__(self, name: str) -> None:
        self.name = name
        self.runs = self.kills = self.checked = self.lost = 0
        self.truncated = self.twice = 0
        self.problems: list[str] = []

    def add(self, outcome: faultkit.Outcome) -> None:
        self.runs += 1
        self.kills += outcome.killed
        self.checked += outcome.checked
        self.lost += outcome.lost
        self.truncated += outcome.truncated
        self.twice += outcome.duplicates
        self.problems += outcome.problems

    def line(self) -> str:
        return (
            f"{self.name:<14} runs {self.runs:5d}  kills {self.kills:5d}  messages checked "
            f"{self.checked:6d}  lost {self.lost}  truncated {self.truncated}  "
            f"fetched twice {self.twice}  problems {len(self.problems)}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5, help="messages per mailbox")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every named point")
    parser.add_argument("--timed", type=int, default=40, help="randomly timed fetch kills")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    server, fetch, timed = Tally("server-kill"), Tally("fetch-kill"), Tally("fetch-timed")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pop3-faults-") as tmp:
        work = Path(tmp)
        server_points = faultkit.server_points(work, args.messages)
        fetch_points = faultkit.fetch_points(work, args.messages)
        print(f"{len(server_points)} server steps, {len(fetch_points)} fetch steps")
        for r in range(args.rounds):
            seed = args.seed * 1000 + r
            for point in server_points:
                server.add(faultkit.server_kill_run(work, args.messages, point, seed))
            for point in fetch_points:
                fetch.add(faultkit.fetch_kill_run(work, args.messages, point, seed))
        # A clean fetch's duration bounds the random kill times.
        t0 = time.monotonic()
        faultkit.fetch_kill_run(work, args.messages, None, 0, kill_after=30.0)
        span = time.monotonic() - t0
        for i in range(args.timed):
            delay = rng.uniform(0.2, max(0.3, span))
            timed.add(
                faultkit.fetch_kill_run(work, args.messages, None, 5000 + i, kill_after=delay)
            )
    total = Tally("total")
    for t in (server, fetch, timed):
        print(t.line())
        for name in ("runs", "kills", "checked", "lost", "truncated", "twice"):
            setattr(total, name, getattr(total, name) + getattr(t, name))
        total.problems += t.problems
    print(total.line())
    print(f"elapsed {time.monotonic() - started:.1f} s")
    for problem in total.problems[:20]:
        print("PROBLEM", problem)
    return 1 if total.problems or total.lost or total.truncated else 0


if __name__ == "__main__":
    sys.exit(main())
