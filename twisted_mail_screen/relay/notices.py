# -*- test-case-name: tests.test_relay -*-
"""
Sending a bounce or a delay warning (L{dsn.build_dsn}) to a queued
message's sender: into the sender's Maildir when the sender is local,
through the queue (with the null sender) when not, all or nothing like
any other delivery.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.relay.config import RelayConfig
from twisted_mail_screen.relay.dsn import Failed, build_dsn
from twisted_mail_screen.relay.spool import QueuedMessage, Recipient

#: C{Delivery.deliver}: (sender, local mailboxes, remote addresses, message)
#: -> Deferred firing with the local file name, or the queue id when
#: every recipient is remote.
Deliver = Callable[[str, tuple[str, ...], tuple[str, ...], bytes], "Deferred[str]"]


class Notices:
    """DSNs to senders; a DSN that cannot be delivered is logged, never retried."""

    def __init__(self, hostname: str, relay: RelayConfig, router: Any, deliver: Deliver,
                 clock: IReactorTime, log: Logger) -> None:
        self.hostname = hostname
        self.relay = relay
        self.router = router
        self.deliver = deliver
        self.clock = clock
        self.log = log

    async def send(self, queued: QueuedMessage, message: bytes, recipients: list[Recipient],
                   delayed: bool) -> None:
        now = self.clock.seconds()
        report = build_dsn(
            hostname=self.hostname, queue_id=queued.id, sender=queued.sender,
            recipients=[Failed(r.address, r.status or ("4.0.0" if delayed else "5.0.0"),
                               r.reply or "no reply", r.host) for r in recipients],
            message=message, arrival=queued.created, now=now, delayed=delayed,
            retry_until=queued.created + self.relay.queue_lifetime_hours * 3600)
        kind = "delay warning" if delayed else "bounce"
        try:
            route = self.router.resolve(queued.sender, may_relay=True)
            if route.refusal is not None:
                self.log.warn("queue: {id} {kind} to <{sender}> dropped: {reason}", id=queued.id,
                              kind=kind, sender=queued.sender, reason=route.reason)
                return
            if route.mailboxes or route.remote:
                # The null sender: Return-Path: <> on the local copy, MAIL FROM:<> out.
                stored = await self.deliver("", route.mailboxes, route.remote, report)
                if route.remote and not route.mailboxes:
                    self.log.info("queue: {id} {kind} queued as {dsn}", id=queued.id, kind=kind,
                                  dsn=stored)
            self.log.info("queue: {id} {kind} sent to <{sender}> for {rcpts}", id=queued.id,
                          kind=kind, sender=queued.sender,
                          rcpts=",".join(r.address for r in recipients))
        except Exception:
            self.log.failure("queue: {id} {kind} to <{sender}> failed", id=queued.id, kind=kind,
                             sender=queued.sender)
