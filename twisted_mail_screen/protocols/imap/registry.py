# -*- test-case-name: tests.test_imap_concurrency -*-
"""
Every L{Folder} index of one mail store (one registry, shared by all IMAP
listeners of the store), and the per-account locks.

A folder's index is looked up by its directory. When a scan finds the
folder deleted (or deleted and made again: another inode, or its UID map
gone), the index is retired: it leaves the registry, the sessions that
have it selected see every message expunged and are never shown the
messages of a folder made later under the same name, and the next SELECT
of that name builds a new index (with the new folder's UIDVALIDITY).
"""

from __future__ import annotations

from array import array
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.protocols.imap.fetch import Budget
from twisted_mail_screen.protocols.imap.mailbox import Folder, FolderListener
from twisted_mail_screen.protocols.imap.modseq import write_pending
from twisted_mail_screen.protocols.imap.scan import scan_folder
from twisted_mail_screen.runtime.workers import Blocking
from twisted_mail_screen.store.folderlock import Stale, locked, run_locked


class Registry:
    """Every L{Folder} of one mail store, and the per-account locks."""

    KEEP_IDLE = 8
    CACHE_BYTES = 32 * 1024 * 1024

    def __init__(self, blocking: Blocking, clock: IReactorTime) -> None:
        self.blocking = blocking
        self.clock = clock
        self.budget = Budget(self.CACHE_BYTES)
        self.folders: dict[str, Folder] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._idle: list[str] = []

    def lock(self, account_path: str) -> DeferredLock:
        return self._locks.setdefault(account_path, DeferredLock())

    def folder(self, account_path: str, path: str) -> Folder:
        f = self.folders.get(path)
        if f is None:
            f = self.folders[path] = Folder(self, path, self.lock(account_path))
        if path in self._idle:
            self._idle.remove(path)
        return f

    def idle(self, folder: Folder) -> None:
        """Keep a few unattached folders cached; forget older ones."""
        if self.folders.get(folder.path) is not folder:
            return  # retired: its path may already name a newer folder
        if folder.path not in self._idle:
            self._idle.append(folder.path)
        while len(self._idle) > self.KEEP_IDLE:
            gone = self.folders.pop(self._idle.pop(0), None)
            if gone is not None:
                self.budget.release(gone.cache)

    def retire(self, folder: Folder) -> None:
        """
        C{folder} was deleted (and perhaps made again): the next use of its
        path gets a new index, the sessions that have it selected see every
        message expunged and are never shown the new folder's messages.
        """
        if self.folders.get(folder.path) is folder:
            del self.folders[folder.path]
            if folder.path in self._idle:
                self._idle.remove(folder.path)
        if not folder.retired:
            folder.retired = True
            folder.vanish()
            self.budget.release(folder.cache)

    def forget(self, path: str) -> None:
        """C{path} was deleted: retire its folder; drop unattached indexes of subfolders."""
        f = self.folders.get(path)
        if f is not None:
            self.retire(f)
        for p in list(self.folders):
            if p.startswith(path + "."):
                f = self.folders[p]
                if not f.sessions:
                    self.folders.pop(p, None)
                    self.budget.release(f.cache)
                    if p in self._idle:
                        self._idle.remove(p)

    def move(self, old: str, new: str) -> None:
        """A folder directory (and its subfolders) was renamed."""
        for p in list(self.folders):
            if p == old or p.startswith(old + "."):
                f = self.folders.pop(p)
                f.path = new + p[len(old):]
                self.folders[f.path] = f
                if p in self._idle:
                    self._idle[self._idle.index(p)] = f.path

    def sync(self, folder: Folder, claim_for: FolderListener | None = None, force: bool = False) -> Deferred:
        """Scan C{folder} (under its account lock); fires when applied."""
        return folder.lock.run(self.sync_locked, folder, claim_for, force)

    def open(self, account_path: str, path: str, claim_for: FolderListener | None = None) -> Deferred:
        """
        Scan the folder at C{path}; fires with its L{Folder}. When the scan
        finds the indexed folder deleted (and perhaps made again since), the
        folder now on disk is scanned once more into a new index.
        """
        def attempt(again: bool) -> Deferred:
            folder = self.folder(account_path, path)
            # A full rescan only when the directories changed, or to claim what waits in new/.
            force = not folder.loaded or (claim_for is not None and
                                          any(n.startswith("new/") for n in folder.names))
            d = self.sync(folder, claim_for=claim_for, force=force)
            return d.addCallback(lambda _: attempt(False) if again and folder.retired else folder)

        return attempt(True)

    def sync_locked(self, folder: Folder, claim_for: FolderListener | None = None,
                    force: bool = False) -> Deferred:
        if folder.retired:
            return succeed(None)  # never scanned again: a new folder at its path has its own index
        claimer = claim_for if claim_for is not None else folder.claimer()
        if folder.loaded:
            args = (folder.path, True, array("L", folder.uids), list(folder.names),
                    folder.uidvalidity, folder.next_uid, None if force else folder.stamp,
                    claimer is not None, folder.identity, folder.signature)
        else:
            args = (folder.path, False, array("L"), [], 0, 1, None, claimer is not None)
        d = self.blocking.run(scan_folder, *args)
        d.addCallback(folder.apply_scan, claimer)
        d.addCallback(lambda _: self.persist(folder))
        return d

    def persist(self, folder: Folder, result: object = None) -> Deferred:
        """
        Write the mod-sequences C{folder} gave out since the last call (under
        the account lock, before the command that made the changes answers);
        fires with C{result}.
        """
        changes = folder.ms.take_pending()
        if not changes or folder.retired:
            folder.written()
            return succeed(result)
        ms = folder.ms

        def written(out: tuple[int, Any]) -> object:
            shift, ms.file = out
            if shift:  # another process sharing the folder had given these values out
                ms.shifted(changes, shift)
            return result

        def told(outcome: Any) -> Any:
            folder.written()  # the sessions learn of the changes with their final values
            return outcome

        # Under the folder's cross-process lock, as the UID list is (store/folderlock.py).
        return self.blocking.run(locked, folder.path, write_pending, folder.path, ms.uidvalidity,
                                 changes, ms.file).addCallback(written).addBoth(told)

    #: Rescans before a write gives up (another process writing the folder without pause).
    MAX_STALE = 20

    def guarded(self, folder: Folder, make: Callable[[], tuple[Any, ...]],
                also: str | None = None) -> Deferred:
        """
        Run the job C{make()} names (function, *args; built anew for each
        try, from the index as it is then) in the pool under the folder's
        cross-process lock. When another process changed the folder's UID
        list or keywords since this index read them, nothing is done: the
        folder is rescanned (taking the other process's UIDs) and the job
        tried again. The caller holds the account lock. With C{also}, the
        job holds that folder's lock too (MOVE: the source it takes from).
        """
        def attempt(tries: int) -> Deferred:
            f, *args = make()
            d = self.blocking.run(run_locked, folder.path, folder.signature, f, *args, also=also)

            def done(out: tuple[Any, Any]) -> Any:
                result, folder.signature = out
                return result

            def stale(failure: Any) -> Any:
                failure.trap(Stale)
                if tries >= self.MAX_STALE or folder.retired:
                    return failure
                return self.sync_locked(folder, force=True).addCallback(lambda _: attempt(tries + 1))

            return d.addCallbacks(done, stale)

        return attempt(0)

    def ensure_loaded(self, folder: Folder) -> Deferred:
        if folder.loaded:
            return succeed(None)
        return self.sync_locked(folder)
