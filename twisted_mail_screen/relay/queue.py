# -*- test-case-name: tests.test_queue -*-
"""
The durable outbound queue: mail for other domains, kept in
C{<data_dir>/queue/} (L{spool}) until each recipient has been delivered
or bounced.

L{OutboundQueue} ties the pieces together: it polls the spool once a
second of its clock (holds, releases, deletions and flushes made by
C{mailscreen queue} through the files), starts an attempt
(L{attempt.attempt_message}) for each message that is due, through the
connection pool (L{pool.Pool}) to the hosts L{resolver.Targets} finds,
applies the decision of L{policy.decide} (retry, bounce, delay warning,
done), and sends the notices (L{notices.Notices}). It is also the
server's admin API to the queue (list, hold, release, delete, flush).
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import asdict
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.faults.plan import FaultPlan
from twisted_mail_screen.relay.attempt import Connector, attempt_message, smarthost_tls
from twisted_mail_screen.relay.client import to_wire
from twisted_mail_screen.relay.config import RelayConfig
from twisted_mail_screen.relay.notices import Deliver, Notices
from twisted_mail_screen.relay.policy import (EXPIRED_STATUS, decide, due_after_load,
                                              expiry_reply, retry_after_error)
from twisted_mail_screen.relay.pool import Outcome, Pool
from twisted_mail_screen.relay.resolver import Targets
from twisted_mail_screen.relay.spool import (BOUNCED, FAILED, PENDING, SENT, QueueDirectory,
                                             QueuedMessage, Recipient, adopt_if_tried, iso,
                                             with_request)
from twisted_mail_screen.runtime.events import EventBus
from twisted_mail_screen.runtime.deliverylog import log_delivery
from twisted_mail_screen.runtime.workers import Workers

POLL_SECONDS = 1.0
SHUTDOWN_GRACE_SECONDS = 30


class OutboundQueue(MultiService):
    """
    Queues mail for remote recipients and delivers it, by MX lookup or
    through the smarthost, retrying with exponential backoff and bouncing
    (RFC 3464) what fails for good.

    C{deliver} (C{Delivery.deliver}) stores DSNs for senders, all or
    nothing; C{blocking} runs the spool's file work, and must outlive
    the queue's stop (which waits for attempts still writing envelopes):
    the server makes it a child of the queue; C{resolver} (an
    C{IResolver}, replaceable in tests) answers MX and address queries.
    """

    log = Logger()
    #: Messages being attempted at once. Every attempt holds its message in
    #: memory and at least one connection: after an outage or a restart
    #: with a long queue, the rest wait for running attempts to end instead
    #: of all starting together (memory, file descriptors).
    max_attempts = 100

    def __init__(self, config: Config, relay: RelayConfig, router: Any, reactor: Any,
                 clock: IReactorTime, deliver: Deliver, blocking: Workers, resolver: Any = None,
                 faults: FaultPlan | None = None, events: EventBus | None = None) -> None:
        super().__init__()
        self.events = events  # queue.* events (docs/api.md, "Events")
        self.config = config
        self.relay = relay
        self.reactor = reactor
        self.clock = clock
        self.faults = faults  # test host only: fail_delivery rules (docs/faults.md)
        self.directory = QueueDirectory(os.path.join(config.data_dir, "queue"))
        self._blocking = blocking
        # One logger for the pieces: their lines keep the queue's namespace.
        log = self.log
        tls = smarthost_tls(relay)
        self._targets = Targets(relay, reactor, tls, resolver)
        self._connector = Connector(relay, config.hostname, clock, tls)
        self.pool = Pool(relay, self._targets.targets, self._connector, log)
        self._notices = Notices(config.hostname, relay, router, deliver, clock, log)
        self._messages: dict[str, QueuedMessage] = {}
        # Stored but not to be sent yet (enqueue(start=False)); not polled.
        self._unstarted: dict[str, tuple[QueuedMessage, bytes]] = {}
        self._held: set[str] = set()
        self._hold_changes = 0  # bumped by hold()/release(): a scan older than that is stale
        self._in_flight: dict[str, Deferred] = {}
        self._backlog = False  # due messages left waiting by max_attempts
        self._poller: LoopingCall | None = None
        self._polling = False
        self._loaded = False
        self._stopping = False

    @property
    def resolver(self) -> Any:
        return self._targets.resolver

    @resolver.setter
    def resolver(self, value: Any) -> None:
        self._targets.resolver = value

    def _publish(self, kind: str, **data: Any) -> None:
        if self.events is not None:
            self.events.publish(kind, **data)

    def _published(self, kind: str, queue_id: str) -> Any:
        """A callback publishing C{kind} for C{queue_id} when the change found it; passes the result on."""
        def publish(found: Any) -> Any:
            if found:
                self._publish(kind, id=queue_id)
            return found
        return publish

    def size(self) -> tuple[int, float | None]:
        """How many messages are queued, and when the oldest was (for metrics)."""
        messages = self._messages
        return len(messages), min((m.created for m in messages.values()), default=None)

    def idle(self) -> bool:
        """No scan of the spool running and no attempt in flight (for tests)."""
        return not (self._polling or self._in_flight)

    # service life

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.pool.stopping = False
        self._polling = False
        d = self._blocking.run(self._load)
        d.addCallback(self._loaded_messages)
        d.addErrback(lambda f: self.log.failure("queue: cannot load {path}", f,
                                                path=self.directory.path))

    def _load(self) -> list[QueuedMessage]:
        self.directory.create()
        for name in self.directory.remove_orphans(time.time()):
            self.log.warn("queue: removed uncommitted message file {name}", name=name)
        return self.directory.load_all(self.log)

    def _loaded_messages(self, messages: list[QueuedMessage]) -> None:
        now = self.clock.seconds()
        for m in messages:
            if m.id not in self._messages:
                m.next_attempt = due_after_load(m.next_attempt, now, self.relay)
                self._messages[m.id] = m
        self._loaded = True
        if messages:
            self.log.info("queue: {count} message(s) in {path}", count=len(messages),
                          path=self.directory.path)
        if self._stopping or not self.running:
            return
        poller = self._poller = LoopingCall(self._poll)
        poller.clock = self.clock
        poller.start(POLL_SECONDS, now=True).addErrback(
            lambda f: self.log.failure("queue: polling stopped", f))

    def stopService(self) -> Deferred:
        self._stopping = True
        poller, self._poller = self._poller, None
        if poller is not None and poller.running:
            poller.stop()
        self.pool.stop()
        settled: Deferred = Deferred()

        timers: list[Any] = []

        def stop_waiting(_: Any = None) -> None:
            if not settled.called:
                for timer in timers:
                    if timer.active():
                        timer.cancel()
                settled.callback(None)

        def give_up() -> None:
            # Aborted clients report their transactions as failed; one still
            # stalled where there is no client to abort (a connection attempt
            # timed on the injected clock) is left behind a second later. Its
            # recipients stay pending on disk and are retried after a restart.
            self._connector.abort_all()
            timers.append(self.reactor.callLater(1, stop_waiting))

        # Real time, not the injected clock: stopping is a wall-clock
        # matter, and a test's Clock that nobody advances must not keep a
        # stalled transaction (and the shutdown) open forever.
        timers.append(self.reactor.callLater(SHUTDOWN_GRACE_SECONDS, give_up))
        DeferredList(list(self._in_flight.values()), consumeErrors=True).addBoth(stop_waiting)
        return settled.addCallback(lambda _: MultiService.stopService(self))

    # the Relay interface

    def enqueue(self, sender: str, recipients: tuple[str, ...], message: bytes, *,
                start: bool = True, request: Any = None) -> "Deferred[str]":
        """
        Durably queue C{message}; fires with the queue id once fsync'd.
        With C{start=False} nothing is sent until L{start} (or a restart):
        delivery first stores the local copies of the same message.
        """
        now = self.clock.seconds()
        queue_id = f"{int(now) & 0xFFFFFFFF:08X}{secrets.token_hex(5).upper()}"
        queued = QueuedMessage(id=queue_id, sender=sender, created=now, next_attempt=now,
                               size=len(message),
                               recipients=[Recipient(r) for r in dict.fromkeys(recipients)])
        with_request(queued, request)  # SMTPUTF8 and DSN requests (an EnvelopeRequest) kept with it
        d = self._blocking.run(self.directory.store, queued, message)

        def stored(_: Any) -> str:
            self.log.info("queue: {id} queued from=<{sender}> to={rcpts} size={size}",
                          id=queue_id, sender=sender, rcpts=",".join(recipients),
                          size=len(message))
            self._publish("queue.added", id=queue_id, sender=sender,
                          recipients=list(dict.fromkeys(recipients)), size=len(message))
            if start:
                self._begin(queued, message)
            else:
                self._unstarted[queue_id] = (queued, message)
            return queue_id

        return d.addCallback(stored)

    def start(self, queue_id: str) -> None:
        """Begin sending a message queued with C{start=False}."""
        entry = self._unstarted.pop(queue_id, None)
        if entry is not None:
            self._begin(*entry)

    def _begin(self, queued: QueuedMessage, message: bytes) -> None:
        self._messages[queued.id] = queued
        if self.running and not self._stopping:
            if len(self._in_flight) < self.max_attempts:
                self._attempt(queued, message)
            else:
                self._backlog = True  # due now; started as running attempts end

    # administration

    def list(self, start: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """
        The queued messages oldest first, as the envelope plus C{held}: all,
        or C{limit} from C{start} (after an outage thousands wait, and
        copying them all holds the reactor thread about 45 ms per thousand).
        """
        out = []
        ordered = sorted(self._messages.values(), key=lambda m: m.created)
        for m in ordered[start:None if limit is None else start + limit]:
            entry = asdict(m)
            entry["held"] = m.id in self._held
            out.append(entry)
        return out

    def flush(self) -> int:
        """Make every message that is not on hold due now; returns how many that is."""
        now = self.clock.seconds()
        for m in self._messages.values():
            m.next_attempt = min(m.next_attempt, now)
        self._run_due()
        return sum(1 for queue_id in self._messages if queue_id not in self._held)

    def delete(self, queue_id: str) -> "Deferred[bool]":
        self._messages.pop(queue_id, None)
        self._unstarted.pop(queue_id, None)
        return self._blocking.run(self.directory.delete, queue_id).addCallback(
            self._published("queue.deleted", queue_id))

    def hold(self, queue_id: str) -> "Deferred[bool]":
        if queue_id in self._messages:
            self._held.add(queue_id)
        self._hold_changes += 1
        return self._blocking.run(self.directory.hold, queue_id).addCallback(
            self._published("queue.held", queue_id))

    def release(self, queue_id: str) -> "Deferred[bool]":
        self._held.discard(queue_id)
        self._hold_changes += 1
        d = self._blocking.run(self.directory.release, queue_id).addCallback(
            self._published("queue.released", queue_id))
        d.addCallback(lambda found: (self._run_due(), found)[1])
        return d

    # scheduling: one poll a second of the clock (a LoopingCall: the next
    # poll is due a second after the previous one, or once its scan ends)

    def _poll(self) -> Deferred | None:
        if self._stopping or not self.running:
            return None
        self._polling = True
        known = set(self._messages)
        changes = self._hold_changes
        d = self._blocking.run(self.directory.scan)

        def scanned(result: tuple[bool, set[str], set[str]]) -> Deferred | None:
            flush, held, on_disk = result
            if changes == self._hold_changes:
                # Holds and releases made through the files (mailscreen queue).
                for queue_id in sorted((held - self._held) & known):
                    self._publish("queue.held", id=queue_id)
                for queue_id in sorted((self._held - held) & known):
                    self._publish("queue.released", id=queue_id)
                self._held = held
            for queue_id in known - on_disk:
                if queue_id in self._messages and queue_id not in self._in_flight:
                    del self._messages[queue_id]
                    self.log.info("queue: {id} removed from the queue directory", id=queue_id)
                    self._publish("queue.deleted", id=queue_id)
            others = on_disk - known - set(self._unstarted)  # queued by another process sharing it
            if others:
                return self._blocking.run(self.directory.read_envelopes, others, self.log).addCallback(
                    adopt, self._messages).addCallback(lambda _: self.flush() if flush else self._run_due())
            if flush:
                self.log.info("queue: flush requested")
                self.flush()
            else:
                self._run_due()

        def done(result: Any) -> None:
            self._polling = False

        d.addCallback(scanned)
        d.addErrback(lambda f: self.log.failure("queue: scan failed", f))
        # The loop waits for this (never failing) Deferred before the next poll.
        return d.addBoth(done)

    def _run_due(self) -> None:
        if self._stopping or not self.running or not self._loaded:
            return
        now = self.clock.seconds()
        self._backlog = False
        for m in list(self._messages.values()):
            if m.id not in self._held and m.id not in self._in_flight and m.next_attempt <= now:
                if len(self._in_flight) >= self.max_attempts:
                    self._backlog = True  # the rest start as running attempts end
                    return
                self._attempt(m, None)

    # one delivery attempt of one message, and what follows from it

    def _attempt(self, queued: QueuedMessage, message: bytes | None) -> None:
        d = ensureDeferred(self._attempt_async(queued, message))
        if not d.called:
            self._in_flight[queued.id] = d

        def done(result: Any) -> None:
            self._in_flight.pop(queued.id, None)
            if isinstance(result, Failure):
                self.log.failure("queue: {id} attempt failed", result, id=queued.id)
                queued.next_attempt = retry_after_error(self.clock.seconds(), self.relay)
            if self._backlog or (queued.id in self._messages
                                 and queued.next_attempt <= self.clock.seconds()):
                self._run_due()  # waiting messages, or this one fell due again meanwhile

        d.addBoth(done)

    def _write_envelope(self, queue_id: str, data: bytes) -> "Deferred[bool]":
        return self._blocking.run(self.directory.write_envelope, queue_id, data)

    async def _attempt_async(self, queued: QueuedMessage, message: bytes | None) -> None:
        claimed = await self._blocking.run(self.directory.claim, queued.id)
        if claimed is None:  # another process sharing the queue has it: look again after a poll
            queued.next_attempt = self.clock.seconds() + POLL_SECONDS
            return
        fd, on_disk = claimed
        try:
            if not adopt_if_tried(queued, on_disk, self.clock.seconds()):
                await self._attempt_claimed(queued, message)
        finally:
            await self._blocking.run(self.directory.unclaim, queued.id, fd)

    async def _attempt_claimed(self, queued: QueuedMessage, message: bytes | None) -> None:
        if message is None:
            try:
                message = await self._blocking.run(self.directory.read_message, queued.id)
            except FileNotFoundError:
                # An envelope without its message (deleted by hand, or a
                # delete that raced an envelope rewrite): nothing to send.
                self._messages.pop(queued.id, None)
                await self._blocking.run(self.directory.remove, queued.id)
                self.log.warn("queue: {id} has no message file; envelope removed", id=queued.id)
                return
        wire = await self._blocking.run(to_wire, message)  # once per attempt, off the reactor
        tried, outcomes = await attempt_message(queued, message, self.pool.submit,
                                                self._write_envelope, self.log, self.faults, wire)
        now = self.clock.seconds()
        by_address = {r.address: r for r in queued.recipients}
        decision = decide({r.address: r.state for r in queued.recipients}, tried=tried,
                          created=queued.created, attempts=queued.attempts,
                          warned=queued.warned, sender=queued.sender, now=now, relay=self.relay)
        queued.attempts = decision.attempts
        for address in decision.expired:
            r = by_address[address]
            r.state, r.status, r.reply = FAILED, EXPIRED_STATUS, expiry_reply(self.relay, r.reply)
            self._publish("queue.bounced", id=queued.id, recipient=address, host=None,
                          reply=r.reply, expired=True)
        queued.next_attempt = decision.retry_at
        self._log_outcomes(queued, outcomes)
        if not await self._blocking.run(self.directory.update, queued):
            self._messages.pop(queued.id, None)
            self.log.info("queue: {id} was deleted during its delivery attempt", id=queued.id)
            return
        await self._notices.relayed(queued, message, outcomes)  # NOTIFY=SUCCESS, next hop without DSN
        if decision.delay_notice:
            queued.warned = True
            if decision.notify_sender:
                await self._notices.send(queued, message, queued.pending(), delayed=True)
        failed = [by_address[a] for a in decision.bounce]
        # A bounce waits while the server stops: the recipients stay failed
        # on disk and are bounced after the restart.
        held_back = bool(failed) and self._stopping
        if failed and not held_back:
            if decision.notify_sender:
                await self._notices.send(queued, message, failed, delayed=False)
            else:
                self.log.info("queue: {id} failed for {rcpts}; no bounce for a bounce",
                              id=queued.id, rcpts=",".join(r.address for r in failed))
            for r in failed:
                r.state = BOUNCED
        if decision.done and not held_back:
            await self._blocking.run(self.directory.remove, queued.id)
            self._messages.pop(queued.id, None)
            self.log.info("queue: {id} removed: done", id=queued.id)
        elif failed or decision.delay_notice:
            await self._blocking.run(self.directory.update, queued)

    def _log_outcomes(self, queued: QueuedMessage, outcomes: list[Outcome]) -> None:
        by_address = {r.address: r for r in queued.recipients}
        for outcome in outcomes:
            for address, (reply, host) in outcome.items():
                r = by_address[address]
                if reply.code == 0:
                    continue
                verdict = {SENT: "sent", FAILED: "bounced", PENDING: "deferred"}[r.state]
                nxt = iso(queued.next_attempt) if r.state == PENDING else "-"
                self._publish(f"queue.{'delivered' if r.state == SENT else verdict}", id=queued.id,
                              recipient=address, host=host or None, reply=r.reply or str(reply),
                              next=queued.next_attempt if r.state == PENDING else None)
                log_delivery(id=queued.id, kind="relay", sender=queued.sender, recipients=(address,),
                             size=queued.size, result=verdict, now=self.clock.seconds(), host=host,
                             reply=r.reply or str(reply),
                             next_attempt=queued.next_attempt if r.state == PENDING else None)
                self.log.info("relay: id={id} to=<{rcpt}> host={host} status={verdict} "
                              "reply={reply!r} next={next}", id=queued.id, rcpt=address,
                              host=host or "-", verdict=verdict, reply=r.reply or str(reply),
                              next=nxt)


def adopt(found: list[QueuedMessage], messages: dict[str, QueuedMessage]) -> None:
    """Messages another process sharing the queue accepted join C{messages} (it may have died)."""
    for m in found:
        messages.setdefault(m.id, m)
