"""
The outbound queue's files, its configuration, the `mailscreen queue`
command against a running server, and the pieces (DSN, DATA encoding).
"""

from __future__ import annotations

import email
import os
import smtplib
import time

import pytest
from twisted.internet.task import Clock

from conftest import log_lines, queue_settled, queued
from relay_sink import Sink, wait_for
from twisted_mail_screen.admin import cli
from twisted_mail_screen.config.settings import parse_config
from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.relay.dsn import Failed, build_dsn
from twisted_mail_screen.relay.spool import QueueDirectory, QueuedMessage, Recipient
from twisted_mail_screen.relay.config import RelayConfig, split_endpoint
from twisted_mail_screen.relay.client import Reply, to_wire

SITE = {"mode": "site", "hostname": "mail.example.test", "domains": ["example.test"]}


# configuration

def relay(tmp_path, **keys) -> RelayConfig:
    table = dict(SITE, data_dir=str(tmp_path), relay=keys)
    return parse_config(table).relay


def test_relay_defaults_in_site_mode(tmp_path):
    """Site mode relays by MX with opportunistic STARTTLS, 5-day lifetime, 4-hour warning."""
    r = relay(tmp_path)
    assert (r.enabled, r.smarthost, r.starttls, r.queue_lifetime_hours, r.delay_warning_hours,
            r.retry_minutes, r.mx_port) == (True, None, "opportunistic", 120, 4, 5, 25)


def test_smarthost_defaults_to_required_starttls_and_its_host_name(tmp_path):
    r = relay(tmp_path, smarthost="tcp:host=smtp.provider.example:port=587")
    assert (r.starttls, r.tls_hostname, r.implicit_tls) == ("required", "smtp.provider.example", False)
    r = relay(tmp_path, smarthost="tls:smtp.provider.example:465")
    assert (r.tls_hostname, r.implicit_tls) == ("smtp.provider.example", True)


@pytest.mark.parametrize("keys, key", [
    ({"smarthost": "udp:host=x:port=25"}, "relay.smarthost"),
    ({"smarthost": "tcp:port=25"}, "relay.smarthost"),
    ({"starttls": "sometimes"}, "relay.starttls"),
    ({"username": "u"}, "relay.username"),
    ({"smarthost": "tcp:h:25", "username": "u"}, "relay.password_file"),
    ({"password_file": "/nonexistent"}, "relay.password_file"),
    ({"ca_file": "/nonexistent"}, "relay.ca_file"),
    ({"queue_lifetime_hours": 0}, "relay.queue_lifetime_hours"),
    ({"retry_minutes": 30, "max_retry_minutes": 10}, "relay.max_retry_minutes"),
    ({"bogus": 1}, "relay.bogus"),
])
def test_relay_config_errors(tmp_path, keys, key):
    with pytest.raises(ConfigError) as e:
        relay(tmp_path, **keys)
    assert e.value.key == key


def test_password_needs_tls(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("x\n")
    with pytest.raises(ConfigError) as e:
        relay(tmp_path, smarthost="tcp:h:587", starttls="none", username="u", password_file=str(secret))
    assert e.value.key == "relay.starttls"


def test_password_file_must_hold_a_password(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("\nsecond line\n")
    with pytest.raises(ConfigError) as e:
        relay(tmp_path, smarthost="tcp:h:587", username="u", password_file=str(secret))
    assert e.value.key == "relay.password_file"
    secret.write_text("s3cret\r\n")
    assert relay(tmp_path, smarthost="tcp:h:587", username="u",
                 password_file=str(secret)).password_file == str(secret)


def test_ca_file_must_hold_certificates(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as e:
        relay(tmp_path, ca_file=str(bad))
    assert e.value.key == "relay.ca_file"


def test_split_endpoint_honours_escapes():
    assert split_endpoint(r"tcp:host=a\:b:port=25") == (["tcp"], {"host": "a:b", "port": "25"})


# pieces

def test_to_wire_crlf_and_dot_stuffing():
    assert to_wire(b"A: b\n\n.line\n..two\nend") == b"A: b\r\n\r\n..line\r\n...two\r\nend\r\n.\r\n"


def test_reply_status():
    assert Reply(550, "5.1.1 no").status == "5.1.1"
    assert Reply(550, "no such user").status == "5.0.0"
    assert Reply(451, "2.0.0 confused").status == "4.0.0"


def test_dsn_is_rfc3464():
    raw = build_dsn(hostname="mail.example.test", queue_id="ABC", sender="a@example.test",
                    recipients=[Failed("x@r.example", "5.1.1", "550 5.1.1 gone", "mx.r.example")],
                    message=b"Subject: hi\nFrom: a@example.test\n\nbody\n", arrival=0, now=60)
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    human, status, headers = msg.get_payload()
    assert b"host mx.r.example said: 550 5.1.1 gone" in human.get_payload(decode=True)
    per = status.get_payload()[1]
    assert per["Remote-MTA"] == "dns; mx.r.example" and per["Status"] == "5.1.1"
    assert headers.get_payload().strip() == "Subject: hi\nFrom: a@example.test"
    assert b"body" not in raw


def test_directory_round_trip_and_markers(tmp_path):
    q = QueueDirectory(str(tmp_path / "queue"))
    m = QueuedMessage("0000000AB12", "a@example.test", 1.0, 1.0, 5, recipients=[Recipient("x@r.example")])
    q.store(m, b"hello")
    assert q.ids() == {"0000000AB12"}
    assert q.read_message(m.id) == b"hello"
    assert q.read_envelope(m.id) == m
    assert q.hold(m.id) and q.held() == {m.id}
    assert not q.hold("0000000FFFF")
    assert q.release(m.id) and q.held() == set()
    q.request_flush()
    assert q.scan() == (True, set(), {m.id})
    assert q.scan()[0] is False
    assert not q.delete("../../etc")
    assert q.delete(m.id) and q.ids() == set() and not os.listdir(q.msg_dir)


def test_uncommitted_message_files_are_removed_when_old(tmp_path):
    q = QueueDirectory(str(tmp_path / "queue"))
    q.create()
    (tmp_path / "queue" / "msg" / "DEAD").write_bytes(b"x")
    assert q.remove_orphans(0) == []
    assert q.remove_orphans(10 ** 10) == ["DEAD"]


# against a running server

@pytest.fixture
def busy_sink():
    """A smarthost that answers 451 to every recipient until told otherwise."""
    s = Sink(policy=lambda stage, arg, s: "451 4.3.0 busy" if stage == "rcpt" else None).start()
    yield s
    s.stop()


def start_relaying(start_server, s, clock):
    return start_server(site=True, clock=clock, relay__smarthost=f"tcp:host=127.0.0.1:port={s.port}",
                        relay__starttls="none")


def send(server, rcpt="carol@remote.example"):
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.ehlo("c")
    client.login("alice@example.test", "alice-secret")
    assert client.sendmail("alice@example.test", [rcpt], b"Subject: q\r\n\r\nx\r\n") == {}
    client.quit()


def mailscreen(tmp_path, *args, capsys=None) -> tuple[int, str]:
    code = cli.main(["--data-dir", str(tmp_path / "data"), "queue", *args])
    out = capsys.readouterr().out if capsys is not None else ""
    return code, out


def test_committed_before_250(start_server, accounts, busy_sink, tmp_path):
    """When the client has its 250, the message and envelope are on disk."""
    server = start_relaying(start_server, busy_sink, Clock())
    send(server)
    [env] = queued(tmp_path)
    assert env["sender"] == "alice@example.test"
    assert (tmp_path / "data" / "queue" / "msg" / env["id"]).read_bytes().endswith(b"Subject: q\n\nx\n")


def test_cli_list_hold_release(start_server, accounts, busy_sink, tmp_path, capsys):
    """A held message is not retried until released; list shows it (held)."""
    clock = Clock()
    server = start_relaying(start_server, busy_sink, clock)
    send(server)
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    queue_id = queued(tmp_path)[0]["id"]
    assert mailscreen(tmp_path, "hold", queue_id.lower(), capsys=capsys) == (0, f"on hold: {queue_id}\n")
    code, out = mailscreen(tmp_path, "list", capsys=capsys)
    assert code == 0 and f"{queue_id} (held)" in out and "to <carol@remote.example>  pending  [451 4.3.0 busy]" in out
    server.advance(1)
    wait_for(lambda: queue_id in server.service.queue._held)
    assert server.service.queue.list()[0]["held"] is True
    busy_sink.policy = lambda stage, arg, s: None
    server.advance(600)
    server.advance(1)
    queue_settled(server)
    assert busy_sink.messages == [] and queued(tmp_path)[0]["attempts"] == 1
    assert mailscreen(tmp_path, "release", queue_id, capsys=capsys)[0] == 0
    server.advance(1)
    wait_for(lambda: busy_sink.messages)
    wait_for(lambda: queued(tmp_path) == [])
    assert mailscreen(tmp_path, "list", capsys=capsys) == (0, "queue is empty\n")


def test_cli_flush_retries_at_once(start_server, accounts, busy_sink, tmp_path, capsys):
    """`queue flush` makes the running server retry within a second of its clock."""
    clock = Clock()
    server = start_relaying(start_server, busy_sink, clock)
    send(server)
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    busy_sink.policy = lambda stage, arg, s: None
    server.advance(1)
    queue_settled(server)
    assert busy_sink.messages == []
    assert mailscreen(tmp_path, "flush", capsys=capsys)[0] == 0
    server.advance(1)
    wait_for(lambda: busy_sink.messages)
    wait_for(lambda: queued(tmp_path) == [])


def test_cli_delete(start_server, accounts, busy_sink, tmp_path, capsys):
    """`queue delete ID` removes the message; the server forgets it at its next scan."""
    clock = Clock()
    server = start_relaying(start_server, busy_sink, clock)
    send(server)
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    queue_id = queued(tmp_path)[0]["id"]
    assert mailscreen(tmp_path, "delete", queue_id, capsys=capsys) == (0, f"deleted: {queue_id}\n")
    assert mailscreen(tmp_path, "delete", queue_id, capsys=capsys)[0] == 1
    server.advance(1)
    wait_for(lambda: server.service.queue.list() == [])
    busy_sink.policy = lambda stage, arg, s: None
    server.advance(3600)
    queue_settled(server)
    assert busy_sink.messages == []


def test_service_methods(start_server, accounts, busy_sink, tmp_path):
    """list/hold/release/flush/delete as methods of the running queue."""
    from twisted_mail_screen.testing import in_reactor
    clock = Clock()
    server = start_relaying(start_server, busy_sink, clock)
    queue = server.service.queue
    send(server)
    send(server, "dave@remote.example")
    wait_for(lambda: len(queued(tmp_path)) == 2 and all(e["attempts"] == 1 for e in queued(tmp_path)))
    first, second = [e["id"] for e in in_reactor(queue.list)]
    assert in_reactor(queue.hold, first) is True
    assert os.path.exists(tmp_path / "data" / "queue" / "hold" / first)
    assert in_reactor(queue.delete, second) is True
    busy_sink.policy = lambda stage, arg, s: None
    in_reactor(queue.flush)
    server.advance(1)
    queue_settled(server)
    assert busy_sink.messages == []
    assert [e["id"] for e in in_reactor(queue.list)] == [first]
    assert in_reactor(queue.release, first) is True
    wait_for(lambda: busy_sink.messages)
    assert busy_sink.recipients() == ["carol@remote.example"]


# every [relay] key is documented

from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELAY_KEYS = [f.name for f in fields(RelayConfig)]


def _sample_relay_lines() -> dict[str, str]:
    """The [relay] section of etc/mailscreen.toml: key -> value text (commented or not)."""
    text = (ROOT / "etc" / "mailscreen.toml").read_text()
    section = text.split("\n[relay]\n", 1)[1].split("\n[", 1)[0]
    out = {}
    for line in section.splitlines():
        line = line.lstrip("# ").split("  #")[0].strip()
        key, eq, value = line.partition(" = ")
        if eq and key.isidentifier():
            out[key] = value.strip()
    return out


def test_every_relay_key_is_in_relay_md():
    table = (ROOT / "docs" / "relay.md").read_text()
    assert [k for k in RELAY_KEYS if f"| `{k}` |" not in table] == []


def test_every_relay_key_is_in_the_sample_config_with_its_default(tmp_path):
    sample = _sample_relay_lines()
    assert [k for k in RELAY_KEYS if k not in sample] == []
    defaults = relay(tmp_path)
    for key in RELAY_KEYS:
        default = getattr(defaults, key)
        if isinstance(default, int) and not isinstance(default, bool):
            assert sample[key] == str(default), key


def test_every_relay_key_is_in_configuration_md():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert [k for k in RELAY_KEYS if f"| `{k}` |" not in text] == []


def test_envelope_without_message_file_is_removed(start_server, accounts, busy_sink, tmp_path):
    """A message file removed by hand: the envelope goes at the next attempt, nothing is sent."""
    clock = Clock()
    server = start_relaying(start_server, busy_sink, clock)
    send(server)
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    queue_id = queued(tmp_path)[0]["id"]
    os.unlink(tmp_path / "data" / "queue" / "msg" / queue_id)
    busy_sink.policy = lambda stage, arg, s: None
    server.advance(300)
    wait_for(lambda: queued(tmp_path) == [])
    queue_settled(server)
    assert busy_sink.messages == []


def test_stop_waits_for_an_attempt_to_record_its_result(start_server, accounts, tmp_path):
    """
    Stopping the server while a message is being sent lets the attempt end
    and record its result: the queue's file work still runs during the stop,
    so the message is not sent a second time after the restart.
    """
    import threading

    s = Sink().start()
    try:
        server = start_relaying(start_server, s, Clock())
        s.hold_greeting()
        send(server)
        wait_for(lambda: s.connections == 1, what="the attempt connected")
        service = server.service
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        wait_for(lambda: not service.running, what="the stop began")
        s.open_gate()
        stopping.join(20)
        assert not stopping.is_alive()
        assert s.recipients() == ["carol@remote.example"]
        assert queued(tmp_path) == []
    finally:
        s.stop()


def test_body_8bitmime_only_for_8bit_messages(start_server, accounts, tmp_path):
    """MAIL FROM carries BODY=8BITMIME for a message with 8-bit octets, not for an ASCII one."""
    s = Sink().start()
    try:
        server = start_relaying(start_server, s, Clock())
        for rcpt, body in (("ascii@remote.example", b"Subject: a\r\n\r\nplain\r\n"),
                           ("eight@remote.example", "Subject: b\r\n\r\ncaf\u00e9\r\n".encode())):
            client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
            client.login("alice@example.test", "alice-secret")
            assert client.sendmail("alice@example.test", [rcpt], body) == {}
            client.quit()
        wait_for(lambda: len(s.messages) == 2, what="both messages at the smarthost")
        # Each MAIL FROM is followed by its message's one RCPT TO.
        eight_bit = {s.commands[i + 1]: "BODY=8BITMIME" in c
                     for i, c in enumerate(s.commands) if c.startswith("MAIL FROM")}
        assert eight_bit == {"RCPT TO:<ascii@remote.example>": False,
                             "RCPT TO:<eight@remote.example>": True}
    finally:
        s.stop()


def test_an_unreadable_envelope_is_logged_once_per_version_and_skipped_until_it_changes(
        start_server, accounts, busy_sink, tmp_path):
    """
    A truncated envelope (written by hand, or by another program) is not
    read again at every poll: one log line per version of the file, then
    nothing until it changes; once whole, it is taken and tried.
    """
    clock = Clock()
    server = start_relaying(start_server, busy_sink, clock)
    queue = tmp_path / "data" / "queue"
    (queue / "msg").mkdir(parents=True, exist_ok=True)
    (queue / "env").mkdir(parents=True, exist_ok=True)
    (queue / "msg" / "00EF").write_bytes(b"Subject: by hand\n\nhello\n")
    whole = QueuedMessage(id="00EF", sender="alice@example.test", created=time.time(), next_attempt=0,
                          recipients=[Recipient("carol@remote.example")]).to_json()

    def write(data: bytes) -> None:
        (queue / "env" / ".00EF.tmp").write_bytes(data)
        os.replace(queue / "env" / ".00EF.tmp", queue / "env" / "00EF.json")

    def polls(n: int) -> None:
        for _ in range(n):
            server.advance(1)
            queue_settled(server)

    with log_lines("00EF") as lines:
        write(whole[:40])
        polls(5)
        assert len(lines) == 1 and "unreadable" in lines[0], lines
        write(whole[:70])  # another version, still cut short: told again, once
        polls(5)
        assert len(lines) == 2, lines
        write(whole)
        polls(1)
        wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
        assert not any("unreadable" in line for line in lines[2:]), lines
