"""
twisted-mail-screen: a small mail server (SMTP, submission, POP3, IMAP4) on
Twisted, delivering into plain Maildirs, with one shared screening service.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
