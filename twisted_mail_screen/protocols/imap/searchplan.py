# -*- test-case-name: tests.test_reactor_budget -*-
"""
SEARCH over a whole folder at bounded cost.

The parsed key tree is simplified first (nested ANDs flattened, repeated
keys kept once, C{OR x x} and C{NOT NOT x} reduced), so C{UNSEEN} sent
3,000 times is one key. Keys that need only the folder index (flags,
sequence numbers, UIDs, sizes, \\Recent) are then evaluated as set
operations on bit masks over the messages: a flag key ORs together the
messages of each distinct flag combination (a folder has few), a
sequence set becomes a mask through its ranges, and AND, OR and NOT are
big-integer operations. Only the keys that need a message's file (header,
text and date keys) are evaluated message by message, and only on the
messages the cheaper keys left, one message's data in memory at a time.

The index is copied on the reactor (C-level copies); everything else runs
in the worker pool, so the reactor never pays for a search.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Any, Iterable, Sequence

from twisted_mail_screen.protocols.imap.fetch import read_message
from twisted_mail_screen.protocols.imap.flags import FLAG_LETTERS, info_of, size_of_name
from twisted_mail_screen.protocols.imap.headerindex import HeaderIndex, open_index, prepare
from twisted_mail_screen.protocols.imap.parse import Token
from twisted_mail_screen.protocols.imap.search import Candidate, Node, evaluate, needs, parse_search

def node_key(node: Node) -> Any:
    """A hashable identity for a key tree (sequence sets by their ranges)."""
    kind = node[0]
    if kind in ("uid", "seq"):
        return (kind, tuple(node[1].ranges))
    if kind == "and":
        return ("and", tuple(node_key(c) for c in node[1]))
    if kind == "or":
        return ("or", node_key(node[1]), node_key(node[2]))
    if kind == "not":
        return ("not", node_key(node[1]))
    return node


def simplify(node: Node) -> Node:
    kind = node[0]
    if kind == "and":
        kept: dict[Any, Node] = {}
        for child in node[1]:
            c = simplify(child)
            for x in (c[1] if c[0] == "and" else (c,)):
                if x[0] != "all":
                    kept.setdefault(node_key(x), x)
        if not kept:
            return ("all",)
        if len(kept) == 1:
            return next(iter(kept.values()))
        return ("and", tuple(kept.values()))
    if kind == "or":
        a, b = simplify(node[1]), simplify(node[2])
        if a[0] == "all" or b[0] == "all":
            return ("all",)
        return a if node_key(a) == node_key(b) else ("or", a, b)
    if kind == "not":
        c = simplify(node[1])
        return c[1] if c[0] == "not" else ("not", c)
    return node


def mask_of(indices: Iterable[int], n: int) -> int:
    """The bit mask with the given bits set (linear in C{n}, unlike OR-ing C{1 << i})."""
    digits = bytearray(b"0" * n)
    for i in indices:
        digits[n - 1 - i] = 0x31
    return int(digits, 2) if n else 0


def bits_of(mask: int) -> list[int]:
    text = bin(mask)[:1:-1]
    out = []
    i = text.find("1")
    while i >= 0:
        out.append(i)
        i = text.find("1", i + 1)
    return out


class Snapshot:
    """What a search needs of a folder and a session's view, copied on the reactor."""

    def __init__(self, path: str, view: "array[int]", uids: "array[int]", names: list[str],
                 sizes: dict[int, int], recent: set[int], keywords: list[str]) -> None:
        self.path = path
        self.view = array("L", view)
        self.uids = array("L", uids)
        self.names = list(names)
        self.sizes = dict(sizes)
        self.recent = set(recent)
        self.keywords = list(keywords)


class Search:
    """One search's evaluation over a L{Snapshot} (in a worker thread)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        seqs: list[int] | range
        folder_uids, names = snap.uids, snap.names
        if snap.view == folder_uids:  # the session has seen every change: no lookups
            seqs, uids, rels = range(1, len(names) + 1), list(folder_uids), names
        else:
            seqs, uids, rels = [], [], []
            for i, u in enumerate(snap.view):
                j = bisect.bisect_left(folder_uids, u)
                if j < len(folder_uids) and folder_uids[j] == u:
                    seqs.append(i + 1)
                    uids.append(u)
                    rels.append(names[j])
        self.seqs, self.uids, self.rels = seqs, uids, rels
        self.n = len(seqs)
        self.full = (1 << self.n) - 1
        self.max_seq = len(snap.view)
        self.max_uid = snap.view[-1] if len(snap.view) else 0
        self._memo: dict[Any, int] = {}
        self._groups: dict[str, int] | None = None
        self._sizes: list[int] | None = None
        self._index: HeaderIndex | None = None
        self._entries: list[int] = []

    def run(self, node: Node) -> list[tuple[int, int]]:
        mask = self.eval(simplify(node), self.full)
        return [(self.seqs[i], self.uids[i]) for i in bits_of(mask)]

    # cheap keys: masks over the whole folder, computed once per distinct key

    def sizes(self) -> list[int]:
        if self._sizes is None:
            got = self.snap.sizes
            self._sizes = [s if (s := size_of_name(rel)) is not None else got.get(u, 0)
                           for u, rel in zip(self.uids, self.rels)]
        return self._sizes

    def flag_mask(self, flag: str) -> int:
        if self._groups is None:
            groups: dict[str, list[int]] = {}
            for i, rel in enumerate(self.rels):
                groups.setdefault(info_of(rel), []).append(i)
            self._groups = {info: mask_of(idx, self.n) for info, idx in groups.items()}
        lowered = flag.lower()
        letter = FLAG_LETTERS.get(lowered)
        if letter is None:
            keywords = [k.lower() for k in self.snap.keywords]
            if lowered not in keywords or keywords.index(lowered) >= 26:
                return 0
            letter = chr(97 + keywords.index(lowered))
        out = 0
        for info, m in self._groups.items():
            if letter in info:
                out |= m
        return out

    def range_mask(self, values: list[int], node: Node, star: int) -> int:
        digits = bytearray(b"0" * self.n)
        n = self.n
        for a, b in node[1].resolve(star):
            lo, hi = bisect.bisect_left(values, a), bisect.bisect_right(values, b)
            if lo < hi:
                digits[n - hi:n - lo] = b"1" * (hi - lo)
        return int(digits, 2) if n else 0

    def leaf(self, node: Node) -> int:
        key = node_key(node)
        mask = self._memo.get(key)
        if mask is not None:
            return mask
        kind = node[0]
        if kind == "flag":
            has = self.flag_mask(node[1])
            mask = has if node[2] else self.full & ~has
        elif kind == "recent":
            recent = self.snap.recent
            has = mask_of((i for i, u in enumerate(self.uids) if u in recent), self.n)
            mask = has if node[1] else self.full & ~has
        elif kind == "size":
            larger, limit = node[1], node[2]
            mask = mask_of((i for i, s in enumerate(self.sizes())
                            if (s > limit if larger else s < limit)), self.n)
        elif kind == "uid":
            mask = self.range_mask(self.uids, node, self.max_uid)
        elif kind == "seq":
            mask = self.range_mask(self.seqs, node, self.max_seq)
        else:
            raise AssertionError(kind)
        self._memo[key] = mask
        return mask

    # the tree

    def eval(self, node: Node, within: int) -> int:
        if not within:
            return 0
        kind = node[0]
        if kind == "all":
            return within
        if needs(node) and kind != "and":
            return self.per_message((node,), within)
        if kind == "and":
            cheap = [c for c in node[1] if not needs(c)]
            costly = [c for c in node[1] if needs(c)]
            for c in cheap:
                within = self.eval(c, within)
                if not within:
                    return 0
            return self.per_message(costly, within) if costly else within
        if kind == "or":
            a = self.eval(node[1], within)
            return a | self.eval(node[2], within & ~a)
        if kind == "not":
            return within & ~self.eval(node[1], within)
        return self.leaf(node) & within

    def entries(self) -> tuple[HeaderIndex, list[int]]:
        """The folder's header index (locked until the search ends) and each message's entry."""
        if self._index is None:
            index = open_index(self.snap.path)
            index.lock.acquire()
            self._index = index
            prepare(index)
            self._entries = index.ensure(self.snap.path, self.rels, read_message)
        return self._index, self._entries

    def close(self) -> None:
        if self._index is not None:
            self._index.lock.release()
            self._index = None

    def per_message(self, nodes: Sequence[Node], within: int) -> int:
        """
        The messages of C{within} that match every one of C{nodes}. Header
        blocks come from the header index, whose text narrows a header
        key's candidates before any parsing; other keys read the files.
        """
        snap, keep = self.snap, []
        headers_only = all(needs(n) <= {"header"} for n in nodes)
        index: HeaderIndex | None = None
        if headers_only:
            index, entry_of = self.entries()
            for n in nodes:
                if n[0] == "header" and n[2]:
                    hits = index.hits(n[2])
                    within &= mask_of((i for i, e in enumerate(entry_of) if e < 0 or e in hits), self.n)
        for i in bits_of(within):
            rel, u = self.rels[i], self.uids[i]
            size = s if (s := size_of_name(rel)) is not None else snap.sizes.get(u, 0)
            c = Candidate(snap.path, self.seqs[i], u, rel, size, u in snap.recent, snap.keywords)
            if index is not None and entry_of[i] >= 0:
                c.preload(index.block(entry_of[i]))
            if all(evaluate(n, c, self.max_seq, self.max_uid) for n in nodes):
                keep.append(i)
        return mask_of(keep, self.n)


def search(snap: Snapshot, node: Node) -> list[tuple[int, int]]:
    """The (seq, uid) of each message of the view that matches (blocking: run in a worker)."""
    s = Search(snap)
    try:
        return s.run(node)
    finally:
        s.close()


def search_command(args: list[Token], charset: str, snap: Snapshot, uid: bool) -> bytes:
    """
    Parse SEARCH's keys and answer them (blocking: run in a worker; a
    syntax error raises L{BadCommand}). Parsing is here too: 64 KiB of
    sequence sets is tens of ms of Python.
    """
    return search_response(snap, parse_search(args, charset), uid)


def search_response(snap: Snapshot, node: Node, uid: bool) -> bytes:
    """The untagged SEARCH line, numbers and all (blocking: run in a worker)."""
    found = search(snap, node)
    return b"* SEARCH" + b"".join(b" %d" % (u if uid else s) for s, u in found) + b"\r\n"
