# -*- test-case-name: tests.test_smtp_injection -*-
"""
Handing an accepted message to its destinations: local mailboxes (in the
worker pool, fsync'd before the answer), remote recipients to the
outbound relay when one is configured.

A message with both kinds of recipient is stored all or nothing, so an
SMTP client that gets a 4xx and sends again never gives anyone a second
copy: the local copy is written into tmp/ and fsync'd first (invisible to
readers), then the queue entry is made durable without being started,
then the local copy is moved into new/, and only then may the queue send.
A failure at any step undoes the earlier ones. Only a crash between the
queue commit and the move into new/ can still duplicate: the queue entry
is then sent after the restart while the client, which got no reply,
sends again; RFC 5321 6.1 prefers that to a loss.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, ensureDeferred, fail, gatherResults
from twisted.logger import Logger

from twisted_mail_screen.store.maildir import DeliveryError, MailStore
from twisted_mail_screen.store.message_ids import message_id
from twisted_mail_screen.runtime.events import EventBus
from twisted_mail_screen.runtime.workers import Blocking


class Relay(Protocol):
    """The outbound queue, as delivery sees it."""

    def enqueue(self, sender: str, recipients: tuple[str, ...], message: bytes, *,
                start: bool = True, request: Any = None) -> "Deferred[str]":
        """Durably queue C{message} (with its C{EnvelopeRequest}); fires with a queue id once fsync'd."""

    def start(self, queue_id: str) -> None:
        """Begin sending a message queued with C{start=False}."""

    def delete(self, queue_id: str) -> "Deferred[bool]":
        """Remove a message from the queue."""


class Delivery:
    """Stores messages; the only writer of mail into Maildirs."""

    log = Logger()

    def __init__(self, store: MailStore, blocking: Blocking, relay: Relay | None = None,
                 events: EventBus | None = None) -> None:
        self.store = store
        self._blocking = blocking
        self.relay = relay
        self._events = events
        #: Told of each stored message (mailbox, [file name]): the quota service's usage.
        #: A Deferred it returns (the usage recorded for every process) is waited for.
        self.stored: Callable[[str, list[str]], Any] | None = None

    def deliver_local(self, mailboxes: tuple[str, ...], message: bytes,
                      flags: str = "") -> "Deferred[str]":
        """
        Write C{message} (LF line endings, headers included) into every
        mailbox, all or none. Fires with the new file's name.
        """
        d = self._blocking.run(self.store.deliver, list(mailboxes), message, flags)
        return d.addCallback(self._delivered, mailboxes)

    def _delivered(self, name: str, mailboxes: tuple[str, ...]) -> "str | Deferred[str]":
        """Tell the event bus (the web port's wait and live list) about each new message."""
        waits = []
        for mailbox in dict.fromkeys(m.lower() for m in mailboxes):
            if self.stored is not None:
                d = self.stored(mailbox, [name])
                if isinstance(d, Deferred) and not d.called:
                    waits.append(d)
            if self._events is not None:
                self._events.publish("message.new", ID=message_id(mailbox, name),
                                     Mailbox=mailbox)
        if waits:
            return gatherResults(waits, consumeErrors=True).addCallback(lambda _: name)
        return name

    def deliver(self, sender: str, mailboxes: tuple[str, ...], remote: tuple[str, ...],
                message: bytes, request: Any = None) -> "Deferred[str]":
        """
        Store C{message} (LF line endings, our Received: on top) for local
        C{mailboxes} (with a Return-Path: added) and C{remote} addresses,
        all or nothing. Fires with the local file name, or the queue id
        when every recipient is remote; fails with L{DeliveryError}.
        C{request} (an C{EnvelopeRequest}: SMTPUTF8, DSN) goes with the queue entry.
        """
        local = f"Return-Path: <{sender}>\n".encode() + message
        if not remote:
            return self.deliver_local(mailboxes, local)
        if not mailboxes:
            return self._enqueue(sender, remote, message, True, request)
        return ensureDeferred(self._deliver_both(sender, mailboxes, remote, local, message, request))

    def _enqueue(self, sender: str, remote: tuple[str, ...], message: bytes,
                 start: bool, request: Any = None) -> "Deferred[str]":
        if self.relay is None:
            return fail(DeliveryError("remote recipients but no relay"))

        def failed(reason: Any) -> Any:
            if reason.check(DeliveryError):
                return reason
            # A disk error in the queue: reported like one in a Maildir.
            raise DeliveryError(f"cannot queue: {reason.value}")

        return self.relay.enqueue(sender, remote, message, start=start,
                                  request=request).addErrback(failed)

    async def _deliver_both(self, sender: str, mailboxes: tuple[str, ...],
                            remote: tuple[str, ...], local: bytes, message: bytes,
                            request: Any = None) -> str:
        assert self.relay is not None
        staged = await self._blocking.run(self.store.stage, list(mailboxes), local)
        try:
            queue_id = await self._enqueue(sender, remote, message, False, request)
        except BaseException:
            await self._blocking.run(staged.abort)
            raise
        try:
            name = await self._blocking.run(staged.commit)
        except BaseException:
            try:
                await self.relay.delete(queue_id)
            except Exception:
                self.log.failure("delivery: queue entry {id} not removed after a failed local "
                                 "delivery; it will be sent after a restart", id=queue_id)
            raise
        self.relay.start(queue_id)
        out = self._delivered(name, mailboxes)
        return (await out) if isinstance(out, Deferred) else out
