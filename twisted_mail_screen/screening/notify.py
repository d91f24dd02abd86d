# -*- test-case-name: tests.test_notify -*-
"""
Notices to the postmaster when screening blocks an address or freezes an
account.

Each notice says what happened, why (the rule and its counts), for how
long, what the client did last, and the exact command that undoes it, so
the postmaster can act from the mail alone.

The notifier is rate-limited itself: an attack that triggers thousands of
blocks must not bury the postmaster's mailbox. Within a period (10 minutes
by default) the first few notices (5) are sent one by one; the rest are
collected and sent as one digest when the period ends. While notices keep
overflowing, each following period sends only its digest; after a quiet
period the notifier is back to single messages.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.screening.listfile import format_expiry

# (time, protocol, description) of something a client did.
Event = tuple[float, str, str]

_POLICY = policy.default.clone(linesep="\n")


@dataclass(frozen=True)
class Notice:
    """One thing the postmaster should hear about."""

    subject: str
    body: str
    summary: str


def _event_lines(events: Sequence[Event]) -> list[str]:
    if not events:
        return ["  (none recorded)"]
    return [f"  {format_expiry(when)}  {protocol:<10}  {what}"
            for when, protocol, what in events]


class PostmasterNotifier:
    """
    Builds notices as RFC 5322 messages and hands them to C{deliver}
    (wired by the service to local delivery into the postmaster's
    Maildir), at most C{max_messages} per C{period_seconds} plus digests.
    """

    def __init__(self, clock: IReactorTime,
                 deliver: Callable[[bytes], "Deferred[Any] | None"],
                 hostname: str, postmaster: str, max_messages: int = 5,
                 period_seconds: float = 600.0, log: Logger | None = None,
                 digest_limit: int = 500) -> None:
        self._clock = clock
        self._deliver = deliver
        self._hostname = hostname
        self._postmaster = postmaster
        self._max = max_messages
        self._period = period_seconds
        self._log = log or Logger()
        self._digest_limit = digest_limit
        self._call: IDelayedCall | None = None
        self._sent = 0
        self._digest_only = False
        self._pending: list[Notice] = []
        self._overflow = 0
        self.messages_sent = 0
        #: A cluster backend's shared limit (screening/redis_notify.py): given
        #: each notice first; C{False} (Redis down) leaves it to the local limit.
        self.shared: Callable[[Notice], bool] | None = None

    # Building notices

    def notify_block(self, address: str, rule: str, count: int, limit: int,
                     window_minutes: int | None, protocol: str,
                     expires: float | None, minutes: int | None,
                     events: Sequence[Event] = (), offence: int = 1) -> None:
        """Tell the postmaster that C{address} was blocked by C{rule}."""
        within = f" within {window_minutes} minutes" if window_minutes else ""
        until = ("until removed" if expires is None
                 else f"{minutes} minutes, until {format_expiry(expires)}")
        repeat = f" (offence {offence} within the repeat memory)" if offence > 1 else ""
        body = "\n".join([
            f"The screening service on {self._hostname} blocked {address}.",
            "",
            f"  Address:   {address}",
            f"  Rule:      {rule}: {count} (limit {limit}){within}",
            f"  Protocol:  {protocol}",
            f"  Blocked:   {until}{repeat}",
            "",
            "Last events from this client:",
            *_event_lines(events),
            "",
            "New connections from this address are refused until then.",
            "To lift the block now, run:",
            "",
            f"  mailscreen block remove {address}",
            "",
        ])
        self._submit(Notice(
            subject=f"[mailscreen] blocked {address} ({rule})",
            body=body,
            summary=(f"blocked {address}  rule={rule} {count}/{limit}  "
                     f"protocol={protocol}  until={format_expiry(expires)}  "
                     f"lift: mailscreen block remove {address}")))

    def notify_freeze(self, username: str, address: str, protocol: str,
                      failures: int, limit: int, frozen: bool,
                      expires: float | None, events: Sequence[Event] = ()) -> None:
        """
        Tell the postmaster that one session failed to authenticate as
        C{username} C{failures} times, and whether the account was frozen.
        """
        if frozen:
            state = ("frozen until thawed" if expires is None
                     else f"frozen until {format_expiry(expires)}")
            action = [
                "The account can still receive and read mail but cannot send.",
                "To thaw it now, run:",
                "",
                f"  mailscreen frozen thaw {username}",
            ]
            subject = f"[mailscreen] froze account {username}"
            summary = (f"froze {username}  from={address}  protocol={protocol}  "
                       f"until={format_expiry(expires)}  "
                       f"lift: mailscreen frozen thaw {username}")
        else:
            state = "not frozen (screening.session_auth.freeze_account is off)"
            action = ["Nothing else was done; the session was closed."]
            subject = f"[mailscreen] authentication failures for {username}"
            summary = (f"session auth limit {username}  from={address}  "
                       f"protocol={protocol}")
        body = "\n".join([
            f"A {protocol} session from {address} failed to authenticate "
            f"{failures} times (limit {limit}).",
            "",
            f"  Account:   {username}",
            f"  Client:    {address}",
            f"  Protocol:  {protocol}",
            f"  Rule:      session_auth: {failures} (limit {limit}) in one session",
            f"  Account:   {state}",
            "",
            "Last events from this client:",
            *_event_lines(events),
            "",
            *action,
            "",
        ])
        self._submit(Notice(subject=subject, body=body, summary=summary))

    # Rate limiting

    def _submit(self, notice: Notice) -> None:
        if self.shared is None or not self.shared(notice):
            self.submit_locally(notice)

    def submit_locally(self, notice: Notice) -> None:
        """Send or hold C{notice} under this node's own limit."""
        if self._call is None:
            self._start_period()
        if not self._digest_only and self._sent < self._max:
            self._sent += 1
            self._send(notice.subject, notice.body)
        elif len(self._pending) < self._digest_limit:
            self._pending.append(notice)
        else:
            self._overflow += 1

    def _start_period(self) -> None:
        self._sent = 0
        self._call = self._clock.callLater(self._period, self._period_ended)

    def _period_ended(self) -> None:
        self._call = None
        if self._pending or self._overflow:
            self._send_digest()
            self._digest_only = True
            self._start_period()
        else:
            self._digest_only = False

    def _send_digest(self) -> None:
        notices, self._pending = self._pending, []
        overflow, self._overflow = self._overflow, 0
        self.send_digest([n.summary for n in notices], overflow)

    def send_digest(self, summaries: Sequence[str], overflow: int) -> None:
        """One digest of C{summaries} (and C{overflow} more not listed)."""
        total = len(summaries) + overflow
        lines = [
            f"The screening service on {self._hostname} had {total} more events "
            f"than it sends single notices for (at most {self._max} per "
            f"{int(self._period // 60)} minutes). They are listed here, oldest first.",
            "",
            *("  " + summary for summary in summaries),
        ]
        if overflow:
            lines += ["", f"  ... and {overflow} more; run `mailscreen block list` "
                          "and `mailscreen frozen list` for the full state."]
        lines.append("")
        self._send(f"[mailscreen] digest: {total} screening events", "\n".join(lines))

    def flush(self) -> None:
        """Send any collected notices now (at shutdown)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._pending or self._overflow:
            self._send_digest()
        self._digest_only = False

    stop = flush

    # Delivery

    def build_message(self, subject: str, body: str) -> bytes:
        """An RFC 5322 message from MAILER-DAEMON to the postmaster."""
        now = self._clock.seconds()
        msg = EmailMessage(policy=_POLICY)
        msg["From"] = f"MAILER-DAEMON@{self._hostname}"
        msg["To"] = self._postmaster
        msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.fromtimestamp(now, timezone.utc))
        msg["Message-ID"] = f"<{int(now)}.{secrets.token_hex(8)}.screening@{self._hostname}>"
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Mailscreen-Event"] = "screening"
        msg.set_content(body)
        return msg.as_bytes()

    def send(self, subject: str, body: str) -> None:
        """Deliver one notice now, whatever the limit (the cluster's limit said so)."""
        self._send(subject, body)

    def _send(self, subject: str, body: str) -> None:
        self.messages_sent += 1
        try:
            result = self._deliver(self.build_message(subject, body))
        except Exception:
            self._log.failure("screening: could not deliver notice {subject!r}",
                              subject=subject)
            return
        if isinstance(result, Deferred):
            result.addErrback(lambda f: self._log.failure(
                "screening: could not deliver notice {subject!r}", f, subject=subject))
