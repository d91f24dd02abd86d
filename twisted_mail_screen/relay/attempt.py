# -*- test-case-name: tests.test_relay -*-
"""
One delivery attempt: L{Connector} opens a session with a remote host
(connection timeout on the injected clock, STARTTLS per policy, AUTH to
the smarthost) and L{attempt_message} sends a message's pending
recipients, one job per domain through the L{pool.Pool}, recording each
domain's replies on disk as soon as they are known.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.faults.plan import FaultPlan
from twisted_mail_screen.relay.client import (ClientFactory, Extensions, Reply, Session, SMTPClient,
                                              SMTPFailure, local_failure, open_session, quit)
from twisted_mail_screen.relay.dsn import original_headers
from twisted_mail_screen.relay.config import RelayConfig, load_ca_certificates, read_password
from twisted_mail_screen.relay.policy import recipient_state
from twisted_mail_screen.relay.pool import Job, Outcome
from twisted_mail_screen.relay.resolver import Target
from twisted_mail_screen.relay.spool import PENDING, QueuedMessage


def smarthost_tls(relay: RelayConfig) -> Any:
    """The verified TLS client options for the smarthost, or C{None}."""
    if relay.smarthost is not None and relay.tls_hostname is not None:
        trust = (ssl.trustRootFromCertificates(load_ca_certificates(relay.ca_file))
                 if relay.ca_file else ssl.platformTrust())
        return ssl.optionsForClientTLS(relay.tls_hostname, trustRoot=trust)
    return None


class Connector:
    """
    Opens sessions with remote hosts and keeps every open client, so a
    shutdown can abort them. Remembers the MX hosts whose TLS broke: with
    opportunistic STARTTLS, the next attempt goes without it.
    """

    def __init__(self, relay: RelayConfig, helo: str, clock: IReactorTime,
                 tls: Any) -> None:
        self.relay = relay
        self.helo = helo
        self.clock = clock
        self._smarthost_tls = tls
        self._credentials: tuple[str, str] | None = None
        if relay.username is not None and relay.password_file is not None:
            self._credentials = (relay.username, read_password(relay.password_file))
        self._clients: set[SMTPClient] = set()
        self._plaintext_hosts: set[str] = set()

    def abort_all(self) -> None:
        for client in list(self._clients):
            client.abort()

    async def close(self, client: SMTPClient) -> None:
        self._clients.discard(client)
        await quit(client)

    async def open(self, target: Target) -> Session:
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
                client, target.name, self.helo, starttls=policy, tls_creator=creator,
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


def extensions_of(queued: QueuedMessage, rcpts: list[str], message: bytes) -> Extensions:
    """
    What one transaction of C{queued} asks of the next hop. SMTPUTF8 is
    needed only where something would not survive without it: a non-ASCII
    sender or recipient, or a non-ASCII header (a UTF-8 body is 8BITMIME's).
    """
    by_address = {r.address: r for r in queued.recipients}
    needs = queued.smtputf8 and not (
        queued.sender.isascii() and all(r.isascii() for r in rcpts)
        and original_headers(message).isascii())
    return Extensions(
        needs, queued.ret, queued.envid,
        {a: tuple(by_address[a].notify) for a in rcpts if by_address[a].notify},
        {a: by_address[a].orcpt for a in rcpts if by_address[a].orcpt})


async def attempt_message(queued: QueuedMessage, message: bytes, submit: Callable[[Job], None],
                          write_envelope: Callable[[str, bytes], Deferred],
                          log: Logger, faults: FaultPlan | None = None,
                          wire: bytes | None = None) -> tuple[bool, list[Outcome]]:
    """
    Send C{message} (as C{wire}, its DATA content, when given) to the pending recipients of C{queued}, recording
    each reply in its L{Recipient}. Returns whether any recipient was
    tried and each domain's L{Outcome}, once every per-domain envelope
    write is on disk.
    """
    groups: dict[str, list[str]] = {}
    for r in queued.pending():
        groups.setdefault(r.address.rpartition("@")[2], []).append(r.address)
    jobs = [Job(queued.id, queued.sender, domain, rcpts, message, wire,
                extensions=extensions_of(queued, rcpts, message))
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
            state = recipient_state(reply)
            if state is None:
                continue  # not tried (shutdown)
            tried = True
            r.reply, r.host, r.status = str(reply), host, reply.status
            if state != PENDING:  # sent, or failed for good
                r.state, decided = state, True
        if decided and outstanding:  # the last group's state goes with the final rewrite
            data = queued.to_json()  # a snapshot, taken in the reactor thread
            d = writes.run(write_envelope, queued.id, data)
            d.addErrback(lambda f: log.failure("queue: {id} envelope write failed", f,
                                               id=queued.id))
        return outcome

    for job in jobs:
        job.result.addCallback(record)
        injected = faults.delivery_reply(job.recipients) if faults is not None else None
        if injected is None:
            submit(job)
        else:  # a fail_delivery rule: the attempt ends as if the remote host had answered this
            reply = Reply(int(injected[:3]), injected[4:])
            job.result.callback({a: (reply, "fault-injection") for a in job.recipients})
    outcomes = await gatherResults([job.result for job in jobs]) if jobs else []
    await writes.acquire()  # every per-group write is on disk
    writes.release()
    return tried, outcomes
