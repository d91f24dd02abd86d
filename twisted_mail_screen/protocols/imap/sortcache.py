# -*- test-case-name: tests.test_imap_sort -*-
"""
SORT orders and THREAD answers kept on disk (C{mailscreen-sort} beside the
UID list), so the first SORT or THREAD after a restart, like the ones after
it, loads no header index.

The file holds a few orders, each under the criteria and a digest of the
folder's message file names (flags included) at the time: any delivery,
expunge or flag change makes another digest, and its order is worked out
again and replaces the oldest. An order is the folder positions of its
messages; the numbers answered come from the session's own view. A THREAD
answer (over the whole folder: search key ALL) is its thread lists as
sent, kept under the numbers it names as well. Like the
header index it is a cache, replaced atomically, and a file that cannot
be read counts as empty.
"""

from __future__ import annotations

import marshal
import os
import zlib
from array import array
from typing import Sequence

from twisted_mail_screen.runtime.atomic import write_atomically

FILENAME = "mailscreen-sort"
#: orders kept per folder (criteria lists a client uses, times the folder states)
KEEP = 8


def key_of(criteria: Sequence[tuple[str, bool]], rels: Sequence[str]) -> str:
    names = "\n".join(rels).encode("utf-8", "surrogateescape")
    crit = " ".join(("REVERSE " if rev else "") + k for k, rev in criteria)
    return f"{crit}/{len(rels)}/{zlib.crc32(names):08x}"


def _load(path: str) -> dict[str, bytes]:
    try:
        with open(os.path.join(path, FILENAME), "rb") as f:
            table = marshal.loads(f.read())
    except (OSError, ValueError, EOFError, TypeError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if isinstance(k, str) and isinstance(v, bytes)}


def thread_key(algorithm: str, rels: Sequence[str], numbers: Sequence[int]) -> str:
    """
    A THREAD answer's key: the folder's names (as for SORT) and the numbers
    it answers with (UIDs, or sequence numbers with their gaps), which a
    thread list names directly.
    """
    digits = array("L", numbers).tobytes()
    return f"THREAD {algorithm}/{key_of((), rels)}/{zlib.crc32(digits):08x}"


def lookup_bytes(path: str, key: str) -> bytes | None:
    return _load(path).get(key)


def lookup(path: str, key: str, count: int) -> list[int] | None:
    """The order kept under C{key} (positions below C{count}), or None."""
    raw = _load(path).get(key)
    if raw is None or len(raw) % 4:
        return None
    order = array("I")
    order.frombytes(raw)
    if len(order) > count or (len(order) and max(order) >= count):
        return None
    return order.tolist()


def store(path: str, key: str, order: Sequence[int]) -> None:
    store_bytes(path, key, array("I", order).tobytes())


def store_bytes(path: str, key: str, value: bytes) -> None:
    table = _load(path)
    table.pop(key, None)
    while len(table) >= KEEP:
        table.pop(next(iter(table)))
    table[key] = value
    try:
        write_atomically(os.path.join(path, FILENAME), marshal.dumps(table, 2))
    except OSError:
        pass  # a cache: the next SORT works it out again
