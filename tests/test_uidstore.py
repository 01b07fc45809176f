"""The fetcher's UID store: escaping, account keys, durability, bounded and
crash-tolerant parsing, locking."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pop3proto.bindings import uidstore
from pop3proto.bindings.uidstore import (
    HEADER,
    STORE_DIR,
    UidStore,
    UidStoreError,
    UidStoreLocked,
    account_key,
    escape,
    unescape,
)

# ---------------------------------------------------------------- escaping

uid_text = st.text(
    st.characters(blacklist_categories=("Cs",)) | st.sampled_from(["%", " ", "\0", "\udc80"]),
    min_size=1,
    max_size=80,
)


@given(uid_text)
def test_escape_round_trips_and_is_printable(uid: str) -> None:
    text = escape(uid)
    assert unescape(text) == uid
    assert text and all(0x21 <= ord(c) <= 0x7E for c in text)
    assert "%" not in uid or "%25" in text


@pytest.mark.parametrize(
    ("uid", "escaped"),
    [
        ("abc.1", "abc.1"),
        ("a b", "a%20b"),
        ("100%", "100%25"),
        ("caf\u00e9", "caf%C3%A9"),
        ("x\0y", "x%00y"),
    ],
)
def test_escape_examples(uid: str, escaped: str) -> None:
    assert escape(uid) == escaped
    assert unescape(escaped) == uid


@pytest.mark.parametrize("bad", ["", "a b", "%", "%4", "%zz", "%4a", "a%2", "\u00e9"])
def test_unescape_rejects_what_escape_never_writes(bad: str) -> None:
    with pytest.raises(ValueError):
        unescape(bad)


# ---------------------------------------------------------------- account keys


@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=80), st.integers(1, 65535))
def test_account_key_is_a_safe_file_name(user: str, host: str, port: int) -> None:
    key = account_key(host, port, user)
    assert "/" not in key and "\0" not in key
    assert not key.startswith(".")
    assert len(key) <= 160 + 33
    assert all(c.isascii() and (c.isalnum() or c in "._-%@~") for c in key)


@settings(max_examples=200)
@given(
    st.tuples(
        st.text(min_size=1, max_size=200), st.text(min_size=1, max_size=40), st.integers(1, 9)
    ),
    st.tuples(
        st.text(min_size=1, max_size=200), st.text(min_size=1, max_size=40), st.integers(1, 9)
    ),
)
def test_account_keys_differ_for_different_accounts(
    a: tuple[str, str, int], b: tuple[str, str, int]
) -> None:
    (ua, ha, pa), (ub, hb, pb) = a, b
    if (ua, ha.lower(), pa) != (ub, hb.lower(), pb):
        assert account_key(ha, pa, ua) != account_key(hb, pb, ub)


def test_account_key_examples() -> None:
    assert account_key("Pop.Example.ORG", 995, "alice") == "alice@pop.example.org_995"
    assert account_key("h", 110, "a@b") == "a%40b@h_110"
    assert account_key("h", 110, "../../etc") == "%2E.%2F..%2Fetc@h_110"
    assert account_key("::1", 110, "u") == "u@%3A%3A1_110"


def test_hostile_user_cannot_leave_the_store_directory(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    with UidStore.for_maildir(md, "h", 110, "../../escape") as store:
        store.add("u1")
        assert Path(store.path).parent == md / STORE_DIR
    assert not (tmp_path / "escape").exists()
    assert sorted(p.name for p in (md / STORE_DIR).iterdir()) == [
        "%2E.%2F..%2Fescape@h_110",
        "%2E.%2F..%2Fescape@h_110.lock",
    ]


# ---------------------------------------------------------------- durability


def test_added_uids_survive_reopening(tmp_path: Path) -> None:
    with UidStore(tmp_path, "acct") as store:
        store.add("one", when=1000)
        store.add("two words", when=2000)
        store.add("one", when=3000)  # first time kept
        assert "one" in store and "three" not in store
        assert len(store) == 2
    with UidStore(tmp_path, "acct") as again:
        assert set(again) == {"one", "two words"}
        assert again.delivered_at("one") == 1000
        assert again.delivered_at("two words") == 2000
        assert again.delivered_at("nope") is None
    text = (tmp_path / "acct").read_bytes()
    assert text == HEADER + b"1000 one\n2000 two%20words\n"
    assert stat.S_IMODE(os.stat(tmp_path / "acct").st_mode) == 0o600


def test_add_fsyncs_before_returning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    with UidStore(tmp_path, "acct") as store:
        monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
        store.add("x")
        assert synced, "add returned without an fsync"


def test_prune_rewrites_atomically(tmp_path: Path) -> None:
    with UidStore(tmp_path, "acct") as store:
        for i in range(10):
            store.add(f"u{i}", when=i)
        inode = os.stat(store.path).st_ino
        assert store.prune(["u3", "u7", "not-there"]) == 8
        assert set(store) == {"u3", "u7"}
        assert os.stat(store.path).st_ino != inode  # a new file renamed over the old
        assert store.prune(["u3", "u7"]) == 0
        store.add("later", when=99)
    with UidStore(tmp_path, "acct") as again:
        assert set(again) == {"u3", "u7", "later"}
        assert again.delivered_at("u7") == 7
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _maildir(root: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def test_intents_are_resolved_against_the_maildir(tmp_path: Path) -> None:
    """A fetch killed after delivering but before committing leaves intents:
    the next open records exactly the messages that reached new/ or cur/."""
    md = _maildir(tmp_path / "md")
    with UidStore(md / STORE_DIR, "acct", maildir=md) as store:
        store.add("old", when=5)
        store.intend([("in-new", "1.M1P1Q1R1.host"), ("in-cur", "1.M1P1Q2R1.host")])
        store.intend([("lost", "1.M1P1Q3R1.host"), ("old", "1.M1P1Q4R1.host")])
        store.record("in-new")  # recorded in memory only: never committed
        (md / "new" / "1.M1P1Q1R1.host").write_bytes(b"a")
        (md / "cur" / "1.M1P1Q2R1.host:2,S").write_bytes(b"b")
        (md / "tmp" / "1.M1P1Q3R1.host").write_bytes(b"c")  # never linked
        text = (md / STORE_DIR / "acct").read_bytes()
        assert text.count(b"\n? ") == 3  # "old" was recorded already: no intent
    with UidStore(md / STORE_DIR, "acct", maildir=md) as again:
        assert set(again) == {"old", "in-new", "in-cur"}
        assert again.delivered_at("old") == 5
    # resolved once, then rewritten without intents
    assert b"? " not in (md / STORE_DIR / "acct").read_bytes()


def test_intents_without_a_maildir_are_dropped(tmp_path: Path) -> None:
    md = _maildir(tmp_path / "md")
    (md / "new" / "n1").write_bytes(b"a")
    with UidStore(tmp_path / "s", "acct") as store:
        store.intend([("u", "n1")])
    with UidStore(tmp_path / "s", "acct") as again:
        assert set(again) == set()  # fetched again: never lost


def test_record_is_durable_after_commit_with_one_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    md = _maildir(tmp_path / "md")
    synced: list[int] = []
    real = os.fsync
    with UidStore(md / STORE_DIR, "acct", maildir=md) as store:
        monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
        store.intend([(f"u{i}", f"name{i}") for i in range(50)])
        assert len(synced) == 1  # one fsync for the whole batch of intents
        for i in range(50):
            store.record(f"u{i}", when=i)
        assert synced == synced[:1]  # record() alone writes nothing
        inode = os.stat(store.path).st_ino
        store.commit()
        assert os.stat(store.path).st_ino != inode  # rewritten, renamed over
        assert len(synced) == 3  # the new file and the directory
        store.commit()
        assert len(synced) == 3  # nothing changed: nothing written
    assert (md / STORE_DIR / "acct").read_bytes() == HEADER + b"".join(
        f"{i} u{i}\n".encode() for i in range(50)
    )


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a:2,S", "a!2,", "a b", "caf\u00e9"])
def test_intent_names_must_be_maildir_names(tmp_path: Path, name: str) -> None:
    with UidStore(tmp_path, "acct") as store, pytest.raises(ValueError):
        store.intend([("u", name)])


def test_failed_append_leaves_a_readable_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with UidStore(tmp_path, "acct") as store:
        store.add("good")
        real_write = os.write

        def half_write(fd: int, data: bytes) -> int:
            if fd == store._fd:
                real_write(fd, bytes(data[:3]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", half_write)
        with pytest.raises(UidStoreError, match="No space"):
            store.add("lost-one")
        assert "lost-one" not in store
        monkeypatch.undo()
        store.add("next")
    with UidStore(tmp_path, "acct") as again:
        assert set(again) == {"good", "next"}


def test_store_is_locked_while_open(tmp_path: Path) -> None:
    first = UidStore(tmp_path, "acct")
    with pytest.raises(UidStoreLocked):
        UidStore(tmp_path, "acct")
    other = UidStore(tmp_path, "other-account")  # other accounts are independent
    other.close()
    first.close()
    assert first.closed
    with pytest.raises(UidStoreError):
        first.add("x")
    UidStore(tmp_path, "acct").close()


# ---------------------------------------------------------------- parsing


def _write(path: Path, body: bytes) -> None:
    path.write_bytes(body)


def test_every_truncation_loads_the_complete_lines(tmp_path: Path) -> None:
    """A crash can cut the last append anywhere: the store loads the lines
    that were complete, drops the torn one, and appends cleanly after it."""
    lines = [b"100 a\n", b"200 b%20c\n", b"300 ddd\n"]
    full = HEADER + b"".join(lines)
    for cut in range(len(HEADER), len(full) + 1):
        d = tmp_path / str(cut)
        d.mkdir()
        _write(d / "acct", full[:cut])
        with UidStore(d, "acct") as store:
            body = full[len(HEADER) : cut]
            complete = body.count(b"\n")
            expected = {"a", "b c", "ddd"}
            assert set(store) == set(list(["a", "b c", "ddd"])[:complete]) <= expected
            store.add("new", when=5)
        with UidStore(d, "acct") as again:
            assert "new" in again and len(again) == complete + 1


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not a store\n", "not a pop3proto UID store"),
        (HEADER + b"100 a\nbad line\n200 b\n", "line 3"),
        (HEADER + b"x100 a\n", "line 2"),
        (HEADER + b"100 a b\n", "line 2"),
        (HEADER + b"100 %zz\n", "line 2"),
        (HEADER + b"1000000000000000 a\n", "line 2"),
        (HEADER + b"100 \n", "line 2"),
        (HEADER + b"? a/b u\n", "line 2"),
        (HEADER + b"? name\n", "line 2"),
        (HEADER + b"? name %zz\n", "line 2"),
    ],
)
def test_malformed_stores_are_refused(tmp_path: Path, body: bytes, match: str) -> None:
    _write(tmp_path / "acct", body)
    with pytest.raises(UidStoreError, match=match):
        UidStore(tmp_path, "acct")
    # the refusal released the lock: the next open fails the same way
    with pytest.raises(UidStoreError) as again:
        UidStore(tmp_path, "acct")
    assert not isinstance(again.value, UidStoreLocked)


def test_empty_file_is_a_new_store(tmp_path: Path) -> None:
    _write(tmp_path / "acct", b"")
    with UidStore(tmp_path, "acct") as store:
        assert len(store) == 0
    assert (tmp_path / "acct").read_bytes() == HEADER


def test_parsing_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "long", HEADER + b"1 " + b"a" * (uidstore.MAX_LINE + 10) + b"\n")
    with pytest.raises(UidStoreError, match="too long"):
        UidStore(tmp_path, "long")
    monkeypatch.setattr(uidstore, "MAX_LINES", 5)
    _write(tmp_path / "many", HEADER + b"".join(b"1 u%d\n" % i for i in range(10)))
    with pytest.raises(UidStoreError, match="more than 5 lines"):
        UidStore(tmp_path, "many")
    monkeypatch.setattr(uidstore, "MAX_FILE_SIZE", 64)
    _write(tmp_path / "big", HEADER + b"1 u\n" * 20)
    with pytest.raises(UidStoreError, match="larger than"):
        UidStore(tmp_path, "big")


def test_invalid_store_names_and_uids(tmp_path: Path) -> None:
    for bad in ["", "a/b", ".", ".."]:
        with pytest.raises(ValueError):
            UidStore(tmp_path, bad)
    with UidStore(tmp_path, "acct") as store, pytest.raises(ValueError):
        store.add("")


def test_symlinked_store_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(HEADER)
    d = tmp_path / "d"
    d.mkdir()
    (d / "acct").symlink_to(target)
    with pytest.raises(UidStoreError):
        UidStore(d, "acct")
    assert target.read_bytes() == HEADER
