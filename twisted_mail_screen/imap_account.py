# -*- test-case-name: tests.test_imap_folders -*-
"""
One account's folders as IMAP names: INBOX is the account's Maildir,
every other folder a Maildir++ subfolder C{<inbox>/.<name>}.

Clients see C{/} as the hierarchy delimiter: C{Archive/2024} is stored as
C{.Archive.2024}. On disk each name component is in modified UTF-7 (as
Dovecot stores it) with a C{.} inside a component written C{&AC4-}, so
any name a client can create round-trips. Subscriptions are kept one
name per line in C{<inbox>/subscriptions}. The special-use folders are
created (and subscribed) at an account's first IMAP login.

All methods here block; the server calls them in the worker pool under
the account lock.
"""

from __future__ import annotations

import os
import re
import shutil
import time

from twisted_mail_screen.atomic import write_atomically
from twisted_mail_screen.maildir import Maildir

DELIMITER = "/"
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash",
               "Junk": "\\Junk", "Archive": "\\Archive"}
SUBSCRIPTIONS = "subscriptions"
INIT_MARKER = "mailscreen-imap"
KEYWORDS_FILE = "dovecot-keywords"  # as in imap_mailbox
MAX_NAME = 512


class FolderError(Exception):
    """An operation on folders that is refused; C{code} is the response code."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def _encode_component(part: str) -> str:
    return part.encode("imap4-utf-7").decode("ascii").replace(".", "&AC4-")


def _decode_component(part: str) -> str:
    try:
        return part.encode("ascii").decode("imap4-utf-7")
    except Exception:
        return part


def check_name(name: str) -> None:
    if name == "INBOX":
        return
    if not name or len(name) > MAX_NAME:
        raise FolderError("Invalid mailbox name", "CANNOT")
    parts = name.split(DELIMITER)
    for p in parts:
        if not p or any(ord(c) < 0x20 or c in "*%\x7f" for c in p):
            raise FolderError("Invalid mailbox name", "CANNOT")


def folder_dir(inbox: str, name: str) -> str:
    """The directory of a folder (the name must have passed L{check_name})."""
    if name == "INBOX":
        return inbox
    return os.path.join(inbox, "." + ".".join(_encode_component(p) for p in name.split(DELIMITER)))


def dir_name(entry: str) -> str | None:
    """The IMAP name of a C{.Name} directory entry, C{None} if it is not one."""
    if not entry.startswith(".") or entry in (".", "..") or entry.startswith(".#"):
        return None
    parts = entry[1:].split(".")
    if any(not p for p in parts):
        return None
    return DELIMITER.join(_decode_component(p) for p in parts)


class AccountFolders:
    """Folder names and subscriptions of one account (blocking calls)."""

    def __init__(self, inbox: str) -> None:
        self.inbox = inbox

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

    def create(self, name: str) -> None:
        check_name(name)
        if name == "INBOX" or self.exists(name):
            raise FolderError("Mailbox already exists", "ALREADYEXISTS")
        parts = name.split(DELIMITER)
        for i in range(1, len(parts) + 1):
            sub = DELIMITER.join(parts[:i])
            if sub != "INBOX" and not self.exists(sub):
                self._make(sub)

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
        check_name(old)
        check_name(new)
        if new == "INBOX" or self.exists(new):
            raise FolderError("Target mailbox already exists", "ALREADYEXISTS")
        if old == "INBOX":
            self.create(new)
            target = self.path(new)
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
            return []
        if not os.path.isdir(self.path(old)):
            raise FolderError("No such mailbox", "NONEXISTENT")
        if (new + DELIMITER).startswith(old + DELIMITER):
            raise FolderError("Cannot rename a mailbox into itself", "CANNOT")
        parent = DELIMITER.join(new.split(DELIMITER)[:-1])
        if parent and parent != "INBOX" and not self.exists(parent):
            self.create(parent)
        moves = []
        for name in self.names():
            if name == old or name.startswith(old + DELIMITER):
                moves.append((self.path(name), self.path(new + name[len(old):])))
        for src, dst in moves:
            os.rename(src, dst)
        subs = self.subscriptions()
        changed = [new + s[len(old):] if s == old or s.startswith(old + DELIMITER) else s for s in subs]
        if changed != subs:
            self.save_subscriptions(changed)
        return moves

    def subscriptions(self) -> list[str]:
        try:
            with open(os.path.join(self.inbox, SUBSCRIPTIONS), encoding="utf-8") as f:
                return [line for line in f.read().split("\n") if line]
        except FileNotFoundError:
            return []

    def save_subscriptions(self, names: list[str]) -> None:
        write_atomically(os.path.join(self.inbox, SUBSCRIPTIONS),
                         "".join(n + "\n" for n in names).encode("utf-8"))

    def subscribe(self, name: str, on: bool) -> None:
        check_name(name)
        subs = self.subscriptions()
        if on and name not in subs:
            subs.append(name)
        elif not on and name in subs:
            subs.remove(name)
        else:
            return
        self.save_subscriptions(subs)


def pattern_regex(reference: str, pattern: str) -> re.Pattern[str]:
    """LIST's reference and mailbox pattern (C{*} and C{%}) as a regex."""
    if reference and pattern.startswith(DELIMITER):
        pattern = pattern[1:]
    full = reference + pattern
    out = []
    for c in full:
        if c == "*":
            out.append(".*")
        elif c == "%":
            out.append(f"[^{re.escape(DELIMITER)}]*")
        else:
            out.append(re.escape(c))
    regex = "".join(out)
    if full[:5].upper() == "INBOX" and (len(full) == 5 or full[5] == DELIMITER):
        regex = "(?i:INBOX)" + "".join(out[5:])
    return re.compile(regex + r"\Z", re.S)


def list_entries(names: list[str], regex: re.Pattern[str]) -> list[tuple[str, list[str]]]:
    """(name, attributes) for every existing or implied folder that matches."""
    existing = set(names)
    implied: set[str] = set()
    for n in names:
        parts = n.split(DELIMITER)
        for i in range(1, len(parts)):
            implied.add(DELIMITER.join(parts[:i]))
    parents = set(implied)
    out = []
    for name in sorted(existing | implied, key=lambda n: (n != "INBOX", n)):
        if not regex.match(name):
            continue
        attrs = []
        if name not in existing:
            attrs.append("\\Noselect")
        attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")
        if name in SPECIAL_USE:
            attrs.append(SPECIAL_USE[name])
        out.append((name, attrs))
    return out
