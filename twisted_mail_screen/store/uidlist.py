# -*- test-case-name: tests.test_uidlist -*-
"""
The persistent UID map of one Maildir folder, in the syntax of Dovecot's
C{dovecot-uidlist} (version 3)::

    3 V<uidvalidity> N<next uid>
    <uid> :<base name>
    ...

One line per message, keyed by the Maildir base name (the part of the
file name before C{:2,}, so flag changes do not touch it), UIDs strictly
ascending. A scan that finds new or vanished files replaces the file
atomically; APPEND, COPY and MOVE only append their new lines and fsync
(as Dovecot does), so each costs one small write, not a rewrite of the
whole map. Either way the file is durable before any client is told
about a new UID, so a UID once announced is never given to another
message.

Reading accepts what appending leaves: lines whose UIDs are at or above
the header's C{N} (the next UID is then one past the last line), a base
listed twice (the later line wins: a message moved out and back), and a
last line without its newline (a crash during an append that was never
acknowledged; the line is dropped). Such a file is marked C{dirty} so the
caller rewrites it. Anything else that cannot be parsed is never repaired
by guessing: the folder gets a new UIDVALIDITY and its messages fresh
UIDs.
"""

from __future__ import annotations

import os
import threading
import time
from array import array

from twisted_mail_screen.runtime.atomic import write_and_fsync, write_atomically

FILENAME = "dovecot-uidlist"

_validity_lock = threading.Lock()
_last_validity = 0


class UidListCorrupt(ValueError):
    """The file exists but is not a well-formed UID list."""

    def __init__(self, message: str, old_validity: int | None = None) -> None:
        super().__init__(message)
        self.old_validity = old_validity


def new_uidvalidity(previous: int | None = None) -> int:
    """
    A UIDVALIDITY never handed out before by this process and greater than
    C{previous}: the current time in seconds, bumped when that collides.
    """
    global _last_validity
    with _validity_lock:
        value = max(int(time.time()), _last_validity + 1, (previous or 0) + 1)
        value = value if value < 2**32 else 1 + (value % (2**32 - 1))
        _last_validity = value
        return value


class UidList:
    """
    UIDVALIDITY, the next UID and the (uid, base) pairs of the messages
    present, in ascending UID order.
    """

    def __init__(self, uidvalidity: int, next_uid: int = 1,
                 uids: "array[int] | None" = None, bases: list[str] | None = None) -> None:
        self.uidvalidity = uidvalidity
        self.next_uid = next_uid
        self.uids: array[int] = uids if uids is not None else array("L")
        self.bases: list[str] = bases if bases is not None else []
        self.dirty = False  # read from a file that should be rewritten

    def render(self) -> bytes:
        head = f"3 V{self.uidvalidity} N{self.next_uid}\n"
        body = "".join(f"{u} :{b}\n" for u, b in zip(self.uids, self.bases))
        return (head + body).encode("utf-8", "surrogateescape")

    def save(self, directory: str) -> None:
        write_atomically(os.path.join(directory, FILENAME), self.render())


def append_records(directory: str, records: list[tuple[int, str]]) -> None:
    """
    Append C{(uid, base)} lines (UIDs above every UID in the file) and
    fsync. Raises C{FileNotFoundError} when there is no file to append to.
    """
    data = "".join(f"{u} :{b}\n" for u, b in records).encode("utf-8", "surrogateescape")
    fd = os.open(os.path.join(directory, FILENAME), os.O_WRONLY | os.O_APPEND)
    try:
        write_and_fsync(fd, data)
    finally:
        os.close(fd)


def parse(data: bytes) -> UidList:
    """
    Parse a file's content.

    @raise UidListCorrupt: carrying the old UIDVALIDITY when the header
        was readable.
    """
    text = data.decode("utf-8", "surrogateescape")
    torn = False
    if not text.endswith("\n"):
        cut = text.rfind("\n")
        if cut < 0:
            raise UidListCorrupt("truncated (no complete header line)")
        text, torn = text[:cut + 1], True  # an append cut short by a crash
    lines = text.split("\n")
    header = lines[0].split()
    validity: int | None = None
    next_uid: int | None = None
    for field in header[1:]:
        if field[:1] == "V" and field[1:].isdigit():
            validity = int(field[1:])
        elif field[:1] == "N" and field[1:].isdigit():
            next_uid = int(field[1:])
    if not header or header[0] != "3" or validity is None or next_uid is None \
            or not 0 < validity < 2**32 or next_uid < 1:
        raise UidListCorrupt("bad header line", validity)
    uids = array("L")
    bases: list[str] = []
    where: dict[str, int] = {}
    dropped: set[int] = set()
    last = 0
    for line in lines[1:-1]:
        uid_text, sep, base = line.partition(" :")
        if not sep or not uid_text.isdigit() or not base or "/" in base:
            raise UidListCorrupt(f"bad line {line[:60]!r}", validity)
        uid = int(uid_text)
        if uid <= last or uid >= 2**32:
            raise UidListCorrupt(f"UID {uid} out of order", validity)
        last = uid
        if base in where:
            dropped.add(where[base])
        where[base] = len(uids)
        uids.append(uid)
        bases.append(base)
    if dropped:
        uids = array("L", (u for i, u in enumerate(uids) if i not in dropped))
        bases = [b for i, b in enumerate(bases) if i not in dropped]
    out = UidList(validity, max(next_uid, last + 1), uids, bases)
    out.dirty = torn or bool(dropped) or last >= next_uid
    return out


def load(directory: str) -> tuple[UidList, str | None]:
    """
    The folder's UID list, or a fresh one with a new UIDVALIDITY when the
    file is missing or corrupt. The second item says why it is fresh
    (C{None} when the file was read).
    """
    path = os.path.join(directory, FILENAME)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return UidList(new_uidvalidity()), "missing"
    try:
        return parse(data), None
    except UidListCorrupt as e:
        return UidList(new_uidvalidity(e.old_validity)), f"corrupt: {e}"
