# -*- test-case-name: tests.test_imap_fetch_meta -*-
"""
FETCH of index-only items (UID, FLAGS, RFC822.SIZE, MODSEQ, and ENVELOPE
and INTERNALDATE from the folder's FETCH cache or header index) a column
at a time.

A client listing a large folder (Thunderbird, mbsync, an IMAP library's
C{FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)}) asks for these over every
message. Built a row at a time (a tuple per message on the reactor, every
item of every row through one loop of tests), 100,000 rows cost more than
Dovecot's whole answer. Here the reactor hands the worker a chunk as
slices of the folder's UID array and name list (C-level copies, nothing
per message) where the session's view matches the folder, and the worker
renders each item for the whole chunk in one comprehension: flag lists
once per distinct flag combination, sizes from the names, ENVELOPE and
INTERNALDATE looked up by base name. When some message of a chunk is in
neither the cache nor the index, the chunk goes the general way
(L{fetch.render_rows}: the file is read and what it gives is learnt).
"""

from __future__ import annotations

import bisect
import re
from array import array
from typing import Any, Iterator, Sequence

from twisted_mail_screen.protocols.imap.fetch import CACHED, META, Att, Cache, Row, flags_item, render_rows
from twisted_mail_screen.protocols.imap.headerindex import indexed_list
from twisted_mail_screen.protocols.imap.parse import format_datetime

#: Rows per chunk: about 0.6 MB of response and a few ms of rendering; fewer
#: hand-overs between the reactor and the worker than the general path's 500.
CHUNK_ROWS = 2000
_W_SIZE = re.compile(r",W=([0-9]+)(?=,|$)")  # as maildir_names.size_field(name, "W"), on a base name


class Columns:
    """A chunk of FETCH rows as parallel sequences (sequence numbers, UIDs, names)."""

    __slots__ = ("seqs", "uids", "rels", "sizes", "recent")

    def __init__(self, seqs: Sequence[int], uids: "array[int]", rels: list[str],
                 sizes: dict[int, int], recent: set[int]) -> None:
        self.seqs = seqs
        self.uids = uids
        self.rels = rels
        self.sizes = sizes  # of the messages whose names carry no W= size
        self.recent = recent  # the chunk's \\Recent UIDs for the session

    def __len__(self) -> int:
        return len(self.uids)

    def rows(self) -> list[Row]:
        """The same chunk as L{fetch.render_rows} takes it."""
        sizes, recent = _sizes(self), self.recent
        return [(s, u, r, z, u in recent) for s, u, r, z in zip(self.seqs, self.uids, self.rels, sizes)]


def index_only(atts: Sequence[Att]) -> bool:
    """Whether every item can come from the folder index, its cache or the header index."""
    return all(isinstance(a, str) and (a in META or a in CACHED) for a in atts)


def column_chunks(ranges: list[tuple[int, int]], view: "array[int]", folder: Any, recent: set[int],
                  per_chunk: int, first: int | None = None) -> Iterator[Columns]:
    """
    The view positions of C{ranges} in chunks of at most C{per_chunk}
    messages (the first of at most C{first}: it may be rendered on the
    reactor), one chunk per step on the reactor thread, from the
    C{folder}'s index as it is then: C-level slices where the view's UIDs
    are the folder's at the same positions, else a look-up per message (a
    message the folder no longer has is left out).
    """
    size = min(per_chunk, first or per_chunk)
    seqs: list[int] = []
    got = array("L")
    rels: list[str] = []
    for lo, hi in ranges:
        at = lo
        while at < hi:
            end = min(hi, at + size - len(got))
            part = view[at:end]
            uids, names = folder.uids, folder.names
            if end <= len(uids) and uids[at:end] == part:
                seqs += range(at + 1, end + 1)
                got += part
                rels += names[at:end]
            else:  # expunges not yet announced to this session: positions differ
                for i, uid in enumerate(part, at):
                    j = bisect.bisect_left(uids, uid)
                    if j < len(uids) and uids[j] == uid:
                        seqs.append(i + 1)
                        got.append(uid)
                        rels.append(names[j])
            at = end
            if len(got) >= size:
                yield _columns(seqs, got, rels, folder.sizes, recent)
                seqs, got, rels, size = [], array("L"), [], per_chunk
    if len(got):
        yield _columns(seqs, got, rels, folder.sizes, recent)


def _columns(seqs: list[int], uids: "array[int]", rels: list[str], sizes: dict[int, int],
             recent: set[int]) -> Columns:
    # Only the few unsized or \\Recent messages are looked at one by one.
    return Columns(seqs, uids, rels, {u: sizes[u] for u in uids if u in sizes} if sizes else {},
                   recent.intersection(uids) if recent else set())


def _sizes(cols: Columns, bases: list[str] | None = None) -> list[int]:
    search = _W_SIZE.search
    sizes = cols.sizes
    if bases is None:
        bases = _bases(cols.rels)
    return [int(m.group(1)) if (m := search(b)) else sizes.get(u, 0) for b, u in zip(bases, cols.uids)]


def _bases(rels: list[str]) -> list[str]:
    """The base names (no C{cur/}, no flags: they may not be read as sizes)."""
    return [r.partition(":")[0][4:] for r in rels]


def render_meta(path: str, cols: Columns, atts: Sequence[Att], keywords: list[str],
                cache: Cache | None, use_index: bool = True) -> bytes | None:
    """
    The C{* n FETCH (...)} lines of C{cols} for index-only C{atts}, or
    C{None} when some ENVELOPE or INTERNALDATE is in neither C{cache} nor
    (with C{use_index}; worker thread only) the header index.
    """
    want_env, want_date = "ENVELOPE" in atts, "INTERNALDATE" in atts
    found: list[Any] = []
    bases = _bases(cols.rels) if want_env or want_date or "RFC822.SIZE" in atts else []
    if want_env or want_date:
        entries = cache.entries if cache is not None else {}
        found = [entries.get(b) for b in bases]
        lacking = [k for k, e in enumerate(found)
                   if e is None or (want_env and e[0] is None) or (want_date and e[1] is None)]
        if lacking:
            if not use_index:
                return None
            indexed = indexed_list(path, [bases[k] for k in lacking])
            for k, known in zip(lacking, indexed):
                if known is None or (want_env and known[0] is None):
                    return None
                found[k] = known
    columns: list[list[bytes]] = []
    for att in atts:
        if att == "UID":
            columns.append([b"UID %d" % u for u in cols.uids])
        elif att == "FLAGS":
            infos = [r.partition(":2,")[2] for r in cols.rels]
            table = {i: flags_item("x:2," + i, keywords, False) for i in set(infos)}
            if cols.recent:
                with_recent = {i: flags_item("x:2," + i, keywords, True) for i in set(infos)}
                recent = cols.recent
                columns.append([with_recent[i] if u in recent else table[i] for i, u in zip(infos, cols.uids)])
            else:
                columns.append([table[i] for i in infos])
        elif att == "RFC822.SIZE":
            columns.append([b"RFC822.SIZE %d" % z for z in _sizes(cols, bases)])
        elif att == "MODSEQ":
            modseqs = att.table  # type: ignore[attr-defined]
            columns.append([b"MODSEQ (%d)" % modseqs.get(u, 0) for u in cols.uids])
        elif att == "ENVELOPE":
            columns.append([b"ENVELOPE " + (e[0] or b"NIL") for e in found])
        elif att == "INTERNALDATE":
            columns.append([b'INTERNALDATE "%s"' % format_datetime(e[1] or 0).encode() for e in found])
    return b"".join([b"* %d FETCH (%s)\r\n" % (s, b" ".join(items))
                     for s, items in zip(cols.seqs, zip(*columns))])


def render_columns(path: str, cols: Columns, atts: Sequence[Att], keywords: list[str],
                   cache: Cache | None) -> tuple[bytes, dict[str, list[Any]]]:
    """L{render_meta} in a worker thread, else the general way (files read, learnt for the cache)."""
    out = render_meta(path, cols, atts, keywords, cache)
    if out is not None:
        return out, {}
    return render_rows(path, cols.rows(), atts, keywords, cache)
