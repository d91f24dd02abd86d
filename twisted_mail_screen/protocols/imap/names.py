# -*- test-case-name: tests.test_imap_limits -*-
"""
Which IMAP folder names an account may have, and how they are stored.

Clients see C{/} as the hierarchy delimiter: C{Archive/2024} is stored as
the Maildir++ directory C{.Archive.2024}. On disk each name component is
in modified UTF-7 (as Dovecot stores it) with a C{.} inside a component
written C{&AC4-}, so any name a client can create round-trips.

Sync clients (mbsync, offlineimap) turn folder names into local paths, so
a name that could climb out of, or jump to the root of, a local tree is
refused outright rather than stored (the mbsync CVE-2021-20247 class):
hierarchy levels C{.} and C{..}, empty levels (C{a//b}), a leading C{/}
or C{~}, and control characters. Names already on disk that break these
rules (made by another program) are never listed.
"""

from __future__ import annotations

import os
import unicodedata

DELIMITER = "/"
# One directory entry holds the whole hierarchy (".a.b.c"); filesystems
# allow 255 bytes per entry, and a few are kept in hand.
MAX_STORED_BYTES = 250


class FolderError(Exception):
    """An operation on folders that is refused; C{code} is the response code."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def encode_component(part: str) -> str:
    return part.encode("imap4-utf-7").decode("ascii").replace(".", "&AC4-")


def decode_component(part: str) -> str:
    try:
        return part.encode("ascii").decode("imap4-utf-7")
    except Exception:
        return part


def _bad_char(c: str) -> bool:
    # Cc: C0, DEL and C1 controls; Cs: lone surrogates (a malformed
    # modified UTF-7 name), which could not be encoded back for the disk.
    return c in "*%" or unicodedata.category(c) in ("Cc", "Cs")


def name_problem(name: str) -> tuple[str, str] | None:
    """Why C{name} cannot be a folder, as (response code, text); C{None} if it can."""
    if name == "INBOX":
        return None
    if not name:
        return "CANNOT", "Empty mailbox name"
    if name[0] in "/~#":
        return "CANNOT", f"Mailbox names cannot start with {name[0]!r}"
    if any(_bad_char(c) for c in name):
        return "CANNOT", "Mailbox names cannot contain control characters, '*' or '%'"
    parts = name.split(DELIMITER)
    if any(not p for p in parts):
        return "CANNOT", "Mailbox names cannot have empty hierarchy levels"
    if any(p in (".", "..") for p in parts):
        return "CANNOT", "'.' and '..' are not allowed as hierarchy levels"
    stored = len(stored_name(name))
    if stored > MAX_STORED_BYTES:
        return "LIMIT", f"Mailbox name too long ({stored} bytes stored, at most {MAX_STORED_BYTES})"
    return None


def check_name(name: str) -> None:
    problem = name_problem(name)
    if problem is not None:
        raise FolderError(problem[1], problem[0])


def stored_name(name: str) -> str:
    """The directory entry of a folder other than INBOX."""
    return "." + ".".join(encode_component(p) for p in name.split(DELIMITER))


def folder_dir(inbox: str, name: str) -> str:
    """The directory of a folder (the name must have passed L{check_name})."""
    if name == "INBOX":
        return inbox
    return os.path.join(inbox, stored_name(name))


def dir_name(entry: str) -> str | None:
    """The IMAP name of a C{.Name} directory entry, C{None} if it is not a valid one."""
    if not entry.startswith(".") or entry in (".", "..") or entry.startswith(".#"):
        return None
    parts = entry[1:].split(".")
    if any(not p for p in parts):
        return None
    name = DELIMITER.join(decode_component(p) for p in parts)
    if name.upper() == "INBOX" or name_problem(name) is not None:
        return None
    return name
