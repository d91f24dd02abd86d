# -*- test-case-name: tests.test_blocklist -*-
"""
The administrator-editable list files the block list (C{blocklist.txt}),
the run-time white list (C{whitelist.txt}) and the freeze list
(C{frozen.txt}) share: their line format, and L{ExpiringFile}, the
in-memory table kept in step with its file.

The files are the source of truth, not a cache: an administrator can read
them with C{cat}, edit them with any editor while the server runs, and the
server picks the change up within a second (L{ExpiringFile.reload_if_changed}
compares the file's identity, size and modification time). One line per
entry::

    203.0.113.7          2026-11-22T23:10:00Z  # auth_failures: 10/10 in 15m (imap)
    2001:db8:1:2::/64    never                 # manual: spam run
    198.51.100.0/24      +90                   # written by hand

The expiry is an absolute UTC time, so a restart neither shortens nor
extends a block; C{never} means until removed; C{+MINUTES} (or a bare
number of minutes, as in MDaemon's C{DynamicScreen.dat}) is turned into an
absolute time when the server reads it, and the file is rewritten. Lines
that cannot be parsed are logged, kept in the file as comments, and
otherwise ignored, so a typo never stops the server.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mail_screen.runtime.filewatch import FileWatch
from twisted_mail_screen.config.base import ConfigError

_COMMENT = re.compile(r"(?:^|\s)#")
_ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_expiry(expires: float | None) -> str:
    """C{2026-11-22T23:10:00Z}, or C{never} for C{None}."""
    if expires is None:
        return "never"
    return time.strftime(_ISO_FORMAT, time.gmtime(math.ceil(expires)))


def parse_expiry(text: str, now: float) -> tuple[float | None, bool]:
    """
    Parse an expiry field.

    @return: the absolute expiry (C{None} for never) and whether it was
        relative (so the file should be rewritten with the absolute value).
    @raise ValueError: if C{text} is none of the accepted forms.
    """
    if text.lower() == "never":
        return None, False
    relative = text[1:] if text.startswith("+") else text
    if relative.isdigit():
        return float(math.ceil(now + int(relative) * 60)), True
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return float(calendar.timegm(when.utctimetuple())), False


def split_comment(line: str) -> tuple[str, str]:
    """
    Split C{line} at the first C{#} that starts a word, so a wildcard
    C{#} inside an entry (C{10.0.0.#}) is not mistaken for a comment.
    """
    match = _COMMENT.search(line)
    if match is None:
        return line.strip(), ""
    return line[:match.start()].strip(), line[match.end():].strip()


@dataclass(frozen=True)
class Entry:
    """
    One line of an expiring list.

    @ivar name: the canonical entry (an address, network or account).
    @ivar expires: POSIX time it lapses, or C{None} for never.
    @ivar reason: the comment, free text.
    """

    name: str
    expires: float | None
    reason: str

    def active(self, now: float) -> bool:
        return self.expires is None or self.expires > now


class ExpiringFile:
    """
    An in-memory table of L{Entry} backed by a file of
    C{NAME EXPIRY # reason} lines (or by nothing, when C{path} is C{None}).

    Changes are made in memory and written by L{flush}; a hand edit is
    merged by L{reload_if_changed}, which re-reads the file and then
    re-applies the changes not yet flushed, so neither side is lost.

    @ivar canonical: turns an entry's first field into its canonical name,
        raising C{ValueError} or L{ConfigError} if it is unusable.
    """

    header = "# NAME  EXPIRY  # reason\n"
    #: Told of each L{put} (the entry) and L{delete} (the name, C{None}), not of
    #: lapses or re-reads: a cluster backend shares these (screening/redis_state.py).
    on_change: Callable[[str, Entry | None], None] | None = None

    def __init__(self, path: str | None, clock: IReactorTime,
                 canonical: Callable[[str], str], log: Logger | None = None,
                 what: str = "list") -> None:
        self._clock = clock
        self._canonical = canonical
        self._log = log or Logger()
        self._what = what
        self._watch = FileWatch(path)
        self._entries: dict[str, Entry] = {}
        self._malformed: list[str] = []
        self._pending: dict[str, Entry | None] = {}
        self._loaded = False
        self._dirty = False
        self._next_expiry = -math.inf
        self._run_blocking: Callable[..., Deferred] | None = None
        self._writing: Deferred | None = None

    @property
    def path(self) -> str | None:
        return self._watch.path

    @property
    def dirty(self) -> bool:
        """Whether there are changes not yet written to the file."""
        return self._dirty

    def write_with(self, run_blocking: Callable[..., Deferred] | None) -> None:
        """
        Write the file through C{run_blocking} (e.g. L{Blocking.run}), off
        the reactor thread: under a storm of blocks the file is large and
        rewritten every second, and its fsync must not stall the sessions.
        C{None}: write in the calling thread.
        """
        self._run_blocking = run_blocking

    def settled(self) -> Deferred:
        """Fires when no write is in flight."""
        if self._writing is None:
            return succeed(None)
        d: Deferred = Deferred()
        self._writing.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def load(self) -> None:
        """Read the file (once); later reads go through L{reload_if_changed}."""
        if not self._loaded:
            self._loaded = True
            self._read()

    def _read(self) -> None:
        if self._watch.path is None:
            return
        now = self._clock.seconds()
        entries: dict[str, Entry] = {}
        malformed: list[str] = []
        rewrite = False
        text = self._watch.read()
        for number, line in enumerate(text.splitlines(), 1):
            body, reason = split_comment(line)
            if not body:
                if line.strip().startswith("# malformed"):
                    malformed.append(line.strip())
                continue
            fields = body.split()
            try:
                if len(fields) > 2:
                    raise ValueError("too many fields before the # comment")
                name = self._canonical(fields[0])
                expires, relative = (parse_expiry(fields[1], now) if len(fields) == 2
                                     else (None, False))
            except (ValueError, ConfigError) as e:
                self._log.warn(
                    "screening: {what} {path} line {number} ignored: {line!r} ({problem})",
                    what=self._what, path=self._watch.path, number=number,
                    line=line, problem=e.problem if isinstance(e, ConfigError) else str(e))
                malformed.append("# malformed (ignored): " + line.strip())
                rewrite = True
                continue
            rewrite = rewrite or relative or name != fields[0]
            entry = Entry(name, expires, reason)
            if not entry.active(now):
                rewrite = True
                continue
            entries[name] = entry
        self._entries = entries
        self._malformed = malformed
        self._next_expiry = -math.inf
        for name, pending in self._pending.items():
            self._apply(name, pending)
        self._dirty = self._dirty or rewrite or bool(self._pending)
        self._changed()

    def _apply(self, name: str, entry: Entry | None) -> None:
        if entry is None:
            self._entries.pop(name, None)
        else:
            self._entries[name] = entry

    def _changed(self) -> None:
        """Hook for subclasses that keep an index of the entries: rebuild it."""

    def _added(self, entry: Entry) -> None:
        """Hook: C{entry} was added or replaced one of the same name."""
        self._changed()

    def _removed(self, entry: Entry) -> None:
        """Hook: C{entry} was removed."""
        self._changed()

    def reload_if_changed(self) -> bool:
        """
        Re-read the file if it changed since it was last read or written.

        @return: whether it was re-read.
        """
        if not self._loaded:
            self.load()
            return True
        if self._writing is not None:  # our own write is landing: not a hand edit
            return False
        if self._watch.path is None or not self._watch.changed():
            return False
        self._log.info("screening: {what} {path} changed on disk, reloading",
                       what=self._what, path=self._watch.path)
        self._read()
        return True

    def get(self, name: str) -> Entry | None:
        self.load()
        entry = self._entries.get(name)
        if entry is None or not entry.active(self._clock.seconds()):
            return None
        return entry

    def put(self, entry: Entry) -> None:
        """
        Add or replace an entry; written by the next L{flush}. The expiry
        is rounded up to a whole second, as the file stores it, so that a
        restart reads back exactly what was in memory.
        """
        self.load()
        if entry.expires is not None and entry.expires != math.ceil(entry.expires):
            entry = Entry(entry.name, float(math.ceil(entry.expires)), entry.reason)
        self._entries[entry.name] = entry
        self._pending[entry.name] = entry
        self._dirty = True
        if entry.expires is not None and entry.expires < self._next_expiry:
            self._next_expiry = entry.expires
        self._added(entry)
        if self.on_change is not None:
            self.on_change(entry.name, entry)

    def delete(self, name: str) -> bool:
        """Remove an entry; written by the next L{flush}."""
        self.load()
        entry = self._entries.pop(name, None)
        if entry is None:
            return False
        self._pending[name] = None
        self._dirty = True
        self._removed(entry)
        if self.on_change is not None:
            self.on_change(name, None)
        return True

    def expire(self) -> list[Entry]:
        """
        Drop the entries that have lapsed, and return them. The table is
        only scanned once the earliest known expiry has come, so calling
        this every second costs nothing while no entry lapses.
        """
        self.load()
        now = self._clock.seconds()
        if now < self._next_expiry:
            return []
        gone = [e for e in self._entries.values() if not e.active(now)]
        self._next_expiry = min((e.expires for e in self._entries.values()
                                 if e.expires is not None and e.expires > now),
                                default=math.inf)
        for entry in gone:
            del self._entries[entry.name]
            self._pending.pop(entry.name, None)
        if gone:
            self._dirty = True
            if len(gone) * 4 > len(self._entries):
                self._changed()
            else:
                for entry in gone:
                    self._removed(entry)
        return gone

    def entries(self) -> list[Entry]:
        """The active entries, in file order."""
        self.load()
        now = self._clock.seconds()
        return [e for e in self._entries.values() if e.active(now)]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def flush(self, wait: bool = False) -> bool:
        """
        Write the file if anything changed in memory: in the calling thread,
        or started in L{write_with}'s pool unless C{wait}. While a write is
        in flight, changes wait for the next flush.

        @return: whether it was written (or its write started).
        """
        if not self._dirty or self._writing is not None:
            return False
        if self._watch.path is None:
            self._dirty = False
            self._pending.clear()
            return False
        if self._loaded and self._watch.changed():
            # A hand edit landed since we last looked: merge it first.
            self._read()
        self._dirty = False
        self._pending.clear()
        lines = [self.header]
        width = max((len(e.name) for e in self._entries.values()), default=0)
        for entry in self._entries.values():
            line = f"{entry.name:<{width}}  {format_expiry(entry.expires):<20}"
            if entry.reason:
                line += f"  # {entry.reason}"
            lines.append(line.rstrip() + "\n")
        lines.extend(m + "\n" for m in self._malformed)
        text = "".join(lines)
        if self._run_blocking is not None and not wait:
            self._writing = self._run_blocking(self._watch.write, text)
            self._writing.addCallbacks(self._written, self._write_failed)
            return True
        try:
            self._watch.written(self._watch.write(text))
        except OSError as e:
            self._write_failed(Failure(e))
            return False
        return True

    def _written(self, signature: tuple[int, int, int] | None) -> None:
        self._writing = None
        self._watch.written(signature)

    def _write_failed(self, failure: Failure) -> None:
        self._writing = None
        self._dirty = True
        self._log.error("screening: cannot write {path}: {error}",
                        path=self._watch.path, error=failure.getErrorMessage())
