# -*- test-case-name: tests.test_imap_concurrency -*-
"""
Jobs that change a folder's files: flag renames, expunge unlinks, COPY
and MOVE between folders, APPEND, and the UID map writes that make new
UIDs durable. Each runs in the worker thread under the account lock; the
caller applies the result to the L{Folder} index on the reactor.
"""

from __future__ import annotations

import os
from array import array
from typing import Callable, Iterable

from twisted_mail_screen.protocols.imap.flags import (base_of, find_file, flag_names, info_of,
                                                      load_keywords, merge_keywords, save_keywords,
                                                      with_flags)
from twisted_mail_screen.runtime.atomic import fsync_directory
from twisted_mail_screen.store import maildir_names, uidlist
from twisted_mail_screen.store.maildir import Maildir, MailStore, link_or_copy
from twisted_mail_screen.store.maildir_names import UniqueNames


def write_uidlist(path: str, uidvalidity: int, next_uid: int, uids: Iterable[int],
                  names: Iterable[str]) -> None:
    uidlist.UidList(uidvalidity, next_uid, array("L", uids), [base_of(n) for n in names]).save(path)


def add_to_uidlist(path: str, uidvalidity: int, next_uid: int, uids: Iterable[int],
                   names: Iterable[str], added: list[tuple[int, str]]) -> None:
    """
    Make new messages' UIDs durable: append their lines to the folder's map
    (one small fsync'd write), or write the whole map (C{uids}/C{names}
    already including C{added}) if there is no file to append to.
    """
    try:
        uidlist.append_records(path, [(u, base_of(n)) for u, n in added])
    except FileNotFoundError:
        write_uidlist(path, uidvalidity, next_uid, uids, names)


#: Tries at one message's rename when another process keeps renaming it meanwhile.
MAX_RENAME_TRIES = 8
#: Rows whose name the change leaves as it is, past which one listing confirms them instead of a stat each.
LIST_UNCHANGED = 256


class _Finder:
    """A message's current name by its base, from one listing of the folder made at the first miss."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listing: dict[str, str] | None = None

    def find(self, failed: str) -> str | None:
        base = base_of(failed)
        if self.listing is not None:
            now = self.listing.get(base)
            if now is not None and now != failed:
                return now
        for _ in range(2):  # a file moving from new/ to cur/ while listed can be missed once
            self.listing = maildir_names.folder_listing(self.path) or {}
            now = self.listing.get(base)
            if now is not None:
                return now
        return None


def _delta(old: str, new: str) -> Callable[[str], str]:
    """The flag letters C{old} -> C{new} adds and removes, applied to another name of the message."""
    before, after = set(info_of(old)), set(info_of(new))
    added, removed = after - before, before - after

    def replan(now: str) -> str:
        letters = "".join(sorted((set(info_of(now)) - removed) | added))
        return "cur/" + maildir_names.with_flags(base_of(now), letters)

    return replan


def rename_files(path: str, renames: list[tuple[int, str, str]], keywords: list[str] | None,
                 replan: Callable[[str], str] | None = None) -> list[tuple[int, str]]:
    """
    Flag changes: rename each file C{old} to C{new}; returns the (uid, name
    now) of those whose name changed. A rename is a compare-and-swap on the
    name: it succeeds only while the file still carries the flags the new
    name was worked out from. When another process renamed the file
    meanwhile, the message is found again by its base name and the change
    worked out anew from the flags its name has now: C{replan(name now)},
    by default the letters C{old} -> C{new} adds and removes. Never from
    C{new}, which holds this process's stale view of the other flags.
    A row with C{new == old} asks that the file still be at C{old}.
    """
    if keywords is not None:
        save_keywords(path, keywords)
    finder = _Finder(path)
    if sum(1 for _, old, new in renames if old == new) > LIST_UNCHANGED:
        # One listing confirms them all, as of when it was made, for less than a stat each.
        finder.listing = maildir_names.folder_listing(path) or {}
    done = []
    for uid, old, new in renames:
        rel, target = old, new
        for _ in range(MAX_RENAME_TRIES):
            if target == rel:
                listing = finder.listing
                if (listing.get(base_of(rel)) == rel if listing is not None
                        else os.path.lexists(os.path.join(path, rel))):
                    break
            else:
                try:
                    os.rename(os.path.join(path, rel), os.path.join(path, target))
                    rel = target
                    break
                except FileNotFoundError:
                    pass
            now = finder.find(rel)
            if now is None:
                rel = ""  # expunged or deleted by another process: nothing to rename
                break
            rel, target = now, (replan or _delta(old, new))(now)
        else:
            rel = ""  # renamed by another process at every try: its name is left to the next scan
        if rel and rel != old:
            done.append((uid, rel))
    return done


def unlink_files(path: str, doomed: list[tuple[int, str]],
                 spare: Callable[[str], bool] | None = None) -> list[int]:
    """
    Unlink each message; the uids no longer there. A file another process
    renamed meanwhile is found again by its base name and unlinked too,
    unless C{spare(name now)} says its new flags take it out of the job
    (EXPUNGE: another process took its \\Deleted off).
    """
    finder = _Finder(path)
    gone = []
    for uid, rel in doomed:
        for _ in range(MAX_RENAME_TRIES):
            try:
                os.unlink(os.path.join(path, rel))
                break
            except FileNotFoundError:
                now = finder.find(rel)
                if now is None:
                    break  # removed by another process already
                if spare is not None and spare(now):
                    rel = ""
                    break
                rel = now
        else:
            rel = ""  # renamed by another process at every try: left to the next scan
        if rel:
            gone.append(uid)
    return gone


def transfer_files(src: str, dst: str, rows: list[tuple[int, str]], src_keywords: list[str],
                   dst_keywords: list[str], move: bool, names: UniqueNames,
                   uidvalidity: int, next_uid: int, dst_uids: "array[int]",
                   dst_names: list[str]) -> tuple[list[tuple[int, int, str]], int, list[str]]:
    """
    COPY (hard links) or MOVE (renames) of C{rows} into folder C{dst};
    UIDs in C{dst} are given in the order of C{rows} and its uidlist is
    written before returning. Returns ((src uid, dst uid, dst name), ...),
    the new next UID and C{dst}'s keyword list.
    """
    src_table = _SourceKeywords(src, src_keywords)
    wanted = []
    for _, rel in rows:
        wanted += [f for f in src_table.names(rel) if not f.startswith("\\")]
    keywords = merge_keywords(dst_keywords, wanted)
    if keywords is None:
        keywords = list(dst_keywords)  # keywords past the 26th are dropped
    saved = dst_keywords

    def target_name(base: str, rel: str) -> str:
        nonlocal keywords, saved
        flags = src_table.names(rel)
        more = merge_keywords(keywords, flags)
        if more is not None:
            keywords = more
        if keywords != saved:  # saved before the file that uses the letter is linked
            save_keywords(dst, keywords)
            saved = keywords
        return with_flags(f"cur/{base}", flags, keywords)

    done = []
    for uid, rel in rows:
        base = base_of(rel) if move else names.copy_of(base_of(rel))
        target = target_name(base, rel)
        source = os.path.join(src, rel)
        for attempt in range(2):
            try:
                if move:
                    os.rename(source, os.path.join(dst, target))
                else:
                    link_or_copy(source, os.path.join(dst, target))
                break
            except FileNotFoundError:
                now = find_file(src, rel) if attempt == 0 else None
                if now is None:
                    target = ""
                    break
                source = os.path.join(src, now)
                # Another process renamed it: the copy carries the flags it has now, not the index's,
                # keywords that process gave a letter this index does not know yet included.
                target = target_name(base, now)
        if not target:
            continue
        done.append((uid, next_uid, target))
        next_uid += 1
    if done:
        fsync_directory(os.path.join(dst, "cur"))
        if move:
            fsync_directory(os.path.join(src, "cur"))
        add_to_uidlist(dst, uidvalidity, next_uid, list(dst_uids) + [d for _, d, _ in done],
                       list(dst_names) + [t for _, _, t in done], [(d, t) for _, d, t in done])
    return done, next_uid, keywords


class _SourceKeywords:
    """
    The flag names of a source folder's file names: by the index's keyword
    table, read again from the folder's C{dovecot-keywords} when a name has
    a letter the table does not know (another process gave it), until a
    read brings nothing new (a letter no table names is then dropped).
    """

    def __init__(self, path: str, keywords: list[str]) -> None:
        self.path = path
        self.keywords = keywords
        self._exhausted = False

    def names(self, rel: str) -> list[str]:
        if not self._exhausted and any("a" <= c <= "z" and ord(c) - 97 >= len(self.keywords)
                                       for c in info_of(rel)):
            on_disk = load_keywords(self.path)
            # The table only grows, so the index's letters keep their meaning in it.
            if len(on_disk) > len(self.keywords):
                self.keywords = on_disk
            else:
                self._exhausted = True
        return flag_names(rel, self.keywords)


def append_file(store: MailStore, path: str, data: bytes, flags: list[str], date: float | None,
                keywords: list[str], uidvalidity: int, next_uid: int, uids: "array[int]",
                names: list[str]) -> tuple[int, str, list[str]]:
    """APPEND: deliver durably, set the internal date, give it the next UID."""
    merged = merge_keywords(keywords, flags)
    if merged is None:
        raise ValueError("too many keywords")
    if merged != keywords:
        save_keywords(path, merged)
    letters = info_of(with_flags("cur/x", flags, merged))
    name = store.deliver_to([Maildir(path)], data.replace(b"\r\n", b"\n"), letters)
    rel = ("cur/" if letters else "new/") + name
    if date is not None:
        os.utime(os.path.join(path, rel), (date, date))
    add_to_uidlist(path, uidvalidity, next_uid + 1, list(uids) + [next_uid], list(names) + [rel],
                   [(next_uid, rel)])
    return next_uid, rel, merged
