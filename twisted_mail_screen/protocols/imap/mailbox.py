# -*- test-case-name: tests.test_imap_concurrency -*-
"""
The in-memory index of a Maildir folder, shared by every IMAP session of
the process that has it selected.

A L{Folder} holds the folder's UIDVALIDITY, next UID and, in ascending UID
order, each message's UID and current file name (C{cur/<base>:2,<flags>}
relative to the folder). Nothing else per message is kept; sizes come from
the C{W=} field of the name and bodies are read when asked for.

Every change (new message, flag change, message gone) is appended to the
folder's change log with the session that caused it. Each session keeps
its own view (the UIDs it has announced, hence its sequence numbers) and
catches up from the log only at the points RFC 3501 allows. The log is
trimmed to what the slowest attached session has not yet seen.

Everything that touches the files of one account (scans, renames, copies,
deletions, uidlist writes) runs in the worker pool one at a time per
account, under a L{DeferredLock}; bodies are read without the lock. A
folder with sessions attached is checked once a second on the injected
clock (two C{stat}s; a full rescan only when a directory changed), so
mail that SMTP delivers or another tool writes gets a UID and reaches
IDLE-ing clients within a second.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Iterable, Protocol

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.protocols.imap.fetch import Budget
from twisted_mail_screen.protocols.imap.flags import base_of, flag_names, info_of, size_of_name
from twisted_mail_screen.protocols.imap.modseq import ModSeqs
from twisted_mail_screen.protocols.imap.scan import ScanResult
from twisted_mail_screen.store.folderlock import Signature

NEW, EXPUNGE, FLAGS = 1, 2, 3
POLL_SECONDS = 1.0

log = Logger()


class FolderListener(Protocol):
    """
    What a folder needs of one selection of it (a session's view): the
    folder calls nothing else, so the index knows nothing of sessions.
    """

    #: read-write selections claim \\Recent messages; read-only ones never do
    writable: bool
    #: the change-log position the listener has caught up to (the log is trimmed to the lowest)
    seen: int
    #: the UIDs that are \\Recent for this listener (a claiming scan adds to it)
    recent: set[int]

    def folder_changed(self) -> None:
        """The folder's change log grew (the listener catches up when RFC 3501 allows)."""


class FolderOwner(Protocol):
    """What a folder needs of the registry that holds it."""

    clock: IReactorTime
    budget: Budget

    def sync(self, folder: "Folder") -> Deferred: ...

    def idle(self, folder: "Folder") -> None: ...

    def retire(self, folder: "Folder") -> None: ...


class Folder:
    """One Maildir folder's index (see the module docstring)."""

    def __init__(self, registry: FolderOwner, path: str, lock: DeferredLock) -> None:
        self.registry = registry
        self.path = path
        self.lock = lock
        self.loaded = False
        self.uidvalidity = 0
        self.next_uid = 1
        self.uids: array[int] = array("L")
        self.names: list[str] = []
        self.sizes: dict[int, int] = {}
        self.unclaimed: set[int] = set()
        self.keywords: list[str] = []
        self.log: list[tuple[int, int, FolderListener | None]] = []  # (kind, uid, origin)
        self.log_start = 0  # change-log position just before log[0] (not an RFC 7162 mod-sequence)
        self.ms = ModSeqs()  # the RFC 7162 mod-sequences, persistent
        # The change-log position from which changes have mod-sequences not
        # yet written: another process sharing the folder may still push them
        # up (Registry.persist), so sessions are told of changes only up to it.
        self.unwritten_from: int | None = None
        self.stamp: tuple[int, int, int] | None = None
        self.identity: int | None = None
        # The version of the UID list and keyword file this index matches
        # (another process sharing the Maildir may have changed them).
        self.signature: Signature | None = None
        self.sessions: list[FolderListener] = []
        # Set when the folder was found deleted: sessions that had it selected
        # keep this (emptied) index, a folder made again gets a new one.
        self.retired = False
        self.cache = registry.budget.cache()
        self._poll_call: IDelayedCall | None = None
        self._polling = False

    # lookups

    @property
    def modseq(self) -> int:
        return self.log_start + len(self.log)

    @property
    def visible(self) -> int:
        """The change-log position up to which sessions may be told (their mod-sequences final)."""
        return self.modseq if self.unwritten_from is None or self.retired else self.unwritten_from

    def position(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        return i if i < len(self.uids) and self.uids[i] == uid else None

    def name(self, uid: int) -> str | None:
        i = self.position(uid)
        return None if i is None else self.names[i]

    def size(self, uid: int, rel: str) -> int:
        s = size_of_name(rel)
        return s if s is not None else self.sizes.get(uid, 0)

    def flags(self, rel: str) -> list[str]:
        return flag_names(rel, self.keywords)

    # sessions

    def attach(self, session: FolderListener) -> int:
        self.sessions.append(session)
        if self._poll_call is None:
            self._poll_call = self.registry.clock.callLater(POLL_SECONDS, self._poll)
        return self.modseq

    def detach(self, session: FolderListener) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
        if not self.sessions:
            if self._poll_call is not None and self._poll_call.active():
                self._poll_call.cancel()
            self._poll_call = None
            self.log, self.log_start = [], self.modseq
            self.registry.idle(self)
        else:
            self.trim()

    def claimer(self) -> FolderListener | None:
        for s in self.sessions:
            if s.writable:
                return s
        return None

    def _poll(self) -> None:
        self._poll_call = None
        if not self.sessions:
            return
        if not self._polling:
            self._polling = True
            d = self.registry.sync(self)
            d.addErrback(lambda f: log.failure("imap: poll of {path} failed", f, path=self.path))
            d.addBoth(self._polled)
        self._poll_call = self.registry.clock.callLater(POLL_SECONDS, self._poll)

    def _polled(self, _: object) -> None:
        self._polling = False

    # changes (reactor thread, under the account lock)

    def record(self, kind: int, uid: int, origin: FolderListener | None, rel: str | None = None) -> None:
        """Log a change for the sessions and give it a mod-sequence (C{rel}: the name now, if known)."""
        if self.unwritten_from is None:
            self.unwritten_from = self.modseq
        self.log.append((kind, uid, origin))
        if kind == EXPUNGE:
            self.ms.expunge(uid)
        else:
            rel = rel if rel is not None else self.name(uid)
            if rel is not None:
                self.ms.touch(uid, rel)

    def written(self) -> None:
        """The mod-sequences given so far are on disk, final: the sessions may be told of them."""
        if self.unwritten_from is not None:
            self.unwritten_from = None
            self.notify()

    def entries_since(self, modseq: int) -> list[tuple[int, int, FolderListener | None]]:
        return self.log[max(0, modseq - self.log_start):]

    def trim(self) -> None:
        if not self.sessions:
            return
        low = min(s.seen for s in self.sessions)
        drop = low - self.log_start
        if drop > 0:
            del self.log[:drop]
            self.log_start = low

    def notify(self) -> None:
        for s in list(self.sessions):
            s.folder_changed()

    def apply_scan(self, r: ScanResult, claimer: FolderListener | None) -> None:
        if r.unchanged:
            return
        if r.gone:
            self.registry.retire(self)
            return
        self.signature = r.signature
        if r.loaded:
            self.uidvalidity, self.next_uid = r.uidvalidity, r.next_uid
            self.uids, self.names, self.keywords = r.uids, r.names, r.keywords
            for uid in r.uids if self.sessions else ():
                self.log.append((NEW, uid, None))  # not a change: their mod-sequences were reconciled
            if r.modseqs is not None:
                self.ms = r.modseqs
            self.sizes.update(r.sizes)
            if claimer is not None:
                claimer.recent.update(r.claimed)
            self.loaded = True
            self.stamp, self.identity = r.stamp, r.identity
            return
        if r.reloaded_keywords is not None:
            self.keywords = r.reloaded_keywords
        # Above what another process sharing the folder gave out, so its clients' values stay below ours.
        self.ms.highest = max(self.ms.highest, r.others_modseq)
        for uid, rel in r.renamed:
            i = self.position(uid)
            if i is not None:
                old = self.names[i]
                self.names[i] = rel
                if info_of(old) != info_of(rel):
                    self.record(FLAGS, uid, None, rel)
        if r.vanished:
            self.remove(r.vanished, None)
        claimed = set(r.claimed)
        for uid, rel in r.added:
            self.uids.append(uid)
            self.names.append(rel)
            self.record(NEW, uid, claimer if uid in claimed else None, rel)
        if claimer is not None:
            claimer.recent.update(r.claimed)
        self.sizes.update(r.sizes)
        self.next_uid = r.next_uid
        self.stamp = r.stamp
        if r.renamed or r.vanished or r.added:
            self.notify()

    def vanish(self) -> None:
        """The folder was deleted: every message is expunged for the attached sessions."""
        self.loaded = False
        self.cache.clear()
        self.stamp = None
        if self.uids:
            for uid in self.uids:
                self.record(EXPUNGE, uid, None)
            self.uids, self.names = array("L"), []
            self.notify()

    def remove(self, uids: Iterable[int], origin: FolderListener | None) -> None:
        gone = set(uids)
        if not gone:
            return
        keep = [i for i, u in enumerate(self.uids) if u not in gone]
        if len(keep) == len(self.uids):
            return
        removed = [u for u in self.uids if u in gone]
        self.cache.drop([base_of(n) for u, n in zip(self.uids, self.names) if u in gone])
        self.uids = array("L", (self.uids[i] for i in keep))
        self.names = [self.names[i] for i in keep]
        for uid in removed:
            self.sizes.pop(uid, None)
            self.record(EXPUNGE, uid, origin)

    def add(self, entries: list[tuple[int, str]], next_uid: int) -> None:
        """
        Messages this server put into the folder (APPEND, COPY, MOVE). They
        are \\Recent for the read-write session that has the folder
        selected, or else for the next one to select it.
        """
        claimer = self.claimer()
        for uid, rel in entries:
            self.uids.append(uid)
            self.names.append(rel)
            self.record(NEW, uid, claimer, rel)
            if claimer is None:
                self.unclaimed.add(uid)
        self.next_uid = max(self.next_uid, next_uid)

    def claim(self, session: FolderListener) -> set[int]:
        """Recent messages not yet given to any session (they go to C{session})."""
        present = set(self.uids)
        out = {u for u in self.unclaimed if u in present}
        if session.writable:
            self.unclaimed.clear()
        return out

    def recent_count(self) -> int:
        """Messages with \\Recent: in new/, not yet claimed, or recent in an attached session."""
        recent = {u for u, n in zip(self.uids, self.names) if n.startswith("new/")}
        recent |= self.unclaimed
        for s in self.sessions:
            recent |= s.recent
        present = set(self.uids)
        return sum(1 for u in recent if u in present)
