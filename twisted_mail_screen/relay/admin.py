# -*- test-case-name: tests.test_queue -*-
"""
The queue as C{mailscreen queue list} shows it. The command works on the
queue's files (L{spool.QueueDirectory}), not through the server: holds,
releases, deletions and flushes work whether or not a server runs.
"""

from __future__ import annotations

from twisted_mail_screen.relay.spool import QueuedMessage, iso


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
