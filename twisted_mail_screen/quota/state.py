# -*- test-case-name: tests.test_quota -*-
"""
The accounts' own limits (C{mailscreen quota set}, IMAP SETQUOTA by an
administrator) in one JSON file, C{quota.json} in the data directory,
replaced atomically; and an account's usage counted from its Maildir.

Both block: the server calls them in its worker pool, the CLI directly.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from twisted_mail_screen.quota.config import MAX_MESSAGES, MAX_STORAGE_MB, Limits
from twisted_mail_screen.runtime.atomic import write_atomically
from twisted_mail_screen.store.maildir_names import size_field

FILE_NAME = "quota.json"
RESOURCES = ("storage_kib", "messages")
MAXIMA = {"storage_kib": MAX_STORAGE_MB * 1024, "messages": MAX_MESSAGES}

#: An account's own limits: a resource it does not name has the default.
Override = dict[str, int]
#: A version of the limits file: (inode, size, mtime_ns); an atomic replacement gets a new inode.
Version = tuple[int, int, int]


class QuotaFileError(Exception):
    """The limits file is not what this module writes."""


def state_path(data_dir: str) -> str:
    return os.path.join(data_dir, FILE_NAME)


def read_overrides(path: str) -> dict[str, Override]:
    """The accounts' own limits; none when there is no file yet."""
    try:
        with open(path, "rb") as f:
            table = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise QuotaFileError(f"{path}: {e}") from e
    accounts = table.get("accounts") if isinstance(table, dict) else None
    if not isinstance(accounts, dict):
        raise QuotaFileError(f"{path}: no \"accounts\" table")
    out: dict[str, Override] = {}
    for account, limits in accounts.items():
        if not isinstance(limits, dict):
            raise QuotaFileError(f"{path}: {account}: not a table")
        try:
            out[account.lower()] = {k: check_limit(k, v) for k, v in limits.items() if k in RESOURCES}
        except ValueError as e:
            raise QuotaFileError(f"{path}: {account}: {e}") from e
    return out


def check_limit(resource: str, value: object) -> int:
    """A limit as the file and the commands accept it: an integer, 0 (none) or more."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 \
            or value > MAXIMA[resource]:
        raise ValueError(f"{resource} must be an integer from 0 to {MAXIMA[resource]}, not {value!r}")
    return value


def limits_of(override: Override | None, default: Limits) -> Limits:
    override = override or {}
    return Limits(storage_kib=override.get("storage_kib", default.storage_kib),
                  messages=override.get("messages", default.messages))


@contextmanager
def _locked(path: str) -> Iterator[None]:
    # Two writers (the CLI and the running server's SETQUOTA) must not
    # lose each other's change between read and replace.
    fd = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def file_version(path: str) -> Version | None:
    """Which version of the limits file is on disk: (inode, size, mtime_ns); C{None}: no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_versioned(path: str) -> tuple[Version | None, dict[str, Override]]:
    """The limits and the version they were read from (taken first: a change meanwhile reads again)."""
    version = file_version(path)
    return version, read_overrides(path)


def update_override(path: str, account: str, changes: dict[str, int | None]) -> dict[str, Override]:
    """
    Set (an integer) or drop (C{None}: back to the default) some of
    C{account}'s limits; the whole new table, written atomically.
    """
    return write_override(path, account, changes)[0]


def write_override(path: str, account: str, changes: dict[str, int | None]
                   ) -> tuple[dict[str, Override], Version | None]:
    """L{update_override}, and the version of the file it wrote (taken under the writers' lock)."""
    account = account.lower()
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o750, exist_ok=True)
    with _locked(path):
        table = read_overrides(path)
        mine = dict(table.get(account, {}))
        for resource, value in changes.items():
            if value is None:
                mine.pop(resource, None)
            else:
                mine[resource] = check_limit(resource, value)
        if mine:
            table[account] = mine
        else:
            table.pop(account, None)
        data = {"accounts": {a: table[a] for a in sorted(table)}}
        write_atomically(path, json.dumps(data, indent=1).encode() + b"\n", 0o640)
        return table, file_version(path)


@dataclass(frozen=True)
class Usage:
    """What an account holds: C{octets} (sizes as clients see them, CRLF) and C{messages}."""

    octets: int = 0
    messages: int = 0

    @property
    def kib(self) -> int:
        return -(-self.octets // 1024)

    def plus(self, octets: int, messages: int) -> "Usage":
        return Usage(max(0, self.octets + octets), max(0, self.messages + messages))


def _folder_usage(path: str) -> tuple[int, int]:
    octets = count = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(os.path.join(path, sub)) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    size = size_field(entry.name, "W")
                    if size is None:
                        size = size_field(entry.name, "S")
                    if size is None:
                        try:
                            size = entry.stat().st_size
                        except FileNotFoundError:
                            continue
                    octets += size
                    count += 1
        except (FileNotFoundError, NotADirectoryError):
            continue
    return octets, count


def count_usage(path: str) -> Usage:
    """An account's usage: its Maildir and every Maildir++ folder (C{.Name}) in it."""
    octets, count = _folder_usage(path)
    try:
        with os.scandir(path) as it:
            folders = [e.path for e in it if e.name.startswith(".") and e.name not in (".", "..")
                       and e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        folders = []
    for folder in folders:
        o, c = _folder_usage(folder)
        octets += o
        count += c
    return Usage(octets, count)


def mailbox_accounts(root: str) -> list[str]:
    """The addresses that have a Maildir under the store's C{root} (C{domain/local})."""
    found = []
    try:
        with os.scandir(root) as domains:
            for d in domains:
                if not d.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(d.path) as boxes:
                    found.extend(f"{b.name}@{d.name}" for b in boxes
                                 if b.is_dir(follow_symlinks=False) and not b.name.startswith("."))
    except FileNotFoundError:
        pass
    return sorted(found)
