"""Message authentication: DKIM signing of submitted mail; inbound SPF, DKIM and DMARC (docs/mailauth.md)."""
