"""
GET /metrics (the Prometheus text format of the server's own registry)
and GET /api/v1/stats (connections, refusals and blocks per minute over
the last hour), after real traffic over real sockets; time on a Clock
where minutes matter.
"""

from __future__ import annotations

import base64
import smtplib
import socket

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from relay_sink import Sink, wait_for
from webclient import ADMIN, basic, call, site_with_clock as site

from twisted_mail_screen.runtime import control
from twisted_mail_screen.runtime.metrics import MinuteCounts


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    reply = call(server.port("web"), "GET", "/metrics", headers=ADMIN)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(1024)


def failed_login(port: int, password: str = "wrong") -> None:
    """
    One AUTH PLAIN with a wrong password (smtplib's login() would try two
    mechanisms): 535, or 421 when it blocked the client.
    """
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    try:
        client.ehlo("client.example")
        response = base64.b64encode(f"\0alice@example.test\0{password}".encode()).decode()
        try:
            code, _ = client.docmd("AUTH", "PLAIN " + response)
        except smtplib.SMTPResponseException as e:
            code = e.smtp_code
        assert code in (535, 421)
    finally:
        client.close()


def test_counters_move_after_real_traffic(start_server, accounts, tmp_path):
    server, clock = site(start_server, tmp_path)
    port = server.port("smtp")
    before = scrape(server)
    assert value(before, "mailscreen_connections_total", protocol="smtp", outcome="accepted") == 0

    # a delivery
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("someone@example.org", ["alice@example.test"],
                        b"Subject: counted\r\n\r\n" + (b"x" * 70 + b"\r\n") * 20)
    # an authentication failure
    failed_login(port)
    # a block, then a refused connection
    control.call(server.config.data_dir, "block.add", address="127.0.0.1", minutes=10)
    assert greeting(port).startswith(b"421")

    after = scrape(server)
    assert value(after, "mailscreen_connections_total", protocol="smtp", outcome="accepted") == 2
    assert value(after, "mailscreen_connections_total", protocol="smtp", outcome="refused") == 1
    assert value(after, "mailscreen_auth_failures_total", protocol="smtp") == 1
    assert value(after, "mailscreen_refusals_total", rule="manual") == 1
    assert value(after, "mailscreen_blocks_total", rule="manual") == 1
    assert value(after, "mailscreen_active_blocks") == 1
    assert value(after, "mailscreen_messages_delivered_total") == 1
    assert value(after, "mailscreen_messages_delivered_bytes_total") > 1000
    assert value(after, "mailscreen_delivery_latency_seconds_count") == 1
    assert value(after, "mailscreen_delivery_latency_seconds_bucket", le="+Inf") == 1
    for name in ("mailscreen_reactor_lag_seconds", "mailscreen_queue_messages",
                 "mailscreen_queue_oldest_age_seconds", "mailscreen_frozen_accounts",
                 "mailscreen_notifier_mails_total", "mailscreen_freezes_total"):
        assert (name, ()) in after, name


def test_auth_failures_are_counted_where_screening_does_not_count(start_server, accounts,
                                                                   tmp_path):
    """A white-listed client's failed login is not screened, but it is still a metric."""
    server, clock = site(start_server, tmp_path, screening__whitelist=["127.0.0.1"])
    failed_login(server.port("smtp"))
    assert value(scrape(server), "mailscreen_auth_failures_total", protocol="smtp") == 1


def test_blocks_freezes_and_notices_from_the_screening_service(start_server, accounts, tmp_path):
    server, clock = site(start_server, tmp_path, screening__max_auth_failures=2)
    port = server.port("smtp")
    failed_login(port, "wrong-1")
    failed_login(port, "wrong-2")
    control.call(server.config.data_dir, "frozen.freeze", user="bob@example.test", minutes=5)
    samples = scrape(server)
    assert value(samples, "mailscreen_blocks_total", rule="auth_failures") == 1
    assert value(samples, "mailscreen_active_blocks") == 1
    assert value(samples, "mailscreen_freezes_total") == 1
    assert value(samples, "mailscreen_frozen_accounts") == 1
    wait_for(lambda: value(scrape(server), "mailscreen_notifier_mails_total") >= 1,
             what="the block notice to count")


def test_queue_size_and_oldest_age_are_read_at_scrape(start_server, accounts, tmp_path):
    sink = Sink(policy=lambda stage, arg, s: "451 4.3.0 later" if stage == "rcpt" else None).start()
    try:
        server, clock = site(start_server, tmp_path,
                             relay__smarthost=f"tcp:host=127.0.0.1:port={sink.port}",
                             relay__starttls="none",
                             listen__submission=["tcp:0:interface=127.0.0.1"])
        client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
        client.ehlo("client.example")
        client.login("alice@example.test", "alice-secret")
        client.sendmail("alice@example.test", ["far@example.org"], b"Subject: q\r\n\r\nhi\r\n")
        client.quit()
        wait_for(lambda: value(scrape(server), "mailscreen_outbound_attempts_total",
                               result="deferred") == 1, what="a deferred attempt")
        server.advance(42)
        samples = scrape(server)
        assert value(samples, "mailscreen_queue_messages") == 1
        assert value(samples, "mailscreen_queue_oldest_age_seconds") == 42
    finally:
        sink.stop()


def test_metrics_and_stats_are_for_administrators(start_server, accounts, tmp_path):
    server, clock = site(start_server, tmp_path)
    port = server.port("web")
    for path in ("/metrics", "/api/v1/stats"):
        assert call(port, "GET", path, headers=basic("bob@example.test", "bob-secret")).status == 403
        assert call(port, "GET", path, headers=basic("alice@example.test", "alice-secret")).status == 200
        assert call(port, "GET", path).status == 401


def test_stats_per_minute_over_the_last_hour(start_server, accounts, tmp_path):
    server, clock = site(start_server, tmp_path)
    port = server.port("smtp")
    greeting(port)
    control.call(server.config.data_dir, "block.add", address="127.0.0.1", minutes=120)
    greeting(port)  # refused
    server.advance(60)
    greeting(port)  # refused, a minute later
    reply = call(server.port("web"), "GET", "/api/v1/stats", headers=ADMIN)
    assert reply.status == 200
    stats = reply.json
    assert stats["minute"] == clock.seconds() // 60 * 60
    series = stats["series"]
    assert set(series) == {"connections", "refusals", "blocks"}
    assert all(len(counts) == 60 for counts in series.values())
    assert series["connections"][-2:] == [2, 1]
    assert series["refusals"][-2:] == [1, 1]
    assert series["blocks"][-2:] == [1, 0]
    assert sum(series["connections"]) == 3
    server.advance(59 * 60)
    series = call(server.port("web"), "GET", "/api/v1/stats", headers=ADMIN).json["series"]
    assert series["connections"][0] == 1 and sum(series["connections"]) == 1
    server.advance(60)
    series = call(server.port("web"), "GET", "/api/v1/stats", headers=ADMIN).json["series"]
    assert sum(series["connections"]) == 0


def test_minute_counts_ring():
    clock = Clock()
    clock.advance(600)  # minute 10
    counts = MinuteCounts(clock, ("a",), size=3)
    counts.add("a")
    clock.advance(59)
    counts.add("a", 2)
    assert counts.snapshot() == {"minute": 600, "series": {"a": [0, 0, 3]}}
    clock.advance(1)  # minute 11
    counts.add("a")
    assert counts.snapshot()["series"]["a"] == [0, 3, 1]
    clock.advance(120)  # minute 13: minute 12 was quiet, 10 fell off
    assert counts.snapshot() == {"minute": 780, "series": {"a": [1, 0, 0]}}
    clock.advance(600)
    assert counts.snapshot()["series"]["a"] == [0, 0, 0]
