# -*- test-case-name: tests.test_imap_condstore -*-
"""
A folder's mod-sequences (RFC 7162) in memory, and the worker jobs that
keep them on disk (L{modseqlist}).

Every change the folder index records (a new message, a flag change, an
expunge; made by an IMAP command or found by a scan: delivery, POP3, the
web API, another program) takes the next mod-sequence and queues a line
for the file; the command that made it writes the queued lines (worker
thread, under the account lock) before it answers. When a folder is
loaded, the file is compared with the directory: a message without a
line, or whose flag letters differ from its line's, gets a new
mod-sequence; a line whose message is gone becomes an expunge.

If the file is lost or unreadable while the UID list survives, a client
may hold a mod-sequence we can no longer know; the new sequence then
starts at the current time in microseconds, above anything this folder
handed out before (it cannot have made a change per microsecond).
"""

from __future__ import annotations

import bisect
import time
from array import array
from typing import Iterable, Mapping

from twisted.logger import Logger

from twisted_mail_screen.protocols.imap.flags import info_of
from twisted_mail_screen.protocols.imap.parse import SeqSet
from twisted_mail_screen.store import modseqlist
from twisted_mail_screen.store.modseqlist import ModSeqList, trim_tombstones

log = Logger()

#: A load that reads more lines than this many per message (plus a margin) compacts the file.
COMPACT_SLACK = 1000


def letters(rel: str) -> str:
    """The flag letters of a name as the file keeps them (letters only: one token, no spaces)."""
    return "".join(c for c in info_of(rel) if c.isascii() and c.isalpha())


class ModSeqItem(str):
    """
    The C{MODSEQ} FETCH item: a C{str} (so the FETCH code treats it as an
    index-only item, like FLAGS) that carries the folder's table to render from.
    """

    table: Mapping[int, int]

    def __new__(cls, table: Mapping[int, int]) -> "ModSeqItem":
        item = super().__new__(cls, "MODSEQ")
        item.table = table
        return item


class ModSeqs:
    """One folder's mod-sequences: the highest, each present message's, the remembered expunges."""

    def __init__(self, uidvalidity: int = 0, highest: int = 0) -> None:
        self.uidvalidity = uidvalidity
        self.highest = highest
        self.floor = 0
        self.by_uid: dict[int, int] = {}
        self.tombstones: list[tuple[int, int]] = []  # (modseq, uid), ascending
        # (uid, modseq, name or None for an expunge): formatted by the worker
        # (a STORE of 1:* on a large folder must cost the reactor little per message)
        self.pending: list[tuple[int, int, str | None]] = []
        # The version of the file this process last read or wrote: another
        # process sharing the folder that appended since is caught up with.
        self.file: modseqlist.FileState | None = None

    def touch(self, uid: int, rel: str) -> None:
        self.highest += 1
        self.by_uid[uid] = self.highest
        self.pending.append((uid, self.highest, rel))

    def expunge(self, uid: int) -> None:
        self.highest += 1
        self.by_uid.pop(uid, None)
        self.tombstones.append((self.highest, uid))
        if len(self.tombstones) > modseqlist.MAX_TOMBSTONES * 5 // 4:  # trimmed in batches: amortised O(1)
            self.floor = trim_tombstones(self.tombstones, self.floor)
        self.pending.append((uid, self.highest, None))

    def take_pending(self) -> list[tuple[int, int, str | None]]:
        changes, self.pending = self.pending, []
        return changes

    def shifted(self, changes: list[tuple[int, int, str | None]], shift: int) -> None:
        """
        C{changes} were written C{shift} higher than given (another process
        had given out their values meanwhile): take the values written.
        """
        if not changes:
            return
        moved = {(m, u): m + shift for u, m, rel in changes if rel is None}
        for uid, modseq, rel in changes:
            if rel is not None and self.by_uid.get(uid) == modseq:
                self.by_uid[uid] = modseq + shift
        if moved:  # the newest expunges, at the end of the list
            for i in range(len(self.tombstones) - 1, -1, -1):
                key = self.tombstones[i]
                if key in moved:
                    self.tombstones[i] = (moved.pop(key), key[1])
                    if not moved:
                        break
                elif key[0] < changes[0][1]:
                    break
        self.highest = max(self.highest, changes[-1][1] + shift)

    def vanished(self, since: int, uids: "array[int]", next_uid: int,
                 within: SeqSet | None) -> str:
        """
        The UID set (as sent: C{1:3,7}) of messages expunged after
        mod-sequence C{since}, limited to C{within}; empty when none. Below
        the floor the expunges are forgotten: every absent UID up to the
        last given is reported, as RFC 7162 allows.
        """
        star = next_uid - 1
        gaps: list[tuple[int, int]] = []
        if since >= self.floor:
            i = bisect.bisect_right(self.tombstones, (since, 2**32))
            for u in sorted({u for _, u in self.tombstones[i:] if u not in self.by_uid}):
                if gaps and gaps[-1][1] == u - 1:
                    gaps[-1] = (gaps[-1][0], u)
                else:
                    gaps.append((u, u))
        else:
            low = 1
            for u in uids:  # ascending: the gaps between present UIDs
                if u > low:
                    gaps.append((low, u - 1))
                low = u + 1
            if low <= star:
                gaps.append((low, star))
        if within is not None:
            wanted = within.resolve(max(star, 1))
            gaps = [(max(a, c), min(b, d)) for a, b in gaps for c, d in wanted if max(a, c) <= min(b, d)]
        return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in gaps)


def changed_ranges(view: "array[int]", ranges: Iterable[tuple[int, int]], table: Mapping[int, int],
                   since: int) -> list[tuple[int, int]]:
    """The position ranges of C{ranges} whose messages changed after C{since}."""
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        for i in range(lo, hi):
            if table.get(view[i], 0) > since:
                if out and out[-1][1] == i:
                    out[-1] = (out[-1][0], i + 1)
                else:
                    out.append((i, i + 1))
    return out


def reconcile(path: str, uidvalidity: int, fresh: bool, uids: "array[int]", names: list[str]) -> ModSeqs:
    """
    The folder's mod-sequences as its file and its directory say (worker
    thread, at load); the file is rewritten when it disagreed or grew long.
    C{fresh}: the UID list was just made (a new folder or a new UIDVALIDITY).
    """
    saved, reason = modseqlist.load(path)
    if saved is not None and saved.uidvalidity != uidvalidity:
        saved, reason = None, "for another UIDVALIDITY"
    if saved is None:
        start = 0
        if not fresh and len(uids):
            # The list may have been lost after a client learnt its values.
            start = time.time_ns() // 1000
            log.warn("imap: mod-sequences of {path} {reason}; restarting at {start}",
                     path=path, reason=reason, start=start)
        saved = ModSeqList(uidvalidity, start)
    out = ModSeqs(uidvalidity, saved.highest)
    out.floor, out.tombstones = saved.floor, saved.tombstones
    changed: list[tuple[int, str]] = []
    for uid, rel in zip(uids, names):
        entry = saved.entries.get(uid)
        if entry is None or entry[1] != letters(rel):
            changed.append((uid, rel))
        else:
            out.by_uid[uid] = entry[0]
    present = set(uids)
    gone = [u for u in saved.entries if u not in present]
    dirty = bool(changed or gone) or reason is not None or \
        saved.lines > 2 * len(saved.entries) + len(saved.tombstones) + COMPACT_SLACK
    if changed or gone:
        # One new mod-sequence for everything found changed while nobody watched.
        out.highest += 1
        for uid, _ in changed:
            out.by_uid[uid] = out.highest
        for uid in gone:
            out.tombstones.append((out.highest, uid))
        out.floor = trim_tombstones(out.tombstones, out.floor)
    if dirty:
        rows = {u: (out.by_uid[u], letters(rel)) for u, rel in zip(uids, names)}
        ModSeqList(uidvalidity, out.highest, out.floor, rows, list(out.tombstones)).save(path)
    out.file = modseqlist.file_state(path)
    return out


def write_pending(path: str, uidvalidity: int, changes: list[tuple[int, int, str | None]],
                  known: modseqlist.FileState | None = None) -> tuple[int, modseqlist.FileState | None]:
    """
    Append a command's changes (worker thread, under the folder's
    cross-process lock); a folder deleted meanwhile has nothing to keep.

    Another process serving the same folder gives out mod-sequences from
    its own memory: when it appended to the file since this one last saw
    it at C{known}, and its values reach this command's, the changes are
    written above them (so every value in the file is unique and the file
    ascends). Returns that shift (0 mostly) and the file's state after.
    """
    shift = 0
    if changes:
        others, _ = modseqlist.highest_since(path, known)
        shift = max(0, others - changes[0][1] + 1)
    lines = [f"-{u} {m + shift}\n" if rel is None else f"{u} {m + shift} ={letters(rel)}\n"
             for u, m, rel in changes]
    try:
        modseqlist.append_lines(path, lines)
    except FileNotFoundError:
        pass
    return shift, modseqlist.file_state(path)
