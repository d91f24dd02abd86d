# -*- test-case-name: tests.test_screening -*-
"""
The screening service's state files: the block list (C{blocklist.txt}),
the run-time white list (C{whitelist.txt}) and the frozen accounts
(C{frozen.txt}), kept in step with the disk.

Once a second (driven by L{twisted_mail_screen.screening.service}) hand
edits are picked up, lapsed entries dropped and pending changes written.
Automatic blocks wait for that check (so a storm of blocks is one file
write a second); while no check runs, they are written at once.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from twisted_mail_screen.screening.blocklist import BlockList, WhitelistFile
from twisted_mail_screen.screening.interfaces import AdminFreezeStore
from twisted_mail_screen.screening.listfile import Entry, ExpiringFile


class StateFiles:
    """
    The lists screening keeps on disk.

    @ivar blocklist: the block list.
    @ivar whitelist: the run-time white list (configured entries are not here).
    @ivar deferred_writes: whether the periodic check is running and so
        writes automatic blocks; when C{False} they are written at once.
    """

    def __init__(self, blocklist: BlockList, whitelist: WhitelistFile,
                 freeze_store: AdminFreezeStore | None, log: Logger) -> None:
        self.blocklist = blocklist
        self.whitelist = whitelist
        self._freeze_store = freeze_store
        self._log = log
        self.deferred_writes = False
        #: Told of each block that lapses (the event bus: screening/publish.py).
        self.on_block_lapsed: Callable[[Entry], None] | None = None

    def load(self) -> None:
        """Read the lists; reading changes nothing on disk, rewrites wait for a flush."""
        self.blocklist.load()
        self.whitelist.load()

    def files(self) -> list[ExpiringFile]:
        files: list[ExpiringFile] = [self.blocklist, self.whitelist]
        if self._freeze_store is not None:
            files.append(self._freeze_store.table)
        return files

    def write_files_with(self, run_blocking: Callable[..., Deferred]) -> None:
        """
        Write the block list, whitelist and frozen-account files in a worker
        pool (L{ExpiringFile.write_with}); a change made while a write is in
        flight is written by the next once-a-second check.
        """
        for table in self.files():
            table.write_with(run_blocking)

    def block_added(self) -> None:
        """An automatic block was added: write it now unless the periodic check will."""
        if not self.deferred_writes:
            self.blocklist.flush()

    def check_files(self) -> None:
        """Pick up hand edits, let entries lapse, write what is pending."""
        for table in (self.blocklist, self.whitelist):
            table.reload_if_changed()
            for entry in table.expire():
                self._log.info("screening: action=expire client={client} reason={reason}",
                               client=entry.name, reason=entry.reason)
                if table is self.blocklist and self.on_block_lapsed is not None:
                    self.on_block_lapsed(entry)
            table.flush()
        if self._freeze_store is not None:
            self._freeze_store.reload_if_changed()
            # A lapsed freeze no longer counts, but frozen.txt is what the
            # administrator reads: it must not go on listing it.
            for entry in self._freeze_store.expire():
                self._log.info("screening: action=expire account={account} reason={reason}",
                               account=entry.name, reason=entry.reason)

    def write_last(self) -> Deferred:
        """Write anything pending; fires once it is on disk."""
        tables = self.files()

        def write_last(_: object) -> None:
            for table in tables:
                table.flush(wait=True)

        # a write still in flight lands first, so the last one written is the newest
        return gatherResults([t.settled() for t in tables]).addCallback(write_last)
