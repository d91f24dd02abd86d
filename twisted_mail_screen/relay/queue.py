# -*- test-case-name: tests.test_queue -*-
"""
The durable outbound queue: mail for other domains, kept in
C{<data_dir>/queue/} until each recipient has been delivered or bounced.

Layout (docs/relay.md):

  - C{queue/msg/<id>}: the message as accepted (LF line endings, our
    Received header on top);
  - C{queue/env/<id>.json}: the envelope: sender, each recipient's state
    (pending, sent, failed, bounced) and last reply, arrival time, attempt
    count, next attempt, whether a delay warning went out;
  - C{queue/hold/<id>}: present while the message is on hold;
  - C{queue/flush}: present when a flush has been asked for.

A message is committed when its envelope file exists: both files are
written to a temp file, fsync'd, renamed and the directory fsync'd, the
message first, before the SMTP client gets its 250. Envelopes are
rewritten the same way after every attempt. L{QueueDirectory} does all
file work (blocking: the server calls it in worker threads; the
C{mailscreen queue} command calls it directly, so holds, releases,
deletes and flushes work on a running server's queue through the files,
which the server re-reads every second of its clock).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import endpoints, ssl
from twisted.internet.defer import (Deferred, DeferredList, DeferredLock, ensureDeferred,
                                    gatherResults)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mail_screen.runtime.atomic import fsync_directory, write_atomically
from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.relay.dsn import Failed, build_dsn
from twisted_mail_screen.relay.config import (IMPLICIT_TLS, RelayConfig, endpoint_host_port,
                                              load_ca_certificates, read_password,
                                              split_endpoint)
from twisted_mail_screen.relay.client import (ClientFactory, Reply, SMTPClient, SMTPFailure,
                                            local_failure, open_session, quit, transaction)
from twisted_mail_screen.runtime.workers import Blocking

PENDING, SENT, FAILED, BOUNCED = "pending", "sent", "failed", "bounced"
POLL_SECONDS = 1.0
ORPHAN_SECONDS = 3600
SHUTDOWN_GRACE_SECONDS = 30


class PermanentDestinationError(Exception):
    """The destination can never be reached (no such domain, null MX)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


# the envelope

@dataclass
class Recipient:
    address: str
    state: str = PENDING
    reply: str = ""
    host: str = ""
    status: str = ""


@dataclass
class QueuedMessage:
    id: str
    sender: str
    created: float
    next_attempt: float
    size: int = 0
    attempts: int = 0
    warned: bool = False
    recipients: list[Recipient] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> "QueuedMessage":
        raw = json.loads(data)
        raw["recipients"] = [Recipient(**r) for r in raw.get("recipients", [])]
        return cls(**raw)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def finished(self) -> bool:
        return all(r.state in (SENT, BOUNCED) for r in self.recipients)


def _valid_id(queue_id: str) -> bool:
    return bool(queue_id) and len(queue_id) <= 64 and all(c in "0123456789ABCDEF" for c in queue_id)


class QueueDirectory:
    """The queue's files; every method blocks (fsync)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.msg_dir = os.path.join(path, "msg")
        self.env_dir = os.path.join(path, "env")
        self.hold_dir = os.path.join(path, "hold")
        self.flush_path = os.path.join(path, "flush")

    def create(self) -> None:
        for d in (self.msg_dir, self.env_dir, self.hold_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def _env(self, queue_id: str) -> str:
        return os.path.join(self.env_dir, queue_id + ".json")

    def _msg(self, queue_id: str) -> str:
        return os.path.join(self.msg_dir, queue_id)

    def store(self, message: QueuedMessage, data: bytes) -> None:
        """Commit a new message: message file first, then its envelope."""
        self.create()
        write_atomically(self._msg(message.id), data, 0o600)
        write_atomically(self._env(message.id), message.to_json(), 0o600)

    def update(self, message: QueuedMessage) -> bool:
        """Rewrite an envelope; C{False} if it was deleted meanwhile."""
        return self.write_envelope(message.id, message.to_json())

    def write_envelope(self, queue_id: str, data: bytes) -> bool:
        """Rewrite an envelope from its serialized form; C{False} if it was deleted."""
        if not os.path.exists(self._env(queue_id)):
            return False
        write_atomically(self._env(queue_id), data, 0o600)
        return True

    def remove(self, queue_id: str) -> bool:
        """Remove a message (envelope first, so it is never half there)."""
        try:
            os.unlink(self._env(queue_id))
        except FileNotFoundError:
            found = False
        else:
            found = True
        for path in (self._msg(queue_id), os.path.join(self.hold_dir, queue_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if found:
            fsync_directory(self.env_dir)
        return found

    def read_message(self, queue_id: str) -> bytes:
        with open(self._msg(queue_id), "rb") as f:
            return f.read()

    def read_envelope(self, queue_id: str) -> QueuedMessage:
        with open(self._env(queue_id), "rb") as f:
            return QueuedMessage.from_json(f.read())

    def ids(self) -> set[str]:
        try:
            names = os.listdir(self.env_dir)
        except FileNotFoundError:
            return set()
        return {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}

    def load_all(self, log: Logger | None = None) -> list[QueuedMessage]:
        out = []
        for queue_id in sorted(self.ids()):
            try:
                out.append(self.read_envelope(queue_id))
            except FileNotFoundError:
                continue
            except (ValueError, TypeError, KeyError) as e:
                if log is not None:
                    log.error("queue: envelope {id} unreadable, left in place: {error}",
                              id=queue_id, error=e)
        return out

    def remove_orphans(self, now: float) -> list[str]:
        """Message files without an envelope (a crash before commit), once old."""
        removed = []
        try:
            names = os.listdir(self.msg_dir)
        except FileNotFoundError:
            return removed
        committed = self.ids()
        for name in names:
            if name.startswith(".") or name in committed:
                continue
            path = self._msg(name)
            try:
                if now - os.stat(path).st_mtime > ORPHAN_SECONDS:
                    os.unlink(path)
                    removed.append(name)
            except FileNotFoundError:
                pass
        return removed

    # holds and flushes: marker files, so another process can set them

    def held(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.hold_dir) if not n.startswith(".")}
        except FileNotFoundError:
            return set()

    def exists(self, queue_id: str) -> bool:
        return _valid_id(queue_id) and os.path.exists(self._env(queue_id))

    def hold(self, queue_id: str) -> bool:
        if not self.exists(queue_id):
            return False
        os.makedirs(self.hold_dir, mode=0o700, exist_ok=True)
        write_atomically(os.path.join(self.hold_dir, queue_id), b"", 0o600)
        return True

    def release(self, queue_id: str) -> bool:
        if not _valid_id(queue_id):
            return False
        try:
            os.unlink(os.path.join(self.hold_dir, queue_id))
        except FileNotFoundError:
            return False
        fsync_directory(self.hold_dir)
        return True

    def delete(self, queue_id: str) -> bool:
        return _valid_id(queue_id) and self.remove(queue_id)

    def request_flush(self) -> None:
        self.create()
        write_atomically(self.flush_path, b"", 0o600)

    def take_flush(self) -> bool:
        try:
            os.unlink(self.flush_path)
        except FileNotFoundError:
            return False
        return True

    def scan(self) -> tuple[bool, set[str], set[str]]:
        """For the server's poll: (flush asked, held ids, committed ids)."""
        return self.take_flush(), self.held(), self.ids()


# destinations and jobs

@dataclass
class Job:
    """The recipients of one message in one domain: one SMTP transaction."""

    queue_id: str
    sender: str
    domain: str
    recipients: list[str]
    message: bytes
    result: Deferred = field(default_factory=Deferred)


@dataclass
class Destination:
    """Where jobs for one key (a domain, or the smarthost) go."""

    key: str
    jobs: deque = field(default_factory=deque)
    active: int = 0


@dataclass(frozen=True)
class Target:
    """One host to try: a display name, an endpoint and the TLS name."""

    name: str
    endpoint: Any
    tls_hostname: str | None


Outcome = dict  # recipient -> (Reply, remote host); a reply code 0 means "not tried"


class OutboundQueue(MultiService):
    """
    Queues mail for remote recipients and delivers it, by MX lookup or
    through the smarthost, retrying with exponential backoff and bouncing
    (RFC 3464) what fails for good.

    C{delivery} (set after construction: it holds this queue as its
    relay) delivers DSNs to local senders; C{resolver} (an
    C{IResolver}, replaceable in tests) answers MX and address queries.
    """

    log = Logger()
    #: Messages being attempted at once. Every attempt holds its message in
    #: memory and at least one connection: after an outage or a restart
    #: with a long queue, the rest wait for running attempts to end instead
    #: of all starting together (memory, file descriptors).
    max_attempts = 100

    def __init__(self, config: Config, relay: RelayConfig, router: Any, reactor: Any,
                 clock: IReactorTime, resolver: Any = None, threads: int = 4) -> None:
        super().__init__()
        self.config = config
        self.relay = relay
        self.router = router
        self.reactor = reactor
        self.clock = clock
        self._resolver = resolver
        self.delivery: Any = None
        self.directory = QueueDirectory(os.path.join(config.data_dir, "queue"))
        self._blocking = Blocking(reactor, threads, name="mailscreen-queue")
        self._blocking.setServiceParent(self)
        self._messages: dict[str, QueuedMessage] = {}
        # Stored but not to be sent yet (enqueue(start=False)); not polled.
        self._unstarted: dict[str, tuple[QueuedMessage, bytes]] = {}
        self._held: set[str] = set()
        self._hold_changes = 0  # bumped by hold()/release(): a scan older than that is stale
        self._in_flight: dict[str, Deferred] = {}
        self._backlog = False  # due messages left waiting by max_attempts
        self._destinations: dict[str, Destination] = {}
        self._clients: set[SMTPClient] = set()
        self._plaintext_hosts: set[str] = set()
        self._poll_call: Any = None
        self._polling = False
        self._poll_again = False
        self._loaded = False
        self._stopping = False
        self._credentials: tuple[str, str] | None = None
        self._smarthost_tls: Any = None
        if relay.username is not None and relay.password_file is not None:
            self._credentials = (relay.username, read_password(relay.password_file))
        if relay.smarthost is not None and relay.tls_hostname is not None:
            trust = (ssl.trustRootFromCertificates(load_ca_certificates(relay.ca_file))
                     if relay.ca_file else ssl.platformTrust())
            self._smarthost_tls = ssl.optionsForClientTLS(relay.tls_hostname, trustRoot=trust)

    @property
    def resolver(self) -> Any:
        if self._resolver is None:
            from twisted.names import client
            self._resolver = client.createResolver(reactor=self.reactor)
        return self._resolver

    @resolver.setter
    def resolver(self, value: Any) -> None:
        self._resolver = value

    # service life

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._polling = self._poll_again = False
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
        longest = self.relay.max_retry_minutes * 60
        for m in messages:
            if m.id not in self._messages:
                if m.next_attempt - now > longest:  # the clock went back
                    m.next_attempt = now
                self._messages[m.id] = m
        self._loaded = True
        if messages:
            self.log.info("queue: {count} message(s) in {path}", count=len(messages),
                          path=self.directory.path)
        self._poll()

    def stopService(self) -> Deferred:
        self._stopping = True
        if self._poll_call is not None and self._poll_call.active():
            self._poll_call.cancel()
        self._poll_call = None
        for dest in self._destinations.values():
            while dest.jobs:
                job = dest.jobs.popleft()
                job.result.callback({r: (Reply(0, "4.3.2 not tried: shutting down"), "")
                                     for r in job.recipients})
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
            self._abort_all()
            timers.append(self.reactor.callLater(1, stop_waiting))

        # Real time, not the injected clock: stopping is a wall-clock
        # matter, and a test's Clock that nobody advances must not keep a
        # stalled transaction (and the shutdown) open forever.
        timers.append(self.reactor.callLater(SHUTDOWN_GRACE_SECONDS, give_up))
        DeferredList(list(self._in_flight.values()), consumeErrors=True).addBoth(stop_waiting)
        return settled.addCallback(lambda _: MultiService.stopService(self))

    def _abort_all(self) -> None:
        for client in list(self._clients):
            client.abort()

    # the Relay interface

    def enqueue(self, sender: str, recipients: tuple[str, ...], message: bytes, *,
                start: bool = True) -> "Deferred[str]":
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
        d = self._blocking.run(self.directory.store, queued, message)

        def stored(_: Any) -> str:
            self.log.info("queue: {id} queued from=<{sender}> to={rcpts} size={size}",
                          id=queue_id, sender=sender, rcpts=",".join(recipients),
                          size=len(message))
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

    def list(self) -> list[dict[str, Any]]:
        """Every queued message, as the envelope plus C{held}."""
        out = []
        for m in sorted(self._messages.values(), key=lambda m: m.created):
            entry = asdict(m)
            entry["held"] = m.id in self._held
            out.append(entry)
        return out

    def flush(self) -> None:
        """Make every message that is not on hold due now."""
        now = self.clock.seconds()
        for m in self._messages.values():
            m.next_attempt = min(m.next_attempt, now)
        self._run_due()

    def delete(self, queue_id: str) -> "Deferred[bool]":
        self._messages.pop(queue_id, None)
        self._unstarted.pop(queue_id, None)
        return self._blocking.run(self.directory.delete, queue_id)

    def hold(self, queue_id: str) -> "Deferred[bool]":
        if queue_id in self._messages:
            self._held.add(queue_id)
        self._hold_changes += 1
        return self._blocking.run(self.directory.hold, queue_id)

    def release(self, queue_id: str) -> "Deferred[bool]":
        self._held.discard(queue_id)
        self._hold_changes += 1
        d = self._blocking.run(self.directory.release, queue_id)
        d.addCallback(lambda found: (self._run_due(), found)[1])
        return d

    # scheduling: one poll a second of the clock

    def _schedule_poll(self) -> None:
        if self.running and not self._stopping and (self._poll_call is None or not self._poll_call.active()):
            self._poll_call = self.clock.callLater(POLL_SECONDS, self._poll)

    def _poll(self) -> None:
        self._poll_call = None
        if self._stopping or not self.running:
            return
        if self._polling:
            self._poll_again = True  # the clock ticked during a scan: scan again at once
            return
        self._polling = True
        known = set(self._messages)
        changes = self._hold_changes
        d = self._blocking.run(self.directory.scan)

        def scanned(result: tuple[bool, set[str], set[str]]) -> None:
            flush, held, on_disk = result
            if changes == self._hold_changes:
                self._held = held
            for queue_id in known - on_disk:
                if queue_id in self._messages and queue_id not in self._in_flight:
                    del self._messages[queue_id]
                    self.log.info("queue: {id} removed from the queue directory", id=queue_id)
            if flush:
                self.log.info("queue: flush requested")
                self.flush()
            else:
                self._run_due()

        def done(result: Any) -> Any:
            self._polling = False
            if self._poll_again:
                self._poll_again = False
                self._poll()
            else:
                self._schedule_poll()
            return result

        d.addCallback(scanned)
        d.addErrback(lambda f: self.log.failure("queue: scan failed", f))
        d.addBoth(done)

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

    # one delivery attempt of one message

    def _attempt(self, queued: QueuedMessage, message: bytes | None) -> None:
        d = ensureDeferred(self._attempt_async(queued, message))
        if not d.called:
            self._in_flight[queued.id] = d

        def done(result: Any) -> None:
            self._in_flight.pop(queued.id, None)
            if isinstance(result, Failure):
                self.log.failure("queue: {id} attempt failed", result, id=queued.id)
                queued.next_attempt = self.clock.seconds() + self.relay.retry_minutes * 60
            if self._backlog or (queued.id in self._messages
                                 and queued.next_attempt <= self.clock.seconds()):
                self._run_due()  # waiting messages, or this one fell due again meanwhile

        d.addBoth(done)

    async def _attempt_async(self, queued: QueuedMessage, message: bytes | None) -> None:
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
        groups: dict[str, list[str]] = {}
        for r in queued.pending():
            groups.setdefault(r.address.rpartition("@")[2], []).append(r.address)
        jobs = [Job(queued.id, queued.sender, domain, rcpts, message)
                for domain, rcpts in groups.items()]
        tried = False
        by_address = {r.address: r for r in queued.recipients}
        writes = DeferredLock()
        outstanding = len(jobs)

        def record(outcome: Outcome) -> Outcome:
            # Each domain group's result goes to disk as it is known,
            # not when the slowest group of the message finishes: a crash
            # while another group is still being tried must not send the
            # recipients already accepted a second time.
            nonlocal tried, outstanding
            outstanding -= 1
            decided = False
            for address, (reply, host) in outcome.items():
                r = by_address[address]
                if reply.code == 0:
                    continue  # not tried (shutdown)
                tried = True
                r.reply, r.host, r.status = str(reply), host, reply.status
                if reply.positive:
                    r.state, decided = SENT, True
                elif reply.permanent:
                    r.state, decided = FAILED, True
            if decided and outstanding:  # the last group's state goes with the final rewrite
                data = queued.to_json()  # a snapshot, taken in the reactor thread
                d = writes.run(self._blocking.run, self.directory.write_envelope, queued.id, data)
                d.addErrback(lambda f: self.log.failure("queue: {id} envelope write failed", f,
                                                        id=queued.id))
            return outcome

        for job in jobs:
            job.result.addCallback(record)
            self._submit(job)
        outcomes = await gatherResults([job.result for job in jobs]) if jobs else []
        await writes.acquire()  # every per-group write is on disk
        writes.release()
        now = self.clock.seconds()
        if tried:
            queued.attempts += 1
        expired = now - queued.created >= self.relay.queue_lifetime_hours * 3600
        if expired:
            for r in queued.pending():
                r.state = FAILED
                r.status = "4.4.7"
                last = f"; last reply: {r.reply}" if r.reply else ""
                r.reply = f"4.4.7 message expired after {self.relay.queue_lifetime_hours} hours in the queue{last}"
        delay = min(self.relay.retry_minutes * 60 * 2 ** max(queued.attempts - 1, 0),
                    self.relay.max_retry_minutes * 60)
        queued.next_attempt = now + delay if tried else now
        for outcome in outcomes:
            for address, (reply, host) in outcome.items():
                r = by_address[address]
                if reply.code == 0:
                    continue
                verdict = {SENT: "sent", FAILED: "bounced", PENDING: "deferred"}[r.state]
                nxt = _iso(queued.next_attempt) if r.state == PENDING else "-"
                self.log.info("relay: id={id} to=<{rcpt}> host={host} status={verdict} "
                              "reply={reply!r} next={next}", id=queued.id, rcpt=address,
                              host=host or "-", verdict=verdict, reply=r.reply or str(reply),
                              next=nxt)
        warn = (self.relay.delay_warning_hours > 0 and not queued.warned and queued.pending()
                and now - queued.created >= self.relay.delay_warning_hours * 3600)
        if not await self._blocking.run(self.directory.update, queued):
            self._messages.pop(queued.id, None)
            self.log.info("queue: {id} was deleted during its delivery attempt", id=queued.id)
            return
        if warn and queued.sender:
            queued.warned = True
            await self._send_dsn(queued, message, queued.pending(), delayed=True)
        elif warn:
            queued.warned = True
        failed = [r for r in queued.recipients if r.state == FAILED]
        if failed and not self._stopping:
            if queued.sender:
                await self._send_dsn(queued, message, failed, delayed=False)
            else:
                self.log.info("queue: {id} failed for {rcpts}; no bounce for a bounce",
                              id=queued.id, rcpts=",".join(r.address for r in failed))
            for r in failed:
                r.state = BOUNCED
        if queued.finished():
            await self._blocking.run(self.directory.remove, queued.id)
            self._messages.pop(queued.id, None)
            self.log.info("queue: {id} removed: done", id=queued.id)
        elif failed or warn:
            await self._blocking.run(self.directory.update, queued)

    async def _send_dsn(self, queued: QueuedMessage, message: bytes, recipients: list[Recipient],
                        delayed: bool) -> None:
        now = self.clock.seconds()
        report = build_dsn(
            hostname=self.config.hostname, queue_id=queued.id, sender=queued.sender,
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
            if route.mailboxes:
                await self.delivery.deliver_local(route.mailboxes, b"Return-Path: <>\n" + report)
            if route.remote:
                dsn_id = await self.enqueue("", route.remote, report)
                self.log.info("queue: {id} {kind} queued as {dsn}", id=queued.id, kind=kind,
                              dsn=dsn_id)
            self.log.info("queue: {id} {kind} sent to <{sender}> for {rcpts}", id=queued.id,
                          kind=kind, sender=queued.sender,
                          rcpts=",".join(r.address for r in recipients))
        except Exception:
            self.log.failure("queue: {id} {kind} to <{sender}> failed", id=queued.id, kind=kind,
                             sender=queued.sender)

    # destinations: connection limits and connection reuse

    def _submit(self, job: Job) -> None:
        key = "smarthost" if self.relay.smarthost is not None else job.domain
        dest = self._destinations.get(key)
        if dest is None:
            dest = self._destinations[key] = Destination(key)
        dest.jobs.append(job)
        self._pump(dest)

    def _pump(self, dest: Destination) -> None:
        while dest.jobs and dest.active < self.relay.max_connections_per_destination \
                and not self._stopping:
            dest.active += 1
            job = dest.jobs.popleft()
            d = ensureDeferred(self._session(dest, job))
            d.addErrback(lambda f: self.log.failure("relay: session error", f))
            d.addBoth(lambda _, dest=dest: self._session_ended(dest))

    def _session_ended(self, dest: Destination) -> None:
        dest.active -= 1
        if dest.jobs:
            self._pump(dest)
        elif dest.active == 0:
            self._destinations.pop(dest.key, None)

    def _fail_jobs(self, jobs: list[Job], reply: Reply, host: str) -> None:
        for job in jobs:
            if not job.result.called:
                job.result.callback({r: (reply, host) for r in job.recipients})

    async def _session(self, dest: Destination, job: Job) -> None:
        """One connection's life; every job it took gets its result, whatever happens."""
        taken = [job]
        try:
            await self._session_body(dest, job, taken)
        except Exception as e:
            self.log.failure("relay: session for {dest} failed", dest=dest.key)
            self._fail_jobs(taken, Reply(451, f"4.3.0 internal error: {e}"), "")

    async def _session_body(self, dest: Destination, job: Job, taken: list[Job]) -> None:
        try:
            targets = await self._targets(job.domain)
        except PermanentDestinationError as e:
            self._fail_jobs([job] + _drain(dest), e.reply, "")
            return
        except SMTPFailure as e:
            self._fail_jobs([job] + _drain(dest), e.reply, "")
            return
        session = None
        last = Reply(451, "4.4.1 no host to connect to")
        last_host = ""
        for target in targets:
            try:
                session = await self._open(target)
                break
            except SMTPFailure as e:
                last, last_host = e.reply, target.name
                self.log.info("relay: {host} unusable for {dest}: {reply}", host=target.name,
                              dest=dest.key, reply=str(e.reply))
        if session is None:
            # Every host failed: everything waiting for this destination
            # shares the verdict instead of trying again one by one.
            if last.permanent:
                last = Reply(451, f"4.4.0 {last}")
            self._fail_jobs([job] + _drain(dest), last, last_host)
            return
        count = 0
        try:
            while job is not None:
                try:
                    replies = await transaction(session, job.sender, job.recipients, job.message,
                                                max(self.relay.command_timeout, 600))
                except SMTPFailure as e:
                    self._fail_jobs([job], e.reply, session.host)
                    return
                job.result.callback({r: (reply, session.host) for r, reply in replies.items()})
                count += 1
                job = None
                if count < self.relay.max_messages_per_connection and dest.jobs \
                        and not self._stopping:
                    job = dest.jobs.popleft()
                    taken.append(job)
        finally:
            self._clients.discard(session.client)
            await quit(session.client)

    async def _targets(self, domain: str) -> list[Target]:
        relay = self.relay
        if relay.smarthost is not None:
            return [self._smarthost_target()]
        hosts = await self._mx_hosts(domain)
        targets = []
        for host in hosts:
            for address, ipv6 in await self._addresses(host):
                cls = endpoints.TCP6ClientEndpoint if ipv6 else endpoints.TCP4ClientEndpoint
                endpoint = cls(self.reactor, address, relay.mx_port, timeout=relay.connect_timeout)
                targets.append(Target(f"{host}[{address}]:{relay.mx_port}"
                                      if relay.mx_port != 25 else f"{host}[{address}]",
                                      endpoint, host))
        if not targets:
            raise SMTPFailure(Reply(451, f"4.4.4 no address found for the mail hosts of {domain}"))
        return targets

    def _smarthost_target(self) -> Target:
        relay = self.relay
        description = relay.smarthost
        assert description is not None
        positional, _ = split_endpoint(description)
        if positional[0].lower() in IMPLICIT_TLS:
            host, port = endpoint_host_port(description, 465)
            assert host is not None
            inner = endpoints.HostnameEndpoint(self.reactor, host, port,
                                               timeout=relay.connect_timeout)
            endpoint = endpoints.wrapClientTLS(self._smarthost_tls, inner)
            return Target(f"{host}:{port}", endpoint, relay.tls_hostname)
        endpoint = endpoints.clientFromString(self.reactor, description)
        host, port = endpoint_host_port(description, 25)
        return Target(f"{host}:{port}" if host else description, endpoint, relay.tls_hostname)

    async def _mx_hosts(self, domain: str) -> list[str]:
        from twisted.names import dns, error
        try:
            answers, _, _ = await self.resolver.lookupMailExchange(domain)
        except error.DNSNameError:
            raise PermanentDestinationError(Reply(550, f"5.1.2 domain {domain} does not exist"))
        except Exception as e:
            raise SMTPFailure(Reply(451, f"4.4.3 MX lookup for {domain} failed: {e}")) from e
        mx = sorted((rr.payload.preference, str(rr.payload.name).rstrip(".").lower())
                    for rr in answers if rr.type == dns.MX)
        if len(mx) == 1 and mx[0][1] == "":
            raise PermanentDestinationError(Reply(556, f"5.1.10 domain {domain} accepts no mail (null MX)"))
        if not mx:
            return [domain]  # RFC 5321 5.1: the domain itself is the implicit MX
        return list(dict.fromkeys(name for _, name in mx if name))

    async def _addresses(self, host: str) -> list[tuple[str, bool]]:
        from twisted.names import dns
        out: list[tuple[str, bool]] = []
        for lookup, rtype, ipv6 in ((self.resolver.lookupAddress, dns.A, False),
                                    (self.resolver.lookupIPV6Address, dns.AAAA, True)):
            try:
                answers, _, _ = await lookup(host)
            except Exception:
                continue
            out.extend((rr.payload.dottedQuad() if not ipv6 else _ipv6(rr.payload), ipv6)
                       for rr in answers if rr.type == rtype)
        return list(dict.fromkeys(out))

    async def _open(self, target: Target) -> Any:
        relay = self.relay
        factory = ClientFactory(self.clock, relay.command_timeout)
        connecting = target.endpoint.connect(factory)
        timer = self.clock.callLater(relay.connect_timeout, connecting.cancel)
        try:
            client = await connecting
        except Exception as e:
            raise SMTPFailure(Reply(451, f"4.4.1 cannot connect to {target.name}: "
                                         f"{str(e) or type(e).__name__}")) from e
        finally:
            if timer.active():
                timer.cancel()
        self._clients.add(client)
        if relay.smarthost is not None:
            policy, creator = relay.starttls, self._smarthost_tls
        else:
            policy = relay.starttls
            if policy == "opportunistic" and target.name in self._plaintext_hosts:
                policy = "none"
            creator = ssl.CertificateOptions()
        try:
            return await open_session(
                client, target.name, self.config.hostname, starttls=policy, tls_creator=creator,
                implicit_tls=relay.implicit_tls, credentials=self._credentials)
        except SMTPFailure:
            if client.tls_started and relay.smarthost is None and policy == "opportunistic":
                # Broken TLS at an MX host: the next attempt goes without it.
                self._plaintext_hosts.add(target.name)
            self._clients.discard(client)
            await quit(client)
            raise
        except Exception as e:
            self._clients.discard(client)
            client.abort()
            raise local_failure(f"{target.name}: {e}") from e


def _drain(dest: Destination) -> list[Job]:
    jobs = list(dest.jobs)
    dest.jobs.clear()
    return jobs


def _ipv6(payload: Any) -> str:
    import socket
    return socket.inet_ntop(socket.AF_INET6, payload.address)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def format_queue(messages: list[QueuedMessage], held: set[str], now: float) -> str:
    """C{mailscreen queue list} output."""
    if not messages:
        return "queue is empty\n"
    lines = []
    for m in sorted(messages, key=lambda m: m.created):
        flag = " (held)" if m.id in held else ""
        lines.append(f"{m.id}{flag}  {m.size} bytes  arrived {_iso(m.created)}  "
                     f"attempts {m.attempts}  next {_iso(max(m.next_attempt, now))}")
        lines.append(f"  from <{m.sender}>")
        for r in m.recipients:
            extra = f"  [{r.reply}]" if r.reply else ""
            lines.append(f"  to <{r.address}>  {r.state}{extra}")
    return "\n".join(lines) + f"\n{len(messages)} message(s)\n"
