"""``bindings.credentials.CredentialFile``: a credential file read again when
it changes, never replaced by a broken one, with stable made-up salts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pop3proto.bindings.cli import set_password
from pop3proto.bindings.credentials import CredentialFile

from pop3proto._auth import CredentialFileError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    set_password(str(path), "alice", "first-pw")
    return path


def test_changes_are_seen_at_the_next_check(users: Path) -> None:
    clock = Clock()
    creds = CredentialFile(users, check_interval=1.0, clock=clock)
    assert creds.check_password("alice", "first-pw")
    assert not creds.user_exists("bob")
    set_password(str(users), "bob", "bob-pw")  # an atomic replacement
    set_password(str(users), "alice", "second-pw")
    clock.now = 0.5  # not yet time to look
    assert not creds.user_exists("bob") and creds.check_password("alice", "first-pw")
    clock.now = 1.0
    assert creds.check_password("bob", "bob-pw")
    assert creds.check_password("alice", "second-pw")
    assert not creds.check_password("alice", "first-pw")
    assert creds.reloads == 1
    clock.now = 5.0  # unchanged: not read again
    assert creds.user_exists("bob") and creds.reloads == 1


def test_an_edit_in_place_is_seen(users: Path) -> None:
    clock = Clock()
    creds = CredentialFile(users, check_interval=0.0, clock=clock)
    text = users.read_text()
    inode = users.stat().st_ino
    with users.open("a") as fh:  # same inode, appended
        fh.write("carol:plain-pw\n")
    assert users.stat().st_ino == inode and users.read_text().startswith(text)
    assert creds.check_password("carol", "plain-pw")
    assert creds.check_password("alice", "first-pw")


@pytest.mark.parametrize("damage", ["invalid", "removed", "not-utf8"])
def test_a_broken_file_keeps_the_last_good_one(
    users: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    creds = CredentialFile(users, check_interval=0.0)
    if damage == "invalid":
        users.write_text("alice:{SCRAM-SHA-256}12$bad\n")
    elif damage == "removed":
        users.unlink()
    else:
        users.write_bytes(b"alice:\xff\xfe\n")
    with caplog.at_level(logging.WARNING, logger="pop3proto.server"):
        for _ in range(3):
            assert creds.check_password("alice", "first-pw")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per change, not once per login
    assert "previous one stays" in warnings[0].getMessage()
    assert "first-pw" not in warnings[0].getMessage()
    users.unlink(missing_ok=True)
    set_password(str(users), "alice", "fixed-pw")
    assert creds.check_password("alice", "fixed-pw") and creds.reloads == 1


def test_the_first_read_must_succeed(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CredentialFile(tmp_path / "none")
    bad = tmp_path / "bad"
    bad.write_text("no colon here\n")
    with pytest.raises(CredentialFileError):
        CredentialFile(bad)


def test_made_up_salts_survive_a_reload(users: Path) -> None:
    # An unknown user's decoy salt and a plaintext user's derived salt stay
    # the same across reloads, so probing before and after a change does not
    # tell who exists.
    with users.open("a") as fh:
        fh.write("plain:plain-pw\n")
    creds = CredentialFile(users, check_interval=0.0)
    before = {
        name: creds.scram_credentials(name, "SHA-256") for name in ("nobody", "plain", "alice")
    }
    set_password(str(users), "dave", "dave-pw")
    assert creds.user_exists("dave") and creds.reloads == 1
    for name, old in before.items():
        new = creds.scram_credentials(name, "SHA-256")
        assert old is not None and new is not None
        assert (new.salt, new.iterations) == (old.salt, old.iterations), name
    # Two files read separately make up different salts.
    other = CredentialFile(users)
    nobody = other.scram_credentials("nobody", "SHA-256")
    assert nobody is not None and nobody.salt != before["nobody"].salt  # type: ignore[union-attr]


def test_capabilities_follow_the_file(users: Path) -> None:
    creds = CredentialFile(users, check_interval=0.0)
    assert not creds.capabilities().plaintext_secrets  # verifiers only: no APOP, CRAM-MD5
    tmp = users.with_name("users.new")
    tmp.write_text(users.read_text() + "erin:plain-pw\n")
    os.replace(tmp, users)
    assert creds.capabilities().plaintext_secrets
