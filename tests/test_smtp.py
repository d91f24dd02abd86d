"""SMTP over real sockets with smtplib (and a raw socket for pipelining)."""

from __future__ import annotations

import base64
import os
import smtplib
import ssl

import pytest
from twisted.internet.task import Clock

from conftest import converse, maildir_files


def smtp(server, kind: str = "smtp") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port(kind), timeout=10)
    client.ehlo("client.example")
    return client


def test_ehlo_advertises_extensions(start_server):
    """EHLO lists PIPELINING, SIZE with the limit, 8BITMIME, ENHANCEDSTATUSCODES, AUTH on loopback."""
    server = start_server(smtp__max_message_size=1_000_000)
    client = smtp(server)
    for ext in ("pipelining", "8bitmime", "enhancedstatuscodes", "auth"):
        assert client.has_extn(ext)
    assert client.esmtp_features["size"] == "1000000"
    assert not client.has_extn("starttls")
    client.quit()


def test_test_host_accepts_any_recipient_and_delivers(start_server, tmp_path):
    """In test-host mode every address gets its own mailbox, with Return-Path and Received."""
    server = start_server()
    client = smtp(server)
    refused = client.sendmail("dev@app.test", ["one@anywhere.example", "two@else.example"],
                              b"Subject: hello\r\n\r\nbody\r\n")
    assert refused == {}
    client.quit()
    for rcpt in ("one@anywhere.example", "two@else.example"):
        [path] = maildir_files(tmp_path / "data", rcpt)
        text = path.read_bytes()
        assert text.startswith(b"Return-Path: <dev@app.test>\nReceived: from client.example ([127.0.0.1])")
        assert text.endswith(b"Subject: hello\n\nbody\n")


def test_pipelining_replies_in_order(start_server, tmp_path):
    """A whole pipelined transaction in one write gets its replies in order, deliveries included."""
    server = start_server()
    batch = b"EHLO c\r\n"
    for i in range(3):
        batch += (b"MAIL FROM:<s@x.test>\r\nRCPT TO:<p@x.test>\r\nRCPT TO:<q@x.test>\r\nDATA\r\n"
                  b"Subject: %d\r\n\r\nmessage %d\r\n.\r\n" % (i, i))
    batch += b"NOOP\r\nQUIT\r\n"
    lines = converse(server.port("smtp"), batch, 1 + 3 * 5 + 2)
    codes = [l[:3] for l in lines if l[3:4] == b" "]
    assert codes == [b"250"] + [b"250", b"250", b"250", b"354", b"250"] * 3 + [b"250", b"221"]
    assert len(maildir_files(tmp_path / "data", "p@x.test")) == 3


def test_every_reply_has_an_enhanced_status_code(start_server):
    """Apart from the greeting and EHLO, each reply carries an RFC 3463 code."""
    server = start_server()
    lines = converse(server.port("smtp"),
                     b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@b.test>\r\nRSET\r\nNOOP\r\n"
                     b"VRFY x\r\nBOGUS\r\nDATA\r\nQUIT\r\n", 9)
    finals = [l for l in lines if l[3:4] == b" "][1:]
    for line in finals:
        code, status = line.split(b" ")[:2]
        assert status[:1] == code[:1] and status.count(b".") == 2, line


def test_eight_bit_and_ten_megabyte_attachment_round_trip_over_pop3(start_server):
    """8-bit text and a 10 MB attachment come back byte-identical over POP3."""
    import poplib
    server = start_server()
    body = ("Subject: gr\u00fc\u00dfe\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\nSch\u00f6ne Gr\u00fc\u00dfe\r\n").encode()
    b64 = base64.encodebytes(os.urandom(10 * 1024 * 1024 * 3 // 4)).replace(b"\n", b"\r\n")
    big = (b"Subject: big\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + b64)
    client = smtp(server)
    client.sendmail("a@x.test", ["r@x.test"], body, mail_options=["BODY=8BITMIME"])
    client.sendmail("a@x.test", ["r@x.test"], big)
    client.quit()
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    pop.user("r@x.test")
    pop.pass_("anything")
    for n, sent in ((1, body), (2, big)):
        _, lines, _ = pop.retr(n)
        got = b"\r\n".join(lines) + b"\r\n"
        assert got.endswith(sent)
    pop.quit()


def test_null_sender_is_accepted(start_server, tmp_path):
    """MAIL FROM:<> (bounces) is accepted."""
    server = start_server()
    client = smtp(server)
    assert client.sendmail("", ["r@x.test"], b"Subject: bounce\r\n\r\nx\r\n") == {}
    client.quit()
    [path] = maildir_files(tmp_path / "data", "r@x.test")
    assert path.read_bytes().startswith(b"Return-Path: <>\n")


def test_site_refuses_unknown_user_and_relay(start_server, accounts):
    """Site mode: unknown local user 550 5.1.1 at RCPT, a foreign domain 554 5.7.1."""
    server = start_server(site=True)
    client = smtp(server)
    client.mail("someone@outside.example")
    assert client.rcpt("nobody@example.test") == (550, b"5.1.1 <nobody@example.test>: Recipient address rejected: User unknown")
    code, text = client.rcpt("victim@elsewhere.example")
    assert (code, text[:5]) == (554, b"5.7.1")
    assert client.rcpt("alice@example.test")[0] == 250
    client.quit()


@pytest.mark.parametrize("trick", [
    "alice%elsewhere.example@example.test",
    "@example.test:victim@elsewhere.example",
    '"victim@elsewhere.example"@example.test',
    "victim!elsewhere.example@example.test",
    "victim@elsewhere.example.",
])
def test_relay_tricks_are_refused(start_server, accounts, trick):
    """Classic relay tricks never reach a foreign domain unauthenticated."""
    server = start_server(site=True)
    client = smtp(server)
    client.mail("x@outside.example")
    code, _ = client.rcpt(trick)
    assert code in (501, 550, 554)
    client.quit()


def test_aliases_catch_all_and_postmaster(start_server, accounts, tmp_path):
    """Aliases, a per-domain catch-all and postmaster (with or without domain) are delivered."""
    accounts.set_alias("sales@example.test", ["alice@example.test", "bob@example.test"])
    server = start_server(site=True)
    client = smtp(server)
    assert client.sendmail("x@outside.example", ["sales@example.test"], b"Subject: 1\r\n\r\n1\r\n") == {}
    client.mail("x@outside.example")
    assert client.rcpt("Postmaster")[0] == 250
    assert client.rcpt("postmaster@example.test")[0] == 250
    client.data(b"Subject: 2\r\n\r\n2\r\n")
    client.mail("x@outside.example")
    assert client.rcpt("random@example.test")[0] == 550
    client.rset()
    accounts.set_alias("@example.test", ["bob@example.test"])
    assert client.sendmail("x@outside.example", ["random@example.test"], b"Subject: 3\r\n\r\n3\r\n") == {}
    client.quit()
    data = tmp_path / "data"
    assert len(maildir_files(data, "alice@example.test")) == 1
    assert len(maildir_files(data, "bob@example.test")) == 2
    [pm] = maildir_files(data, "postmaster@example.test")
    assert b"Subject: 2" in pm.read_bytes()


def test_size_limit_on_parameter_and_on_data(start_server, tmp_path):
    """SIZE= over the limit gets 552 at MAIL; an oversized body gets 552 after DATA."""
    server = start_server(smtp__max_message_size=10_000)
    client = smtp(server)
    assert client.mail("a@x.test", ["SIZE=20000"])[0] == 552
    client.mail("a@x.test")
    client.rcpt("r@x.test")
    code, text = client.data(b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n" * 20 + (b"y" * 500 + b"\r\n") * 30)
    assert (code, text[:5]) == (552, b"5.3.4")
    assert client.noop()[0] == 250
    client.quit()
    assert maildir_files(tmp_path / "data", "r@x.test") == []


def test_line_too_long_in_data_and_in_commands(start_server, tmp_path):
    """Text lines over 1000 octets get 500 5.5.2 after DATA; overlong commands too."""
    server = start_server()
    client = smtp(server)
    client.mail("a@x.test")
    client.rcpt("r@x.test")
    assert client.data(b"Subject: x\r\n\r\n" + b"z" * 1200 + b"\r\n")[0] == 500
    assert client.docmd("NOOP " + "a" * 20000)[0] == 500
    assert client.noop()[0] == 250
    client.quit()
    assert maildir_files(tmp_path / "data", "r@x.test") == []


def test_exactly_1000_octet_line_is_accepted(start_server, tmp_path):
    """A 998-character line (1000 with CRLF) is the RFC 5321 maximum and is accepted."""
    server = start_server()
    client = smtp(server)
    assert client.sendmail("a@x.test", ["r@x.test"], b"Subject: x\r\n\r\n" + b"z" * 998 + b"\r\n") == {}
    client.quit()


def test_too_many_recipients(start_server):
    """The recipient after max_recipients gets 452 4.5.3."""
    server = start_server(smtp__max_recipients=3)
    client = smtp(server)
    client.mail("a@x.test")
    for i in range(3):
        assert client.rcpt(f"r{i}@x.test")[0] == 250
    assert client.rcpt("r9@x.test")[:1] == (452,)
    client.quit()


def test_command_limit_closes_with_421(start_server):
    """After max_commands commands without a delivery the session is closed with 421."""
    server = start_server(smtp__max_commands=10)
    lines = converse(server.port("smtp"), b"NOOP\r\n" * 12, 11)
    assert lines[9].startswith(b"250")
    assert lines[10].startswith(b"421 4.7.0")


def test_idle_timeout_uses_the_injected_clock(start_server):
    """An idle session is closed with 421 4.4.2 when the clock passes idle_timeout."""
    clock = Clock()
    server = start_server(clock=clock, smtp__idle_timeout=60)
    client = smtp(server)
    server.advance(59)
    assert client.noop()[0] == 250
    server.advance(61)
    assert client.getreply()[0] == 421


def test_dot_stuffing_and_no_smuggling(start_server, tmp_path):
    """
    Leading dots are unstuffed; a bare-LF dot line does not end the message
    (the smuggled MAIL is never a command): the whole message is refused
    for its bare LFs, and the session goes on in step.
    """
    server = start_server()
    lines = converse(server.port("smtp"),
                     b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n"
                     b"Subject: s\r\n\r\n..leading\r\nmid\n.\nMAIL FROM:<evil@x.test>\r\n.\r\nQUIT\r\n", 6)
    assert lines[-2] == b"554 5.5.2 Bare CR or LF in message, see RFC 5321 2.3.8"
    assert lines[-1].startswith(b"221")
    assert maildir_files(tmp_path / "data", "r@x.test") == []
    lines = converse(server.port("smtp"),
                     b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@x.test>\r\nDATA\r\n"
                     b"Subject: s\r\n\r\n..leading\r\n.\r\nQUIT\r\n", 6)
    assert lines[-2].startswith(b"250 2.0.0") and lines[-1].startswith(b"221")
    [path] = maildir_files(tmp_path / "data", "r@x.test")
    assert path.read_bytes().endswith(b"\n\n.leading\n")


def test_storage_failure_gives_451_and_delivers_to_no_one(start_server, tmp_path):
    """If one recipient's Maildir cannot be written, 451 4.3.0 and nobody gets a copy."""
    server = start_server()
    (tmp_path / "data" / "mail").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "mail" / "broken.test").write_text("not a directory")
    client = smtp(server)
    client.mail("a@x.test")
    client.rcpt("fine@ok.test")
    client.rcpt("r@broken.test")
    code, text = client.data(b"Subject: s\r\n\r\nx\r\n")
    assert (code, text[:5]) == (451, b"4.3.0")
    assert client.noop()[0] == 250
    client.quit()
    assert maildir_files(tmp_path / "data", "fine@ok.test") == []


def test_auth_plain_and_login_in_site_mode(start_server, accounts):
    """AUTH PLAIN and LOGIN succeed with the right password, 535 5.7.8 with a wrong one."""
    server = start_server(site=True)
    client = smtp(server)
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        client.login("alice@example.test", "wrong")
    assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")
    client.login("alice@example.test", "alice-secret")
    client.quit()
    client = smtp(server)
    client.user, client.password = "bob@example.test", "bob-secret"
    assert client.auth("LOGIN", client.auth_login)[0] == 235
    client.quit()


def test_bad_base64_gets_501(start_server):
    """An AUTH response that is not base64 gets 501, not a crash."""
    server = start_server()
    lines = converse(server.port("smtp"), b"EHLO c\r\nAUTH PLAIN !!!notbase64\r\nNOOP\r\n", 3)
    assert lines[-2].startswith(b"501") and lines[-1].startswith(b"250")


def test_auth_plain_cancel_and_decoding_errors(start_server, accounts):
    """
    AUTH PLAIN (protocols/session.sasl_plain): '*' cancels (501 5.7.0), with
    spaces around it too; a response that is not three NUL-separated
    fields, not UTF-8, or names another authorization identity gets 501
    5.5.2 naming the problem; a padded valid response logs in.
    """
    import base64
    server = start_server(site=True)

    def b64(raw: bytes) -> bytes:
        return base64.b64encode(raw)

    lines = converse(server.port("smtp"), b"EHLO c\r\nAUTH PLAIN\r\n *  \r\n"
                     b"AUTH PLAIN " + b64(b"alice@example.test\0alice-secret") + b"\r\n"
                     b"AUTH PLAIN " + b64(b"\0\xff\0x") + b"\r\n"
                     b"AUTH PLAIN " + b64(b"bob@example.test\0alice@example.test\0alice-secret") + b"\r\n"
                     b"AUTH PLAIN\r\n  " + b64(b"\0alice@example.test\0alice-secret") + b"  \r\n", 8)
    assert [l for l in lines if not l.startswith(b"250")] == [b"334 ", b"501 5.7.0 Authentication cancelled",
                         b"501 5.5.2 Cannot decode response: PLAIN response must have three "
                         b"NUL-separated fields",
                         b"501 5.5.2 Cannot decode response: PLAIN response is not UTF-8",
                         b"501 5.5.2 Cannot decode response: authorization identity differs "
                         b"from the username",
                         b"334 ", b"235 2.7.0 Authentication successful"]


def test_auth_refused_before_tls_unless_configured(start_server, accounts, certificate):
    """With plaintext_auth = 'never', AUTH is not offered and refused (538) until STARTTLS."""
    cert, key = certificate
    server = start_server(site=True, plaintext_auth="never", tls__certificate=cert, tls__key=key)
    client = smtp(server)
    assert not client.has_extn("auth") and client.has_extn("starttls")
    assert client.docmd("AUTH PLAIN", base64.b64encode(b"\0alice@example.test\0alice-secret").decode())[0] == 538
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo("client.example")
    assert client.has_extn("auth") and not client.has_extn("starttls")
    client.login("alice@example.test", "alice-secret")
    client.quit()


def test_submission_requires_auth(start_server, accounts, tmp_path):
    """On the submission listener MAIL before AUTH gets 530 5.7.0."""
    server = start_server(site=True)
    client = smtp(server, "submission")
    assert client.mail("alice@example.test")[0] == 530
    client.login("alice@example.test", "alice-secret")
    assert client.sendmail("alice@example.test", ["bob@example.test"], b"Subject: s\r\n\r\nx\r\n") == {}
    client.quit()
    assert len(maildir_files(tmp_path / "data", "bob@example.test")) == 1


def test_garbage_and_unknown_commands(start_server):
    """Unknown verbs get 500 5.5.1, non-ASCII 500 5.5.2; the session survives."""
    server = start_server()
    lines = converse(server.port("smtp"), b"FOO\r\n\xff\xfe\r\n\r\nEXPN staff\r\nNOOP\r\n", 5)
    assert lines[0].startswith(b"500 5.5.1") and lines[1].startswith(b"500 5.5.2")
    assert lines[-2].startswith(b"502 5.5.1")  # EXPN never discloses a list
    assert lines[-1].startswith(b"250")
