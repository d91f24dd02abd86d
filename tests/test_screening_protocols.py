"""
Every screening limit over real sockets, for each protocol it applies to:
at N-1 (still served), at N (blocked or closed, with the protocol's own
reply) and after expiry (served again). Time is a C{Clock}; nothing sleeps
for a window.

Which rules apply where:

  - connections, simultaneous, auth_failures, session_auth: SMTP,
    submission, POP3, IMAP;
  - rsets: SMTP and submission (RSET is allowed before AUTH on both);
  - failed_rcpts: SMTP only in practice. Submission refuses MAIL before
    AUTH, and recipients of authenticated sessions never count
    (C{exempt_authenticated}).
"""

from __future__ import annotations

import base64
import re
import socket
import time

import pytest
from twisted.internet.task import Clock

from twisted_mail_screen.testing import in_reactor

KINDS = ("smtp", "submission", "pop3", "imap")
HOST = "mail.example.test"
EXPIRY = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
REFUSAL = {
    "smtp": rf"421 4\.7\.0 {re.escape(HOST)} ",
    "submission": rf"421 4\.7\.0 {re.escape(HOST)} ",
    "pop3": r"-ERR \[SYS/TEMP\] ",
    "imap": r"\* BYE \[UNAVAILABLE\] ",
}
GREETING = {"smtp": b"220 ", "submission": b"220 ", "pop3": b"+OK", "imap": b"* OK"}


def site(start_server, **overrides):
    """Site mode, all four listeners, loopback screened, a Clock at the real time."""
    clock = Clock()
    clock.advance(time.time() // 1)
    return start_server(site=True, clock=clock, kinds=KINDS, **overrides)


class Session:
    """A line-oriented client for any of the four protocols."""

    def __init__(self, server, kind: str) -> None:
        self.kind = kind
        self.sock = socket.create_connection(("127.0.0.1", server.port(kind)), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()

    @property
    def served(self) -> bool:
        return self.greeting.startswith(GREETING[self.kind])

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def line(self) -> bytes:
        return self.file.readline()

    def smtp_reply(self) -> list[bytes]:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def command(self, line: str) -> bytes:
        """Send an SMTP command and return the last line of its reply."""
        self.send(line)
        return self.smtp_reply()[-1]

    def closed(self) -> bool:
        """Whether the server has closed the connection (all input read)."""
        return self.file.read() == b""

    def closing(self) -> bytes:
        """
        What the server says after the event that ends a session, checking
        that it then closes: SMTP's 421 4.7.0, IMAP's untagged BYE, POP3
        nothing more.
        """
        rest = self.file.read()
        if self.kind in ("smtp", "submission"):
            assert re.fullmatch(rb"421 4\.7\.0 " + re.escape(HOST.encode()) + rb" .*\r\n", rest), rest
        elif self.kind == "imap":
            assert re.fullmatch(rb"\* BYE .*\r\n", rest), rest
        else:
            assert rest == b"", rest
        return rest

    def bad_login(self, n: int, user: str = "alice@example.test") -> bytes:
        """One failed login; returns the failure reply."""
        password = f"wrong-{n}"
        if self.kind in ("smtp", "submission"):
            if not getattr(self, "_ehlo", False):
                self.command("EHLO client.example")
                self._ehlo = True
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            return self.command(f"AUTH PLAIN {token}")
        if self.kind == "pop3":
            self.send(f"USER {user}")
            self.line()
            self.send(f"PASS {password}")
            return self.line()
        self.send(f"a{n} LOGIN {user} {password}")
        return self.line()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def connect(server, kind: str) -> Session:
    return Session(server, kind)


def served(server, kind: str) -> bool:
    s = connect(server, kind)
    try:
        return s.served
    finally:
        s.close()


def refusal(server, kind: str) -> str:
    """The greeting of a refused connection, checking that the server then closes."""
    s = connect(server, kind)
    try:
        assert not s.served, s.greeting
        assert s.closed(), "the server did not close a refused connection"
        return s.greeting.decode()
    finally:
        s.close()


FAILURE = {"smtp": b"535 5.7.8 ", "submission": b"535 5.7.8 ", "pop3": b"-ERR [AUTH] ",
           "imap": b"a"}


def wait_active(server, count: int) -> None:
    """Wait until the server has seen the client's connections close (not a time window)."""
    deadline = time.monotonic() + 10
    while in_reactor(server.service.screening.admin.stats)["active"] != count:
        assert time.monotonic() < deadline, "the server never saw the close"
        time.sleep(0.01)


# Refusals


@pytest.mark.parametrize("kind", KINDS)
def test_refusal_reply_exactly_then_closed(start_server, accounts, kind):
    """A blocked address gets exactly the protocol's refusal line, then the server closes."""
    server = site(start_server)
    in_reactor(server.service.screening.admin.block, "127.0.0.1", 30, "test")
    assert re.fullmatch(REFUSAL[kind] + rf"127\.0\.0\.1 blocked until {EXPIRY} \(manual\)\r\n",
                        refusal(server, kind))
    in_reactor(server.service.screening.admin.unblock, "127.0.0.1")
    in_reactor(server.service.screening.admin.block, "127.0.0.0/8", None, "")
    assert re.fullmatch(REFUSAL[kind] + r"127\.0\.0\.1 blocked until removed \(manual\)\r\n",
                        refusal(server, kind))


# Connection rate


@pytest.mark.parametrize("kind", KINDS)
def test_connection_limit(start_server, accounts, kind):
    """max_connections served; the next is refused and blocks; after block_minutes served again."""
    server = site(start_server, screening__max_connections=3,
                  screening__connection_window_minutes=5, screening__block_minutes=10)
    for _ in range(3):
        assert served(server, kind)
    assert re.fullmatch(REFUSAL[kind] + rf"127\.0\.0\.1 blocked until {EXPIRY} \(connections\)\r\n",
                        refusal(server, kind))
    assert re.fullmatch(REFUSAL[kind] + r".*\(connections\)\r\n", refusal(server, kind))
    server.advance(10 * 60 - 1)
    assert not served(server, kind)
    server.advance(1)
    assert served(server, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_connection_window_slides(start_server, accounts, kind):
    """N-1 connections, then a window later N more: never blocked."""
    server = site(start_server, screening__max_connections=3,
                  screening__connection_window_minutes=5)
    for _ in range(3):
        for _ in range(3):
            assert served(server, kind)
        server.advance(5 * 60)  # exactly a window: the old ones have left it


# Simultaneous connections


@pytest.mark.parametrize("kind", KINDS)
def test_simultaneous_limit(start_server, accounts, kind):
    """max_simultaneous open at once; the next is refused (not blocked); closing one makes room."""
    server = site(start_server, screening__max_simultaneous=2)
    first, second = connect(server, kind), connect(server, kind)
    assert first.served and second.served
    text = refusal(server, kind)
    assert re.fullmatch(REFUSAL[kind] + r"127\.0\.0\.1 has too many simultaneous connections "
                        r"\(2\) \(simultaneous\)\r\n", text), text
    assert server.service.screening.admin.blocks() == []
    first.close()
    wait_active(server, 1)
    third = connect(server, kind)
    assert third.served
    second.close()
    third.close()


@pytest.mark.parametrize("kind", KINDS)
def test_simultaneous_blocks_when_configured(start_server, accounts, kind):
    """With block_on_simultaneous the one over the limit blocks the address, until expiry."""
    server = site(start_server, screening__max_simultaneous=1,
                  screening__block_on_simultaneous=True, screening__block_minutes=5)
    first = connect(server, kind)
    assert first.served
    assert re.fullmatch(REFUSAL[kind] + rf"127\.0\.0\.1 blocked until {EXPIRY} \(simultaneous\)\r\n",
                        refusal(server, kind))
    first.close()
    wait_active(server, 0)
    assert not served(server, kind)
    server.advance(5 * 60)
    assert served(server, kind)


# Authentication failures


@pytest.mark.parametrize("kind", KINDS)
def test_auth_failure_limit(start_server, accounts, kind):
    """N-1 failed logins: served; the Nth: its failure reply, then closed and blocked; expiry: served."""
    server = site(start_server, screening__max_auth_failures=3, screening__block_minutes=10,
                  screening__session_auth__max_failures=0)
    for n in range(2):
        s = connect(server, kind)
        assert s.bad_login(n).startswith(FAILURE[kind])
        s.close()
    assert served(server, kind)
    s = connect(server, kind)
    reply = s.bad_login(2)
    assert reply.startswith(FAILURE[kind]), reply
    s.closing()
    s.close()
    assert re.fullmatch(REFUSAL[kind] + rf"127\.0\.0\.1 blocked until {EXPIRY} \(auth_failures\)\r\n",
                        refusal(server, kind))
    [(_, _, reason)] = server.service.screening.admin.blocks()
    assert reason == f"auth_failures: 3/3 in 15m ({kind})"
    server.advance(10 * 60)
    assert served(server, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_auth_failure_window_exact(start_server, accounts, kind):
    """A failure exactly auth_failure_window_minutes old has left the window."""
    server = site(start_server, screening__max_auth_failures=2,
                  screening__auth_failure_window_minutes=15)
    s = connect(server, kind)
    s.bad_login(0)
    s.close()
    server.advance(15 * 60)
    s = connect(server, kind)
    assert s.bad_login(1).startswith(FAILURE[kind])
    s.close()
    assert served(server, kind)
    assert server.service.screening.admin.blocks() == []


# Per-session authentication limit


@pytest.mark.parametrize("kind", KINDS)
def test_session_auth_limit(start_server, accounts, kind):
    """F-1 failures in one session: it goes on; the Fth closes it; the address is not blocked."""
    server = site(start_server, screening__session_auth__max_failures=3,
                  screening__max_auth_failures=100)
    s = connect(server, kind)
    for n in range(2):
        assert s.bad_login(n).startswith(FAILURE[kind])
    assert s.bad_login(2).startswith(FAILURE[kind])
    s.closing()
    s.close()
    assert server.service.screening.admin.blocks() == []
    assert served(server, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_session_auth_protocols_setting(start_server, accounts, kind):
    """A protocol left out of session_auth.protocols is not subject to the limit."""
    others = [k for k in KINDS if k != kind]
    server = site(start_server, screening__session_auth__max_failures=2,
                  screening__session_auth__protocols=others, screening__max_auth_failures=100)
    s = connect(server, kind)
    for n in range(4):
        assert s.bad_login(n).startswith(FAILURE[kind])
    s.close()


# RSET and unknown recipients (SMTP)


@pytest.mark.parametrize("kind", ("smtp", "submission"))
def test_rset_limit(start_server, accounts, kind):
    """N-1 RSETs: fine; the Nth: 250, then 421 4.7.0 and closed; blocked until expiry."""
    server = site(start_server, screening__max_rsets=3, screening__block_minutes=10)
    s = connect(server, kind)
    s.command("EHLO client.example")
    assert s.command("RSET").startswith(b"250")
    assert s.command("RSET").startswith(b"250")
    assert s.command("RSET").startswith(b"250")
    assert s.line().startswith(b"421 4.7.0 " + HOST.encode())
    assert s.closed()
    s.close()
    assert refusal(server, kind).endswith("(rsets)\r\n")
    server.advance(10 * 60)
    assert served(server, kind)


def test_failed_rcpt_limit_and_expiry(start_server, accounts):
    """N-1 unknown recipients: fine; the Nth: 550, 421, closed; blocked until expiry."""
    server = site(start_server, screening__max_failed_rcpts=3, screening__block_minutes=10)
    s = connect(server, "smtp")
    s.command("EHLO client.example")
    s.command("MAIL FROM:<a@outside.example>")
    assert s.command("RCPT TO:<n1@example.test>").startswith(b"550 5.1.1")
    assert s.command("RCPT TO:<n2@example.test>").startswith(b"550 5.1.1")
    assert s.command("RCPT TO:<alice@example.test>").startswith(b"250")
    assert s.command("RCPT TO:<n3@example.test>").startswith(b"550 5.1.1")
    assert s.line().startswith(b"421 4.7.0")
    assert s.closed()
    s.close()
    assert refusal(server, "smtp").endswith("(failed_rcpts)\r\n")
    server.advance(10 * 60)
    assert served(server, "smtp")


def test_close_smtp_after_block_off(start_server, accounts):
    """close_smtp_after_block = false: the session goes on, only new connections are refused."""
    server = site(start_server, screening__max_failed_rcpts=2,
                  screening__close_smtp_after_block=False)
    s = connect(server, "smtp")
    s.command("EHLO client.example")
    s.command("MAIL FROM:<a@outside.example>")
    s.command("RCPT TO:<n1@example.test>")
    assert s.command("RCPT TO:<n2@example.test>").startswith(b"550")
    assert s.command("RCPT TO:<n3@example.test>").startswith(b"550")  # not 421
    assert s.command("NOOP").startswith(b"250")
    assert refusal(server, "smtp").endswith("(failed_rcpts)\r\n")
    assert s.command("QUIT").startswith(b"221")
    s.close()


def test_authenticated_smtp_session_cannot_block(start_server, accounts):
    """After AUTH, unknown recipients and RSETs in that session never block the address."""
    server = site(start_server, screening__max_failed_rcpts=2, screening__max_rsets=2)
    s = connect(server, "smtp")
    s.command("EHLO client.example")
    token = base64.b64encode(b"\0alice@example.test\0alice-secret").decode()
    assert s.command(f"AUTH PLAIN {token}").startswith(b"235")
    for i in range(5):
        assert s.command("MAIL FROM:<alice@example.test>").startswith(b"250")
        assert s.command(f"RCPT TO:<nobody{i}@example.test>").startswith(b"550")
        assert s.command("RSET").startswith(b"250")
    s.close()
    assert server.service.screening.admin.blocks() == []
    assert served(server, "smtp")


# White list


@pytest.mark.parametrize("kind", KINDS)
def test_whitelisted_never_blocked(start_server, accounts, kind):
    """A white-listed address goes past every limit on every protocol and is still served."""
    server = site(start_server, screening__whitelist=["127.0.0.1"], screening__max_connections=2,
                  screening__max_auth_failures=1, screening__max_simultaneous=1,
                  screening__session_auth__max_failures=2)
    held = [connect(server, kind) for _ in range(3)]
    assert all(s.served for s in held)
    for n in range(4):
        assert held[0].bad_login(n).startswith(FAILURE[kind])
    for s in held:
        s.close()
    assert served(server, kind)
    assert server.service.screening.admin.blocks() == []


# Frozen accounts


@pytest.mark.parametrize("kind", ("smtp", "submission"))
def test_frozen_account_gets_535_whatever_the_password(start_server, accounts, kind):
    """Right or wrong password, a frozen account's AUTH gets the same 535 5.7.8."""
    server = site(start_server)
    in_reactor(server.service.screening.freeze_store.freeze, "alice@example.test", None, "test")
    s = connect(server, kind)
    s.command("EHLO client.example")
    replies = []
    for password in ("alice-secret", "wrong"):
        token = base64.b64encode(f"\0alice@example.test\0{password}".encode()).decode()
        replies.append(s.command(f"AUTH PLAIN {token}"))
    s.close()
    assert replies[0] == replies[1] == b"535 5.7.8 Authentication credentials invalid\r\n"


def test_frozen_account_reads_over_imap_and_thaws_when_minutes_pass(start_server, accounts):
    """A frozen account still logs in to IMAP; an automatic freeze lapses after [freeze] minutes."""
    import imaplib
    import smtplib
    server = site(start_server, freeze__minutes=60)
    store = server.service.screening.freeze_store
    in_reactor(store.freeze, "alice@example.test", 60, "session_auth: test")
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    client.sendmail("x@outside.example", ["alice@example.test"], b"Subject: hi\r\n\r\nbody\r\n")
    with pytest.raises(smtplib.SMTPAuthenticationError):
        client.login("alice@example.test", "alice-secret")
    client.quit()
    imap = imaplib.IMAP4("127.0.0.1", server.port("imap"), timeout=10)
    imap.login("alice@example.test", "alice-secret")
    typ, data = imap.select("INBOX")
    assert typ == "OK" and data == [b"1"]
    imap.logout()
    server.advance(60 * 60)
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.login("alice@example.test", "alice-secret")
    client.quit()


# The CLI against a running server


def test_cli_whitelist_and_frozen_take_effect_at_once(start_server, accounts, tmp_path):
    """`mailscreen whitelist add` beats a block at once; `frozen freeze/thaw` change AUTH at once."""
    from test_screening_sockets import mailscreen
    server = site(start_server)
    data = tmp_path / "data"
    assert mailscreen(data, "block", "add", "127.0.0.0/8").returncode == 0
    assert "blocked until removed" in refusal(server, "imap")
    assert "never" in mailscreen(data, "block", "list").stdout
    assert mailscreen(data, "whitelist", "add", "127.0.0.*").returncode == 0
    assert served(server, "imap") and served(server, "pop3")
    assert mailscreen(data, "whitelist", "remove", "127.0.0.*").returncode == 0
    assert not served(server, "smtp")
    assert mailscreen(data, "block", "remove", "127.0.0.1").returncode == 0
    assert served(server, "smtp")

    token = base64.b64encode(b"\0alice@example.test\0alice-secret").decode()

    def auth() -> bytes:
        s = connect(server, "submission")
        s.command("EHLO client.example")
        try:
            return s.command(f"AUTH PLAIN {token}")
        finally:
            s.close()

    assert auth().startswith(b"235")
    result = mailscreen(data, "frozen", "freeze", "Alice@Example.test", "--minutes", "30")
    assert result.returncode == 0, result.stderr
    assert auth().startswith(b"535 5.7.8")
    listing = mailscreen(data, "frozen", "list").stdout
    assert "alice@example.test" in listing and "30 min left" in listing
    deadline = time.monotonic() + 10  # the file is written from the worker pool
    while "alice@example.test" not in (data / "frozen.txt").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "alice@example.test" in (data / "frozen.txt").read_text()
    assert mailscreen(data, "frozen", "thaw", "alice@example.test").returncode == 0
    assert auth().startswith(b"235")


def test_authenticated_smtp_session_counts_when_not_exempt(start_server, accounts):
    """With exempt_authenticated = false, an authenticated session's unknown recipients count."""
    server = site(start_server, screening__max_failed_rcpts=2,
                  screening__exempt_authenticated=False)
    s = connect(server, "smtp")
    s.command("EHLO client.example")
    token = base64.b64encode(b"\0alice@example.test\0alice-secret").decode()
    assert s.command(f"AUTH PLAIN {token}").startswith(b"235")
    s.command("MAIL FROM:<alice@example.test>")
    s.command("RCPT TO:<nobody1@example.test>")
    s.command("RCPT TO:<nobody2@example.test>")
    s.close()
    assert [reason for _, _, reason in server.service.screening.admin.blocks()] == [
        "failed_rcpts: 2/2 in one session (smtp)"]
