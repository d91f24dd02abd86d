# -*- test-case-name: tests.test_quota -*-
"""
An account's usage in Maildir++'s C{maildirsize} file (the file Courier
and Dovecot keep), so every process serving the account's Maildir sees
what the others stored and removed::

    4194304S,100C
    <octets> <messages>
    <octets> <messages>
    ...

The first line is the account's limits (C{S}: octets, C{C}: messages; a
resource without a limit is left out, C{0S} when there is none). Each
further line is a delta, signed; usage is their sum. A writer appends one
line for each change, under an C{flock} on C{maildirsize.lock} beside it
(held across processes, dropped by the kernel when its holder dies). The
file is recalculated (the Maildir counted, the file replaced atomically
with the limits and one line) when it is missing, unreadable, larger than
L{RECALCULATE_OVER} octets, or its limits line differs from the account's
limits now (so a changed limit starts from a true count).

Sizes are what our quota counts everywhere: a message's RFC822.SIZE (CRLF
line ends, the C{W=} of its file name), not its file size.

A reader compares the file's inode, size and modification time with the
version it read last (one C{stat}) and reads it again only when they
differ. Everything here blocks: the server calls it in its worker pool.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Iterator

from twisted_mail_screen.quota.config import Limits
from twisted_mail_screen.quota.state import Usage, count_usage
from twisted_mail_screen.runtime.atomic import write_atomically

FILENAME = "maildirsize"
LOCK_FILE = "maildirsize.lock"
#: Past this size the deltas are summed into one line (Courier's and Dovecot's figure).
RECALCULATE_OVER = 5120

#: Which version of the file was read: (inode, size, mtime in ns).
FileState = tuple[int, int, int]


def limits_line(limits: Limits) -> str:
    parts = []
    if limits.storage_kib:
        parts.append(f"{limits.storage_kib * 1024}S")
    if limits.messages:
        parts.append(f"{limits.messages}C")
    return ",".join(parts) or "0S"


def parse(data: bytes) -> tuple[str, Usage] | None:
    """The limits line and the usage the deltas add up to; C{None} when malformed."""
    end = data.rfind(b"\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\n")  # a last line without its newline is an append under way
    octets = messages = 0
    for line in lines[1:]:
        fields = line.split()
        if len(fields) != 2:
            return None
        try:
            octets += int(fields[0])
            messages += int(fields[1])
        except ValueError:
            return None
    try:
        head = lines[0].decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return head, Usage(max(0, octets), max(0, messages))


def _state(st: os.stat_result) -> FileState:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@contextmanager
def _locked(maildir: str) -> Iterator[None]:
    fd = os.open(os.path.join(maildir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(maildir: str) -> tuple[FileState, bytes] | None:
    try:
        fd = os.open(os.path.join(maildir, FILENAME), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return _state(st), b"".join(chunks)


def _usable(read: tuple[FileState, bytes] | None, head: str) -> tuple[FileState, Usage] | None:
    """The file's state and usage if it needs no recalculation."""
    if read is None or read[0][1] > RECALCULATE_OVER:
        return None
    parsed = parse(read[1])
    if parsed is None or parsed[0] != head:
        return None
    return read[0], parsed[1]


def recalculate(maildir: str, head: str) -> tuple[FileState, Usage]:
    """Count the Maildir and replace the file (under the lock)."""
    usage = count_usage(maildir)
    path = os.path.join(maildir, FILENAME)
    write_atomically(path, f"{head}\n{usage.octets} {usage.messages}\n".encode("ascii"))
    return _state(os.stat(path)), usage


def current(maildir: str, limits: Limits,
            known: FileState | None) -> tuple[FileState | None, Usage | None]:
    """
    The account's usage: C{(known, None)} when the file is still the
    version C{known} (the caller keeps its figure), else the file's state
    and usage, recalculated if need be. An account without a Maildir has
    nothing (and gets no file).
    """
    head = limits_line(limits)
    try:
        st = os.stat(os.path.join(maildir, FILENAME))
    except FileNotFoundError:
        st = None
    if st is not None and _state(st) == known:
        return known, None
    found = _usable(_read(maildir), head)
    if found is not None:
        return found
    if not os.path.isdir(maildir):
        return None, Usage()
    with _locked(maildir):
        found = _usable(_read(maildir), head)  # another process may have just done it
        return found if found is not None else recalculate(maildir, head)


def add(maildir: str, limits: Limits, octets: int, messages: int) -> tuple[FileState | None, Usage]:
    """
    Record a change already made on disk (a message stored: positive;
    removed: negative): append its line, or recalculate when the file is
    missing (the count then includes the change) or due.
    """
    head = limits_line(limits)
    if not os.path.isdir(maildir):
        return None, Usage()
    with _locked(maildir):
        path = os.path.join(maildir, FILENAME)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            return recalculate(maildir, head)
        try:
            # One write of one short line: never seen half-written by a reader.
            os.write(fd, f"{octets} {messages}\n".encode("ascii"))
        finally:
            os.close(fd)
        found = _usable(_read(maildir), head)
        return found if found is not None else recalculate(maildir, head)


def drop(maildir: str) -> None:
    """A change no delta describes (a folder deleted): the next reader recalculates."""
    if not os.path.isdir(maildir):
        return
    with _locked(maildir):
        try:
            os.unlink(os.path.join(maildir, FILENAME))
        except FileNotFoundError:
            pass
