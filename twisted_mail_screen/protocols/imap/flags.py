# -*- test-case-name: tests.test_imap_units -*-
"""
Maildir file names as IMAP sees them: a message's name relative to its
folder (C{new/<base>} or C{cur/<base>:2,<letters>}), the system flags and
keywords its letters stand for (keywords a-z indexed by the folder's
C{dovecot-keywords} file), and the size the name records.

Pure functions on names, plus the small file reads and writes of the
keyword table and the look-up of a message renamed by another session
(worker thread).
"""

from __future__ import annotations

import os
from typing import Iterable

from twisted_mail_screen.runtime.atomic import write_atomically
from twisted_mail_screen.store import maildir_names
from twisted_mail_screen.store.maildir_names import flags_of as info_of

__all__ = ["KEYWORDS_FILE", "MAX_KEYWORDS", "LETTER_FLAGS", "FLAG_LETTERS", "SYSTEM_FLAGS", "base_of",
           "info_of", "flag_names", "with_flags", "size_of_name", "load_keywords", "save_keywords",
           "merge_keywords", "find_file"]

KEYWORDS_FILE = "dovecot-keywords"
MAX_KEYWORDS = 26

LETTER_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}
FLAG_LETTERS = {v.lower(): k for k, v in LETTER_FLAGS.items()}
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


def base_of(rel: str) -> str:
    return maildir_names.base_of(rel[4:])


def flag_names(rel: str, keywords: list[str]) -> list[str]:
    out = []
    for letter in info_of(rel):
        if letter in LETTER_FLAGS:
            out.append(LETTER_FLAGS[letter])
        elif "a" <= letter <= "z":
            i = ord(letter) - 97
            if i < len(keywords):
                out.append(keywords[i])
    return out


def with_flags(rel: str, flags: Iterable[str], keywords: list[str]) -> str:
    """C{rel} renamed for the given flag names (keywords must already be in C{keywords})."""
    letters = {c for c in info_of(rel) if not (c in LETTER_FLAGS or "a" <= c <= "z")}
    lowered = {k.lower(): i for i, k in enumerate(keywords)}
    for f in flags:
        if f.lower() in FLAG_LETTERS:
            letters.add(FLAG_LETTERS[f.lower()])
        elif f.lower() in lowered:
            letters.add(chr(97 + lowered[f.lower()]))
    base = base_of(rel)
    return "cur/" + maildir_names.with_flags(base, "".join(sorted(letters)))


def size_of_name(rel: str) -> int | None:
    return maildir_names.size_field(rel, "W")


def load_keywords(path: str) -> list[str]:
    try:
        with open(os.path.join(path, KEYWORDS_FILE), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    table: dict[int, str] = {}
    for line in lines:
        num, _, name = line.partition(" ")
        if num.isdigit() and name and int(num) < MAX_KEYWORDS:
            table[int(num)] = name
    out: list[str] = []
    for i in range(MAX_KEYWORDS):
        if i not in table:
            break
        out.append(table[i])
    return out


def save_keywords(path: str, keywords: list[str]) -> None:
    text = "".join(f"{i} {k}\n" for i, k in enumerate(keywords))
    write_atomically(os.path.join(path, KEYWORDS_FILE), text.encode("utf-8"))


def merge_keywords(keywords: list[str], flags: Iterable[str]) -> list[str] | None:
    """C{keywords} extended by the new keywords in C{flags}; C{None} past 26."""
    known = {k.lower() for k in keywords}
    out = list(keywords)
    for f in flags:
        if f.startswith("\\") or f.lower() in known:
            continue
        if len(out) >= MAX_KEYWORDS:
            return None
        out.append(f)
        known.add(f.lower())
    return out


def find_file(path: str, rel: str) -> str | None:
    """The current name of a message whose flags another session changed."""
    base = base_of(rel)
    for sub in ("cur", "new"):
        try:
            with os.scandir(os.path.join(path, sub)) as it:
                for e in it:
                    if e.name == base or e.name.startswith(base + ":"):
                        return f"{sub}/{e.name}"
        except FileNotFoundError:
            continue
    return None
