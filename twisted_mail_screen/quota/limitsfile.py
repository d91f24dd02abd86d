# -*- test-case-name: tests.test_quota_reload_nodes -*-
"""
The accounts' own limits as this process last read C{quota.json}, kept
in step with the file that several processes sharing the data directory
write (C{mailscreen quota set} through any node, SETQUOTA, the web API).

Before a quota decision the file's version (inode, size, mtime_ns) is
looked at, at most once a second by the injected clock, with one C{stat}
in the worker pool, and the file read again when it changed: a limit
changed through another node is enforced here from the first decision
made a second or more after the change, without C{quota.reload}. A file
that cannot be read then is logged once per version and the limits read
before are kept, as a half-written edit must not lift every limit.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.quota.state import (
    Override, QuotaFileError, Version, file_version, read_overrides, read_versioned, write_override)

#: Seconds between two looks at the file: the delay with which a node
#: sees another node's change, against one stat a second at most.
LOOK_INTERVAL = 1.0


def probe(path: str, known: Version | None) -> tuple[Version | None, Any]:
    """In a worker: the file's version, and its limits (or the error reading them) if it changed."""
    version = file_version(path)
    if version == known:
        return version, None
    try:
        return version, read_overrides(path)
    except QuotaFileError as e:
        return version, e


class LimitsFile:
    """
    The table of C{quota.json}; reactor thread only, file work in C{run}.
    Without a C{clock} the file is read only when told (L{load}).
    """

    log = Logger()

    def __init__(self, path: str, run: Callable[..., Deferred], clock: IReactorTime | None,
                 interval: float = LOOK_INTERVAL) -> None:
        self.path = path
        #: Told C{(old table, new table)} when a read or write here replaces the table.
        self.replaced: Callable[[dict[str, Override], dict[str, Override]], None] = lambda old, new: None
        self.table: dict[str, Override] = {}
        self._run = run
        self._clock = clock
        self._interval = interval
        self._version: Version | None = None
        self._next_look = float("-inf")
        # Bumped whenever the table is replaced: a look that started before
        # a write made here brings an older table and is dropped.
        self._generation = 0
        self._waiting: list[Deferred] | None = None
        self._soon: IDelayedCall | None = None

    def replace(self, table: dict[str, Override], version: Version | None = None) -> int:
        """The table as read at start-up (no L{replaced}), or by the methods below."""
        self.table = table
        self._version = version
        self._generation += 1
        return len(table)

    def _replace(self, table: dict[str, Override], version: Version | None) -> int:
        old = self.table
        n = self.replace(table, version)
        self.replaced(old, table)
        return n

    def due(self) -> bool:
        """Whether a decision now must first look at the file (L{fresh} would not fire at once)."""
        if self._waiting is not None:
            return True
        return self._clock is not None and self._clock.seconds() >= self._next_look

    def fresh(self) -> Deferred:
        """Fires once the table is the file as it was at most L{LOOK_INTERVAL} ago."""
        if self._waiting is not None:
            d: Deferred = Deferred()
            self._waiting.append(d)
            return d
        if not self.due():
            return succeed(None)
        assert self._clock is not None
        self._next_look = self._clock.seconds() + self._interval
        waiters = self._waiting = [Deferred()]
        first = waiters[0]
        generation = self._generation

        def release(_: object) -> None:
            self._waiting = None
            for w in waiters:
                w.callback(None)

        self._run(probe, self.path, self._version).addCallback(self._looked, generation).addErrback(
            lambda f: self.log.failure("quota: cannot look at {path}", f, path=self.path)).addBoth(release)
        return first

    def look_soon(self) -> None:
        """
        Look at the file when it is next due even if no decision asks by
        then: a change was just made here with limits that may be a second
        old (mail stored for an account thought unlimited is not recorded,
        and a look that finds the account limited has it counted again).
        """
        if self._clock is None or self._soon is not None:
            return

        def look() -> None:
            self._soon = None
            self.fresh()

        self._soon = self._clock.callLater(max(0.0, self._next_look - self._clock.seconds()), look)

    def _looked(self, result: tuple[Version | None, Any], generation: int) -> None:
        version, table = result
        if table is None or generation != self._generation:
            return
        if isinstance(table, QuotaFileError):
            # Remembered, so a bad file is logged once and its next version tried again.
            self._version = version
            self.log.warn("quota: cannot read the limits file again: {problem}; keeping the limits "
                          "read before", problem=str(table))
            return
        self._replace(table, version)
        self.log.info("quota: {path} changed; {n} accounts with limits of their own",
                      path=self.path, n=len(table))

    def load(self) -> "Deferred[int]":
        """Read the file now (start-up, C{quota.reload}); fires with the number of accounts in it."""
        return self._run(read_versioned, self.path).addCallback(lambda out: self._replace(out[1], out[0]))

    def write(self, account: str, changes: dict[str, int | None]) -> "Deferred[dict[str, Override]]":
        """Change C{account}'s own limits in the file and here; fires with the new table."""
        def written(out: tuple[dict[str, Override], Version | None]) -> dict[str, Override]:
            self._replace(*out)
            return out[0]

        return self._run(write_override, self.path, account, changes).addCallback(written)
