"""IMAP4rev1 sessions over the store's Maildir folders."""
