"""
One `delivery:` line per delivery (runtime/deliverylog.py): local
deliveries and queue acceptances from SMTP, relay outcomes per recipient,
and failures; the time comes from the injected clock.
"""

from __future__ import annotations

import re
import smtplib
import shutil

import pytest
from twisted.internet.task import Clock

from conftest import log_lines, maildir_files, queue_settled, relay_to
from relay_sink import wait_for

LINE = re.compile(r"^delivery: id=(\S+) kind=(\w+) from=<([^>]*)> to=(\S+) size=(\d+) "
                  r"result=(\w+)(.*) time=(\S+)$")


def fields(line: str) -> dict:
    m = LINE.match(line)
    assert m, line
    keys = ("id", "kind", "sender", "to", "size", "result", "extra", "time")
    return dict(zip(keys, m.groups()))


def send(port: int, sender: str, rcpts: list[str], body: bytes, login=None) -> None:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    if login:
        client.login(*login)
    client.sendmail(sender, rcpts, body)
    client.quit()


BODY = b"Subject: hi\r\n\r\nhello\r\n"


def test_a_local_delivery_is_one_line(start_server, tmp_path):
    clock = Clock()
    clock.advance(1764645300)  # 2025-12-02T03:15:00Z
    server = start_server(clock=clock)
    with log_lines("delivery:", "app@dev.test") as lines:
        send(server.port("smtp"), "app@dev.test", ["a@example.com", "b@example.com"], BODY)
    # One line for the message, not a second one from SMTP: it carries the client.
    assert len(lines) == 1, lines
    f = fields(lines[0])
    assert f["extra"] == " client=127.0.0.1", f
    stored = maildir_files(tmp_path / "data", "a@example.com")[0].name
    assert f["id"] == stored.split(",")[0] and f["kind"] == "local" and f["result"] == "stored"
    assert f["sender"] == "app@dev.test" and f["to"] == "a@example.com,b@example.com"
    assert int(f["size"]) > len(BODY) - 5 and f["time"] == "2025-12-02T03:15:00Z"


def test_queued_and_relayed_lines_share_the_queue_id(start_server, accounts, sink):
    clock = Clock()
    server = start_server(site=True, clock=clock, **relay_to(sink))
    with log_lines("delivery:") as lines:
        send(server.port("submission"), "alice@example.test", ["carol@remote.test"], BODY,
             login=("alice@example.test", "alice-secret"))
        wait_for(lambda: sink.messages, what="the relayed message")
        queue_settled(server)
        wait_for(lambda: len(lines) >= 2, what="the relay line")
    queued, relayed = (fields(l) for l in lines)
    assert queued["kind"] == "queued" and queued["result"] == "queued"
    assert relayed["kind"] == "relay" and relayed["result"] == "sent"
    assert relayed["id"] == queued["id"] and relayed["sender"] == "alice@example.test"
    assert relayed["to"] == queued["to"] == "carol@remote.test"
    # As received from the client; as queued, with our Received: header on top.
    assert len(BODY) - 2 <= int(queued["size"]) < int(relayed["size"])
    assert 'host=127.0.0.1' in relayed["extra"] and 'reply="250' in relayed["extra"]


def test_a_failed_delivery_is_logged_as_failed(start_server, tmp_path):
    server = start_server(clock=Clock())
    mailbox = tmp_path / "data" / "mail" / "example.com" / "x"
    send(server.port("smtp"), "app@dev.test", ["x@example.com"], BODY)  # makes the Maildir
    # A real disk error (we run as root: permissions would not stop us): tmp/ is a file.
    shutil.rmtree(mailbox / "tmp")
    (mailbox / "tmp").write_bytes(b"")
    with log_lines("delivery:") as lines:
        client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
        with pytest.raises(smtplib.SMTPDataError):
            client.sendmail("app@dev.test", ["x@example.com"], BODY)
        client.quit()
    assert len(lines) == 1 and fields(lines[0])["result"] == "failed", lines
