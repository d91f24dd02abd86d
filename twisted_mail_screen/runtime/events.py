# -*- test-case-name: tests.test_web -*-
"""
In-process events: what changed (a message delivered, a block added, a
queue entry held), for the web port's live updates and its metrics.

The services that change state publish; anything that wants to know
subscribes. Publishing never fails the publisher: a subscriber that
raises is logged and the others still run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger


@dataclass(frozen=True)
class Event:
    """
    One change. C{kind} is dotted (C{message.new}, C{screening.block},
    C{queue.held}); C{data} is JSON-ready.
    """

    kind: str
    data: Mapping[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out on the reactor thread; publish from there only."""

    log = Logger()

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call C{subscriber} for every later event; returns the unsubscribe."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)
        return unsubscribe

    def subscribers(self) -> int:
        """How many subscribers there are (an event stream's client counts while connected)."""
        return len(self._subscribers)

    def publish(self, kind: str, **data: Any) -> None:
        event = Event(kind, data)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                self.log.failure("events: a subscriber failed on {kind}", kind=kind)
