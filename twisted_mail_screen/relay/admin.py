# -*- test-case-name: tests.test_queue -*-
"""
The queue's administration.

C{mailscreen queue} works on the queue's files (L{spool.QueueDirectory}),
not through the server: holds, releases, deletions and flushes work
whether or not a server runs (a running one picks them up within a
second); L{format_queue} is its listing. L{QueueCommands} is the same
set of commands on the running server's L{OutboundQueue}, for the web
port: the change is made in the server at once, through the queue's own
methods.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.relay.queue import OutboundQueue
from twisted_mail_screen.relay.spool import QueuedMessage, iso
from twisted_mail_screen.runtime.control import CommandError


def format_queue(messages: list[QueuedMessage], held: set[str], now: float) -> str:
    """C{mailscreen queue list} output."""
    if not messages:
        return "queue is empty\n"
    lines = []
    for m in sorted(messages, key=lambda m: m.created):
        flag = " (held)" if m.id in held else ""
        lines.append(f"{m.id}{flag}  {m.size} bytes  arrived {iso(m.created)}  "
                     f"attempts {m.attempts}  next {iso(max(m.next_attempt, now))}")
        lines.append(f"  from <{m.sender}>")
        for r in m.recipients:
            extra = f"  [{r.reply}]" if r.reply else ""
            lines.append(f"  to <{r.address}>  {r.state}{extra}")
    return "\n".join(lines) + f"\n{len(messages)} message(s)\n"


def describe_message(entry: dict[str, Any], now: float) -> dict[str, Any]:
    """An entry of L{OutboundQueue.list} as the web shows it (times in RFC 3339, UTC)."""
    return {"id": entry["id"], "sender": entry["sender"], "size": entry["size"],
            "created": iso(entry["created"]), "attempts": entry["attempts"],
            # a message already due is attempted at the next poll: "now", not the past
            "next_attempt": iso(max(entry["next_attempt"], now)),
            "held": entry["held"],
            "recipients": [{"address": r["address"], "state": r["state"], "reply": r["reply"],
                            "host": r["host"]} for r in entry["recipients"]]}


class QueueCommands:
    """
    The administrator's queue commands on the running server's
    L{OutboundQueue} (its own list, flush, hold, release and delete, so
    the change is seen at once): what the web port's C{/api/v1/queue}
    calls. Every refusal is a L{CommandError}. C{queue} is C{None}
    when relaying is off: the list is empty and the rest refuse.
    """

    def __init__(self, queue: OutboundQueue | None, clock: IReactorTime) -> None:
        self._queue = queue
        self._clock = clock

    def _running(self) -> OutboundQueue:
        if self._queue is None:
            raise CommandError("relaying is off: there is no outbound queue", not_found=True)
        return self._queue

    @staticmethod
    def _id(queue_id: Any) -> str:
        # IDs are upper-case hex (spool._valid_id); the CLI takes them in either case
        if not isinstance(queue_id, str) or not 0 < len(queue_id) <= 64 \
                or any(c not in "0123456789ABCDEF" for c in queue_id.upper()):
            raise CommandError(f"{queue_id!r} is not a queue ID", not_found=True)
        return queue_id.upper()

    def page(self, start: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """How many messages are queued, and C{limit} of them from C{start}, oldest first."""
        if self._queue is None:
            return 0, []
        now = self._clock.seconds()
        return self._queue.size()[0], [describe_message(m, now)
                                       for m in self._queue.list(start, limit)]

    def flush(self) -> int:
        """Make every message not on hold due now; returns how many that is."""
        return self._running().flush()

    def _found(self, result: Deferred, queue_id: str, missing: str) -> Deferred:
        def check(found: bool) -> str:
            if not found:
                raise CommandError(f"{queue_id}: {missing}", not_found=True)
            return queue_id
        return result.addCallback(check)

    def hold(self, queue_id: Any) -> "Deferred[str]":
        queue, queue_id = self._running(), self._id(queue_id)
        return self._found(queue.hold(queue_id), queue_id, "no such queued message")

    def release(self, queue_id: Any) -> "Deferred[str]":
        queue, queue_id = self._running(), self._id(queue_id)
        return self._found(queue.release(queue_id), queue_id, "no such queued message on hold")

    def delete(self, queue_id: Any) -> "Deferred[str]":
        queue, queue_id = self._running(), self._id(queue_id)
        return self._found(queue.delete(queue_id), queue_id, "no such queued message")
