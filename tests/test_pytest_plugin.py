"""
The pytest plugin (twisted_mail_screen.pytest_plugin), run the way its
users run it: pytester writes a test file that uses the fixtures, runs
pytest on it in a subprocess (each run's server lives in that process's
reactor thread, apart from this suite's) with the plugin loaded through
its installed pytest11 entry point, and the outcome is checked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def this_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The subprocesses import the package from this tree, not a stale installed copy."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def test_import_costs_nothing() -> None:
    """Loading the plugin imports no Twisted: pytest loads it in every session."""
    code = ("import sys, twisted_mail_screen.pytest_plugin; "
            "print(sorted(m for m in sys.modules if m == 'twisted' or m.startswith('twisted.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_registered_as_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--mailscreen-mode*", "*--mailscreen-timeout*"])


FIXTURES = '''
import imaplib, poplib, smtplib, ssl
import pytest

def send(server, to, subject, sender="alice@example.test", port=None):
    with smtplib.SMTP(server.host, port or server.smtp_port) as s:
        s.sendmail(sender, to, f"From: {sender}\\r\\nTo: {', '.join(to)}\\r\\n"
                               f"Subject: {subject}\\r\\n\\r\\nbody of {subject}\\r\\n")

def test_messages_and_queries(mailserver):
    assert mailserver.web_url == f"http://127.0.0.1:{mailserver.web_port}"
    assert len({mailserver.smtp_port, mailserver.submission_port,
                mailserver.pop3_port, mailserver.imap_port}) == 4
    send(mailserver, ["bob@example.test", "carol@example.test"], "first")
    send(mailserver, ["dave@example.test"], "second invoice", sender="eve@other.test")
    with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:
        s.sendmail("x@example.test", ["hidden@example.test"],
                   b"To: list@example.test\\r\\nSubject: bcc\\r\\n\\r\\nx\\r\\n")
    mailserver.wait_for(count=3)
    first, second, bcc = mailserver.messages()
    assert [m["Subject"] for m in mailserver.messages("bcc:hidden@example.test")] == ["bcc"]
    assert [m["Subject"] for m in mailserver.messages("addressed:hidden")] == ["bcc"]
    assert mailserver.messages("to:hidden@example.test") == []  # To: is list@
    assert first.envelope_from == "alice@example.test"
    assert first.envelope_to == ["bob@example.test", "carol@example.test"]
    assert first["Subject"] == "first"
    assert [m["Subject"] for m in mailserver.messages("to:dave")] == ["second invoice"]
    assert [m["Subject"] for m in mailserver.messages("from:eve@other.test")] == ["second invoice"]
    assert [m["Subject"] for m in mailserver.messages('subject:"second invoice"')] == ["second invoice"]
    assert [m["Subject"] for m in mailserver.messages("body of first")] == ["first"]
    assert [m["Subject"] for m in mailserver.messages("-subject:first")] == ["second invoice", "bcc"]
    assert [m["Subject"] for m in mailserver.messages("!subject:first is:unread")] == ["second invoice", "bcc"]
    assert mailserver.messages("is:read") == [] and len(mailserver.messages("after:2020-01-01")) == 3
    assert [m["Subject"] for m in mailserver.messages("smaller:10k subject:bcc")] == ["bcc"]
    assert mailserver.messages("to:nobody") == []
    with pytest.raises(ValueError, match="unknown field 'too:'"):
        mailserver.messages("too:bob")
    with pytest.raises(ValueError, match="not a date"):
        mailserver.wait_for("after:yesterday")
    with pytest.raises(ValueError, match="unbalanced quote"):
        mailserver.messages('subject:"open')

def test_pop3_imap_and_purge(mailserver):
    send(mailserver, ["bob@example.test"], "hello")
    mailserver.wait_for("to:bob@example.test")
    with pytest.raises(AssertionError, match="1 of 2 matching"):
        mailserver.wait_for("to:bob@example.test", count=2, timeout=0.1)
    pop = poplib.POP3(mailserver.host, mailserver.pop3_port)
    pop.user("bob@example.test"); pop.pass_("anything")
    assert pop.stat()[0] == 1
    assert b"Subject: hello" in pop.retr(1)[1]
    pop.quit()
    imap = imaplib.IMAP4(mailserver.host, mailserver.imap_port)
    imap.login("bob@example.test", "anything")
    assert imap.select("INBOX")[1] == [b"1"]
    imap.logout()
    assert mailserver.purge() == 1
    assert mailserver.messages() == []

def test_smtp_settings(mailserver):
    settings = mailserver.smtp_settings()
    assert settings["EMAIL_HOST"] == settings["MAIL_SERVER"] == settings["host"] == "127.0.0.1"
    assert settings["EMAIL_PORT"] == settings["MAIL_PORT"] == settings["port"] == mailserver.smtp_port
    assert settings["EMAIL_USE_TLS"] is False
    assert mailserver.smtp_settings("submission")["port"] == mailserver.submission_port
    with smtplib.SMTP(settings["host"], settings["port"]) as s:
        s.sendmail("a@example.test", ["b@example.test"], b"Subject: s\\r\\n\\r\\nx\\r\\n")
    mailserver.wait_for("subject:s")

@pytest.mark.mailserver(site=True)
def test_site_mode_and_add_user(mailserver):
    mailserver.add_user("ann@example.test", "ann-secret")
    send(mailserver, ["ann@example.test"], "for ann")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(mailserver, ["nobody@example.test"], "lost")
    mailserver.wait_for("to:ann@example.test")
    imap = imaplib.IMAP4(mailserver.host, mailserver.imap_port)
    with pytest.raises(imaplib.IMAP4.error):
        imap.login("ann@example.test", "wrong")
    imap.login("ann@example.test", "ann-secret")
    imap.logout()

def test_add_user_needs_site_mode(mailserver):
    with pytest.raises(RuntimeError, match="site mode"):
        mailserver.add_user("ann@example.test", "x")

@pytest.mark.mailserver(tls=True)
def test_tls(mailserver):
    assert mailserver.smtp_settings()["EMAIL_USE_TLS"] is True
    context = ssl.create_default_context(cafile=mailserver.certificate)
    with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:
        s.starttls(context=context)
        s.sendmail("a@example.test", ["b@example.test"], b"Subject: secret\\r\\n\\r\\nx\\r\\n")
    mailserver.wait_for("subject:secret")

@pytest.mark.mailserver(hostname="mx.fixture.test")
def test_marker_overrides(mailserver):
    with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:
        assert b"mx.fixture.test" in s.ehlo()[1]

def test_faults_in_the_reactor_thread(mailserver):
    mailserver.faults.reject(command="RCPT", match="*@bounce.test",
                             reply="550 5.1.1 no such user here", times=1)
    assert [r.remaining for r in mailserver.faults.rules()] == [1]
    with pytest.raises(smtplib.SMTPRecipientsRefused, match="no such user here"):
        send(mailserver, ["x@bounce.test"], "bounced")
    send(mailserver, ["x@bounce.test"], "accepted")
    mailserver.faults.tempfail("MAIL", times=None)
    mailserver.faults.clear()
    assert mailserver.faults.rules() == []
    assert [m["Subject"] for m in mailserver.wait_for()] == ["accepted"]

@pytest.mark.mailserver(site=True)
def test_no_faults_in_site_mode(mailserver):
    with pytest.raises(AttributeError, match="no fault injection"):
        mailserver.faults.reject()

def test_session_server(mailserver_session):
    mailserver_session.purge()
    send(mailserver_session, ["bob@example.test"], "session")
    assert [m["Subject"] for m in mailserver_session.wait_for()] == ["session"]
'''


def test_fixtures(pytester: pytest.Pytester) -> None:
    result = run(pytester, FIXTURES)
    result.assert_outcomes(passed=10)


READ_BY_ONE = '''
import imaplib, smtplib

def test_one_recipient_read_it(mailserver):
    with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:
        s.sendmail("a@example.test", ["bob@example.test", "carol@example.test"],
                   b"Subject: shared\\r\\n\\r\\nx\\r\\n")
    mailserver.wait_for()
    imap = imaplib.IMAP4(mailserver.host, mailserver.imap_port)
    imap.login("bob@example.test", "any")
    imap.select("INBOX")
    imap.store("1", "+FLAGS", "\\\\Seen")
    imap.logout()
    [mail] = mailserver.messages()
    assert mail.envelope_to == ["bob@example.test", "carol@example.test"]
'''


def test_a_message_read_by_one_recipient_is_still_one_message(pytester: pytest.Pytester) -> None:
    """bob's copy moved to cur/ with flags in its name; carol's is in new/: still one delivery."""
    run(pytester, READ_BY_ONE).assert_outcomes(passed=1)


CONFIG_FIXTURE = '''
import pytest

@pytest.fixture
def mailserver_config():
    return {"site": True}

def test_site_from_fixture(mailserver):
    mailserver.add_user("ann@example.test", "pw")

@pytest.mark.mailserver(site=False)
def test_marker_wins(mailserver):
    assert not mailserver.site
'''


def test_config_fixture_and_marker(pytester: pytest.Pytester) -> None:
    run(pytester, CONFIG_FIXTURE).assert_outcomes(passed=2)


def test_mode_and_timeout_options(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmailscreen_mode = site\nmailscreen_timeout = 0.2\n")
    source = '''
def test_options(mailserver):
    assert mailserver.site and mailserver.timeout == 0.2
'''
    run(pytester, source).assert_outcomes(passed=1)
    source_cli = '''
def test_options(mailserver):
    assert not mailserver.site and mailserver.timeout == 7
'''
    run(pytester, source_cli, "--mailscreen-mode=test-host",
        "--mailscreen-timeout=7").assert_outcomes(passed=1)


def test_a_bad_marker_key_fails_readably_and_leaves_nothing_behind(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """
    An unknown configuration key in the marker fails the test with the config
    error; the temporary directory made for the control socket of a long
    data directory path is removed.
    """
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    source = '''
import pytest

@pytest.mark.mailserver(colour="blue")
def test_with_a_name_long_enough_that_the_control_socket_needs_a_directory_of_its_own(mailserver):
    pass
'''
    result = run(pytester, source, f"--basetemp={scratch / 'basetemp'}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*colour*unknown key*"])
    assert [p.name for p in scratch.iterdir()] == ["basetemp"]


WRONG = '''
import smtplib
import pytest

@pytest.mark.mailserver(relay_sink=True)
def test_expects_a_relay_that_was_deferred(mailserver):
    mailserver.faults.fail_delivery(reply="451 4.4.1 not today")
    with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:
        s.sendmail("a@example.test", ["bob@remote.test"], b"Subject: out\\r\\n\\r\\nx\\r\\n")
    mailserver.wait_for_relayed(timeout=0.3)

def test_expects_mail_never_sent(mailserver):
    with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:
        s.sendmail("a@example.test", ["bob@example.test"], b"Subject: other\\r\\n\\r\\nx\\r\\n")
    mailserver.wait_for("to:carol@example.test", timeout=0.3)
'''


def test_wrong_expectation_fails_readably(pytester: pytest.Pytester) -> None:
    result = run(pytester, WRONG)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*AssertionError: wait_for_relayed(count=1): 0 of 1 relayed message(s) within 0.3 s; "
        "1 message(s) still queued:",
        "*- * from <a@example.test> to bob@remote.test (pending: 451 4.4.1 not today); attempts 1",
    ])
    result.stdout.fnmatch_lines([
        "*AssertionError: wait_for('to:carol@example.test', count=1): 0 of 1 matching "
        "message(s) within 0.3 s; 1 message(s) arrived:",
        "*- from <a@example.test> to bob@example.test: Subject: other",
    ])


def test_docs_example_runs_as_written(pytester: pytest.Pytester) -> None:
    example = ROOT / "docs" / "examples" / "test_mail_example.py"
    docs = (ROOT / "docs" / "testing.md").read_text()
    # The docs show the file itself, not a copy that could drift from it.
    assert example.read_text() in docs
    pytester.makepyfile(test_mail_example=example.read_text())
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=5)


SCREENING = '''
import json, smtplib, time, urllib.request
import pytest

def greeting(server):
    with smtplib.SMTP(server.host, server.smtp_port) as s:
        return s.noop()[0]

def test_loopback_is_whitelisted_by_default(mailserver):
    with pytest.raises(ValueError, match="screening__whitelist=\\[\\]"):
        mailserver.screening.block("127.0.0.1", minutes=30)

@pytest.mark.mailserver(screening__whitelist=[])
def test_block_walks_to_its_expiry_without_sleeping(mailserver):
    entry = mailserver.screening.block("127.0.0.1", minutes=30, reason="test")
    assert entry["address"] == "127.0.0.1"
    assert [b["address"] for b in mailserver.screening.blocks()] == ["127.0.0.1"]
    with pytest.raises(smtplib.SMTPConnectError, match="blocked"):
        greeting(mailserver)
    started = time.monotonic()
    mailserver.screening.advance(29)
    with pytest.raises(smtplib.SMTPConnectError):
        greeting(mailserver)
    mailserver.screening.advance(1.1)
    assert time.monotonic() - started < 10
    assert mailserver.screening.blocks() == []
    assert greeting(mailserver) == 250

@pytest.mark.mailserver(screening__whitelist=[])
def test_unblock(mailserver):
    mailserver.screening.block("127.0.0.0/8")
    mailserver.screening.unblock("127.0.0.0/8")
    assert greeting(mailserver) == 250

def test_freeze_and_thaw(mailserver):
    mailserver.screening.freeze("bob@example.test", minutes=10)
    assert [f["user"] for f in mailserver.screening.frozen()] == ["bob@example.test"]
    with smtplib.SMTP(mailserver.host, mailserver.submission_port) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("bob@example.test", "any")
    mailserver.screening.advance(10.1)
    with smtplib.SMTP(mailserver.host, mailserver.submission_port) as s:
        s.login("bob@example.test", "any")
    mailserver.screening.freeze("bob@example.test")
    mailserver.screening.thaw("bob@example.test")
    assert mailserver.screening.frozen() == []

def test_faults_over_the_web_port(mailserver):
    request = urllib.request.Request(
        mailserver.web_url + "/api/v1/faults", method="POST",
        data=json.dumps({"kind": "mailbox_full", "address": "full@example.test", "times": 2}).encode(),
        headers={"Content-Type": "application/json"})
    rule = json.load(urllib.request.urlopen(request))
    assert rule["kind"] == "mailbox_full" and rule["remaining"] == 2
    for _ in range(2):
        with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:
            with pytest.raises(smtplib.SMTPRecipientsRefused, match="Mailbox full"):
                s.sendmail("a@example.test", ["full@example.test"], b"Subject: x\\r\\n\\r\\nx\\r\\n")
    assert mailserver.faults.rules() == []
    with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:
        s.sendmail("a@example.test", ["full@example.test"], b"Subject: third\\r\\n\\r\\nx\\r\\n")
    mailserver.wait_for("subject:third")
'''


def test_screening_and_web_faults(pytester: pytest.Pytester) -> None:
    run(pytester, SCREENING).assert_outcomes(passed=5)


RELAY = '''
import smtplib
import pytest

def send(server, to, subject):
    with smtplib.SMTP(server.host, server.smtp_port) as s:
        s.sendmail("shop@example.test", to,
                   f"From: shop@example.test\\r\\nSubject: {subject}\\r\\n\\r\\nx\\r\\n".encode())

@pytest.mark.mailserver(relay_sink=True)
def test_relayed_mail_reaches_the_sink(mailserver):
    send(mailserver, ["ann@example.test", "bob@remote.test"], "hello")
    mailserver.wait_for("addressed:ann@example.test")  # no To: header: a Bcc, as in Mailpit
    [out] = mailserver.wait_for_relayed()
    assert out.envelope_from == "shop@example.test" and out.envelope_to == ["bob@remote.test"]
    assert out["Subject"] == "hello"

@pytest.mark.mailserver(relay_sink=True, relay__retry_minutes=1)
def test_fail_delivery_defers_then_delivers(mailserver):
    mailserver.faults.fail_delivery(reply="451 4.4.1 not now", times=1)
    send(mailserver, ["bob@remote.test"], "deferred")
    with pytest.raises(AssertionError, match="0 of 1 relayed"):
        mailserver.wait_for_relayed(timeout=0.5)
    assert mailserver.faults.rules() == []
    mailserver.screening.advance(1.1)
    [out] = mailserver.wait_for_relayed()
    assert out["Subject"] == "deferred"

@pytest.mark.mailserver(relay_sink=True)
def test_fail_delivery_5xx_bounces(mailserver):
    mailserver.faults.fail_delivery(reply="550 5.7.1 refused (injected)")
    send(mailserver, ["bob@remote.test"], "bounced")
    [bounce] = mailserver.wait_for("to:shop@example.test subject:undelivered")
    assert "refused (injected)" in bounce.as_string()
    assert mailserver.relayed == []

def test_no_sink_no_relayed(mailserver):
    with pytest.raises(RuntimeError, match="relay_sink=True"):
        mailserver.relayed
'''


def test_relay_sink(pytester: pytest.Pytester) -> None:
    run(pytester, RELAY).assert_outcomes(passed=4)


SESSION = '''
import smtplib
import pytest

seen = {}

def test_plain(mailserver_session):
    seen["plain"] = mailserver_session
    assert not mailserver_session.site

def test_plain_again_is_the_same_server(mailserver_session):
    assert mailserver_session is seen["plain"]

@pytest.mark.mailserver(site=True)
def test_marker_gets_a_server_of_its_own(mailserver_session):
    assert mailserver_session.site and mailserver_session is not seen["plain"]
    seen["site"] = mailserver_session

@pytest.mark.mailserver(site=True)
def test_same_marker_same_server(mailserver_session):
    assert mailserver_session is seen["site"]

class TestConfigured:
    @pytest.fixture
    def mailserver_config(self):
        return {"hostname": "mx.session.test"}

    def test_config_fixture(self, mailserver_session):
        with smtplib.SMTP(mailserver_session.host, mailserver_session.smtp_port) as s:
            assert b"mx.session.test" in s.ehlo()[1]

@pytest.fixture(scope="session")
def shared(mailserver_pool):
    return mailserver_pool.get({"hostname": "mx.session.test"})

def test_pool_from_a_session_fixture(shared, mailserver_session):
    assert shared is not mailserver_session
    with smtplib.SMTP(shared.host, shared.smtp_port) as s:
        assert b"mx.session.test" in s.ehlo()[1]
'''


def test_session_server_honours_marker_and_config(pytester: pytest.Pytester) -> None:
    run(pytester, SESSION).assert_outcomes(passed=6)


LONG_PATH = '''
import os, subprocess, sys

def test_with_a_name_long_enough_that_the_control_socket_cannot_live_in_the_data_dir(mailserver):
    assert not mailserver.control_socket.startswith(mailserver.data_dir)
    assert len(os.path.join(mailserver.data_dir, "control.sock")) > 107
    mailserver.faults.reject()
    out = subprocess.run([sys.executable, "-m", "twisted_mail_screen.admin.cli",
                          "--data-dir", mailserver.data_dir,
                          "--control-socket", mailserver.control_socket, "faults", "list"],
                         capture_output=True, text=True, check=True).stdout
    assert "reject  RCPT" in out
'''


def test_a_long_data_dir_gets_its_control_socket_elsewhere(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The socket goes to a short temporary directory, removed when the server stops."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    base = scratch / ("b" * 60)
    run(pytester, LONG_PATH, f"--basetemp={base}").assert_outcomes(passed=1)
    assert [p.name for p in scratch.iterdir()] == [base.name]
