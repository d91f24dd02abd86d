# -*- test-case-name: tests.test_imap_condstore -*-
"""
The persistent mod-sequences (RFC 7162) of one Maildir folder, in a file
of their own beside C{dovecot-uidlist} (which older code, and Dovecot,
read unchanged)::

    1 V<uidvalidity> H<highest modseq> F<floor>
    <uid> <modseq> =<maildir info letters>
    -<uid> <modseq>
    ...

A C{<uid>} line gives a message's mod-sequence and the flag letters it had
then (so a flag change made while no server watched, by another program
or before a restart, is seen as a difference and given a new
mod-sequence). A C{-<uid>} line records an expunge: QRESYNC clients are
told which UIDs vanished since the mod-sequence they know. Only the
newest expunges are kept; C{F} is the highest mod-sequence of those
forgotten, below which every absent UID is reported as vanished.

Changes are appended and fsync'd (one small write per command, like the
UID list); later lines override earlier ones. A load that finds many
appended lines rewrites the file atomically. A last line without its
newline (a crash during an append) is dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from twisted_mail_screen.runtime.atomic import write_and_fsync, write_atomically

FILENAME = "mailscreen-modseq"
#: Expunges remembered for VANISHED (EARLIER); older ones raise the floor.
MAX_TOMBSTONES = 50_000
MAX_MODSEQ = 2**63 - 1


class ModSeqListCorrupt(ValueError):
    """The file exists but cannot be read."""


@dataclass
class ModSeqList:
    uidvalidity: int
    highest: int = 0
    floor: int = 0
    entries: dict[int, tuple[int, str]] = field(default_factory=dict)  # uid -> (modseq, info)
    tombstones: list[tuple[int, int]] = field(default_factory=list)  # (modseq, uid), ascending
    lines: int = 0  # lines read (a measure of what appends left behind)

    def render(self) -> bytes:
        head = f"1 V{self.uidvalidity} H{self.highest} F{self.floor}\n"
        body = "".join(f"{u} {m} ={i}\n" for u, (m, i) in sorted(self.entries.items()))
        dead = "".join(f"-{u} {m}\n" for m, u in self.tombstones)
        return (head + body + dead).encode("ascii")

    def save(self, directory: str) -> None:
        write_atomically(os.path.join(directory, FILENAME), self.render())


def trim_tombstones(tombstones: list[tuple[int, int]], floor: int) -> int:
    """Drop the oldest expunges beyond L{MAX_TOMBSTONES}; the new floor."""
    extra = len(tombstones) - MAX_TOMBSTONES
    if extra > 0:
        floor = max(floor, tombstones[extra - 1][0])
        del tombstones[:extra]
    return floor


def parse(data: bytes) -> ModSeqList:
    """@raise ModSeqListCorrupt: on anything but a well-formed file (or one torn append)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ModSeqListCorrupt("not ASCII") from None
    if not text.endswith("\n"):
        cut = text.rfind("\n")
        if cut < 0:
            raise ModSeqListCorrupt("truncated (no complete header line)")
        text = text[:cut + 1]
    lines = text.split("\n")[:-1]
    fields = {f[:1]: f[1:] for f in lines[0].split()[1:]}
    if not lines[0].startswith("1 ") or not all(fields.get(k, "").isdigit() for k in "VHF"):
        raise ModSeqListCorrupt("bad header line")
    out = ModSeqList(int(fields["V"]), int(fields["H"]), int(fields["F"]))
    dead: dict[int, int] = {}
    for line in lines[1:]:
        parts = line.split(" ", 2)
        gone = parts[0].startswith("-")
        uid_text = parts[0][1:] if gone else parts[0]
        if len(parts) != (2 if gone else 3) or not uid_text.isdigit() or not parts[1].isdigit() \
                or (not gone and not parts[2].startswith("=")):
            raise ModSeqListCorrupt(f"bad line {line[:60]!r}")
        uid, modseq = int(uid_text), int(parts[1])
        if modseq > MAX_MODSEQ:
            raise ModSeqListCorrupt(f"mod-sequence {modseq} too large")
        out.highest = max(out.highest, modseq)
        if gone:
            out.entries.pop(uid, None)
            dead[uid] = modseq
        else:
            out.entries[uid] = (modseq, parts[2][1:])
            dead.pop(uid, None)
    out.tombstones = sorted((m, u) for u, m in dead.items())
    out.floor = trim_tombstones(out.tombstones, out.floor)
    out.lines = len(lines)
    return out


def load(directory: str) -> tuple[ModSeqList | None, str | None]:
    """The folder's list, or C{None} and why (missing, corrupt)."""
    try:
        with open(os.path.join(directory, FILENAME), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "missing"
    try:
        return parse(data), None
    except ModSeqListCorrupt as e:
        return None, f"corrupt: {e}"


def append_lines(directory: str, lines: list[str]) -> None:
    """Append change lines and fsync. Raises C{FileNotFoundError} when there is no file."""
    fd = os.open(os.path.join(directory, FILENAME), os.O_WRONLY | os.O_APPEND)
    try:
        write_and_fsync(fd, "".join(lines).encode("ascii"))
    finally:
        os.close(fd)


def recent_highest(directory: str, tail: int = 16384) -> int:
    """
    The highest mod-sequence in the file's last C{tail} octets (0 if none):
    another process sharing the folder appends its changes there, so this
    is what it has given out lately, without reading the whole file.
    """
    try:
        with open(os.path.join(directory, FILENAME), "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - tail))
            data = f.read(tail)
    except FileNotFoundError:
        return 0
    lines = data.split(b"\n")
    if size > tail:
        lines = lines[1:]  # the first is likely cut
    best = 0
    for line in lines[:-1]:  # the last is empty, or an append under way
        parts = line.split(b" ")
        if len(parts) >= 2 and parts[1].isdigit():
            best = max(best, int(parts[1]))
        elif parts[0] == b"1":  # the header: H<highest>
            best = max([best] + [int(p[1:]) for p in parts if p[:1] == b"H" and p[1:].isdigit()])
    return min(best, MAX_MODSEQ)


#: Which version of the file a process last read or wrote: (inode, size, mtime in ns).
FileState = tuple[int, int, int]


def file_state(directory: str) -> FileState | None:
    try:
        st = os.stat(os.path.join(directory, FILENAME))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _highest_in(data: bytes, header: bool) -> int:
    best = 0
    lines = data.split(b"\n")
    for line in lines[:-1]:  # the last is empty, or an append cut short
        parts = line.split(b" ", 2)
        if len(parts) >= 2 and parts[1].isdigit():
            best = max(best, int(parts[1]))
        elif header and parts[0] == b"1":
            best = max([best] + [int(p[1:]) for p in line.split() if p[:1] == b"H" and p[1:].isdigit()])
    return min(best, MAX_MODSEQ)


def highest_since(directory: str, known: FileState | None) -> tuple[int, FileState | None]:
    """
    What other processes sharing the folder wrote to the file since this
    one last saw it at C{known}: the highest mod-sequence among those lines
    (0 when none), and the file's state now. Run under the folder's lock
    (store/folderlock.py), so nothing is appended meanwhile. The same
    file grown: only the new part is read; rewritten (another inode, or
    shorter): all of it.
    """
    try:
        fd = os.open(os.path.join(directory, FILENAME), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0, None
    try:
        st = os.fstat(fd)
        now = (st.st_ino, st.st_size, st.st_mtime_ns)
        if now == known:
            return 0, now
        start = known[1] if known is not None and known[0] == st.st_ino and known[1] <= st.st_size else 0
        chunks = []
        os.lseek(fd, start, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return _highest_in(b"".join(chunks), start == 0), now
