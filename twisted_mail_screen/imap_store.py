# -*- test-case-name: tests.test_reactor_budget -*-
"""
STORE's flag changes as one job for the worker pool: which files to
rename, and the renames. A message's new name depends only on its
current flag letters (and the keyword tables), so the new flags are
worked out once per distinct flag combination, not once per message:
C{STORE 1:* +FLAGS} on a large folder costs the reactor nothing but the
list of names it hands over.
"""

from __future__ import annotations

from twisted_mail_screen import imap_mailbox as mb


def plan_renames(rows: list[tuple[int, str]], mode: str, flags: list[str],
                 old_keywords: list[str], keywords: list[str]) -> list[tuple[int, str, str]]:
    """(uid, name, new name) for each message of C{rows} whose flags change."""
    lowered = {f.lower() for f in flags}
    infos: dict[str, str] = {}
    out = []
    for u, rel in rows:
        info = mb.info_of(rel)
        new_info = infos.get(info)
        if new_info is None:
            current = mb.flag_names(rel, old_keywords)
            if mode == "+":
                new = current + flags
            elif mode == "-":
                new = [f for f in current if f.lower() not in lowered]
            else:
                new = list(flags)
            new_info = infos[info] = mb.info_of(mb.with_flags(rel, new, keywords))
        target = f"cur/{mb.base_of(rel)}:2,{new_info}"
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
    return mb.rename_files(path, renames, changed_keywords)
