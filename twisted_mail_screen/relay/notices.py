# -*- test-case-name: tests.test_smtp_dsn -*-
"""
Sending a DSN (L{dsn.build_dsn}) to a message's sender: a bounce, a delay
warning, or a success notice when the sender asked for one. Into the
sender's Maildir when the sender is local, through the queue (with the
null sender) when not, all or nothing like any other delivery.

Each recipient's NOTIFY (RFC 3461 4.1) decides: none given means failure
and delay notices only; NEVER means none at all; SUCCESS asks for a
"delivered" notice after local delivery and a "relayed" one when the
next hop took the message without offering DSN (a next hop with DSN is
given the request instead, and reports itself). ENVID and ORCPT go into
every notice; RET=FULL returns the whole message in a bounce.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.relay.config import RelayConfig
from twisted_mail_screen.relay.dsn import DELAYED, DELIVERED, FAILED, RELAYED, Failed, build_dsn
from twisted_mail_screen.relay.spool import QueuedMessage, Recipient
from twisted_mail_screen.store.maildir import DeliveryError
from twisted_mail_screen.store.envelope import (DELAY, FAILURE, SUCCESS, EnvelopeRequest,
                                                RecipientRequest)

#: C{Delivery.deliver}: (sender, local mailboxes, remote addresses, message)
#: -> Deferred firing with the local file name, or the queue id when
#: every recipient is remote.
Deliver = Callable[..., "Deferred[str]"]

_NAMES = {FAILED: "bounce", DELAYED: "delay warning", DELIVERED: "delivery notice",
          RELAYED: "relay notice"}


def wants(recipient: Recipient, what: str) -> bool:
    """Whether C{recipient}'s NOTIFY asks for a notice of kind C{what}."""
    return RecipientRequest(tuple(recipient.notify)).wants(what)


class Notices:
    """DSNs to senders; a DSN that cannot be delivered is logged, never retried."""

    def __init__(self, hostname: str, relay: RelayConfig | None, router: Any, deliver: Deliver,
                 clock: IReactorTime, log: Logger) -> None:
        self.hostname = hostname
        self.relay = relay
        self.router = router
        self.deliver = deliver
        self.clock = clock
        self.log = log

    async def send(self, queued: QueuedMessage, message: bytes, recipients: list[Recipient],
                   delayed: bool) -> None:
        """A bounce (or, C{delayed}, a delay warning) for those of C{recipients} that want one."""
        kind = DELAYED if delayed else FAILED
        asked = [r for r in recipients if wants(r, DELAY if delayed else FAILURE)]
        if len(asked) < len(recipients):
            self.log.info("queue: {id} no {kind} for {rcpts}: NOTIFY", id=queued.id,
                          kind=_NAMES[kind], rcpts=",".join(r.address for r in recipients
                                                            if r not in asked))
        lifetime = self.relay.queue_lifetime_hours * 3600 if self.relay is not None else 0
        await self._report(
            kind, queued.id, queued.sender, queued.created, queued.envid, message,
            [Failed(r.address, r.status or ("4.0.0" if delayed else "5.0.0"),
                    r.reply or "no reply", r.host, r.orcpt) for r in asked],
            full=queued.ret == "FULL", retry_until=queued.created + lifetime)

    async def relayed(self, queued: QueuedMessage, message: bytes,
                      outcomes: Iterable[dict[str, tuple[Any, str]]]) -> None:
        """"Relayed" notices for recipients a next hop without DSN took, who asked for SUCCESS."""
        by_address = {r.address: r for r in queued.recipients}
        done = [Failed(a, reply.status, str(reply), host, by_address[a].orcpt)
                for outcome in outcomes for a, (reply, host) in outcome.items()
                if reply.positive and reply.relayed and wants(by_address[a], SUCCESS)]
        await self._report(RELAYED, queued.id, queued.sender, queued.created, queued.envid,
                           message, done)

    async def delivered(self, queue_id: str, sender: str, mailboxes: tuple[str, ...],
                        request: EnvelopeRequest, message: bytes) -> None:
        """"Delivered" notices for the local mailboxes whose RCPT asked for SUCCESS."""
        done = [Failed(m, "2.0.0", "250 2.0.0 delivered to mailbox", "", request.of(m).orcpt)
                for m in mailboxes if request.wants(m, SUCCESS)]
        await self._report(DELIVERED, queue_id, sender, self.clock.seconds(), request.envid,
                           message, done)

    async def _report(self, kind: str, queue_id: str, sender: str, arrival: float, envid: str,
                      message: bytes, recipients: list[Failed], full: bool = False,
                      retry_until: float | None = None) -> None:
        if not recipients or not sender:  # never a notice about a notice (the null sender)
            return
        name = _NAMES[kind]
        try:
            report = build_dsn(hostname=self.hostname, queue_id=queue_id, sender=sender,
                               recipients=recipients, message=message, arrival=arrival,
                               now=self.clock.seconds(), retry_until=retry_until, kind=kind,
                               envid=envid, full=full)
            route = self.router.resolve(sender, may_relay=True)
            if route.refusal is not None:
                self.log.warn("queue: {id} {kind} to <{sender}> dropped: {reason}", id=queue_id,
                              kind=name, sender=sender, reason=route.reason)
                return
            if route.mailboxes or route.remote:
                # The null sender: Return-Path: <> on the local copy, MAIL FROM:<> out.
                if sender.isascii():
                    stored = await self.deliver("", route.mailboxes, route.remote, report)
                else:  # relayed on only to a next hop with SMTPUTF8
                    stored = await self.deliver("", route.mailboxes, route.remote, report,
                                                request=EnvelopeRequest(smtputf8=True))
                if route.remote and not route.mailboxes:
                    self.log.info("queue: {id} {kind} queued as {dsn}", id=queue_id, kind=name,
                                  dsn=stored)
            self.log.info("queue: {id} {kind} sent to <{sender}> for {rcpts}", id=queue_id,
                          kind=name, sender=sender, rcpts=",".join(r.address for r in recipients))
        except DeliveryError as e:  # a disk error, or a remote sender and no relay to reach it
            self.log.warn("queue: {id} {kind} to <{sender}> not sent: {error}", id=queue_id,
                          kind=name, sender=sender, error=e)
        except Exception:
            self.log.failure("queue: {id} {kind} to <{sender}> failed", id=queue_id, kind=name,
                             sender=sender)
