# -*- test-case-name: tests.test_imap_sort -*-
"""
The header index's directory (C{mailscreen-headers.dir}): what walking the
index's records gave (names, the lengths of their metadata, block spans),
kept so that the first search after a restart loads it with one
C{marshal} call instead of a Python loop over every record (about 6 ms per
5,000 messages). The spans are arrays (one object each, not one per
record) and the metadata is not copied: it is sliced from the index file
(at 100,000 messages the directory went from 39 MB to 7 MB, its load from
0.24 s to a fraction of it).

It is a cache of a cache: it names the index file it describes (inode,
length covered, its first and last octets) and anything that does not
match (another file, a torn or foreign directory, a newer version) is
ignored, the records walked as before and the directory written again.
Records appended after it was written are walked on top of it.

Beside it, the map (C{mailscreen-headers.map}): each message's entry for
the folder's file names as the last search saw them (a digest of the
names, the index file's length and inode), so the first search after a
restart takes the entries in one read instead of looking up every name
(and building the name table at all). Any change of a name or of the
index file makes it miss; the next search writes it again.
"""

from __future__ import annotations

import marshal
import os
import threading
import zlib
from array import array
from typing import Any

DIRNAME = "mailscreen-headers.dir"
MAPNAME = "mailscreen-headers.map"
MAGIC = b"MSHD2\n"
#: records walked in one load past which the directory is (re)written
WRITE_AFTER = 256
_EDGE = 64  # octets of the index kept from each end of the covered part


def _edges(data: bytes, covered: int) -> tuple[bytes, bytes]:
    return data[:_EDGE], data[max(0, covered - _EDGE):covered]


def restore(index: Any, data: bytes, ino: int) -> int:
    """
    Fill C{index}'s (empty) lists from the directory if it describes a
    prefix of C{data}; how many octets of C{data} it covered (0: none).
    """
    try:
        with open(os.path.join(index.path, DIRNAME), "rb") as f:
            raw = f.read()
        if not raw.startswith(MAGIC):
            return 0
        (covered, dino, head, tail, bases, raw_lens, raw_starts, raw_ends, unplain) = marshal.loads(raw[len(MAGIC):])
        lens, starts, ends = array("I", raw_lens), array("q", raw_starts), array("q", raw_ends)
        n = len(bases)
        if dino != ino or not 0 < covered <= len(data) or (head, tail) != _edges(data, covered) or \
                len(lens) != n or len(starts) != n or len(ends) != n or \
                not all(isinstance(x, list) for x in (bases, unplain)) or \
                (n and (min(starts) < 0 or max(starts) > covered or max(ends) > covered)):
            return 0
    except (OSError, ValueError, TypeError, EOFError):
        return 0
    # A record's metadata ends where its block starts (or, with no block stored, where the record
    # ends): sliced when first asked for (SORT keys, ENVELOPE), not for a search.
    index.metas, index.meta_spans = None, (starts, lens)
    index.bases, index.starts, index.ends = bases, starts.tolist(), ends.tolist()
    index.by_base = None  # built when first asked for: a folder found in the map needs none
    index.unplain = set(unplain)
    index.chunks = [data[:covered] if covered < len(data) else data]
    index.blob_len = covered
    return covered


def save(index: Any, data: bytes, ino: int) -> None:
    """Write the directory of C{index}, whose blob is C{data} (the whole file)."""
    covered = index.blob_len
    head, tail = _edges(data, covered)
    # Offsets and lengths as arrays (no object each to load); the metadata as slices of the file.
    body = marshal.dumps((covered, ino, head, tail, index.bases, array("I", map(len, index.metas)).tobytes(),
                          array("q", index.starts).tobytes(), array("q", index.ends).tobytes(),
                          sorted(index.unplain)), 2)
    _write(os.path.join(index.path, DIRNAME), MAGIC + body)


def _write(name: str, data: bytes) -> None:
    temp = name + f".{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        # A cache, not fsync'd: a torn one fails its checks and is written again.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # header text: the owner's only
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, name)
    except OSError:
        try:
            os.unlink(temp)
        except OSError:
            pass


def _names_key(rels: Any) -> tuple[int, int]:
    return len(rels), zlib.crc32("\n".join(rels).encode("utf-8", "surrogateescape"))


def mapped(index: Any, rels: Any) -> list[int] | None:
    """
    Each message's entry as the map file (C{mailscreen-headers.map}) has
    it for exactly these names and this index file, else C{None}: after a
    restart the folder is mapped without a look-up per name.
    """
    try:
        with open(os.path.join(index.path, MAPNAME), "rb") as f:
            identity, key, raw = marshal.loads(f.read())
        if identity != index.identity or key != _names_key(rels):
            return None
        out = array("i", raw).tolist()
    except (OSError, ValueError, TypeError, EOFError):
        return None
    return out if len(out) == len(rels) and (not out or max(out) < len(index.bases)) else None


def save_map(index: Any, rels: Any, entries: list[int]) -> None:
    """Keep C{entries} (of the folder's names C{rels}, in the index file as it is now) for L{mapped}."""
    if index.identity is None:
        return
    body = marshal.dumps((index.identity, _names_key(rels), array("i", entries).tobytes()), 2)
    _write(os.path.join(index.path, MAPNAME), body)
