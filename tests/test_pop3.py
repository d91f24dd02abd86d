"""POP3 over real sockets with poplib, on mail delivered by SMTP."""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl

import pytest

from conftest import maildir_files


def deliver(server, rcpt: str, *bodies: bytes) -> None:
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    for body in bodies:
        client.sendmail("sender@x.test", [rcpt], body)
    client.quit()


def login(server, user: str = "u@x.test", password: str = "any") -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    pop.user(user)
    pop.pass_(password)
    return pop


def login_when_unlocked(server) -> poplib.POP3:
    """Log in once the server has noticed a dropped session and released its lock."""
    import time
    deadline = time.monotonic() + 5
    while True:
        try:
            return login(server)
        except poplib.error_proto as e:
            if b"IN-USE" not in e.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_retrieve_is_byte_identical(start_server):
    """RETR returns exactly what SMTP accepted (after our two trace headers), dots included."""
    server = start_server()
    sent = b"Subject: t\r\n\r\n.starts with a dot\r\n\r\n..two\r\nend\r\n"
    deliver(server, "u@x.test", sent)
    pop = login(server)
    _, lines, octets = pop.retr(1)
    got = b"\r\n".join(lines) + b"\r\n"
    assert got.endswith(sent)
    assert pop.list()[1] == [b"1 %d" % pop.stat()[1]]
    pop.quit()


def test_list_sizes_match_retrieved_octets(start_server):
    """LIST reports the size with CRLF line endings, as RFC 1939 requires."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: a\r\n\r\n" + b"line\r\n" * 100)
    pop = login(server)
    size = int(pop.list(1).split()[2])
    _, lines, _ = pop.retr(1)
    assert size == sum(len(l) + 2 for l in lines)
    pop.quit()


def test_dele_then_dropped_connection_deletes_nothing(start_server, tmp_path):
    """DELE marks only; a connection that drops without QUIT deletes nothing."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: 1\r\n\r\n1\r\n", b"Subject: 2\r\n\r\n2\r\n")
    pop = login(server)
    pop.dele(1)
    assert pop.stat()[0] == 1
    pop.file.close()
    pop.sock.close()
    pop = login_when_unlocked(server)
    assert pop.stat()[0] == 2
    pop.quit()
    assert len(maildir_files(tmp_path / "data", "u@x.test")) == 2


def test_dele_then_quit_deletes(start_server, tmp_path):
    """DELE then QUIT removes the message files in the UPDATE state."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: 1\r\n\r\n1\r\n", b"Subject: 2\r\n\r\n2\r\n")
    pop = login(server)
    pop.dele(1)
    assert pop.quit().startswith(b"+OK")
    [left] = maildir_files(tmp_path / "data", "u@x.test")
    assert b"Subject: 2" in left.read_bytes()


def test_rset_undeletes(start_server):
    """RSET clears the deletion marks."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: 1\r\n\r\n1\r\n")
    pop = login(server)
    pop.dele(1)
    pop.rset()
    pop.quit()
    assert login(server).stat()[0] == 1


def test_uidl_is_stable_across_sessions_and_restarts(start_server):
    """UIDLs do not change between sessions, after another message is deleted, or after a restart."""
    server = start_server()
    deliver(server, "u@x.test", *(b"Subject: %d\r\n\r\nx\r\n" % i for i in range(3)))
    pop = login(server)
    first = pop.uidl()[1]
    pop.dele(1)
    pop.quit()
    pop = login(server)
    second = pop.uidl()[1]
    pop.quit()
    assert [l.split()[1] for l in second] == [l.split()[1] for l in first[1:]]
    server.stop()
    server = start_server()
    pop = login(server)
    assert [l.split()[1] for l in pop.uidl()[1]] == [l.split()[1] for l in second]
    pop.quit()


def test_second_session_gets_in_use(start_server):
    """Only one POP3 session per mailbox: the second gets -ERR [IN-USE]."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: 1\r\n\r\n1\r\n")
    first = login(server)
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        login(server)
    first.quit()
    login(server).quit()


def test_top_returns_headers_and_n_lines(start_server):
    """TOP msg n gives the header, the blank line and n body lines."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: t\r\n\r\nl1\r\nl2\r\nl3\r\n")
    pop = login(server)
    _, lines, _ = pop.top(1, 2)
    assert lines[-3:] == [b"", b"l1", b"l2"]
    pop.quit()


def test_capa_and_auth_plain(start_server, accounts):
    """CAPA lists UIDL, TOP, USER, SASL PLAIN, PIPELINING; AUTH PLAIN logs in; bad passwords fail."""
    server = start_server(site=True)
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    caps = pop.capa()
    for cap in ("UIDL", "TOP", "USER", "PIPELINING"):
        assert cap in caps
    assert caps["SASL"] == ["PLAIN"]
    import base64
    pop._putcmd("AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0alice-secret").decode())
    assert pop._getresp().startswith(b"+OK")
    pop.quit()
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    pop.user("alice@example.test")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop.pass_("wrong")
    pop.quit()


def test_stls_with_certificate(start_server, accounts, certificate):
    """With a certificate, CAPA offers STLS; plaintext login is refused until STLS."""
    cert, key = certificate
    server = start_server(site=True, plaintext_auth="never", tls__certificate=cert, tls__key=key)
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    caps = pop.capa()
    assert "STLS" in caps and "USER" not in caps
    with pytest.raises(poplib.error_proto):
        pop.user("alice@example.test")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    pop.stls(context)
    pop.user("alice@example.test")
    pop.pass_("alice-secret")
    pop.quit()


def test_bad_input_gets_err(start_server):
    """Unknown commands, bad numbers and overlong lines get -ERR; the session survives."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: 1\r\n\r\n1\r\n")
    with socket.create_connection(("127.0.0.1", server.port("pop3")), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"XYZZY\r\nUSER u@x.test\r\nPASS p\r\nRETR 99\r\nRETR abc\r\n" + b"A" * 5000 + b"\r\nSTAT\r\n")
        replies = [f.readline() for _ in range(7)]
    assert replies[0].startswith(b"-ERR")
    assert replies[2].startswith(b"+OK")
    assert all(r.startswith(b"-ERR") for r in replies[3:6])
    assert replies[6].startswith(b"+OK 1 ")
