"""
Injected faults on a real test host: each fault gives exactly its reply,
exactly as many times as asked, then the server behaves normally again
(real smtplib, poplib and imaplib clients; docs/faults.md).
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import smtplib
import socket
import time
from typing import Any

import pytest
from twisted.internet.task import Clock

from conftest import maildir_files
from twisted_mail_screen.faults.plan import END_OF_DATA, FaultPlan
from twisted_mail_screen.testing import in_reactor

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def faults(server: Any) -> Any:
    """The plan, called in the reactor thread (it is reactor-thread-only)."""
    plan = server.service.faults

    class Proxy:
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: in_reactor(getattr(plan, name), *a, **k)

    return Proxy()


def smtp(server: Any) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    client.ehlo("client.example")
    return client


def test_plan_only_on_a_test_host(start_server):
    """A test host has one FaultPlan; a site has none, so nothing asks."""
    assert isinstance(start_server().service.faults, FaultPlan)


def test_no_plan_in_site_mode(start_server):
    assert start_server(site=True).service.faults is None


def test_reject_rcpt_exactly_times_then_normal(start_server):
    server = start_server()
    faults(server).reject(command="RCPT", match="*@bounce.test", reply="550 5.1.1 No such user",
                          times=2)
    client = smtp(server)
    client.mail("a@example.test")
    assert client.rcpt("x@other.test") == (250, b"2.1.5 Ok")  # no match: untouched
    assert client.rcpt("x@bounce.test") == (550, b"5.1.1 No such user")
    assert [r.remaining for r in faults(server).rules()] == [1]
    assert client.rcpt("y@Bounce.Test") == (550, b"5.1.1 No such user")
    assert faults(server).rules() == []
    assert client.rcpt("x@bounce.test") == (250, b"2.1.5 Ok")


def test_tempfail_until_cleared(start_server):
    """times=None applies until clear(); rules() lists it meanwhile."""
    server = start_server()
    faults(server).tempfail("MAIL", times=None)
    client = smtp(server)
    for _ in range(3):
        assert client.mail("a@example.test") == (451, b"4.3.0 Temporary failure (injected)")
    (rule,) = faults(server).rules()
    assert (rule.kind, rule.command, rule.remaining) == ("tempfail", "MAIL", None)
    faults(server).clear()
    assert faults(server).rules() == []
    assert client.mail("a@example.test") == (250, b"2.1.0 Ok")


def test_mailbox_full(start_server, tmp_path):
    server = start_server()
    faults(server).mailbox_full("full@example.test")
    client = smtp(server)
    client.mail("a@example.test")
    assert client.rcpt("full@example.test") == (452, b"4.2.2 Mailbox full")
    assert client.rcpt("full@example.test") == (250, b"2.1.5 Ok")
    client.data(MESSAGE)
    assert len(maildir_files(tmp_path / "data", "full@example.test")) == 1


def test_reject_at_end_of_data_stores_nothing(start_server, tmp_path):
    server = start_server()
    faults(server).reject(END_OF_DATA, match="*@bounce.test", reply="554 5.6.0 Refused (injected)")
    client = smtp(server)
    with pytest.raises(smtplib.SMTPDataError) as e:
        client.sendmail("a@example.test", ["b@bounce.test"], MESSAGE)
    assert (e.value.smtp_code, e.value.smtp_error) == (554, b"5.6.0 Refused (injected)")
    assert maildir_files(tmp_path / "data", "b@bounce.test") == []
    # the transaction is over: the next one needs no RSET and is delivered
    client.sendmail("a@example.test", ["b@bounce.test"], MESSAGE)
    assert len(maildir_files(tmp_path / "data", "b@bounce.test")) == 1


def test_tempfail_data_command(start_server):
    server = start_server()
    faults(server).tempfail("DATA", reply="452 4.3.1 Insufficient system storage")
    client = smtp(server)
    with pytest.raises(smtplib.SMTPDataError) as e:
        client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    assert (e.value.smtp_code, e.value.smtp_error) == (452, b"4.3.1 Insufficient system storage")
    client.rset()
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}


def test_disconnect_after_data_command(start_server):
    """disconnect(after="DATA") closes right after the 354."""
    server = start_server()
    faults(server).disconnect(after="DATA")
    client = smtp(server)
    client.mail("a@example.test")
    client.rcpt("b@example.test")
    assert client.docmd("DATA")[0] == 354
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.docmd("NOOP")
    assert smtp(server).sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}


def test_disconnect_after_end_of_data(start_server, tmp_path):
    """The message is stored and acknowledged, then the connection closes."""
    server = start_server()
    faults(server).disconnect(after=END_OF_DATA)
    client = smtp(server)
    assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    assert len(maildir_files(tmp_path / "data", "b@example.test")) == 1


def test_fail_auth_smtp(start_server):
    server = start_server()
    faults(server).fail_auth("bob@example.test", times=1)
    client = smtp(server)
    # AUTH by hand: smtplib's login() would go on to try LOGIN after PLAIN fails.
    plain = base64.b64encode(b"\0bob@example.test\0secret").decode()
    assert client.docmd("AUTH", f"PLAIN {plain}") == (535, b"5.7.8 Authentication credentials invalid")
    assert client.docmd("AUTH", f"PLAIN {plain}") == (235, b"2.7.0 Authentication successful")


def test_reject_auth_matches_the_user_of_an_initial_response(start_server):
    server = start_server()
    faults(server).tempfail("AUTH", match="bob@*", reply="454 4.7.0 Try later")
    client = smtp(server)
    plain = base64.b64encode(b"\0carol@example.test\0pw").decode()
    bob = base64.b64encode(b"\0bob@example.test\0pw").decode()
    assert client.docmd("AUTH", f"PLAIN {bob}") == (454, b"4.7.0 Try later")
    assert client.docmd("AUTH", f"PLAIN {plain}")[0] == 235
    assert faults(server).rules() == []


def test_delay_holds_the_reply_on_the_clock(start_server):
    """delay(RCPT, 30): no reply until the injected clock has moved 30 s; the reactor is free."""
    clock = Clock()
    server = start_server(clock=clock, smtp__idle_timeout=600)
    faults(server).delay("RCPT", 30)
    with socket.create_connection(("127.0.0.1", server.port("smtp")), timeout=10) as s:
        s.recv(1024)
        s.sendall(b"HELO c\r\nMAIL FROM:<a@example.test>\r\n")
        got = b""
        while got.count(b"\r\n") < 2:
            got += s.recv(1024)
        s.sendall(b"RCPT TO:<b@example.test>\r\nNOOP\r\n")
        due = clock.seconds() + 30
        deadline = time.monotonic() + 10
        while not any(c.getTime() == due for c in in_reactor(clock.getDelayedCalls)):
            assert time.monotonic() < deadline, "the RCPT reply was not put on the clock"
            time.sleep(0.01)
        # Another session is answered at once while this one waits.
        assert smtp(server).noop() == (250, b"2.0.0 Ok")
        server.advance(29)
        s.settimeout(0)  # the reply can only be written when the clock fires: none is there
        with pytest.raises(BlockingIOError):
            s.recv(1024)
        s.settimeout(10)
        server.advance(1)
        got = b""
        while got.count(b"\r\n") < 2:
            got += s.recv(1024)
        assert got == b"250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n"


def pop3(server: Any) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)


def test_pop3_faults(start_server):
    server = start_server()
    smtp(server).sendmail("a@example.test", ["bob@example.test"], MESSAGE)
    faults(server).fail_auth("bob@*")
    faults(server).tempfail("RETR")
    pop = pop3(server)
    pop.user("bob@example.test")
    with pytest.raises(poplib.error_proto):
        pop.pass_("pw")
    pop.user("bob@example.test")
    pop.pass_("pw")
    with pytest.raises(poplib.error_proto) as e:
        pop.retr(1)
    assert e.value.args[0] == b"-ERR [SYS/TEMP] Temporary failure (injected)"
    assert pop.retr(1)[1][-1] == b"body"
    assert faults(server).rules() == []


def test_pop3_reject_user(start_server):
    server = start_server()
    faults(server).reject("USER", match="eve*", reply="550 5.7.1 Go away")
    pop = pop3(server)
    with pytest.raises(poplib.error_proto) as e:
        pop.user("eve@example.test")
    assert e.value.args[0] == b"-ERR Go away"
    assert pop.user("eve@example.test").startswith(b"+OK")


def imap(server: Any) -> imaplib.IMAP4:
    return imaplib.IMAP4("127.0.0.1", server.port("imap"), timeout=10)


def test_imap_faults(start_server):
    server = start_server(kinds=("smtp", "imap"))
    faults(server).fail_auth("bob@example.test")
    faults(server).reject("SELECT", match=None, reply="550 5.2.0 No such folder (injected)")
    faults(server).tempfail("LOGIN", match="carol@*")
    client = imap(server)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login("bob@example.test", "pw")
    with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\] Temporary failure \(injected\)"):
        client.login("carol@example.test", "pw")
    assert client.login("bob@example.test", "pw")[0] == "OK"
    assert client.select("INBOX") == ("NO", [b"No such folder (injected)"])
    assert client.select("INBOX")[0] == "OK"


def test_imap_authenticate_matches_the_user_of_an_initial_response(start_server):
    server = start_server(kinds=("smtp", "imap"))
    faults(server).reject("AUTHENTICATE", match="dave@*", reply="550 5.7.0 Not today")
    dave = base64.b64encode(b"\0dave@example.test\0pw")
    with socket.create_connection(("127.0.0.1", server.port("imap")), timeout=10) as s:
        s.recv(1024)
        s.sendall(b"a AUTHENTICATE PLAIN " + dave + b"\r\n")
        assert s.recv(1024) == b"a NO Not today\r\n"
        s.sendall(b"b AUTHENTICATE PLAIN " + dave + b"\r\n")
        got = b""
        while b"b OK" not in got:
            got += s.recv(1024)


def test_imap_disconnect_after_noop(start_server):
    server = start_server(kinds=("smtp", "imap"))
    faults(server).disconnect(after="NOOP")
    client = imap(server)
    assert client.noop()[0] == "OK"
    with pytest.raises(imaplib.IMAP4.abort):
        client.noop()
