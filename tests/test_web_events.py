"""
GET /api/v1/events: Server-Sent Events over a real socket as things happen
(a message sent with smtplib, a block caused by failed logins, an unblock
and a freeze through the control channel, queue changes), keepalives on
the injected clock, per-mailbox filtering on a site, the Origin guard, and
a slow reader dropped instead of buffered for.
"""

from __future__ import annotations

import json
import os
import smtplib
import socket

import pytest

from conftest import log_lines
from relay_sink import Sink, wait_for
from webclient import ADMIN, basic, site_with_clock

from twisted_mail_screen.relay.spool import QueueDirectory
from twisted_mail_screen.runtime import control
from twisted_mail_screen.testing import in_reactor
from twisted_mail_screen.web import events as web_events


class SSE:
    """A raw-socket SSE client: the request, then events parsed as they arrive."""

    def __init__(self, port: int, headers: dict[str, str] | None = None,
                 rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        lines = [f"GET /api/v1/events HTTP/1.0", f"Host: 127.0.0.1:{port}",
                 "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = b""
        head = self._until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in
                        (l.decode().partition(":") for l in head.split(b"\r\n")[1:])}

    def _until(self, mark: bytes) -> bytes:
        while mark not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        block, self.buf = self.buf.split(mark, 1)
        return block

    def block(self) -> bytes:
        """The next SSE block (event or comment), without its blank line."""
        return self._until(b"\n\n")

    def next_event(self, kind: str | None = None) -> tuple[str, dict]:
        """The next event (of C{kind}, when given), skipping comments and other kinds."""
        while True:
            block = self.block()
            fields = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line
                          and not line.startswith(b":"))
            if b"event" not in fields:
                continue
            got = fields[b"event"].decode()
            if kind is None or got == kind:
                return got, json.loads(fields[b"data"])

    def close(self) -> None:
        self.sock.close()


def failed_logins(port: int, count: int) -> None:
    for attempt in range(count):
        client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        try:
            client.ehlo("client.example")
            with pytest.raises(smtplib.SMTPException):
                client.login("alice@example.test", f"wrong-{attempt}")
        finally:
            client.close()


def test_stream_headers_and_a_message_sent_with_smtplib(start_server, tmp_path):
    server = start_server(kinds=("smtp", "web"))
    stream = SSE(server.port("web"))
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache"
        with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as client:
            client.sendmail("sender@example.org", ["someone@example.test"],
                            b"Subject: live\r\n\r\nhello\r\n")
        kind, data = stream.next_event("message.new")
        assert data["Mailbox"].lower() == "someone@example.test"
    finally:
        stream.close()


def test_block_from_failed_logins_unblock_and_freeze_through_the_control_channel(
        start_server, accounts, tmp_path):
    server, clock = site_with_clock(start_server, tmp_path, screening__max_auth_failures=3)
    stream = SSE(server.port("web"), ADMIN)
    try:
        failed_logins(server.port("smtp"), 3)
        kind, block = stream.next_event("screening.block")
        assert block["address"] == "127.0.0.1" and block["rule"] == "auth_failures"
        assert block["count"] == 3 and block["offence"] == 1
        assert block["expires"] > clock.seconds() and block["reason"].startswith("auth_failures: 3/3")

        data_dir = server.config.data_dir
        control.call(data_dir, "block.remove", address="127.0.0.1")
        kind, unblock = stream.next_event("screening.unblock")
        assert unblock["address"] == "127.0.0.1" and unblock["rule"] == "auth_failures"

        control.call(data_dir, "frozen.freeze", user="bob@example.test", minutes=10, reason="test")
        kind, frozen = stream.next_event("screening.freeze")
        assert frozen == {"user": "bob@example.test", "expires": clock.seconds() + 600,
                          "reason": "test"}
        control.call(data_dir, "frozen.thaw", user="bob@example.test")
        kind, thawed = stream.next_event("screening.thaw")
        assert thawed["user"] == "bob@example.test"
    finally:
        stream.close()


def test_every_decision_line_is_an_event_with_its_time(start_server, accounts, tmp_path):
    server, clock = site_with_clock(start_server, tmp_path, screening__max_auth_failures=2)
    stream = SSE(server.port("web"), ADMIN)
    try:
        failed_logins(server.port("smtp"), 2)
        # smtplib tries PLAIN then LOGIN with the same pair: the repeat is an "ignore" line
        actions = []
        while not actions or actions[-1] != "block":
            kind, decision = stream.next_event("screening.decision")
            actions.append(decision["action"])
        assert set(actions[:-1]) == {"ignore"}
        assert decision["client"] == "127.0.0.1"
        assert decision["rule"] == "auth_failures" and decision["time"] == clock.seconds()
        assert decision["count"] == "2/2" and decision["offence"] == 1
        # the refusal of the blocked client is a decision too
        with socket.create_connection(("127.0.0.1", server.port("smtp")), timeout=10) as s:
            assert s.recv(1024).startswith(b"421")
        kind, decision = stream.next_event("screening.decision")
        assert (decision["action"], decision["rule"], decision["protocol"]) == \
            ("refuse", "auth_failures", "smtp")
    finally:
        stream.close()


def test_a_block_that_lapses_is_an_unblock_on_the_clock(start_server, accounts, tmp_path):
    server, clock = site_with_clock(start_server, tmp_path)
    stream = SSE(server.port("web"), ADMIN)
    try:
        control.call(server.config.data_dir, "block.add", address="198.51.100.7", minutes=5)
        kind, block = stream.next_event("screening.block")
        assert (block["address"], block["rule"], block["count"]) == ("198.51.100.7", "manual", None)
        server.advance(5 * 60 + 2, step=1)
        kind, unblock = stream.next_event("screening.unblock")
        assert (unblock["address"], unblock["reason"]) == ("198.51.100.7", "expired")
    finally:
        stream.close()


def test_keepalive_comment_every_15_seconds_of_the_clock(start_server, tmp_path):
    server, clock = site_with_clock(start_server, tmp_path)
    stream = SSE(server.port("web"), ADMIN)
    try:
        assert stream.block().startswith(b":")  # the opening comment
        server.advance(web_events.KEEPALIVE_SECONDS)
        assert stream.block() == b": keepalive"
        server.advance(web_events.KEEPALIVE_SECONDS)
        assert stream.block() == b": keepalive"
    finally:
        stream.close()


def test_queue_events_for_a_relayed_message(start_server, accounts, tmp_path):
    attempts = []

    def policy(stage, arg, sink):
        if stage == "rcpt":
            attempts.append(arg)
            if len(attempts) == 1:
                return "451 4.3.0 try again later"
        return None

    sink = Sink(policy=policy).start()
    try:
        server, clock = site_with_clock(
            start_server, tmp_path, relay__smarthost=f"tcp:host=127.0.0.1:port={sink.port}",
            relay__starttls="none", listen__submission=["tcp:0:interface=127.0.0.1"])
        stream = SSE(server.port("web"), ADMIN)
        client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
        client.ehlo("client.example")
        client.login("alice@example.test", "alice-secret")
        client.sendmail("alice@example.test", ["far@example.org"], b"Subject: out\r\n\r\nhi\r\n")
        client.quit()
        kind, added = stream.next_event("queue.added")
        assert added["recipients"] == ["far@example.org"] and added["size"] > 0
        kind, deferred = stream.next_event("queue.deferred")
        assert deferred["id"] == added["id"] and deferred["reply"].startswith("451")
        queue = server.service.queue
        assert in_reactor(queue.hold, added["id"]) is not None
        assert stream.next_event("queue.held")[1] == {"id": added["id"]}
        in_reactor(queue.release, added["id"])
        assert stream.next_event("queue.released")[1] == {"id": added["id"]}
        # what `mailscreen queue hold ID` does (the files), seen by the next poll
        assert QueueDirectory(os.path.join(server.config.data_dir, "queue")).hold(added["id"])
        server.advance(1)
        assert stream.next_event("queue.held")[1] == {"id": added["id"]}
        in_reactor(queue.release, added["id"])
        assert stream.next_event("queue.released")[1] == {"id": added["id"]}
        in_reactor(queue.flush)
        kind, delivered = stream.next_event("queue.delivered")
        assert delivered["id"] == added["id"] and delivered["recipient"] == "far@example.org"
        stream.close()
    finally:
        sink.stop()


def test_a_foreign_origin_cannot_open_the_stream(start_server):
    server = start_server(kinds=("smtp", "web"))
    port = server.port("web")
    stream = SSE(port, {"Origin": "https://evil.example"})
    try:
        assert stream.status == 403
    finally:
        stream.close()
    own = SSE(port, {"Origin": f"http://127.0.0.1:{port}"})
    assert own.status == 200
    own.close()


def test_a_user_sees_only_their_own_mailboxs_message_events(start_server, accounts, tmp_path):
    server, clock = site_with_clock(start_server, tmp_path)
    port = server.port("web")
    bob = SSE(port, basic("bob@example.test", "bob-secret"))
    admin = SSE(port, ADMIN)
    try:
        bus = server.service.events
        for mailbox in ("alice@example.test", "Bob@example.test"):
            in_reactor(bus.publish, "message.new", ID=mailbox, Mailbox=mailbox)
        in_reactor(bus.publish, "screening.block", address="192.0.2.1", rule="manual")
        in_reactor(bus.publish, "message.deleted", IDs=["x"], Mailbox="bob@example.test")
        assert bob.next_event() == ("message.new", {"ID": "Bob@example.test",
                                                    "Mailbox": "Bob@example.test"})
        assert bob.next_event()[0] == "message.deleted"  # alice's and the block were not sent
        kinds = [admin.next_event()[0] for _ in range(4)]
        assert kinds == ["message.new", "message.new", "screening.block", "message.deleted"]
    finally:
        bob.close()
        admin.close()


def test_the_stream_unsubscribes_when_the_client_leaves(start_server):
    server = start_server(kinds=("smtp", "web"))
    bus = server.service.events
    before = in_reactor(bus.subscribers)
    stream = SSE(server.port("web"))
    stream.block()
    assert in_reactor(bus.subscribers) == before + 1
    stream.close()
    wait_for(lambda: in_reactor(bus.subscribers) == before, what="the stream to unsubscribe")


def test_a_reader_that_does_not_read_is_dropped_and_memory_stays_bounded(start_server):
    server = start_server(kinds=("smtp", "web"))
    bus = server.service.events
    before = in_reactor(bus.subscribers)
    stream = SSE(server.port("web"), rcvbuf=4096)
    stream.block()
    payload = "x" * 60_000
    total = 400  # 24 MB of events, far past MAX_BACKLOG plus the sockets' buffers
    with log_lines("event stream dropped") as dropped:
        for n in range(total):
            in_reactor(bus.publish, "queue.added", id=str(n), note=payload)
            if in_reactor(bus.subscribers) == before:
                break
    assert dropped, "the slow reader was not dropped"
    assert in_reactor(bus.subscribers) == before
    received = 0
    try:
        while True:
            chunk = stream.sock.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    except ConnectionResetError:
        pass
    stream.close()
    assert received < total * len(payload)
