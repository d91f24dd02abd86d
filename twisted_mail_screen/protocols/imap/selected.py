# -*- test-case-name: tests.test_imap_concurrency -*-
"""
The selected mailbox as one session sees it: the view (the UIDs the
client has been told of, in order, so a message's sequence number is its
position), its \\Recent set, the UIDs expunged but not yet announced, and
when the folder's changes are told: EXISTS, EXPUNGE and FETCH FLAGS
responses at the points RFC 3501 allows, at once while IDLE.

The session is the folder's L{FolderListener}: the folder calls
C{folder_changed} and reads C{writable}, C{seen} and C{recent}.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Any, Iterator

from twisted.internet.defer import Deferred, succeed

from twisted_mail_screen.protocols.imap import mailbox as mb, quota_commands as quota
from twisted_mail_screen.protocols.imap.core import SessionCore
from twisted_mail_screen.protocols.imap.fetch import flags_item
from twisted_mail_screen.protocols.imap.parse import Atom, SeqSet, Token, format_set, parse_seqset
from twisted_mail_screen.protocols.imap.store import LONG_SET, expunge_files_locked, set_positions


class SelectedView(SessionCore):
    """The selected folder's view, its updates, IDLE, CLOSE/UNSELECT (state in L{SessionCore})."""

    #: RFC 7162, turned on for the rest of the session by ENABLE or a CONDSTORE-enabling command
    condstore = False
    qresync = False

    def folder_changed(self) -> None:
        if self._idle_tag is not None and self.folder is not None:
            self.flush_updates(True)

    def flush_updates(self, expunge_ok: bool) -> None:
        f = self.folder
        assert f is not None
        upto = f.visible  # changes whose mod-sequences are not yet final wait
        entries = f.entries_since(self.seen)[:max(0, upto - self.seen)]
        self.seen = max(self.seen, upto)
        new: list[int] = []
        new_set: set[int] = set()
        changed: dict[int, None] = {}
        view = self.view
        for kind, uid, origin in entries:
            if kind == mb.NEW:
                new.append(uid)
                new_set.add(uid)
                if origin is self or (not self.writable and (f.name(uid) or "").startswith("new/")):
                    self.recent.add(uid)
            elif kind == mb.EXPUNGE:
                if uid in new_set:
                    new_set.discard(uid)
                    new.remove(uid)
                    self.recent.discard(uid)
                else:
                    self.doomed.add(uid)
            elif kind == mb.FLAGS and origin is not self:
                changed[uid] = None
        out: list[bytes] = []
        if expunge_ok and self.doomed:
            positions = []
            for uid in self.doomed:
                i = bisect.bisect_left(view, uid)
                if i < len(view) and view[i] == uid:
                    positions.append(i)
            positions.sort(reverse=True)
            if self.qresync:  # RFC 7162: VANISHED replaces EXPUNGE, one line for all
                if positions:
                    gone_uids = format_set([view[i] for i in reversed(positions)])
                    out.append(b"* VANISHED %s\r\n" % gone_uids.encode())
            else:
                out += [b"* %d EXPUNGE\r\n" % (i + 1) for i in positions]
            gone = self.doomed
            self.view = view = array("L", (u for u in view if u not in gone))
            self.recent -= gone
            self.doomed = set()
        if new:
            view.extend(new)
            out.append(b"* %d EXISTS\r\n" % len(view))
            out.append(b"* %d RECENT\r\n" % len(self.recent))
        for uid in changed:
            if uid in self.doomed:
                continue
            i = bisect.bisect_left(view, uid)
            rel = f.name(uid)
            if i < len(view) and view[i] == uid and rel is not None:
                modseq = b" MODSEQ (%d)" % f.ms.by_uid.get(uid, 0) if self.condstore else b""
                out.append(b"* %d FETCH (UID %d %s%s)\r\n" % (
                    i + 1, uid, flags_item(rel, f.keywords, uid in self.recent), modseq))
        f.trim()
        if out:
            self.send(b"".join(out))

    def _deselect(self) -> None:
        if self.folder is not None:
            self.folder.detach(self)
        self.folder = None
        self.view = array("L")
        self.recent = set()
        self.doomed = set()
        if self.state == "selected":
            self.state = "auth"

    def do_IDLE(self, tag: bytes, args: list) -> None:
        self._no_args(args)
        self._idle_tag = tag
        self.send(b"+ idling\r\n")
        if self.folder is not None:
            self.flush_updates(True)
        return None

    def _idle_line(self, line: bytes) -> None:
        tag, self._idle_tag = self._idle_tag, None
        assert tag is not None
        if line.strip().upper() != b"DONE":
            self.tagged(tag, "BAD Expected DONE")
            return
        if self.folder is not None:
            self.flush_updates(True)
        self.tagged(tag, "OK IDLE terminated")

    def do_CLOSE(self, tag: bytes, args: list) -> Any:
        self._no_args(args)
        if not self.writable:
            self._deselect()
            return "OK CLOSE completed"

        def closed(_: object) -> str:
            self._deselect()
            return "OK CLOSE completed"

        return self._expunge(None).addCallback(closed)

    def do_UNSELECT(self, tag: bytes, args: list) -> str:
        self._no_args(args)
        self._deselect()
        return "OK UNSELECT completed"

    def _expunge(self, uids: SeqSet | Token | None) -> Deferred:
        folder = self.folder
        assert folder is not None
        view = array("L", self.view)

        def locked() -> Deferred:
            def unlinked(gone: list[int]) -> Deferred:
                recorded = quota.changed(self, [], [n for u in gone if (n := folder.name(u)) is not None])
                folder.remove(gone, self)
                folder.notify()
                return recorded.addCallback(lambda _: self.factory.registry.persist(folder))

            # Choosing the victims (and resolving a long UID set) is the worker's, under the
            # folder's cross-process lock (EXPUNGE, UID EXPUNGE, CLOSE).
            return self.factory.blocking.run(expunge_files_locked, folder.path, array("L", folder.uids),
                                             list(folder.names), view, uids).addCallback(unlinked)

        return folder.lock.run(locked)

    @staticmethod
    def _seqset(tok: Token) -> SeqSet | Token:
        """A short set parsed now (syntax errors answered first); a long one left for the worker."""
        if isinstance(tok, Atom) and len(tok) > LONG_SET:
            return tok
        return parse_seqset(tok)

    def _ranges(self, seqset: SeqSet | Token, uid: bool) -> Deferred:
        """The view's position ranges a set names (a long set's are found in the worker)."""
        if isinstance(seqset, SeqSet):
            return succeed(set_positions(seqset, self.view, uid))
        return self.factory.blocking.run(set_positions, seqset, array("L", self.view), uid).addCallback(
            self.still_here)

    @staticmethod
    def _iter_positions(ranges: list[tuple[int, int]]) -> Iterator[int]:
        for lo, hi in ranges:
            yield from range(lo, hi)
