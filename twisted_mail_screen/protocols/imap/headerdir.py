# -*- test-case-name: tests.test_imap_sort -*-
"""
The header index's directory (C{mailscreen-headers.dir}): what walking the
index's records gave (names, metadata, block spans), kept so that the first
search after a restart loads it with one C{marshal} call instead of a
Python loop over every record (about 6 ms per 5,000 messages).

It is a cache of a cache: it names the index file it describes (inode,
length covered, its first and last octets) and anything that does not
match (another file, a torn or foreign directory, a newer version) is
ignored, the records walked as before and the directory written again.
Records appended after it was written are walked on top of it.
"""

from __future__ import annotations

import marshal
import os
import threading
from typing import Any

DIRNAME = "mailscreen-headers.dir"
MAGIC = b"MSHD1\n"
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
        (covered, dino, head, tail, bases, metas, starts, ends, unplain) = marshal.loads(raw[len(MAGIC):])
        n = len(bases)
        if dino != ino or not 0 < covered <= len(data) or (head, tail) != _edges(data, covered) or \
                len(metas) != n or len(starts) != n or len(ends) != n or \
                not all(isinstance(x, list) for x in (bases, metas, starts, ends, unplain)):
            return 0
    except (OSError, ValueError, TypeError, EOFError):
        return 0
    index.bases, index.metas, index.starts, index.ends = bases, metas, starts, ends
    index.by_base = dict(zip(bases, range(n)))  # the last of a name's entries wins, as in the walk
    index.unplain = set(unplain)
    index.chunks = [data[:covered] if covered < len(data) else data]
    index.blob_len = covered
    return covered


def save(index: Any, data: bytes, ino: int) -> None:
    """Write the directory of C{index}, whose blob is C{data} (the whole file)."""
    covered = index.blob_len
    head, tail = _edges(data, covered)
    body = marshal.dumps((covered, ino, head, tail, index.bases, index.metas, index.starts,
                          index.ends, sorted(index.unplain)), 2)
    name = os.path.join(index.path, DIRNAME)
    temp = name + f".{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        # A cache, not fsync'd: a torn one fails its checks and is written again.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # header text: the owner's only
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + body)
        os.replace(temp, name)
    except OSError:
        try:
            os.unlink(temp)
        except OSError:
            pass
