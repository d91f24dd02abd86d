"""
Screening over real sockets: per-protocol refusals, session close, freeze,
notifications, the control channel and restarts. Time is a Clock.
"""

from __future__ import annotations

import poplib
import smtplib
import socket
import subprocess
import sys

import pytest
from twisted.internet.task import Clock

from conftest import maildir_files


def wait_for(predicate, seconds: float = 10.0):
    """Poll for a result produced by a worker thread (a delivery), not for a time window."""
    import time
    deadline = time.monotonic() + seconds
    while not (result := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return result


def refused_reply(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1024)
            if not chunk:
                break
            data += chunk
        return data


def site(start_server, **overrides):
    """
    Site mode with loopback not whitelisted, time on a Clock. The Clock
    starts at the real time: the Maildir tmp/ cleaner compares the clock
    with file modification times, and a clock far ahead of them would
    delete a notice being delivered (36 hours "stale").
    """
    import time
    clock = Clock()
    clock.advance(time.time() // 1)
    kinds = ("smtp", "submission", "pop3", "imap")
    return start_server(site=True, clock=clock, kinds=kinds, **overrides), clock


def test_blocked_client_is_refused_by_every_protocol(start_server, accounts):
    """A blocked address gets SMTP 421 4.7.0, POP3 -ERR [SYS/TEMP] and is closed; unblock serves it again."""
    server, _ = site(start_server)
    server.service.screening.admin.block("127.0.0.1", 30, "test")
    for kind in ("smtp", "submission"):
        reply = refused_reply(server.port(kind))
        assert reply.startswith(b"421 4.7.0 mail.example.test") and b"blocked" in reply
    assert refused_reply(server.port("pop3")).startswith(b"-ERR [SYS/TEMP]")
    assert refused_reply(server.port("imap")).startswith(b"* BYE [UNAVAILABLE]")
    server.service.screening.admin.unblock("127.0.0.1")
    assert refused_reply(server.port("smtp")).startswith(b"220 ")


def test_blocked_client_is_refused_over_implicit_tls(start_server, accounts, certificate):
    """
    On ssl: listeners the refusal comes after the handshake, encrypted, with
    each protocol's own reply, and the server then closes the TLS connection.
    """
    import ssl
    cert, key = certificate
    implicit = "ssl:0:interface=127.0.0.1"  # the certificate and key come from [tls]
    server, _ = site(start_server, tls__certificate=cert, tls__key=key,
                     **{f"listen__{kind}": [implicit] for kind in ("smtp", "submission", "pop3", "imap")})
    server.service.screening.admin.block("127.0.0.1", 30, "test")
    context = ssl.create_default_context(cafile=cert)
    expected = {"smtp": b"421 4.7.0 mail.example.test", "submission": b"421 4.7.0 mail.example.test",
                "pop3": b"-ERR [SYS/TEMP]", "imap": b"* BYE [UNAVAILABLE]"}
    for kind, start in expected.items():
        with socket.create_connection(("127.0.0.1", server.port(kind)), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as s:
            data = b""
            while chunk := s.recv(1024):  # to the server's close: a hang fails on the timeout
                data += chunk
        assert data.startswith(start) and data.endswith(b"\r\n"), (kind, data)


def test_auth_failures_block_at_n_and_expire(start_server, accounts):
    """N-1 failed logins: still served; N: blocked; after block_minutes: served again."""
    server, clock = site(start_server, screening__max_auth_failures=3, screening__block_minutes=10)
    for password in ("w1", "w2"):
        client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("alice@example.test", password)
        client.quit()
    assert refused_reply(server.port("smtp")).startswith(b"220")
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    pop.user("alice@example.test")
    with pytest.raises(poplib.error_proto):
        pop.pass_("w3")
    pop.close()
    assert refused_reply(server.port("smtp")).startswith(b"421 4.7.0")
    assert refused_reply(server.port("pop3")).startswith(b"-ERR [SYS/TEMP]")
    server.advance(10 * 60 + 1)
    assert refused_reply(server.port("smtp")).startswith(b"220")


def test_repeated_same_password_counts_once(start_server, accounts):
    """A client retrying one stale password is not blocked for it."""
    server, _ = site(start_server, screening__max_auth_failures=3)
    for _ in range(5):
        client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("alice@example.test", "old-password")
        client.quit()
    assert refused_reply(server.port("smtp")).startswith(b"220")


def test_failed_rcpts_close_the_smtp_session_with_421(start_server, accounts):
    """The Nth unknown recipient gets its 550, then 421 4.7.0 and the session closes."""
    server, _ = site(start_server, screening__max_failed_rcpts=3)
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    client.ehlo("x")
    client.mail("a@outside.example")
    assert client.rcpt("n1@example.test")[0] == 550
    client.rset()
    assert client.rcpt("n2@example.test")[0] == 503  # RSET does not reset the count
    client.mail("a@outside.example")
    assert client.rcpt("n2@example.test")[0] == 550
    assert client.rcpt("n3@example.test")[0] == 550
    assert client.getreply()[0] == 421
    assert refused_reply(server.port("smtp")).startswith(b"421 4.7.0")


def test_rsets_block_and_authenticated_sessions_are_exempt(start_server, accounts):
    """max_rsets blocks an unauthenticated session; after AUTH the same RSETs block nothing."""
    server, _ = site(start_server, screening__max_rsets=3)
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    client.login("alice@example.test", "alice-secret")
    for _ in range(5):
        assert client.rset()[0] == 250
    client.quit()
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    client.rset()
    client.rset()
    assert client.docmd("RSET")[0] == 250
    assert client.getreply()[0] == 421
    assert refused_reply(server.port("smtp")).startswith(b"421 4.7.0")


def test_whitelisted_client_is_never_blocked(start_server, accounts):
    """A whitelisted address goes over every limit and is still served; it wins over the block list."""
    server, _ = site(start_server, screening__max_connections=2, screening__whitelist=["127.0.0.0/8"])
    server.service.screening.admin.block("127.0.0.1", 30, "test")
    for _ in range(5):
        assert refused_reply(server.port("smtp")).startswith(b"220")


def test_connection_rate_limit(start_server, accounts):
    """max_connections in the window: the one over is refused; the window slides on the clock."""
    server, _ = site(start_server, screening__max_connections=3, screening__connection_window_minutes=1,
                     screening__block_minutes=1)
    for _ in range(3):
        assert refused_reply(server.port("pop3")).startswith(b"+OK")
    assert refused_reply(server.port("smtp")).startswith(b"421")
    server.advance(61)
    assert refused_reply(server.port("smtp")).startswith(b"220")


def test_frozen_account_receives_and_reads_but_cannot_send(start_server, accounts, tmp_path):
    """A frozen account: 535 5.7.8 even with the right password; mail still arrives and POP3 works."""
    server, _ = site(start_server)
    server.service.screening.freeze_store.freeze("alice@example.test", None, "test")
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        client.login("alice@example.test", "alice-secret")
    assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")
    client.sendmail("x@outside.example", ["alice@example.test"], b"Subject: still\r\n\r\nhere\r\n")
    client.quit()
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    pop.user("alice@example.test")
    pop.pass_("alice-secret")
    assert pop.stat()[0] == 1
    pop.quit()
    assert server.service.screening.admin.thaw("alice@example.test")
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    client.login("alice@example.test", "alice-secret")
    client.quit()


def test_session_auth_limit_freezes_and_notifies(start_server, accounts, tmp_path):
    """session_auth: F failures in one session close it, freeze the account and tell the postmaster."""
    server, _ = site(start_server, screening__session_auth__max_failures=2,
                     screening__session_auth__freeze_account=True,
                     screening__session_auth__notify_postmaster=True)
    with socket.create_connection(("127.0.0.1", server.port("pop3")), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"USER alice@example.test\r\nPASS a\r\nUSER alice@example.test\r\nPASS b\r\n")
        replies = [f.readline() for _ in range(4)]
        assert replies[3].startswith(b"-ERR [AUTH]")
        assert f.readline() == b""  # closed
    assert server.service.screening.freeze_store.is_frozen("alice@example.test")
    server.advance(1)
    notes = wait_for(lambda: maildir_files(tmp_path / "data", "postmaster@example.test"))
    assert notes, "the postmaster got no notification"
    text = notes[-1].read_bytes()
    assert b"Auto-Submitted: auto-generated" in text
    assert b"alice@example.test" in text and b"mailscreen frozen thaw" in text


def test_block_notification_reaches_the_postmaster(start_server, accounts, tmp_path):
    """An automatic block sends the postmaster a message naming the address, rule and the lifting command."""
    server, _ = site(start_server, screening__max_failed_rcpts=1)
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    client.ehlo("x")
    client.mail("a@outside.example")
    client.rcpt("nobody@example.test")
    server.advance(1)
    [note] = wait_for(lambda: maildir_files(tmp_path / "data", "postmaster@example.test"))
    text = note.read_bytes()
    assert b"127.0.0.1" in text and b"mailscreen block remove 127.0.0.1" in text


def test_restart_keeps_blocks_and_frozen_accounts(start_server, accounts, tmp_path):
    """Blocks and freezes survive a restart with the same expiry."""
    server, clock = site(start_server)
    server.service.screening.admin.block("127.0.0.1", 30, "test")
    server.service.screening.freeze_store.freeze("bob@example.test", 60, "test")
    before = server.service.screening.admin.blocks()
    server.stop()
    server, _ = site(start_server)
    assert server.service.screening.admin.blocks() == before
    assert refused_reply(server.port("smtp")).startswith(b"421")
    assert server.service.screening.freeze_store.is_frozen("bob@example.test")


def mailscreen(data_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twisted_mail_screen.admin.cli", "--data-dir", str(data_dir),
                           *args], capture_output=True, text=True, timeout=60)


def test_cli_controls_a_running_server(start_server, accounts, tmp_path):
    """mailscreen block/whitelist/frozen act on the running server at once."""
    server, _ = site(start_server)
    data = tmp_path / "data"
    result = mailscreen(data, "block", "add", "127.0.0.1", "--minutes", "45", "--reason", "cli test")
    assert result.returncode == 0, result.stderr
    assert refused_reply(server.port("smtp")).startswith(b"421")
    listing = mailscreen(data, "block", "list").stdout
    assert "127.0.0.1" in listing and "45 min left" in listing
    assert mailscreen(data, "block", "remove", "127.0.0.1").returncode == 0
    assert refused_reply(server.port("smtp")).startswith(b"220")
    assert mailscreen(data, "whitelist", "add", "192.168.*.*").returncode == 0
    assert "192.168.*.*" in mailscreen(data, "whitelist", "list").stdout
    assert mailscreen(data, "frozen", "freeze", "bob@example.test").returncode == 0
    assert "bob@example.test" in mailscreen(data, "frozen", "list").stdout
    assert mailscreen(data, "frozen", "thaw", "bob@example.test").returncode == 0
    bad = mailscreen(data, "block", "remove", "10.9.9.9")
    assert bad.returncode == 1 and "not blocked" in bad.stderr


def test_cli_without_a_server_says_so(tmp_path):
    """With no server running, the control commands explain what to do."""
    result = mailscreen(tmp_path, "block", "list")
    assert result.returncode == 1 and "no server is running" in result.stderr


def test_hand_edit_of_block_file_takes_effect(start_server, accounts, tmp_path):
    """A line added to blocklist.txt with +MINUTES is picked up by the running server within a second."""
    server, _ = site(start_server)
    with open(tmp_path / "data" / "blocklist.txt", "a") as f:
        f.write("127.0.0.1 +5 # added by hand\n")
    server.advance(1)
    assert refused_reply(server.port("smtp")).startswith(b"421")
    # the rewrite with an absolute expiry lands from the worker pool
    assert wait_for(lambda: "+5" not in (tmp_path / "data" / "blocklist.txt").read_text())


def test_imap_login_failures_count_with_the_others(start_server, accounts):
    """Failed IMAP LOGINs count toward the same per-address limit; the block then refuses IMAP with BYE."""
    import imaplib
    server, _ = site(start_server, screening__max_auth_failures=2, plaintext_auth="always")
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        client.login("alice@example.test", "nope-1")
    client.quit()
    imap = imaplib.IMAP4("127.0.0.1", server.port("imap"), timeout=10)
    with pytest.raises(imaplib.IMAP4.error):
        imap.login("alice@example.test", "nope-2")
    assert refused_reply(server.port("imap")).startswith(b"* BYE [UNAVAILABLE]")
