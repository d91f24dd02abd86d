"""
Injection and parser defects of SMTP and submission (issue 10, section 3),
each replayed over real sockets with the exact reply checked:

  - From:/Sender: headers checked the way any reader parses them
    (obsolete blanks before the colon, folding, encoded words, several
    addresses, groups), and never two From: fields;
  - control characters (bare CR, NUL, TAB) in command lines refused, so
    nothing reaches our headers or the relay's commands;
  - bare CR or LF in DATA refused; only CRLF.CRLF ends the data;
  - numeric arguments bounded (SIZE=, POP3 TOP/RETR), never "internal error".
"""

from __future__ import annotations

import poplib
import smtplib
import socket

import pytest

from twisted.logger import globalLogPublisher

from conftest import converse as shared_converse, maildir_files, relay_to
from relay_sink import Sink, wait_for
from tests.test_hostile import Failures

CONTROL_REPLY = b"501 5.5.2 Control character (bare CR, NUL, TAB...) in command line"
BARE_REPLY = b"554 5.5.2 Bare CR or LF in message, see RFC 5321 2.3.8"


@pytest.fixture
def failures():
    """Every failure (traceback) or error logged while the test runs."""
    observer = Failures()
    globalLogPublisher.addObserver(observer)
    yield observer.events
    globalLogPublisher.removeObserver(observer)


def converse(port: int, data: bytes, replies: int) -> list[bytes]:
    """The final line of each reply to C{data} (greeting excluded)."""
    return shared_converse(port, data, replies, finals_only=True)


def submit_raw(server, message: bytes, rcpts=("bob@example.test",)) -> tuple[int, bytes]:
    """alice submits C{message} (CRLF lines) as is; the reply to the end of DATA."""
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.ehlo("client.example")
    client.login("alice@example.test", "alice-secret")
    assert client.mail("alice@example.test")[0] == 250
    for r in rcpts:
        assert client.rcpt(r)[0] == 250
    reply = client.data(message)
    assert client.noop()[0] == 250  # the session goes on
    client.quit()
    return reply


# From: and Sender: as readers parse them

NOT_OWNED = b"5.7.1 From: <bob@example.test> not owned by user alice@example.test"


@pytest.mark.parametrize("header", [
    b"From : bob@example.test",  # obsolete syntax, RFC 5322 4.5: Python's parser skips it
    b"FROM\t: bob@example.test",
    b"from:bob@example.test",
    b"From:\r\n bob@example.test",  # folded
    b"From: alice@example.test,\r\n\tbob@example.test",  # several mailboxes, folded
    b"From: Alice <alice@example.test>, Bob <bob@example.test>",
    b'From: "bob"@example.test',  # a quoted local part is still bob
    b"From: =?utf-8?q?=3Cbob=40example=2Etest=3E?= <alice@example.test>",  # decoded: bob
])
def test_from_naming_another_user_is_refused(start_server, accounts, tmp_path, failures, header):
    server = start_server(site=True)
    code, text = submit_raw(server, b"Subject: s\r\n" + header + b"\r\n\r\nforged\r\n")
    assert (code, text) == (553, NOT_OWNED)
    assert maildir_files(tmp_path / "data", "bob@example.test") == []
    assert failures == []


def test_from_after_a_line_python_cannot_parse_is_still_checked(start_server, accounts, tmp_path):
    """A reader that reads past a malformed line must not find a From that the check missed."""
    server = start_server(site=True)
    code, text = submit_raw(server, b"Subject: s\r\nnot a header line\r\nFrom: bob@example.test\r\n"
                                    b"\r\nx\r\n")
    assert (code, text) == (553, NOT_OWNED)


def test_sender_naming_another_user_is_refused(start_server, accounts, tmp_path):
    """Sender: bob would make IMAP ENVELOPE report bob as the sender."""
    server = start_server(site=True)
    code, text = submit_raw(server, b"From: alice@example.test\r\nSender : bob@example.test\r\n"
                                    b"Subject: s\r\n\r\nx\r\n")
    assert (code, text) == (553, b"5.7.1 Sender: <bob@example.test> not owned by user "
                                 b"alice@example.test")
    assert maildir_files(tmp_path / "data", "bob@example.test") == []


@pytest.mark.parametrize("headers, reply", [
    (b"From: alice@example.test\r\nFrom: alice@example.test",
     b"5.7.1 Message has more than one From: header field (RFC 5322 3.6 allows one)"),
    (b"From: alice@example.test\r\nFrom : bob@example.test",
     b"5.7.1 Message has more than one From: header field (RFC 5322 3.6 allows one)"),
    (b"Sender: alice@example.test\r\nsender: alice@example.test",
     b"5.7.1 Message has more than one Sender: header field (RFC 5322 3.6 allows one)"),
    (b"From: Team: alice@example.test;",
     b"5.7.1 From: header field is not a plain list of mailboxes (RFC 5322 3.6.2)"),
    (b"From: alice@example.test <bob@example.test>",  # readers disagree on it
     b"5.7.1 From: header field is not a plain list of mailboxes (RFC 5322 3.6.2)"),
    (b"From: =?utf-8?q?bob=40example=2Etest?=",
     b"5.7.1 From: header field is not a plain list of mailboxes (RFC 5322 3.6.2)"),
    (b"From: " + b"(\r\n " * 1500 + b"alice@example.test",  # nested comments
     b"5.7.1 From: header field is not a valid address list"),
    (b"From: alice@example.test" + b",\r\n alice@example.test" * 300,
     b"5.7.1 From: header field too long"),
])
def test_malformed_or_repeated_sender_fields_are_refused(start_server, accounts, tmp_path,
                                                         failures, headers, reply):
    server = start_server(site=True)
    code, text = submit_raw(server, headers + b"\r\nSubject: s\r\n\r\nx\r\n")
    assert (code, text) == (550, reply)
    assert maildir_files(tmp_path / "data", "bob@example.test") == []
    assert failures == []


def test_huge_header_section_is_refused(start_server, accounts, tmp_path):
    server = start_server(site=True)
    code, text = submit_raw(server, b"X-Pad: x\r\n" * 120_000 + b"\r\nx\r\n")
    assert (code, text) == (552, b"5.3.4 Header section larger than 1048576 octets")


@pytest.mark.parametrize("headers", [
    b'From: "Alice" <alice@example.test>\r\nSender: alice@example.test',
    b"From: =?utf-8?q?Al=C3=AFce?= <ALICE@example.test>",
    b"From: alice@example.test (bob@example.test is a comment)",
    b"From :\r\n alice@example.test",
    b"Subject: s",  # no From at all: nothing claimed
])
def test_own_addresses_are_accepted(start_server, accounts, tmp_path, headers):
    server = start_server(site=True)
    code, _ = submit_raw(server, headers + b"\r\n\r\nFrom: bob@example.test in the body\r\n")
    assert code == 250
    [path] = maildir_files(tmp_path / "data", "bob@example.test")
    assert b"\nFrom: bob@example.test in the body\n" in path.read_bytes()


def test_obsolete_date_is_not_added_twice(start_server, accounts, tmp_path):
    """A Date or Message-ID written with blanks before the colon counts as present."""
    server = start_server(site=True)
    assert submit_raw(server, b"From: alice@example.test\r\nDate : Mon, 1 Dec 2026 10:00:00 +0000\r\n"
                              b"Message-ID :<x@y>\r\n\r\nx\r\n")[0] == 250
    [path] = maildir_files(tmp_path / "data", "bob@example.test")
    text = path.read_bytes().lower()
    assert text.count(b"\ndate") == 1 and text.count(b"\nmessage-id") == 1


# control characters in command lines

@pytest.mark.parametrize("line", [
    b"EHLO evil\rX-Injected-Helo: 1",
    b"HELO evil\x00",
    b"EHLO evil\tx",
    b"EHLO evil\x7f",
])
def test_control_characters_in_helo_are_refused(start_server, tmp_path, line):
    server = start_server()
    replies = converse(server.port("smtp"), line + b"\r\nMAIL FROM:<a@x.test>\r\nEHLO good\r\n"
                       b"MAIL FROM:<a@x.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\nSubject: s\r\n\r\nx\r\n"
                       b".\r\nQUIT\r\n", 8)
    assert replies[0] == CONTROL_REPLY
    assert replies[1] == b"503 5.5.1 Send HELO/EHLO first"  # the bad EHLO set no name
    assert replies[-2].startswith(b"250 2.0.0 Ok: queued as")
    [path] = maildir_files(tmp_path / "data", "r@x.test")
    assert b"Received: from good " in path.read_bytes() and b"evil" not in path.read_bytes()


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<a\rX-Injected-Sender:1@x.example>",
    b"MAIL FROM:<a@x.example>\r",  # a CR before the CRLF
    b"MAIL FROM:<a\x00@x.example>",
    b"MAIL FROM:<a@x.example>\tSIZE=10",
])
def test_control_characters_in_mail_are_refused(start_server, line):
    server = start_server()
    replies = converse(server.port("smtp"), b"EHLO c\r\n" + line + b"\r\nMAIL FROM:<a@x.example>\r\n", 3)
    assert replies[1:] == [CONTROL_REPLY, b"250 2.1.0 Ok"]


def test_control_characters_in_rcpt_and_auth_responses_are_refused(start_server, accounts):
    server = start_server(site=True)
    replies = converse(server.port("smtp"),
                       b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<alice@example.test\r>\r\n"
                       b"RSET\r\nAUTH LOGIN\r\nYWxp\rY2U=\r\nNOOP\r\n", 7)
    assert replies[2] == CONTROL_REPLY
    # the SASL exchange ends at the bad response; the next line is a command again
    assert replies[4:] == [b"334 VXNlcm5hbWU6", CONTROL_REPLY, b"250 2.0.0 Ok"]


def test_sender_path_that_would_break_headers_is_refused(start_server):
    server = start_server()
    replies = converse(server.port("smtp"), b"EHLO c\r\nMAIL FROM:<a<b@x.example>\r\n"
                       b"MAIL FROM:<a@x.example;b>\r\nMAIL FROM:<a@[127.0.0.1]>\r\n", 4)
    assert replies[1:] == [b"501 5.1.7 Bad sender address syntax"] * 2 + [b"250 2.1.0 Ok"]


def test_injected_commands_never_reach_the_smarthost(start_server, accounts, sink, tmp_path):
    """
    Through a forwarding alias, the bare CR in MAIL FROM once became a
    second command at the smarthost (MAIL FROM:<a^MRCPT^ITO:<inj@...>).
    It is refused; the clean transaction after it arrives alone.
    """
    accounts.set_alias("sales@example.test", ["carol@remote.example"])
    server = start_server(site=True, **relay_to(sink))
    replies = converse(server.port("smtp"),
                       b"EHLO c\r\nMAIL FROM:<a\rRCPT\tTO:<inj@victim.example>@x.example>\r\n"
                       b"MAIL FROM:<a@x.example>\r\nRCPT TO:<sales@example.test>\r\nDATA\r\n"
                       b"Subject: s\r\n\r\nhello\r.\r\nbody\r\n.\r\n"
                       b"MAIL FROM:<a@x.example>\r\nRCPT TO:<sales@example.test>\r\nDATA\r\n"
                       b"Subject: clean\r\n\r\nok\r\n.\r\nQUIT\r\n", 11)
    assert replies[1] == CONTROL_REPLY
    assert replies[5] == BARE_REPLY
    assert replies[-2].startswith(b"250 2.0.0")
    wait_for(lambda: sink.messages, what="the clean message")
    [m] = sink.messages
    assert b"Subject: clean" in m.data and b"\r" not in m.data.replace(b"\r\n", b"")
    assert not any("\r" in c or "\t" in c or "inj@" in c for c in sink.commands), sink.commands


# bare CR and LF in DATA

@pytest.mark.parametrize("body", [
    b"hello\r.\r\n",  # would end the data at a next hop that takes a bare CR as a line end
    b"a bare\rCR\r\n",
    b"a bare\nLF\r\n",
    b"X-Injected\r: 1\r\n",
    b"dot\n.\nMAIL FROM:<smuggled@x.test>\r\n",  # the SMTP smuggling class (CVE-2023-51764)
    b"dot\r\n.\nRCPT TO:<smuggled@x.test>\r\n",
    b"ends in CR\r\r\n",
])
def test_bare_cr_or_lf_in_data_is_refused(start_server, tmp_path, failures, body):
    server = start_server()
    replies = converse(server.port("smtp"),
                       b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n"
                       b"Subject: s\r\n\r\n" + body + b".\r\nNOOP\r\n", 6)
    assert replies[4:] == [BARE_REPLY, b"250 2.0.0 Ok"]
    assert maildir_files(tmp_path / "data", "r@x.test") == []
    assert failures == []


def test_only_crlf_dot_crlf_ends_the_data(start_server, tmp_path):
    """\\n.\\n, \\r.\\r and \\n.\\r\\n are content (refused), never the end of data."""
    server = start_server()
    replies = converse(server.port("smtp"),
                       b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n"
                       b"x\n.\nNOOP\r\nx\r.\rNOOP\r\nx\n.\r\nNOOP\r\n.\r\nNOOP\r\n", 6)
    assert replies[3:] == [b"354 End data with <CR><LF>.<CR><LF>", BARE_REPLY, b"250 2.0.0 Ok"]


def test_bare_cr_refused_wherever_the_reads_split(tmp_path):
    """The check carries across reads: a CRLF split between two reads is no bare CR."""
    from test_hostile import connect, feed

    from twisted.internet import reactor
    from twisted.internet.task import Clock
    from twisted_mail_screen.config.settings import load_config
    from twisted_mail_screen.runtime.service import build_service
    from twisted_mail_screen.testing import InlineWorkers, ephemeral_overrides

    config = load_config(None, ephemeral_overrides(str(tmp_path / "data"), ("smtp",)))
    service = build_service(config, reactor, Clock(), workers=InlineWorkers())
    head = b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n"
    for body, last in ((b"Subject: s\r\n\r\nfine\r\nlines\r\n", b"250"),
                       (b"Subject: s\r\n\r\nbare\rcr\r\n", b"554"),
                       (b"Subject: s\r\n\r\nbare\nlf\r\n", b"554")):
        session = head + body + b".\r\nNOOP\r\n"
        for i in range(len(head), len(session)):
            proto, transport = connect(service, "smtp")
            feed(proto, transport, [session[:i], session[i:]])
            codes = [l[:3] for l in transport.value().split(b"\r\n") if l[3:4] == b" "]
            assert codes[-2:] == [last, b"250"], (body, i)


# bounded numbers

def test_size_parameter_with_thousands_of_digits(start_server, failures):
    server = start_server(smtp__max_message_size=1_000_000)
    replies = converse(server.port("smtp"),
                       b"EHLO c\r\nMAIL FROM:<a@x.example> SIZE=" + b"9" * 5000 + b"\r\n"
                       b"MAIL FROM:<a@x.example> SIZE=" + b"9" * 21 + b"\r\n"
                       b"MAIL FROM:<a@x.example> SIZE=" + b"9" * 20 + b"\r\n"
                       b"MAIL FROM:<a@x.example> SIZE=1 SIZE=2\r\n"
                       b"MAIL FROM:<a@x.example> SIZE=\r\n"
                       b"MAIL FROM:<a@x.example> SIZE=+1\r\n"
                       b"MAIL FROM:<a@x.example> X_Y=1\r\n"
                       b"MAIL FROM:<a@x.example> SIZE=1000\r\n", 9)
    bad_size = b"501 5.5.4 Bad SIZE parameter (RFC 1870: 1 to 20 digits)"
    assert replies[1:] == [
        bad_size, bad_size, b"552 5.3.4 Message size exceeds fixed limit",
        b"501 5.5.4 Bad MAIL parameters: parameter SIZE given twice",
        b"501 5.5.4 Bad MAIL parameters: malformed parameter 'SIZE='", bad_size,
        b"501 5.5.4 Bad MAIL parameters: malformed parameter 'X_Y=1'",
        b"250 2.1.0 Ok"]
    assert failures == []


def test_pop3_numbers_are_ascii_digits_only(start_server, tmp_path, failures):
    """TOP 1 ² once gave an internal error: isdigit() is true for "²", int() refuses it."""
    server = start_server()
    smtp = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    smtp.sendmail("a@x.test", ["u@x.test"], b"Subject: s\r\n\r\nbody\r\n")
    smtp.quit()
    with socket.create_connection(("127.0.0.1", server.port("pop3")), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        lines = ["USER u@x.test", "PASS x", "TOP 1 \u00b2", "RETR \u00b2", "RETR \u0663",
                 "LIST 1_0", "DELE +1", "TOP 1 " + "9" * 400, "RETR " + "1" * 400,
                 "TOP 1 " + "9" * 20, "NOOP"]
        s.sendall("".join(l + "\r\n" for l in lines).encode("utf-8"))
        got = []
        while len(got) < len(lines):
            raw = f.readline()
            assert raw, f"connection closed after {got}"
            line = raw.rstrip(b"\r\n")
            if line.startswith((b"+OK", b"-ERR")):
                got.append(line)
                if line.startswith(b"+OK") and len(got) == 10:  # TOP: headers, blank, body
                    while f.readline() != b".\r\n":
                        pass
    assert got[2:] == [b"-ERR Syntax: TOP msg lines",
                       b"-ERR Syntax error: message number expected",
                       b"-ERR Syntax error: message number expected",
                       b"-ERR Syntax error: message number expected",
                       b"-ERR Syntax error: message number expected",
                       b"-ERR Syntax: TOP msg lines",
                       b"-ERR Syntax error: message number expected",
                       got[9], b"+OK"]
    assert got[9].startswith(b"+OK")
    assert failures == []
