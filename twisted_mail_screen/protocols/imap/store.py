# -*- test-case-name: tests.test_reactor_budget -*-
"""
The whole-folder parts of STORE, EXPUNGE and sequence sets, as jobs for
the worker pool. STORE's flag changes are one job: which files to
rename, and the renames. A message's new name depends only on its
current flag letters (and the keyword tables), so the new flags are
worked out once per distinct flag combination, not once per message:
C{STORE 1:* +FLAGS} on a large folder costs the reactor nothing but the
list of names it hands over. Long sequence sets are parsed and resolved
there too, and EXPUNGE picks its victims there.
"""

from __future__ import annotations

import bisect
from array import array

from twisted_mail_screen.protocols.imap.filejobs import rename_files, unlink_files
from twisted_mail_screen.protocols.imap.flags import base_of, flag_names, info_of, with_flags
from twisted_mail_screen.protocols.imap.parse import SeqSet, Token, parse_seqset
from twisted_mail_screen.store import maildir_names


def plan_renames(rows: list[tuple[int, str]], mode: str, flags: list[str],
                 old_keywords: list[str], keywords: list[str]) -> list[tuple[int, str, str]]:
    """(uid, name, new name) for each message of C{rows} whose flags change."""
    lowered = {f.lower() for f in flags}
    infos: dict[str, str] = {}
    out = []
    for u, rel in rows:
        info = info_of(rel)
        new_info = infos.get(info)
        if new_info is None:
            current = flag_names(rel, old_keywords)
            if mode == "+":
                new = current + flags
            elif mode == "-":
                new = [f for f in current if f.lower() not in lowered]
            else:
                new = list(flags)
            new_info = infos[info] = info_of(with_flags(rel, new, keywords))
        target = "cur/" + maildir_names.with_flags(base_of(rel), new_info)
        if target != rel:
            out.append((u, rel, target))
    return out


def store_files(path: str, rows: list[tuple[int, str]], mode: str, flags: list[str],
                old_keywords: list[str], keywords: list[str],
                changed_keywords: list[str] | None) -> list[tuple[int, str]]:
    """Rename the files for a flag change (blocking); the (uid, new name) that were done."""
    renames = plan_renames(rows, mode, flags, old_keywords, keywords)
    if not renames and changed_keywords is None:
        return []
    return rename_files(path, renames, changed_keywords)


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
    return unlink_files(path, doomed)
