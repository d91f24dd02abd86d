# -*- test-case-name: tests.test_web_messages -*-
"""
The messages API's view of the Maildirs: which messages a caller sees,
their summaries (parsed once per file and cached by base name, which
never changes), and the file changes behind read/unread and delete.

Every method of L{MailFiles} blocks (directory scans, file reads, MIME
parsing, renames): the web handlers call them through the worker pool.

Read is the Maildir C{S} flag, so IMAP clients see it as C{\\Seen} and
POP3 and IMAP see a deleted message gone. Renames and unlinks use the IMAP
store's own file jobs (which follow a file another session renamed), under
the folder's cross-process lock (store/folderlock.py) as IMAP's are.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted_mail_screen.protocols.imap.filejobs import rename_files, unlink_files
from twisted_mail_screen.store import maildir_names
from twisted_mail_screen.store.addresses import AddressError, normalise_address
from twisted_mail_screen.store.folderlock import locked_unless_gone
from twisted_mail_screen.store.maildir import MailStore, crlf_size
from twisted_mail_screen.store.message_ids import MessageRef, valid_base
from twisted_mail_screen.web import summary as summaries
from twisted_mail_screen.web.mailsearch import EVERYTHING, Candidate, Query
from twisted_mail_screen.web.summary import Summary, rfc3339

#: Summaries kept (about 1 KB each); the oldest are dropped past this.
CACHE_ENTRIES = 50_000


@dataclass(frozen=True)
class Found:
    """One message file as a listing found it."""

    ref: MessageRef
    folder_path: str
    rel: str  # "new/<name>" or "cur/<name>:2,<flags>"
    created: float

    @property
    def read(self) -> bool:
        return "S" in maildir_names.flags_of(self.rel)

    @property
    def path(self) -> str:
        return f"{self.folder_path}/{self.rel}"

    def size(self, data: bytes) -> int:
        """The size reported (with CRLF line endings, as POP3 and IMAP count it)."""
        size = maildir_names.size_field(self.rel, "W")
        return size if size is not None else crlf_size(data)


@dataclass(frozen=True)
class Entry:
    found: Found
    summary: Summary

    def candidate(self) -> Candidate:
        return Candidate(self.summary, self.found.read, self.found.created)

    def json(self) -> dict[str, Any]:
        return {"ID": self.found.ref.id, "Read": self.found.read,
                "Created": rfc3339(self.found.created), **self.summary.fields()}


class MailFiles:
    """The blocking half of the messages API (worker threads only)."""

    def __init__(self, store: MailStore, cache_entries: int = CACHE_ENTRIES) -> None:
        self.store = store
        self._cache: OrderedDict[tuple[str, str], Summary] = OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()

    # where messages are

    def folder_path(self, mailbox: str) -> str:
        """The INBOX directory of C{mailbox}, by the store's own rule."""
        return self.store.maildir(mailbox).path

    def mailboxes(self) -> list[str]:
        """Every mailbox that has a Maildir (C{<root>/<domain>/<local>}), as addresses."""
        out = []
        for domain in _subdirs(self.store.root):
            for local in _subdirs(os.path.join(self.store.root, domain)):
                address = f"{local}@{domain}"
                try:
                    if normalise_address(address) != address:
                        continue
                except AddressError:
                    continue
                if os.path.isdir(os.path.join(self.folder_path(address), "cur")):
                    out.append(address)
        return sorted(out)

    def scan(self, mailbox: str) -> list[Found]:
        path = self.folder_path(mailbox)
        found = []
        for sub in ("new", "cur"):
            try:
                with os.scandir(os.path.join(path, sub)) as it:
                    names = [e.name for e in it if not e.name.startswith(".")]
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                base = maildir_names.base_of(name)
                if valid_base(base):
                    found.append(Found(MessageRef(mailbox, "", base), path, f"{sub}/{name}",
                                       _created(path, f"{sub}/{name}", base)))
        return found

    def locate(self, ref: MessageRef) -> Found | None:
        """The file an ID names now (its flags may have changed), or C{None}."""
        path = self.folder_path(ref.mailbox)
        try:
            os.stat(os.path.join(path, "new", ref.base))
            return Found(ref, path, f"new/{ref.base}", _created(path, f"new/{ref.base}", ref.base))
        except (FileNotFoundError, NotADirectoryError):
            pass
        for sub in ("cur", "new"):
            try:
                with os.scandir(os.path.join(path, sub)) as it:
                    for e in it:
                        if e.name == ref.base or e.name.startswith(ref.base + ":"):
                            rel = f"{sub}/{e.name}"
                            return Found(ref, path, rel, _created(path, rel, ref.base))
            except (FileNotFoundError, NotADirectoryError):
                continue
        return None

    # summaries

    def summary(self, found: Found) -> Summary | None:
        key = (found.folder_path, found.ref.base)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            with open(found.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            again = self.locate(found.ref)  # renamed meanwhile (a flag change)
            if again is None:
                return None
            try:
                with open(again.path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
        made = summaries.summarize(data, found.size(data))
        with self._lock:
            self._cache[key] = made
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return made

    def forget(self, folder_path: str, bases: list[str]) -> None:
        with self._lock:
            for base in bases:
                self._cache.pop((folder_path, base), None)

    def entries(self, mailboxes: list[str] | None, query: Query = EVERYTHING) -> tuple[list[Entry], int, int]:
        """
        The messages of C{mailboxes} (C{None}: every one) that match,
        newest first; and the total and unread counts of all of them.
        """
        boxes = self.mailboxes() if mailboxes is None else mailboxes
        everything: list[Found] = []
        for box in boxes:
            everything.extend(self.scan(box))
        everything.sort(key=lambda f: (maildir_names.delivery_order(f.ref.base), f.ref.mailbox),
                        reverse=True)
        matched, total, unread = [], 0, 0
        for found in everything:
            made = self.summary(found)
            if made is None:
                continue  # deleted while we listed
            total += 1
            unread += not found.read
            entry = Entry(found, made)
            if query.matches(entry.candidate()):
                matched.append(entry)
        return matched, total, unread

    def page(self, mailboxes: list[str] | None, query: Query | None, start: int,
             limit: int) -> dict[str, Any]:
        """A Mailpit list answer (C{GET /api/v1/messages} or C{/search})."""
        matched, total, unread = self.entries(mailboxes, query or EVERYTHING)
        shown = [e.json() for e in matched[start:start + limit]]
        return {"total": total, "unread": unread, "count": len(shown),
                "messages_count": len(matched),
                "messages_unread": sum(1 for e in matched if not e.found.read),
                "start": start, "tags": [], "messages": shown}

    def matching(self, mailboxes: list[str] | None, query: Query) -> list[MessageRef]:
        return [e.found.ref for e in self.entries(mailboxes, query)[0]]

    def read(self, ref: MessageRef) -> tuple[Found, bytes] | None:
        found = self.locate(ref)
        if found is None:
            return None
        try:
            with open(found.path, "rb") as f:
                return found, f.read()
        except FileNotFoundError:
            return None

    # changes (each call: one folder, under its account lock in this process
    # and its cross-process folder lock, so another node's STORE, EXPUNGE
    # or MOVE of the same files happens wholly before or after it)

    def set_read(self, mailbox: str, bases: list[str] | None, read: bool) -> list[str]:
        """Add or remove the C{S} flag (C{None}: of every message); the IDs of those changed."""
        folder_path = self.folder_path(mailbox)
        return locked_unless_gone(folder_path, [], self._set_read, mailbox, folder_path, bases, read)

    def _set_read(self, mailbox: str, folder_path: str, bases: list[str] | None, read: bool) -> list[str]:
        current = maildir_names.folder_listing(folder_path) or {}
        renames = []
        for base in current if bases is None else bases:
            rel = current.get(base)
            if rel is None:
                continue
            flags = set(maildir_names.flags_of(rel))
            if ("S" in flags) == read:
                continue  # (an unread message stays in new/, still \Recent for IMAP)
            flags = flags | {"S"} if read else flags - {"S"}
            renames.append((len(renames), rel, "cur/" + maildir_names.with_flags(base, "".join(sorted(flags)))))
        done = rename_files(folder_path, renames, None)
        return [MessageRef(mailbox, "", maildir_names.base_of(rel[4:])).id for _, rel in done]

    def delete(self, mailbox: str, bases: list[str] | None) -> list[str]:
        """Unlink messages (C{None}: every one in the folder); the IDs of those removed."""
        folder_path = self.folder_path(mailbox)
        return locked_unless_gone(folder_path, [], self._delete, mailbox, folder_path, bases)

    def _delete(self, mailbox: str, folder_path: str, bases: list[str] | None) -> list[str]:
        current = maildir_names.folder_listing(folder_path) or {}
        wanted = list(current) if bases is None else [b for b in bases if b in current]
        unlink_files(folder_path, [(i, current[b]) for i, b in enumerate(wanted)])
        self.forget(folder_path, wanted)
        return [MessageRef(mailbox, "", b).id for b in wanted]


def _created(folder_path: str, rel: str, base: str) -> float:
    """When the message arrived: its unique name says; else the file's mtime."""
    sec, usec, _, _ = maildir_names.delivery_order(base)
    if sec:
        return sec + usec / 1e6
    try:
        return os.stat(os.path.join(folder_path, rel)).st_mtime
    except OSError:
        return 0.0


def _subdirs(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [e.name for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
