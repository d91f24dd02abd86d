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
import operator
import os
import re
import struct
import threading
from collections import OrderedDict
from itertools import compress
from typing import Any, Callable

from twisted_mail_screen.protocols.imap import headerdir
from twisted_mail_screen.protocols.imap.flags import base_of
from twisted_mail_screen.protocols.imap.message import Part, envelope, to_crlf
from twisted_mail_screen.protocols.imap.sortkeys import SortFields, fields_of
from twisted_mail_screen.runtime.atomic import write_atomically

FILENAME = "mailscreen-headers"
MAGIC = b"MSHI4\n"
#: header blocks larger than this are not copied into the index (their messages are read)
MAX_BLOCK = 256 * 1024
#: bytes of loaded indexes kept in memory across searches, all folders together
MEMORY_LIMIT = 256 * 1024 * 1024
#: results kept per folder until it changes (SORT orders, one per criteria list)
MEMO_ENTRIES = 8
_REC = struct.Struct("<IIIB")  # base, metadata and block lengths; block is plain text
_BIG = 0xFFFFFFFF
_BLANK_LINE = re.compile(rb"^\r?\n|\n\r?\n")
_PLAIN = re.compile(rb"^[\x00-\x7f]*$")
#: reads a message's header block: (path, rel, whole, want_stat) -> (rel, data, mtime)
Reader = Callable[[str, str, bool, bool], tuple[str, "bytes | None", "float | None"]]
_UNKNOWN = (0.0, SortFields(None, "", False, "", "", "", None, ()), None)


def _record(base: str, mtime: float, fields: SortFields | tuple, envelope_: bytes | None,
            block: bytes | None) -> bytes:
    b = base.encode("utf-8", "surrogateescape")
    # marshal version 2 writes no back-references, so records concatenate into one list
    m = marshal.dumps((float(mtime), tuple(fields), envelope_), 2)
    plain = block is not None and bool(_PLAIN.match(block)) and b"=?" not in block
    return _REC.pack(len(b), len(m), _BIG if block is None else len(block), plain) + b + m + (block or b"")


def _envelope_of(block: bytes) -> bytes:
    crlf = to_crlf(block)
    return envelope(Part(crlf, 0, len(crlf)).fields)


class HeaderIndex:
    """
    One folder's loaded index (see the module docstring). Its blob is the
    file's bytes (records and all) as read and appended, so an entry's
    block is a slice of it and one search of the lowered blob finds a
    string in every block at once.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        # One slot per entry in each list (parallel lists: loading makes no object per entry).
        self.bases: list[str] = []
        self._metas: list[bytes] | None = []
        self.meta_spans: tuple[Any, Any] | None = None  # (ends, lengths): metas not sliced yet
        self.ends: list[int] = []  # end of the block in the blob; -1 when not stored, -2 superseded
        self.decoded_list: list[tuple[float, SortFields]] = []
        self._by_base: dict[str, int] | None = {}
        self.chunks: list[bytes] = []
        self.blob = b""
        self.blob_len = 0
        self.lowered: bytes | None = None
        self.starts: list[int] = []
        self.identity: tuple[int, int] | None = None
        self.unplain: set[int] = set()
        self._last: tuple[list[str], list[int]] | None = None
        self.memo: dict[Any, Any] = {}  # results over the folder as last seen (SORT orders)

    @property
    def by_base(self) -> dict[str, int]:
        """Each base name's entry (built on first use after a restore: a mapped folder needs none)."""
        if self._by_base is None:
            # the last of a name's entries wins, as in the walk
            self._by_base = dict(zip(self.bases, range(len(self.bases))))
        return self._by_base

    @by_base.setter
    def by_base(self, value: dict[str, int] | None) -> None:
        self._by_base = value

    @property
    def metas(self) -> list[bytes]:
        """Each entry's metadata (sliced from the blob on first use after a restore: a search needs none)."""
        if self._metas is None:
            blob = self._joined()
            ends, lengths = self.meta_spans or ((), ())
            self._metas = [blob[e - n:e] for e, n in zip(ends, lengths)]
            self.meta_spans = None
        return self._metas

    @metas.setter
    def metas(self, value: list[bytes] | None) -> None:
        self._metas = value

    @property
    def file(self) -> str:
        return os.path.join(self.path, FILENAME)

    def memory(self) -> int:
        return self.blob_len * (2 if self.lowered is not None else 1) + 120 * len(self.bases)

    # the file

    def load(self) -> None:
        """Read the file; a torn tail is dropped, anything unreadable starts an empty index."""
        self._clear()
        try:
            with open(self.file, "rb") as f:
                data = f.read()
                ino = os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            return
        if not data.startswith(MAGIC):
            self._rewrite([])
            return
        good = headerdir.restore(self, data, ino)
        walked = len(self.bases)
        if good < len(data):
            good += self._parse(data[good:] if good else data, good)
        if good == len(data):
            self._note_identity()
            if len(self.bases) - walked >= headerdir.WRITE_AFTER:
                headerdir.save(self, data, ino)
        else:
            self._rewrite(self._live_records())

    def _parse(self, data: bytes, offset: int) -> int:
        """Add the records of C{data} (at C{offset} in the blob); how many octets were whole."""
        # The walk does only what needs a record's lengths (the slices, the
        # spans); names are decoded, mapped and flagged for the whole batch
        # by C loops after it: about half the Python work of the first
        # search after a restart.
        pos = len(MAGIC) if offset == 0 else 0
        size_all = len(data)
        unpack = _REC.unpack_from
        head = _REC.size
        raw: list[bytes] = []
        plains: list[int] = []
        metas, starts, ends = self.metas, self.starts, self.ends
        while pos + head <= size_all:
            nb, nm, nblock, plain = unpack(data, pos)
            name = pos + head
            meta = name + nb
            end = meta + nm + (0 if nblock == _BIG else nblock)
            if end > size_all:
                break
            raw.append(data[name:meta])
            metas.append(data[meta:meta + nm])
            plains.append(plain)
            if nblock == _BIG:
                starts.append(offset + end)
                ends.append(-1)
            else:
                starts.append(offset + meta + nm)
                ends.append(offset + end)
            pos = end
        if raw:
            # "/" cannot occur in a file name: one decode and split for every name
            names = b"/".join(raw).decode("utf-8", "surrogateescape").split("/")
            if len(names) != len(raw):  # a damaged record with a "/" in its name
                names = [r.decode("utf-8", "surrogateescape") for r in raw]
            by_base = self.by_base  # (built before the names are added, if it was not)
            first = len(self.bases)
            self.bases += names
            batch = dict(zip(names, range(first, first + len(names))))
            if len(batch) != len(names) or not by_base.keys().isdisjoint(batch):
                for n, base in enumerate(names, first):  # a message indexed again: the older entry is superseded
                    old = by_base.get(base)
                    if old is not None:
                        ends[old] = -2
                    by_base[base] = n
            else:
                by_base.update(batch)
            self.unplain.update(compress(range(first, first + len(names)), map(operator.not_, plains)))
        self.chunks.append(data[:pos] if pos < size_all else data)
        self.blob_len += pos
        self.lowered = None
        self._last = None
        return pos

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

    def _live_records(self, live: set[str] | None = None) -> list[bytes]:
        """The records of entries not superseded (and, given C{live}, of those messages only)."""
        out = []
        for i, base in enumerate(self.bases):
            if self.ends[i] == -2 or (live is not None and base not in live):
                continue
            mtime, fields, env = self.decoded(i)
            out.append(_record(base, mtime, fields, env, self.block(i)))
        return out

    def _rewrite(self, records: list[bytes]) -> None:
        data = MAGIC + b"".join(records)
        write_atomically(self.file, data)
        self._clear()
        self._parse(data, 0)
        self._note_identity()

    def _append(self, records: list[bytes]) -> None:
        if self.identity is None or not self.current():
            self._rewrite(self._live_records() + records)
            return
        data = b"".join(records)
        # A cache: not fsync'd (a torn tail after a crash is dropped at load).
        fd = os.open(self.file, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self._parse(data, self.blob_len)
        self._note_identity()

    def _save_directory(self) -> None:
        if self.identity is not None:
            headerdir.save(self, self._joined(), self.identity[1])

    def _joined(self) -> bytes:
        if len(self.chunks) != 1:
            self.blob = b"".join(self.chunks)
            self.chunks = [self.blob]
        else:
            self.blob = self.chunks[0]
        return self.blob

    def decoded(self, entry: int) -> tuple[float, SortFields, bytes | None]:
        """
        The entry's internal date, SORT/THREAD keys (a plain tuple in
        SortFields order) and FETCH ENVELOPE text.
        """
        if entry >= len(self.decoded_list):
            self._decode()
        return self.decoded_list[entry]

    def _decode(self) -> None:
        # One marshal call for every entry not yet decoded: the records' metadata
        # joined behind a list header (a C loop, not one Python call per message).
        done = len(self.decoded_list)
        todo = self.metas[done:]
        try:
            values = marshal.loads(b"[" + struct.pack("<i", len(todo)) + b"".join(todo))
            if len(values) != len(todo):
                raise ValueError("short")
            self.decoded_list.extend(values)
            return
        except (ValueError, TypeError, EOFError):
            pass
        for meta in todo:  # one bad record: the others still count
            try:
                mtime, fields, env = marshal.loads(meta)
                self.decoded_list.append((float(mtime), tuple(fields), env))  # type: ignore[arg-type]
            except (ValueError, TypeError, EOFError):
                self.decoded_list.append(_UNKNOWN)

    # what searches ask

    def ensure(self, path: str, rels: list[str], read: Reader) -> list[int]:
        """
        The entry of each message (C{rels} relative to the folder), indexing
        those missing, whose header blocks C{read} gives (fetch.read_message).
        """
        if self._last is not None and self._last[0] == rels:
            return self._last[1]  # the same folder as last time: nothing to look up
        self.memo.clear()
        out = headerdir.mapped(self, rels) if self._last is None else None
        fresh = out is None
        if out is None:
            get = self.by_base.get
            # base_of inlined: one comprehension over 100,000 names after a restart, not two calls each
            out = [get(rel[4:].partition(":")[0], -1) for rel in rels]
        missing = [rel for rel, e in zip(rels, out) if e < 0] if -1 in out else []
        if missing:
            records = []
            for rel in missing:
                rel2, data, mtime = read(path, rel, False, True)
                if data is None:
                    continue  # gone: not indexed, its search reads it (and finds nothing)
                m = _BLANK_LINE.search(data)
                block = data[:m.end()] if m else data
                records.append(_record(base_of(rel2), mtime or 0.0, fields_of(block), _envelope_of(block),
                                       block if len(block) <= MAX_BLOCK else None))
            if records:
                self._append(records)
            if len(records) >= headerdir.WRITE_AFTER:
                self._save_directory()  # else the first search after a restart walks them all
        if missing or len(self.bases) > 2 * max(len(rels), 64):
            if len(self.bases) > 2 * max(len(rels), 64):
                # Compaction: only the entries of messages still present
                self._rewrite(self._live_records(set(base_of(r) for r in rels)))
                if len(self.bases) >= headerdir.WRITE_AFTER:
                    self._save_directory()
            get = self.by_base.get
            out = [get(base_of(rel), -1) for rel in rels]
        self._last = (list(rels), out)
        if (fresh or missing) and len(rels) >= headerdir.WRITE_AFTER:
            headerdir.save_map(self, rels, out)
        return out

    def remember(self, key: Any, value: Any) -> None:
        """Keep a result over the folder until it changes (a few at most)."""
        if len(self.memo) >= MEMO_ENTRIES:
            self.memo.pop(next(iter(self.memo)))
        self.memo[key] = value

    def block(self, entry: int) -> bytes | None:
        end = self.ends[entry]
        return None if end < 0 else self._joined()[self.starts[entry]:end]

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
        lowered, starts, ends = self.lowered, self.starts, self.ends
        find = lowered.find
        at = find(raw)
        while at >= 0:
            i = bisect.bisect_right(starts, at) - 1
            if i >= 0 and at + len(raw) <= ends[i]:  # inside entry i's block (not its record header)
                out.add(i)
                at = find(raw, ends[i])
            else:
                at = find(raw, at + 1)
        return out


def indexed_headers(path: str, bases: list[str]) -> dict[str, tuple[bytes | None, float]]:
    """
    The ENVELOPE texts and internal dates the folder's index already has for
    C{bases} (FETCH takes them instead of opening the files); nothing is
    indexed here.
    """
    index = open_index(path)
    with index.lock:
        prepare(index)
        out = {}
        get = index.by_base.get
        for base in bases:
            e = get(base)
            if e is not None:
                mtime, _, env = index.decoded(e)
                out[base] = (env, mtime)
        return out


def indexed_list(path: str, bases: list[str]) -> list[tuple[bytes | None, float] | None]:
    """L{indexed_headers} as a list in the order of C{bases} (C{None}: not indexed)."""
    index = open_index(path)
    with index.lock:
        prepare(index)
        entry = index.by_base.get
        found = [entry(b) for b in bases]
        last = max((e for e in found if e is not None), default=-1)
        if last >= 0:
            index.decoded(last)  # decodes every entry up to it at once
        decoded = index.decoded_list
        return [None if e is None else (decoded[e][2], decoded[e][0]) for e in found]


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
