# -*- test-case-name: tests.test_imap -*-
"""
One account's folders as IMAP names: INBOX is the account's Maildir,
every other folder a Maildir++ subfolder C{<inbox>/.<name>} (the names
allowed and how they are stored: L{imap_names}). Subscriptions are kept
one name per line in C{<inbox>/subscriptions}. The special-use folders
are created (and subscribed) at an account's first IMAP login.

A change to the hierarchy is checked whole (every name it would make, the
account's folder limit) before anything on disk is touched, and undone if
the disk fails it half-way, so a refused CREATE or RENAME leaves nothing
behind.

All methods here block; the server calls them in the worker pool under
the account lock.
"""

from __future__ import annotations

import os
import shutil
import time

from twisted_mail_screen.protocols.imap.flags import KEYWORDS_FILE
from twisted_mail_screen.runtime.atomic import write_atomically
from twisted_mail_screen.protocols.imap.names import (DELIMITER, FolderError, check_name, dir_name, folder_dir,
                                            name_problem)
from twisted_mail_screen.store.maildir import Maildir

__all__ = ["DELIMITER", "FolderError", "AccountFolders", "check_name", "dir_name", "folder_dir",
           "SPECIAL_USE"]

SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash",
               "Junk": "\\Junk", "Archive": "\\Archive"}
SUBSCRIPTIONS = "subscriptions"
INIT_MARKER = "mailscreen-imap"
DEFAULT_MAX_FOLDERS = 1000


class AccountFolders:
    """Folder names and subscriptions of one account (blocking calls)."""

    def __init__(self, inbox: str, max_folders: int = DEFAULT_MAX_FOLDERS) -> None:
        self.inbox = inbox
        self.max_folders = max_folders

    def path(self, name: str) -> str:
        check_name(name)
        return folder_dir(self.inbox, name)

    def exists(self, name: str) -> bool:
        return Maildir(self.path(name)).exists()

    def names(self) -> list[str]:
        """Every selectable folder, INBOX first."""
        out = ["INBOX"]
        try:
            with os.scandir(self.inbox) as it:
                for e in it:
                    name = dir_name(e.name)
                    if name is not None and os.path.isdir(os.path.join(e.path, "cur")):
                        out.append(name)
        except FileNotFoundError:
            pass
        return out

    def setup(self) -> None:
        """Create INBOX, and the special-use folders at the first login."""
        Maildir(self.inbox).create()
        marker = os.path.join(self.inbox, INIT_MARKER)
        if os.path.exists(marker):
            return
        for name in SPECIAL_USE:
            if not self.exists(name):
                self._make(name)
        subs = self.subscriptions()
        for name in ["INBOX", *SPECIAL_USE]:
            if name not in subs:
                subs.append(name)
        self.save_subscriptions(subs)
        write_atomically(marker, b"special-use folders created\n")

    def _make(self, name: str) -> None:
        path = self.path(name)
        Maildir(path).create()
        flag = os.path.join(path, "maildirfolder")
        if not os.path.exists(flag):
            with open(flag, "wb"):
                pass

    def _missing(self, name: str) -> list[str]:
        """C{name} and its ancestors that are not folders yet, outermost first."""
        parts = name.split(DELIMITER)
        prefixes = [DELIMITER.join(parts[:i]) for i in range(1, len(parts) + 1)]
        return [p for p in prefixes if p != "INBOX" and not self.exists(p)]

    def _check_room(self, adding: int) -> None:
        if adding and len(self.names()) + adding > self.max_folders:
            raise FolderError(f"Too many mailboxes (at most {self.max_folders} per account)", "LIMIT")

    def _make_all(self, names: list[str]) -> list[str]:
        """Create C{names} in order; on a disk error remove what this call made, then re-raise."""
        made: list[str] = []
        try:
            for name in names:
                fresh = not os.path.lexists(self.path(name))
                self._make(name)
                if fresh:
                    made.append(name)
        except OSError:
            for name in reversed(made):
                shutil.rmtree(self.path(name), ignore_errors=True)
            raise
        return made

    def create(self, name: str) -> None:
        check_name(name)
        missing = self._missing(name)
        if name not in missing:  # INBOX, or a folder already there (one stat per level, not two for the last)
            raise FolderError("Mailbox already exists", "ALREADYEXISTS")
        self._check_room(len(missing))
        self._make_all(missing)

    def delete(self, name: str) -> None:
        if name == "INBOX":
            raise FolderError("INBOX cannot be deleted", "CANNOT")
        path = self.path(name)
        if not os.path.isdir(path):
            raise FolderError("No such mailbox", "NONEXISTENT")
        doomed = os.path.join(self.inbox, f".#deleted-{time.time_ns()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def has_children(self, name: str) -> bool:
        prefix = name + DELIMITER
        return any(n.startswith(prefix) for n in self.names())

    def rename(self, old: str, new: str) -> list[tuple[str, str]]:
        """
        Rename a folder and its subfolders; returns the (old dir, new dir)
        pairs. Renaming INBOX moves its messages into the new folder.
        """
        if name_problem(old) is not None:
            raise FolderError("No such mailbox", "NONEXISTENT")
        check_name(new)
        if new == "INBOX" or self.exists(new):
            raise FolderError("Target mailbox already exists", "ALREADYEXISTS")
        if old == "INBOX":
            self._check_room(len(self._missing(new)))
            self._make_all(self._missing(new))
            self._move_inbox_messages(self.path(new))
            return []
        if not os.path.isdir(self.path(old)):
            raise FolderError("No such mailbox", "NONEXISTENT")
        if (new + DELIMITER).startswith(old + DELIMITER):
            raise FolderError("Cannot rename a mailbox into itself", "CANNOT")
        renamed = [(n, new + n[len(old):]) for n in self.names()
                   if n == old or n.startswith(old + DELIMITER)]
        for _, target in renamed:
            check_name(target)  # a subfolder's new name may be too long
            if self.exists(target):
                raise FolderError(f"Target mailbox {target!r} already exists", "ALREADYEXISTS")
        parents = self._missing(DELIMITER.join(new.split(DELIMITER)[:-1])) if DELIMITER in new else []
        self._check_room(len(parents))
        made = self._make_all(parents)
        moves = [(self.path(a), self.path(b)) for a, b in renamed]
        done: list[tuple[str, str]] = []
        try:
            for src, dst in moves:
                os.rename(src, dst)
                done.append((src, dst))
        except OSError:
            for src, dst in reversed(done):
                os.rename(dst, src)
            for name in reversed(made):
                shutil.rmtree(self.path(name), ignore_errors=True)
            raise
        subs = self.subscriptions()
        changed = [new + s[len(old):] if s == old or s.startswith(old + DELIMITER) else s for s in subs]
        if changed != subs:
            self.save_subscriptions(changed)
        return moves

    def _move_inbox_messages(self, target: str) -> None:
        # Keyword letters in the file names mean what INBOX's table says.
        try:
            with open(os.path.join(self.inbox, KEYWORDS_FILE), "rb") as f:
                write_atomically(os.path.join(target, KEYWORDS_FILE), f.read())
        except FileNotFoundError:
            pass
        for sub in ("new", "cur"):
            src = os.path.join(self.inbox, sub)
            for entry in os.listdir(src):
                if not entry.startswith("."):
                    try:
                        os.rename(os.path.join(src, entry), os.path.join(target, sub, entry))
                    except FileNotFoundError:
                        pass

    def subscriptions(self) -> list[str]:
        """Subscribed names; a name no folder could have (a file from elsewhere) is left out."""
        try:
            with open(os.path.join(self.inbox, SUBSCRIPTIONS), encoding="utf-8",
                      errors="surrogateescape") as f:
                return [line for line in f.read().split("\n") if line and name_problem(line) is None]
        except FileNotFoundError:
            return []

    def save_subscriptions(self, names: list[str]) -> None:
        write_atomically(os.path.join(self.inbox, SUBSCRIPTIONS),
                         "".join(n + "\n" for n in names).encode("utf-8", "surrogateescape"))

    def subscribe(self, name: str, on: bool) -> None:
        """
        SUBSCRIBE needs an existing folder (as Dovecot answers); UNSUBSCRIBE
        takes any subscribed name, its folder deleted or not.
        """
        subs = self.subscriptions()
        if not on:
            if name in subs:
                subs.remove(name)
                self.save_subscriptions(subs)
            return
        check_name(name)
        if not self.exists(name):
            raise FolderError("No such mailbox", "NONEXISTENT")
        if name in subs:
            return
        if len(subs) >= self.max_folders:
            # Names of deleted folders stay subscribed (RFC 3501 6.3.6) until room is needed.
            existing = set(self.names())
            subs = [s for s in subs if s in existing]
            if len(subs) >= self.max_folders:
                raise FolderError(f"Too many subscriptions (at most {self.max_folders})", "LIMIT")
        subs.append(name)
        self.save_subscriptions(subs)
