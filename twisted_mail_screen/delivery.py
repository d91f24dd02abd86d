# -*- test-case-name: tests.test_smtp -*-
"""
Handing an accepted message to its destinations: local mailboxes now (in
the worker pool, fsync'd before the answer), remote recipients to the
outbound relay when one is configured.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twisted_mail_screen.maildir import MailStore
from twisted_mail_screen.workers import Blocking


class Relay(Protocol):
    """The outbound queue, as delivery sees it."""

    def enqueue(self, sender: str, recipients: tuple[str, ...], message: bytes) -> "Deferred[str]":
        """Durably queue C{message}; fires with a queue id once fsync'd."""


class Delivery:
    """Stores messages; the only writer of mail into Maildirs."""

    log = Logger()

    def __init__(self, store: MailStore, blocking: Blocking, relay: Relay | None = None) -> None:
        self.store = store
        self._blocking = blocking
        self.relay = relay

    def deliver_local(self, mailboxes: tuple[str, ...], message: bytes,
                      flags: str = "") -> "Deferred[str]":
        """
        Write C{message} (LF line endings, headers included) into every
        mailbox, all or none. Fires with the new file's name.
        """
        return self._blocking.run(self.store.deliver, list(mailboxes), message, flags)
