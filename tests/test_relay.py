"""
Relaying to a second, in-process SMTP server on loopback (tests/relay_sink.py)
playing the smarthost or the MX host: success, retries on the injected
clock, bounces, restarts, TLS to a smarthost, MX order.
"""

from __future__ import annotations

import email
import json
import shutil
import smtplib
from pathlib import Path

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.names import dns, error

from conftest import log_lines, maildir_files, queue_settled, queued
from relay_sink import BREAK, STALL, Sink, make_ca_and_leaf, server_tls, wait_for
from twisted_mail_screen.testing import in_reactor


@pytest.fixture
def sink():
    started: list[Sink] = []

    def make(**kwargs) -> Sink:
        s = Sink(**kwargs).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def relay_log():
    with log_lines("relay:", "queue:") as lines:
        yield lines


def smarthost(s: Sink, **more) -> dict:
    out = {"relay__smarthost": f"tcp:host=127.0.0.1:port={s.port}", "relay__starttls": "none"}
    out.update(more)
    return out


def submit(server, rcpts, body=b"Subject: hi\r\n\r\nhello\r\n", user="alice@example.test",
           password="alice-secret", sender=None):
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.ehlo("client.example")
    client.login(user, password)
    refused = client.sendmail(sender or user, rcpts, body)
    client.quit()
    assert refused == {}


def queue_empty(tmp_path: Path) -> bool:
    return queued(tmp_path) == []


class FakeResolver:
    """MX and A answers from dicts; C{nx} names do not exist."""

    def __init__(self, mx=None, a=None, nx=(), aaaa=None, servfail=()):
        self.mx, self.a, self.nx, self.aaaa = mx or {}, a or {}, set(nx), aaaa or {}
        self.servfail = set(servfail)
        self.asked: list[str] = []

    def lookupMailExchange(self, name):
        self.asked.append(name)
        if name in self.nx:
            return fail(error.DNSNameError(name))
        if name in self.servfail:
            return fail(error.DNSServerError(name))
        return succeed(([dns.RRHeader(name, dns.MX, payload=dns.Record_MX(p, h))
                         for p, h in self.mx.get(name, [])], [], []))

    def lookupAddress(self, name):
        return succeed(([dns.RRHeader(name, dns.A, payload=dns.Record_A(ip))
                         for ip in self.a.get(name, [])], [], []))

    def lookupIPV6Address(self, name):
        return succeed(([dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA(ip))
                         for ip in self.aaaa.get(name, [])], [], []))


def use_resolver(server, resolver) -> None:
    in_reactor(setattr, server.service.queue, "resolver", resolver)


def test_smarthost_delivery(start_server, accounts, sink, tmp_path, relay_log):
    """A submitted message for a remote domain reaches the smarthost once; the queue empties."""
    s = sink()
    server = start_server(site=True, **smarthost(s))
    submit(server, ["carol@remote.example", "dave@remote.example"],
           b"From: alice@example.test\r\nSubject: out\r\n\r\nhello\r\n")
    wait_for(lambda: s.messages, what="delivery")
    [m] = s.messages
    assert m.sender == "alice@example.test"
    assert m.recipients == ["carol@remote.example", "dave@remote.example"]
    assert b"Subject: out" in m.data and m.data.startswith(b"Received: from client.example")
    assert b"\r\nMessage-ID: <" in m.data and b"\r\nDate: " in m.data
    wait_for(lambda: queue_empty(tmp_path), what="empty queue")
    wait_for(lambda: any("status=sent" in l and "carol@remote.example" in l for l in relay_log))


def test_local_and_remote_recipients_in_one_message(start_server, accounts, sink, tmp_path):
    """Local recipients go into Maildirs, remote ones to the queue; one 250 for both."""
    s = sink()
    server = start_server(site=True, **smarthost(s))
    submit(server, ["bob@example.test", "carol@remote.example"])
    assert len(maildir_files(tmp_path / "data", "bob@example.test")) == 1
    wait_for(lambda: s.messages)
    assert s.recipients() == ["carol@remote.example"]


def test_relayed_message_is_dot_stuffed_crlf(start_server, accounts, sink, tmp_path):
    """Dot-stuffed CRLF lines: the smarthost (which unstuffs) gets every dotted line as it was sent."""
    s = sink()
    server = start_server(site=True, **smarthost(s))
    submit(server, ["carol@remote.example"], body=b"Subject: dots\r\n\r\n.one\r\ntwo\r\n..three\r\n")
    wait_for(lambda: s.messages)
    assert s.messages[0].data.endswith(b"\r\n\r\n.one\r\ntwo\r\n..three\r\n")


def test_mx_lowest_preference_first_then_next(start_server, accounts, sink, tmp_path, relay_log):
    """The lowest-preference MX is tried first; when it refuses connections, the next one."""
    s = sink()
    server = start_server(site=True, relay__mx_port=s.port)
    resolver = FakeResolver(mx={"remote.example": [(20, "mx2.remote.example"),
                                                    (10, "mx1.remote.example")]},
                            a={"mx1.remote.example": ["127.0.0.2"],  # nothing listens there
                               "mx2.remote.example": ["127.0.0.1"]})
    use_resolver(server, resolver)
    submit(server, ["carol@remote.example"])
    wait_for(lambda: s.messages)
    assert s.recipients() == ["carol@remote.example"]
    wait_for(lambda: queue_empty(tmp_path))
    tried = [l for l in relay_log if "mx1.remote.example" in l]
    assert tried and "unusable" in tried[0]
    assert any("host=mx2.remote.example[127.0.0.1]" in l and "status=sent" in l for l in relay_log)


def test_mx_falls_back_to_the_address_record(start_server, accounts, sink, tmp_path):
    """A domain without MX records is its own mail host (RFC 5321 5.1)."""
    s = sink()
    server = start_server(site=True, relay__mx_port=s.port)
    use_resolver(server, FakeResolver(a={"remote.example": ["127.0.0.1"]}))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: s.messages)
    wait_for(lambda: queue_empty(tmp_path))


ZONE = """\
$ORIGIN remote.example.
$TTL 300
@    IN SOA ns.remote.example. admin.remote.example. 1 3600 600 86400 300
@    IN MX 20 mx2.remote.example.
@    IN MX 10 mx1.remote.example.
mx1  IN A 127.0.0.2
mx2  IN A 127.0.0.1
"""


def test_mx_lookup_through_twisted_names(start_server, accounts, sink, tmp_path, relay_log):
    """
    The real twisted.names client asking a real (in-process, loopback UDP)
    DNS server: MX records in preference order, then each host's A record;
    mx1 refuses connections, so mx2 gets the message.
    """
    from twisted.names import authority, client as names_client, dns as names_dns, server as names_server
    zone = tmp_path / "remote.example.zone"
    zone.write_text(ZONE)

    def serve():
        from twisted.internet import reactor
        factory = names_server.DNSServerFactory(authorities=[authority.BindAuthority(str(zone))])
        return reactor.listenUDP(0, names_dns.DNSDatagramProtocol(factory), interface="127.0.0.1")

    udp = in_reactor(serve)
    try:
        s = sink()
        server = start_server(site=True, relay__mx_port=s.port)

        def real_resolver():
            from twisted.internet import reactor
            return names_client.Resolver(servers=[("127.0.0.1", udp.getHost().port)], reactor=reactor)

        use_resolver(server, in_reactor(real_resolver))
        submit(server, ["carol@remote.example"])
        wait_for(lambda: s.messages)
        wait_for(lambda: queue_empty(tmp_path))
        hosts = [l for l in relay_log if "mx1.remote.example" in l or "mx2.remote.example" in l]
        assert "mx1.remote.example[127.0.0.2]" in hosts[0] and "unusable" in hosts[0]
        assert "host=mx2.remote.example[127.0.0.1]" in hosts[-1] and "status=sent" in hosts[-1]
    finally:
        in_reactor(udp.stopListening)

def test_opportunistic_starttls_to_mx_without_verification(start_server, accounts, sink, tmp_path, certificate):
    """MX hosts get STARTTLS when they offer it, whatever their certificate."""
    cert, key = certificate
    s = sink(tls=server_tls(cert, key))
    server = start_server(site=True, relay__mx_port=s.port)
    use_resolver(server, FakeResolver(mx={"remote.example": [(10, "mx.remote.example")]},
                                      a={"mx.remote.example": ["127.0.0.1"]}))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: s.messages)
    assert s.messages[0].secure


def test_nonexistent_domain_bounces_at_once(start_server, accounts, tmp_path):
    """NXDOMAIN for the recipient domain is permanent: a DSN with 5.1.2, no retry."""
    server = start_server(site=True)
    use_resolver(server, FakeResolver(nx={"nowhere.example"}))
    submit(server, ["x@nowhere.example"])
    [dsn] = wait_for(lambda: maildir_files(tmp_path / "data", "alice@example.test"))
    assert b"Status: 5.1.2" in dsn.read_bytes()
    wait_for(lambda: queue_empty(tmp_path))


def test_null_mx_bounces_at_once(start_server, accounts, tmp_path):
    """A domain that publishes a null MX (RFC 7505) accepts no mail: 5.1.10 at once."""
    server = start_server(site=True)
    use_resolver(server, FakeResolver(mx={"nullmx.example": [(0, "")]}))
    submit(server, ["x@nullmx.example"])
    [dsn] = wait_for(lambda: maildir_files(tmp_path / "data", "alice@example.test"))
    assert b"Status: 5.1.10" in dsn.read_bytes()
    wait_for(lambda: queue_empty(tmp_path))


def test_dns_failure_is_temporary(start_server, accounts, tmp_path, sink):
    """SERVFAIL for the MX query defers (4.4.3); the next attempt, with DNS back, delivers."""
    s = sink()
    clock = Clock()
    server = start_server(site=True, clock=clock, relay__mx_port=s.port)
    resolver = FakeResolver(servfail={"remote.example"}, a={"remote.example": ["127.0.0.1"]})
    use_resolver(server, resolver)
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    assert "4.4.3" in queued(tmp_path)[0]["recipients"][0]["reply"]
    resolver.servfail.clear()
    server.advance(300)
    wait_for(lambda: s.messages)
    wait_for(lambda: queue_empty(tmp_path))
    assert maildir_files(tmp_path / "data", "alice@example.test") == []

def test_temporary_failure_is_retried_on_the_clock(start_server, accounts, sink, tmp_path, relay_log):
    """451 at RCPT defers the recipient; after retry_minutes on the clock it is delivered."""
    attempts = []

    def policy(stage, arg, s):
        if stage == "rcpt":
            attempts.append(arg)
            if len(attempts) == 1:
                return "451 4.3.0 try again later"
        return None

    s = sink(policy=policy)
    clock = Clock()
    server = start_server(site=True, clock=clock, **smarthost(s, relay__retry_minutes=10))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    [env] = queued(tmp_path)
    assert env["recipients"][0]["state"] == "pending"
    assert env["recipients"][0]["reply"] == "451 4.3.0 try again later"
    assert env["next_attempt"] == 600
    line = wait_for(lambda: [l for l in relay_log if "status=deferred" in l])[0]
    assert "carol@remote.example" in line and "451 4.3.0 try again later" in line
    assert "next=1970-01-01T00:10:00Z" in line
    server.advance(300)
    queue_settled(server)
    assert not s.messages and len(attempts) == 1
    server.advance(301)
    wait_for(lambda: s.messages)
    wait_for(lambda: queue_empty(tmp_path))
    assert len(attempts) == 2


def test_partly_accepted_group_retries_only_the_deferred_recipient(start_server, accounts, sink,
                                                                   tmp_path):
    """RCPT 250 for one, 451 for the other: the retry sends only the other, so each gets one copy."""
    first = {"left": 1}

    def policy(stage, arg, s):
        if stage == "rcpt" and arg == "dave@remote.example" and first["left"]:
            first["left"] -= 1
            return "451 4.2.1 mailbox temporarily unavailable"
        return None

    s = sink(policy=policy)
    clock = Clock()
    server = start_server(site=True, clock=clock, **smarthost(s))
    submit(server, ["carol@remote.example", "dave@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    assert [m.recipients for m in s.messages] == [["carol@remote.example"]]
    server.advance(300)
    wait_for(lambda: queue_empty(tmp_path))
    assert [m.recipients for m in s.messages] == [["carol@remote.example"], ["dave@remote.example"]]

def test_backoff_doubles(start_server, accounts, sink, tmp_path):
    """Each further temporary failure doubles the wait, up to max_retry_minutes."""
    s = sink(policy=lambda stage, arg, s: "451 4.3.0 busy" if stage == "rcpt" else None)
    clock = Clock()
    server = start_server(site=True, clock=clock,
                          **smarthost(s, relay__retry_minutes=5, relay__max_retry_minutes=15))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    for attempts, at in ((2, 300 + 600), (3, 900 + 900), (4, 1800 + 900)):
        now = queued(tmp_path)[0]["next_attempt"]
        server.advance(now - clock.seconds())
        wait_for(lambda: queued(tmp_path)[0]["attempts"] == attempts)
        assert queued(tmp_path)[0]["next_attempt"] == at


def test_permanent_failure_bounces_to_the_local_sender(start_server, accounts, sink, tmp_path):
    """550 from the remote: one RFC 3464 DSN in the sender's Maildir with the remote reply."""
    s = sink(policy=lambda stage, arg, s: "550 5.1.1 <%s>: no such user here" % arg
             if stage == "rcpt" and arg.startswith("nobody") else None)
    server = start_server(site=True, **smarthost(s))
    submit(server, ["nobody@remote.example", "carol@remote.example", "nobody@other.example"],
           b"From: alice@example.test\r\nSubject: original subject\r\n\r\nbody\r\n")
    wait_for(lambda: queue_empty(tmp_path))
    assert sorted(s.recipients()) == ["carol@remote.example"]
    [dsn_path] = maildir_files(tmp_path / "data", "alice@example.test")
    raw = dsn_path.read_bytes()
    assert raw.startswith(b"Return-Path: <>\n")
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["To"] == "<alice@example.test>"
    text, status, headers = msg.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    blocks = [b for b in status.get_payload()]
    assert blocks[0]["Reporting-MTA"] == "dns; mail.example.test"
    failed = {b["Final-Recipient"]: b for b in blocks[1:]}
    assert set(failed) == {"rfc822; nobody@remote.example", "rfc822; nobody@other.example"}
    one = failed["rfc822; nobody@remote.example"]
    assert one["Action"] == "failed" and one["Status"] == "5.1.1"
    assert one["Diagnostic-Code"] == "smtp; 550 5.1.1 <nobody@remote.example>: no such user here"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: original subject" in raw
    assert b"carol@remote.example" not in text.get_payload(decode=True)


def test_lifetime_expiry_bounces_and_delay_warning(start_server, accounts, sink, tmp_path, relay_log):
    """A delay warning after delay_warning_hours; a DSN with 4.4.7 once the lifetime is over."""
    s = sink(policy=lambda stage, arg, s: "451 4.2.0 mailbox busy" if stage == "rcpt" else None)
    clock = Clock()
    server = start_server(site=True, clock=clock,
                          **smarthost(s, relay__queue_lifetime_hours=3, relay__delay_warning_hours=1,
                                      relay__retry_minutes=30, relay__max_retry_minutes=60))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    assert maildir_files(tmp_path / "data", "alice@example.test") == []
    server.advance(3700)
    [warning] = wait_for(lambda: maildir_files(tmp_path / "data", "alice@example.test"))
    msg = email.message_from_bytes(warning.read_bytes())
    assert msg["Subject"].startswith("Delayed Mail")
    [_, status, _] = msg.get_payload()
    block = status.get_payload()[1]
    assert block["Action"] == "delayed" and "451 4.2.0 mailbox busy" in block["Diagnostic-Code"]
    wait_for(lambda: queued(tmp_path)[0]["warned"] is True)
    server.advance(3 * 3600)
    wait_for(lambda: queue_empty(tmp_path))
    paths = maildir_files(tmp_path / "data", "alice@example.test")
    assert len(paths) == 2
    bounce = email.message_from_bytes([p for p in paths if p != warning][0].read_bytes())
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
    block = bounce.get_payload()[1].get_payload()[1]
    assert block["Action"] == "failed" and block["Status"] == "4.4.7"
    assert "last reply: 451 4.2.0 mailbox busy" in block["Diagnostic-Code"]
    assert s.messages == []
    [line] = [l for l in relay_log if "status=bounced" in l]
    assert "4.4.7 message expired after 3 hours" in line and "next=-" in line


def test_no_bounce_for_a_bounce(start_server, accounts, sink, tmp_path, relay_log):
    """A message with the null sender that fails is dropped, not bounced."""
    s = sink(policy=lambda stage, arg, s: "550 5.1.1 unknown" if stage == "rcpt" else None)
    server = start_server(site=True, **smarthost(s))
    in_reactor(server.service.queue.enqueue, "", ("x@remote.example",), b"Subject: dsn\n\nx\n")
    wait_for(lambda: queue_empty(tmp_path))
    wait_for(lambda: any("no bounce for a bounce" in l for l in relay_log))
    assert not (tmp_path / "data" / "mail").exists() or \
        not any((tmp_path / "data" / "mail").rglob("new/*"))


def test_remote_sender_gets_a_queued_dsn(start_server, accounts, sink, tmp_path):
    """A DSN for a remote sender is queued with the null sender and relayed."""
    s = sink(policy=lambda stage, arg, s: "554 5.7.1 rejected" if stage == "rcpt"
             and arg == "victim@remote.example" else None)
    server = start_server(site=True, **smarthost(s))
    in_reactor(server.service.queue.enqueue, "someone@elsewhere.example",
               ("victim@remote.example",), b"Subject: fwd\n\nx\n")
    wait_for(lambda: s.messages)
    [dsn] = s.messages
    assert dsn.sender == "" and dsn.recipients == ["someone@elsewhere.example"]
    assert b"Status: 5.7.1" in dsn.data and b"Auto-Submitted: auto-replied" in dsn.data
    wait_for(lambda: queue_empty(tmp_path))


def test_restart_mid_queue_delivers_each_recipient_once(start_server, accounts, sink, tmp_path):
    """
    Stop the server with messages queued (one domain of a message already
    delivered, the other deferred), start a new one on the same data
    directory: every recipient gets exactly one copy.
    """
    down = {"on": True}

    def policy(stage, arg, s):
        if down["on"] and stage == "rcpt" and arg.endswith("@two.example"):
            return "421 4.3.2 shutting down"
        return None

    s = sink(policy=policy)
    clock = Clock()
    server = start_server(site=True, clock=clock, **smarthost(s))
    for i in range(3):
        submit(server, [f"a{i}@one.example", f"b{i}@two.example"],
               b"Subject: m%d\r\n\r\nx\r\n" % i)
    wait_for(lambda: len(queued(tmp_path)) == 3 and all(e["attempts"] == 1 for e in queued(tmp_path)))
    assert sorted(s.recipients()) == ["a0@one.example", "a1@one.example", "a2@one.example"]
    server.stop()
    down["on"] = False
    clock2 = Clock()
    clock2.advance(50)
    server2 = start_server(site=True, clock=clock2, **smarthost(s))
    server2.advance(600)
    wait_for(lambda: queue_empty(tmp_path), what="queue drained after restart")
    assert sorted(s.recipients()) == sorted([f"a{i}@one.example" for i in range(3)]
                                            + [f"b{i}@two.example" for i in range(3)])


def test_queue_survives_a_server_that_never_reached_the_remote(start_server, accounts, sink, tmp_path):
    """Messages accepted while the smarthost is down are delivered after a restart."""
    s = sink(policy=lambda stage, arg, s: "421 4.3.2 not now" if stage == "connect" else None)
    clock = Clock()
    server = start_server(site=True, clock=clock, **smarthost(s))
    submit(server, ["carol@remote.example"])
    submit(server, ["dave@remote.example"])
    wait_for(lambda: len(queued(tmp_path)) == 2 and all(e["attempts"] == 1 for e in queued(tmp_path)))
    server.stop()
    s.policy = lambda stage, arg, s: None
    server2 = start_server(site=True, clock=Clock(), **smarthost(s))
    server2.advance(301)
    wait_for(lambda: queue_empty(tmp_path))
    assert sorted(s.recipients()) == ["carol@remote.example", "dave@remote.example"]


def test_several_messages_per_connection_and_connection_limit(start_server, accounts, sink, tmp_path):
    """With one connection allowed, queued messages share it (up to the per-connection cap)."""
    s = sink(policy=lambda stage, arg, s: "421 4.3.2 not now" if stage == "connect" else None)
    clock = Clock()
    server = start_server(site=True, clock=clock,
                          **smarthost(s, relay__max_connections_per_destination=1,
                                      relay__max_messages_per_connection=3))
    for i in range(4):
        submit(server, [f"r{i}@remote.example"])
    wait_for(lambda: len(queued(tmp_path)) == 4 and all(e["attempts"] == 1 for e in queued(tmp_path)))
    s.policy = lambda stage, arg, s: None
    s.hold_greeting()
    before = s.connections
    queue = server.service.queue
    server.advance(301)
    wait_for(lambda: in_reactor(lambda: sum(len(d.jobs) + d.active
                                            for d in queue.pool.destinations.values())) == 4)
    s.open_gate()
    wait_for(lambda: queue_empty(tmp_path))
    assert len(s.messages) == 4
    assert s.connections - before == 2
    assert s.max_active == 1
    assert sorted(s.transactions_per_connection[-2:]) == [1, 3]


def test_mx_next_host_when_the_first_greets_with_an_error(start_server, accounts, sink, tmp_path,
                                                          relay_log):
    """An MX host that greets with 421 is left for the next one, in preference order."""
    good = sink()
    busy = sink(interface="127.0.0.2", listen_port=good.port,
                policy=lambda stage, arg, s: "421 4.3.2 too busy" if stage == "connect" else None)
    server = start_server(site=True, relay__mx_port=good.port)
    use_resolver(server, FakeResolver(mx={"remote.example": [(5, "mx1.remote.example"),
                                                             (50, "mx2.remote.example")]},
                                      a={"mx1.remote.example": ["127.0.0.2"],
                                         "mx2.remote.example": ["127.0.0.1"]}))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: good.messages)
    assert busy.connections == 1 and busy.messages == []
    assert good.recipients() == ["carol@remote.example"]
    wait_for(lambda: queue_empty(tmp_path))
    assert any("mx1.remote.example" in l and "421 4.3.2 too busy" in l for l in relay_log)


def test_mx_host_with_only_an_ipv6_address(start_server, accounts, sink, tmp_path):
    """A host's AAAA records are used when it has no A record."""
    s = sink(interface="::1")
    server = start_server(site=True, relay__mx_port=s.port)
    use_resolver(server, FakeResolver(mx={"remote.example": [(10, "mx6.remote.example")]},
                                      aaaa={"mx6.remote.example": ["::1"]}))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: s.messages)
    wait_for(lambda: queue_empty(tmp_path))


def test_a_then_aaaa_when_the_ipv4_address_fails(start_server, accounts, sink, tmp_path):
    """For one host, its A addresses are tried first, then its AAAA addresses."""
    s = sink(interface="::1")
    server = start_server(site=True, relay__mx_port=s.port)
    use_resolver(server, FakeResolver(a={"remote.example": ["127.0.0.2"]},  # nothing listens
                                      aaaa={"remote.example": ["::1"]}))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: s.messages)
    wait_for(lambda: queue_empty(tmp_path))


def test_reply_timeout_on_the_clock_defers(start_server, accounts, sink, tmp_path, relay_log):
    """A server that never greets: after command_timeout on the clock, deferred (4.4.2)."""
    stall = {"on": True}
    s = sink(policy=lambda stage, arg, s: STALL if stall["on"] and stage == "connect" else None)
    clock = Clock()
    server = start_server(site=True, clock=clock,
                          **smarthost(s, relay__command_timeout=120, relay__retry_minutes=5))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: s.stalled, what="the stalled greeting")
    server.advance(119)
    assert queued(tmp_path)[0]["attempts"] == 0
    server.advance(1)
    wait_for(lambda: queued(tmp_path)[0]["attempts"] == 1)
    [env] = queued(tmp_path)
    assert env["recipients"][0]["state"] == "pending" and "4.4.2" in env["recipients"][0]["reply"]
    assert env["next_attempt"] == 120 + 300
    wait_for(lambda: any("status=deferred" in l and "timed out" in l for l in relay_log))
    stall["on"] = False
    server.advance(300)
    wait_for(lambda: s.messages)
    wait_for(lambda: queue_empty(tmp_path))


def test_broken_tls_at_an_mx_host_is_retried_without_tls(start_server, accounts, sink, tmp_path,
                                                         certificate):
    """Opportunistic TLS to an MX host: a failed handshake defers; the retry goes in clear."""
    cert, key = certificate
    s = sink(tls=server_tls(cert, key), policy=lambda stage, arg, s: BREAK
             if stage == "starttls" else None)
    clock = Clock()
    server = start_server(site=True, clock=clock, relay__mx_port=s.port)
    use_resolver(server, FakeResolver(mx={"remote.example": [(10, "mx.remote.example")]},
                                      a={"mx.remote.example": ["127.0.0.1"]}))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    assert "4.7.5 TLS negotiation with mx.remote.example" in queued(tmp_path)[0]["recipients"][0]["reply"]
    assert s.messages == []
    server.advance(300)
    wait_for(lambda: s.messages)
    assert s.messages[0].secure is False
    wait_for(lambda: queue_empty(tmp_path))


def test_required_tls_to_an_mx_host_is_never_downgraded(start_server, accounts, sink, tmp_path,
                                                        certificate):
    """starttls = "required" without a smarthost: broken TLS is retried with TLS, never in clear."""
    cert, key = certificate
    s = sink(tls=server_tls(cert, key), policy=lambda stage, arg, s: BREAK
             if stage == "starttls" else None)
    clock = Clock()
    server = start_server(site=True, clock=clock, relay__mx_port=s.port, relay__starttls="required")
    use_resolver(server, FakeResolver(mx={"remote.example": [(10, "mx.remote.example")]},
                                      a={"mx.remote.example": ["127.0.0.1"]}))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    server.advance(300)
    wait_for(lambda: queued(tmp_path)[0]["attempts"] == 2)
    assert "4.7.5" in queued(tmp_path)[0]["recipients"][0]["reply"]
    assert s.messages == [] and s.connections == 2


@pytest.mark.parametrize("stage", ["mail", "data"])
def test_5xx_at_mail_or_end_of_data_bounces_the_whole_group(start_server, accounts, sink, tmp_path,
                                                            stage):
    """A 5xx to MAIL or to the end of DATA fails every recipient of the transaction: one DSN."""
    s = sink(policy=lambda st, arg, s: "554 5.7.1 policy says no" if st == stage else None)
    server = start_server(site=True, **smarthost(s))
    submit(server, ["carol@remote.example", "dave@remote.example"])
    wait_for(lambda: queue_empty(tmp_path))
    [dsn_path] = maildir_files(tmp_path / "data", "alice@example.test")
    msg = email.message_from_bytes(dsn_path.read_bytes())
    blocks = msg.get_payload()[1].get_payload()[1:]
    assert sorted(b["Final-Recipient"] for b in blocks) == ["rfc822; carol@remote.example",
                                                            "rfc822; dave@remote.example"]
    assert all(b["Diagnostic-Code"] == "smtp; 554 5.7.1 policy says no" and b["Status"] == "5.7.1"
               for b in blocks)
    assert s.messages == []


def test_a_group_accepted_is_on_disk_before_the_others_finish(start_server, accounts, sink, tmp_path):
    """
    One message, two domains on two MX hosts: while the second host is
    still silent, the first group is already recorded as sent in the
    envelope (what a crash would leave behind).
    """
    fast = sink()
    slow = sink(interface="127.0.0.2", listen_port=fast.port,
                policy=lambda stage, arg, s: STALL if stage == "connect" else None)
    clock = Clock()
    server = start_server(site=True, clock=clock, relay__mx_port=fast.port)
    use_resolver(server, FakeResolver(a={"one.example": ["127.0.0.1"], "two.example": ["127.0.0.2"]}))
    submit(server, ["a@one.example", "b@two.example"])
    wait_for(lambda: fast.messages and slow.stalled)
    wait_for(lambda: {r["address"]: r["state"] for r in queued(tmp_path)[0]["recipients"]}
             == {"a@one.example": "sent", "b@two.example": "pending"})
    assert queued(tmp_path)[0]["attempts"] == 0
    server.advance(300)  # the silent host times out; the attempt ends
    wait_for(lambda: queued(tmp_path)[0]["attempts"] == 1)
    assert [r["state"] for r in queued(tmp_path)[0]["recipients"]] == ["sent", "pending"]
    assert fast.recipients() == ["a@one.example"]


def test_attempts_at_once_are_bounded(start_server, accounts, sink, tmp_path):
    """
    With max_attempts = 2 and the smarthost slow to greet, only two
    messages are being tried (two connections); the others start as those
    end, and all are delivered once.
    """
    s = sink()
    s.hold_greeting()
    server = start_server(site=True, **smarthost(s, relay__max_connections_per_destination=10))
    in_reactor(setattr, server.service.queue, "max_attempts", 2)
    for i in range(5):
        submit(server, [f"r{i}@remote.example"])
    wait_for(lambda: s.connections == 2)
    assert in_reactor(lambda: len(server.service.queue._in_flight)) == 2
    s.open_gate()
    wait_for(lambda: queue_empty(tmp_path))
    assert sorted(s.recipients()) == [f"r{i}@remote.example" for i in range(5)]


# TLS to a smarthost

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_ca_and_leaf(tmp_path_factory.mktemp("pki"), ("mail.example.test",))


def tls_relay(s: Sink, pki, tmp_path, **more) -> dict:
    password = tmp_path / "relay-password"
    password.write_text("relay-secret\n")
    out = {"relay__smarthost": f"tcp:host=127.0.0.1:port={s.port}",
           "relay__starttls": "required", "relay__tls_hostname": "mail.example.test",
           "relay__ca_file": pki["ca"], "relay__username": "site@provider.example",
           "relay__password_file": str(password)}
    out.update(more)
    return out


def test_starttls_to_smarthost_verified_with_a_test_ca(start_server, accounts, sink, tmp_path, pki):
    """STARTTLS with a certificate from the configured CA succeeds; AUTH goes over TLS."""
    s = sink(tls=server_tls(pki["cert"], pki["key"]))
    server = start_server(site=True, **tls_relay(s, pki, tmp_path))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: s.messages)
    [m] = s.messages
    assert m.secure and m.auth == "\0site@provider.example\0relay-secret"
    wait_for(lambda: queue_empty(tmp_path))


def test_wrong_hostname_is_deferred_never_downgraded(start_server, accounts, sink, tmp_path, pki, relay_log):
    """A certificate for another name: the message stays queued, logged, nothing sent in clear."""
    s = sink(tls=server_tls(pki["cert"], pki["key"]))
    server = start_server(site=True, **tls_relay(s, pki, tmp_path,
                                                 relay__tls_hostname="smtp.provider.example"))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    [env] = queued(tmp_path)
    assert env["recipients"][0]["state"] == "pending"
    assert env["recipients"][0]["reply"].startswith("451 4.7.5 TLS negotiation with 127.0.0.1")
    assert s.messages == []
    wait_for(lambda: any("status=deferred" in l and "4.7.5" in l for l in relay_log))


def test_untrusted_certificate_is_deferred(start_server, accounts, sink, tmp_path, pki, certificate):
    """A certificate not from the configured CA (self-signed) fails verification: deferred."""
    cert, key = certificate
    s = sink(tls=server_tls(cert, key))
    server = start_server(site=True, **tls_relay(s, pki, tmp_path))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    assert "4.7.5" in queued(tmp_path)[0]["recipients"][0]["reply"]
    assert s.messages == []


def test_starttls_required_but_not_offered_is_deferred(start_server, accounts, sink, tmp_path, pki):
    """A smarthost that does not offer STARTTLS gets nothing when TLS is required."""
    s = sink(tls=server_tls(pki["cert"], pki["key"]), offer_starttls=False)
    server = start_server(site=True, **tls_relay(s, pki, tmp_path))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    assert "4.7.4" in queued(tmp_path)[0]["recipients"][0]["reply"]
    assert s.messages == [] and all(m.auth is None for m in s.messages)


def test_implicit_tls_smarthost(start_server, accounts, sink, tmp_path, pki):
    """A tls: smarthost endpoint (RFC 8314 port 465 style) is verified against the CA."""
    s = sink(implicit_tls=server_tls(pki["cert"], pki["key"]))
    server = start_server(site=True, **tls_relay(
        s, pki, tmp_path, relay__smarthost=f"tls:host=127.0.0.1:port={s.port}"))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: s.messages)
    assert s.messages[0].secure and s.messages[0].auth is not None


# kill -9 mid-queue: a real server process, killed while transactions are open

SERVER_PROCESS = r"""
import json, sys
from twisted.internet import reactor
from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.runtime.service import build_service
svc = build_service(load_config(None, json.loads(sys.argv[1])), reactor)
svc.privilegedStartService()
svc.startService()
reactor.callLater(0.2, lambda: print(json.dumps({"submission": svc.ports("submission")[0]}),
                                     flush=True))
reactor.run()
"""


def start_process(tmp_path: Path, s: Sink):
    import os
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parent.parent)
    table = {"mode": "site", "hostname": "mail.example.test", "domains": ["example.test"],
             "data_dir": str(tmp_path / "data"), "listen.smtp": [], "listen.pop3": [],
             "listen.imap": [], "listen.web": [], "listen.submission": ["tcp:0:interface=127.0.0.1"],
             "relay.smarthost": f"tcp:host=127.0.0.1:port={s.port}", "relay.starttls": "none"}
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", SERVER_PROCESS, json.dumps(table)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    assert line, f"server did not start: {proc.stderr.read()[-2000:]}"
    return proc, json.loads(line)["submission"]


class _Port:
    def __init__(self, port):
        self._port = port

    def port(self, kind):
        return self._port


def test_kill_9_mid_queue_delivers_each_recipient_exactly_once(accounts, sink, tmp_path, capsys):
    """
    Three messages, each for one.example and two.example. The smarthost
    accepts one.example and never answers RCPT for two.example; the server
    process is killed (SIGKILL) with those transactions open. The accepted
    group is on disk as sent before the kill, so after a restart only the
    two.example recipients are sent: each recipient exactly once.
    """
    import signal
    from twisted_mail_screen.admin import cli
    stall = {"on": True}
    s = sink(policy=lambda stage, arg, s: STALL if stall["on"] and stage == "rcpt"
             and arg.endswith("@two.example") else None)
    proc, port = start_process(tmp_path, s)
    try:
        for i in range(3):
            submit(_Port(port), [f"a{i}@one.example", f"b{i}@two.example"],
                   b"Subject: m%d\r\n\r\nx\r\n" % i)
        wait_for(lambda: sorted(s.recipients()) == [f"a{i}@one.example" for i in range(3)]
                 and len(s.stalled) == 3, what="one.example delivered, two.example stalled")

        def sent_on_disk() -> bool:
            envs = queued(tmp_path)
            return len(envs) == 3 and all(
                {r["address"].split("@")[1]: r["state"] for r in e["recipients"]}
                == {"one.example": "sent", "two.example": "pending"} for e in envs)

        wait_for(sent_on_disk, what="the delivered group recorded as sent before the kill")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    assert cli.main(["--data-dir", str(tmp_path / "data"), "queue", "list"]) == 0
    listing = capsys.readouterr().out
    assert "3 message(s)" in listing and listing.count("pending") == 3
    stall["on"] = False
    proc, port = start_process(tmp_path, s)
    try:
        wait_for(lambda: queue_empty(tmp_path), what="queue drained after the restart")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    assert sorted(s.recipients()) == sorted([f"a{i}@one.example" for i in range(3)]
                                            + [f"b{i}@two.example" for i in range(3)])


def test_auth_login_when_plain_is_not_offered(start_server, accounts, sink, tmp_path, pki):
    """A smarthost offering only AUTH LOGIN gets the password_file's password that way."""
    s = sink(tls=server_tls(pki["cert"], pki["key"]), auth_mechanisms="LOGIN")
    server = start_server(site=True, **tls_relay(s, pki, tmp_path))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: s.messages)
    assert s.messages[0].auth == "LOGIN site@provider.example:relay-secret"


def test_rejected_relay_credentials_defer_never_bounce(start_server, accounts, sink, tmp_path, pki):
    """535 to our AUTH is the administrator's problem: the message stays queued (4.7.8)."""
    s = sink(tls=server_tls(pki["cert"], pki["key"]),
             policy=lambda stage, arg, s: "535 5.7.8 bad credentials" if stage == "auth" else None)
    server = start_server(site=True, clock=Clock(), **tls_relay(s, pki, tmp_path))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    [r] = queued(tmp_path)[0]["recipients"]
    assert r["state"] == "pending" and r["reply"].startswith("451 4.7.8 relay authentication failed")
    assert s.messages == [] and maildir_files(tmp_path / "data", "alice@example.test") == []


def test_system_trust_store_when_no_ca_file(start_server, accounts, sink, tmp_path, pki):
    """Without ca_file the system trust store decides: a private CA's certificate is deferred."""
    s = sink(tls=server_tls(pki["cert"], pki["key"]))
    keys = tls_relay(s, pki, tmp_path)
    del keys["relay__ca_file"]
    server = start_server(site=True, clock=Clock(), **keys)
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    assert "4.7.5" in queued(tmp_path)[0]["recipients"][0]["reply"]
    assert s.messages == []


def test_implicit_tls_smarthost_with_the_wrong_name_is_deferred(start_server, accounts, sink,
                                                                tmp_path, pki):
    """tls: smarthost whose certificate names another host: 4.7.5, nothing sent, no AUTH."""
    s = sink(implicit_tls=server_tls(pki["cert"], pki["key"]))
    server = start_server(site=True, clock=Clock(), **tls_relay(
        s, pki, tmp_path, relay__smarthost=f"tls:host=127.0.0.1:port={s.port}",
        relay__tls_hostname="smtp.provider.example"))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    assert queued(tmp_path)[0]["recipients"][0]["reply"].startswith(
        "451 4.7.5 TLS negotiation with 127.0.0.1")
    assert s.messages == []


def test_no_delay_warning_when_switched_off(start_server, accounts, sink, tmp_path):
    """delay_warning_hours = 0: the sender hears only the final bounce."""
    s = sink(policy=lambda stage, arg, s: "451 4.2.0 mailbox busy" if stage == "rcpt" else None)
    clock = Clock()
    server = start_server(site=True, clock=clock,
                          **smarthost(s, relay__queue_lifetime_hours=2, relay__delay_warning_hours=0,
                                      relay__retry_minutes=30, relay__max_retry_minutes=30))
    submit(server, ["carol@remote.example"])
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    for _ in range(5):
        server.advance(1800)
    wait_for(lambda: queue_empty(tmp_path))
    [bounce] = maildir_files(tmp_path / "data", "alice@example.test")
    assert b"Undelivered Mail Returned to Sender" in bounce.read_bytes()


def test_opportunistic_smarthost_tls_failure_is_never_downgraded(start_server, accounts, sink,
                                                                 tmp_path, pki):
    """Even with starttls = "opportunistic", a smarthost whose certificate fails is retried with TLS."""
    s = sink(tls=server_tls(pki["cert"], pki["key"]))
    keys = tls_relay(s, pki, tmp_path, relay__starttls="opportunistic",
                     relay__tls_hostname="smtp.provider.example")
    server = start_server(site=True, clock=Clock(), **keys)
    submit(server, ["carol@remote.example"])
    for attempts in (1, 2, 3):
        wait_for(lambda: queued(tmp_path)[0]["attempts"] == attempts)
        assert "4.7.5" in queued(tmp_path)[0]["recipients"][0]["reply"]
        server.advance(3600)
    queue_settled(server)  # the fourth attempt, started by the last advance, has ended
    assert s.messages == [] and queued(tmp_path)[0]["attempts"] == 4


def test_alias_forwards_to_a_remote_address_from_any_client(start_server, accounts, sink):
    """
    A local alias with a remote target is forwarding, not relaying: an
    unauthenticated client on port 25 may write to it, and the remote
    target gets the message through the queue.
    """
    accounts.set_alias("sales@example.test", ["bob@example.test", "carol@remote.example"])
    s = sink()
    server = start_server(site=True, **smarthost(s))
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    assert client.sendmail("someone@outside.example", ["sales@example.test"],
                           b"Subject: hi\r\n\r\nhello\r\n") == {}
    # the relay itself is still closed to that client
    assert client.mail("x@outside.example")[0] == 250
    code, reply = client.rcpt("carol@remote.example")
    assert code == 554 and b"5.7.1" in reply
    client.quit()
    wait_for(lambda: s.messages)
    assert s.recipients() == ["carol@remote.example"]


def test_alias_to_a_remote_address_is_refused_without_a_relay(start_server, accounts):
    accounts.set_alias("sales@example.test", ["carol@remote.example"])
    server = start_server(site=True, relay__enabled=False)
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    client.ehlo("client.example")
    client.mail("someone@outside.example")
    code, reply = client.rcpt("sales@example.test")
    assert code == 554 and b"relaying is not enabled" in reply
    client.quit()


def test_bounce_to_a_local_and_remote_sender_is_stored_all_or_nothing(start_server, accounts, sink,
                                                                      tmp_path, relay_log):
    """
    A bounce whose sender is an alias for a local mailbox and a remote
    address reaches both, once; when the queue cannot take the remote
    copy, the local copy is not kept either.
    """
    accounts.set_alias("sales@example.test", ["bob@example.test", "carol@remote.example"])

    def policy(stage, arg, s):
        if stage == "rcpt" and arg.startswith("nobody"):
            return "550 5.1.1 no such user"
        if stage == "rcpt" and arg.startswith("later"):
            return "451 4.3.0 busy"
        return None

    s = sink(policy=policy)
    server = start_server(site=True, clock=Clock(), **smarthost(s))
    data = tmp_path / "data"
    in_reactor(server.service.queue.enqueue, "sales@example.test", ("nobody@remote.example",),
               b"Subject: first\n\nx\n")
    [dsn] = wait_for(lambda: s.messages, what="the DSN to the remote target")
    assert dsn.sender == "" and dsn.recipients == ["carol@remote.example"]
    [local] = maildir_files(data, "bob@example.test")
    assert local.read_bytes().startswith(b"Return-Path: <>\n")
    queue_settled(server)

    s.hold_greeting()
    in_reactor(server.service.queue.enqueue, "sales@example.test",
               ("nobody2@remote.example", "later@remote.example"), b"Subject: second\n\nx\n")
    wait_for(lambda: len(queued(tmp_path)) == 1)
    msg_dir = data / "queue" / "msg"  # the queue can store no new message
    shutil.rmtree(msg_dir)
    msg_dir.write_text("not a directory")
    try:
        s.open_gate()
        wait_for(lambda: any("bounce to <sales@example.test> not sent" in l for l in relay_log))
        queue_settled(server)
        assert maildir_files(data, "bob@example.test") == [local]
        assert list((data / "mail" / "example.test" / "bob" / "tmp").iterdir()) == []
        assert len(queued(tmp_path)) == 1 and len(s.messages) == 1
    finally:
        msg_dir.unlink()
        msg_dir.mkdir()
