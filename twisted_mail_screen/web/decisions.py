# -*- test-case-name: tests.test_web_screening -*-
"""
The recent screening decisions C{GET /api/v1/screening/decisions} lists:
a bounded ring the composition root subscribes to the event bus when the
server starts, apart from the web port's routes, so that a web port built
on its first connection (the pytest plugin's) still lists the decisions
made before it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted_mail_screen.runtime.events import Event

#: How many decisions are kept for C{GET /api/v1/screening/decisions}.
DECISIONS_KEPT = 1000


class Decisions:
    """The last L{DECISIONS_KEPT} C{screening.decision} events, oldest first."""

    def __init__(self, kept: int = DECISIONS_KEPT) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=kept)

    def __call__(self, event: Event) -> None:
        if event.kind == "screening.decision":
            self._ring.append(dict(event.data))

    def latest(self, limit: int, client: str | None, action: str | None) -> list[dict[str, Any]]:
        """Newest first, at most C{limit}, of one client and/or action when given."""
        out = []
        for decision in reversed(self._ring):
            if len(out) >= limit:
                break
            if client is not None and decision.get("client") != client:
                continue
            if action is not None and decision.get("action") != action:
                continue
            out.append(decision)
        return out
