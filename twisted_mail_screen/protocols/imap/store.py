# -*- test-case-name: tests.test_reactor_budget -*-
"""
The whole-folder parts of STORE, EXPUNGE and sequence sets, as jobs for
the worker pool. STORE's flag changes are one job, run under the
folder's cross-process lock: which files to rename, and the renames. A
message's new name depends only on its current flag letters on disk
(and the keyword table), so the new flags are worked out once per
distinct flag combination, not once per message:
C{STORE 1:* +FLAGS} on a large folder costs the reactor nothing but the
list of names it hands over. Long sequence sets are parsed and resolved
there too, and EXPUNGE picks its victims there, under the folder's
cross-process lock as well: a flag change another process makes under
it happens wholly before or wholly after the expunge.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Any

from twisted_mail_screen.protocols.imap.filejobs import rename_files, unlink_files
from twisted_mail_screen.protocols.imap.flags import FLAG_LETTERS, LETTER_FLAGS, base_of, info_of
from twisted_mail_screen.protocols.imap.parse import SeqSet, Token, parse_seqset
from twisted_mail_screen.store import maildir_names
from twisted_mail_screen.store.folderlock import locked


class FlagChange:
    """
    A STORE's change as flag letters, applied to the letters a name has:
    C{+} adds them, C{-} removes them, C{=} replaces the system flags and
    keywords with them. Letters the change does not name stay, keywords
    this process's table does not know yet included (another process may
    have given them out). Worked out once per distinct set of letters.
    """

    def __init__(self, mode: str, flags: list[str], keywords: list[str]) -> None:
        table = {k.lower(): chr(97 + i) for i, k in enumerate(keywords)}
        self.mode = mode
        self.letters: set[str] = set()
        for f in flags:
            letter = FLAG_LETTERS.get(f.lower()) or table.get(f.lower())
            if letter is not None:
                self.letters.add(letter)
        self._infos: dict[str, str] = {}

    def target(self, rel: str) -> str:
        """The name C{rel} gets: C{rel} itself when the change leaves it as it is."""
        info = info_of(rel)
        new_info = self._infos.get(info)
        if new_info is None:
            have = set(info)
            if self.mode == "+":
                have |= self.letters
            elif self.mode == "-":
                have -= self.letters
            else:
                have = {c for c in have if not (c in LETTER_FLAGS or "a" <= c <= "z")} | self.letters
            new_info = self._infos[info] = "".join(sorted(have))
        target = "cur/" + maildir_names.with_flags(base_of(rel), new_info)
        return rel if target == rel else target


def store_files(path: str, rows: list[tuple[int, str]], mode: str, flags: list[str],
                keywords: list[str], changed_keywords: list[str] | None) -> list[tuple[int, str]]:
    """
    Rename the files for a flag change (blocking; the caller holds the
    folder's cross-process lock); the (uid, name now) of those whose name
    changed. Every row is looked at on disk, those the index says need no
    change too: another process may have renamed the file since this
    index last looked, and the change then applies to the flags it has now.
    Letters are changed as letters, so a name's keyword letters mean the
    same before and after: the folder's old keyword table is not needed.
    """
    change = FlagChange(mode, flags, keywords)
    renames = [(u, rel, change.target(rel)) for u, rel in rows]
    return rename_files(path, renames, changed_keywords, change.target)


def store_files_locked(path: str, *args: Any) -> list[tuple[int, str]]:
    """L{store_files} under the folder's cross-process lock; nothing done when the folder is gone."""
    try:
        return locked(path, store_files, path, *args)
    except FileNotFoundError:
        return []


#: A sequence set longer than this (characters) is parsed and resolved in
#: the worker: 64 KiB of "1,1,1,..." is 32,000 ranges, ~90 ms of Python.
LONG_SET = 2048


def set_positions(seqset: "SeqSet | Token", view: "array[int]", uid: bool) -> list[tuple[int, int]]:
    """0-based [start, stop) position ranges of C{view} that a set (or its token) names."""
    if not isinstance(seqset, SeqSet):
        seqset = parse_seqset(seqset)
    n = len(view)
    out = []
    if uid:
        if not n:
            return []
        for a, b in seqset.resolve(view[-1]):
            lo, hi = bisect.bisect_left(view, a), bisect.bisect_right(view, b)
            if lo < hi:
                out.append((lo, hi))
    else:
        for a, b in seqset.resolve(n):
            a = max(a, 1)
            if a > n:
                continue
            out.append((a - 1, min(b, n)))
    return out


def expunge_files(path: str, uids: "array[int]", names: list[str], view: "array[int]",
                  seqset: "SeqSet | Token | None") -> list[int]:
    """Unlink the \\Deleted messages of C{view} (those C{seqset} names, if given); the UIDs gone."""
    if seqset is not None and not isinstance(seqset, SeqSet):
        seqset = parse_seqset(seqset)
    star = view[-1] if len(view) else 0
    shown = set(view)
    doomed = [(u, n) for u, n in zip(uids, names)
              if "T" in info_of(n) and u in shown and (seqset is None or seqset.contains(u, star))]
    # Only while still \Deleted on disk: another process may have taken the flag off since.
    return unlink_files(path, doomed, spare=lambda now: "T" not in info_of(now))


def expunge_files_locked(path: str, *args: Any) -> list[int]:
    """L{expunge_files} under the folder's cross-process lock; nothing done when the folder is gone."""
    try:
        return locked(path, expunge_files, path, *args)
    except FileNotFoundError:
        return []
