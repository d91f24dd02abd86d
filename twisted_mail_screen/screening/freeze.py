# -*- test-case-name: tests.test_freeze -*-
"""
Frozen accounts: accounts that may still receive and read mail but may not
send, because screening (or the administrator) suspects their password is
being guessed or has been stolen.

L{FileFreezeStore} keeps them in C{frozen.txt} in the block list's format
(C{user@domain  EXPIRY  # reason}), so the administrator can read and edit
it by hand; L{MemoryFreezeStore} is its in-memory twin for tests and for
servers without a data directory. Both pass the same conformance tests.

Protocol code calls L{is_frozen} on every submission, so it must be cheap:
it is a dictionary probe, and the file is checked for hand edits at most
once a second of the injected clock (a C{stat}, no read unless it changed).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.screening.listfile import Entry, ExpiringFile, format_expiry


def canonical_account(username: str) -> str:
    """Account names compare case-insensitively, like addresses do."""
    name = username.strip().lower()
    if not name or any(c.isspace() or c == "#" for c in name):
        raise ValueError(f"not an account name: {username!r}")
    return name


class _FreezeFile(ExpiringFile):
    header = (
        "# mailscreen frozen accounts: ACCOUNT  EXPIRY  # reason\n"
        "# A frozen account still receives and reads mail but cannot send.\n"
        "# EXPIRY: ISO 8601 UTC (2026-11-22T23:10:00Z), never, or +MINUTES.\n"
    )


class _FreezeStoreBase:
    """The behaviour both stores share; only the backing differs."""

    _clock: IReactorTime
    _table: ExpiringFile
    _log: Logger
    #: Told C{("freeze"|"thaw", entry, reason)} of each change, whoever made
    #: it (the event bus: screening/publish.py); a lapse is a thaw, reason C{expired}.
    on_change: Callable[[str, Entry, str | None], None] | None = None

    @property
    def table(self) -> ExpiringFile:
        """The in-memory table and its file (for writing it off the reactor thread)."""
        return self._table

    def _sync(self) -> None:
        """Pick up hand edits (file-backed store only)."""

    def is_frozen(self, username: str) -> bool:
        """Whether C{username} is frozen now (expired freezes do not count)."""
        self._sync()
        try:
            name = canonical_account(username)
        except ValueError:
            return False
        return self._table.get(name) is not None

    def freeze(self, username: str, minutes: int | None, reason: str,
               log: bool = True) -> Entry:
        """
        Freeze C{username} for C{minutes} (C{None} or 0: until thawed).
        Freezing a frozen account replaces its expiry and reason.

        @param log: log the decision here (C{False} when the caller logs
            it itself, so each decision is one line).
        """
        self._sync()
        expires = (None if not minutes
                   else float(math.ceil(self._clock.seconds() + minutes * 60)))
        entry = Entry(canonical_account(username), expires, reason)
        self._table.put(entry)
        self._table.flush()
        if self.on_change is not None:
            self.on_change("freeze", entry, None)
        if log:
            self._log.info("screening: action=freeze account={account} until={until} "
                           "reason={reason}", account=entry.name,
                           until=format_expiry(entry.expires), reason=reason)
        return entry

    def thaw(self, username: str) -> bool:
        """
        Thaw C{username} at once.

        @return: whether it was frozen.
        """
        self._sync()
        try:
            name = canonical_account(username)
        except ValueError:
            return False
        entry = self._table.get(name)
        active = entry is not None
        removed = self._table.delete(name)
        self._table.flush()
        if removed:
            self._log.info("screening: action=thaw account={account}", account=name)
        if entry is not None and self.on_change is not None:
            self.on_change("thaw", entry, "thawed by an administrator")
        return active

    def entries(self) -> list[Entry]:
        """The frozen accounts, with expiry (C{None} = never) and reason."""
        self._sync()
        return self._table.entries()

    def expire(self) -> list[Entry]:
        """Drop lapsed freezes from the table (and the file)."""
        gone = self._table.expire()
        self._table.flush()
        if self.on_change is not None:
            for entry in gone:
                self.on_change("thaw", entry, "expired")
        return gone


class MemoryFreezeStore(_FreezeStoreBase):
    """Frozen accounts kept in memory only."""

    def __init__(self, clock: IReactorTime, log: Logger | None = None) -> None:
        self._clock = clock
        self._log = log or Logger()
        self._table = ExpiringFile(None, clock, canonical_account, self._log, "freeze list")

    def reload_if_changed(self) -> bool:
        return False


class FileFreezeStore(_FreezeStoreBase):
    """
    Frozen accounts kept in C{path} (C{frozen.txt} in the data directory),
    written atomically on every change.
    """

    def __init__(self, path: str, clock: IReactorTime, log: Logger | None = None) -> None:
        self._clock = clock
        self._log = log or Logger()
        self._table = _FreezeFile(path, clock, canonical_account, self._log, "freeze list")
        self._checked: float | None = None

    @property
    def path(self) -> str:
        return self._table.path  # type: ignore[return-value]

    def _sync(self) -> None:
        now = self._clock.seconds()
        if self._checked is None or now - self._checked >= 1.0 or now < self._checked:
            self._checked = now
            self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        """Re-read C{frozen.txt} if it was edited; rewrite +MINUTES."""
        changed = self._table.reload_if_changed()
        self._table.flush()
        return changed
