# -*- test-case-name: tests.test_quota -*-
"""
SMTP's quota answers (RFC 3463 X.2.2, mailbox full): at RCPT, a recipient
whose mailbox is full (or cannot take the declared C{SIZE=}) is refused
alone, so the others still get the message; at the end of the data, with
the real size, the message is refused only when every local mailbox it
goes to is over quota (one reply answers for all recipients; a mailbox
that had room at RCPT takes the message even if it ends over its limit).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from twisted_mail_screen.quota.service import TOO_BIG, QuotaService
from twisted_mail_screen.runtime.workers import Workers

log = Logger(namespace="smtp")

Reply = tuple[int, str, str]
TEMPORARY_FAILURE: Reply = (451, "4.3.0", "Requested action aborted: local error in processing")


def _reply(verdict: str, who: str) -> Reply:
    if verdict == TOO_BIG:
        return (552, "5.2.2", f"{who}Message is larger than the mailbox quota")
    return (452, "4.2.2", f"{who}Mailbox full, try again later")


def _checked(quota: QuotaService, mailboxes: tuple[str, ...], octets: int) -> Deferred:
    return gatherResults([quota.check(m, octets) for m in mailboxes], consumeErrors=True)


def _failed(reason: Any) -> Reply:
    log.failure("smtp: quota check failed", reason)
    return TEMPORARY_FAILURE


def rcpt_refusal(quota: QuotaService, mailboxes: tuple[str, ...], declared: int,
                 path: str) -> "Deferred[Reply | None]":
    """The reply refusing a recipient whose mailboxes (any of them) are full, or C{None}."""
    def answer(verdicts: list[str | None]) -> Reply | None:
        worst = next((v for v in verdicts if v == TOO_BIG), None) or \
            next((v for v in verdicts if v is not None), None)
        return None if worst is None else _reply(worst, f"<{path}>: ")

    # At least a byte: a mailbox exactly at its limit is full.
    return _checked(quota, mailboxes, max(declared, 1)).addCallbacks(answer, _failed)


def stored_size(body: bytes) -> int:
    """
    The size C{body} (LF line ends) is counted at: with CRLF line ends, as
    IMAP reports it, and room for the Return-Path: and Received: lines
    delivery puts in front.
    """
    return len(body) + body.count(b"\n") + 200


def data_refusal(quota: QuotaService, blocking: Workers, mailboxes: tuple[str, ...],
                 body: bytes) -> "Deferred[Reply | None]":
    """The reply refusing the message when no local mailbox can take it, or C{None}."""
    def answer(verdicts: list[str | None]) -> Reply | None:
        if not verdicts or None in verdicts:
            return None
        return _reply(TOO_BIG if all(v == TOO_BIG for v in verdicts) else "full", "")

    # Counting the lines of a 25 MB message is the pool's work, not the reactor's.
    return blocking.run(stored_size, body).addCallback(
        lambda octets: _checked(quota, mailboxes, octets)).addCallbacks(answer, _failed)
