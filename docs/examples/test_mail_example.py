"""
An example suite for the twisted-mail-screen pytest plugin: the code
under test sends with its framework's settings, the test reads the mail
back over IMAP. CI runs this file as written (tests/test_pytest_plugin.py).
"""

import imaplib
import smtplib
from email.message import EmailMessage

import pytest


def send_welcome(settings: dict, address: str) -> None:
    """The application code: sends with Django-style settings."""
    message = EmailMessage()
    message["From"] = "shop@example.test"
    message["To"] = address
    message["Subject"] = "Welcome!"
    message.set_content("Thanks for signing up.")
    with smtplib.SMTP(settings["EMAIL_HOST"], settings["EMAIL_PORT"]) as smtp:
        smtp.send_message(message)


def test_welcome_mail(mailserver):
    send_welcome(mailserver.smtp_settings(), "ann@example.test")

    [mail] = mailserver.wait_for("to:ann@example.test subject:welcome")
    assert mail.envelope_from == "shop@example.test"
    assert mail.get_content().strip() == "Thanks for signing up."


def test_plain_smtplib(mailserver):
    settings = mailserver.smtp_settings()
    with smtplib.SMTP(settings["host"], settings["port"]) as smtp:
        smtp.sendmail("a@example.test", ["b@example.test", "c@example.test"],
                      b"Subject: report\r\n\r\nnumbers\r\n")

    [mail] = mailserver.wait_for("report")
    assert mail.envelope_to == ["b@example.test", "c@example.test"]
    mailserver.purge()
    assert mailserver.messages() == []


def test_read_back_over_imap(mailserver):
    send_welcome(mailserver.smtp_settings(), "ann@example.test")
    mailserver.wait_for("to:ann@example.test")

    # A test host opens the mailbox named by the login, whatever the password.
    imap = imaplib.IMAP4(mailserver.host, mailserver.imap_port)
    imap.login("ann@example.test", "any password")
    imap.select("INBOX")
    _, data = imap.search(None, "SUBJECT", "Welcome")
    assert data[0].split() == [b"1"]
    imap.logout()


def test_a_refused_recipient(mailserver):
    # Fault injection (docs/faults.md): the next RCPT to this address is refused.
    mailserver.faults.reject(command="RCPT", match="ann@example.test",
                             reply="550 5.1.1 No such user", times=1)
    try:
        send_welcome(mailserver.smtp_settings(), "ann@example.test")
    except smtplib.SMTPRecipientsRefused:
        pass
    else:
        raise AssertionError("the injected 550 did not reach the sender")
    assert mailserver.messages() == []


@pytest.mark.mailserver(relay_sink=True, relay__retry_minutes=1)
def test_a_retried_outbound_delivery(mailserver):
    # The next relay attempt fails with a 451; the queue retries a minute later
    # on the server's clock, which the test moves on instead of sleeping.
    mailserver.faults.fail_delivery(reply="451 4.4.1 Try again later", times=1)
    send_welcome(mailserver.smtp_settings(), "ann@partner.test")
    mailserver.screening.advance(1.1)
    [out] = mailserver.wait_for_relayed()
    assert out.envelope_to == ["ann@partner.test"] and out["Subject"] == "Welcome!"
