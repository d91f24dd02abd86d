"""
Message submission (RFC 6409, RFC 8314): authentication first, senders the
user owns, Message-ID and Date added, no open relay on any listener.
"""

from __future__ import annotations

import base64
import smtplib
import ssl

import pytest


from conftest import maildir_files, relay_to
from relay_sink import Sink, wait_for
from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.config.base import ConfigError


def login(server, kind="submission", user="alice@example.test", password="alice-secret"):
    client = smtplib.SMTP("127.0.0.1", server.port(kind), timeout=10)
    client.ehlo("client.example")
    client.login(user, password)
    return client


def test_envelope_sender_must_be_owned(start_server, accounts, sink):
    """MAIL FROM another user's address (or the null path) gets 553 5.7.1."""
    server = start_server(site=True, **relay_to(sink))
    client = login(server)
    code, text = client.mail("bob@example.test")
    assert (code, text[:5]) == (553, b"5.7.1")
    assert client.mail("")[0] == 553
    assert client.mail("ALICE@example.test")[0] == 250
    client.rset()
    client.quit()


def test_an_alias_that_includes_the_user_may_be_used(start_server, accounts, sink, tmp_path):
    """An alias whose targets include the user is the user's; another alias is not."""
    accounts.set_alias("team@example.test", ["alice@example.test", "bob@example.test"])
    accounts.set_alias("boss@example.test", ["bob@example.test"])
    server = start_server(site=True, **relay_to(sink))
    client = login(server)
    assert client.sendmail("team@example.test", ["carol@remote.example"],
                           b"From: Team <team@example.test>\r\nSubject: s\r\n\r\nx\r\n") == {}
    assert client.mail("boss@example.test")[0] == 553
    client.quit()
    wait_for(lambda: sink.messages)
    assert sink.messages[0].sender == "team@example.test"


def test_from_header_must_be_owned(start_server, accounts, sink, tmp_path):
    """A From: header with someone else's address gets 553 5.7.1 after DATA; nothing is sent."""
    server = start_server(site=True, **relay_to(sink))
    client = login(server)
    client.mail("alice@example.test")
    client.rcpt("bob@example.test")
    client.rcpt("carol@remote.example")
    code, text = client.data(b"From: \"Bob\" <bob@example.test>\r\nSubject: forged\r\n\r\nx\r\n")
    assert (code, text[:5]) == (553, b"5.7.1")
    assert client.noop()[0] == 250
    client.quit()
    assert maildir_files(tmp_path / "data", "bob@example.test") == []
    assert sink.messages == []


def test_message_id_and_date_are_added(start_server, accounts, tmp_path):
    """A submitted message without Message-ID and Date gets both; existing ones are kept."""
    server = start_server(site=True)
    client = login(server)
    client.sendmail("alice@example.test", ["bob@example.test"],
                    b"From: alice@example.test\r\nSubject: bare\r\n\r\nx\r\n")
    client.sendmail("alice@example.test", ["bob@example.test"],
                    b"From: alice@example.test\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
                    b"Message-ID: <mine@client.example>\r\nSubject: full\r\n\r\nx\r\n")
    client.quit()
    first, second = [p.read_bytes() for p in maildir_files(tmp_path / "data", "bob@example.test")]
    if b"Subject: full" in first:
        first, second = second, first
    assert b"\nMessage-ID: <" in first and b"@mail.example.test>\n" in first
    assert b"\nDate: " in first
    assert second.count(b"Message-ID:") == 1 and b"<mine@client.example>" in second
    assert second.count(b"\nDate:") == 1


def test_frozen_account_cannot_authenticate(start_server, accounts, tmp_path):
    """An account in frozen.txt gets 535 5.7.8 like a wrong password."""
    freeze = pytest.importorskip("twisted_mail_screen.screening.freeze")
    from twisted.internet.task import Clock
    store = freeze.FileFreezeStore(str(tmp_path / "data" / "frozen.txt"), Clock())
    store.freeze("alice@example.test", None, "test")
    server = start_server(site=True)
    factory = next(l.factory for l in server.service.listeners if l.kind == "submission")
    if type(factory.freeze).__name__ == "NullFreezeStore":
        pytest.skip("the server runs without a freeze store")
    for kind in ("submission", "smtp"):  # AUTH on port 25 is refused the same way
        client = smtplib.SMTP("127.0.0.1", server.port(kind), timeout=10)
        client.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            client.login("alice@example.test", "alice-secret")
        assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")
        assert client.mail("alice@example.test")[0] == (530 if kind == "submission" else 250)
        client.rset()
        client.login("bob@example.test", "bob-secret")
        client.quit()


@pytest.mark.parametrize("kind", ["smtp", "submission"])
def test_no_open_relay_for_unauthenticated_clients(start_server, accounts, sink, kind):
    """Unauthenticated clients cannot relay on any listener, even with a relay configured."""
    server = start_server(site=True, **relay_to(sink))
    client = smtplib.SMTP("127.0.0.1", server.port(kind), timeout=10)
    client.ehlo("client.example")
    code, text = client.mail("someone@outside.example")
    if kind == "submission":
        assert (code, text[:5]) == (530, b"5.7.0")
    else:
        assert code == 250
        code, text = client.rcpt("victim@elsewhere.example")
        assert (code, text[:5]) == (554, b"5.7.1")
        assert client.rcpt("alice@example.test")[0] == 250
    client.quit()
    assert sink.messages == []


def test_authenticated_client_may_relay_on_port_25_too(start_server, accounts, sink):
    """AUTH on port 25 allows relaying, with the same sender rules."""
    server = start_server(site=True, **relay_to(sink))
    client = login(server, "smtp")
    assert client.mail("bob@example.test")[0] == 553
    assert client.sendmail("alice@example.test", ["carol@remote.example"], b"Subject: s\r\n\r\nx\r\n") == {}
    client.quit()
    wait_for(lambda: sink.messages)


def test_no_relay_when_relaying_is_disabled(start_server, accounts):
    """relay.enabled = false: even authenticated users cannot send outside."""
    server = start_server(site=True, relay__enabled=False)
    client = login(server)
    client.mail("alice@example.test")
    assert client.rcpt("carol@remote.example")[0] == 554
    client.quit()


def test_test_host_mode_never_relays(tmp_path):
    """Test-host mode has no queue and refuses relay.enabled = true."""
    with pytest.raises(ConfigError) as e:
        load_config(None, {"data_dir": str(tmp_path), "relay.enabled": True})
    assert e.value.key == "relay.enabled"
    assert load_config(None, {"data_dir": str(tmp_path)}).relay.enabled is False


def test_starttls_required_before_auth_on_submission(start_server, accounts, certificate):
    """Port-587 style: with plaintext_auth = "never", AUTH only after STARTTLS."""
    cert, key = certificate
    server = start_server(site=True, plaintext_auth="never", tls__certificate=cert, tls__key=key)
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.ehlo("client.example")
    assert not client.has_extn("auth")
    code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice@example.test\0alice-secret").decode())
    assert (code, text[:6]) == (538, b"5.7.11")
    assert client.mail("alice@example.test")[0] == 530
    client.rset()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo("client.example")
    client.login("alice@example.test", "alice-secret")
    assert client.sendmail("alice@example.test", ["bob@example.test"], b"Subject: s\r\n\r\nx\r\n") == {}
    client.quit()


def test_implicit_tls_submission_port(start_server, accounts, certificate, tmp_path):
    """An ssl: endpoint (port-465 style, RFC 8314) is secure from the first byte."""
    cert, key = certificate
    server = start_server(site=True, plaintext_auth="never", tls__certificate=cert, tls__key=key,
                          listen__submission=[f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"])
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False
    client = smtplib.SMTP_SSL("127.0.0.1", server.port("submission"), timeout=10, context=context)
    client.ehlo("client.example")
    assert client.has_extn("auth") and not client.has_extn("starttls")
    client.login("alice@example.test", "alice-secret")
    assert client.sendmail("alice@example.test", ["bob@example.test"], b"Subject: s\r\n\r\nx\r\n") == {}
    client.quit()
    [path] = maildir_files(tmp_path / "data", "bob@example.test")
    assert b"with ESMTPSA" in path.read_bytes()


def test_account_frozen_during_a_session_cannot_send(start_server, accounts, sink):
    """A session authenticated before its account was frozen cannot start a new message."""
    from twisted_mail_screen.testing import in_reactor
    server = start_server(site=True, **relay_to(sink))
    store = server.service.screening.freeze_store
    if store is None:
        pytest.skip("the server runs without a freeze store")
    client = login(server)
    in_reactor(store.freeze, "alice@example.test", None, "test")
    code, text = client.mail("alice@example.test")
    client.quit()
    assert code == 554 and text.startswith(b"5.7.1")
    assert sink.messages == []
