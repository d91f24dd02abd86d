"""
Ordering facts from an C{strace -f -y} log of a server process: which file
was written, fsync'd, linked or renamed, which directory fsync'd and which
reply sent, in what order (tests/test_durability.py states the promises).

Each check returns the violations it found, as sentences; empty means the
order holds.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

WRITES = {"write", "pwrite64", "writev"}
SYNCS = {"fsync", "fdatasync"}
MOVES = {"rename", "renameat", "renameat2", "link", "linkat"}
SENDS = {"sendto", "sendmsg", "write", "writev"}


@dataclass(frozen=True)
class Event:
    """One system call: C{seq} is its entry's line in the log, C{done} its completion's."""

    seq: int
    done: int
    pid: int
    call: str
    path: str = ""  # the fd's path (C{-y}) for fd calls
    source: str = ""  # rename/link
    target: str = ""
    data: str = ""  # the first string argument, as strace prints it (escaped, maybe cut)
    ok: bool = True


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_FD = re.compile(r"^(\d+)<((?:[^>\\]|\\.)*)>")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_AT_PATH = re.compile(r'(?:(?:AT_FDCWD|\d+)(?:<((?:[^>\\]|\\.)*)>)?, )?"((?:[^"\\]|\\.)*)"')
_RESULT = re.compile(r"\)\s+= (-?\d+)")


def _event(seq: int, done: int, pid: int, call: str, args: str) -> Event:
    result = _RESULT.search(args)
    ok = result is not None and not result.group(1).startswith("-")
    if call in MOVES:
        paths = [p if p.startswith("/") or not d else os.path.join(d, p)
                 for d, p in _AT_PATH.findall(args)[:2]]
        if len(paths) < 2:
            return Event(seq, done, pid, call, ok=False)
        return Event(seq, done, pid, call, source=paths[0], target=paths[1], ok=ok)
    fd = _FD.match(args)
    data = _STRING.search(args)
    return Event(seq, done, pid, call, path=fd.group(2) if fd else "",
                 data=data.group(1) if data else "", ok=ok)


def parse_strace(text: str) -> list[Event]:
    """
    The events of an C{strace -f -y} log, in entry order. A call another
    thread interrupted (C{<unfinished ...>}, later C{<... resumed>}) is
    completed at the resumed line.
    """
    events: list[Event] = []
    pending: dict[int, tuple[int, str, str]] = {}
    for n, raw in enumerate(text.splitlines()):
        m = _LINE.match(raw)
        if m is None:
            continue
        pid, rest = int(m.group(1)), m.group(2)
        if rest.startswith("<... "):
            resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)$", rest)
            entry = pending.pop(pid, None)
            if resumed and entry is not None:
                seq, call, args = entry
                events.append(_event(seq, n, pid, call, args + resumed.group(2)))
        elif rest.endswith("<unfinished ...>"):
            started = re.match(r"(\w+)\((.*) <unfinished \.\.\.>$", rest)
            if started:
                pending[pid] = (n, started.group(1), started.group(2))
        else:
            call = re.match(r"(\w+)\((.*)$", rest)
            if call:
                events.append(_event(n, n, pid, call.group(1), call.group(2)))
    events.sort(key=lambda e: e.seq)
    return events


def reply(events: list[Event], marker: str) -> Event | None:
    """The send to a client whose data contains C{marker}."""
    return next((e for e in events if e.call in SENDS and e.path.startswith("socket:")
                 and marker in e.data), None)


def synced_before(events: list[Event], path: str, deadline: int, what: str) -> list[str]:
    """C{path} was written and then fsync'd, all complete before line C{deadline}."""
    writes = [e for e in events if e.call in WRITES and e.path == path and e.seq < deadline]
    if not writes:
        return [f"{what}: no write to {path} before it was published"]
    last = max(w.done for w in writes)
    if not any(e.call in SYNCS and e.ok and e.path == path and e.seq > last and e.done < deadline
               for e in events):
        return [f"{what}: {path} not fsync'd after its last write and before it was published"]
    return []


def published(events: list[Event], final: str, before: int, what: str, new_data: bool = True,
              also_sync: tuple[str, ...] = ()) -> list[str]:
    """
    C{final} was linked or renamed into place (its data fsync'd first when
    C{new_data}), then its directory (and C{also_sync}) fsync'd, all before
    line C{before} (the reply).
    """
    moves = [e for e in events if e.call in MOVES and e.ok and e.target == final]
    if not moves:
        return [f"{what}: {final} was never linked or renamed into place"]
    place = moves[0]
    problems = synced_before(events, place.source, place.seq, what) if new_data else []
    if place.done > before:
        problems.append(f"{what}: {final} linked or renamed only after the reply")
    for directory in (os.path.dirname(final),) + also_sync:
        if not any(e.call in SYNCS and e.ok and e.path == directory and e.seq > place.done
                   and e.done < before for e in events):
            problems.append(f"{what}: directory {directory} not fsync'd between placing "
                            f"{os.path.basename(final)} and the reply")
    return problems


def uidlist_durable(events: list[Event], folder: str, after: int, before: int, what: str) -> list[str]:
    """The folder's UID list got the new UIDs durably (appended + fsync'd, or replaced) in between."""
    path = os.path.join(folder, "dovecot-uidlist")
    appends = [e for e in events if e.call in WRITES and e.path == path and after < e.seq < before]
    if appends:
        last = max(w.done for w in appends)
        if any(e.call in SYNCS and e.ok and e.path == path and e.seq > last and e.done < before
               for e in events):
            return []
        return [f"{what}: {path} appended but not fsync'd before the reply"]
    if any(e.call in MOVES and e.target == path and after < e.seq < before for e in events):
        return published([e for e in events if e.seq > after], path, before, what)
    return [f"{what}: {path} not updated between the change and the reply"]


_TEMP = re.compile(r"^\..+\.\d+\.\d+\.tmp$")  # atomic.write_atomically's temp names


def atomic_replacements(events: list[Event]) -> tuple[set[str], list[str]]:
    """
    Every state-file replacement (rename of a write_atomically temp file):
    temp written, fsync'd, renamed, and the directory fsync'd by the same
    thread before it does anything else. Returns the replaced files too.
    """
    replaced: set[str] = set()
    problems: list[str] = []
    for place in [e for e in events if e.call in MOVES and _TEMP.match(os.path.basename(e.source))]:
        what = f"state file {os.path.basename(place.target)}"
        replaced.add(place.target)
        problems += synced_before(events, place.source, place.seq, what)
        later = [e for e in events if e.pid == place.pid and e.seq > place.done
                 and (e.call in WRITES | MOVES or e.call in SYNCS)]
        directory = os.path.dirname(place.target)
        if not later or not (later[0].call in SYNCS and later[0].ok and later[0].path == directory):
            problems.append(f"{what}: {directory} not fsync'd right after the rename")
    return replaced, problems
