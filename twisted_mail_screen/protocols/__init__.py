"""The mail protocols on one shared command loop: SMTP, POP3, IMAP."""
