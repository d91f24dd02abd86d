"""The twistd dropin: C{twistd mailscreen}."""

from twisted.application.service import ServiceMaker

mailscreen = ServiceMaker(
    "twisted-mail-screen",
    "twisted_mail_screen.tap",
    "A small mail server (SMTP, submission, POP3, IMAP) with dynamic screening",
    "mailscreen",
)
