"""
The server's counters are plain numbers from its start; the
C{prometheus_client} registry is made (and the library imported) on the
first scrape, which still shows every count since the start
(twisted_mail_screen/runtime/metrics.py, runtime/promrender.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = '''
import smtplib, sys, urllib.request
from twisted_mail_screen.pytest_plugin.server import build
from twisted_mail_screen.testing import in_reactor

server = build(sys.argv[1], {}, 5.0, lambda: ("", ""))
try:
    for n in range(2):
        with smtplib.SMTP(server.host, server.smtp_port) as client:
            client.sendmail("a@example.test", ["b@example.test"], f"Subject: m{n}\\r\\n\\r\\nx\\r\\n")
    server.wait_for("addressed:b@example.test", count=2)
    in_reactor(server.service.events.publish, "screening.decision", time=1.0, action="refuse",
               client="192.0.2.7", rule="connections")
    in_reactor(server.service.events.publish, "screening.block", time=1.0, rule="connections",
               address="192.0.2.7")
    print("before scrape:", "prometheus_client" in sys.modules)
    with urllib.request.urlopen(server.web_url + "/metrics") as reply:
        text = reply.read().decode()
    print("after scrape:", "prometheus_client" in sys.modules)
    wanted = ('mailscreen_connections_total{outcome="accepted",protocol="smtp"}',
              "mailscreen_messages_delivered_total", "mailscreen_delivery_latency_seconds_count",
              'mailscreen_refusals_total{rule="connections"}', 'mailscreen_blocks_total{rule="connections"}',
              "mailscreen_freezes_total", "mailscreen_active_blocks")
    for line in text.splitlines():
        if line.split(" ")[0] in wanted:
            print(line)
finally:
    server.stop()
'''


def test_counts_from_the_start_are_on_the_first_scrape_prometheus_imported_only_then(
        tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["before scrape: False", "after scrape: True"]
    assert sorted(lines[2:]) == sorted([
        'mailscreen_connections_total{outcome="accepted",protocol="smtp"} 2.0',
        'mailscreen_refusals_total{rule="connections"} 1.0',
        'mailscreen_blocks_total{rule="connections"} 1.0',
        "mailscreen_freezes_total 0.0",
        "mailscreen_messages_delivered_total 2.0",
        "mailscreen_delivery_latency_seconds_count 2.0",
        "mailscreen_active_blocks 0.0",
    ])


def test_counts_after_the_first_scrape_and_collectors_added_late_are_scraped() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from twisted.internet.task import Clock

    from twisted_mail_screen.runtime.events import EventBus
    from twisted_mail_screen.runtime.metrics import ServerMetrics

    class Extra:
        def collect(self):  # type: ignore[no-untyped-def]
            yield GaugeMetricFamily("extra_gauge", "late", value=7)

    metrics = ServerMetrics(EventBus(), Clock())
    metrics.connection("pop3", False)
    first = generate_latest(metrics.registry).decode()
    assert 'mailscreen_connections_total{outcome="refused",protocol="pop3"} 1.0' in first
    metrics.connection("pop3", False)
    metrics.delivery(100, 0.02)
    metrics.register(Extra())
    second = generate_latest(metrics.registry).decode()
    assert 'mailscreen_connections_total{outcome="refused",protocol="pop3"} 2.0' in second
    assert 'mailscreen_delivery_latency_seconds_bucket{le="0.025"} 1.0' in second
    assert 'mailscreen_delivery_latency_seconds_bucket{le="0.01"} 0.0' in second
    assert "mailscreen_messages_delivered_bytes_total 100.0" in second
    assert "extra_gauge 7.0" in second
