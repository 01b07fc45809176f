"""Maildrops: where a POP3 server finds a user's messages.

A server binding opens a user's maildrop after a successful login and talks to
it through one small interface:

``Maildrop.open(user) -> MaildropSession``
    Takes the exclusive lock on that user's maildrop (RFC 1939 §4) and fixes
    the list of messages for the session: ``session.messages`` holds one
    :class:`MessageInfo` (UID, POP3 size, backend key) per message, oldest
    first. Messages that arrive later appear in the next session only.
``session.open_message(index)``
    The stored bytes of one message as a binary file object, to be read in
    chunks. Line ends are as stored; the engine turns them into CRLF and
    dot-stuffs them on the way out.
``session.commit(keys)``
    The UPDATE state: remove the messages with those keys. Raises
    :class:`MaildropError` if any removal failed (after trying them all), so
    the server answers ``-ERR`` and never ``+OK`` (RFC 1939 §6).
``session.close()``
    Releases the lock. Idempotent; a session is also a context manager.
    Closing without ``commit`` removes nothing (RFC 1939 §6: no UPDATE after
    an abnormal end).

The POP3 session rules (message numbers, deletion marks, RSET, TOP) live in
the engine; a maildrop only lists, reads, locks and removes.

Two implementations: :class:`MemoryMaildrop` (in memory, for tests and the
demo) and :class:`Maildir` (one Maildir per user under a root directory).
Every call may block on the disk: asynchronous bindings should run them in a
worker thread.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import socket
import stat
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import BinaryIO, NamedTuple, Protocol, TypeAlias, runtime_checkable

import attrs

from pop3proto._core import LINE_START, stuff

__all__ = [
    "INDEX_NAME",
    "LOCK_NAME",
    "Maildir",
    "Maildrop",
    "MaildropError",
    "MaildropLocked",
    "MaildropSession",
    "MemoryMaildrop",
    "MessageInfo",
    "check_user",
    "is_valid_uid",
    "message_size",
]

#: RFC 1939 §7: a unique-id is 1 to 70 characters, each in 0x21-0x7E.
_UID_RE = re.compile(r"[\x21-\x7e]{1,70}\Z")

#: Name of the size cache kept in each Maildir (beside cur/, new/, tmp/).
INDEX_NAME = "pop3proto-index"
#: Name of the lock file kept in each Maildir.
LOCK_NAME = "pop3proto-lock"

#: Bytes read at a time when computing a message's size.
_CHUNK = 1 << 16
#: Longest user name accepted by :class:`Maildir`, in UTF-8 octets (NAME_MAX).
_MAX_USER = 255
_INDEX_VERSION = 1
#: Bytes of index allowed per listed message (a larger index is ignored).
_INDEX_BYTES_PER_MESSAGE = 2048
_SUBDIRS = ("new", "cur")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)

Buffer: TypeAlias = bytes | bytearray | memoryview


class MaildropError(Exception):
    """A maildrop could not be opened, read or updated.

    ``code`` is the RFC 2449 / RFC 3206 response code a server should put in
    its ``-ERR`` line (for example ``"SYS/TEMP"``), or ``None``. The message
    text is meant for logs: it may name files, so a server should send its own
    short text to the client.
    """

    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class MaildropLocked(MaildropError):
    """Another session holds the maildrop's lock (answer ``-ERR [IN-USE]``)."""

    code = "IN-USE"


def is_valid_uid(uid: str) -> bool:
    """True when ``uid`` is a valid POP3 unique-id: 1 to 70 characters, each
    in 0x21-0x7E (RFC 1939 §7)."""
    return type(uid) is str and _UID_RE.match(uid) is not None


@attrs.frozen
class MessageInfo:
    """One message of an open maildrop session.

    ``uid`` is the RFC 1939 §7 unique-id (1 to 70 characters in 0x21-0x7E),
    stable across sessions. ``size`` is the POP3 size: the length of the
    message with every line end (CRLF, bare LF or bare CR) counted as CRLF,
    without stuffing dots and without a CRLF appended at the end. ``key`` is an
    opaque handle the backend uses in :meth:`MaildropSession.commit`.
    Construction raises ``ValueError`` for an invalid UID or size.
    """

    uid: str
    size: int
    key: str

    def __attrs_post_init__(self) -> None:
        if not is_valid_uid(self.uid):
            raise ValueError(f"invalid POP3 unique-id: {self.uid!r}")
        if type(self.size) is not int or self.size < 0:
            raise ValueError(f"invalid message size: {self.size!r}")
        if type(self.key) is not str:
            raise ValueError("a message key must be a str")


def _trusted_info(uid: str, size: int, key: str) -> MessageInfo:
    """A MessageInfo from values the caller already checked (h11 style: the
    checks in the constructor are for values users build)."""
    info: MessageInfo = object.__new__(MessageInfo)
    object.__setattr__(info, "uid", uid)
    object.__setattr__(info, "size", size)
    object.__setattr__(info, "key", key)
    return info


def message_size(source: Buffer | BinaryIO, *, chunk_size: int = _CHUNK) -> int:
    """The POP3 size of a message (see :attr:`MessageInfo.size`).

    ``source`` is the stored bytes, or a binary file read to its end in chunks
    of ``chunk_size`` (memory stays bounded whatever the message size). Line
    ends are normalised by the engine's own routine, so the size is exactly
    what the engine sends minus stuffing and the final CRLF it may add.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(stuff(bytes(source), LINE_START, dots=False)[0])
    state = LINE_START
    total = 0
    while True:
        chunk = source.read(chunk_size)
        if not chunk:
            return total
        out, state = stuff(chunk, state, dots=False)
        total += len(out)


class MaildropSession(abc.ABC):
    """An open, locked maildrop whose message list is fixed for the session.

    ``messages`` never changes after the session opened. ``open_message``
    takes a 0-based index into it. ``commit`` removes messages by key;
    ``close`` releases the lock and is idempotent. Using a closed session
    raises :class:`MaildropError`. A session is a context manager that closes
    it on exit (and never commits).
    """

    @property
    @abc.abstractmethod
    def messages(self) -> Sequence[MessageInfo]:
        """The messages, oldest first, as listed when the session opened."""

    @abc.abstractmethod
    def open_message(self, index: int) -> BinaryIO:
        """The stored bytes of ``messages[index]`` as a binary file object,
        positioned at the start; the caller closes it. ``IndexError`` for an
        index outside ``range(len(messages))`` (negative ones included);
        :class:`MaildropError` if the message can no longer be read."""

    @abc.abstractmethod
    def commit(self, keys: Iterable[str]) -> None:
        """Remove the messages with these keys (RFC 1939 §6, UPDATE).

        A key that is not one of this session's messages raises
        :class:`MaildropError` before anything is removed. A message that is
        already gone counts as removed. If any removal fails, the others are
        still tried, then :class:`MaildropError` is raised."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the lock. Safe to call more than once."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""

    def __enter__(self) -> MaildropSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _index(self, index: int) -> MessageInfo:
        if self.closed:
            raise MaildropError("maildrop session is closed")
        if type(index) is not int or not 0 <= index < len(self.messages):
            raise IndexError(f"no message at index {index!r}")
        return self.messages[index]


@runtime_checkable
class Maildrop(Protocol):
    """A store of maildrops, one per user, that a POP3 server can serve."""

    def open(self, user: str) -> MaildropSession:
        """Lock ``user``'s maildrop and list its messages.

        Raises :class:`MaildropLocked` if another session holds the lock and
        :class:`MaildropError` for any other failure (unknown or unsafe user
        name, unreadable maildrop). On failure no lock is left held."""
        ...


# --------------------------------------------------------------------------
# In memory


class _MemoryBox:
    __slots__ = ("locked", "messages")

    def __init__(self) -> None:
        self.messages: dict[str, tuple[MessageInfo, bytes]] = {}
        self.locked = False


class MemoryMaildrop:
    """Maildrops held in memory: for tests and the demo server.

    ``mailboxes`` maps each user to the messages delivered at creation.
    Thread-safe. UIDs are a random tag for this object plus a counter, so they
    are stable for the object's lifetime and never reused; two objects never
    share UIDs. A user who was never given a mailbox is unknown
    (:class:`MaildropError` on ``open``); ``add`` creates the mailbox.
    """

    def __init__(self, mailboxes: Mapping[str, Sequence[bytes]] | None = None) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[str, _MemoryBox] = {}
        self._tag = secrets.token_hex(4)
        self._serial = 0
        for user, datas in (mailboxes or {}).items():
            self._boxes.setdefault(user, _MemoryBox())
            for data in datas:
                self.add(user, data)

    def add(self, user: str, data: Buffer, *, uid: str | None = None) -> str:
        """Deliver a message to ``user`` (creating the mailbox) and return its
        UID. ``uid`` chooses the UID; it must be valid (RFC 1939 §7) and not
        already used in that mailbox, else ``ValueError``. The message shows up
        in sessions opened after this call."""
        data = bytes(data)
        size = message_size(data)
        with self._lock:
            box = self._boxes.setdefault(user, _MemoryBox())
            if uid is None:
                self._serial += 1
                uid = f"{self._tag}.{self._serial}"
            elif not is_valid_uid(uid):
                raise ValueError(f"invalid POP3 unique-id: {uid!r}")
            elif uid in box.messages:
                raise ValueError(f"unique-id already used: {uid!r}")
            box.messages[uid] = (MessageInfo(uid, size, uid), data)
        return uid

    def contents(self, user: str) -> list[bytes]:
        """The messages currently stored for ``user``, oldest first (empty for
        an unknown user)."""
        with self._lock:
            box = self._boxes.get(user)
            return [data for _, data in box.messages.values()] if box else []

    def open(self, user: str) -> MaildropSession:
        """See :meth:`Maildrop.open`."""
        with self._lock:
            box = self._boxes.get(user)
            if box is None:
                raise MaildropError(f"no maildrop for user {user!r}", code="SYS/PERM")
            if box.locked:
                raise MaildropLocked(f"maildrop of {user!r} is in use")
            box.locked = True
            snapshot = list(box.messages.values())
        return _MemorySession(self, box, snapshot)

    def _release(self, box: _MemoryBox) -> None:
        with self._lock:
            box.locked = False

    def _remove(self, box: _MemoryBox, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                box.messages.pop(key, None)


class _MemorySession(MaildropSession):
    def __init__(
        self,
        owner: MemoryMaildrop,
        box: _MemoryBox,
        snapshot: list[tuple[MessageInfo, bytes]],
    ) -> None:
        self._owner = owner
        self._box = box
        self._messages = tuple(info for info, _ in snapshot)
        self._data = {info.key: data for info, data in snapshot}
        self._closed = False
        self._finalizer = weakref.finalize(self, owner._release, box)

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return self._messages

    @property
    def closed(self) -> bool:
        return self._closed

    def open_message(self, index: int) -> BinaryIO:
        info = self._index(index)
        return io.BytesIO(self._data[info.key])

    def read_small(self, index: int, limit: int) -> bytes | None:
        """The whole message when it has at most ``limit`` octets, else None
        (as :meth:`Maildir`'s sessions: a server sends it in one piece)."""
        data = self._data[self._index(index).key]
        return data if len(data) <= limit else None

    def commit(self, keys: Iterable[str]) -> None:
        if self._closed:
            raise MaildropError("maildrop session is closed")
        wanted = list(keys)
        for key in wanted:
            if key not in self._data:
                raise MaildropError(f"no message with key {key!r} in this session")
        self._owner._remove(self._box, wanted)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()


# --------------------------------------------------------------------------
# Maildir


def check_user(user: str) -> None:
    """Raise :class:`MaildropError` unless ``user`` is safe to use as one
    directory name under a maildrop root.

    Refused (HARDENING 42): the empty name, names over 255 UTF-8 octets or
    that are not valid UTF-8, names starting with ``.`` (so ``.`` and ``..``),
    and names holding ``/``, ``\\``, ``%``, NUL or any control character
    (C0, DEL, C1). What passes can never name anything outside the root.
    """
    if type(user) is not str or not user:
        raise MaildropError("empty user name", code="SYS/PERM")
    try:
        encoded = user.encode("utf-8")
    except UnicodeEncodeError:
        raise MaildropError("user name is not valid UTF-8", code="SYS/PERM") from None
    if len(encoded) > _MAX_USER:
        raise MaildropError("user name too long", code="SYS/PERM")
    if user[0] == ".":
        raise MaildropError("user name starts with '.'", code="SYS/PERM")
    for ch in user:
        o = ord(ch)
        if ch in "/\\%" or o < 0x20 or 0x7F <= o <= 0x9F:
            raise MaildropError(f"unsafe character {ch!r} in user name", code="SYS/PERM")


def _uid_for(base: str) -> str:
    """RFC 1939 §7 unique-id for a Maildir message with this unique base name.

    The base (the file name before ``:``) never changes when a message moves
    from new/ to cur/ or gets flags, and Maildir delivery never reuses it. It
    is used as it is when it is a valid unique-id. Otherwise the UID is
    ``H:`` and 40 hex digits of its SHA-256: it holds a ``:``, which a base
    name cannot, so it never equals a base used directly.
    """
    if _UID_RE.match(base):
        return base
    digest = hashlib.sha256(os.fsencode(base)).hexdigest()
    return "H:" + digest[:40]


class _Entry(NamedTuple):
    sub: str
    name: str
    base: str
    disk_size: int
    mtime_ns: int


def _scan(fd: int, sub: str, into: dict[str, _Entry]) -> None:
    """Add the regular, non-hidden files of one Maildir subdirectory to
    ``into``, by base name (a later entry replaces an earlier one)."""
    with os.scandir(fd) as it:
        for de in it:
            name = de.name
            if name[0] == ".":
                continue
            try:
                if not de.is_file(follow_symlinks=False):
                    continue
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while listing
            base = name.partition(":")[0]
            into[base] = _Entry(sub, name, base, st.st_size, st.st_mtime_ns)


#: How old a directory's modification time must be before a listing made
#: under it is reused (file system timestamps are coarser than nanoseconds).
_SETTLED_NS = 2_000_000_000


class _Listing(NamedTuple):
    """A remembered listing: ``stamp`` is (inode, mtime) of ``new/`` and
    ``cur/`` when it was made; ``entries`` is never changed once built."""

    stamp: tuple[tuple[int, int], ...]
    messages: tuple[MessageInfo, ...]
    entries: dict[str, _Entry]


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


# Maildirs locked by this process, by (st_dev, st_ino) of the Maildir: the
# flock below guards against other processes, this set against another
# session of the same process (and gives a clear answer without a syscall).
_registry_lock = threading.Lock()
_locked_here: set[tuple[int, int]] = set()


def _unregister(ident: tuple[int, int]) -> None:
    with _registry_lock:
        _locked_here.discard(ident)


def _release(fds: list[int], ident: tuple[int, int]) -> None:
    # Closing the lock file's descriptor releases the flock.
    _close_fds(fds)
    _unregister(ident)


class Maildir:
    """Maildrops stored as Maildirs: ``root/<user>/{cur,new,tmp}``.

    Promises:

    * User names are checked with :func:`check_user` before any path is built,
      and every file is reached through directory descriptors: a name can
      never lead outside ``root``. ``root/<user>`` itself may be a symlink
      placed by the administrator; ``cur``, ``new``, the lock, the index and
      message files are never followed when they are symlinks, and anything
      but a regular file in ``new/`` or ``cur/`` is ignored, as are names
      starting with ``.``.
    * Lock: ``flock`` on ``root/<user>/pop3proto-lock``, exclusive and
      non-blocking, held for the session. The kernel drops it when the process
      dies, so a crashed server leaves no stale lock. Within one process a
      registry refuses a second session on the same Maildir. Other mail
      software does not see this lock: a delivery agent may add to ``new/``
      (shown in the next session) and an IMAP server may rename or remove
      files (handled: a renamed message is found again by its base name, a
      removed one reads as an error and counts as deleted at commit).
    * Listing covers ``new/`` and ``cur/``; nothing is moved between them (the
      POP3 server only reads and removes). Messages are listed oldest first:
      in the order the index first saw them; messages new to the index by
      modification time, then name (numbers in names compared by value).
    * UIDs come from the Maildir unique base name (the file name before
      ``:``): the name itself when it is a valid unique-id, otherwise ``H:``
      and 40 hex digits of its SHA-256. Stable across sessions, moves from
      new/ to cur/ and flag changes; never reused, as Maildir never reuses a
      unique name.
    * Sizes are computed from the file contents (``,S=`` and ``,W=`` in file
      names are ignored: Dovecot's W counts LF only) and cached in
      ``root/<user>/pop3proto-index``, keyed by base name, file size and
      modification time, rewritten atomically (temporary file, fsync, rename)
      when it changed. Opening a maildrop reads only the directories and the
      index unless messages are new or changed, and only two directory
      modification times when it has not changed since this object last
      listed it. A damaged index is ignored and rebuilt.
    * ``commit`` unlinks each file, then fsyncs the directories it changed.
      ``unlink`` is atomic: a crash leaves each message intact or gone.
    """

    #: How many Maildirs' listings one ``Maildir`` object remembers (see
    #: ``_listing``), and how many messages in all they may hold (a few
    #: hundred octets each); the oldest listing is forgotten first.
    LISTINGS_KEPT = 4096
    LISTED_MESSAGES_KEPT = 200_000

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = os.fspath(root)
        self._listings: dict[tuple[int, int], _Listing] = {}
        self._listed = 0  # messages in self._listings
        self._listings_lock = threading.Lock()

    @property
    def root(self) -> str:
        """The directory holding one Maildir per user."""
        return self._root

    def open(self, user: str) -> MaildropSession:
        """See :meth:`Maildrop.open`. A user without a Maildir (no
        ``root/<user>`` directory with ``new/`` and ``cur/``) is an error."""
        check_user(user)
        fds: list[int] = []
        try:
            try:
                root_fd = os.open(self._root, _DIR_FLAGS)
            except OSError as exc:
                raise MaildropError(f"maildrop root unusable: {exc.strerror}") from None
            try:
                dir_fd = os.open(user, _DIR_FLAGS, dir_fd=root_fd)
            except FileNotFoundError:
                raise MaildropError(f"no maildrop for user {user!r}", code="SYS/PERM") from None
            except OSError as exc:
                raise MaildropError(f"cannot open maildrop of {user!r}: {exc.strerror}") from None
            finally:
                os.close(root_fd)
            fds.append(dir_fd)
            st = os.fstat(dir_fd)
            ident = (st.st_dev, st.st_ino)
        except BaseException:
            _close_fds(fds)
            raise
        with _registry_lock:
            if ident in _locked_here:
                _close_fds(fds)
                raise MaildropLocked(f"maildrop of {user!r} is in use")
            _locked_here.add(ident)
        try:
            lock_fd = self._lock(dir_fd, user)
            fds.append(lock_fd)
            sub_fds: dict[str, int] = {}
            for sub in _SUBDIRS:
                try:
                    sub_fds[sub] = os.open(sub, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
                except OSError as exc:
                    raise MaildropError(
                        f"maildrop of {user!r} has no usable {sub}/: {exc.strerror}",
                        code="SYS/PERM",
                    ) from None
                fds.append(sub_fds[sub])
            try:
                messages, entries = self._listing(ident, dir_fd, sub_fds)
            except OSError as exc:
                raise MaildropError(
                    f"cannot list maildrop of {user!r}: {exc.strerror}", code="SYS/TEMP"
                ) from None
        except BaseException:
            _release(fds, ident)
            raise
        return _MaildirSession(user, fds, ident, sub_fds, messages, entries)

    def _listing(
        self, ident: tuple[int, int], dir_fd: int, sub_fds: dict[str, int]
    ) -> tuple[tuple[MessageInfo, ...], dict[str, _Entry]]:
        """The maildrop's listing, reused from this object's last look at
        the same Maildir while neither ``new/`` nor ``cur/`` has changed
        since (two ``fstat`` calls instead of reading both directories, a
        ``stat`` per message and the index): every delivery, removal or
        rename changes a directory's modification time. A time is only
        trusted once it is :data:`_SETTLED_NS` old, as a change within the
        file system's timestamp granularity would not show. A message file
        rewritten in place (which Maildir forbids) is therefore seen at the
        next change of its directory."""
        now = time.time_ns()
        stamps = []
        for sub in _SUBDIRS:
            st = os.fstat(sub_fds[sub])
            stamps.append((st.st_ino, st.st_mtime_ns))
        stamp = tuple(stamps)
        kept = self._listings.get(ident)
        if kept is not None and kept.stamp == stamp:
            return kept.messages, kept.entries
        messages, entries = _list(dir_fd, sub_fds)
        settled = all(now - mtime >= _SETTLED_NS for _, mtime in stamp)
        with self._listings_lock:
            old = self._listings.pop(ident, None)
            if old is not None:
                self._listed -= len(old.messages)
            if settled and len(messages) <= self.LISTED_MESSAGES_KEPT:
                self._listings[ident] = _Listing(stamp, messages, entries)
                self._listed += len(messages)
                while (
                    len(self._listings) > self.LISTINGS_KEPT
                    or self._listed > self.LISTED_MESSAGES_KEPT
                ):
                    oldest = next(iter(self._listings))
                    self._listed -= len(self._listings.pop(oldest).messages)
        return messages, entries

    @staticmethod
    def _lock(dir_fd: int, user: str) -> int:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | flags, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise MaildropError(f"cannot create lock file: {exc.strerror}") from None
            # A read-only Maildir can still be locked if the file exists.
            try:
                fd = os.open(LOCK_NAME, os.O_RDONLY | flags, dir_fd=dir_fd)
            except OSError as exc2:
                raise MaildropError(f"cannot open lock file: {exc2.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise MaildropError("lock file is not a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MaildropLocked(f"maildrop of {user!r} is in use") from None
        except OSError as exc:
            os.close(fd)
            raise MaildropError(f"cannot lock maildrop: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def add(self, user: str, data: Buffer) -> str:
        """Deliver a message into ``root/<user>/new/`` the Maildir way and
        return its UID.

        The Maildir (with ``cur``, ``new``, ``tmp``, mode 0700) is created if
        missing. The message is written to ``tmp/``, fsynced, renamed into
        ``new/``, and ``new/`` is fsynced, so once this returns the message
        survives a crash. It needs no lock: a session already open does not
        see it. Raises :class:`MaildropError` on failure (and leaves no file
        in ``tmp/``).
        """
        check_user(user)
        data = bytes(data)
        fds: list[int] = []
        try:
            root_fd = os.open(self._root, _DIR_FLAGS)
            fds.append(root_fd)
            with contextlib.suppress(FileExistsError):
                os.mkdir(user, 0o700, dir_fd=root_fd)
            dir_fd = os.open(user, _DIR_FLAGS, dir_fd=root_fd)
            fds.append(dir_fd)
            sub: dict[str, int] = {}
            for name in ("tmp", "new", "cur"):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=dir_fd)
                sub[name] = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
                fds.append(sub[name])
            base = _unique_name()
            fd = os.open(
                base,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=sub["tmp"],
            )
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(base, base, src_dir_fd=sub["tmp"], dst_dir_fd=sub["new"])
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(base, dir_fd=sub["tmp"])
                raise
            os.fsync(sub["new"])
            return _uid_for(base)
        except OSError as exc:
            raise MaildropError(f"cannot deliver to {user!r}: {exc.strerror}") from None
        finally:
            _close_fds(fds)


_name_lock = threading.Lock()
_name_counter = 0


def _unique_name() -> str:
    """A Maildir unique name: time, microseconds, pid, counter, randomness
    and host (with ``/`` and ``:`` escaped as the Maildir convention says)."""
    global _name_counter
    with _name_lock:
        _name_counter += 1
        n = _name_counter
    now = time.time_ns()
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"
    sec, usec = divmod(now // 1000, 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{n}R{secrets.token_hex(4)}.{host}"


def _load_index(dir_fd: int, limit: int) -> tuple[dict[str, list[int]], int]:
    """The cached entries (base -> [seq, disk size, mtime_ns, POP3 size]) and
    the next sequence number. Anything unreadable yields an empty index."""
    try:
        fd = os.open(INDEX_NAME, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return {}, 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return {}, 0
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(limit + 1)
    except OSError:
        return {}, 0
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return {}, 0
    if not isinstance(doc, dict) or doc.get("version") != _INDEX_VERSION:
        return {}, 0
    entries = doc.get("messages")
    next_seq = doc.get("next")
    if not isinstance(entries, dict) or type(next_seq) is not int or next_seq < 0:
        return {}, 0
    # Entries are checked where they are used (see _list).
    return entries, next_seq


def _save_index(dir_fd: int, entries: dict[str, list[int]], next_seq: int) -> None:
    """Write the index atomically: temporary file, fsync, rename, fsync the
    directory. A failure leaves the previous index; it is only a cache."""
    tmp = INDEX_NAME + ".tmp"
    body = json.dumps(
        {"version": _INDEX_VERSION, "next": next_seq, "messages": entries},
        separators=(",", ":"),
    ).encode("ascii")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, INDEX_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)


def _file_size(fd_dir: int, name: str) -> int | None:
    """POP3 size of one stored message; ``None`` if it vanished."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=fd_dir)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return message_size(f)


_DIGIT_RUNS = re.compile(r"([0-9]+)")


def _natural(base: str) -> tuple[str | int, ...]:
    """Sort key that orders the numbers inside Maildir unique names by value
    (``1700.M999`` before ``1700.M1000``). Text and numbers alternate, so two
    keys only ever compare like with like."""
    parts: list[str | int] = list(_DIGIT_RUNS.split(base))
    for i in range(1, len(parts), 2):
        parts[i] = int(parts[i])
    return tuple(parts)


def _list(
    dir_fd: int, sub_fds: dict[str, int]
) -> tuple[tuple[MessageInfo, ...], dict[str, _Entry]]:
    found: dict[str, _Entry] = {}
    # new/ before cur/, and cur/ wins: a message moved from new/ to cur/
    # between the two scans is then seen once, not missed.
    for sub in _SUBDIRS:
        _scan(sub_fds[sub], sub, found)
    limit = 65536 + _INDEX_BYTES_PER_MESSAGE * len(found)
    cached, next_seq = _load_index(dir_fd, limit)
    changed = len(cached) != len(found)
    index: dict[str, list[int]] = {}
    fresh: list[_Entry] = []
    for base, entry in found.items():
        hit = cached.get(base)
        # A hit is [seq, file size, mtime_ns, POP3 size]; the index is only
        # a cache, so anything odd in it counts as a miss.
        if (
            type(hit) is list
            and len(hit) == 4
            and hit[1] == entry.disk_size
            and hit[2] == entry.mtime_ns
            and type(hit[0]) is int
            and 0 <= hit[0] < next_seq
            and type(hit[3]) is int
            and hit[3] >= 0
        ):
            index[base] = hit
        else:
            fresh.append(entry)
    fresh.sort(key=lambda e: (e.mtime_ns, _natural(e.base)))
    for entry in fresh:
        size = _file_size(sub_fds[entry.sub], entry.name)
        if size is None:
            continue
        old = cached.get(entry.base)
        if type(old) is list and old and type(old[0]) is int and 0 <= old[0] < next_seq:
            seq = old[0]  # changed file, same message: keep its place
        else:
            seq = next_seq
            next_seq += 1
        index[entry.base] = [seq, entry.disk_size, entry.mtime_ns, size]
        changed = True
    if changed:
        _save_index(dir_fd, index, next_seq)
    order = sorted([(v[0], b) for b, v in index.items()])
    messages = []
    entries: dict[str, _Entry] = {}
    for _, base in order:
        entry = found[base]
        key = f"{entry.sub}/{entry.name}"
        # The UID and size were built or checked here: skip re-validation.
        messages.append(_trusted_info(_uid_for(base), index[base][3], key))
        entries[key] = entry
    return tuple(messages), entries


class _MaildirSession(MaildropSession):
    def __init__(
        self,
        user: str,
        fds: list[int],
        ident: tuple[int, int],
        sub_fds: dict[str, int],
        messages: tuple[MessageInfo, ...],
        entries: dict[str, _Entry],
    ) -> None:
        self._user = user
        self._sub_fds = sub_fds
        self._messages = messages
        self._entries = entries
        self._closed = False
        self._finalizer = weakref.finalize(self, _release, fds, ident)

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return self._messages

    @property
    def closed(self) -> bool:
        return self._closed

    def _locate(self) -> dict[str, _Entry]:
        """Current files by base name (a message renamed by another program,
        e.g. a flag change, keeps its base name)."""
        where: dict[str, _Entry] = {}
        for sub in _SUBDIRS:
            _scan(self._sub_fds[sub], sub, where)
        return where

    def open_message(self, index: int) -> BinaryIO:
        info = self._index(index)
        entry = self._entries[info.key]
        try:
            try:
                fd = os.open(entry.name, _FILE_FLAGS, dir_fd=self._sub_fds[entry.sub])
            except FileNotFoundError:
                moved = self._locate().get(entry.base)
                if moved is None:
                    raise MaildropError(
                        f"message {info.uid} of {self._user!r} no longer exists",
                        code="SYS/TEMP",
                    ) from None
                fd = os.open(moved.name, _FILE_FLAGS, dir_fd=self._sub_fds[moved.sub])
        except OSError as exc:
            raise MaildropError(
                f"cannot read message {info.uid} of {self._user!r}: {exc.strerror}",
                code="SYS/TEMP",
            ) from None
        return os.fdopen(fd, "rb")

    def read_small(self, index: int, limit: int) -> bytes | None:
        """The whole stored message, when it had at most ``limit`` octets when
        listed and still does; None otherwise, or on any error (the caller
        then uses :meth:`open_message`, which finds a renamed file and says
        what went wrong). Three system calls instead of a file object: most
        messages a server sends are this small."""
        info = self._index(index)
        entry = self._entries[info.key]
        if entry.disk_size > limit:
            return None
        try:
            fd = os.open(entry.name, _FILE_FLAGS, dir_fd=self._sub_fds[entry.sub])
        except OSError:
            return None
        try:
            # One read of the listed size and one octet more: a regular file
            # gives a short read only at its end, so getting exactly the
            # listed size is the whole file. (Asking for ``limit`` octets
            # instead would allocate and shrink a large buffer per message.)
            part = os.read(fd, entry.disk_size + 1)
            if len(part) == entry.disk_size:
                return part
            # Changed since it was listed: read on to its end, up to ``limit``.
            parts = [part]
            got = len(part)
            while part and got <= limit:
                part = os.read(fd, limit + 1 - got)
                parts.append(part)
                got += len(part)
        except OSError:
            return None
        finally:
            os.close(fd)
        if got > limit:
            return None
        return b"".join(parts)

    def commit(self, keys: Iterable[str]) -> None:
        if self._closed:
            raise MaildropError("maildrop session is closed")
        targets: dict[str, _Entry] = {}
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                raise MaildropError(f"no message with key {key!r} in this session")
            targets[key] = entry
        failed: list[str] = []
        touched: set[str] = set()
        where: dict[str, _Entry] | None = None
        for entry in targets.values():
            try:
                try:
                    os.unlink(entry.name, dir_fd=self._sub_fds[entry.sub])
                    touched.add(entry.sub)
                except FileNotFoundError:
                    if where is None:
                        where = self._locate()
                    moved = where.get(entry.base)
                    if moved is not None:
                        try:
                            os.unlink(moved.name, dir_fd=self._sub_fds[moved.sub])
                            touched.add(moved.sub)
                        except FileNotFoundError:
                            pass
                    # Otherwise already gone: counts as removed.
            except OSError as exc:
                failed.append(f"{entry.sub}/{entry.name}: {exc.strerror}")
        for sub in sorted(touched):
            try:
                os.fsync(self._sub_fds[sub])
            except OSError as exc:
                failed.append(f"fsync {sub}/: {exc.strerror}")
        if failed:
            raise MaildropError(
                f"{len(failed)} removal(s) failed in maildrop of {self._user!r}: "
                + "; ".join(failed[:5]),
                code="SYS/TEMP",
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()
