# -*- test-case-name: tests.test_imap_sort -*-
"""
SORT and THREAD (RFC 5256), each also as a UID command. The session only
copies the folder's index (as SEARCH does); parsing, searching, reading
keys from the header index and ordering run in the worker pool.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from twisted_mail_screen.protocols.imap.core import No
from twisted_mail_screen.protocols.imap.parse import Atom, BadCommand, Token, astring
from twisted_mail_screen.protocols.imap.search import parse_search
from twisted_mail_screen.protocols.imap.searchplan import Search, Snapshot, bits_of, simplify
from twisted_mail_screen.protocols.imap.selected import SelectedView
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


def _matching(snap: Snapshot, keys: list[Token], charset: str, uid: bool,
              with_sizes: bool = False) -> tuple[list[Msg], dict[int, int]]:
    """The messages matching C{keys}, with their keys from the header index, and their sizes."""
    node = parse_search(keys, charset)
    s = Search(snap)
    try:
        mask = s.eval(simplify(node), s.full)
        index, entry_of = s.entries()
        numbers = s.uids if uid else s.seqs
        msgs: list[Msg] = []
        size_of: dict[int, int] = {}
        for i in bits_of(mask):
            e = entry_of[i]
            if e < 0:
                continue  # gone since the snapshot
            mtime, fields = index.decoded(e)
            msgs.append((numbers[i], fields, mtime))
        if with_sizes:
            sizes = s.sizes()
            size_of = {numbers[i]: sizes[i] for i in bits_of(mask)}
        return msgs, size_of
    finally:
        s.close()


def sort_command(args: list[Token], snap: Snapshot, uid: bool) -> bytes:
    """The untagged SORT line (blocking: run in a worker)."""
    if len(args) < 3:
        raise BadCommand("SORT needs sort criteria, a charset and search keys")
    criteria = parse_criteria(args[0])
    charset = _charset(args[1])
    msgs, sizes = _matching(snap, list(args[2:]), charset, uid,
                            any(k == "SIZE" for k, _ in criteria))
    numbers = sort_numbers(msgs, criteria, sizes)
    return b"* SORT" + b"".join(b" %d" % n for n in numbers) + b"\r\n"


def thread_command(args: list[Token], snap: Snapshot, uid: bool) -> bytes:
    """The untagged THREAD line (blocking: run in a worker)."""
    if len(args) < 3:
        raise BadCommand("THREAD needs an algorithm, a charset and search keys")
    algorithm = args[0].upper() if isinstance(args[0], Atom) else ""
    if algorithm not in ALGORITHMS:
        raise BadCommand("unknown threading algorithm")
    charset = _charset(args[1])
    msgs, _ = _matching(snap, list(args[2:]), charset, uid)
    roots = references(msgs) if algorithm == "REFERENCES" else ordered_subject(msgs)
    threads = render(roots)
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
