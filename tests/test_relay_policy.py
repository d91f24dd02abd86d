"""
The queue's decision after an attempt (twisted_mail_screen/relay/policy.py):
retry times, expiry, bounces, delay warnings, done. Plain values in,
plain values out: no clock, no files, no sockets.
"""

from __future__ import annotations

import pytest

from twisted_mail_screen.relay.client import Reply
from twisted_mail_screen.relay.config import RelayConfig
from twisted_mail_screen.relay.policy import (Decision, decide, due_after_load, expiry_reply,
                                              recipient_state, retry_after_error, retry_delay)
from twisted_mail_screen.relay.spool import BOUNCED, FAILED, PENDING, SENT

HOUR = 3600
RELAY = RelayConfig(enabled=True, queue_lifetime_hours=120, delay_warning_hours=4,
                    retry_minutes=5, max_retry_minutes=240)


def after(states: dict[str, str], *, tried: bool = True, age: float = 0.0, attempts: int = 0,
          warned: bool = False, sender: str = "alice@example.test",
          relay: RelayConfig = RELAY) -> Decision:
    now = 1_000_000.0
    return decide(states, tried=tried, created=now - age, attempts=attempts, warned=warned,
                  sender=sender, now=now, relay=relay)


@pytest.mark.parametrize("reply, state", [
    (Reply(250, "2.1.5 ok"), SENT),
    (Reply(251, "2.1.5 will forward"), SENT),
    (Reply(550, "5.1.1 no such user"), FAILED),
    (Reply(451, "4.3.0 busy"), PENDING),
    (Reply(421, "4.3.2 closing"), PENDING),
    (Reply(0, "4.3.2 not tried: shutting down"), None),
])
def test_recipient_state_from_one_reply(reply, state):
    assert recipient_state(reply) == state


def test_backoff_doubles_up_to_the_longest_wait():
    relay = RelayConfig(enabled=True, retry_minutes=5, max_retry_minutes=15)
    assert [retry_delay(n, relay) for n in (0, 1, 2, 3, 4)] == [300, 300, 600, 900, 900]


def test_a_tried_attempt_counts_and_is_retried_after_the_backoff():
    d = after({"a@r.example": PENDING}, attempts=2)
    assert d.attempts == 3
    assert d.retry_at == 1_000_000.0 + 4 * 300
    assert (d.expired, d.bounce, d.delay_notice, d.done) == ((), (), (), False)


def test_an_attempt_nobody_answered_is_not_counted_and_due_at_once():
    """Cut short by a shutdown: no reply at all, so no backoff either."""
    d = after({"a@r.example": PENDING}, tried=False, attempts=2)
    assert (d.attempts, d.retry_at) == (2, 1_000_000.0)


def test_all_sent_is_done():
    d = after({"a@r.example": SENT, "b@r.example": SENT})
    assert d.done and d.bounce == () and d.delay_notice == ()


def test_failed_recipients_are_bounced_in_envelope_order_and_the_rest_retried():
    d = after({"c@r.example": FAILED, "a@r.example": SENT, "b@s.example": FAILED,
               "d@s.example": PENDING})
    assert d.bounce == ("c@r.example", "b@s.example")
    assert not d.done  # d@s.example is still pending


def test_failed_and_sent_is_done_once_the_bounce_is_out():
    d = after({"a@r.example": FAILED, "b@r.example": SENT, "c@r.example": BOUNCED})
    assert d.bounce == ("a@r.example",) and d.done


def test_expiry_fails_every_pending_recipient():
    d = after({"a@r.example": PENDING, "b@r.example": SENT, "c@r.example": PENDING},
              age=120 * HOUR)
    assert d.expired == ("a@r.example", "c@r.example")
    assert d.bounce == ("a@r.example", "c@r.example")
    assert d.done and d.delay_notice == ()


def test_no_expiry_a_moment_before_the_lifetime():
    d = after({"a@r.example": PENDING}, age=120 * HOUR - 1)
    assert d.expired == () and not d.done


def test_expiry_reply_carries_the_last_reply():
    assert expiry_reply(RELAY, "451 4.2.0 mailbox busy") == \
        "4.4.7 message expired after 120 hours in the queue; last reply: 451 4.2.0 mailbox busy"
    assert expiry_reply(RELAY, "") == "4.4.7 message expired after 120 hours in the queue"


def test_delay_notice_once_after_the_warning_time_for_the_pending_recipients():
    states = {"a@r.example": PENDING, "b@r.example": SENT, "c@r.example": PENDING}
    assert after(states, age=4 * HOUR - 1).delay_notice == ()
    assert after(states, age=4 * HOUR).delay_notice == ("a@r.example", "c@r.example")
    assert after(states, age=5 * HOUR, warned=True).delay_notice == ()


def test_no_delay_notice_when_switched_off_or_nothing_is_pending():
    off = RelayConfig(enabled=True, delay_warning_hours=0)
    assert after({"a@r.example": PENDING}, age=100 * HOUR, relay=off).delay_notice == ()
    assert after({"a@r.example": FAILED}, age=5 * HOUR).delay_notice == ()


def test_no_bounce_or_warning_to_the_null_sender():
    d = after({"a@r.example": FAILED}, sender="")
    assert d.bounce == ("a@r.example",) and d.notify_sender is False
    assert after({"a@r.example": FAILED}).notify_sender is True


def test_after_a_crashed_attempt_the_first_retry_wait():
    assert retry_after_error(100.0, RELAY) == 100.0 + 300


def test_a_next_attempt_beyond_the_longest_wait_is_due_at_load():
    """The clock went back while the server was down: due now, not in a week."""
    now = 1_000.0
    assert due_after_load(now + 240 * 60, now, RELAY) == now + 240 * 60
    assert due_after_load(now + 240 * 60 + 1, now, RELAY) == now
    assert due_after_load(now - 50, now, RELAY) == now - 50
