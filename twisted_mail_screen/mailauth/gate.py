# -*- test-case-name: tests.test_dkim -*-
"""
What happens to a message between the end of DATA and its delivery, for
message authentication: submitted mail is DKIM-signed; mail from
unauthenticated clients gets its SPF, DKIM and DMARC results. The SMTP
session asks L{MailAuth.check} (its C{mail_auth} hook) and delivers what
comes back, or sends the refusal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mail_screen.runtime.workers import Blocking, Workers

if TYPE_CHECKING:
    # dkim (and dnspython under it) is imported only when a key is configured:
    # every server, the pytest plugin's among them, would pay for it otherwise.
    from twisted_mail_screen.mailauth.sign import Signer

#: Threads for the inbound checks' blocking DNS lookups.
DNS_THREADS = 8

#: What the hook fires with: the message to deliver, or an SMTP refusal (code, status, text).
Outcome = Union[bytes, tuple[int, str, str]]


class MailAuth(MultiService):
    """The C{mail_auth} hook of SMTP factories; a service for the pools its checks use."""

    log = Logger()

    def __init__(self, blocking: Workers, signer: Signer | None = None, inbound: Any = None) -> None:
        super().__init__()
        self._blocking = blocking
        self._signer = signer
        self._inbound = inbound

    def check(self, *, user: str | None, submitting: bool, peer: str | None, helo: str | None,
              sender: str, body: bytes) -> "Deferred[Outcome]":
        if submitting:
            if self._signer is None:
                return succeed(body)
            d = self._blocking.run(self._signer.sign, body)
        elif user is None and self._inbound is not None:
            d = self._inbound.check(peer=peer, helo=helo, sender=sender, body=body)
        else:
            return succeed(body)
        return d.addErrback(self._failed)

    def _failed(self, reason: Failure) -> Outcome:
        """A bug or a library's surprise: the client retries later, nothing is lost."""
        self.log.failure("mailauth: checking a message failed", reason)
        return (451, "4.3.0", "Requested action aborted: local error in processing")


def build_mail_auth(config: Any, reactor: Any, blocking: Workers,
                    workers: Workers | None = None, screening: Any = None,
                    clock: Any = None) -> MailAuth | None:
    """
    The hook for C{config}, or C{None} when there is nothing to do.
    C{workers} replaces every pool (a unit test's inline workers).
    """
    signer = None
    if config.dkim.keys:
        from twisted_mail_screen.mailauth.sign import Signer

        signer = Signer(config.dkim)
    if signer is None and not config.mail_auth.enabled:
        return None
    if not config.mail_auth.enabled:
        return MailAuth(blocking, signer)
    from twisted_mail_screen.mailauth.inbound import Inbound

    # DNS answers can take seconds (dns_timeout): a pool of their own, so a
    # slow resolver never holds the storage threads that deliveries fsync in.
    pool = workers or Blocking(reactor, DNS_THREADS, name="mailscreen-mailauth")
    settings = config.mail_auth
    rule = None
    if settings.max_failures and screening is not None:
        from twisted_mail_screen.mailauth.screenrule import AuthFailureRule

        rule = AuthFailureRule(settings.max_failures, settings.failure_window_minutes, screening,
                               clock or reactor)
    gate = MailAuth(blocking, signer, Inbound(settings, config.hostname, pool, rule=rule))
    if isinstance(pool, Blocking):
        pool.setServiceParent(gate)
    return gate
