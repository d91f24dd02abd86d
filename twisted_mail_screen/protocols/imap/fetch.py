# -*- test-case-name: tests.test_imap -*-
"""
FETCH responses, rendered a bounded chunk of messages at a time.

A row is C{(seq, uid, rel, size, recent)}: everything the folder index
knows. Items that need only the row (FLAGS, UID, RFC822.SIZE) are rendered
without touching the disk. INTERNALDATE needs a C{stat} and ENVELOPE the
header block, but both are kept in the folder's bounded L{Cache} once
computed, so a client that asks again (or a sync client listing a folder
every few minutes) is answered from memory, on the reactor, without a
thread hop. Header-only items (ENVELOPE, RFC822.HEADER, BODY[HEADER...])
read only the start of a file; the rest read the whole file, once per
message, in a worker thread.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

from twisted_mail_screen.protocols.imap.message import Part, envelope, literal, section_response, to_crlf
from twisted_mail_screen.protocols.imap.flags import base_of, find_file, flag_names
from twisted_mail_screen.protocols.imap.headerindex import indexed_headers
from twisted_mail_screen.protocols.imap.parse import BadCommand, Section, format_datetime

Row = tuple[int, int, str, int, bool]
Att = Union[str, Section]

META = {"UID", "FLAGS", "RFC822.SIZE", "MODSEQ"}  # MODSEQ: a modseq.ModSeqItem carrying its table
CACHED = {"INTERNALDATE", "ENVELOPE"}
HEADER_ATTS = {"ENVELOPE", "RFC822.HEADER"}
HEADER_READ = 64 * 1024  # a header-only read starts with this much of the file


#: Distinct items in one FETCH; more is answered BAD. Real clients ask for
#: about ten (Thunderbird's header fetch is the longest seen).
MAX_FETCH_ITEMS = 64
#: Octets of response rendered per piece: a chunk of messages, or for one
#: large message asked for several times over, a group of its items.
PIECE_BYTES = 4 * 1024 * 1024
_SMALL_ITEM = 256  # what a UID, FLAGS, size, date or cached ENVELOPE item costs at most, roughly


def distinct_atts(atts: Sequence[Att]) -> list[Att]:
    """
    C{atts} with each item kept once, as Dovecot answers them: RFC 3501
    asks for each data item, not each mention, and C{BODY.PEEK[]} x100
    would otherwise send a message 100 times from one command. Of two
    spellings of one section (C{BODY[]}, C{BODY.PEEK[]}) the one without
    C{.PEEK} is kept, where the first stood: it sets C{\\Seen}.
    """
    seen: dict[object, Att] = {}
    for a in atts:
        key = ("section", a.label, a.partial) if isinstance(a, Section) else a
        had = seen.setdefault(key, a)
        if isinstance(had, Section) and had.peek and not a.peek:  # type: ignore[union-attr]
            seen[key] = a
    if len(seen) > MAX_FETCH_ITEMS:
        raise BadCommand(f"more than {MAX_FETCH_ITEMS} distinct FETCH items")
    return list(seen.values())


def item_cost(att: Att, size: int) -> int:
    """An upper estimate of the octets C{att} adds for a message of C{size} (LF may become CRLF)."""
    if isinstance(att, str):
        if att in META or att in CACHED:
            return _SMALL_ITEM
        if att == "RFC822.HEADER":
            return min(2 * size, HEADER_READ)
        return 2 * size
    if _header_only(att):
        return min(2 * size, HEADER_READ)
    if att.partial is not None:
        return min(2 * size, att.partial[1]) + _SMALL_ITEM
    return 2 * size + _SMALL_ITEM


def row_cost(atts: Sequence[Att], size: int) -> int:
    return sum(item_cost(a, size) for a in atts)


def item_groups(atts: Sequence[Att], size: int) -> list[list[Att]]:
    """C{atts} cut into groups of at most L{PIECE_BYTES} each (a single item may exceed it)."""
    groups: list[list[Att]] = [[]]
    used = 0
    for a in atts:
        cost = item_cost(a, size)
        if groups[-1] and used + cost > PIECE_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(a)
        used += cost
    return groups


def needs_disk(atts: Sequence[Att]) -> bool:
    return any(not isinstance(a, str) or a not in META for a in atts)


def _header_only(att: Att) -> bool:
    if isinstance(att, Section):
        return not att.path and att.text in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT")
    return att in HEADER_ATTS


def needs_body(atts: Sequence[Att]) -> bool:
    """Whether the whole file must be read (not just its header block, a stat, or the cache)."""
    return any(not isinstance(a, str) and not _header_only(a) or
               isinstance(a, str) and a not in META | CACHED | HEADER_ATTS for a in atts)


def needs_header(atts: Sequence[Att]) -> bool:
    """Whether some item other than ENVELOPE needs the header block."""
    return any(_header_only(a) and a != "ENVELOPE" for a in atts)


def flags_item(rel: str, keywords: list[str], recent: bool) -> bytes:
    names = flag_names(rel, keywords)
    if recent:
        names.append("\\Recent")
    return ("FLAGS (" + " ".join(names) + ")").encode("utf-8", "surrogateescape")


class Cache:
    """
    What FETCH learnt about a folder's messages, by Maildir base name:
    C{[ENVELOPE bytes or None, internal date or None]}. Message files never
    change (only their flags, which are not kept here), so entries stay
    valid; they are dropped when the message is expunged and, oldest first,
    when the registry's byte budget (shared by all folders) is used up.
    """

    ENTRY_OVERHEAD = 160

    def __init__(self, budget: "Budget") -> None:
        self.entries: dict[str, list[Any]] = {}
        self.budget = budget
        self.used = 0
        self.released = False

    def get(self, base: str) -> list[Any] | None:
        return self.entries.get(base)

    def learn(self, learned: dict[str, list[Any]]) -> None:
        if self.released:  # the folder was forgotten while a chunk was being rendered
            return
        for base, (env, mtime) in learned.items():
            entry = self.entries.get(base)
            if entry is None:
                cost = self.ENTRY_OVERHEAD + (len(env) if env else 0)
                self.entries[base] = [env, mtime]
                self.used += cost
                self.budget.used += cost
                continue
            if env is not None and entry[0] is None:
                entry[0] = env
                self.used += len(env)
                self.budget.used += len(env)
            if mtime is not None:
                entry[1] = mtime
        if self.budget.used > self.budget.limit:
            self.budget.shrink(self)

    def drop(self, bases: Sequence[str]) -> None:
        for base in bases:
            entry = self.entries.pop(base, None)
            if entry is not None:
                cost = self.ENTRY_OVERHEAD + (len(entry[0]) if entry[0] else 0)
                self.used -= cost
                self.budget.used -= cost

    def evict_oldest(self, goal: int) -> None:
        """Forget the oldest entries until the budget is down to C{goal}."""
        victims = []
        freed = 0
        for base, entry in self.entries.items():
            if self.budget.used - freed <= goal:
                break
            victims.append(base)
            freed += self.ENTRY_OVERHEAD + (len(entry[0]) if entry[0] else 0)
        self.drop(victims)

    def clear(self) -> None:
        self.drop(list(self.entries))


class Budget:
    """The byte budget of every folder's L{Cache} in one registry."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.caches: "list[Cache]" = []

    def cache(self) -> Cache:
        c = Cache(self)
        self.caches.append(c)
        return c

    def release(self, cache: Cache) -> None:
        cache.clear()
        cache.released = True
        if cache in self.caches:
            self.caches.remove(cache)

    def shrink(self, growing: Cache) -> None:
        goal = self.limit * 3 // 4
        for c in [x for x in self.caches if x is not growing] + [growing]:
            if self.used <= goal:
                return
            c.evict_oldest(goal)


def cached_rows(rows: Sequence[Row], atts: Sequence[Att], cache: Cache | None) -> bool:
    """Whether C{rows} can be rendered from the index and C{cache} alone (no file access)."""
    if needs_body(atts) or needs_header(atts):
        return False
    want_env = "ENVELOPE" in atts
    want_date = "INTERNALDATE" in atts
    if not (want_env or want_date):
        return True
    if cache is None:
        return False
    entries = cache.entries
    for row in rows:
        entry = entries.get(base_of(row[2]))
        if entry is None or (want_env and entry[0] is None) or (want_date and entry[1] is None):
            return False
    return True


def _read_whole(name: str) -> tuple[bytes, float]:
    """
    A whole file and its mtime in four system calls (open, fstat, read,
    close): a buffered C{open().read()} adds an C{isatty} ioctl, a seek and
    a second read, which at thousands of small messages per FETCH show.
    """
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        data = os.read(fd, st.st_size + 1)
        if len(data) > st.st_size:  # grew since the fstat: read to the end
            more = [data]
            while True:
                got = os.read(fd, 1 << 20)
                if not got:
                    break
                more.append(got)
            data = b"".join(more)
        return data, st.st_mtime
    finally:
        os.close(fd)


def read_message(path: str, rel: str, whole: bool, want_stat: bool) -> tuple[str, bytes | None, float | None]:
    """Open a message (following a rename by another session): its name, data and mtime."""
    for attempt in range(2):
        try:
            if whole:
                data, got = _read_whole(path + os.sep + rel)
                return rel, data, got if want_stat else None
            with open(os.path.join(path, rel), "rb") as f:
                mtime = os.fstat(f.fileno()).st_mtime if want_stat else None
                data = f.read(HEADER_READ)
                while len(data) % HEADER_READ == 0 and data and b"\n\n" not in data \
                        and b"\n\r\n" not in data:
                    more = f.read(HEADER_READ)
                    if not more:
                        break
                    data += more
                return rel, data, mtime
        except FileNotFoundError:
            if attempt:
                break
            found = find_file(path, rel)
            if found is None:
                break
            rel = found
    return rel, None, None


def render_rows(path: str, rows: Sequence[Row], atts: Sequence[Att], keywords: list[str],
                cache: Cache | None = None, head: bool = True,
                tail: bool = True) -> tuple[bytes, dict[str, list[Any]]]:
    """
    C{* n FETCH (...)} lines for C{rows} (vanished files are left out), and
    what was learnt for the cache (apply it with L{Cache.learn} on the
    reactor; this may run in a worker thread and only reads C{cache}).

    Without C{head} (or C{tail}) the one row's line is continued from (or
    continued by) another call: its items only, after a space.
    """
    out: list[bytes] = []  # joined once at the end: a body is copied once, not per item and line
    learned: dict[str, list[Any]] = {}
    whole = needs_body(atts)
    header = needs_header(atts)
    want_env = "ENVELOPE" in atts
    want_date = "INTERNALDATE" in atts
    entries = cache.entries if cache is not None else {}
    # Each item's kind worked out once per chunk, not per row: a Section compared
    # with each item name is a Python-level __eq__ per test.
    names = [a if isinstance(a, str) else None for a in atts]
    whole_sections = [isinstance(a, Section) and not a.path and not a.text and a.partial is None
                      for a in atts]
    # Only whole messages asked for: no MIME structure to build.
    need_part = want_env or header or any(n is None and not w or n is not None and n not in
                                          META and n not in CACHED and n != "RFC822"
                                          for n, w in zip(names, whole_sections))
    # ENVELOPE and INTERNALDATE alone: the header index's, where it has them, not the files
    # (only when some are not cached: a chunk rendered on the reactor never opens the index)
    # a row's base name once (it keys the cache, the index and what is learnt; a rename keeps it)
    bases = [base_of(r[2]) for r in rows] if want_env or want_date else [""] * len(rows)
    unknown = [b for b in bases if b not in entries] \
        if (want_env or want_date) and not (whole or header) else []
    indexed = indexed_headers(path, unknown) if unknown else {}
    for (seq, uid, rel, size, recent), base in zip(rows, bases):
        env: bytes | None = None
        mtime: float | None = None
        entry = None
        if want_env or want_date:
            entry = entries.get(base)
            if entry is not None:
                env, mtime = entry
        data: bytes | None = None
        root: Part | None = None
        known = indexed.get(base) if indexed else None
        if known is not None and (known[0] is not None or not want_env) and \
                ((want_env and env is None) or (want_date and mtime is None)):
            env = env if env is not None or not want_env else known[0]
            mtime = known[1]
            learned[base] = [env if want_env else None, mtime]
        elif whole or header or (want_env and env is None) or (want_date and mtime is None):
            rel, data, got = read_message(path, rel, whole, want_date and mtime is None)
            if data is None:
                if head and tail:
                    continue
                data = b""  # vanished between two pieces of its line: the line still closes
            data = to_crlf(data)
            root = Part(data, 0, len(data)) if need_part else None
            if got is not None:
                mtime = got
            if want_env and env is None:
                env = envelope(root.fields)
            if got is not None or (want_env and (entry is None or entry[0] is None)):
                learned[base] = [env if want_env else None, got]
        items: list[bytes | tuple[bytes, bytes]] = []  # a tuple: a literal's prefix and its octets
        for att, name, whole_section in zip(atts, names, whole_sections):
            if name == "UID":
                items.append(b"UID %d" % uid)
            elif name == "FLAGS":
                items.append(flags_item(rel, keywords, recent))
            elif name == "MODSEQ":
                items.append(b"MODSEQ (%d)" % att.table.get(uid, 0))  # type: ignore[union-attr]
            elif name == "RFC822.SIZE":
                items.append(b"RFC822.SIZE %d" % (len(data) if whole and data is not None else size))
            elif name == "INTERNALDATE":
                items.append(b'INTERNALDATE "' + format_datetime(mtime or 0).encode() + b'"')
            elif name == "ENVELOPE":
                items.append(b"ENVELOPE " + (env or b"NIL"))
            elif data is None:
                continue
            elif whole_section:
                items.append((b"%s {%d}\r\n" % (att.label.encode(), len(data)), data))  # type: ignore[union-attr]
            elif name == "RFC822":
                items.append((b"RFC822 {%d}\r\n" % len(data), data))
            elif root is None:
                continue
            elif name == "BODYSTRUCTURE":
                items.append(b"BODYSTRUCTURE " + root.structure(True))
            elif name == "BODY":
                items.append(b"BODY " + root.structure(False))
            elif name == "RFC822.HEADER":
                items.append(b"RFC822.HEADER " + literal(root.header_bytes()))
            elif name == "RFC822.TEXT":
                items.append(b"RFC822.TEXT " + literal(root.body_bytes()))
            elif isinstance(att, Section):
                items.append(section_response(root, att))
        out.append(b"* %d FETCH (" % seq if head else b" ")
        for i, item in enumerate(items):
            if i:
                out.append(b" ")
            if isinstance(item, tuple):
                out += item
            else:
                out.append(item)
        if tail:
            out.append(b")\r\n")
    return b"".join(out), learned


def chunk_rows(rows: list[Row], atts: Sequence[Att]) -> int:
    """How many rows to render per chunk: bounded work and memory."""
    if not needs_disk(atts):
        return 500  # rows are gathered on the reactor: a few ms a chunk
    if not needs_body(atts):
        return 500
    return 200


__all__ = ["distinct_atts", "row_cost", "item_groups", "PIECE_BYTES", "MAX_FETCH_ITEMS",
           "render_rows", "needs_disk", "needs_body", "needs_header", "flags_item", "chunk_rows",
           "find_file", "read_message", "cached_rows", "Cache", "Budget", "Row"]
