"""
CHUNKING (RFC 3030) over real sockets: BDAT chunks of exact octet counts,
pipelined, with DATA's size limit, checks, faults and durable delivery.
"""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest
from twisted.logger import globalLogPublisher

from conftest import LineReader, converse, maildir_files
from tests.test_hostile import Failures
from tests.test_faults import faults
from twisted_mail_screen.faults.plan import END_OF_DATA

MESSAGE = b"Subject: chunked\r\n\r\nfirst line\r\n..not stuffed\r\n.\r\nlast\r\n"


@pytest.fixture
def failures():
    observer = Failures()
    globalLogPublisher.addObserver(observer)
    yield observer.events
    globalLogPublisher.removeObserver(observer)


def smtp(server, kind: str = "smtp") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port(kind), timeout=10)
    client.ehlo("client.example")
    return client


def bdat(client: smtplib.SMTP, data: bytes, last: bool = False) -> tuple[int, bytes]:
    """One BDAT command and its chunk in one write, as a chunking client sends it."""
    client.send(b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data)
    return client.getreply()


def stored(tmp_path, rcpt: str) -> bytes:
    [path] = maildir_files(tmp_path / "data", rcpt)
    return path.read_bytes()


def finals(port: int, data: bytes, replies: int) -> list[bytes]:
    return converse(port, data, replies, finals_only=True)


def test_ehlo_advertises_chunking_not_binarymime(start_server):
    """CHUNKING is offered; BINARYMIME is not (messages are stored and relayed as text)."""
    client = smtp(start_server())
    assert client.has_extn("chunking")
    assert not client.has_extn("binarymime")
    client.quit()


def test_chunks_make_one_message_stored_as_sent(start_server, tmp_path, failures):
    """Three chunks, cut mid-line and mid-CRLF, deliver one message, dots untouched, with Received."""
    server = start_server()
    client = smtp(server)
    assert client.mail("s@x.test")[0] == 250
    assert client.rcpt("p@x.test")[0] == 250
    cut1, cut2 = MESSAGE.index(b"line") , MESSAGE.index(b"\n..") 
    assert bdat(client, MESSAGE[:cut1]) == (250, b"2.0.0 %d octets received" % cut1)
    assert bdat(client, MESSAGE[cut1:cut2])[0] == 250
    code, text = bdat(client, MESSAGE[cut2:], last=True)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    assert client.noop()[0] == 250
    client.quit()
    text = stored(tmp_path, "p@x.test")
    assert text.startswith(b"Return-Path: <s@x.test>\nReceived: from client.example ([127.0.0.1])")
    assert text.endswith(b"Subject: chunked\n\nfirst line\n..not stuffed\n.\nlast\n")
    assert failures == []


def test_pipelined_chunks_and_transactions_answer_in_order(start_server, tmp_path):
    """Whole transactions with BDAT chunks in one write: every reply in order, every message stored."""
    server = start_server()
    batch = b"EHLO c\r\n"
    for i in range(3):
        body = b"Subject: %d\r\n\r\nmessage %d\r\n" % (i, i)
        batch += (b"MAIL FROM:<s@x.test>\r\nRCPT TO:<p@x.test>\r\nBDAT 5\r\n" + body[:5]
                  + b"BDAT %d LAST\r\n" % (len(body) - 5) + body[5:])
    batch += b"BDAT 0 LAST\r\nNOOP\r\nQUIT\r\n"
    lines = finals(server.port("smtp"), batch, 1 + 3 * 4 + 3)
    assert [l[:3] for l in lines] == [b"250"] + [b"250"] * 12 + [b"503", b"250", b"221"]
    bodies = sorted(p.read_bytes().split(b"\n\n", 1)[1] for p in maildir_files(tmp_path / "data", "p@x.test"))
    assert bodies == [b"message 0\n", b"message 1\n", b"message 2\n"]


def test_bdat_zero_last_ends_the_message(start_server, tmp_path):
    """BDAT 0 LAST after the chunks delivers; a message without a final CRLF gets one."""
    server = start_server()
    client = smtp(server)
    client.mail("s@x.test")
    client.rcpt("p@x.test")
    assert bdat(client, b"Subject: z\r\n\r\nno final newline")[0] == 250
    assert bdat(client, b"", last=True)[0] == 250
    client.quit()
    assert stored(tmp_path, "p@x.test").endswith(b"Subject: z\n\nno final newline\n")


def test_bdat_without_transaction_is_refused_and_its_chunk_consumed(start_server, tmp_path):
    """503 without MAIL, 554 without recipients: the chunk's octets are never read as commands."""
    server = start_server()
    evil = b"RSET\r\nQUIT\r\n"
    lines = finals(server.port("smtp"),
                   b"EHLO c\r\nBDAT %d\r\n%sMAIL FROM:<s@x.test>\r\nBDAT %d LAST\r\n%sNOOP\r\n"
                   % (len(evil), evil, len(evil), evil), 5)
    assert lines[1] == b"503 5.5.1 Need MAIL command"
    assert lines[2][:3] == b"250"
    assert lines[3] == b"554 5.5.1 No valid recipients"
    assert lines[4] == b"250 2.0.0 Ok"


def test_mixing_data_and_bdat_is_refused(start_server, tmp_path):
    """DATA after a BDAT chunk is 503; RSET forgets the chunks; a new transaction works."""
    server = start_server()
    client = smtp(server)
    client.mail("s@x.test")
    client.rcpt("p@x.test")
    assert bdat(client, b"Subject: part\r\n")[0] == 250
    assert client.docmd("DATA") == (503, b"5.5.1 DATA not allowed after BDAT in one transaction")
    assert client.rset()[0] == 250
    assert bdat(client, b"x\r\n", last=True)[0] == 503  # the transaction is gone
    client.mail("s@x.test")
    client.rcpt("p@x.test")
    assert bdat(client, b"Subject: whole\r\n\r\nbody\r\n", last=True)[0] == 250
    client.quit()
    assert stored(tmp_path, "p@x.test").endswith(b"Subject: whole\n\nbody\n")


def test_bdat_after_a_refused_data_needs_a_new_transaction(start_server, tmp_path):
    """A DATA refused at its end (552) ends the transaction: BDAT then gets 503, nothing stored."""
    server = start_server(smtp__max_message_size=1024)
    client = smtp(server)
    client.mail("s@x.test")
    client.rcpt("p@x.test")
    assert client.data(b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n")[0] == 552
    assert bdat(client, b"Subject: late\r\n\r\n", last=True)[0] == 503
    client.quit()
    assert maildir_files(tmp_path / "data", "p@x.test") == []


def test_size_limit_refuses_the_chunk_that_passes_it(start_server, tmp_path):
    """552 5.3.4 for the chunk over max_message_size, and for the chunks pipelined after it, all consumed."""
    server = start_server(smtp__max_message_size=2048)
    line = b"a" * 98 + b"\r\n"
    chunk = line * 15  # 1500 octets: the second chunk passes 2048
    batch = (b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<p@x.test>\r\n"
             + b"BDAT 1500\r\n" + chunk + b"BDAT 1500\r\n" + chunk + b"BDAT 1500 LAST\r\n" + chunk
             + b"NOOP\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<p@x.test>\r\nBDAT 13 LAST\r\nSubject: ok\r\n")
    lines = finals(server.port("smtp"), batch, 10)
    assert lines[3][:3] == b"250", lines
    assert lines[4] == lines[5] == b"552 5.3.4 Message size exceeds fixed limit"
    assert [l[:3] for l in lines[6:]] == [b"250"] * 4
    [path] = maildir_files(tmp_path / "data", "p@x.test")
    assert path.read_bytes().endswith(b"\nSubject: ok\n")


def test_long_line_and_bare_lf_are_refused_like_data(start_server, tmp_path):
    """A line over max_line_length (500 5.5.2), a bare LF (554 5.5.2): same answers as DATA, nothing stored."""
    server = start_server()
    client = smtp(server)
    client.mail("s@x.test")
    client.rcpt("p@x.test")
    assert bdat(client, b"Subject: long\r\n\r\n" + b"x" * 600)[0] == 250
    assert bdat(client, b"y" * 600 + b"\r\n", last=True) == (
        500, b"5.5.2 Line too long (RFC 5321 4.5.3.1.6)")
    client.mail("s@x.test")
    client.rcpt("p@x.test")
    assert bdat(client, b"Subject: bare\r\n\r\nsmuggled\n.\r\n", last=True) == (
        554, b"5.5.2 Bare CR or LF in message, see RFC 5321 2.3.8")
    client.mail("s@x.test")
    client.rcpt("p@x.test")
    assert bdat(client, b"Subject: cr\r\n\r\nsplit\r")[0] == 250  # CR, then its LF next chunk
    assert bdat(client, b"\n", last=True)[0] == 250
    client.quit()
    assert stored(tmp_path, "p@x.test").endswith(b"Subject: cr\n\nsplit\n")


def test_malformed_size_closes_the_session(start_server):
    """A size that cannot be read: 501 and the session closes (the chunk's end is unknown)."""
    server = start_server()
    lines = finals(server.port("smtp"), b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nBDAT 12x\r\nRSET\r\n", 4)
    assert lines[2].startswith(b"501 5.5.4 Syntax: BDAT chunk-size [LAST]")
    assert len(lines) == 3


def test_faults_answer_chunks_after_they_are_read(start_server, tmp_path):
    """A fault on BDAT or at END-OF-DATA replaces the answer, never the reading of the chunk."""
    server = start_server()
    faults(server).tempfail(END_OF_DATA)
    faults(server).reject(command="BDAT", match="5", reply="554 5.6.0 no chunk for you")
    client = smtp(server)
    client.mail("s@x.test")
    client.rcpt("p@x.test")
    assert bdat(client, b"NOOP\r") == (554, b"5.6.0 no chunk for you")
    assert bdat(client, b"Subject: x\r\n\r\n", last=True)[0] == 451
    assert client.noop()[0] == 250
    client.mail("s@x.test")
    client.rcpt("p@x.test")
    assert bdat(client, b"Subject: y\r\n\r\n", last=True)[0] == 250
    client.quit()
    assert stored(tmp_path, "p@x.test").endswith(b"Subject: y\n\n")


def test_submission_checks_apply_to_chunked_messages(start_server, accounts, tmp_path):
    """In site mode a chunked submission gets the same From: check as DATA."""
    server = start_server(site=True)
    client = smtp(server, "submission")
    client.login("alice@example.test", "alice-secret")
    client.mail("alice@example.test")
    client.rcpt("bob@example.test")
    code, text = bdat(client, b"From: bob@example.test\r\nSubject: x\r\n\r\nhi\r\n", last=True)
    assert code == 553 and b"not owned" in text
    client.mail("alice@example.test")
    client.rcpt("bob@example.test")
    assert bdat(client, b"From: alice@example.test\r\nSubject: x\r\n\r\nhi\r\n", last=True)[0] == 250
    client.quit()
    assert b"\nFrom: alice@example.test\n" in stored(tmp_path, "bob@example.test")


def test_chunks_over_starttls(start_server, tmp_path, certificate):
    """BDAT after STARTTLS; the Received header says ESMTPS."""
    cert, key = certificate
    server = start_server(tls__certificate=cert, tls__key=key)
    client = smtp(server)
    client.starttls(context=ssl._create_unverified_context())
    client.ehlo("client.example")
    assert client.has_extn("chunking")
    client.mail("s@x.test")
    client.rcpt("p@x.test")
    assert bdat(client, b"Subject: tls\r\n\r\n")[0] == 250
    assert bdat(client, b"secret\r\n", last=True)[0] == 250
    client.quit()
    text = stored(tmp_path, "p@x.test")
    assert b"with ESMTPS" in text and text.endswith(b"Subject: tls\n\nsecret\n")


def test_large_chunked_message_bounded_and_intact(start_server, tmp_path):
    """A 3 MB message in 64 KiB chunks, sent as fast as the socket takes it: stored intact."""
    server = start_server()
    body = b"Subject: big\r\n\r\n" + (b"0123456789" * 9 + b"abcdefg\r\n") * 30000
    with socket.create_connection(("127.0.0.1", server.port("smtp")), timeout=20) as s:
        r = LineReader()
        r.sock = s
        r.line()
        s.sendall(b"EHLO c\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<p@x.test>\r\n")
        step = 65536
        pieces = [body[i:i + step] for i in range(0, len(body), step)]
        for n, piece in enumerate(pieces):
            last = b" LAST" if n == len(pieces) - 1 else b""
            s.sendall(b"BDAT %d%s\r\n" % (len(piece), last) + piece)
        replies = []
        while len(replies) < 3 + len(pieces):
            line = r.line()
            if line[3:4] == b" ":
                replies.append(line)
    assert all(l[:3] == b"250" for l in replies), replies[-3:]
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued")
    assert stored(tmp_path, "p@x.test").endswith(body.replace(b"\r\n", b"\n"))


def test_a_25_mb_chunk_holds_the_reactor_briefly(start_server, accounts, tmp_path):
    """One 25 MB BDAT LAST chunk: checked as it arrives, its stored form made off the reactor."""
    from tests.test_reactor_budget import ALICE, check, measured

    server = start_server(site=True, kinds=("smtp", "pop3", "imap"),
                          smtp__max_message_size=30 * 1024 * 1024)
    body = b"Subject: big\r\n\r\n" + (b".x" + b"y" * 74 + b"\r\n") * (25 * 1024 * 1024 // 78)

    def send() -> tuple[int, bytes]:
        client = smtp(server)
        client.mail("a@x.example")
        client.rcpt(ALICE[0])
        reply = bdat(client, body, last=True)
        client.quit()
        return reply

    worst, reply = measured(server.port("imap"), send)
    assert reply[0] == 250
    [stored] = maildir_files(tmp_path / "data", ALICE[0])
    assert stored.read_bytes().endswith(body.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
    check(worst, "SMTP BDAT, 25 MB")
