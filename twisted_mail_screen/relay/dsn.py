# -*- test-case-name: tests.test_queue -*-
"""
Delivery status notifications (RFC 3464): the bounce a sender gets when
a recipient fails for good or the message expires, the delay warning,
and the success notices a sender asks for with NOTIFY=SUCCESS (RFC 3461):
"delivered" (into a local mailbox) and "relayed" (to a next hop that
takes no DSN requests).

The report is C{multipart/report; report-type=delivery-status} with a
human-readable part, the C{message/delivery-status} part (per message:
the ENVID as C{Original-Envelope-Id}; one block per recipient, with its
ORCPT as C{Original-Recipient} and the remote server's reply as the
diagnostic code) and the original message's headers
(C{text/rfc822-headers}), or the whole message (C{message/rfc822}) in a
failure report when the sender asked for RET=FULL. A report naming a
non-ASCII address, or returning non-ASCII headers, uses RFC 6533's
C{message/global-delivery-status}, C{utf-8} address types and
C{message/global-headers} / C{message/global}. Built with LF line endings
like every stored message.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from email.utils import formatdate


@dataclass(frozen=True)
class Failed:
    """One recipient to report (failed, delayed, delivered or relayed)."""

    address: str
    status: str  # enhanced status code, e.g. 5.1.1
    diagnostic: str  # the remote reply ("550 5.1.1 no such user") or our own words
    remote_host: str = ""
    orcpt: str = ""  # RFC 3461 ORCPT, "type;address"


#: The kinds of report: their Action, Subject and opening words.
FAILED, DELAYED, DELIVERED, RELAYED = "failed", "delayed", "delivered", "relayed"
_SUBJECTS = {FAILED: "Undelivered Mail Returned to Sender",
             DELAYED: "Delayed Mail (still being retried)",
             DELIVERED: "Successful Mail Delivery Report",
             RELAYED: "Successful Mail Delivery Report"}


def _date(seconds: float) -> str:
    # RFC 5322's form with a numeric zone, as twisted.mail.smtp's rfc822date
    # gave, without importing that module (and twisted.cred) into every server.
    return formatdate(seconds, localtime=True)


def original_headers(message: bytes) -> bytes:
    """The header block of a stored (LF) message."""
    end = message.find(b"\n\n")
    head = message if end < 0 else message[:end + 1]
    return head if head.endswith(b"\n") else head + b"\n"


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii").replace("\r", " ").replace("\n", " ")


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)


def _address(address: str) -> str:
    """An address field value (RFC 3464 2.3.2 / RFC 6533 3): rfc822 or utf-8 type."""
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {_one_line(address)}"


def _intro(kind: str, hostname: str, retry_until: float | None) -> str:
    intro = f"This is the mail system at host {hostname}.\n\n"
    if kind == DELAYED:
        intro += ("Your message could not be delivered yet to the recipients below.\n"
                  "It is still in the queue and delivery will be retried")
        if retry_until is not None:
            intro += f" until {_date(retry_until)}"
        return intro + ".\nYou do not need to send it again.\n"
    if kind == DELIVERED:
        return intro + "Your message was delivered to the mailboxes below, as you asked.\n"
    if kind == RELAYED:
        return intro + ("Your message was passed on to the recipients below, as you asked.\n"
                        "Their mail system will not report its delivery.\n")
    return intro + ("I'm sorry to have to inform you that your message could not\n"
                    "be delivered to one or more recipients. It's attached below.\n")


def build_dsn(*, hostname: str, queue_id: str, sender: str, recipients: list[Failed],
              message: bytes, arrival: float, now: float, delayed: bool = False,
              retry_until: float | None = None, kind: str = "", envid: str = "",
              full: bool = False) -> bytes:
    """
    The DSN of C{kind} (failed, or delayed with C{delayed}) for
    C{recipients} of queued message C{queue_id}, addressed to C{sender},
    as stored message bytes (no Return-Path; the envelope sender of a DSN
    is always the null path). C{full}: return the whole message, not
    only its headers (RET=FULL, failure reports only).
    """
    kind = kind or (DELAYED if delayed else FAILED)
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{hostname}"
    mailer = f"MAILER-DAEMON@{hostname}"
    human = _intro(kind, hostname, retry_until) + "\n" + "".join(
        f"<{_one_line(r.address)}>: {('host ' + r.remote_host + ' said: ') if r.remote_host else ''}"
        f"{_ascii(r.diagnostic)}\n" for r in recipients)
    status = f"Reporting-MTA: dns; {hostname}\n"
    if envid:
        status += f"Original-Envelope-Id: {_one_line(envid)}\n"
    status += (f"X-Mailscreen-Queue-ID: {queue_id}\n"
               f"Arrival-Date: {_date(arrival)}\n")
    for r in recipients:
        status += "\n"
        if r.orcpt:
            kind_of, _, original = r.orcpt.partition(";")
            status += f"Original-Recipient: {kind_of}; {_one_line(original)}\n"
        status += (f"Final-Recipient: {_address(r.address)}\n"
                   f"Action: {kind}\n"
                   f"Status: {r.status}\n")
        if r.remote_host:
            status += f"Remote-MTA: dns; {r.remote_host}\n"
        status += f"Diagnostic-Code: smtp; {_ascii(r.diagnostic)}\n"
        status += f"Last-Attempt-Date: {_date(now)}\n"
        if kind == DELAYED and retry_until is not None:
            status += f"Will-Retry-Until: {_date(retry_until)}\n"
    returned = message if full and kind == FAILED else original_headers(message)
    utf8 = not (status.isascii() and returned.isascii() and human.isascii() and sender.isascii())
    if full and kind == FAILED:
        returned_type = "message/global" if utf8 else "message/rfc822"
        description = "Undelivered Message"
    else:
        returned_type = "message/global-headers" if utf8 else "text/rfc822-headers"
        description = "Undelivered Message Headers" if kind in (FAILED, DELAYED) else "Message Headers"
    headers = (f"From: Mail Delivery System <{mailer}>\n"
               f"To: <{sender}>\n"
               f"Subject: {_SUBJECTS[kind]}\n"
               f"Date: {_date(now)}\n"
               f"Message-ID: <{queue_id}.{secrets.token_hex(6)}@{hostname}>\n"
               "Auto-Submitted: auto-replied\n"
               "MIME-Version: 1.0\n"
               f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"\n'
               f"Content-Transfer-Encoding: {'8bit' if utf8 else '7bit'}\n\n"
               "This is a MIME-encapsulated message.\n\n")
    body = (f"--{boundary}\n"
            "Content-Description: Notification\n"
            f"Content-Type: text/plain; charset={'utf-8' if utf8 else 'us-ascii'}\n\n"
            f"{human}\n"
            f"--{boundary}\n"
            "Content-Description: Delivery report\n"
            f"Content-Type: message/{'global-' if utf8 else ''}delivery-status\n\n"
            f"{status}\n"
            f"--{boundary}\n"
            f"Content-Description: {description}\n"
            f"Content-Type: {returned_type}\n\n")
    if not returned.endswith(b"\n"):
        returned += b"\n"
    return (headers + body).encode("utf-8") + returned + f"\n--{boundary}--\n".encode()
