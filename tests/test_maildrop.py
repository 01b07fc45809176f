"""Tests for the maildrop layer: sizes, UIDs, locking, commits, safety.

HARDENING cases covered here: 19 (stored line ends → sizes), 42 (user names
never leave the root), 50 (a large Maildir opens from the size cache; the
100,000-message timing is in benchmarks/bench_maildrop.py), 51 (no commit →
nothing removed), 52 (a failed removal is reported), 53 (kill during the
deletion step, stale lock reclaimed), 54 (IN-USE, mail arriving during a
session), 55 (UID stability).
"""

from __future__ import annotations

import gc
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pop3proto.bindings import maildrop as md
from pop3proto.bindings.maildrop import (
    INDEX_NAME,
    LOCK_NAME,
    Maildir,
    Maildrop,
    MaildropError,
    MaildropLocked,
    MaildropSession,
    MemoryMaildrop,
    MessageInfo,
    check_user,
    is_valid_uid,
    message_size,
)

# --------------------------------------------------------------------------
# utilities


def crlf_form(data: bytes) -> bytes:
    """Reference normaliser, independent of the engine's: every CRLF, bare
    LF and bare CR becomes CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def make_maildir(root: Path, user: str = "alice") -> Path:
    box = root / user
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    return box


def put(
    root: Path,
    name: str,
    data: bytes,
    *,
    user: str = "alice",
    sub: str = "new",
    mtime: float | None = None,
) -> Path:
    """Store a message file directly under a chosen name."""
    box = make_maildir(root, user)
    path = box / sub / name
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def read_all(session: MaildropSession, index: int) -> bytes:
    with session.open_message(index) as f:
        return f.read()


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


CASES: dict[str, bytes] = {
    "empty": b"",
    "crlf": b"Subject: a\r\n\r\nbody\r\n",
    "lf": b"Subject: a\n\nbody\nmore\n",
    "cr_only": b"Subject: a\r\rbody\rmore\r",
    "mixed": b"a\r\nb\nc\rd\r\r\ne\n\r",
    "no_final_newline": b"Subject: a\n\nlast line without end",
    "nul": b"Subject: a\n\nnul \x00 here\x00\n",
    "dots": b".\n..\n.\r\n.x\n",
    "eight_bit": bytes(range(256)) * 4,
    "megabyte_line": b"Subject: big\n\n" + b"x" * (1 << 20) + b"\n",
    # CR at the end of one read chunk and LF at the start of the next.
    "cr_lf_split_at_chunk": b"a" * (md._CHUNK - 1) + b"\r\nb\n",
    "cr_at_chunk_end_then_cr": b"a" * (md._CHUNK - 1) + b"\r\rb",
}


class DeliverableDrop(Maildrop, Protocol):
    """What both backends offer: a maildrop one can also deliver to."""

    def add(self, user: str, data: bytes) -> str: ...


MakeDrop = Callable[..., DeliverableDrop]


@pytest.fixture(params=["memory", "maildir"])
def make_drop(request: pytest.FixtureRequest, tmp_path: Path) -> MakeDrop:
    """Build a maildrop of either backend holding ``messages`` for ``user``."""

    def make(messages: list[bytes], user: str = "alice") -> DeliverableDrop:
        if request.param == "memory":
            return MemoryMaildrop({user: messages})
        root = tmp_path / "mail"
        make_maildir(root, user)
        drop = Maildir(root)
        for data in messages:
            drop.add(user, data)
        return drop

    return make


# --------------------------------------------------------------------------
# sizes (HARDENING 19)


@pytest.mark.parametrize("case", sorted(CASES))
def test_size_is_length_of_crlf_form_and_bytes_are_stored_as_is(
    make_drop: MakeDrop, case: str
) -> None:
    data = CASES[case]
    drop = make_drop([data, b"second\n"])
    with drop.open("alice") as s:
        assert [m.size for m in s.messages] == [len(crlf_form(data)), len(b"second\r\n")]
        assert read_all(s, 0) == data


@pytest.mark.parametrize("case", sorted(CASES))
def test_message_size_same_for_every_chunk_size(case: str) -> None:
    data = CASES[case][:5000] if len(CASES[case]) > 5000 else CASES[case]
    expected = len(crlf_form(data))
    assert message_size(data) == expected
    for chunk in (1, 2, 3, 7, 64, 4096):
        assert message_size(io.BytesIO(data), chunk_size=chunk) == expected


def test_message_size_rejects_bad_chunk_size() -> None:
    with pytest.raises(ValueError):
        message_size(io.BytesIO(b"x"), chunk_size=0)


bodies = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\x00", b"\xff", b" "]), max_size=60
).map(b"".join) | st.binary(max_size=200)


@given(data=bodies, chunk=st.integers(min_value=1, max_value=50))
def test_message_size_property(data: bytes, chunk: int) -> None:
    assert message_size(io.BytesIO(data), chunk_size=chunk) == len(crlf_form(data))
    assert message_size(data) == len(crlf_form(data))


@given(data=bodies)
def test_memory_maildrop_size_property(data: bytes) -> None:
    drop = MemoryMaildrop({"u": [data]})
    with drop.open("u") as s:
        assert s.messages[0].size == len(crlf_form(data))
        assert read_all(s, 0) == data


@settings(max_examples=25, deadline=None)
@given(data=bodies)
def test_maildir_size_property(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        drop = Maildir(tmp)
        drop.add("u", data)
        for _ in range(2):  # computed, then from the cache
            with drop.open("u") as s:
                assert s.messages[0].size == len(crlf_form(data))
                assert read_all(s, 0) == data


# --------------------------------------------------------------------------
# message info, protocol


def test_backends_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(MemoryMaildrop(), Maildrop)
    assert isinstance(Maildir(tmp_path), Maildrop)


@pytest.mark.parametrize("uid", ["", "a" * 71, "a b", "a\tb", "é", "a\x00", "a\x7f"])
def test_message_info_refuses_invalid_uid(uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(ValueError):
        MessageInfo(uid, 1, "k")


def test_message_info_refuses_invalid_size() -> None:
    with pytest.raises(ValueError):
        MessageInfo("a", -1, "k")
    with pytest.raises(ValueError):
        MessageInfo("a", True, "k")


def test_message_info_accepts_full_uid_range() -> None:
    uid = "".join(chr(c) for c in range(0x21, 0x7F))[:70]
    info = MessageInfo(uid, 0, "k")
    assert info.uid == uid and is_valid_uid(uid)


def test_open_message_index_bounds(make_drop: MakeDrop) -> None:
    drop = make_drop([b"a\n", b"b\n"])
    with drop.open("alice") as s:
        assert read_all(s, 1) == b"b\n"
        for bad in (-1, 2, 100):
            with pytest.raises(IndexError):
                s.open_message(bad)


def test_unknown_user_is_an_error(make_drop: MakeDrop) -> None:
    drop = make_drop([b"a\n"])
    with pytest.raises(MaildropError) as info:
        drop.open("nobody")
    assert not isinstance(info.value, MaildropLocked)


def test_empty_maildrop_lists_nothing(tmp_path: Path) -> None:
    make_maildir(tmp_path, "alice")
    with Maildir(tmp_path).open("alice") as s:
        assert list(s.messages) == []
    with MemoryMaildrop({"alice": []}).open("alice") as s:
        assert list(s.messages) == []


# --------------------------------------------------------------------------
# order and numbering (HARDENING 54)


def test_messages_listed_oldest_first(tmp_path: Path) -> None:
    now = time.time()
    put(tmp_path, "300.M1P1.h", b"newest\n", mtime=now - 10)
    put(tmp_path, "100.M1P1.h", b"oldest\n", mtime=now - 30, sub="cur")
    put(tmp_path, "200.M1P1.h", b"middle\n", mtime=now - 20)
    with Maildir(tmp_path).open("alice") as s:
        assert [read_all(s, i) for i in range(3)] == [b"oldest\n", b"middle\n", b"newest\n"]


def test_names_with_equal_mtime_sort_numbers_by_value(tmp_path: Path) -> None:
    t = time.time() - 100
    put(tmp_path, "1700.M1000P1.h", b"second\n", mtime=t)
    put(tmp_path, "1700.M999P1.h", b"first\n", mtime=t)
    with Maildir(tmp_path).open("alice") as s:
        assert [m.uid for m in s.messages] == ["1700.M999P1.h", "1700.M1000P1.h"]


def test_order_stays_when_mtimes_change_later(tmp_path: Path) -> None:
    now = time.time()
    a = put(tmp_path, "1.M1P1.h", b"a\n", mtime=now - 20)
    put(tmp_path, "2.M1P1.h", b"b\n", mtime=now - 10)
    drop = Maildir(tmp_path)
    with drop.open("alice") as s:
        first = [m.uid for m in s.messages]
    os.utime(a, (now, now))  # "a" now looks newest
    with drop.open("alice") as s:
        assert [m.uid for m in s.messages] == first == ["1.M1P1.h", "2.M1P1.h"]


def test_added_messages_listed_in_delivery_order(make_drop: MakeDrop) -> None:
    datas = [f"message {i}\n".encode() for i in range(30)]
    drop = make_drop(datas)
    with drop.open("alice") as s:
        assert [read_all(s, i) for i in range(30)] == datas


def test_mail_arriving_during_session_shows_in_next_one(
    make_drop: MakeDrop,
) -> None:
    drop = make_drop([b"one\n", b"two\n"])
    s = drop.open("alice")
    try:
        before = list(s.messages)
        drop.add("alice", b"three\n")
        assert list(s.messages) == before
        assert len(s.messages) == 2
        assert read_all(s, 1) == b"two\n"
    finally:
        s.close()
    with drop.open("alice") as s2:
        assert [m.uid for m in s2.messages[:2]] == [m.uid for m in before]
        assert len(s2.messages) == 3
        assert read_all(s2, 2) == b"three\n"


# --------------------------------------------------------------------------
# UIDs (HARDENING 55)


def test_uids_valid_unique_and_stable_across_sessions(
    make_drop: MakeDrop,
) -> None:
    drop = make_drop([b"same\n", b"same\n", b"other\n"])
    with drop.open("alice") as s:
        uids = [m.uid for m in s.messages]
    assert all(is_valid_uid(u) for u in uids)
    assert len(set(uids)) == 3
    with drop.open("alice") as s:
        assert [m.uid for m in s.messages] == uids


def test_uids_never_reused_after_deletion(make_drop: MakeDrop) -> None:
    drop = make_drop([b"a\n", b"b\n"])
    with drop.open("alice") as s:
        gone = {m.uid for m in s.messages}
        s.commit([m.key for m in s.messages])
    drop.add("alice", b"a\n")
    drop.add("alice", b"b\n")
    with drop.open("alice") as s:
        assert not gone & {m.uid for m in s.messages}


def test_memory_maildrops_do_not_share_uids() -> None:
    a = MemoryMaildrop({"u": [b"x\n"]})
    b = MemoryMaildrop({"u": [b"x\n"]})
    with a.open("u") as sa, b.open("u") as sb:
        assert sa.messages[0].uid != sb.messages[0].uid


def test_memory_add_with_chosen_uid() -> None:
    drop = MemoryMaildrop()
    assert drop.add("u", b"x\n", uid="abc") == "abc"
    with pytest.raises(ValueError):
        drop.add("u", b"y\n", uid="abc")
    with pytest.raises(ValueError):
        drop.add("u", b"y\n", uid="has space")
    with drop.open("u") as s:
        assert [m.uid for m in s.messages] == ["abc"]


def test_uid_is_maildir_base_name(tmp_path: Path) -> None:
    put(tmp_path, "1700000000.M5P7.host", b"x\n")
    with Maildir(tmp_path).open("alice") as s:
        assert s.messages[0].uid == "1700000000.M5P7.host"


def test_uid_stable_across_move_to_cur_and_flag_changes(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    drop = Maildir(tmp_path)
    uid = drop.add("alice", b"hello\n")
    (name,) = os.listdir(box / "new")
    with drop.open("alice") as s:
        assert [m.uid for m in s.messages] == [uid]
    os.rename(box / "new" / name, box / "cur" / (name + ":2,S"))
    with drop.open("alice") as s:
        assert [m.uid for m in s.messages] == [uid]
        assert s.messages[0].size == len(b"hello\r\n")
    os.rename(box / "cur" / (name + ":2,S"), box / "cur" / (name + ":2,RS"))
    with drop.open("alice") as s:
        assert [m.uid for m in s.messages] == [uid]
        assert read_all(s, 0) == b"hello\n"


@pytest.mark.parametrize(
    "base",
    ["x" * 71, "has space.M1", "caf\u00e9.M1", "tab\there", "a" * 200],
)
def test_unusable_base_names_get_hashed_uid(tmp_path: Path, base: str) -> None:
    put(tmp_path, base + ":2,S", b"x\n", sub="cur")
    put(tmp_path, "plain.M1", b"y\n")
    drop = Maildir(tmp_path)
    with drop.open("alice") as s:
        uids = {read_all(s, i): m.uid for i, m in enumerate(s.messages)}
    hashed = uids[b"x\n"]
    assert is_valid_uid(hashed)
    assert ":" in hashed  # a direct base name never holds ':'
    assert uids[b"y\n"] == "plain.M1"
    os.rename(tmp_path / "alice" / "cur" / (base + ":2,S"), tmp_path / "alice" / "cur" / base)
    with drop.open("alice") as s:
        assert hashed in {m.uid for m in s.messages}


def test_non_utf8_file_name_listed_with_valid_uid(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    raw = os.fsencode(str(box / "new")) + b"/bad\xff\xfename"
    with open(raw, "wb") as f:
        f.write(b"x\r\n")
    drop = Maildir(tmp_path)
    for _ in range(2):  # also through the index
        with drop.open("alice") as s:
            assert len(s.messages) == 1
            assert is_valid_uid(s.messages[0].uid)
            assert read_all(s, 0) == b"x\r\n"


def test_same_base_in_new_and_cur_listed_once(tmp_path: Path) -> None:
    put(tmp_path, "1.M1P1.h", b"x\n", sub="new")
    put(tmp_path, "1.M1P1.h:2,S", b"x\n", sub="cur")
    with Maildir(tmp_path).open("alice") as s:
        assert [m.uid for m in s.messages] == ["1.M1P1.h"]
        assert s.messages[0].key.startswith("cur/")


def test_hidden_and_non_regular_entries_ignored(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    put(tmp_path, "1.M1.h", b"real\n")
    (box / "new" / ".hidden").write_bytes(b"hidden\n")
    (box / "cur" / "subdir").mkdir()
    (box / "tmp" / "2.M2.h").write_bytes(b"in tmp\n")
    with Maildir(tmp_path).open("alice") as s:
        assert [m.uid for m in s.messages] == ["1.M1.h"]


def test_symlinked_message_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's secret\n")
    box = make_maildir(tmp_path / "mail")
    (box / "new" / "1.M1.h").symlink_to(secret)
    put(tmp_path / "mail", "2.M2.h", b"mail\n")
    with Maildir(tmp_path / "mail").open("alice") as s:
        assert [read_all(s, i) for i in range(len(s.messages))] == [b"mail\n"]


def test_message_swapped_for_symlink_after_listing_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's secret\n")
    msg = put(tmp_path / "mail", "1.M1.h", b"mail\n")
    with Maildir(tmp_path / "mail").open("alice") as s:
        msg.unlink()
        msg.symlink_to(secret)
        with pytest.raises(MaildropError):
            s.open_message(0)


def test_symlinked_cur_is_refused(tmp_path: Path) -> None:
    other = make_maildir(tmp_path / "mail", "bob")
    put(tmp_path / "mail", "1.M1.h", b"bob's\n", user="bob", sub="cur")
    box = tmp_path / "mail" / "alice"
    (box / "new").mkdir(parents=True)
    (box / "cur").symlink_to(other / "cur")
    with pytest.raises(MaildropError):
        Maildir(tmp_path / "mail").open("alice")
    assert os.listdir(other / "cur") == ["1.M1.h"]
    # The failed open left no lock behind.
    with Maildir(tmp_path / "mail").open("bob") as s:
        assert len(s.messages) == 1


def test_missing_subdirectory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "alice" / "new").mkdir(parents=True)
    with pytest.raises(MaildropError):
        Maildir(tmp_path).open("alice")


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MaildropError):
        Maildir(tmp_path / "absent").open("alice")


# --------------------------------------------------------------------------
# user names (HARDENING 42)

BAD_USERS = [
    "",
    ".",
    "..",
    "../alice",
    "../../etc",
    "a/b",
    "/etc",
    "a\\b",
    "a%2fb",
    "%2e%2e",
    "a\x00b",
    "a\nb",
    "a\rb",
    "a\tb",
    "a\x7f",
    "a\x85",
    ".hidden",
    "x" * 256,
    "x" * 1024,
    "\u00e9" * 128,  # 256 octets in UTF-8
    "a\udcff",
]


@pytest.mark.parametrize("user", BAD_USERS)
def test_unsafe_user_names_refused(tmp_path: Path, user: str) -> None:
    root = tmp_path / "root"
    make_maildir(root, "alice")
    (tmp_path / "outside").mkdir()
    for sub in ("cur", "new", "tmp"):
        (tmp_path / "outside" / sub).mkdir()
    with pytest.raises(MaildropError):
        check_user(user)
    with pytest.raises(MaildropError):
        Maildir(root).open(user)
    with pytest.raises(MaildropError):
        Maildir(root).add(user, b"x\n")
    assert sorted(os.listdir(root)) == ["alice"]
    assert sorted(os.listdir(tmp_path)) == ["outside", "root"]
    for sub in ("cur", "new", "tmp"):
        assert os.listdir(tmp_path / "outside" / sub) == []


@pytest.mark.parametrize("user", ["alice", "bob.smith", "a-b_c+d", "\u00e9" * 127, "x" * 255])
def test_ordinary_user_names_accepted(tmp_path: Path, user: str) -> None:
    check_user(user)
    drop = Maildir(tmp_path)
    drop.add(user, b"x\n")
    with drop.open(user) as s:
        assert len(s.messages) == 1


# --------------------------------------------------------------------------
# locking (HARDENING 53, 54)


def test_second_session_same_process_is_in_use(make_drop: MakeDrop) -> None:
    drop = make_drop([b"a\n"])
    first = drop.open("alice")
    with pytest.raises(MaildropLocked) as info:
        drop.open("alice")
    assert info.value.code == "IN-USE"
    first.close()
    first.close()  # idempotent
    with drop.open("alice") as again:
        assert len(again.messages) == 1


def test_lock_is_per_user(make_drop: MakeDrop) -> None:
    drop = make_drop([b"a\n"])
    drop.add("bob", b"b\n")
    with drop.open("alice"), drop.open("bob") as b:
        assert len(b.messages) == 1


def test_two_maildir_objects_share_the_lock(tmp_path: Path) -> None:
    make_maildir(tmp_path)
    with Maildir(tmp_path).open("alice"), pytest.raises(MaildropLocked):
        Maildir(str(tmp_path) + "/").open("alice")


def test_lock_released_when_session_is_garbage_collected(
    make_drop: MakeDrop,
) -> None:
    drop = make_drop([b"a\n"])
    s = drop.open("alice")
    del s
    gc.collect()
    with drop.open("alice") as s2:
        assert len(s2.messages) == 1


def test_concurrent_opens_from_threads_admit_one(make_drop: MakeDrop) -> None:
    drop = make_drop([b"a\n"])
    barrier = threading.Barrier(8)
    results: list[str] = []
    sessions: list[MaildropSession] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            s = drop.open("alice")
        except MaildropLocked:
            outcome = "locked"
        else:
            outcome = "open"
            with lock:
                sessions.append(s)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["locked"] * 7 + ["open"]
    for s in sessions:
        s.close()


HOLD_LOCK = """
import sys, time
from pop3proto.bindings.maildrop import Maildir
session = Maildir(sys.argv[1]).open(sys.argv[2])
print("locked", len(session.messages), flush=True)
time.sleep(60)
"""

TRY_LOCK = """
import sys
from pop3proto.bindings.maildrop import Maildir, MaildropLocked
try:
    Maildir(sys.argv[1]).open(sys.argv[2]).close()
except MaildropLocked:
    sys.exit(3)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A subprocess that holds alice's lock until killed."""
    Maildir(tmp_path).add("alice", b"x\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path), "alice"],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["locked", "1"]
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_lock_held_by_another_process_is_in_use(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(MaildropLocked):
        Maildir(tmp_path).open("alice")


def test_lock_released_when_holder_process_is_killed(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(MaildropLocked):
        Maildir(tmp_path).open("alice")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # The lock file stays; the kernel dropped the lock with the process.
    assert (tmp_path / "alice" / LOCK_NAME).exists()
    with Maildir(tmp_path).open("alice") as s:
        assert len(s.messages) == 1


def test_lock_held_here_refuses_another_process(tmp_path: Path) -> None:
    drop = Maildir(tmp_path)
    drop.add("alice", b"x\n")

    def attempt() -> int:
        return subprocess.run(
            [sys.executable, "-c", TRY_LOCK, str(tmp_path), "alice"],
            env=subprocess_env(),
            timeout=60,
        ).returncode

    with drop.open("alice"):
        assert attempt() == 3
    assert attempt() == 0


# --------------------------------------------------------------------------
# commit and close (HARDENING 51, 52, 53)


def test_commit_removes_exactly_the_given_messages(
    make_drop: MakeDrop,
) -> None:
    datas = [b"m0\n", b"m1\n", b"m2\n", b"m3\n"]
    drop = make_drop(datas)
    with drop.open("alice") as s:
        keep_uids = [s.messages[0].uid, s.messages[2].uid]
        s.commit([s.messages[1].key, s.messages[3].key, s.messages[1].key])
    with drop.open("alice") as s:
        assert [m.uid for m in s.messages] == keep_uids
        assert [read_all(s, i) for i in range(2)] == [b"m0\n", b"m2\n"]


def test_commit_nothing_removes_nothing(make_drop: MakeDrop) -> None:
    drop = make_drop([b"a\n"])
    with drop.open("alice") as s:
        s.commit([])
    with drop.open("alice") as s:
        assert len(s.messages) == 1


def test_close_without_commit_removes_nothing(make_drop: MakeDrop) -> None:
    drop = make_drop([b"a\n", b"b\n"])
    s = drop.open("alice")
    uids = [m.uid for m in s.messages]
    s.close()
    with drop.open("alice") as s2:
        assert [m.uid for m in s2.messages] == uids


def test_exception_in_session_block_removes_nothing(
    make_drop: MakeDrop,
) -> None:
    drop = make_drop([b"a\n"])
    with pytest.raises(ConnectionResetError), drop.open("alice"):
        raise ConnectionResetError
    with drop.open("alice") as s:
        assert len(s.messages) == 1


def test_closed_session_refuses_use(make_drop: MakeDrop) -> None:
    drop = make_drop([b"a\n"])
    s = drop.open("alice")
    key = s.messages[0].key
    s.close()
    assert s.closed
    with pytest.raises(MaildropError):
        s.open_message(0)
    with pytest.raises(MaildropError):
        s.commit([key])
    with drop.open("alice") as s2:
        assert len(s2.messages) == 1


def test_unknown_key_refused_before_anything_is_removed(
    make_drop: MakeDrop,
) -> None:
    drop = make_drop([b"a\n", b"b\n"])
    with drop.open("alice") as s, pytest.raises(MaildropError):
        s.commit([s.messages[0].key, "cur/not-a-message"])
    with drop.open("alice") as s:
        assert len(s.messages) == 2


def test_commit_of_message_already_gone_succeeds(tmp_path: Path) -> None:
    a = put(tmp_path, "1.M1.h", b"a\n")
    put(tmp_path, "2.M2.h", b"b\n")
    drop = Maildir(tmp_path)
    with drop.open("alice") as s:
        a.unlink()  # removed by other mail software meanwhile
        with pytest.raises(MaildropError):
            s.open_message(0)
        s.commit([m.key for m in s.messages])
    assert os.listdir(tmp_path / "alice" / "new") == []


def test_message_renamed_during_session_is_read_and_removed(tmp_path: Path) -> None:
    put(tmp_path, "1.M1.h:2,", b"a\n", sub="cur")
    drop = Maildir(tmp_path)
    with drop.open("alice") as s:
        # An IMAP client sets a flag while the POP3 session is open.
        os.rename(tmp_path / "alice/cur/1.M1.h:2,", tmp_path / "alice/cur/1.M1.h:2,S")
        assert read_all(s, 0) == b"a\n"
        s.commit([s.messages[0].key])
    assert os.listdir(tmp_path / "alice" / "cur") == []


def test_commit_failure_reported_after_trying_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        put(tmp_path, f"{i}.M{i}.h", f"m{i}\n".encode(), mtime=time.time() - 100 + i)
    drop = Maildir(tmp_path)
    real_unlink = os.unlink
    attempted: list[str] = []

    def failing_unlink(path: str, *, dir_fd: int | None = None) -> None:
        attempted.append(path)
        if path.startswith("1.M1"):
            raise OSError(5, "Input/output error")
        real_unlink(path, dir_fd=dir_fd)

    with drop.open("alice") as s:
        monkeypatch.setattr(os, "unlink", failing_unlink)
        with pytest.raises(MaildropError) as info:
            s.commit([m.key for m in s.messages])
        monkeypatch.undo()
    assert info.value.code == "SYS/TEMP"
    assert sorted(attempted) == ["0.M0.h", "1.M1.h", "2.M2.h", "3.M3.h"]
    assert os.listdir(tmp_path / "alice" / "new") == ["1.M1.h"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_commit_failure_on_read_only_directory(tmp_path: Path) -> None:
    put(tmp_path, "1.M1.h", b"a\n", sub="cur")
    drop = Maildir(tmp_path)
    cur = tmp_path / "alice" / "cur"
    with drop.open("alice") as s:
        cur.chmod(0o555)
        try:
            with pytest.raises(MaildropError):
                s.commit([s.messages[0].key])
        finally:
            cur.chmod(0o755)
    assert os.listdir(cur) == ["1.M1.h"]


def test_commit_fsyncs_changed_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path, "1.M1.h", b"a\n", sub="cur")
    put(tmp_path, "2.M2.h", b"b\n", sub="new")
    drop = Maildir(tmp_path)
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st_ = os.fstat(fd)
        synced.append((st_.st_dev, st_.st_ino))
        real_fsync(fd)

    with drop.open("alice") as s:
        monkeypatch.setattr(os, "fsync", spy)
        s.commit([m.key for m in s.messages if m.key.startswith("cur/")])
    cur = os.stat(tmp_path / "alice" / "cur")
    new = os.stat(tmp_path / "alice" / "new")
    assert (cur.st_dev, cur.st_ino) in synced
    assert (new.st_dev, new.st_ino) not in synced


def test_commit_fsync_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path, "1.M1.h", b"a\n")
    drop = Maildir(tmp_path)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with drop.open("alice") as s:
        monkeypatch.setattr(os, "fsync", broken)
        with pytest.raises(MaildropError):
            s.commit([s.messages[0].key])


COMMIT_ALL = """
import sys
from pop3proto.bindings.maildrop import Maildir
session = Maildir(sys.argv[1]).open(sys.argv[2])
print("open", flush=True)
session.commit([m.key for m in session.messages])
print("done", flush=True)
"""


def test_kill_during_commit_leaves_each_message_intact_or_gone(tmp_path: Path) -> None:
    originals: dict[str, bytes] = {}
    box = make_maildir(tmp_path)
    for i in range(1500):
        data = (f"Subject: {i}\n\n" + "line\n" * (i % 50)).encode()
        name = f"{1000 + i}.M{i}.h"
        (box / "cur" / name).write_bytes(data)
        originals[name] = data
    for attempt in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", COMMIT_ALL, str(tmp_path), "alice"],
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "open"
        time.sleep(random.uniform(0, 0.01) if attempt == 0 else 0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        for name in os.listdir(box / "cur"):
            assert (box / "cur" / name).read_bytes() == originals[name]
    # The stale lock is reclaimed, and the survivors are listed intact.
    with Maildir(tmp_path).open("alice") as s:
        remaining = {m.uid for m in s.messages}
        assert remaining == set(os.listdir(box / "cur"))
        for i, m in enumerate(s.messages):
            assert read_all(s, i) == originals[m.uid]


# --------------------------------------------------------------------------
# the size cache (HARDENING 50)


def count_size_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = md._file_size

    def counting(fd_dir: int, name: str) -> int | None:
        calls.append(name)
        return real(fd_dir, name)

    monkeypatch.setattr(md, "_file_size", counting)
    return calls


def test_second_open_reads_no_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path)
    for i in range(2000):
        (box / "new" / f"{i}.M{i}.h").write_bytes(b"x\n" * (i % 7))
    calls = count_size_reads(monkeypatch)
    drop = Maildir(tmp_path)
    with drop.open("alice") as s:
        first = [(m.uid, m.size) for m in s.messages]
    assert len(calls) == 2000
    calls.clear()
    with drop.open("alice") as s:
        assert [(m.uid, m.size) for m in s.messages] == first
    assert calls == []
    assert sorted(first) == sorted((f"{i}.M{i}.h", 3 * (i % 7)) for i in range(2000))


def test_cache_recomputes_changed_and_new_messages_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(tmp_path, "1.M1.h", b"a\n")
    b = put(tmp_path, "2.M2.h", b"b\n")
    drop = Maildir(tmp_path)
    with drop.open("alice"):
        pass
    calls = count_size_reads(monkeypatch)
    b.write_bytes(b"b\nb\nb\n")
    os.utime(b, ns=(1, 1))
    put(tmp_path, "3.M3.h", b"c\r\n")
    with drop.open("alice") as s:
        sizes = {m.uid: m.size for m in s.messages}
    assert sorted(calls) == ["2.M2.h", "3.M3.h"]
    assert sizes == {"1.M1.h": 3, "2.M2.h": 9, "3.M3.h": 3}


def test_cache_follows_rename_to_cur_without_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(tmp_path, "1.M1.h", b"a\n")
    drop = Maildir(tmp_path)
    with drop.open("alice"):
        pass
    os.rename(tmp_path / "alice/new/1.M1.h", tmp_path / "alice/cur/1.M1.h:2,S")
    calls = count_size_reads(monkeypatch)
    with drop.open("alice") as s:
        assert [(m.uid, m.size) for m in s.messages] == [("1.M1.h", 3)]
    assert calls == []


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"version": 99, "next": 5, "messages": {}}',
        b'{"version": 1, "next": 5, "messages": {"1.M1.h": [0, 2, 0, "x"]}}',
        b'{"version": 1, "next": -1, "messages": {}}',
        b"[" * 100000,
    ],
)
def test_damaged_index_is_ignored_and_rebuilt(tmp_path: Path, content: bytes) -> None:
    put(tmp_path, "1.M1.h", b"a\nb\n")
    (tmp_path / "alice" / INDEX_NAME).write_bytes(content)
    drop = Maildir(tmp_path)
    with drop.open("alice") as s:
        assert [(m.uid, m.size) for m in s.messages] == [("1.M1.h", 6)]
    doc = json.loads((tmp_path / "alice" / INDEX_NAME).read_bytes())
    assert doc["messages"]["1.M1.h"][3] == 6


def test_oversized_index_is_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path, "1.M1.h", b"a\n")
    drop = Maildir(tmp_path)
    with drop.open("alice"):
        pass
    index = tmp_path / "alice" / INDEX_NAME
    doc = json.loads(index.read_bytes())
    doc["padding"] = "x" * 200_000
    index.write_text(json.dumps(doc))
    calls = count_size_reads(monkeypatch)
    with drop.open("alice") as s:
        assert s.messages[0].size == 3
    assert calls == ["1.M1.h"]


def test_index_written_atomically_and_pruned(tmp_path: Path) -> None:
    put(tmp_path, "1.M1.h", b"a\n")
    put(tmp_path, "2.M2.h", b"b\n")
    drop = Maildir(tmp_path)
    with drop.open("alice") as s:
        s.commit([s.messages[0].key])
    with drop.open("alice"):
        pass
    box = tmp_path / "alice"
    doc = json.loads((box / INDEX_NAME).read_bytes())
    assert sorted(doc["messages"]) == ["2.M2.h"]
    assert sorted(os.listdir(box)) == sorted(["cur", "new", "tmp", INDEX_NAME, LOCK_NAME])


def test_unwritable_index_still_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path, "1.M1.h", b"a\n")
    real_open = os.open

    def no_index(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if str(path).startswith(INDEX_NAME) and flags & os.O_CREAT:
            raise OSError(28, "No space left on device")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", no_index)
    with Maildir(tmp_path).open("alice") as s:
        assert [(m.uid, m.size) for m in s.messages] == [("1.M1.h", 3)]
    assert not (tmp_path / "alice" / INDEX_NAME).exists()
    assert not (tmp_path / "alice" / (INDEX_NAME + ".tmp")).exists()


# --------------------------------------------------------------------------
# delivery


def test_maildir_add_delivers_into_new_durably(tmp_path: Path) -> None:
    drop = Maildir(tmp_path)
    uid = drop.add("alice", b"Subject: hi\n\nbody\n")
    box = tmp_path / "alice"
    assert os.listdir(box / "tmp") == []
    (name,) = os.listdir(box / "new")
    assert name == uid
    assert (box / "new" / name).read_bytes() == b"Subject: hi\n\nbody\n"
    assert (box / "new" / name).stat().st_mode & 0o077 == 0
    with drop.open("alice") as s:
        assert s.messages[0].uid == uid


def test_memory_contents_reflect_commits() -> None:
    drop = MemoryMaildrop({"u": [b"a\n", b"b\n"]})
    with drop.open("u") as s:
        s.commit([s.messages[0].key])
    assert drop.contents("u") == [b"b\n"]
    assert drop.contents("nobody") == []


def test_memory_read_small_matches_open_message_and_declines_large() -> None:
    drop = MemoryMaildrop({"u": [b"small\n", b"y" * 300]})
    with drop.open("u") as s:
        assert s.read_small(0, 6) == read_all(s, 0) == b"small\n"
        assert s.read_small(0, 5) is None
        assert s.read_small(1, 300) == read_all(s, 1)
        with pytest.raises(IndexError):
            s.read_small(2, 100)


def test_read_small_matches_open_message_and_declines_the_rest(tmp_path: Path) -> None:
    """The server's fast path for small messages: the same bytes as
    ``open_message``, or None (too large, renamed, swapped for a symlink)
    so that ``open_message`` decides."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's secret\n")
    put(tmp_path / "mail", "1.M1.h", b"small\nmessage\n")
    put(tmp_path / "mail", "2.M2.h", b"x" * 5000)
    third = put(tmp_path / "mail", "3.M3.h", b"third\n")
    fourth = put(tmp_path / "mail", "4.M4.h", b"fourth\n")
    with Maildir(tmp_path / "mail").open("alice") as s:
        assert s.read_small(0, 100) == read_all(s, 0) == b"small\nmessage\n"
        assert s.read_small(1, 5000) == read_all(s, 1)
        assert s.read_small(1, 4999) is None  # over the limit
        third.rename(third.parent.parent / "cur" / (third.name + ":2,S"))
        assert s.read_small(2, 100) is None  # renamed: open_message finds it
        assert read_all(s, 2) == b"third\n"
        fourth.unlink()
        fourth.symlink_to(secret)
        assert s.read_small(3, 100) is None
        with pytest.raises(MaildropError):
            s.open_message(3)


def test_read_small_follows_a_file_changed_since_listing(tmp_path: Path) -> None:
    """``read_small`` reads the listed size plus one octet: a file that grew
    or shrank since the listing is still read whole (or declined when it
    grew past the limit)."""
    grows = put(tmp_path, "1.M1.h", b"abc\n")
    shrinks = put(tmp_path, "2.M2.h", b"abcdefgh\n")
    past = put(tmp_path, "3.M3.h", b"x\n")
    empty = put(tmp_path, "4.M4.h", b"")
    with Maildir(tmp_path).open("alice") as s:
        grows.write_bytes(b"abc\n" * 10)
        shrinks.write_bytes(b"ab\n")
        past.write_bytes(b"x" * 200)
        assert s.read_small(0, 100) == b"abc\n" * 10
        assert s.read_small(1, 100) == b"ab\n"
        assert s.read_small(2, 100) is None
        assert s.read_small(3, 100) == b""
        empty.write_bytes(b"late\n")
        assert s.read_small(3, 100) == b"late\n"


def _age_directories(box: Path, seconds: float = 10.0) -> None:
    then = time.time() - seconds
    for sub in ("new", "cur"):
        os.utime(box / sub, (then, then))


def count_listings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = md._list

    def counting(*args: object) -> object:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(md, "_list", counting)
    return calls


def test_unchanged_maildir_is_not_listed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second session on a Maildir whose new/ and cur/ have not changed
    reuses the listing; every kind of change is seen."""
    put(tmp_path, "1.M1.h", b"a\n")
    put(tmp_path, "2.M2.h", b"bb\n", sub="cur")
    box = tmp_path / "alice"
    _age_directories(box)
    calls = count_listings(monkeypatch)
    drop = Maildir(tmp_path)
    with drop.open("alice") as s:
        first = [(m.uid, m.size) for m in s.messages]
    with drop.open("alice") as s:
        assert [(m.uid, m.size) for m in s.messages] == first
        assert read_all(s, 1) == b"bb\n"
    assert len(calls) == 1
    assert first == [("1.M1.h", 3), ("2.M2.h", 4)]

    # A delivery into new/ (directory time now fresh: listed every time
    # until it settles).
    put(tmp_path, "3.M3.h", b"c\n")
    with drop.open("alice") as s:
        assert [m.uid for m in s.messages] == ["1.M1.h", "2.M2.h", "3.M3.h"]
    with drop.open("alice") as s:
        assert len(s.messages) == 3
    assert len(calls) == 3

    # A rename new/ -> cur/ by another program, after things settled.
    _age_directories(box)
    with drop.open("alice"):
        pass
    assert len(calls) == 4
    os.rename(box / "new" / "1.M1.h", box / "cur" / "1.M1.h:2,S")
    with drop.open("alice") as s:
        assert [m.uid for m in s.messages] == ["1.M1.h", "2.M2.h", "3.M3.h"]
        assert read_all(s, 0) == b"a\n"
    assert len(calls) == 5

    # A removal through another Maildir object (another process).
    _age_directories(box)
    with drop.open("alice"):
        pass
    with Maildir(tmp_path).open("alice") as other:
        other.commit([other.messages[1].key])
    with drop.open("alice") as s:
        assert [m.uid for m in s.messages] == ["1.M1.h", "3.M3.h"]
    assert len(calls) == 8


def test_fresh_directories_are_listed_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory changed within the last moments may change again
    without its time moving: its listing is not reused."""
    put(tmp_path, "1.M1.h", b"a\n")
    calls = count_listings(monkeypatch)
    drop = Maildir(tmp_path)
    for _ in range(3):
        with drop.open("alice") as s:
            assert len(s.messages) == 1
    assert len(calls) == 3


def test_listings_kept_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Maildir, "LISTINGS_KEPT", 3)
    drop = Maildir(tmp_path)
    for i in range(6):
        put(tmp_path, "1.M1.h", b"a\n", user=f"u{i}")
        _age_directories(tmp_path / f"u{i}")
        with drop.open(f"u{i}"):
            pass
    assert len(drop._listings) == 3
    calls = count_listings(monkeypatch)
    with drop.open("u5"):
        pass
    with drop.open("u0"):
        pass
    assert len(calls) == 1  # u5 kept, u0 forgotten


def test_messages_in_kept_listings_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Maildir, "LISTED_MESSAGES_KEPT", 5)
    drop = Maildir(tmp_path)
    for user, count in (("a", 2), ("b", 2), ("c", 3), ("big", 6)):
        for i in range(count):
            put(tmp_path, f"{i}.M{i}.h", b"x\n", user=user)
        _age_directories(tmp_path / user)
        with drop.open(user):
            pass
    # c (3) pushed a out; big (6) is over the bound alone: not kept.
    assert drop._listed == 5
    calls = count_listings(monkeypatch)
    for user in ("b", "c"):
        with drop.open(user):
            pass
    assert calls == []
    for user in ("a", "big"):
        with drop.open(user):
            pass
    assert len(calls) == 2
