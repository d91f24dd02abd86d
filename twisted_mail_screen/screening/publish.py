# -*- test-case-name: tests.test_web_events -*-
"""
What screening tells the rest of the server: its decisions, blocks,
unblocks, freezes and thaws, as events (C{docs/api.md}, "Events").

The service's parts call three hooks, wired by
L{twisted_mail_screen.screening.service.ScreeningService.publish_to}:

  - every decision line the rules log (automatic or an administrator's)
    is a C{screening.decision}; a C{block} or C{unblock} decision is also
    a C{screening.block} / C{screening.unblock};
  - a block that lapses is a C{screening.unblock} (reason C{expired});
  - the freeze store says when it freezes or thaws an account, whoever
    asked (the rules, the control channel, the web port), and when a
    freeze lapses.

Publishing is synchronous and on the reactor thread, like the changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.screening.blocklist import BlockList
from twisted_mail_screen.screening.listfile import Entry
from twisted_mail_screen.screening.rules import rule_of

#: C{publish(kind, **data)}: the event bus's publish.
Publish = Callable[..., None]


def _count(fields: Mapping[str, object]) -> int | None:
    """The count of a C{count=5/5} field (C{None} for a manual block)."""
    text = str(fields.get("count", ""))
    head = text.split("/", 1)[0]
    return int(head) if head.isdigit() else None


class ScreeningEvents:
    """Turns screening's hooks into events on C{publish}."""

    def __init__(self, publish: Publish, clock: IReactorTime, blocklist: BlockList) -> None:
        self._publish = publish
        self._clock = clock
        self._blocklist = blocklist

    def decided(self, action: str, client: str, rule: str, fields: Mapping[str, object]) -> None:
        """A decision line was logged: C{screening.decision}, and block/unblock."""
        self._publish("screening.decision", time=self._clock.seconds(), action=action,
                      client=client, rule=rule, **fields)
        if action == "block":
            entry = self._blocklist.get(client)
            offence = fields.get("offence")
            self._publish("screening.block", address=client, rule=rule, count=_count(fields),
                          offence=offence if isinstance(offence, int) else None,
                          expires=entry.expires if entry is not None else None,
                          reason=entry.reason if entry is not None else "")
        elif action == "unblock":
            self._publish("screening.unblock", address=client, rule=rule, count=None,
                          offence=None, expires=None, reason="lifted by an administrator")

    def lapsed(self, entry: Entry) -> None:
        """A block expired (the once-a-second check dropped it)."""
        self._publish("screening.unblock", address=entry.name, rule=rule_of(entry.reason),
                      count=None, offence=None, expires=entry.expires, reason="expired")

    def freeze_changed(self, kind: str, entry: Entry, reason: str | None = None) -> None:
        """C{kind} is C{freeze} or C{thaw}; C{reason} overrides the entry's (a thaw's why)."""
        data: dict[str, Any] = {"user": entry.name, "expires": entry.expires,
                                "reason": entry.reason if reason is None else reason}
        self._publish(f"screening.{kind}", **data)
