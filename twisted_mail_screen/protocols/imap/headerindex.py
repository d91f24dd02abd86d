# -*- test-case-name: tests.test_imap_sort -*-
"""
A folder's header index: each message's header block, its internal date
and its SORT/THREAD keys, kept in one file beside the UID list
(C{mailscreen-headers}), so SEARCH FROM/TO/SUBJECT/HEADER, SORT and
THREAD read no message file once a message is indexed, also right after a
restart.

Entries are keyed by the Maildir base name, which flag changes do not
touch, so a STORE needs no update. Messages the index lacks (delivered,
appended, copied since) are read and appended when a search, SORT or
THREAD first needs them; entries of expunged messages are ignored and
dropped when the file is compacted (rewritten atomically: temp file,
fsync, rename) once they are as many as the live ones. An append cut
short by a crash leaves a torn last record, which loading drops before
rewriting the file; a file that is not an index at all is rebuilt.

The file is a cache of what the messages hold: losing it costs one read
of every header block, never a message. Loaded indexes stay in memory
(least recently used first out, C{MEMORY_LIMIT} bytes in all), each
checked against its file's size and inode at every use. Everything here
runs in the worker pool; one lock per folder orders its users.
"""

from __future__ import annotations

import bisect
import marshal
import os
import re
import struct
import threading
from collections import OrderedDict
from typing import Iterable, Sequence

from twisted_mail_screen.protocols.imap.fetch import read_message
from twisted_mail_screen.protocols.imap.flags import base_of
from twisted_mail_screen.protocols.imap.sortkeys import SortFields, fields_of
from twisted_mail_screen.runtime.atomic import write_atomically

FILENAME = "mailscreen-headers"
MAGIC = b"MSHI1\n"
#: header blocks larger than this are not copied into the index (their messages are read)
MAX_BLOCK = 256 * 1024
#: bytes of loaded indexes kept in memory across searches, all folders together
MEMORY_LIMIT = 256 * 1024 * 1024
_REC = struct.Struct("<III")
_BIG = 0xFFFFFFFF
_BLANK_LINE = re.compile(rb"^\r?\n|\n\r?\n")
_PLAIN = re.compile(rb"^[\x00-\x7f]*$")


class Entry:
    __slots__ = ("base", "mtime", "fields", "start", "end", "plain")

    def __init__(self, base: str, mtime: float, fields: SortFields, start: int, end: int,
                 plain: bool) -> None:
        self.base, self.mtime, self.fields = base, mtime, fields
        self.start, self.end = start, end  # in the index's blob; -1 when the block was too big
        self.plain = plain  # ASCII without encoded words: its text is its decoded text


class HeaderIndex:
    """One folder's loaded index (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self.entries: list[Entry] = []
        self.by_base: dict[str, int] = {}
        self.chunks: list[bytes] = []
        self.blob = b""
        self.blob_len = 0
        self.lowered: bytes | None = None
        self.starts: list[int] = []
        self.identity: tuple[int, int] | None = None
        self.unplain: set[int] = set()

    @property
    def file(self) -> str:
        return os.path.join(self.path, FILENAME)

    def memory(self) -> int:
        return self.blob_len * (2 if self.lowered is not None else 1) + 200 * len(self.entries)

    # the file

    def load(self) -> None:
        """Read the file; a torn tail is dropped, anything unreadable starts an empty index."""
        self._clear()
        try:
            with open(self.file, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        if not data.startswith(MAGIC):
            self._rewrite()
            return
        pos, good = len(MAGIC), True
        records = []
        while pos < len(data):
            if pos + _REC.size > len(data):
                good = False
                break
            nb, nm, nblock = _REC.unpack_from(data, pos)
            size = nb + nm + (0 if nblock == _BIG else nblock)
            body = pos + _REC.size
            if body + size > len(data):
                good = False
                break
            try:
                base = data[body:body + nb].decode("utf-8", "surrogateescape")
                mtime, values = marshal.loads(data[body + nb:body + nb + nm])
                fields = SortFields(*values)
            except (ValueError, TypeError, EOFError):
                good = False
                break
            block = None if nblock == _BIG else data[body + nb + nm:body + size]
            records.append((base, mtime, fields, block))
            pos = body + size
        self._add(records)
        if good:
            self._note_identity()
        else:
            self._rewrite()

    def _note_identity(self) -> None:
        try:
            st = os.stat(self.file)
            self.identity = (st.st_size, st.st_ino)
        except FileNotFoundError:
            self.identity = None

    def current(self) -> bool:
        try:
            st = os.stat(self.file)
        except FileNotFoundError:
            return False
        return self.identity == (st.st_size, st.st_ino)

    @staticmethod
    def _record(base: str, mtime: float, fields: SortFields, block: bytes | None) -> bytes:
        b = base.encode("utf-8", "surrogateescape")
        m = marshal.dumps((mtime, fields.as_tuple()))
        return _REC.pack(len(b), len(m), _BIG if block is None else len(block)) + b + m + (block or b"")

    def _rewrite(self) -> None:
        keep = [(e.base, e.mtime, e.fields, None if e.start < 0 else self.blob_at(e))
                for e in self.entries if e.start != -2]
        data = MAGIC + b"".join(self._record(*r) for r in keep)
        write_atomically(self.file, data)
        self._clear()
        self._add(keep)
        self._note_identity()

    def _append(self, records: list[tuple[str, float, SortFields, bytes | None]]) -> None:
        data = b"".join(self._record(*r) for r in records)
        exists = self.identity is not None and self.current()
        if not exists:
            self._add(records)
            self._rewrite()
            return
        # A cache: not fsync'd (a torn tail after a crash is dropped at load).
        fd = os.open(self.file, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self._add(records)
        self._note_identity()

    # memory

    def _add(self, records: Iterable[tuple[str, float, SortFields, bytes | None]]) -> None:
        for base, mtime, fields, block in records:
            if block is None:
                start = end = -1
                plain = False
            else:
                start = self.blob_len
                self.chunks.append(block)
                self.blob_len += len(block)
                end = self.blob_len
                plain = bool(_PLAIN.match(block)) and b"=?" not in block
            old = self.by_base.get(base)
            self.by_base[base] = len(self.entries)
            if old is not None:
                self.entries[old].start = self.entries[old].end = -2  # superseded
            if not plain:
                self.unplain.add(len(self.entries))
            self.entries.append(Entry(base, mtime, fields, start, end, plain))
            self.starts.append(start if start >= 0 else self.blob_len)
        self.lowered = None

    def _joined(self) -> bytes:
        if len(self.chunks) != 1 or len(self.blob) != self.blob_len:
            self.blob = b"".join(self.chunks)
            self.chunks = [self.blob]
        return self.blob

    def blob_at(self, e: Entry) -> bytes:
        return self._joined()[e.start:e.end]

    # what searches ask

    def ensure(self, path: str, rels: Sequence[str]) -> list[int]:
        """The entry of each message (C{rels} relative to the folder), indexing those missing."""
        out: list[int] = []
        missing: list[tuple[int, str]] = []
        get = self.by_base.get
        for i, rel in enumerate(rels):
            e = get(base_of(rel))
            out.append(-1 if e is None else e)
            if e is None:
                missing.append((i, rel))
        if missing:
            records = []
            for i, rel in missing:
                rel2, data, mtime = read_message(path, rel, False, True)
                if data is None:
                    continue  # gone: not indexed, its search reads it (and finds nothing)
                m = _BLANK_LINE.search(data)
                block = data[:m.end()] if m else data
                records.append((base_of(rel2), mtime or 0.0, fields_of(block),
                                block if len(block) <= MAX_BLOCK else None))
            if records:
                self._append(records)
        if missing or len(self.entries) > 2 * max(len(rels), 64):
            if len(self.entries) > 2 * max(len(rels), 64):
                self._rewrite_live(set(base_of(r) for r in rels))
            get = self.by_base.get
            out = [get(base_of(rel), -1) for rel in rels]
        return out

    def _rewrite_live(self, live: set[str]) -> None:
        """Compaction: only the entries of messages still present (and not superseded)."""
        self.entries = [e for e in self.entries if e.base in live and e.start != -2]
        self._rewrite()

    def block(self, entry: int) -> bytes | None:
        e = self.entries[entry]
        return None if e.start < 0 else self.blob_at(e)

    def hits(self, needle: str) -> set[int]:
        """
        The entries whose block may hold C{needle} (casefolded): those that
        contain it, ASCII case-insensitively, and those whose text must be
        decoded to tell (8-bit, encoded words, not stored).
        """
        out = set(self.unplain)
        try:
            raw = needle.encode("ascii")
        except UnicodeEncodeError:
            return out  # an ASCII block cannot hold it
        if self.lowered is None:
            self.lowered = self._joined().lower()
        lowered, starts = self.lowered, self.starts
        find = lowered.find
        at = find(raw)
        while at >= 0:
            i = bisect.bisect_right(starts, at) - 1
            e = self.entries[i]
            out.add(i)
            at = find(raw, max(e.end, at + 1)) if e.end > at else find(raw, at + 1)
        return out


_loaded: "OrderedDict[str, HeaderIndex]" = OrderedDict()
_registry_lock = threading.Lock()


def open_index(path: str) -> HeaderIndex:
    """The folder's index, loaded or reloaded when its file changed; hold its C{lock} while using it."""
    with _registry_lock:
        index = _loaded.pop(path, None)
        if index is None:
            index = HeaderIndex(path)
        _loaded[path] = index
        total = sum(x.memory() for x in _loaded.values())
        while total > MEMORY_LIMIT and len(_loaded) > 1:
            _, old = _loaded.popitem(last=False)
            total -= old.memory()
    return index


def prepare(index: HeaderIndex) -> None:
    """Bring a loaded index in step with its file (call with C{index.lock} held)."""
    if index.identity is None or not index.current():
        index.load()


def forget(path: str) -> None:
    with _registry_lock:
        _loaded.pop(path, None)
