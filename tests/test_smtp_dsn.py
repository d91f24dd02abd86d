"""
DSN (RFC 3461, 3464) over real sockets: RET, ENVID, NOTIFY and ORCPT
accepted and checked, kept with the queue entry, passed to a next hop that
offers DSN and honoured here: "delivered" and "relayed" success notices,
failure and delay notices per NOTIFY, RET=HDRS/FULL.
"""

from __future__ import annotations

import email
from contextlib import contextmanager
import json
import smtplib
import ssl

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from conftest import converse, log_lines, maildir_files, queue_settled, queued, relay_to
from relay_sink import wait_for
from tests.test_hostile import Failures
from twisted_mail_screen.relay.spool import QueueDirectory, QueuedMessage
from twisted_mail_screen.store.envelope import xtext_decode, xtext_encode

@contextmanager
def failures():
    """Every failure (traceback) or error logged while the block runs."""
    observer = Failures()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


BODY = b"From: alice@example.test\r\nSubject: tracked\r\n\r\nthe secret body\r\n"


def smtp(server, kind: str = "smtp") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port(kind), timeout=10)
    client.ehlo("client.example")
    return client


def submit(server, rcpts, mail_options=(), rcpt_options=(), body=BODY) -> None:
    client = smtp(server, "submission")
    client.login("alice@example.test", "alice-secret")
    assert client.sendmail("alice@example.test", rcpts, body, mail_options=list(mail_options),
                           rcpt_options=list(rcpt_options)) == {}
    client.quit()


def report_fields(raw: bytes) -> tuple[dict, list[dict]]:
    """The per-message fields and the per-recipient blocks of a DSN (RFC 3464 2)."""
    msg = email.message_from_bytes(raw)
    assert msg.get_content_type() == "multipart/report"
    status = msg.get_payload()[1]
    blocks = [dict(b.items()) for b in status.get_payload()]
    return blocks[0], blocks[1:]


def finals(port: int, data: bytes, replies: int) -> list[bytes]:
    return converse(port, data, replies, finals_only=True)


def test_ehlo_advertises_dsn(start_server):
    client = smtp(start_server())
    assert client.has_extn("dsn")
    client.quit()


@pytest.mark.parametrize("command, reply", [
    (b"MAIL FROM:<a@x.test> RET=FULL ENVID=QQ314159", b"250"),
    (b"MAIL FROM:<a@x.test> RET=hdrs ENVID=a+2Bb+3Dc", b"250"),
    (b"MAIL FROM:<a@x.test> RET=BODY", b"501 5.5.4 Bad RET"),
    (b"MAIL FROM:<a@x.test> ENVID=a+zz", b"501 5.5.4 Bad ENVID"),
    (b"MAIL FROM:<a@x.test> ENVID=a+0D+0Ab", b"501 5.5.4 Bad ENVID"),
    (b"MAIL FROM:<a@x.test> ENVID=" + b"x" * 101, b"501 5.5.4 Bad ENVID"),
    (b"MAIL FROM:<a@x.test> RET=FULL RET=HDRS", b"501 5.5.4"),
    (b"MAIL FROM:<a@x.test> SMTPUTF8=yes", b"501 5.5.4"),
    (b"MAIL FROM:<a@x.test> X-FOO=1", b"555 5.5.4"),
])
def test_mail_dsn_parameters(start_server, command, reply):
    """RFC 3461 4.3, 4.4: RET is FULL or HDRS, ENVID is xtext of at most 100 characters."""
    server = start_server()
    lines = finals(server.port("smtp"), b"EHLO c\r\n" + command + b"\r\nNOOP\r\n", 3)
    assert lines[1].startswith(reply), lines
    assert lines[2].startswith(b"250")


@pytest.mark.parametrize("params, reply", [
    (b"NOTIFY=NEVER", b"250"),
    (b"NOTIFY=success,FAILURE,DELAY ORCPT=rfc822;Bob+40x.test", b"250"),
    (b"ORCPT=utf-8;j\xc3\xb6rg@x.test", b"501 5.5.4"),  # UTF-8 outside xtext
    (b"NOTIFY=NEVER,SUCCESS", b"501 5.5.4 Bad NOTIFY"),
    (b"NOTIFY=SUCCESS,SUCCESS", b"501 5.5.4 Bad NOTIFY"),
    (b"NOTIFY=SOMETIMES", b"501 5.5.4 Bad NOTIFY"),
    (b"NOTIFY=", b"501 5.5.4"),
    (b"ORCPT=rfc822", b"501 5.5.4 Bad ORCPT"),
    (b"ORCPT=rfc822;", b"501 5.5.4 Bad ORCPT"),
    (b"ORCPT=;b@x.test", b"501 5.5.4 Bad ORCPT"),
    (b"ORCPT=rfc822;b+1@x.test", b"501 5.5.4 Bad ORCPT"),
    (b"X-BAR", b"555 5.5.4"),
])
def test_rcpt_dsn_parameters(start_server, params, reply):
    """RFC 3461 4.1, 4.2: NOTIFY is NEVER or a list of SUCCESS, FAILURE, DELAY; ORCPT is type;xtext."""
    server = start_server()
    lines = finals(server.port("smtp"), b"EHLO c\r\nMAIL FROM:<a@x.test> SMTPUTF8\r\n"
                   b"RCPT TO:<b@x.test> " + params + b"\r\nNOOP\r\n", 4)
    assert lines[2].startswith(reply), lines
    assert lines[3].startswith(b"250")


def test_dsn_parameters_need_ehlo(start_server):
    server = start_server()
    lines = finals(server.port("smtp"), b"HELO c\r\nMAIL FROM:<a@x.test> RET=FULL\r\n"
                   b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test> NOTIFY=NEVER\r\n", 4)
    assert lines[1] == b"555 5.5.4 MAIL parameters need EHLO"
    assert lines[3] == b"555 5.5.4 RCPT parameters need EHLO"


def test_xtext_round_trip():
    for text in ("plain", "a+b=c", "j\u00f6rg@x.test", "sp ace"):
        assert xtext_decode(xtext_encode(text)) == text
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"


def test_local_delivery_success_notice(start_server, tmp_path):
    """NOTIFY=SUCCESS on a local recipient: a "delivered" DSN with ENVID and ORCPT; others get none."""
    server = start_server()
    client = smtp(server)
    client.sendmail("s@x.test", ["quiet@x.test"], b"Subject: first\r\n\r\nx\r\n")
    client.sendmail("s@x.test", ["p@x.test", "q@x.test"], b"Subject: tracked\r\n\r\nsecret\r\n",
                    mail_options=["RET=FULL", "ENVID=QQ314159"],
                    rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;P+40x.test"])
    client.quit()
    data = tmp_path / "data"
    [notice] = wait_for(lambda: maildir_files(data, "s@x.test"), what="the delivery notice")
    raw = notice.read_bytes()
    assert raw.startswith(b"Return-Path: <>\n")
    msg = email.message_from_bytes(raw)
    assert msg["Subject"] == "Successful Mail Delivery Report" and msg["To"] == "<s@x.test>"
    per_message, blocks = report_fields(raw)
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; p@x.test", "rfc822; q@x.test"]
    assert all(b["Action"] == "delivered" and b["Status"] == "2.0.0" for b in blocks)
    assert all(b["Original-Recipient"] == "rfc822; P@x.test" for b in blocks)
    assert b"Subject: tracked" in raw and b"secret" not in raw  # a success notice returns headers only
    assert len(maildir_files(data, "p@x.test")) == 1


def test_success_notice_for_a_sender_out_of_reach_is_only_logged(start_server, accounts, tmp_path):
    """A remote sender asks for SUCCESS where nothing is relayed: delivered, the notice only logged."""
    server = start_server(site=True, relay__enabled=False)
    with log_lines("delivery notice") as lines, failures() as logged:
        client = smtp(server)
        client.sendmail("someone@remote.example", ["bob@example.test"], b"Subject: x\r\n\r\ny\r\n",
                        rcpt_options=["NOTIFY=SUCCESS"])
        client.quit()
        wait_for(lambda: lines, what="the log line")
    assert "not sent" in lines[0] and logged.events == []
    assert len(maildir_files(tmp_path / "data", "bob@example.test")) == 1


def test_relayed_notice_when_the_next_hop_has_no_dsn(start_server, accounts, sink, tmp_path):
    """NOTIFY=SUCCESS to a next hop without DSN: we report "relayed" (RFC 3461 5.2.2); no parameters sent on."""
    server = start_server(site=True, **relay_to(sink))
    submit(server, ["carol@remote.example"], ["ENVID=env-1"], ["NOTIFY=SUCCESS", "ORCPT=rfc822;carol+40remote.example"])
    [notice] = wait_for(lambda: maildir_files(tmp_path / "data", "alice@example.test"),
                        what="the relay notice")
    per_message, [block] = report_fields(notice.read_bytes())
    assert per_message["Original-Envelope-Id"] == "env-1"
    assert block["Action"] == "relayed" and block["Status"] == "2.0.0"
    assert block["Final-Recipient"] == "rfc822; carol@remote.example"
    assert block["Original-Recipient"] == "rfc822; carol@remote.example"
    assert block["Remote-MTA"].startswith("dns; ")
    assert not any("NOTIFY" in c or "ENVID" in c for c in sink.commands)
    queue_settled(server)
    assert len(sink.messages) == 1


def test_dsn_parameters_passed_to_a_next_hop_with_dsn(start_server, accounts, sink, tmp_path):
    """A next hop that offers DSN gets RET, ENVID, NOTIFY and ORCPT (xtext) and reports itself."""
    sink.extensions = ("DSN",)
    server = start_server(site=True, **relay_to(sink))
    submit(server, ["carol@remote.example", "dan@remote.example"], ["RET=HDRS", "ENVID=a+2Bb"],
           ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Carol+40remote.example"])
    wait_for(lambda: sink.messages, what="the relayed message")
    queue_settled(server)
    [mail] = [c for c in sink.commands if c.startswith("MAIL")]
    assert "RET=HDRS" in mail.split() and "ENVID=a+2Bb" in mail.split()
    rcpts = [c for c in sink.commands if c.startswith("RCPT")]
    assert rcpts == [
        "RCPT TO:<carol@remote.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Carol@remote.example",
        "RCPT TO:<dan@remote.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Carol@remote.example"]
    assert maildir_files(tmp_path / "data", "alice@example.test") == []  # the next hop reports


def rejecting(sink) -> None:
    sink.policy = lambda stage, arg, s: "550 5.1.1 no such user" if stage == "rcpt" else None


def test_notify_never_means_no_bounce(start_server, accounts, sink, tmp_path):
    """A recipient with NOTIFY=NEVER that fails is not reported; one with the default is."""
    rejecting(sink)
    server = start_server(site=True, **relay_to(sink))
    submit(server, ["never@remote.example"], rcpt_options=["NOTIFY=NEVER"])
    wait_for(lambda: queued(tmp_path) == [], what="the message to leave the queue")
    queue_settled(server)
    assert maildir_files(tmp_path / "data", "alice@example.test") == []
    submit(server, ["default@remote.example"])
    [bounce] = wait_for(lambda: maildir_files(tmp_path / "data", "alice@example.test"),
                        what="the bounce")
    _, [block] = report_fields(bounce.read_bytes())
    assert block["Final-Recipient"] == "rfc822; default@remote.example"


@pytest.mark.parametrize("ret, full", [("RET=HDRS", False), ("RET=FULL", True)])
def test_bounce_returns_headers_or_the_full_message(start_server, accounts, sink, tmp_path, ret, full):
    """RET=HDRS: the headers only (text/rfc822-headers); RET=FULL: the whole message (message/rfc822)."""
    rejecting(sink)
    server = start_server(site=True, **relay_to(sink))
    submit(server, ["nobody@remote.example"], [ret, "ENVID=E1"], ["NOTIFY=FAILURE"])
    [bounce] = wait_for(lambda: maildir_files(tmp_path / "data", "alice@example.test"),
                        what="the bounce")
    raw = bounce.read_bytes()
    msg = email.message_from_bytes(raw)
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == ("message/rfc822" if full else "text/rfc822-headers")
    assert b"Subject: tracked" in raw
    assert (b"the secret body" in raw) is full
    per_message, [block] = report_fields(raw)
    assert per_message["Original-Envelope-Id"] == "E1" and block["Action"] == "failed"


def test_delay_notice_follows_notify(start_server, accounts, sink, tmp_path):
    """A delay warning names only the recipients whose NOTIFY asks for DELAY (or gave none)."""
    sink.policy = lambda stage, arg, s: "451 4.2.0 busy" if stage == "rcpt" else None
    clock = Clock()
    server = start_server(site=True, clock=clock, **relay_to(sink), relay__delay_warning_hours=1,
                          relay__retry_minutes=30, relay__max_retry_minutes=60)
    client = smtp(server, "submission")
    client.login("alice@example.test", "alice-secret")
    client.mail("alice@example.test")
    client.rcpt("wants@remote.example", ["NOTIFY=DELAY"])
    client.rcpt("failonly@remote.example", ["NOTIFY=FAILURE"])
    client.rcpt("default@remote.example")
    assert client.data(BODY)[0] == 250
    client.quit()
    wait_for(lambda: queued(tmp_path) and queued(tmp_path)[0]["attempts"] == 1)
    server.advance(3700)
    [warning] = wait_for(lambda: maildir_files(tmp_path / "data", "alice@example.test"),
                         what="the delay warning")
    _, blocks = report_fields(warning.read_bytes())
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; wants@remote.example",
                                                      "rfc822; default@remote.example"]
    assert all(b["Action"] == "delayed" for b in blocks)


def test_requests_are_kept_with_the_queue_entry(start_server, accounts, sink, tmp_path):
    """The envelope file holds SMTPUTF8, RET, ENVID and each NOTIFY and ORCPT."""
    sink.policy = lambda stage, arg, s: "451 4.3.0 later" if stage == "rcpt" else None
    server = start_server(site=True, **relay_to(sink))
    submit(server, ["carol@remote.example"], ["SMTPUTF8", "RET=FULL", "ENVID=x+2By"],
           ["NOTIFY=FAILURE", "ORCPT=rfc822;c+40r.example"])
    [entry] = wait_for(lambda: queued(tmp_path), what="the queue entry")
    assert (entry["smtputf8"], entry["ret"], entry["envid"]) == (True, "FULL", "x+y")
    [r] = entry["recipients"]
    assert (r["notify"], r["orcpt"]) == (["FAILURE"], "rfc822;c@r.example")


def test_envelopes_written_before_dsn_still_read(tmp_path):
    """An envelope file without the new fields (an older server's) reads as "nothing requested"."""
    old = {"id": "0000000AB12", "sender": "a@example.test", "created": 1.0, "next_attempt": 1.0,
           "size": 5, "attempts": 0, "warned": False,
           "recipients": [{"address": "x@r.example", "state": "pending", "reply": "", "host": "",
                           "status": ""}]}
    q = QueueDirectory(str(tmp_path / "queue"))
    q.create()
    (tmp_path / "queue" / "env" / "0000000AB12.json").write_text(json.dumps(old))
    [m] = q.load_all()
    assert (m.smtputf8, m.ret, m.envid) == (False, "", "")
    assert (m.recipients[0].notify, m.recipients[0].orcpt) == ([], "")
    assert QueuedMessage.from_json(m.to_json()) == m


def test_thunderbird_style_transaction_over_starttls(start_server, accounts, tmp_path, certificate):
    """What Thunderbird sends: STARTTLS, AUTH, MAIL with SIZE BODY RET ENVID, RCPT with NOTIFY ORCPT,
    SMTPUTF8 only for a non-ASCII address."""
    cert, key = certificate
    server = start_server(site=True, tls__certificate=cert, tls__key=key)
    accounts.add_user("jörg@example.test", "geheim")
    client = smtp(server, "submission")
    client.starttls(context=ssl._create_unverified_context())
    client.ehlo("[127.0.0.1]")
    assert {"dsn", "smtputf8", "chunking", "8bitmime", "size"} <= set(client.esmtp_features)
    client.login("alice@example.test", "alice-secret")
    assert client.sendmail("alice@example.test", ["bob@example.test"], BODY,
                           mail_options=["BODY=8BITMIME", "RET=HDRS",  # smtplib adds SIZE
                                         "ENVID=7a1b2c3d-4e5f@example.test"],
                           rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@example.test"]) == {}
    assert client.sendmail("alice@example.test", ["jörg@example.test"],
                           "From: alice@example.test\r\nSubject: grüße\r\n\r\nhallo\r\n".encode(),
                           mail_options=["BODY=8BITMIME", "SMTPUTF8", "RET=HDRS"],
                           rcpt_options=["NOTIFY=FAILURE"]) == {}
    client.quit()
    data = tmp_path / "data"
    [notice] = wait_for(lambda: maildir_files(data, "alice@example.test"), what="the notice")
    per_message, [block] = report_fields(notice.read_bytes())
    assert per_message["Original-Envelope-Id"] == "7a1b2c3d-4e5f@example.test"
    assert block["Action"] == "delivered" and block["Final-Recipient"] == "rfc822; bob@example.test"
    [got] = maildir_files(data, "jörg@example.test")
    assert b"with UTF8SMTPSA" in got.read_bytes()
