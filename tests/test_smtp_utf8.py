"""
SMTPUTF8 (RFC 6531) over real sockets: UTF-8 addresses and headers with the
parameter, 553 5.6.7 without it, UTF-8 local parts as safe mailbox names
that POP3 and IMAP log in to, and relaying to a next hop without SMTPUTF8.
"""

from __future__ import annotations

import email
import poplib
import smtplib
import socket
import ssl
import unicodedata

import pytest

from conftest import converse, maildir_files, queue_settled, relay_to
from relay_sink import wait_for

NAME = "jörg"  # NFC: U+00F6
DECOMPOSED = unicodedata.normalize("NFD", "Jörg")  # o + U+0308, capital J
MESSAGE = "From: Jörg <jörg@x.test>\r\nTo: 用户@例子.test\r\nSubject: grüße\r\n\r\nhallo\r\n".encode()


def smtp(server, kind: str = "smtp") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port(kind), timeout=10)
    client.ehlo("client.example")
    return client


def finals(port: int, data: bytes, replies: int) -> list[bytes]:
    return converse(port, data, replies, finals_only=True)


def test_ehlo_advertises_smtputf8(start_server):
    client = smtp(start_server())
    assert client.has_extn("smtputf8")
    client.quit()


def test_utf8_addresses_and_headers_with_smtputf8(start_server, tmp_path):
    """UTF-8 sender, recipient and headers are taken with SMTPUTF8, stored as sent, with UTF8SMTP."""
    server = start_server()
    client = smtp(server)
    refused = client.sendmail(f"{NAME}@x.test", [f"{DECOMPOSED}@bücher.example", "用户@例子.test"],
                              MESSAGE, mail_options=["SMTPUTF8"])
    assert refused == {}
    client.quit()
    data = tmp_path / "data"
    # NFC, lower case, the domain as A-labels: one mailbox for every spelling.
    [path] = maildir_files(data, f"{NAME}@xn--bcher-kva.example")
    text = path.read_bytes()
    assert text.startswith(f"Return-Path: <{NAME}@x.test>\n".encode())
    assert b"with UTF8SMTP;" in text and text.endswith(MESSAGE.replace(b"\r\n", b"\n"))
    assert maildir_files(data, "用户@xn--fsqu00a.test")
    assert sorted(p.name for p in (data / "mail").iterdir()) == [
        "xn--bcher-kva.example", "xn--fsqu00a.test"]
    assert [p.name for p in (data / "mail" / "xn--bcher-kva.example").iterdir()] == [NAME]


def test_non_ascii_address_without_smtputf8_is_553_5_6_7(start_server, tmp_path):
    """RFC 6531 3.7.4.1: a non-ASCII path at MAIL or RCPT without the parameter: 553 5.6.7."""
    server = start_server()
    lines = finals(server.port("smtp"),
                   f"EHLO c\r\nMAIL FROM:<{NAME}@x.test>\r\nMAIL FROM:<a@x.test>\r\n"
                   f"RCPT TO:<{NAME}@x.test>\r\nRCPT TO:<b@x.test>\r\nRSET\r\n"
                   f"MAIL FROM:<a@x.test> SMTPUTF8\r\nRCPT TO:<{NAME}@x.test>\r\n".encode(), 8)
    assert lines[1] == lines[3] == b"553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter (RFC 6531)"
    assert [l[:3] for l in lines[4:]] == [b"250"] * 4


@pytest.mark.parametrize("local", [
    "a\u202eb",  # right-to-left override
    "a\u200bb",  # zero-width space
    "a\u00a0b",  # no-break space
    "a\u0085b",  # C1 control (NEL)
    "a\u2028b",  # line separator
    "x" * 30 + "ö" * 20,  # 70 octets
    "ö/..",
])
def test_unsafe_utf8_local_parts_are_refused(start_server, tmp_path, local):
    """Controls, format and space characters, separators, over 64 octets, '/': 501 5.1.3, no mailbox."""
    server = start_server()
    lines = finals(server.port("smtp"), f"EHLO c\r\nMAIL FROM:<a@x.test> SMTPUTF8\r\n"
                   f"RCPT TO:<{local}@x.test>\r\nNOOP\r\n".encode(), 4)
    assert lines[2].startswith(b"501 5.1.3"), lines
    assert lines[3].startswith(b"250")
    assert not (tmp_path / "data" / "mail" / "x.test").exists()


def test_non_ascii_outside_paths_is_still_refused(start_server):
    """UTF-8 is for MAIL and RCPT paths only; invalid UTF-8 is refused everywhere."""
    server = start_server()
    lines = finals(server.port("smtp"), "EHLO c\r\nHELO jörg\r\nVRFY jörg\r\n".encode()
                   + b"MAIL FROM:<\xff@x.test> SMTPUTF8\r\nNOOP\r\n", 5)
    assert [l[:9] for l in lines[1:4]] == [b"500 5.5.2"] * 3
    assert lines[4].startswith(b"250")


def test_utf8_account_logs_in_over_pop3_and_imap(start_server, accounts, tmp_path):
    """A UTF-8 account (site mode) gets its mail over SMTPUTF8 and opens it with a UTF-8 login name."""
    accounts.add_user(f"{NAME}@example.test", "geheim")
    server = start_server(site=True, kinds=("smtp", "pop3", "imap"))
    client = smtp(server)
    client.sendmail("a@elsewhere.example", [f"{DECOMPOSED}@Example.TEST"], MESSAGE,
                    mail_options=["SMTPUTF8"])
    client.quit()
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    pop.user(f"{DECOMPOSED}@example.test")  # poplib sends UTF-8; any spelling is the account
    pop.pass_("geheim")
    assert pop.stat()[0] == 1
    assert b"Subject: gr\xc3\xbc\xc3\x9fe" in b"\n".join(pop.retr(1)[1])
    pop.quit()
    user = f"{NAME}@example.test".encode()
    with socket.create_connection(("127.0.0.1", server.port("imap")), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a LOGIN {%d}\r\n" % len(user))
        assert f.readline().startswith(b"+")
        s.sendall(user + b" geheim\r\n")
        assert f.readline().startswith(b"a OK")
        s.sendall(b"b SELECT INBOX\r\n")
        lines = []
        while not lines or not lines[-1].startswith(b"b "):
            lines.append(f.readline())
        assert b"* 1 EXISTS\r\n" in lines and lines[-1].startswith(b"b OK")


def test_smtputf8_over_starttls(start_server, tmp_path, certificate):
    """After STARTTLS the Received header says UTF8SMTPS."""
    cert, key = certificate
    server = start_server(tls__certificate=cert, tls__key=key)
    client = smtp(server)
    client.starttls(context=ssl._create_unverified_context())
    client.ehlo("client.example")
    assert client.has_extn("smtputf8")
    client.sendmail(f"{NAME}@x.test", [f"{NAME}@x.test"], MESSAGE, mail_options=["SMTPUTF8"])
    client.quit()
    [path] = maildir_files(tmp_path / "data", f"{NAME}@x.test")
    assert b"with UTF8SMTPS\n\tfor <j\xc3\xb6rg@x.test>;" in path.read_bytes()


SUBMITTED = "From: Alice Jörg <alice@example.test>\r\nTo: jörg@remote.example\r\nSubject: grüße\r\n\r\nhallo\r\n".encode()


def relay_utf8(start_server, accounts, sink, rcpt: str) -> tuple:
    server = start_server(site=True, **relay_to(sink))
    client = smtp(server, "submission")
    client.login("alice@example.test", "alice-secret")
    client.sendmail("alice@example.test", [rcpt], SUBMITTED, mail_options=["SMTPUTF8"])
    client.quit()
    return server


def test_relay_to_a_next_hop_without_smtputf8_bounces_5_6_7(start_server, accounts, sink, tmp_path):
    """RFC 6531 3.7.5: a message that needs SMTPUTF8 is not sent to a host without it; the sender gets a DSN."""
    server = relay_utf8(start_server, accounts, sink, f"{NAME}@remote.example")
    data = tmp_path / "data"
    [bounce] = wait_for(lambda: maildir_files(data, "alice@example.test"), what="the bounce")
    queue_settled(server)
    assert sink.messages == [] and not any(c.startswith("MAIL") for c in sink.commands)
    raw = bounce.read_bytes()
    assert email.message_from_bytes(raw).get_content_type() == "multipart/report"
    # RFC 6533: a report naming a UTF-8 address is message/global-delivery-status.
    assert b"\nContent-Type: message/global-delivery-status\n" in raw
    for field in (f"Final-Recipient: utf-8; {NAME}@remote.example", "Action: failed",
                  "Status: 5.6.7", "Diagnostic-Code: smtp; 553 5.6.7 "):
        assert f"\n{field}".encode() in raw, field


def test_relay_to_a_next_hop_with_smtputf8(start_server, accounts, sink, tmp_path):
    """Where the next hop offers SMTPUTF8, MAIL carries it and the UTF-8 recipient goes as is."""
    sink.extensions = ("SMTPUTF8",)
    relay_utf8(start_server, accounts, sink, f"{NAME}@remote.example")
    [got] = wait_for(lambda: sink.messages, what="the relayed message")
    assert got.recipients == [f"{NAME}@remote.example"]
    [mail] = [c for c in sink.commands if c.startswith("MAIL")]
    assert mail.startswith("MAIL FROM:<alice@example.test> ")
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(mail.split()[2:])
    assert got.data.endswith(SUBMITTED)


def test_ascii_envelope_relays_without_smtputf8_when_headers_are_ascii(start_server, accounts, sink):
    """SMTPUTF8 given but nothing needs it (ASCII addresses and headers): sent to a host without it."""
    server = start_server(site=True, **relay_to(sink))
    client = smtp(server, "submission")
    client.login("alice@example.test", "alice-secret")
    client.sendmail("alice@example.test", ["bob@remote.example"],
                    "Subject: plain\r\n\r\nbody with ü\r\n".encode(), mail_options=["SMTPUTF8"])
    client.quit()
    [got] = wait_for(lambda: sink.messages, what="the relayed message")
    assert got.recipients == ["bob@remote.example"]
    assert not any("SMTPUTF8" in c for c in sink.commands)
