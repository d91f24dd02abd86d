"""
The benchmark's Maildir chores: count what a server stored, empty a box
between runs, wait for a queueing server (Postfix) to catch up, fill a
box for the POP3 runs.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import clients


def count_files(maildir: str) -> int:
    n = 0
    for sub in ("new", "cur"):
        try:
            n += sum(1 for e in os.scandir(os.path.join(maildir, sub)) if e.is_file())
        except FileNotFoundError:
            pass
    return n


def clear_maildir(maildir: str) -> None:
    for sub in ("new", "cur", "tmp"):
        d = os.path.join(maildir, sub)
        if os.path.isdir(d):
            for e in os.scandir(d):
                try:
                    os.unlink(e.path)
                except FileNotFoundError:
                    pass


def wait_delivered(server: Any, expected: int, timeout: float = 120.0,
                   poll: float = 0.02) -> tuple[int, float]:
    """
    Postfix answers 250 once queued; wait for its Maildir to catch up.
    Returns the files counted once its queue is empty, and the monotonic
    time the count first reached C{expected} (within C{poll}; the time
    of the timeout if it never did).
    """
    path = server.maildir(clients.RCPT)
    deadline = time.monotonic() + timeout
    reached: float | None = None
    while time.monotonic() < deadline:
        n = count_files(path)
        if n >= expected and reached is None:
            reached = time.monotonic()
        if reached is not None and (not hasattr(server, "queue_empty") or server.queue_empty()):
            return n, reached
        time.sleep(poll)
    return count_files(path), reached or time.monotonic()


def pop3_header(i: int) -> str:
    """The POP3 runs' message C{i}: one sender, one date."""
    return (f"Return-Path: <s@client.test>\nFrom: Sender <s@client.test>\nTo: <{clients.RCPT}>\n"
            f"Subject: bench {i}\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
            f"Message-ID: <{i}@client.test>\n\n")


def populate(maildir: str, count: int, size: int,
             header: Callable[[int], str] = pop3_header) -> None:
    """
    C{count} messages of about C{size} octets, C{header(i)} then a body of
    74-octet lines, with LF endings, named with S= and W= as ours and
    Dovecot do.
    """
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    start = int(time.time()) - count
    for i in range(1, count + 1):
        data = header(i).encode()
        data += (b"y" * 74 + b"\n") * max(1, (size - len(data)) // 75)
        wsize = len(data) + data.count(b"\n")
        name = f"{start + i}.M{i}P1Q{i}.bench,S={len(data)},W={wsize}:2,S"
        with open(os.path.join(maildir, "cur", name), "wb") as f:
            f.write(data)
