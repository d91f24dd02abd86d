"""Where mail and accounts live: Maildir, UID lists, accounts, routing, delivery."""
