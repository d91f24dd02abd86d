"""
mailserver.wait_for wakes on the server's delivery events: a message
that arrives while it waits is returned within milliseconds, not at the
next fallback look (every 250 ms).
"""

from __future__ import annotations

import smtplib
import threading
import time

from twisted_mail_screen.pytest_plugin.server import POLL, build


def test_wait_for_wakes_on_the_delivery(tmp_path) -> None:
    server = build(str(tmp_path / "ms"), {}, 5.0, lambda: ("", ""))
    try:
        def send() -> None:
            with smtplib.SMTP(server.host, server.smtp_port) as s:
                s.sendmail("a@example.test", ["b@example.test"], b"Subject: late\r\n\r\nx\r\n")

        sender = threading.Timer(0.05, send)
        started = time.monotonic()
        sender.start()
        [mail] = server.wait_for("subject:late")
        elapsed = time.monotonic() - started
        sender.join()
        assert mail["Subject"] == "late"
        assert elapsed < POLL * 0.8, f"woke after {elapsed * 1000:.0f} ms: not on the event"
    finally:
        server.stop()
