"""
A test host may relay to a smarthost (a capture sink), and only there:
its listed domains stay local, every other recipient is queued for the
sink whoever the client is; C{fail_delivery} then fails exactly the next
C{times} attempts (4xx deferred and retried on the clock, 5xx bounced).
"""

from __future__ import annotations

import smtplib

import pytest
from twisted.internet.task import Clock

from relay_sink import wait_for
from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.config.settings import parse_config
from twisted_mail_screen.pytest_plugin.mailbox import read_messages
from twisted_mail_screen.testing import in_reactor


def relaying(sink) -> dict:
    return {"domains": ["example.test"], "relay__enabled": True, "relay__starttls": "none",
            "relay__smarthost": f"tcp:host=127.0.0.1:port={sink.port}"}


def send(server, recipients: list[str], subject: str = "x") -> None:
    with smtplib.SMTP("127.0.0.1", server.port("smtp")) as s:
        s.sendmail("alice@example.test", recipients,
                   f"From: alice@example.test\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())


def test_config_allows_test_host_relay_only_with_a_smarthost(tmp_path) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"data_dir": str(tmp_path), "relay": {"enabled": True}})
    assert e.value.key == "relay.enabled" and "relays only to a relay.smarthost" in str(e.value)
    config = parse_config({"data_dir": str(tmp_path), "relay": {
        "enabled": True, "smarthost": "tcp:host=127.0.0.1:port=2500", "starttls": "none"}})
    assert config.test_host and config.relay.enabled
    assert not parse_config({"data_dir": str(tmp_path)}).relay.enabled


def test_listed_domains_stay_local_others_go_to_the_sink(start_server, sink, tmp_path) -> None:
    server = start_server(kinds=("smtp",), **relaying(sink))
    send(server, ["bob@example.test", "carol@remote.test"], "mixed")
    wait_for(lambda: sink.messages, what="the relayed copy")
    [relayed] = sink.messages
    assert relayed.sender == "alice@example.test" and relayed.recipients == ["carol@remote.test"]
    [local] = read_messages(str(tmp_path / "data" / "mail"))
    assert local.envelope_to == ["bob@example.test"]


def test_fail_delivery_4xx_defers_exactly_times_then_the_retry_delivers(start_server, sink) -> None:
    clock = Clock()
    server = start_server(kinds=("smtp",), clock=clock, relay__retry_minutes=1, **relaying(sink))
    in_reactor(server.service.faults.fail_delivery, reply="451 4.4.1 injected", times=2)
    send(server, ["carol@remote.test"], "later")
    queue = server.service.queue

    def attempts() -> int:
        listed = in_reactor(queue.list)
        return listed[0]["attempts"] if listed else -1

    wait_for(lambda: attempts() == 1, what="the first attempt")
    assert sink.messages == [] and in_reactor(server.service.faults.rules)[0].remaining == 1
    server.advance(61, step=0.5)
    wait_for(lambda: attempts() == 2, what="the second attempt")
    assert sink.messages == [] and in_reactor(server.service.faults.rules) == []
    server.advance(121, step=0.5)
    wait_for(lambda: sink.messages, what="the third attempt's delivery")
    assert sink.messages[0].recipients == ["carol@remote.test"]


def test_fail_delivery_5xx_bounces_to_the_sender(start_server, sink, tmp_path) -> None:
    server = start_server(kinds=("smtp",), **relaying(sink))
    in_reactor(server.service.faults.fail_delivery, reply="550 5.1.1 no such user (injected)")
    send(server, ["carol@remote.test"], "doomed")
    mail = str(tmp_path / "data" / "mail")
    [bounce] = wait_for(lambda: read_messages(mail, "to:alice@example.test"), what="the bounce")
    assert bounce.envelope_from == ""
    assert "no such user (injected)" in bounce.as_string()
    assert sink.messages == []
