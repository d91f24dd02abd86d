# -*- test-case-name: tests.test_relay -*-
"""
Connections per destination: each destination (a recipient domain, or
the smarthost) gets at most C{max_connections_per_destination}
connections, and each connection carries up to
C{max_messages_per_connection} transactions from the jobs waiting there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from twisted_mail_screen.relay.client import (NO_EXTENSIONS, Extensions, Reply, Session, SMTPClient,
                                              SMTPFailure, transaction)
from twisted_mail_screen.relay.config import RelayConfig
from twisted_mail_screen.relay.resolver import PermanentDestinationError, Target

#: recipient -> (Reply, remote host); a reply code 0 means "not tried"
Outcome = dict[str, tuple[Reply, str]]


@dataclass
class Job:
    """The recipients of one message in one domain: one SMTP transaction."""

    queue_id: str
    sender: str
    domain: str
    recipients: list[str]
    message: bytes
    #: The DATA content (L{client.to_wire} of C{message}), made in the
    #: worker pool: for 25 MB it is ~100 ms of CPU the reactor must not spend.
    wire: bytes | None = None
    result: Deferred = field(default_factory=Deferred)
    extensions: Extensions = NO_EXTENSIONS  # SMTPUTF8 and DSN parameters for the next hop


@dataclass
class Destination:
    """Where jobs for one key (a domain, or the smarthost) go."""

    key: str
    jobs: deque = field(default_factory=deque)
    active: int = 0


class Connections(Protocol):
    """Opening and closing sessions with remote hosts (L{attempt.Connector})."""

    async def open(self, target: Target) -> Session:
        """A greeted (and, by policy, TLS and AUTH) session, or L{SMTPFailure}."""

    async def close(self, client: SMTPClient) -> None:
        """QUIT and forget a session's client."""


class Pool:
    """
    Runs jobs: every job submitted gets its L{Outcome} on C{job.result},
    whatever happens to its connection.
    """

    def __init__(self, relay: RelayConfig, targets: Callable[[str], Awaitable[list[Target]]],
                 connections: Connections, log: Logger) -> None:
        self.relay = relay
        self._targets = targets
        self._connections = connections
        self.log = log
        self.destinations: dict[str, Destination] = {}
        self.stopping = False

    def submit(self, job: Job) -> None:
        key = "smarthost" if self.relay.smarthost is not None else job.domain
        dest = self.destinations.get(key)
        if dest is None:
            dest = self.destinations[key] = Destination(key)
        dest.jobs.append(job)
        self._pump(dest)

    def stop(self) -> None:
        """Start nothing more; jobs still waiting end as "not tried"."""
        self.stopping = True
        for dest in self.destinations.values():
            while dest.jobs:
                job = dest.jobs.popleft()
                job.result.callback({r: (Reply(0, "4.3.2 not tried: shutting down"), "")
                                     for r in job.recipients})

    def _pump(self, dest: Destination) -> None:
        while dest.jobs and dest.active < self.relay.max_connections_per_destination \
                and not self.stopping:
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
            self.destinations.pop(dest.key, None)

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
                session = await self._connections.open(target)
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
                                                max(self.relay.command_timeout, 600), job.wire,
                                                job.extensions)
                except SMTPFailure as e:
                    self._fail_jobs([job], e.reply, session.host)
                    return
                job.result.callback({r: (reply, session.host) for r, reply in replies.items()})
                count += 1
                job = None
                if count < self.relay.max_messages_per_connection and dest.jobs \
                        and not self.stopping:
                    job = dest.jobs.popleft()
                    taken.append(job)
        finally:
            await self._connections.close(session.client)


def _drain(dest: Destination) -> list[Job]:
    jobs = list(dest.jobs)
    dest.jobs.clear()
    return jobs
