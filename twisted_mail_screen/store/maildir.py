# -*- test-case-name: tests.test_crash -*-
"""
Plain Maildirs (cur/new/tmp), as any Maildir tool reads them.

Messages are stored with LF line endings. Each file name carries the
message's size on disk (C{S=}) and its size with CRLF line endings
(C{W=}, what POP3 and IMAP report), so listing a folder never reads a body.
Flags live after C{:2,} in the standard letters.

Delivery is all-or-nothing across recipients and durable before it
returns: write into tmp/, fsync, hard-link (or copy) into each
recipient's new/ (the last one by rename), fsync each directory. It
blocks, so callers run it in a thread pool.

Directory fsyncs are group commits: a delivery that has linked its file
into new/ while another thread's fsync of that directory is in flight
waits for the next one, which one of the waiters starts and which covers
every link made before it began. Sixteen concurrent deliveries into one
mailbox thus cost a few directory fsyncs, not sixteen in a row.

Stale tmp/ files (left by a crash between write and link) are removed
after the grace period by L{TmpCleaner}, at startup and then hourly.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mail_screen.runtime.atomic import fsync_directory, write_all, write_and_fsync
from twisted_mail_screen.store.dirsync import DirectorySync
from twisted_mail_screen.store.maildir_names import (
    UniqueNames, base_of, delivery_order, flags_of, folder_listing, size_field, with_flags)

SUBDIRS = ("cur", "new", "tmp")
STALE_TMP_SECONDS = 36 * 3600
#: How often L{TmpCleaner} sweeps every mailbox's tmp/.
CLEAN_INTERVAL_SECONDS = 3600


class DeliveryError(Exception):
    """A message could not be stored; nothing of it is visible anywhere."""


class _Vanished(Exception):
    """A Maildir believed to exist was not there; nothing was left behind."""


@dataclass(frozen=True)
class MessageFile:
    """One message of a Maildir as found by a scan."""

    subdir: str  # "new" or "cur"
    name: str

    @property
    def base(self) -> str:
        """The unique part of the name, unchanged by flag changes."""
        return base_of(self.name)

    @property
    def flags(self) -> str:
        return flags_of(self.name)

    def size_field(self, key: str) -> int | None:
        return size_field(self.name, key)


def crlf_size(data: bytes) -> int:
    """The size of LF-stored C{data} once sent with CRLF line endings."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


class Maildir:
    """One Maildir folder on disk."""

    def __init__(self, path: str) -> None:
        self.path = path

    def exists(self) -> bool:
        return os.path.isdir(os.path.join(self.path, "cur"))

    def create(self) -> None:
        # cur/ last: exists() looks for it, so a Maildir another thread is
        # still creating is never taken for a complete one.
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)

    def scan(self) -> list[MessageFile]:
        """Every message in new/ and cur/, oldest delivery first."""
        found: list[MessageFile] = []
        for sub in ("new", "cur"):
            try:
                with os.scandir(os.path.join(self.path, sub)) as it:
                    found.extend(MessageFile(sub, e.name) for e in it if not e.name.startswith("."))
            except FileNotFoundError:
                continue
        found.sort(key=lambda m: delivery_order(m.base))
        return found

    def file_path(self, message: MessageFile) -> str:
        # Plain concatenation: os.path.join costs more, and names never hold "/".
        return f"{self.path}/{message.subdir}/{message.name}"

    def size(self, message: MessageFile) -> int:
        """Size with CRLF line endings, from the name when it says."""
        size = message.size_field("W")
        if size is None:
            with open(self.file_path(message), "rb") as f:
                size = crlf_size(f.read())
        return size

    def remove(self, message: MessageFile) -> bool:
        """
        Unlink a message; C{False} if another process already did. A file
        another process renamed for a flag change since the scan is found
        again by its base name, so the deletion is not undone by it.
        """
        path = self.file_path(message)
        for _ in range(3):
            try:
                os.unlink(path)
                return True
            except FileNotFoundError:
                now = folder_listing(self.path) or {}
                if message.base not in now:
                    return False
                path = f"{self.path}/{now[message.base]}"
        return False

    def clean_tmp(self, now: float | None = None) -> int:
        """Remove tmp/ files untouched for 36 hours, as Maildir prescribes."""
        now = time.time() if now is None else now
        removed = 0
        try:
            with os.scandir(os.path.join(self.path, "tmp")) as it:
                for e in it:
                    try:
                        if now - e.stat().st_mtime > STALE_TMP_SECONDS:
                            os.unlink(e.path)
                            removed += 1
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            pass
        return removed


class MailStore:
    """
    Where each local mailbox lives: C{<root>/<domain>/<local part>}, with
    both parts checked by L{addresses} so they are plain names.
    """

    def __init__(self, root: str, names: UniqueNames | None = None, durable: bool = True) -> None:
        self.root = root
        self._names = names or UniqueNames()
        # False only on a test host with storage.fsync off: its mail dies
        # with the test, and each fsync costs milliseconds per delivery.
        self._durable = durable
        self._syncs: dict[str, DirectorySync] = {}
        self._syncs_lock = threading.Lock()
        # Maildirs known to exist, so a delivery does not stat each one
        # first; one removed behind our back is noticed by ENOENT (L{_Vanished}).
        self._known: set[str] = set()

    @property
    def names(self) -> UniqueNames:
        """The process's maker of unique names (IMAP COPY names its copies with it)."""
        return self._names

    def maildir(self, address: str) -> Maildir:
        local, _, domain = address.lower().rpartition("@")
        if not local or "/" in address or local.startswith(".") or domain.startswith("."):
            raise ValueError(f"not a mailbox address: {address!r}")
        return Maildir(os.path.join(self.root, domain, local))

    def maildirs(self) -> list[Maildir]:
        """Every mailbox (and Maildir++ subfolder) under the root."""
        found: list[Maildir] = []
        for domain in _subdirs(self.root):
            for box in _subdirs(domain):
                md = Maildir(box)
                if md.exists():
                    found.append(md)
                    found.extend(Maildir(sub) for sub in _subdirs(box)
                                 if os.path.basename(sub).startswith(".") and Maildir(sub).exists())
        return found

    def clean_all_tmp(self, now: float | None = None) -> int:
        """L{Maildir.clean_tmp} for every mailbox; the number of files removed."""
        return sum(md.clean_tmp(now) for md in self.maildirs())

    def deliver(self, addresses: list[str], message: bytes, flags: str = "") -> str:
        """
        Store C{message} (LF line endings) in every mailbox of C{addresses}.
        Returns the new file name (the same in each). Blocks: call from a worker thread.

        @raise DeliveryError: nothing was delivered to anyone.
        """
        maildirs = [self.maildir(a) for a in addresses]
        return self.deliver_to(maildirs, message, flags)

    def deliver_to(self, maildirs: list[Maildir], message: bytes, flags: str = "") -> str:
        return self._stage(_distinct(maildirs), message, flags).commit()

    def stage(self, addresses: list[str], message: bytes, flags: str = "") -> "Staged":
        """
        The first half of L{deliver}: the message written and fsync'd in
        tmp/, where no reader sees it, until L{Staged.commit}. Blocks.

        @raise DeliveryError: nothing was written.
        """
        return self._stage(_distinct([self.maildir(a) for a in addresses]), message, flags)

    def _stage(self, maildirs: list[Maildir], message: bytes, flags: str) -> "Staged":
        try:
            return self._stage_once(maildirs, message, flags)
        except _Vanished:
            # A Maildir this process had seen was removed meanwhile: check
            # (and create) every one afresh and try once more.
            self._forget(maildirs)
            return self._stage_once(maildirs, message, flags)

    def _forget(self, maildirs: list[Maildir]) -> None:
        for md in maildirs:
            self._known.discard(md.path)

    def _stage_once(self, maildirs: list[Maildir], message: bytes, flags: str) -> "Staged":
        base = f"{self._names.new()},S={len(message)},W={crlf_size(message)}"
        known = self._known
        checked = False
        try:
            for md in maildirs:
                if md.path not in known:
                    checked = True
                    if not md.exists():
                        self._create(md)
                    if len(known) > 65536:
                        known.clear()
                    known.add(md.path)
            temp = f"{maildirs[0].path}/tmp/{base}"
            try:
                self._write(temp, message)
            except BaseException:
                _unlink_quietly(temp)
                raise
        except OSError as e:
            if isinstance(e, FileNotFoundError) and not checked:
                raise _Vanished() from e
            raise DeliveryError(f"{e.strerror or e} ({getattr(e, 'filename', '')})") from e
        return Staged(self, maildirs, message, flags, base, temp, checked)

    def _commit(self, staged: "Staged") -> str:
        """Link a staged message into every new/ (the last by rename), fsync each."""
        name = with_flags(staged.base, staged.flags) if staged.flags else staged.base
        target = "cur" if staged.flags else "new"
        temp = staged.temp
        placed: list[str] = []
        moved = False
        try:
            try:
                last = len(staged.maildirs) - 1
                for i, md in enumerate(staged.maildirs):
                    final = f"{md.path}/{target}/{name}"
                    if i == last:
                        moved = _rename_or_copy(temp, final)
                    else:
                        link_or_copy(temp, final)
                    placed.append(final)
                for md in staged.maildirs:
                    self._sync_dir(f"{md.path}/{target}")
            finally:
                if not moved:
                    _unlink_quietly(temp)
        except OSError as e:
            for path in placed:
                _unlink_quietly(path)
            if isinstance(e, FileNotFoundError) and not staged.checked:
                raise _Vanished() from e
            raise DeliveryError(f"{e.strerror or e} ({getattr(e, 'filename', '')})") from e
        return name

    def _create(self, md: Maildir) -> None:
        """Create a Maildir durably: its entries up to the root are fsync'd."""
        md.create()
        path = md.path
        while self._durable:
            fsync_directory(path)
            if os.path.samefile(path, self.root) or os.path.dirname(path) == path:
                break
            path = os.path.dirname(path)
            if not path.startswith(self.root):
                break

    def _sync_dir(self, path: str) -> None:
        if not self._durable:
            return
        with self._syncs_lock:
            sync = self._syncs.get(path)
            if sync is None:
                if len(self._syncs) > 4096:
                    self._syncs.clear()  # a waiter keeps its own reference
                sync = self._syncs[path] = DirectorySync(path)
        sync.sync()

    def _write(self, path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if self._durable:
                write_and_fsync(fd, data)
            else:
                write_all(fd, data)
        finally:
            os.close(fd)


class Staged:
    """
    A message written into tmp/ and fsync'd, not yet in any new/: made
    visible by L{commit}, dropped by L{abort}. Both block.
    """

    def __init__(self, store: MailStore, maildirs: list[Maildir], message: bytes, flags: str,
                 base: str, temp: str, checked: bool) -> None:
        self._store = store
        self.maildirs = maildirs
        self._message = message
        self.flags = flags
        self.base = base
        self.temp = temp
        self.checked = checked  # every Maildir was looked at, none taken from the cache

    def commit(self) -> str:
        """
        Deliver into every mailbox, all or none; the new file's name.

        @raise DeliveryError: nobody got the message (and tmp/ is clean).
        """
        store = self._store
        try:
            return store._commit(self)
        except _Vanished:
            # A cached Maildir went away: look at every one afresh, write again.
            store._forget(self.maildirs)
            return store._commit(store._stage_once(self.maildirs, self._message, self.flags))

    def abort(self) -> None:
        """Drop the staged file (quietly: it is in tmp/, which is swept anyway)."""
        try:
            os.unlink(self.temp)
        except OSError:
            pass


class TmpCleaner(Service):
    """
    Removes stale tmp/ files of every mailbox once at startup and then
    every C{interval} seconds, in the blocking pool (C{run}, e.g.
    L{Blocking.run}) so the reactor never walks the disk. Without
    C{sweep_at_start} (a data directory the start has just made: nothing
    in it can be stale), the start's sweep is counted as done without a
    look at the disk or a worker thread, and the next is an interval later.
    """

    log = Logger()

    def __init__(self, store: MailStore, run: Callable[..., Any], clock: IReactorTime,
                 interval: float = CLEAN_INTERVAL_SECONDS, sweep_at_start: bool = True) -> None:
        self._store = store
        self._run = run
        self._interval = interval
        self._sweep_at_start = sweep_at_start
        # A sweep returns a Deferred: the loop waits for it, so sweeps never overlap.
        self._loop = LoopingCall(self._sweep)
        self._loop.clock = clock
        self.sweeps = 0

    def startService(self) -> None:
        super().startService()
        if not self._sweep_at_start:
            self.sweeps += 1
        self._loop.start(self._interval, now=self._sweep_at_start)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _sweep(self) -> "Deferred[None]":
        # File ages are wall-clock times, so they are compared with the wall
        # clock; the injected clock only paces the sweeps.
        d = self._run(self._store.clean_all_tmp, time.time())

        def done(removed: int) -> None:
            self.sweeps += 1
            if removed:
                self.log.info("maildir: removed {n} stale tmp/ files", n=removed)

        def failed(reason: Failure) -> None:
            # Logged and swallowed: a failed sweep must not stop the loop.
            self.log.failure("maildir: tmp/ sweep failed", reason)

        return d.addCallbacks(done, failed)


def _subdirs(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _distinct(maildirs: list[Maildir]) -> list[Maildir]:
    seen: dict[str, Maildir] = {}
    for md in maildirs:
        seen.setdefault(md.path, md)
    return list(seen.values())


def link_or_copy(source: str, target: str) -> None:
    """Hard-link C{source} to C{target}; across file systems, an fsync'd copy."""
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        with open(source, "rb") as f:
            data = f.read()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_and_fsync(fd, data)
        finally:
            os.close(fd)


def _rename_or_copy(source: str, target: str) -> bool:
    """
    Move C{source} to C{target}, refusing to replace an existing file;
    C{True} if it was renamed, C{False} if copied (C{source} then remains).
    """
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "message file exists", target)
    try:
        os.rename(source, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        link_or_copy(source, target)
        return False
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
