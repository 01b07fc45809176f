"""A credential file that a running server reads again when it changes.

``CredentialFile(path)`` is an ``Authenticator`` (see ``pop3proto._auth``)
over the file that ``pop3proto passwd`` writes: users added, removed or given
a new password take effect for the next login, with no restart and no signal.
Every ``serve`` worker process checks the file on its own.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable

from pop3proto._auth import AuthCapabilities, CredentialFileError, PasswordTable, load_credentials
from pop3proto._sasl import ScramCredentials

__all__ = ["MAX_CREDENTIAL_FILE", "CredentialFile"]

log = logging.getLogger("pop3proto.server")

#: The largest credential file read, in octets.
MAX_CREDENTIAL_FILE = 16 * 1024 * 1024

_Stamp = tuple[int, int, int, int, int]
_MISSING: _Stamp = (-1, -1, -1, -1, -1)


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class CredentialFile:
    """An ``Authenticator`` over the credential file ``path``, read again
    when it changes.

    At most once per ``check_interval`` seconds (at a login; never in the
    background) the file's device, inode, size and change times are compared
    with those of the last read, so an atomic replacement (what ``pop3proto
    passwd`` does) and an edit in place are both seen. A file that has become
    unreadable or invalid is not used: the last good one stays in force and a
    warning is logged (once per change), naming the line but never a secret.
    The tables share one salt key, so a name gets the same made-up SCRAM salt
    before and after a change (a reload does not tell unknown users apart).

    The first read happens in the constructor and raises ``OSError``,
    ``UnicodeDecodeError`` or ``CredentialFileError`` (also for a file over
    ``MAX_CREDENTIAL_FILE`` octets). Safe to use from several threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = os.fspath(path)
        self.check_interval = check_interval
        self._clock = clock
        self._salt_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._table, self._stamp = self._read()
        self._refused: _Stamp | None = None
        self._next_check = clock() + check_interval
        #: How many times a changed file was taken into use.
        self.reloads = 0

    def _read(self) -> tuple[PasswordTable, _Stamp]:
        with open(self.path, encoding="utf-8", newline="") as fh:
            stamp = _stamp(os.fstat(fh.fileno()))
            text = fh.read(MAX_CREDENTIAL_FILE + 1)
        if len(text) > MAX_CREDENTIAL_FILE:
            raise CredentialFileError(f"larger than {MAX_CREDENTIAL_FILE} octets")
        return load_credentials(text, salt_key=self._salt_key), stamp

    @property
    def table(self) -> PasswordTable:
        """The table in force (after checking the file, when it is time)."""
        now = self._clock()
        if now >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._next_check = now + self.check_interval
                self._check()
            finally:
                self._lock.release()
        return self._table

    def _check(self) -> None:
        try:
            stamp = _stamp(os.stat(self.path))
        except OSError as exc:
            self._refuse(_MISSING, f"cannot read it ({exc.strerror or exc})")
            return
        if stamp == self._stamp or stamp == self._refused:
            return
        try:
            table, stamp = self._read()
        except (OSError, UnicodeDecodeError, CredentialFileError) as exc:
            self._refuse(stamp, str(exc))
            return
        self._table, self._stamp, self._refused = table, stamp, None
        self.reloads += 1
        log.info("credential file %s read again: %d users", self.path, len(table))

    def _refuse(self, stamp: _Stamp, why: str) -> None:
        if stamp != self._refused:
            log.warning("credential file %s not used: %s; the previous one stays", self.path, why)
        self._refused = stamp

    # -- Authenticator ------------------------------------------------------

    def capabilities(self) -> AuthCapabilities:
        return self.table.capabilities()

    def user_exists(self, user: str) -> bool:
        return self.table.user_exists(user)

    def check_password(self, user: str, password: str) -> bool:
        return self.table.check_password(user, password)

    def scram_credentials(self, user: str, hash_name: str) -> ScramCredentials | None:
        return self.table.scram_credentials(user, hash_name)

    def check_cram_md5(self, user: str, challenge: bytes, digest: str) -> bool:
        return self.table.check_cram_md5(user, challenge, digest)

    def check_apop(self, user: str, timestamp: bytes, digest: str) -> bool:
        return self.table.check_apop(user, timestamp, digest)

    def check_token(self, user: str | None, token: str) -> str | None:
        return self.table.check_token(user, token)

    def may_act_as(self, authcid: str, authzid: str) -> bool:
        return self.table.may_act_as(authcid, authzid)
