"""The client's record of messages already delivered, by POP3 unique-id.

``pop3proto fetch`` keeps one store per account (host, port, user) inside the
destination Maildir, at ``DIR/pop3proto-uids/<account key>`` (a plain
directory: Maildir++ readers only treat dot-directories as folders). A UID is
recorded only once its message is on disk and fsynced, and a message is
deleted on the server only once its UID is recorded, so a fetch killed at any
point loses nothing and fetches at most one message twice (HARDENING 56, 58).

Two ways to record:

* ``add`` appends one line and fsyncs before it returns: one fsync per UID.
* ``intend`` + ``record`` + ``commit``, what ``fetch`` does: before a batch of
  messages is delivered, ``intend`` appends one *intent* line per message (the
  UID and the Maildir file name it is about to be delivered under) and fsyncs
  once; each message is recorded in memory (``record``) once its file is
  durable in ``new/``; ``commit`` then rewrites the store (fsync + rename)
  before anything is deleted on the server. A fetch killed in between leaves
  intent lines behind: the next open looks each one up in the Maildir's
  ``new/`` and ``cur/`` and records the UID of every message found there, so
  not even one message is fetched twice — with one fsync per batch instead
  of one per message.

Promises:

* Durability: ``add`` appends one line and fsyncs before it returns;
  ``intend`` likewise for its intent lines; a store is created and rewritten
  (``commit``, ``prune``, repair of a torn last line, resolution of intents)
  through a temporary file, fsync, rename and an fsync of the directory, so
  the file is always either the old or the new version.
* Bounded parsing: lines longer than ``MAX_LINE``, more than ``MAX_LINES``
  lines, or a file larger than ``MAX_FILE_SIZE`` raise ``UidStoreError``
  instead of growing memory; so does any malformed line other than a torn
  final line (what an append cut short by a crash leaves, and which is
  dropped).
* Names: a UID is percent-escaped in the file (any octet outside 0x21-0x7E,
  and ``%``), and never becomes part of a file name; the account key is
  escaped the same way (HARDENING 7).
* One fetch per account at a time: the store holds an exclusive ``flock`` on
  ``<account key>.lock`` while open (``UidStoreLocked`` otherwise); the kernel
  drops it when the process dies.

File format (ASCII)::

    # pop3proto uid store 1
    1700000000 <escaped uid>
    ? <maildir file name> <escaped uid>

one line per delivery: the Unix time of delivery and the UID; ``?`` lines are
intents (see above), present only while a fetch runs or after one was killed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from collections.abc import Iterable, Iterator
from types import TracebackType

__all__ = [
    "HEADER",
    "MAX_FILE_SIZE",
    "MAX_LINE",
    "MAX_LINES",
    "STORE_DIR",
    "UidStore",
    "UidStoreError",
    "UidStoreLocked",
    "account_key",
    "escape",
    "unescape",
]

#: Directory, inside the Maildir, holding one store per account.
STORE_DIR = "pop3proto-uids"
#: First line of every store file.
HEADER = b"# pop3proto uid store 1\n"
#: Longest line accepted (a 8 KiB UID escaped three octets per octet, plus the time).
MAX_LINE = 3 * 8192 + 32
#: Most lines accepted in one store.
MAX_LINES = 2_000_000
#: Largest store file accepted.
MAX_FILE_SIZE = 256 * 1024 * 1024
#: Longest account key used as a file name as it is; longer ones are shortened
#: and made unique with a hash.
_MAX_KEY = 160

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_SAFE_UID = frozenset(range(0x21, 0x7F)) - {ord("%")}
_SAFE_KEY = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_ESCAPE = re.compile(rb"%([0-9A-F]{2})")
#: A Maildir unique name as an intent line may hold it: printable ASCII, no dot
#: first, no ``/``, no ``:`` or ``!`` (those start the info part in ``cur/``).
_MAILDIR_NAME = re.compile(rb"[\x22-\x2d\x30-\x39\x3b-\x7e][\x22-\x2e\x30-\x39\x3b-\x7e]{0,254}")


class UidStoreError(Exception):
    """The store cannot be read or written: a malformed or oversized file, or
    an I/O error (the ``OSError`` is chained)."""


class UidStoreLocked(UidStoreError):
    """Another process holds this account's store (a fetch is running)."""


def escape(uid: str) -> str:
    """``uid`` with every octet of its UTF-8 form outside 0x21-0x7E, and
    ``%``, written as ``%XX``: printable, no space, never a path separator
    issue inside a line. Lone surrogates (undecodable octets) round-trip."""
    if uid.isascii() and uid.isprintable() and " " not in uid and "%" not in uid:
        return uid  # the usual case: nothing to escape
    raw = uid.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _SAFE_UID else f"%{b:02X}" for b in raw)


def unescape(text: str) -> str:
    """The inverse of :func:`escape`. Raises ``ValueError`` for text that
    :func:`escape` cannot have produced."""
    raw = text.encode("ascii")
    if not raw or any(b not in _SAFE_UID and b != ord("%") for b in raw):
        raise ValueError("invalid escaped UID")
    out = _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), raw)
    if b"%" in _ESCAPE.sub(b"", raw):
        raise ValueError("invalid escape in UID")
    result = out.decode("utf-8", "surrogateescape")
    if escape(result) != text:
        raise ValueError("UID not in canonical escaped form")
    return result


def account_key(host: str, port: int, user: str) -> str:
    """A file name for the account ``user`` at ``host``:``port``: only
    ``A-Z a-z 0-9 . _ -`` and ``%XX`` escapes, never starting with ``.``,
    at most 160 + 33 characters, different for different accounts (long keys
    end in a SHA-256 prefix of the full key)."""

    def part(text: str) -> str:
        return "".join(
            chr(b) if b in _SAFE_KEY else f"%{b:02X}"
            for b in text.encode("utf-8", "surrogateescape")
        )

    key = f"{part(user)}@{part(host.lower())}_{int(port)}"
    if key.startswith("."):
        key = "%2E" + key[1:]
    if len(key) > _MAX_KEY:
        import hashlib

        digest = hashlib.sha256(key.encode("ascii")).hexdigest()[:32]
        key = f"{key[:_MAX_KEY]}~{digest}"
    return key


def _fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class UidStore:
    """The UIDs already delivered from one account, with their delivery times.

    ``UidStore(directory, key)`` opens (creating when missing) the store
    ``directory/key`` and locks it; :meth:`for_maildir` picks the directory
    and key for an account. Use as a context manager or call :meth:`close`.
    Not thread-safe: one fetch owns it.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        key: str,
        maildir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not key or "/" in key or key in (".", "..") or "\0" in key:
            raise ValueError(f"invalid store name: {key!r}")
        self.directory = os.fspath(directory)
        self.key = key
        #: The Maildir whose ``new/`` and ``cur/`` intents are looked up in
        #: (None: intents left by a killed fetch are dropped, so those
        #: messages are fetched again).
        self.maildir = None if maildir is None else os.fspath(maildir)
        self._entries: dict[str, float] = {}
        self._intents: dict[str, str] = {}
        self._dirty = False
        self._dir_fd = -1
        self._lock_fd = -1
        self._fd = -1
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._dir_fd = os.open(self.directory, _DIR_FLAGS)
            self._lock()
            repair = self._load()
            if repair:
                self._rewrite()
            self._open_append()
        except OSError as exc:
            self.close()
            raise UidStoreError(f"UID store {self.path}: {exc.strerror or exc}") from exc
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_maildir(
        cls, maildir: str | os.PathLike[str], host: str, port: int, user: str
    ) -> UidStore:
        """The store of account (``host``, ``port``, ``user``) in ``maildir``:
        ``maildir/pop3proto-uids/<account_key(...)>``."""
        root = os.fspath(maildir)
        return cls(os.path.join(root, STORE_DIR), account_key(host, port, user), maildir=root)

    @property
    def path(self) -> str:
        """The store file."""
        return os.path.join(self.directory, self.key)

    # ------------------------------------------------------------ reading

    def __contains__(self, uid: object) -> bool:
        return uid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def delivered_at(self, uid: str) -> float | None:
        """Unix time ``uid`` was first recorded, or None if it is not in the store."""
        return self._entries.get(uid)

    # ------------------------------------------------------------ writing

    def add(self, uid: str, when: float | None = None) -> None:
        """Record ``uid`` as delivered (at ``when``, default now). Durable
        when it returns: the line is appended and the file fsynced. A UID
        already present keeps its first time. Raises ``UidStoreError``."""
        self._check_open()
        if not uid:
            raise ValueError("empty UID")
        if uid in self._entries:
            return
        stamp = int(time.time() if when is None else when)
        line = f"{stamp} {escape(uid)}\n".encode("ascii")
        if len(line) > MAX_LINE:
            raise UidStoreError("UID too long to record")
        self._append(line)
        self._entries[uid] = float(stamp)

    def intend(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Before delivering: note that each (``uid``, ``name``) is about to be
        delivered as Maildir file ``name``. Durable when it returns (one fsync
        for all of them). UIDs already recorded are skipped. Raises
        ``UidStoreError`` (``ValueError`` for a name no Maildir delivery makes)."""
        self._check_open()
        lines = []
        for uid, name in pairs:
            if not uid:
                raise ValueError("empty UID")
            if not name.isascii() or not _MAILDIR_NAME.fullmatch(name.encode("ascii")):
                raise ValueError(f"not a Maildir file name: {name!r}")
            if uid in self._entries:
                continue
            line = f"? {name} {escape(uid)}\n".encode("ascii")
            if len(line) > MAX_LINE:
                raise UidStoreError("UID too long to record")
            lines.append(line)
        if not lines:
            return
        self._append(b"".join(lines))
        self._dirty = True

    def record(self, uid: str, when: float | None = None) -> None:
        """Record ``uid`` as delivered (at ``when``, default now), in memory:
        durable after :meth:`commit` (or, after a crash, through its intent).
        A UID already present keeps its first time."""
        self._check_open()
        if not uid:
            raise ValueError("empty UID")
        if uid not in self._entries:
            self._entries[uid] = float(int(time.time() if when is None else when))
            self._dirty = True

    def commit(self) -> None:
        """Make every :meth:`record` durable and drop the intent lines: the
        store is rewritten (temporary file, fsync, rename, fsync of the
        directory). Does nothing when nothing changed. Raises ``UidStoreError``."""
        self._check_open()
        if self._dirty:
            self._replace()

    def _replace(self) -> None:
        """Write the store anew from memory (every UID, no intents) and go on
        appending to the new file. Raises ``UidStoreError``."""
        try:
            self._rewrite()
            self._open_append()
        except OSError as exc:
            raise UidStoreError(f"UID store {self.path}: {exc.strerror or exc}") from exc
        self._dirty = False

    def _append(self, data: bytes) -> None:
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as exc:
            # A partial line may be on disk: drop it now so the next append
            # cannot glue onto it (a reload would drop it as torn anyway).
            with contextlib.suppress(UidStoreError):
                self._replace()
            raise UidStoreError(f"UID store {self.path}: {exc.strerror or exc}") from exc

    def prune(self, keep: Iterable[str]) -> int:
        """Forget every UID not in ``keep`` (the messages still on the server),
        rewriting the file atomically. Returns how many were dropped."""
        self._check_open()
        wanted = set(keep)
        dropped = [uid for uid in self._entries if uid not in wanted]
        if not dropped:
            return 0
        for uid in dropped:
            del self._entries[uid]
        self._replace()
        return len(dropped)

    def close(self) -> None:
        """Release the lock and close the file (idempotent)."""
        for name in ("_fd", "_lock_fd", "_dir_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                with contextlib.suppress(OSError):
                    os.close(fd)

    @property
    def closed(self) -> bool:
        """The store was closed."""
        return self._dir_fd < 0

    def __enter__(self) -> UidStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._fd < 0:
            raise UidStoreError("the UID store is closed")

    def _lock(self) -> None:
        fd = os.open(
            self.key + ".lock",
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self._dir_fd,
        )
        self._lock_fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UidStoreLocked(
                    f"UID store {self.path} is in use by another fetch of this account"
                ) from None
            raise

    def _load(self) -> bool:
        """Read the file; True when it must be rewritten (missing, or a torn
        final line)."""
        try:
            fd = os.open(self.key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return True
        with open(fd, "rb") as fh:
            if os.fstat(fh.fileno()).st_size > MAX_FILE_SIZE:
                raise UidStoreError(f"UID store {self.path} is larger than {MAX_FILE_SIZE} octets")
            first = fh.readline(len(HEADER))
            if not first:
                return True  # empty: never written (stores are created by rename)
            if first != HEADER:
                raise UidStoreError(f"UID store {self.path}: not a pop3proto UID store")
            number = 1
            torn = False
            while True:
                line = fh.readline(MAX_LINE + 1)
                if not line:
                    break
                number += 1
                if number > MAX_LINES:
                    raise UidStoreError(f"UID store {self.path}: more than {MAX_LINES} lines")
                if not line.endswith(b"\n"):
                    if len(line) > MAX_LINE:
                        raise UidStoreError(f"UID store {self.path}: line {number} is too long")
                    torn = True  # a torn final append: the UID was never durable
                    break
                self._parse_line(line[:-1], number)
        if self._intents:
            self._resolve_intents()
            return True
        return torn

    def _resolve_intents(self) -> None:
        """Record the UID of every intent whose message reached ``new/`` or
        ``cur/`` (a fetch was killed after delivering it); forget the rest."""
        pending = {uid: name for uid, name in self._intents.items() if uid not in self._entries}
        self._intents.clear()
        if not pending or self.maildir is None:
            return
        found: dict[str, float] = {}
        left: dict[str, str] = {}
        for uid, name in pending.items():
            try:
                found[uid] = os.stat(os.path.join(self.maildir, "new", name)).st_mtime
            except OSError:
                left[uid] = name
        if left:
            cur = os.path.join(self.maildir, "cur")
            try:
                entries = os.listdir(cur)
            except OSError:
                entries = []
            wanted = {name: uid for uid, name in left.items()}
            for entry in entries:
                base = re.split(r"[:!]", entry, maxsplit=1)[0]
                hit = wanted.get(base)
                if hit is not None:
                    with contextlib.suppress(OSError):
                        found[hit] = os.stat(os.path.join(cur, entry)).st_mtime
        for uid, when in found.items():
            self._entries.setdefault(uid, float(int(when)))

    def _parse_line(self, line: bytes, number: int) -> None:
        if line.startswith(b"? "):
            name, sep, text = line[2:].partition(b" ")
            try:
                if not sep or not _MAILDIR_NAME.fullmatch(name):
                    raise ValueError("bad name")
                self._intents[unescape(text.decode("ascii"))] = name.decode("ascii")
            except (ValueError, UnicodeDecodeError):
                raise UidStoreError(f"UID store {self.path}: line {number} is malformed") from None
            return
        stamp, sep, text = line.partition(b" ")
        try:
            if not sep or not stamp.isdigit() or len(stamp) > 12:
                raise ValueError("bad time")
            uid = unescape(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise UidStoreError(f"UID store {self.path}: line {number} is malformed") from None
        self._entries.setdefault(uid, float(int(stamp)))

    def _rewrite(self) -> None:
        """Write the whole store to a temporary file, fsync, rename over the
        store, fsync the directory."""
        tmp = f".{self.key}.{os.getpid()}.tmp"
        lines = [HEADER]
        lines.extend(
            f"{int(when)} {escape(uid)}\n".encode("ascii") for uid, when in self._entries.items()
        )
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self._dir_fd,
        )
        try:
            try:
                _write_all(fd, b"".join(lines))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.key, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._dir_fd)
            raise
        _fsync_dir(self._dir_fd)

    def _open_append(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fd = os.open(
            self.key,
            os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=self._dir_fd,
        )
