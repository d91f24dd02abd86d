# -*- test-case-name: tests.test_screening -*-
"""
Dynamic screening: one service shared by every listener that counts what
each client does and blocks the ones that misbehave.

Protocol code calls L{ScreeningService.open} for each new connection and
reports events to the L{ClientScreen} it gets back; the screen answers
whether to go on. The service is three parts with narrow seams, wired
here: L{ScreeningRules} (the counters and decisions), L{StateFiles} (the
block list, white list and freeze list on disk) and L{ScreeningAdmin}
(what the administrator changes). This module owns their lifecycle: the
once-a-second check and the last write at shutdown.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.screening.admin import ScreeningAdmin
from twisted_mail_screen.screening.blocklist import BlockList, WhitelistFile
from twisted_mail_screen.screening.config import FreezeConfig, ScreeningConfig
from twisted_mail_screen.screening.freeze import FileFreezeStore
from twisted_mail_screen.screening.interfaces import AdminFreezeStore, ClientScreen, Notifier
from twisted_mail_screen.screening.publish import Publish, ScreeningEvents
from twisted_mail_screen.screening.rules import ScreeningRules
from twisted_mail_screen.screening.state import StateFiles


class ScreeningService(Service):
    """
    The screening service (L{twisted_mail_screen.screening.interfaces.Screening}).

    L{start} (or C{startService}) begins a once-a-second check that picks
    up hand edits of the block list, white list and freeze list, lets
    blocks lapse, writes pending changes and, once a minute, prunes idle
    counters. Automatic blocks are written by that check (so a storm of
    blocks is one file write a second); administrative changes are
    written at once.

    @ivar config: the settings.
    @ivar rules: the counters and decisions.
    @ivar state: the lists on disk.
    @ivar admin: the administrator's changes (control channel and CLI).
    """

    tick_seconds = 1.0
    prune_seconds = 60.0

    def __init__(self, config: ScreeningConfig, clock: IReactorTime,
                 blocklist: BlockList, freeze_store: AdminFreezeStore | None = None,
                 notifier: Notifier | None = None,
                 freeze_config: FreezeConfig = FreezeConfig(),
                 log: Logger | None = None, whitelist_file: WhitelistFile | None = None,
                 known_account: Callable[[str], bool] | None = None) -> None:
        self.config = config
        self._clock = clock
        self._notifier = notifier
        self._log = log or Logger()
        self.state = StateFiles(blocklist, whitelist_file or WhitelistFile(None, clock, self._log),
                                freeze_store, self._log)
        self.rules = ScreeningRules(config, clock, self.state, freeze_store, notifier,
                                    freeze_config, self._log, known_account)
        self.admin = ScreeningAdmin(self.rules, self.state, freeze_store, clock)
        #: What decides a new connection: the rules, or a cluster backend in
        #: front of them (screening/redis_backend.py).
        self.front: Callable[[str, str], ClientScreen] = self.rules.open
        self._call: IDelayedCall | None = None
        self._next_prune = 0.0
        if config.enabled:
            self.state.load()

    @classmethod
    def in_directory(cls, config: ScreeningConfig, freeze_config: FreezeConfig,
                     clock: IReactorTime, data_dir: str, notifier: Notifier | None,
                     log: Logger | None = None,
                     known_account: Callable[[str], bool] | None = None,
                     ) -> "ScreeningService":
        """
        The service with its state in C{data_dir}: C{blocklist.txt},
        C{whitelist.txt} and C{frozen.txt} (use L{freeze_store} for the
        protocols' freeze checks).
        """
        log = log or Logger()
        return cls(config, clock,
                   BlockList(os.path.join(data_dir, "blocklist.txt"), clock, log),
                   FileFreezeStore(os.path.join(data_dir, "frozen.txt"), clock, log),
                   notifier, freeze_config, log,
                   WhitelistFile(os.path.join(data_dir, "whitelist.txt"), clock, log),
                   known_account)

    @property
    def freeze_store(self) -> AdminFreezeStore | None:
        return self.admin.freeze_store

    @property
    def notifier(self) -> Notifier | None:
        """Where blocks and freezes are reported (its C{messages_sent} is a metric)."""
        return self._notifier

    def publish_to(self, publish: Publish) -> None:
        """
        Publish decisions, blocks, unblocks, freezes and thaws, whoever made
        them, as events through C{publish} (the event bus's; screening/publish.py).
        """
        events = ScreeningEvents(publish, self._clock, self.state.blocklist)
        self.rules.on_decision = events.decided
        self.state.on_block_lapsed = events.lapsed
        store = self.freeze_store
        if store is not None and hasattr(store, "on_change"):
            store.on_change = events.freeze_changed

    def open(self, host: str, protocol: str) -> ClientScreen:
        """Screen a new connection from C{host} to C{protocol}."""
        return self.front(host, protocol)

    def write_files_with(self, run_blocking: Callable[..., Deferred]) -> None:
        """Write the state files in a worker pool (L{StateFiles.write_files_with})."""
        self.state.write_files_with(run_blocking)

    # The periodic check

    def start(self) -> None:
        """Load the lists and start the once-a-second check."""
        if self._call is not None or not self.config.enabled:
            return
        self._next_prune = self._clock.seconds() + self.prune_seconds
        self.state.deferred_writes = True
        self._maintain()

    def stop(self) -> Deferred:
        """Stop the check and write anything pending; fires once it is on disk."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        self.state.deferred_writes = False
        if self._notifier is not None:
            self._notifier.flush()
        if not self.config.enabled:
            return succeed(None)
        return self.state.write_last()

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> Any:
        super().stopService()
        return self.stop()

    def _maintain(self) -> None:
        self._call = None
        try:
            self.state.check_files()
            now = self._clock.seconds()
            if now >= self._next_prune:
                _, through = self.rules.prune()
                # a prune looks at a slice of the clients; the rest a tick later
                self._next_prune = now + (self.prune_seconds if through else self.tick_seconds)
        except Exception:
            self._log.failure("screening: periodic check failed")
        self._call = self._clock.callLater(self.tick_seconds, self._maintain)
