# -*- test-case-name: tests.test_relay_policy -*-
"""
What the queue does after an attempt: retry when, bounce whom, warn
whom, or forget the message. Pure functions of the attempt's replies,
the envelope's age and attempt count and the C{[relay]} settings; no
clock, no files, no sockets (docs/relay.md, "Retries" and "Bounces").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from twisted_mail_screen.relay.client import Reply
from twisted_mail_screen.relay.config import RelayConfig
from twisted_mail_screen.relay.spool import BOUNCED, FAILED, PENDING, SENT

#: The enhanced status of a recipient given up on because the message is too old.
EXPIRED_STATUS = "4.4.7"


def recipient_state(reply: Reply) -> str | None:
    """
    A recipient's state after one reply: sent (2xx/3xx), failed for good
    (5xx, bounced next) or still pending (anything else: retried).
    C{None} for code 0, "not tried" (the queue was shutting down).
    """
    if reply.code == 0:
        return None
    if reply.positive:
        return SENT
    if reply.permanent:
        return FAILED
    return PENDING


def retry_delay(attempts: int, relay: RelayConfig) -> float:
    """Seconds before the next attempt: doubled after each attempt, capped."""
    return min(relay.retry_minutes * 60 * 2 ** max(attempts - 1, 0),
               relay.max_retry_minutes * 60)


def retry_after_error(now: float, relay: RelayConfig) -> float:
    """When to try again after an attempt that crashed (a bug, a disk error)."""
    return now + relay.retry_minutes * 60


def due_after_load(next_attempt: float, now: float, relay: RelayConfig) -> float:
    """
    An envelope read at start-up: a next attempt further away than the
    longest wait means the clock went back; it is due now.
    """
    return now if next_attempt - now > relay.max_retry_minutes * 60 else next_attempt


def expiry_reply(relay: RelayConfig, last_reply: str) -> str:
    """The reply recorded (and reported in the bounce) for an expired recipient."""
    last = f"; last reply: {last_reply}" if last_reply else ""
    return (f"{EXPIRED_STATUS} message expired after {relay.queue_lifetime_hours} hours "
            f"in the queue{last}")


@dataclass(frozen=True)
class Decision:
    """
    What to do with a message after an attempt.

    @ivar attempts: the attempt count to record.
    @ivar retry_at: when the recipients still pending are tried again.
    @ivar expired: pending recipients given up on (the queue lifetime is
        over): they fail with L{EXPIRED_STATUS} and L{expiry_reply}.
    @ivar bounce: every failed recipient (expired ones included), in
        envelope order: each gets into a bounce, then counts as bounced.
    @ivar delay_notice: the recipients a delay warning names; empty when
        none is due.
    @ivar notify_sender: whether bounces and warnings go to the sender
        (never for the null sender: no bounce for a bounce, RFC 3464).
    @ivar done: every recipient is sent or bounced once the bounce is out:
        the message leaves the queue.
    """

    attempts: int
    retry_at: float
    expired: tuple[str, ...] = ()
    bounce: tuple[str, ...] = ()
    delay_notice: tuple[str, ...] = ()
    notify_sender: bool = True
    done: bool = False


def decide(states: Mapping[str, str], *, tried: bool, created: float, attempts: int,
           warned: bool, sender: str, now: float, relay: RelayConfig) -> Decision:
    """
    The decision after an attempt.

    @param states: each recipient's state, in envelope order, with this
        attempt's replies recorded (L{recipient_state}).
    @param tried: whether any recipient got a reply this time (an attempt
        cut short by a shutdown is not counted and not delayed).
    @param created: when the message was queued; C{now - created} is its age.
    @param attempts: the attempts counted before this one.
    @param warned: whether a delay warning went out already.
    """
    if tried:
        attempts += 1
    age = now - created
    pending = [a for a, s in states.items() if s == PENDING]
    expired = tuple(pending) if age >= relay.queue_lifetime_hours * 3600 else ()
    after = {a: (FAILED if a in expired else s) for a, s in states.items()}
    still = tuple(a for a, s in after.items() if s == PENDING)
    warn = (relay.delay_warning_hours > 0 and not warned and bool(still)
            and age >= relay.delay_warning_hours * 3600)
    bounce = tuple(a for a, s in after.items() if s == FAILED)
    return Decision(
        attempts=attempts,
        retry_at=now + retry_delay(attempts, relay) if tried else now,
        expired=expired,
        bounce=bounce,
        delay_notice=still if warn else (),
        notify_sender=bool(sender),
        done=all(s in (SENT, BOUNCED, FAILED) for s in after.values()))
