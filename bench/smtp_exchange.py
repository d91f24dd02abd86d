#!/usr/bin/env python3
"""
Where the wall time of one C{smtplib} send goes: connect, EHLO, MAIL,
RCPT, DATA (with its 250) and QUIT timed one by one, against the plugin's
test-host server and against pytest-localserver's C{smtpserver} (aiosmtpd),
in this process. C{--fresh}: a new server for each send, as a function-scoped
fixture gives (the first delivery into a new Maildir), else one server for all.

    python bench/smtp_exchange.py [--sends 200] [--fresh]

See docs/performance.md ("The pytest plugin's start-up cost", seventh round).
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MESSAGE = b"Subject: hi\r\n\r\nx\r\n"
STEPS = ("connect", "ehlo", "mail", "rcpt", "data", "quit", "total")

Times = dict[str, list[float]]


def send(host: str, port: int, times: Times) -> None:
    """One message, each step timed (a fixed EHLO name: no getfqdn in the figures)."""
    client = smtplib.SMTP(local_hostname="localhost")
    marks = [time.perf_counter()]
    client.connect(host, port)
    marks.append(time.perf_counter())
    client.ehlo()
    marks.append(time.perf_counter())
    client.mail("a@example.test")
    marks.append(time.perf_counter())
    client.rcpt("b@example.test")
    marks.append(time.perf_counter())
    code, _ = client.data(MESSAGE)
    marks.append(time.perf_counter())
    if code != 250:
        raise SystemExit(f"DATA answered {code}")
    client.quit()
    marks.append(time.perf_counter())
    for step, (a, b) in zip(STEPS, zip(marks, marks[1:])):
        times.setdefault(step, []).append(b - a)
    times.setdefault("total", []).append(marks[-1] - marks[0])


def measure(name: str, sends: int, start: Callable[[int], Any], address: Callable[[Any], tuple[str, int]],
            stop: Callable[[Any], None], fresh: bool) -> None:
    """Median of each step over C{sends} sends, after 20 unmeasured ones; CPU a send, all threads."""
    times: Times = {}
    server = None if fresh else start(0)
    cpu = time.process_time()
    for i in range(-20, sends):
        if fresh:
            server = start(i)
        send(*address(server), times if i >= 0 else {})
        if i == -1:
            times.clear()
            cpu = time.process_time()
        if fresh:
            stop(server)
    cpu = time.process_time() - cpu
    if not fresh:
        stop(server)
    steps = " ".join(f"{s} {statistics.median(times[s]) * 1000:.3f}" for s in STEPS)
    print(f"{name:<11} ms: {steps}; CPU a send{' (with start and stop)' if fresh else ''} "
          f"{cpu / sends * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--sends", type=int, default=200)
    parser.add_argument("--fresh", action="store_true", help="a new server for each send")
    args = parser.parse_args()
    from pytest_localserver.smtp import Server

    from twisted_mail_screen.pytest_plugin.server import build

    with tempfile.TemporaryDirectory() as root:
        def ours(i: int) -> Any:
            return build(os.path.join(root, str(i + 100)), {}, 5.0, lambda: ("", ""))

        def ours_stop(server: Any) -> None:
            server.wait_for("addressed:b@example.test")
            server.stop()

        measure("mailserver", args.sends, ours, lambda s: (s.host, s.smtp_port), ours_stop, args.fresh)

    def theirs(i: int) -> Any:
        server = Server("127.0.0.1")
        server.start()
        return server

    measure("smtpserver", args.sends, theirs, lambda s: (s.addr[0], s.addr[1]), lambda s: s.stop(),
            args.fresh)


if __name__ == "__main__":
    main()
