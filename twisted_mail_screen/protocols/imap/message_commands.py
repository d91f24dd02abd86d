# -*- test-case-name: tests.test_imap -*-
"""
The commands on the selected folder's messages: FETCH (streamed in
chunks, rendered in the worker when files are read), STORE, COPY and
MOVE, SEARCH and EXPUNGE, each also as a UID command.
"""

from __future__ import annotations

import re
from array import array
from typing import Any, Iterator, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from twisted_mail_screen.protocols.imap import mailbox as mb
from twisted_mail_screen.protocols.imap.core import No
from twisted_mail_screen.protocols.imap.fetch import (PIECE_BYTES, cached_rows, chunk_rows, distinct_atts,
                                                      item_groups, needs_disk, render_rows, row_cost)
from twisted_mail_screen.protocols.imap.fetch import Att
from twisted_mail_screen.protocols.imap.filejobs import transfer_files
from twisted_mail_screen.protocols.imap.fetchmeta import (CHUNK_ROWS, column_chunks, index_only, render_columns,
                                                          render_meta)
from twisted_mail_screen.protocols.imap.flags import merge_keywords
from twisted_mail_screen.protocols.imap.modseq import changed_ranges
from twisted_mail_screen.protocols.imap.parse import (Atom, BadCommand, SeqSet, Section, Token, astring,
                                                      format_set, mailbox_name, parse_fetch_atts)
from twisted_mail_screen.protocols.imap import quota_commands as quota
from twisted_mail_screen.protocols.imap.searchplan import Snapshot, search_command
from twisted_mail_screen.protocols.imap.selected import SelectedView
from twisted_mail_screen.protocols.imap.store import store_files, store_files_locked
from twisted_mail_screen.store.folderlock import Stale

REACTOR_ROWS = 500  # FETCH rows of index-only items rendered without a thread hop


class MessageCommands(SelectedView):
    """The selected-state commands on messages (state in L{SessionCore})."""

    def do_EXPUNGE(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        uids: SeqSet | Token | None = None
        if uid:
            if len(args) != 1:
                raise BadCommand("UID EXPUNGE needs a UID set")
            uids = self._seqset(args[0])
        elif args:
            raise BadCommand("unexpected arguments")
        if not self.writable:
            raise No("Mailbox is read-only", "READ-ONLY")
        return self._expunge(uids).addCallback(lambda _: "OK EXPUNGE completed")

    def do_FETCH(self, tag: bytes, args: list, uid: bool = False, since: int | None = None,
                 extra: Sequence[Att] = ()) -> Deferred:
        """FETCH; C{since} and C{extra} are CHANGEDSINCE and MODSEQ (L{CondStoreCommands})."""
        if len(args) != 2:
            raise BadCommand("FETCH needs a sequence set and attributes")
        seqset = self._seqset(args[0])
        atts = distinct_atts(parse_fetch_atts(args[1]) + list(extra))
        if uid and "UID" not in atts:
            atts.insert(0, "UID")
        marks_seen = self.writable and any(
            (isinstance(a, Section) and not a.peek) or a in ("RFC822", "RFC822.TEXT") for a in atts)
        if marks_seen and "FLAGS" not in atts:
            atts.append("FLAGS")

        def fetch(ranges: list[tuple[int, int]]) -> Deferred:
            d: Deferred = succeed(None)
            if since is not None and self.folder is not None:
                ranges = changed_ranges(self.view, ranges, self.folder.ms.by_uid, since)
            if marks_seen:
                uids = [self.view[i] for i in self._iter_positions(ranges)]
                d = self._store_flags(uids, "+", ["\\Seen"])
            return d.addCallback(lambda _: self._stream_fetch(ranges, atts))

        return self._ranges(seqset, uid).addCallback(fetch).addCallback(
            lambda _: ("OK UID FETCH completed" if uid else "OK FETCH completed"))

    def _rows(self, positions: Iterator[int]) -> Iterator[tuple[int, int, str, int, bool]]:
        folder = self.folder
        assert folder is not None
        view = self.view
        for i in positions:
            uid = view[i]
            rel = folder.name(uid)
            if rel is None:
                continue
            yield (i + 1, uid, rel, folder.size(uid, rel), uid in self.recent)

    def _stream_fetch(self, ranges: list[tuple[int, int]], atts: list) -> Deferred:
        folder = self.folder
        assert folder is not None
        if index_only(atts):
            return self.stream(self._column_pieces(ranges, atts))
        rows = self._rows(self._iter_positions(ranges))
        disk = needs_disk(atts)
        per_chunk = chunk_rows([], atts)
        blocking = self.factory.blocking
        cache = folder.cache
        first = [True]

        def learnt(result: tuple[bytes, dict]) -> bytes:
            data, learned = result
            if learned:
                cache.learn(learned)
            return data

        def render(chunk: list, items: list = atts, head: bool = True, tail: bool = True) -> Any:
            keywords = list(folder.keywords)
            # Only a small first chunk of index-only items is rendered here
            # (a few ms); the rest go through the worker, so a large FETCH
            # gives the reactor back between chunks even when output never
            # pauses.
            if first[0] and len(chunk) <= REACTOR_ROWS and (not disk or
                                                            cached_rows(chunk, items, cache)):
                first[0] = False
                return learnt(render_rows(folder.path, chunk, items, keywords, cache))
            first[0] = False
            return blocking.run(render_rows, folder.path, chunk, items, keywords,
                                cache, head, tail).addCallback(learnt)

        def chunks() -> Iterator[tuple[list, bool]]:
            # Every item a message is asked for counts against the piece's
            # budget (a message asked for once per item is sent once per item).
            chunk: list = []
            budget = 0
            flat = row_cost(atts, 0) if not disk else None  # index-only items: no size to weigh
            for row in rows:
                cost = flat if flat is not None else row_cost(atts, row[3])
                if chunk and (len(chunk) >= per_chunk or budget + cost > PIECE_BYTES):
                    yield chunk, budget >= PIECE_BYTES // 2
                    chunk, budget = [], 0
                chunk.append(row)
                budget += cost
            if chunk:
                yield chunk, budget >= PIECE_BYTES // 2

        def pieces() -> Iterator[Any]:
            # One chunk is rendered (in a worker thread when it reads files)
            # while the one before it is being written; a chunk of large
            # bodies is written before the next one is read, and one
            # message whose items exceed a piece is rendered a group of
            # items at a time.
            ahead: Any = None
            for chunk, big in chunks():
                if len(chunk) == 1 and row_cost(atts, chunk[0][3]) > PIECE_BYTES:
                    groups = item_groups(atts, chunk[0][3])
                    if len(groups) > 1:
                        if ahead is not None:
                            yield ahead
                            ahead = None
                        for i, group in enumerate(groups):
                            yield render(chunk, group, i == 0, i == len(groups) - 1)
                        continue
                piece = render(chunk)
                if ahead is not None:
                    yield ahead
                ahead = piece
                if big:
                    yield ahead
                    ahead = None
            if ahead is not None:
                yield ahead

        return self.stream(pieces())

    def _column_pieces(self, ranges: list[tuple[int, int]], atts: list) -> Iterator[Any]:
        """
        Index-only items a column at a time (fetchmeta): a first chunk the
        cache answers is rendered here, the rest in the worker, one chunk
        rendered while the one before it is written.
        """
        folder = self.folder
        assert folder is not None
        cache = folder.cache
        ahead: Any = None
        first = True
        for cols in column_chunks(ranges, self.view, folder, self.recent, CHUNK_ROWS, REACTOR_ROWS):
            keywords = list(folder.keywords)
            piece: Any = render_meta(folder.path, cols, atts, keywords, cache, False) if first else None
            first = False
            if piece is None:
                piece = self.factory.blocking.run(render_columns, folder.path, cols, atts, keywords,
                                                  cache).addCallback(self._learnt, cache)
            if ahead is not None:
                yield ahead
            ahead = piece
        if ahead is not None:
            yield ahead

    @staticmethod
    def _learnt(result: tuple[bytes, dict], cache: Any) -> bytes:
        data, learned = result
        if learned:
            cache.learn(learned)
        return data

    def stream(self, pieces: Iterator[Any]) -> Deferred:
        """Write bytes (or Deferreds of bytes) from C{pieces}, pausing while the transport is full."""
        drain = self.output
        done: Deferred = Deferred()

        def finish(result: Any = None) -> None:
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(None)

        def step() -> None:
            while True:
                if self.closing or drain.stopped:
                    return finish()
                if drain.paused:
                    drain.waiter = step
                    return
                try:
                    piece = next(pieces)
                except StopIteration:
                    return finish()
                except Exception:
                    return finish(Failure())
                if isinstance(piece, Deferred):
                    def write(data: bytes) -> None:
                        self.send(data)
                        step()
                    piece.addCallbacks(write, finish)
                    return
                self.send(piece)

        step()
        return done

    def _store_args(self, args: list) -> tuple[Any, str, bool, list[str]]:
        """STORE's sequence set, mode (C{+}, C{-} or C{=}), C{.SILENT} and flags, checked."""
        if len(args) != 3:
            raise BadCommand("STORE needs a sequence set, an item and flags")
        seqset = self._seqset(args[0])
        item = str(args[1]).upper() if isinstance(args[1], Atom) else ""
        m = re.match(r"^([+-]?)FLAGS(\.SILENT)?$", item)
        if not m:
            raise BadCommand("STORE item must be [+-]FLAGS[.SILENT]")
        flags = [f for f in self._flag_list(args[2]) if f != "\\Recent"]
        if not self.writable:
            raise No("Mailbox is read-only", "READ-ONLY")
        return seqset, m.group(1) or "=", bool(m.group(2)), flags

    def do_STORE(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        seqset, mode, silent, flags = self._store_args(args)

        def store(ranges: list[tuple[int, int]]) -> Deferred:
            uids = [self.view[i] for i in self._iter_positions(ranges)]
            d = self._store_flags(uids, mode, flags)
            if silent:
                return d
            atts = ["UID", "FLAGS"] if uid else ["FLAGS"]
            return d.addCallback(lambda _: self._stream_fetch(ranges, atts))

        return self._ranges(seqset, uid).addCallback(store).addCallback(
            lambda _: "OK STORE completed")

    def _store_flags(self, uids: list[int], mode: str, flags: list[str],
                     unchanged_since: int | None = None, modified: list[int] | None = None) -> Deferred:
        folder = self.folder
        assert folder is not None
        registry = self.factory.registry
        chosen: list[str] = []  # the keyword table the renames were planned with

        def make() -> tuple[Any, ...]:
            keywords = merge_keywords(folder.keywords, flags) if mode != "-" else folder.keywords
            if keywords is None:
                raise No("Too many keywords in this mailbox", "LIMIT")
            rows = [(u, folder.names[i]) for u in uids if (i := folder.position(u)) is not None]
            if unchanged_since is not None and modified is not None:
                # RFC 7162 UNCHANGEDSINCE: decided under the lock, with the renames.
                table = folder.ms.by_uid
                modified[:] = [u for u, _ in rows if table.get(u, 0) > unchanged_since]
                rows = [r for r in rows if table.get(r[0], 0) <= unchanged_since]
            chosen[:] = keywords
            changed_keywords = keywords if keywords != folder.keywords else None
            # Which files change, and their renames, are the worker's job.
            return (store_files, folder.path, rows, mode, flags, list(keywords), changed_keywords)

        def renamed(done: list[tuple[int, str]]) -> Deferred:
            folder.keywords = list(chosen)
            for u, rel in done:
                i = folder.position(u)
                if i is not None:
                    folder.names[i] = rel
                    folder.record(mb.FLAGS, u, self, rel)
            folder.notify()
            return registry.persist(folder)

        def locked() -> Any:
            job = make()
            if not job[2] and chosen == folder.keywords:
                return None
            if chosen != folder.keywords:
                # A new keyword takes its letter under the cross-process lock, from
                # the table as every process sharing the folder has it.
                return registry.guarded(folder, make).addCallback(renamed)
            # Under the folder's cross-process lock: the renames start from the names on disk.
            return self.factory.blocking.run(store_files_locked, *job[1:]).addCallback(renamed)

        # The folder has the change even if the session left meanwhile (it then answers nothing).
        return folder.lock.run(locked).addCallback(self.still_here)

    def do_COPY(self, tag: bytes, args: list, uid: bool = False, move: bool = False) -> Deferred:
        if len(args) != 2:
            raise BadCommand("COPY needs a sequence set and a mailbox")
        seqset = self._seqset(args[0])
        name = mailbox_name(args[1], self.utf8)
        if move and not self.writable:
            raise No("Mailbox is read-only", "READ-ONLY")
        assert self.folders is not None and self.folder is not None
        path = self.folders.path(name)  # a name no folder can have: NO [CANNOT], not [TRYCREATE]
        source = self.folder
        if move and path == source.path:
            raise No("Cannot move messages into the same mailbox", "CANNOT")
        registry = self.factory.registry
        target = registry.folder(self.folders.inbox, path)
        wanted: list[int] = []
        names = self.factory.store.names

        def locked() -> Deferred:
            def loaded(exists: bool) -> Any:
                if not target.loaded or not exists:
                    raise No("No such mailbox", "TRYCREATE")
                rows = [(u, source.name(u)) for u in wanted]
                rows = [(u, n) for u, n in rows if n is not None]
                # A MOVE takes the messages out of the source under its lock too.
                return registry.guarded(target, lambda: (
                    transfer_files, source.path, path, rows, list(source.keywords),
                    list(target.keywords), move, names, target.uidvalidity, target.next_uid,
                    array("L", target.uids), list(target.names)), also=source.path if move else None)

            def transferred(result: Any) -> Deferred:
                done, next_uid, keywords = result
                # A move within the account changes no usage.
                recorded = quota.changed(self, [] if move else [rel for _, _, rel in done], [])
                target.keywords = keywords
                target.add([(d, rel) for _, d, rel in done], next_uid)
                target.notify()
                if move:
                    source.remove([s for s, _, _ in done], self)
                    source.notify()
                return recorded.addCallback(lambda _: registry.persist(target)).addCallback(
                    lambda _: registry.persist(source, done))

            return registry.ensure_loaded(target).addCallback(lambda _: self.exists(path)).addCallback(
                loaded).addCallback(transferred)

        def answer(done: list[tuple[int, int, str]]) -> str:
            if not target.sessions:
                registry.idle(target)
            word = "MOVE" if move else "COPY"
            if not done:
                return f"OK {word} completed (no messages)"
            code = (f"COPYUID {target.uidvalidity} {format_set([s for s, _, _ in done])} "
                    f"{format_set([d for _, d, _ in done])}")
            if move:
                self.untagged(f"OK [{code}] Moved")
                return f"OK {word} completed"
            return f"OK [{code}] {word} completed"

        def chosen(ranges: list[tuple[int, int]]) -> Deferred:
            wanted.extend(self.view[i] for i in self._iter_positions(ranges))
            if move or not wanted or not quota.limited(self):  # MOVE never adds: a full account can clean up
                return source.lock.run(locked)
            octets = sum(source.size(u, source.name(u) or "") for u in wanted)
            return quota.room(self, octets, len(wanted)).addCallback(lambda _: source.lock.run(locked))

        def busy(failure: Failure) -> Any:
            failure.trap(Stale)
            raise No("Mailbox is being changed by another server, try again", "INUSE")

        return self._ranges(seqset, uid).addCallback(chosen).addCallbacks(answer, busy)

    def do_MOVE(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        return self.do_COPY(tag, args, uid, move=True)

    def search_reply(self, line: bytes, uid: bool) -> bytes:
        """The C{* SEARCH} line as sent (CONDSTORE adds the highest MODSEQ of the matches)."""
        return line

    def do_SEARCH(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        args = list(args)
        charset = "utf-8"
        if args and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
            if len(args) < 2:
                raise BadCommand("CHARSET needs a name")
            cs = astring(args[1]).decode("ascii", "replace").lower()
            if cs not in ("utf-8", "us-ascii", "utf8"):
                raise No("Unsupported charset", "BADCHARSET (US-ASCII UTF-8)")
            args = args[2:]
        folder = self.folder
        assert folder is not None
        # Only the copies are made here; parsing, simplifying and evaluating
        # the keys (set operations, file reads) is the worker's.
        snap = Snapshot(folder.path, self.view, folder.uids, folder.names, folder.sizes,
                        self.recent, folder.keywords)
        d = self.factory.blocking.run(search_command, args, charset, snap, uid)

        def answer(line: bytes) -> str:
            self.send(self.search_reply(line, uid))
            return "OK UID SEARCH completed" if uid else "OK SEARCH completed"

        return d.addCallback(answer)
