# -*- test-case-name: tests.test_queue -*-
"""
Delivery status notifications (RFC 3464): the bounce a sender gets when
a recipient fails for good or the message expires, and the delay warning.

The report is C{multipart/report; report-type=delivery-status} with a
human-readable part, the C{message/delivery-status} part (one block per
recipient, with the remote server's reply as the diagnostic code) and
the original message's headers (C{text/rfc822-headers}), built with LF
line endings like every stored message.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from twisted.mail.smtp import rfc822date


@dataclass(frozen=True)
class Failed:
    """One recipient to report."""

    address: str
    status: str  # enhanced status code, e.g. 5.1.1
    diagnostic: str  # the remote reply ("550 5.1.1 no such user") or our own words
    remote_host: str = ""


def _date(seconds: float) -> str:
    return rfc822date(time.localtime(seconds)).decode()


def original_headers(message: bytes) -> bytes:
    """The header block of a stored (LF) message."""
    end = message.find(b"\n\n")
    head = message if end < 0 else message[:end + 1]
    return head if head.endswith(b"\n") else head + b"\n"


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii").replace("\r", " ").replace("\n", " ")


def build_dsn(*, hostname: str, queue_id: str, sender: str, recipients: list[Failed],
              message: bytes, arrival: float, now: float, delayed: bool = False,
              retry_until: float | None = None) -> bytes:
    """
    The DSN for C{recipients} of queued message C{queue_id}, addressed to
    C{sender}, as stored message bytes (no Return-Path; the envelope
    sender of a DSN is always the null path).
    """
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{hostname}"
    mailer = f"MAILER-DAEMON@{hostname}"
    if delayed:
        subject = "Delayed Mail (still being retried)"
        intro = (f"This is the mail system at host {hostname}.\n\n"
                 "Your message could not be delivered yet to the recipients below.\n"
                 "It is still in the queue and delivery will be retried")
        if retry_until is not None:
            intro += f" until {_date(retry_until)}"
        intro += ".\nYou do not need to send it again.\n"
    else:
        subject = "Undelivered Mail Returned to Sender"
        intro = (f"This is the mail system at host {hostname}.\n\n"
                 "I'm sorry to have to inform you that your message could not\n"
                 "be delivered to one or more recipients. It's attached below.\n")
    human = intro + "\n" + "".join(
        f"<{r.address}>: {('host ' + r.remote_host + ' said: ') if r.remote_host else ''}"
        f"{_ascii(r.diagnostic)}\n" for r in recipients)
    status = (f"Reporting-MTA: dns; {hostname}\n"
              f"X-Mailscreen-Queue-ID: {queue_id}\n"
              f"Arrival-Date: {_date(arrival)}\n")
    for r in recipients:
        status += (f"\nFinal-Recipient: rfc822; {r.address}\n"
                   f"Action: {'delayed' if delayed else 'failed'}\n"
                   f"Status: {r.status}\n")
        if r.remote_host:
            status += f"Remote-MTA: dns; {r.remote_host}\n"
        status += f"Diagnostic-Code: smtp; {_ascii(r.diagnostic)}\n"
        status += f"Last-Attempt-Date: {_date(now)}\n"
        if delayed and retry_until is not None:
            status += f"Will-Retry-Until: {_date(retry_until)}\n"
    headers = (f"From: Mail Delivery System <{mailer}>\n"
               f"To: <{sender}>\n"
               f"Subject: {subject}\n"
               f"Date: {_date(now)}\n"
               f"Message-ID: <{queue_id}.{secrets.token_hex(6)}@{hostname}>\n"
               "Auto-Submitted: auto-replied\n"
               "MIME-Version: 1.0\n"
               f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"\n'
               "Content-Transfer-Encoding: 7bit\n\n"
               "This is a MIME-encapsulated message.\n\n")
    body = (f"--{boundary}\n"
            "Content-Description: Notification\n"
            "Content-Type: text/plain; charset=us-ascii\n\n"
            f"{human}\n"
            f"--{boundary}\n"
            "Content-Description: Delivery report\n"
            "Content-Type: message/delivery-status\n\n"
            f"{status}\n"
            f"--{boundary}\n"
            "Content-Description: Undelivered Message Headers\n"
            "Content-Type: text/rfc822-headers\n\n")
    return (headers + body).encode() + original_headers(message) + f"\n--{boundary}--\n".encode()
