# -*- test-case-name: tests.test_fault_plan -*-
"""
The fault plan of a test host: rules a test adds so that the server
misbehaves exactly when and as often as the test says (docs/faults.md).

It knows nothing of sockets: the protocols ask it at each command, the
relay at each delivery attempt, the authenticator at each login, the way
they ask screening. It is not locked: like every other shared service it
lives on the reactor thread, and a test thread calls it through
L{twisted_mail_screen.testing.in_reactor}.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterable

#: A reply a rule answers with: an SMTP code, then text on one line of at
#: most 512 octets with its CRLF (RFC 5321 4.5.3.1.5).
_REPLY = re.compile(r"[2-5][0-9]{2}(?: [^\r\n]{0,506})?")
_COMMAND = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}")
#: The most rules a plan holds, and the longest pattern: the web API and the
#: control channel add rules, and a plan is scanned at every command.
MAX_RULES = 1000
MAX_PATTERN = 1000

#: Which rules answer a command: at most one of each group applies to it.
_GROUPS = {"reject": "reply", "tempfail": "reply", "mailbox_full": "reply",
           "delay": "delay", "disconnect": "disconnect"}

#: The command name of the end of a message (the reply after the final dot).
END_OF_DATA = "END-OF-DATA"


@dataclass
class Rule:
    """
    One fault. C{kind} is the method that added it; C{remaining} is how
    many more times it applies (C{None}: until cleared); C{id} names it
    for L{FaultPlan.remove} (unique within one plan, never reused).
    """

    kind: str
    command: str
    match: str | None = None
    reply: str | None = None
    seconds: float = 0.0
    remaining: int | None = 1
    id: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The rule as JSON (the web API and the control channel show it so)."""
        return dataclasses.asdict(self)

    def matches(self, command: str, subjects: Iterable[str]) -> bool:
        if self.command != command:
            return False
        if self.match is None:
            return True
        pattern = self.match.lower()
        return any(fnmatchcase(s.lower(), pattern) for s in subjects)


@dataclass(frozen=True)
class Decision:
    """What the rules say about one command: wait, answer instead, then close."""

    reply: str | None = None
    temporary: bool = False
    delay: float = 0.0
    disconnect: bool = False


class FaultPlan:
    """The active fault rules of one test-host server."""

    def __init__(self) -> None:
        self._rules: list[Rule] = []
        self._last_id = 0

    # adding rules

    def reject(self, command: str = "RCPT", match: str | None = "*@bounce.test",
               reply: str = "550 5.1.1 No such user", times: int | None = 1) -> Rule:
        """Answer C{command} with a permanent (5xx) C{reply} instead of running it."""
        return self._add(Rule("reject", _command(command), match, _reply(reply, "5"),
                              remaining=_times(times)))

    def tempfail(self, command: str, match: str | None = None,
                 reply: str = "451 4.3.0 Temporary failure (injected)",
                 times: int | None = 1) -> Rule:
        """Answer C{command} with a temporary (4xx) C{reply} instead of running it."""
        return self._add(Rule("tempfail", _command(command), match, _reply(reply, "4"),
                              remaining=_times(times)))

    def delay(self, command: str, seconds: float, times: int | None = 1) -> Rule:
        """Hold the reply to C{command} for C{seconds} on the server's clock."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ValueError(f"delay: seconds must be a number >= 0, not {seconds!r}")
        return self._add(Rule("delay", _command(command), seconds=float(seconds),
                              remaining=_times(times)))

    def disconnect(self, after: str = "DATA", times: int | None = 1) -> Rule:
        """Close the connection right after the reply to C{after}."""
        return self._add(Rule("disconnect", _command(after), remaining=_times(times)))

    def fail_auth(self, user: str, times: int | None = 1) -> Rule:
        """Refuse the login of C{user} (a pattern) as if the password were wrong."""
        return self._add(Rule("fail_auth", "AUTH", _pattern(user, "user"), remaining=_times(times)))

    def mailbox_full(self, address: str, times: int | None = 1) -> Rule:
        """Answer RCPT TO C{address} (a pattern) as a full mailbox does."""
        return self._add(Rule("mailbox_full", "RCPT", _pattern(address, "address"),
                              "452 4.2.2 Mailbox full", remaining=_times(times)))

    def fail_delivery(self, reply: str = "451 4.4.1 Connection refused (injected)",
                      match: str | None = None, times: int | None = 1) -> Rule:
        """
        End the relay's next attempt for a recipient matching C{match} as if
        the remote server had answered C{reply} (4xx: retried later; 5xx: bounced).
        """
        if not isinstance(reply, str) or not _REPLY.fullmatch(reply) or reply[0] not in "45":
            raise ValueError("fail_delivery: reply must be one line of at most 510 characters "
                             f"starting with a 4xx or 5xx code: {reply!r:.80}")
        return self._add(Rule("fail_delivery", "DELIVERY", match, reply, remaining=_times(times)))

    # listing and clearing

    def rules(self) -> list[Rule]:
        """The active rules, oldest first, as copies (with their remaining counts)."""
        return [dataclasses.replace(r) for r in self._rules]

    def clear(self) -> None:
        """Remove every rule."""
        self._rules.clear()

    def remove(self, rule_id: int) -> bool:
        """Remove the rule with this C{id}; whether it was still active."""
        for rule in self._rules:
            if rule.id == rule_id:
                self._rules.remove(rule)
                return True
        return False

    def __bool__(self) -> bool:
        return True  # an empty plan is still a plan: callers test for None

    # asked by the server

    def take(self, command: str, subjects: str | Iterable[str] = ()) -> Decision | None:
        """
        The decision for one C{command} whose argument is C{subjects} (an
        address, a user, or several recipients): the first matching
        reply rule, delay and disconnect each apply once. C{None} when no
        rule matches (the common case costs one scan of a short list).
        """
        if not self._rules:
            return None
        subjects = (subjects,) if isinstance(subjects, str) else tuple(subjects)
        command = command.upper()
        found: dict[str, Rule] = {}
        for rule in self._rules:
            group = _GROUPS.get(rule.kind)
            if group is not None and group not in found and rule.matches(command, subjects):
                found[group] = rule
        if not found:
            return None
        for rule in found.values():
            self._spend(rule)
        reply = found.get("reply")
        return Decision(reply=reply.reply if reply else None,
                        temporary=bool(reply and reply.kind != "reject"),
                        delay=found["delay"].seconds if "delay" in found else 0.0,
                        disconnect="disconnect" in found)

    def auth_fails(self, user: str) -> bool:
        """Whether a C{fail_auth} rule refuses this login (and is spent once)."""
        return self._first("fail_auth", "AUTH", (user,)) is not None

    def delivery_reply(self, recipients: Iterable[str]) -> str | None:
        """The reply a C{fail_delivery} rule gives this relay attempt, if any."""
        rule = self._first("fail_delivery", "DELIVERY", tuple(recipients))
        return rule.reply if rule is not None else None

    def _first(self, kind: str, command: str, subjects: tuple[str, ...]) -> Rule | None:
        for rule in self._rules:
            if rule.kind == kind and rule.matches(command, subjects):
                self._spend(rule)
                return rule
        return None

    def _add(self, rule: Rule) -> Rule:
        if len(self._rules) >= MAX_RULES:
            raise ValueError(f"the fault plan holds at most {MAX_RULES} rules: clear some first")
        if rule.match is not None and (not isinstance(rule.match, str) or len(rule.match) > MAX_PATTERN):
            raise ValueError(f"match must be a string of at most {MAX_PATTERN} characters")
        self._last_id += 1
        rule.id = self._last_id
        self._rules.append(rule)
        return dataclasses.replace(rule)

    def _spend(self, rule: Rule) -> None:
        if rule.remaining is None:
            return
        rule.remaining -= 1
        if rule.remaining <= 0:
            self._rules.remove(rule)


def _command(name: str) -> str:
    if not isinstance(name, str) or not _COMMAND.fullmatch(name):
        raise ValueError(f"command must be a command name such as 'RCPT', not {name!r:.80}")
    return name.upper()


def _reply(reply: str, first: str) -> str:
    if not isinstance(reply, str) or not _REPLY.fullmatch(reply) or reply[0] != first:
        raise ValueError(f"reply must be one line of at most 510 characters starting with a "
                         f"{first}xx code, not {reply!r:.80}")
    return reply


def _pattern(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_PATTERN:
        raise ValueError(f"{what} must be a non-empty string or pattern of at most "
                         f"{MAX_PATTERN} characters, not {value!r:.80}")
    return value


def _times(times: int | None) -> int | None:
    if times is None:
        return None
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError(f"times must be a positive integer or None, not {times!r}")
    return times
