# -*- test-case-name: tests.test_dkim -*-
"""
DKIM signing (RFC 6376) of mail submitted by authenticated users, with
dkimpy: relaxed/relaxed canonicalisation, dkimpy's default header list
(From oversigned: listed once more than it occurs, so no From can be
added after signing), one signature per configured key of the From
domain (an RSA one, and an Ed25519 one where configured, RFC 8463).

Signing runs in a worker thread (RSA 2048 costs a few milliseconds, and
the body hash walks the whole message) and once, before the message is
stored or queued: every delivery attempt then sends the same bytes.
"""

from __future__ import annotations

from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

import dkim
from twisted.logger import Logger

from twisted_mail_screen.mailauth.config import DKIMConfig

ALGORITHM = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
CANONICALIZE = (b"relaxed", b"relaxed")


def from_domain(message: bytes) -> str | None:
    """The domain of the message's single From address; C{None} if there is not exactly one."""
    head = message.split(b"\n\n", 1)[0]
    values = BytesHeaderParser(policy=compat32).parsebytes(head + b"\n\n").get_all("From") or []
    addresses = [a for _, a in getaddresses([str(v) for v in values]) if a]
    if len(values) != 1 or len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rpartition("@")[2].lower().rstrip(".") or None


class Signer:
    """Signs a message in its stored form (LF line endings) with the keys of its From domain."""

    log = Logger()

    def __init__(self, config: DKIMConfig) -> None:
        self._config = config

    def sign(self, message: bytes) -> bytes:
        """In a worker thread: C{message} with its DKIM-Signature fields on top, or as it was."""
        domain = from_domain(message)
        if domain is None:
            return message
        signatures = b""
        for key in self._config.for_domain(domain):
            try:
                signatures += dkim.sign(message, key.selector.encode(), key.domain.encode(),
                                        key.private, canonicalize=CANONICALIZE,
                                        signature_algorithm=ALGORITHM[key.algorithm], linesep=b"\n")
            except dkim.DKIMException as e:
                # A header dkimpy cannot parse: the message goes out unsigned
                # (as it would without DKIM) rather than being refused.
                self.log.warn("dkim: cannot sign for {domain} with selector {selector}: {error}",
                              domain=key.domain, selector=key.selector, error=e)
        return signatures + message
