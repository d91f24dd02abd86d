# -*- test-case-name: tests.test_shared_maildir -*-
"""
The cross-process lock of one Maildir folder's UID list and keyword
file, for several server processes sharing one Maildir volume.

The lock is C{flock} on C{dovecot-uidlist.lock} in the folder, not
Dovecot's O_EXCL dot-lock: the kernel drops an C{flock} when its holder
dies (kill -9 included), so there is no stale lock to detect by age and
take over, and no window where two processes both decide a lock is stale.
Linux carries C{flock} over NFSv4 (as a byte-range lock), the shared
volume this is for. The lock file itself is never removed: removing it
would let a waiter lock an unlinked inode while a newcomer locks a new one.

The same lock keeps the message files' renames and unlinks apart: IMAP's
STORE, EXPUNGE, COPY and MOVE, the web port's read marks and deletions and
POP3's deletions at QUIT all take it (L{locked_unless_gone} for the last two).

Waiting for the lock blocks, so everything here runs in the worker pool.

A process keeps its folder index in memory. L{signature} says which
version of the UID list and keyword file it last read or wrote; a job that
finds another version under the lock raises L{Stale}, and the caller
rescans (reading what the other process wrote) and tries again.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, TypeVar

LOCK_FILE = "dovecot-uidlist.lock"
_WATCHED = ("dovecot-uidlist", "dovecot-keywords")

T = TypeVar("T")
Signature = tuple[tuple[int, int, int] | None, ...]


class Stale(Exception):
    """Another process changed the folder's UID list or keywords since this index read them."""


@contextmanager
def folder_lock(path: str) -> Iterator[None]:
    """
    Hold the folder's lock (blocking: worker thread only). Raises
    C{FileNotFoundError} when the folder is gone.
    """
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


@contextmanager
def folder_locks(*paths: str) -> Iterator[None]:
    """
    Several folders' locks (a MOVE's target and source), taken in the
    order of their directories' inode numbers, which every process sharing
    the volume sees alike (paths may differ between nodes' mount points),
    so two processes moving mail in opposite directions never each hold
    one and wait for the other's.
    """
    with ExitStack() as stack:
        for path in sorted(set(paths), key=lambda p: (os.stat(p).st_ino, p)):
            stack.enter_context(folder_lock(path))
        yield


def signature(path: str) -> Signature:
    """Which version of the UID list and keyword file are on disk (inode, size, mtime)."""
    out: list[tuple[int, int, int] | None] = []
    for name in _WATCHED:
        try:
            st = os.stat(os.path.join(path, name))
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def run_locked(path: str, expected: Signature | None, job: Callable[..., T],
               *args: Any, also: str | None = None) -> tuple[T, Signature]:
    """
    Run C{job(*args)} under the folder's lock (and folder C{also}'s) if
    the folder's files are still at version C{expected}; returns its
    result and the version it left. Raises L{Stale} (having done nothing)
    when they are not.
    """
    with folder_locks(path, *((also,) if also is not None else ())):
        if signature(path) != expected:
            raise Stale(path)
        result = job(*args)
        return result, signature(path)


#: The lock file of a mailbox's POP3 session (in the Maildir's top directory).
POP3_LOCK_FILE = "pop3.lock"


def try_lock(path: str, name: str = POP3_LOCK_FILE) -> int | None:
    """
    Take the lock file C{name} in directory C{path} without waiting (an
    C{flock}, so every process sharing the Maildir sees it and a crashed
    holder's lock goes with it). Returns the descriptor to keep until
    L{unlock}, or C{None} when another session holds it.
    """
    fd = os.open(os.path.join(path, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    """Give up a lock L{try_lock} took."""
    os.close(fd)


def locked(path: str, job: Callable[..., T], *args: Any) -> T:
    """C{job(*args)} under the folder's lock (blocking: worker thread), for other per-folder state files."""
    with folder_lock(path):
        return job(*args)


def locked_unless_gone(path: str, gone: T, job: Callable[..., T], *args: Any) -> T:
    """
    C{job(*args)} under the folder's lock (blocking: worker thread), or
    C{gone} without running it when the folder is not there (no lock file
    can be made in it). For writers outside the IMAP index (the web port's
    read marks and deletions, POP3's UPDATE) that rename or unlink message
    files: under the lock their change happens wholly before or wholly
    after another node's STORE, EXPUNGE or MOVE. Unlike catching
    C{FileNotFoundError} around L{locked}, one raised by the job itself
    still propagates.
    """
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        return gone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return job(*args)
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
