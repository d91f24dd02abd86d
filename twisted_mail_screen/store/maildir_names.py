# -*- test-case-name: tests.test_maildir_names -*-
"""
Maildir file names: the one parser and the one maker of unique names.

A name is C{<base>[:2,<flags>]}; the base is C{<unique>[,S=<size>][,W=<size>]},
where C{unique} is C{<second>.M<usec>P<pid>Q<n>.<host>}. The flags (the
"info") change when a message's flags do; the base never does, so UID
lists and caches key on it. Every function here also takes a name with
its folder-relative subdirectory in front (C{cur/<name>}).
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time

_UNIQUE = re.compile(r"(\d+)\.(?:M(\d+))?(?:P\d+)?(?:Q(\d+))?")

#: Sort key of a base name: (second, microsecond, counter, base).
DeliveryOrder = tuple[int, int, int, str]


def base_of(name: str) -> str:
    """The unique part of the name with its size fields, unchanged by flag changes."""
    return name.split(":", 1)[0]


def flags_of(name: str) -> str:
    """The flag letters after C{:2,}; empty when the name has none."""
    _, sep, info = name.partition(":2,")
    return info if sep else ""


def with_flags(base: str, flags: str) -> str:
    """The name of C{base} carrying C{flags} (always with C{:2,}, as in cur/)."""
    return f"{base}:2,{flags}"


def size_field(name: str, key: str) -> int | None:
    """The C{S=} or C{W=} size the name carries, if it says."""
    for part in base_of(name).split(",")[1:]:
        k, _, v = part.partition("=")
        if k == key and v.isdigit():
            return int(v)
    return None


def unique_of(name: str) -> str:
    """The unique part alone, without size fields (a POP3 UIDL, for one)."""
    return base_of(name).split(",", 1)[0]


def delivery_order(base: str) -> DeliveryOrder:
    """
    Sort key of a unique name: its second, then its microsecond and
    delivery counter as numbers (C{M999} comes before C{M1000}; compared as
    text, two messages of the same second came out in random order).
    """
    m = _UNIQUE.match(base)
    if m is None:
        return (0, 0, 0, base)
    sec, usec, q = m.groups()
    return (int(sec), int(usec) if usec else 0, int(q) if q else 0, base)


class UniqueNames:
    """
    Maildir unique names: C{time.M<usec>P<pid>Q<n>.<host>}. One per
    process (built by the composition root), so its counter keeps two
    names of one microsecond apart, whether delivered or copied. Thread-safe.
    """

    def __init__(self, hostname: str | None = None) -> None:
        host = hostname or socket.gethostname()
        # "/" and ":" cannot stand in a name; "," would start a size field.
        self._host = host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def new(self) -> str:
        now = time.time()
        with self._lock:
            n = next(self._counter)
        return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{n}.{self._host}"

    def copy_of(self, old_base: str) -> str:
        """A fresh base name keeping C{old_base}'s C{,S=,W=} size fields (IMAP COPY)."""
        sizes = "".join("," + p for p in old_base.split(",")[1:] if p[:2] in ("S=", "W="))
        return self.new() + sizes


def folder_listing(path: str) -> dict[str, str] | None:
    """
    The messages of the Maildir folder at C{path}: each base name (flags
    left off) to its C{new/...} or C{cur/...} path; C{None} when the folder
    has no C{cur} (it is gone, or being made).
    """
    found: dict[str, str] = {}
    for sub in ("new", "cur"):
        try:
            with os.scandir(os.path.join(path, sub)) as it:
                for e in it:
                    if not e.name.startswith("."):
                        found[base_of(e.name)] = f"{sub}/{e.name}"
        except (FileNotFoundError, NotADirectoryError):
            if sub == "cur":
                return None
    return found
