# -*- test-case-name: tests.test_imap_sort -*-
"""
SORT and THREAD (RFC 5256), each also as a UID command. The session only
copies the folder's index (as SEARCH does); parsing, searching, reading
keys from the header index and ordering run in the worker pool.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from twisted_mail_screen.protocols.imap import sortcache
from twisted_mail_screen.protocols.imap.core import No
from twisted_mail_screen.protocols.imap.parse import Atom, BadCommand, Token, astring
from twisted_mail_screen.protocols.imap.search import parse_search
from twisted_mail_screen.protocols.imap.searchplan import Search, Snapshot, bits_of, simplify
from twisted_mail_screen.protocols.imap.selected import SelectedView
from twisted_mail_screen.protocols.imap.sortkeys import SortFields
from twisted_mail_screen.protocols.imap.threads import (SORT_KEYS, Msg, ordered_subject, references,
                                                        render, sort_numbers)

CHARSETS = {"utf-8": "utf-8", "us-ascii": "ascii"}
ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")
CAPABILITIES = ["SORT"] + [f"THREAD={a}" for a in ALGORITHMS]


def _charset(tok: Token) -> str:
    if not isinstance(tok, (Atom, bytes, str)):
        raise BadCommand("charset expected")
    name = astring(tok).decode("ascii", "replace").lower()
    if name not in CHARSETS:
        raise No("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
    return "utf-8"  # US-ASCII is a subset: its strings read the same as UTF-8


def parse_criteria(tok: Token) -> list[tuple[str, bool]]:
    if not isinstance(tok, list) or not tok:
        raise BadCommand("SORT needs a parenthesised list of sort criteria")
    out: list[tuple[str, bool]] = []
    reverse = False
    for t in tok:
        word = t.upper() if isinstance(t, Atom) else ""
        if word == "REVERSE" and not reverse:
            reverse = True
            continue
        if word not in SORT_KEYS:
            raise BadCommand(f"unknown sort criterion {str(t)[:30]!r}")
        out.append((word, reverse))
        reverse = False
    if reverse:
        raise BadCommand("REVERSE must precede a sort criterion")
    return out


def _messages(s: Search, mask: int, numbers: Any) -> list[Msg]:
    """The messages of C{mask}, with their keys from the header index."""
    index, entry_of = s.entries()
    msgs: list[Msg] = []
    for i in bits_of(mask):
        e = entry_of[i]
        if e < 0:
            continue  # gone since the snapshot
        mtime, fields, _ = index.decoded(e)
        msgs.append((numbers[i], SortFields(*fields), mtime))
    return msgs


def sort_command(args: list[Token], snap: Snapshot, uid: bool) -> bytes:
    """
    The untagged SORT line (blocking: run in a worker). The whole folder's
    order for the criteria is kept (L{sortcache} on disk, and with the
    loaded header index) until the folder changes: a client that lists a
    folder sorts it again and again. The messages the keys match are
    picked from it.
    """
    if len(args) < 3:
        raise BadCommand("SORT needs sort criteria, a charset and search keys")
    criteria = parse_criteria(args[0])
    charset = _charset(args[1])
    node = parse_search(list(args[2:]), charset)
    s = Search(snap)
    try:
        mask = s.eval(simplify(node), s.full)
        kept = sortcache.key_of(criteria, s.rels)
        order = sortcache.lookup(snap.path, kept, len(s.rels))
        if order is None:
            order = _folder_order(s, criteria)
            sortcache.store(snap.path, kept, order)
        numbers = s.uids if uid else s.seqs
        if mask != s.full:
            wanted = set(bits_of(mask))
            order = [i for i in order if i in wanted]
        return b"* SORT" + b"".join(b" %d" % numbers[i] for i in order) + b"\r\n"
    finally:
        s.close()


def _folder_order(s: Search, criteria: list[tuple[str, bool]]) -> list[int]:
    """The whole folder's order (positions) for C{criteria}, from the header index."""
    index, entry_of = s.entries()
    key = ("sort", tuple(criteria))
    order = index.memo.get(key)
    if order is None:
        # positions in the folder stand for the numbers: both grow with it
        msgs: list[Msg] = []
        for i, e in enumerate(entry_of):
            if e >= 0:
                mtime, fields, _ = index.decoded(e)
                msgs.append((i, fields, mtime))
        sizes = dict(enumerate(s.sizes())) if any(k == "SIZE" for k, _ in criteria) else {}
        order = sort_numbers(msgs, criteria, sizes)
        index.remember(key, order)
    return order


def thread_command(args: list[Token], snap: Snapshot, uid: bool) -> bytes:
    """
    The untagged THREAD line (blocking: run in a worker). The answer over
    the whole folder (search key ALL, what clients send) is kept on disk
    with the SORT orders until the folder changes.
    """
    if len(args) < 3:
        raise BadCommand("THREAD needs an algorithm, a charset and search keys")
    algorithm = args[0].upper() if isinstance(args[0], Atom) else ""
    if algorithm not in ALGORITHMS:
        raise BadCommand("unknown threading algorithm")
    charset = _charset(args[1])
    node = parse_search(list(args[2:]), charset)
    s = Search(snap)
    try:
        mask = s.eval(simplify(node), s.full)
        numbers = s.uids if uid else s.seqs
        kept = sortcache.thread_key(algorithm, s.rels, numbers) if mask == s.full and s.n else None
        threads = sortcache.lookup_bytes(snap.path, kept) if kept else None
        if threads is None:
            msgs = _messages(s, mask, numbers)
            threads = render(references(msgs) if algorithm == "REFERENCES" else ordered_subject(msgs))
            if kept:
                sortcache.store_bytes(snap.path, kept, threads)
    finally:
        s.close()
    return b"* THREAD" + (b" " + threads if threads else b"") + b"\r\n"


class SortCommands(SelectedView):
    """SORT and THREAD on the selected folder (state in L{SessionCore})."""

    def _snapshot(self) -> Snapshot:
        folder = self.folder
        assert folder is not None
        return Snapshot(folder.path, self.view, folder.uids, folder.names, folder.sizes,
                        self.recent, folder.keywords)

    def do_SORT(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        d = self.factory.blocking.run(sort_command, list(args), self._snapshot(), uid)
        return d.addCallback(self._answer, "UID SORT" if uid else "SORT")

    def do_THREAD(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        d = self.factory.blocking.run(thread_command, list(args), self._snapshot(), uid)
        return d.addCallback(self._answer, "UID THREAD" if uid else "THREAD")

    def _answer(self, line: bytes, name: str) -> Any:
        self.send(line)
        return f"OK {name} completed"
