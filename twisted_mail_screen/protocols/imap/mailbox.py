# -*- test-case-name: tests.test_imap_concurrency -*-
"""
The in-memory index of a Maildir folder, shared by every IMAP session of
the process that has it selected.

A L{Folder} holds the folder's UIDVALIDITY, next UID and, in ascending UID
order, each message's UID and current file name (C{cur/<base>:2,<flags>}
relative to the folder). Nothing else per message is kept; sizes come from
the C{W=} field of the name and bodies are read when asked for.

Every change (new message, flag change, message gone) is appended to the
folder's change log with the session that caused it. Each session keeps
its own view (the UIDs it has announced, hence its sequence numbers) and
catches up from the log only at the points RFC 3501 allows. The log is
trimmed to what the slowest attached session has not yet seen.

Everything that touches the files of one account (scans, renames, copies,
deletions, uidlist writes) runs in the worker pool one at a time per
account, under a L{DeferredLock}; bodies are read without the lock. A
folder with sessions attached is checked once a second on the injected
clock (two C{stat}s; a full rescan only when a directory changed), so
mail that SMTP delivers or another tool writes gets a UID and reaches
IDLE-ing clients within a second.
"""

from __future__ import annotations

import bisect
import os
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from twisted_mail_screen.store import uidlist
from twisted_mail_screen.runtime.atomic import fsync_directory, write_atomically
from twisted_mail_screen.store.maildir import Maildir, _delivery_order, crlf_size, link_or_copy

if TYPE_CHECKING:
    from twisted_mail_screen.protocols.imap.registry import Registry

NEW, EXPUNGE, FLAGS = 1, 2, 3
POLL_SECONDS = 1.0
KEYWORDS_FILE = "dovecot-keywords"
MAX_KEYWORDS = 26

LETTER_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}
FLAG_LETTERS = {v.lower(): k for k, v in LETTER_FLAGS.items()}
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")

log = Logger()


# File names and flags ----------------------------------------------------------

def base_of(rel: str) -> str:
    return rel[4:].split(":", 1)[0]


def info_of(rel: str) -> str:
    _, sep, info = rel.partition(":2,")
    return info if sep else ""


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
    return f"cur/{base}:2,{''.join(sorted(letters))}"


def size_of_name(rel: str) -> int | None:
    for part in base_of(rel).split(",")[1:]:
        k, _, v = part.partition("=")
        if k == "W" and v.isdigit():
            return int(v)
    return None


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


# Scanning ---------------------------------------------------------------------------

def _listing(path: str) -> dict[str, str] | None:
    found: dict[str, str] = {}
    for sub in ("new", "cur"):
        try:
            with os.scandir(os.path.join(path, sub)) as it:
                for e in it:
                    if not e.name.startswith("."):
                        found[e.name.split(":", 1)[0]] = f"{sub}/{e.name}"
        except FileNotFoundError:
            if sub == "cur":
                return None
    return found


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
                claim: bool, identity: int | None = None) -> ScanResult:
    """
    Bring a folder's index up to date with its directories (worker thread).
    New files get UIDs and the uidlist is written before this returns.
    With C{claim}, files in new/ are moved to cur/ and reported as claimed.
    """
    stamp = _stamp(path)
    if stamp is None or (loaded and identity is not None and stamp[2] != identity):
        return ScanResult(gone=True)
    if loaded and stamp == known_stamp:
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
    listing = _listing(path)
    if listing is None:
        return ScanResult(gone=True)
    kept_names = []
    missing: list[int] = []
    for i, rel in enumerate(names):
        now = listing.pop(base_of(rel), None)
        if now is None:
            missing.append(i)
            now = rel
        kept_names.append(now)
    vanished: set[int] = set()
    if missing:
        # A file renamed by another program while we listed can be missed
        # once; look again before calling anything gone.
        again = _listing(path) or {}
        for i in missing:
            now = again.get(base_of(names[i]))
            if now is None:
                vanished.add(uids[i])
            else:
                kept_names[i] = now
    fresh = sorted(listing.items(), key=lambda kv: _delivery_order(kv[0]))
    added = []
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
    r.stamp = stamp if time.time_ns() - max(stamp[:2]) > 2_000_000_000 else None
    r.identity = stamp[2]
    return r


# Folders -------------------------------------------------------------------------------

class Folder:
    """One Maildir folder's index (see the module docstring)."""

    def __init__(self, registry: "Registry", path: str, lock: DeferredLock) -> None:
        self.registry = registry
        self.path = path
        self.lock = lock
        self.loaded = False
        self.uidvalidity = 0
        self.next_uid = 1
        self.uids: array[int] = array("L")
        self.names: list[str] = []
        self.sizes: dict[int, int] = {}
        self.unclaimed: set[int] = set()
        self.keywords: list[str] = []
        self.log: list[tuple[int, int, Any]] = []  # (kind, uid, origin)
        self.log_start = 0  # modseq just before log[0]
        self.stamp: tuple[int, int, int] | None = None
        self.identity: int | None = None
        self.sessions: list[Any] = []
        # Set when the folder was found deleted: sessions that had it selected
        # keep this (emptied) index, a folder made again gets a new one.
        self.retired = False
        self.cache = registry.budget.cache()
        self._poll_call: Any = None
        self._polling = False

    # lookups

    @property
    def modseq(self) -> int:
        return self.log_start + len(self.log)

    def position(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        return i if i < len(self.uids) and self.uids[i] == uid else None

    def name(self, uid: int) -> str | None:
        i = self.position(uid)
        return None if i is None else self.names[i]

    def size(self, uid: int, rel: str) -> int:
        s = size_of_name(rel)
        return s if s is not None else self.sizes.get(uid, 0)

    def flags(self, rel: str) -> list[str]:
        return flag_names(rel, self.keywords)

    # sessions

    def attach(self, session: Any) -> int:
        self.sessions.append(session)
        if self._poll_call is None:
            self._poll_call = self.registry.clock.callLater(POLL_SECONDS, self._poll)
        return self.modseq

    def detach(self, session: Any) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
        if not self.sessions:
            if self._poll_call is not None and self._poll_call.active():
                self._poll_call.cancel()
            self._poll_call = None
            self.log, self.log_start = [], self.modseq
            self.registry.idle(self)
        else:
            self.trim()

    def claimer(self) -> Any:
        for s in self.sessions:
            if s.writable:
                return s
        return None

    def _poll(self) -> None:
        self._poll_call = None
        if not self.sessions:
            return
        if not self._polling:
            self._polling = True
            d = self.registry.sync(self)
            d.addErrback(lambda f: log.failure("imap: poll of {path} failed", f, path=self.path))
            d.addBoth(self._polled)
        self._poll_call = self.registry.clock.callLater(POLL_SECONDS, self._poll)

    def _polled(self, _: object) -> None:
        self._polling = False

    # changes (reactor thread, under the account lock)

    def record(self, kind: int, uid: int, origin: Any) -> None:
        self.log.append((kind, uid, origin))

    def entries_since(self, modseq: int) -> list[tuple[int, int, Any]]:
        return self.log[max(0, modseq - self.log_start):]

    def trim(self) -> None:
        if not self.sessions:
            return
        low = min(s.seen for s in self.sessions)
        drop = low - self.log_start
        if drop > 0:
            del self.log[:drop]
            self.log_start = low

    def notify(self) -> None:
        for s in list(self.sessions):
            s.folder_changed()

    def apply_scan(self, r: ScanResult, claimer: Any) -> None:
        if r.unchanged:
            return
        if r.gone:
            self.registry.retire(self)
            return
        if r.loaded:
            self.uidvalidity, self.next_uid = r.uidvalidity, r.next_uid
            self.uids, self.names, self.keywords = r.uids, r.names, r.keywords
            for uid in r.uids if self.sessions else ():
                self.record(NEW, uid, None)
            self.sizes.update(r.sizes)
            if claimer is not None:
                claimer.recent.update(r.claimed)
            self.loaded = True
            self.stamp, self.identity = r.stamp, r.identity
            return
        for uid, rel in r.renamed:
            i = self.position(uid)
            if i is not None:
                old = self.names[i]
                self.names[i] = rel
                if info_of(old) != info_of(rel):
                    self.record(FLAGS, uid, None)
        if r.vanished:
            self.remove(r.vanished, None)
        claimed = set(r.claimed)
        for uid, rel in r.added:
            self.uids.append(uid)
            self.names.append(rel)
            self.record(NEW, uid, claimer if uid in claimed else None)
        if claimer is not None:
            claimer.recent.update(r.claimed)
        self.sizes.update(r.sizes)
        self.next_uid = r.next_uid
        self.stamp = r.stamp
        if r.renamed or r.vanished or r.added:
            self.notify()

    def vanish(self) -> None:
        """The folder was deleted: every message is expunged for the attached sessions."""
        self.loaded = False
        self.cache.clear()
        self.stamp = None
        if self.uids:
            for uid in self.uids:
                self.record(EXPUNGE, uid, None)
            self.uids, self.names = array("L"), []
            self.notify()

    def remove(self, uids: Iterable[int], origin: Any) -> None:
        gone = set(uids)
        if not gone:
            return
        keep = [i for i, u in enumerate(self.uids) if u not in gone]
        if len(keep) == len(self.uids):
            return
        removed = [u for u in self.uids if u in gone]
        self.cache.drop([base_of(n) for u, n in zip(self.uids, self.names) if u in gone])
        self.uids = array("L", (self.uids[i] for i in keep))
        self.names = [self.names[i] for i in keep]
        for uid in removed:
            self.sizes.pop(uid, None)
            self.record(EXPUNGE, uid, origin)

    def add(self, entries: list[tuple[int, str]], next_uid: int) -> None:
        """
        Messages this server put into the folder (APPEND, COPY, MOVE). They
        are \\Recent for the read-write session that has the folder
        selected, or else for the next one to select it.
        """
        claimer = self.claimer()
        for uid, rel in entries:
            self.uids.append(uid)
            self.names.append(rel)
            self.record(NEW, uid, claimer)
            if claimer is None:
                self.unclaimed.add(uid)
        self.next_uid = max(self.next_uid, next_uid)

    def claim(self, session: Any) -> set[int]:
        """Recent messages not yet given to any session (they go to C{session})."""
        present = set(self.uids)
        out = {u for u in self.unclaimed if u in present}
        if session.writable:
            self.unclaimed.clear()
        return out

    def recent_count(self) -> int:
        """Messages with \\Recent: in new/, not yet claimed, or recent in an attached session."""
        recent = {u for u, n in zip(self.uids, self.names) if n.startswith("new/")}
        recent |= self.unclaimed
        for s in self.sessions:
            recent |= s.recent
        present = set(self.uids)
        return sum(1 for u in recent if u in present)

    def uidlist_snapshot(self) -> tuple[int, int, "array[int]", list[str]]:
        return self.uidvalidity, self.next_uid, array("L", self.uids), list(self.names)


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


# Jobs that change files (worker thread, under the account lock) -------------------

_unique_lock = __import__("threading").Lock()
_unique_count = 0


def unique_base(old_base: str, hostname: str) -> str:
    """A fresh Maildir base name keeping C{old_base}'s C{,S=,W=} size fields."""
    global _unique_count
    with _unique_lock:
        _unique_count += 1
        n = _unique_count
    now = time.time()
    host = hostname.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
    sizes = "".join("," + p for p in old_base.split(",")[1:] if p[:2] in ("S=", "W="))
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}X{n}.{host}{sizes}"


def rename_files(path: str, renames: list[tuple[int, str, str]],
                 keywords: list[str] | None) -> list[tuple[int, str]]:
    """Flag changes: rename each file; returns the (uid, new name) that were done."""
    from twisted_mail_screen.protocols.imap.fetch import find_file

    if keywords is not None:
        save_keywords(path, keywords)
    done = []
    for uid, old, new in renames:
        try:
            os.rename(os.path.join(path, old), os.path.join(path, new))
        except FileNotFoundError:
            now = find_file(path, old)
            if now is None:
                continue
            new = new.split(":", 1)[0] + ":2," + info_of(new)
            new = "cur/" + new[4:]
            try:
                os.rename(os.path.join(path, now), os.path.join(path, new))
            except FileNotFoundError:
                continue
        done.append((uid, new))
    return done


def unlink_files(path: str, doomed: list[tuple[int, str]]) -> list[int]:
    from twisted_mail_screen.protocols.imap.fetch import find_file

    gone = []
    for uid, rel in doomed:
        try:
            os.unlink(os.path.join(path, rel))
        except FileNotFoundError:
            now = find_file(path, rel)
            if now is not None:
                try:
                    os.unlink(os.path.join(path, now))
                except FileNotFoundError:
                    pass
        gone.append(uid)
    return gone


def transfer_files(src: str, dst: str, rows: list[tuple[int, str]], src_keywords: list[str],
                   dst_keywords: list[str], move: bool, hostname: str,
                   uidvalidity: int, next_uid: int, dst_uids: "array[int]",
                   dst_names: list[str]) -> tuple[list[tuple[int, int, str]], int, list[str]]:
    """
    COPY (hard links) or MOVE (renames) of C{rows} into folder C{dst};
    UIDs in C{dst} are given in the order of C{rows} and its uidlist is
    written before returning. Returns ((src uid, dst uid, dst name), ...),
    the new next UID and C{dst}'s keyword list.
    """
    from twisted_mail_screen.protocols.imap.fetch import find_file  # imap_fetch imports this module

    wanted = []
    for _, rel in rows:
        wanted += [f for f in flag_names(rel, src_keywords) if not f.startswith("\\")]
    keywords = merge_keywords(dst_keywords, wanted)
    if keywords is None:
        keywords = list(dst_keywords)  # keywords past the 26th are dropped
    if keywords != dst_keywords:
        save_keywords(dst, keywords)
    done = []
    for uid, rel in rows:
        flags = flag_names(rel, src_keywords)
        base = base_of(rel) if move else unique_base(base_of(rel), hostname)
        target = with_flags(f"cur/{base}", flags, keywords)
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


def append_file(store: Any, path: str, data: bytes, flags: list[str], date: float | None,
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
