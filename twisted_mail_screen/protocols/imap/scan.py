# -*- test-case-name: tests.test_imap_concurrency -*-
"""
Bringing a folder's index up to date with its directories (worker
thread): list new/ and cur/, give new files UIDs in delivery order, write
the UID map, and optionally claim new/ files for a read-write session.
The result is applied to the L{Folder} on the reactor thread.
"""

from __future__ import annotations

import os
import time
from array import array
from dataclasses import dataclass, field

from twisted.logger import Logger

from twisted_mail_screen.protocols.imap.flags import base_of, load_keywords, size_of_name
from twisted_mail_screen.protocols.imap.modseq import ModSeqs, reconcile
from twisted_mail_screen.store import maildir_names, modseqlist, uidlist
from twisted_mail_screen.store.folderlock import Signature, folder_lock, signature
from twisted_mail_screen.store.maildir import crlf_size
from twisted_mail_screen.store.maildir_names import delivery_order

log = Logger()


def _stamp(path: str) -> tuple[int, int, int] | None:
    """The mtimes of new/ and cur/, and the inode of cur/ (a folder made anew differs)."""
    try:
        cur = os.stat(os.path.join(path, "cur"))
        return (os.stat(os.path.join(path, "new")).st_mtime_ns, cur.st_mtime_ns, cur.st_ino)
    except FileNotFoundError:
        return None


@dataclass
class ScanResult:
    unchanged: bool = False
    gone: bool = False
    loaded: bool = False
    reason: str | None = None
    uidvalidity: int = 0
    next_uid: int = 1
    uids: "array[int]" = field(default_factory=lambda: array("L"))
    names: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)
    renamed: list[tuple[int, str]] = field(default_factory=list)
    vanished: list[int] = field(default_factory=list)
    added: list[tuple[int, str]] = field(default_factory=list)
    claimed: list[int] = field(default_factory=list)
    sizes: dict[int, int] = field(default_factory=dict)
    stamp: tuple[int, int, int] | None = None
    identity: int | None = None
    #: the version of the UID list and keyword file the index now matches
    signature: Signature | None = None
    #: the keyword table, when another process changed it
    reloaded_keywords: list[str] | None = None
    #: the RFC 7162 mod-sequences, read and reconciled with the directory at load
    modseqs: ModSeqs | None = None
    #: what another process sharing the folder last gave out (its changes get higher ones here)
    others_modseq: int = 0


def _claim(path: str, rel: str) -> str | None:
    """Move a file from new/ to cur/ (it becomes \\Recent for the claimer)."""
    target = f"cur/{rel[4:]}" + ("" if ":2," in rel else ":2,")
    try:
        os.rename(os.path.join(path, rel), os.path.join(path, target))
    except FileNotFoundError:
        return None
    return target


def scan_folder(path: str, loaded: bool, uids: "array[int]", names: list[str],
                uidvalidity: int, next_uid: int, known_stamp: tuple[int, int, int] | None,
                claim: bool, identity: int | None = None,
                known_signature: Signature | None = None) -> ScanResult:
    """
    Bring a folder's index up to date with its directories (worker thread).
    New files get UIDs and the uidlist is written before this returns.
    With C{claim}, files in new/ are moved to cur/ and reported as claimed.
    All of it runs under the folder's cross-process lock; when another
    process changed the UID list since C{known_signature}, the UIDs it gave
    are read and kept.
    """
    stamp = _stamp(path)
    if stamp is None or (loaded and identity is not None and stamp[2] != identity):
        return ScanResult(gone=True)
    try:
        with folder_lock(path):
            r = _scan(path, loaded, uids, names, uidvalidity, next_uid, known_stamp, claim,
                      stamp, known_signature)
            if not (r.gone or r.unchanged):
                r.signature = signature(path)
            return r
    except FileNotFoundError:
        return ScanResult(gone=True)  # the folder went before its lock file could be opened


def _scan(path: str, loaded: bool, uids: "array[int]", names: list[str], uidvalidity: int,
          next_uid: int, known_stamp: tuple[int, int, int] | None, claim: bool,
          stamp: tuple[int, int, int], known_signature: Signature | None) -> ScanResult:
    foreign = loaded and signature(path) != known_signature
    if loaded and stamp == known_stamp and not foreign:
        return ScanResult(unchanged=True)
    if loaded and not os.path.exists(os.path.join(path, uidlist.FILENAME)):
        return ScanResult(gone=True)  # deleted and made again, or the map was removed
    r = ScanResult(loaded=not loaded)
    dirty = False
    if not loaded:
        ul, r.reason = uidlist.load(path)
        dirty = ul.dirty  # records appended since the last rewrite: compact them
        uids, names = ul.uids, [f"new/{b}" for b in ul.bases]
        uidvalidity, next_uid = ul.uidvalidity, ul.next_uid
        r.keywords = load_keywords(path)
        if r.reason is not None:
            log.warn("imap: uid list of {path} {reason}; new UIDVALIDITY {v}",
                     path=path, reason=r.reason, v=uidvalidity)
    disk: dict[str, int] = {}
    if foreign:
        ul, why = uidlist.load(path)
        if why is None:
            if ul.uidvalidity != uidvalidity:
                return ScanResult(gone=True)  # another process started the folder's UIDs afresh
            disk = dict(zip(ul.bases, ul.uids))
            next_uid = max(next_uid, ul.next_uid)
        r.reloaded_keywords = load_keywords(path)
    listing = maildir_names.folder_listing(path)
    if listing is None:
        return ScanResult(gone=True)
    kept_names = []
    missing: list[int] = []
    vanished: set[int] = set()
    for i, rel in enumerate(names):
        if disk.get(base_of(rel), uids[i]) != uids[i]:
            # Another process gave this base a new UID (moved out and back): a new message.
            vanished.add(uids[i])
            kept_names.append(rel)
            continue
        now = listing.pop(base_of(rel), None)
        if now is None:
            missing.append(i)
            now = rel
        kept_names.append(now)
    if missing:
        # A file renamed by another program while we listed can be missed
        # once; look again before calling anything gone.
        again = maildir_names.folder_listing(path) or {}
        for i in missing:
            now = again.get(base_of(names[i]))
            if now is None:
                vanished.add(uids[i])
            else:
                kept_names[i] = now
    # Files another process gave UIDs keep them (they are above every UID
    # this index has); the rest get new ones, in delivery order.
    last = max(uids) if len(uids) else 0
    added = sorted((disk[b], rel) for b, rel in listing.items() if disk.get(b, 0) > last)
    fresh = sorted(((b, rel) for b, rel in listing.items() if disk.get(b, 0) <= last),
                   key=lambda kv: delivery_order(kv[0]))
    for _, rel in fresh:
        added.append((next_uid, rel))
        next_uid += 1
    if claim:
        for i, rel in enumerate(kept_names):
            if rel.startswith("new/") and uids[i] not in vanished:
                target = _claim(path, rel)
                if target is not None:
                    kept_names[i] = target
                    r.claimed.append(uids[i])
        for j, (uid, rel) in enumerate(added):
            if rel.startswith("new/"):
                target = _claim(path, rel)
                if target is not None:
                    added[j] = (uid, target)
                    r.claimed.append(uid)
    if loaded:
        r.renamed = [(u, n) for u, n, old in zip(uids, kept_names, names) if n != old]
    r.vanished = sorted(vanished)
    r.added = added
    unsized = added if loaded else list(zip(uids, kept_names)) + added
    for uid, rel in unsized:
        if size_of_name(rel) is None and uid not in vanished:
            try:
                with open(os.path.join(path, rel), "rb") as f:
                    r.sizes[uid] = crlf_size(f.read())
            except FileNotFoundError:
                r.sizes[uid] = 0
    if r.reason is not None or added or vanished or not loaded:
        all_uids = array("L", (u for u in uids if u not in vanished))
        all_names = [n for u, n in zip(uids, kept_names) if u not in vanished]
        for uid, rel in added:
            all_uids.append(uid)
            all_names.append(rel)
        if r.reason is not None or added or vanished or dirty:
            uidlist.UidList(uidvalidity, next_uid, all_uids, [base_of(n) for n in all_names]).save(path)
        r.uids, r.names = all_uids, all_names
    r.uidvalidity, r.next_uid = uidvalidity, next_uid
    if not loaded:
        r.modseqs = reconcile(path, uidvalidity, r.reason is not None, r.uids, r.names)
    elif r.renamed or r.vanished or r.added:
        r.others_modseq = modseqlist.recent_highest(path)
    r.stamp = stamp if time.time_ns() - max(stamp[:2]) > 2_000_000_000 else None
    r.identity = stamp[2]
    return r
