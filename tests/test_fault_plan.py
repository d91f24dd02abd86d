"""The fault plan on its own: rules, counts, matching, listing and clearing."""

from __future__ import annotations

import pytest

from twisted_mail_screen.faults.plan import END_OF_DATA, Decision, FaultPlan


def test_reject_applies_exactly_times_then_is_gone() -> None:
    plan = FaultPlan()
    plan.reject("RCPT", match="*@bounce.test", reply="550 5.1.1 No such user", times=2)
    assert plan.take("RCPT", "a@other.test") is None
    assert plan.take("RCPT", "a@bounce.test") == Decision(reply="550 5.1.1 No such user")
    assert plan.rules()[0].remaining == 1
    assert plan.take("rcpt", "B@BOUNCE.TEST") == Decision(reply="550 5.1.1 No such user")
    assert plan.take("RCPT", "a@bounce.test") is None
    assert plan.rules() == []


def test_defaults_and_times_none() -> None:
    plan = FaultPlan()
    plan.reject()
    plan.tempfail("MAIL", times=None)
    rules = plan.rules()
    assert [(r.kind, r.command, r.match, r.reply, r.remaining) for r in rules] == [
        ("reject", "RCPT", "*@bounce.test", "550 5.1.1 No such user", 1),
        ("tempfail", "MAIL", None, "451 4.3.0 Temporary failure (injected)", None)]
    for _ in range(5):
        assert plan.take("MAIL", "x@y.test") == Decision(
            reply="451 4.3.0 Temporary failure (injected)", temporary=True)
    assert len(plan.rules()) == 2
    plan.clear()
    assert plan.rules() == [] and plan.take("MAIL", "x@y.test") is None


def test_rules_are_copies() -> None:
    plan = FaultPlan()
    plan.reject(times=3)
    plan.rules()[0].remaining = 0
    assert plan.rules()[0].remaining == 3


def test_delay_disconnect_and_reply_combine_once_each() -> None:
    plan = FaultPlan()
    plan.delay("DATA", 30)
    plan.disconnect(after="DATA")
    plan.tempfail("DATA", reply="421 4.3.2 Shutting down")
    plan.tempfail("DATA", reply="452 4.3.1 Later")
    assert plan.take("DATA", "") == Decision(reply="421 4.3.2 Shutting down", temporary=True,
                                             delay=30.0, disconnect=True)
    assert plan.take("DATA", "") == Decision(reply="452 4.3.1 Later", temporary=True)
    assert plan.take("DATA", "") is None


def test_mailbox_full_matches_rcpt() -> None:
    plan = FaultPlan()
    plan.mailbox_full("full@example.test", times=1)
    assert plan.take("MAIL", "full@example.test") is None
    assert plan.take("RCPT", "Full@Example.test") == Decision(reply="452 4.2.2 Mailbox full",
                                                              temporary=True)
    assert plan.take("RCPT", "full@example.test") is None


def test_end_of_data_matches_any_recipient() -> None:
    plan = FaultPlan()
    plan.reject(END_OF_DATA, match="*@bounce.test", reply="554 5.6.0 Refused")
    assert plan.take(END_OF_DATA, ["a@ok.test"]) is None
    assert plan.take(END_OF_DATA, ["a@ok.test", "b@bounce.test"]) == Decision(reply="554 5.6.0 Refused")


def test_fail_auth_and_fail_delivery() -> None:
    plan = FaultPlan()
    plan.fail_auth("bob*", times=2)
    plan.fail_delivery("550 5.1.1 Gone", match="*@far.test")
    assert not plan.auth_fails("alice@example.test")
    assert plan.auth_fails("bob@example.test") and plan.auth_fails("bob")
    assert not plan.auth_fails("bob")
    assert plan.take("AUTH", "bob") is None  # fail_auth is asked through auth_fails only
    assert plan.delivery_reply(["x@near.test"]) is None
    assert plan.delivery_reply(["x@far.test"]) == "550 5.1.1 Gone"
    assert plan.delivery_reply(["x@far.test"]) is None


@pytest.mark.parametrize("call", [
    lambda p: p.reject(reply="451 4.3.0 not permanent"),
    lambda p: p.tempfail("RCPT", reply="550 5.0.0 not temporary"),
    lambda p: p.reject(reply="550 5.1.1 two\r\nlines"),
    lambda p: p.reject(command="RC PT"),
    lambda p: p.reject(times=0),
    lambda p: p.delay("DATA", -1),
    lambda p: p.fail_auth(""),
    lambda p: p.fail_delivery("250 2.0.0 ok"),
])
def test_bad_rules_are_refused(call) -> None:
    plan = FaultPlan()
    with pytest.raises(ValueError):
        call(plan)
    assert plan.rules() == []


def test_fail_delivery_ends_the_relay_attempt_with_its_reply() -> None:
    """
    The relay's attempt for a matching recipient ends with the injected
    reply (here permanent: the recipient fails for good) and never reaches
    the connection pool; other domains are sent as usual.
    """
    from twisted.internet.defer import ensureDeferred, succeed
    from twisted.logger import Logger

    from twisted_mail_screen.relay.attempt import attempt_message
    from twisted_mail_screen.relay.client import Reply
    from twisted_mail_screen.relay.spool import FAILED, SENT, QueuedMessage, Recipient

    plan = FaultPlan()
    plan.fail_delivery("550 5.1.1 Gone (injected)", match="*@far.test")
    queued = QueuedMessage("q1", "a@example.test", 0.0, 0.0,
                           recipients=[Recipient("x@far.test"), Recipient("y@near.test")])
    submitted = []

    def submit(job) -> None:  # the pool: the remote host accepts everything
        submitted.append(job.domain)
        job.result.callback({a: (Reply(250, "2.0.0 Ok"), "mx.near.test") for a in job.recipients})

    results = []
    ensureDeferred(attempt_message(queued, b"m", submit, lambda *_: succeed(None), Logger(),
                                   plan)).addCallback(results.append)
    assert results and results[0][0] is True
    assert submitted == ["near.test"]
    far, near = queued.recipients
    assert (far.state, far.reply, far.status) == (FAILED, "550 5.1.1 Gone (injected)", "5.1.1")
    assert near.state == SENT
    assert plan.rules() == []


def test_bounded_rules_and_text() -> None:
    """A plan fed by the web API cannot grow without bound: rule count and text lengths are capped."""
    from twisted_mail_screen.faults.plan import MAX_PATTERN, MAX_RULES

    plan = FaultPlan()
    with pytest.raises(ValueError, match="at most 510 characters"):
        plan.reject(reply="550 " + "x" * 507)
    plan.reject(reply="550 " + "x" * 506)
    with pytest.raises(ValueError, match=f"at most {MAX_PATTERN} characters"):
        plan.reject(match="*" * (MAX_PATTERN + 1))
    with pytest.raises(ValueError, match=f"at most {MAX_PATTERN} characters"):
        plan.mailbox_full("x" * (MAX_PATTERN + 1))
    with pytest.raises(ValueError, match="command must be a command name"):
        plan.tempfail("X" * 65)
    with pytest.raises(ValueError, match="4xx or 5xx"):
        plan.fail_delivery(reply=451)  # type: ignore[arg-type]
    for _ in range(MAX_RULES - 1):
        plan.disconnect(after="QUIT")
    with pytest.raises(ValueError, match=f"at most {MAX_RULES} rules"):
        plan.delay("DATA", 1)
    plan.clear()
    plan.delay("DATA", 1)
