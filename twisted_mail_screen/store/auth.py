# -*- test-case-name: tests.test_submission -*-
"""
Checking a username and password, the same way for SMTP, POP3 and IMAP.

In test-host mode any password opens the mailbox named by the username (as
GreenMail does); in site mode the password is checked against the account
store's scrypt hash in a worker thread, never on the reactor thread.
"""

from __future__ import annotations

import base64
import binascii

from twisted.internet.defer import Deferred, succeed

from twisted_mail_screen.store.accounts import AccountStore
from twisted_mail_screen.store.addresses import AddressError, normalise_address
from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.screening.netmatch import parse_host
from twisted_mail_screen.runtime.workers import Blocking


class SASLError(ValueError):
    """A SASL response that cannot be decoded."""


def decode_base64(text: bytes | str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SASLError("invalid base64") from e


def parse_sasl_plain(response: bytes) -> tuple[str, str]:
    """
    The (username, password) of a decoded RFC 4616 PLAIN response. An
    authorization identity, if given, must equal the username.
    """
    parts = response.split(b"\0")
    if len(parts) != 3:
        raise SASLError("PLAIN response must have three NUL-separated fields")
    try:
        authz, user, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError as e:
        raise SASLError("PLAIN response is not UTF-8") from e
    if authz and authz.lower() != user.lower():
        raise SASLError("authorization identity differs from the username")
    return user, password


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped 127/8; never an empty or non-IP peer (a UNIX socket)."""
    parsed = parse_host(host)
    return parsed is not None and (parsed == (6, 1) or (parsed[0] == 4 and parsed[1] >> 24 == 127))


class Authenticator:
    """Turns a username and password into a canonical mailbox address."""

    def __init__(self, config: Config, accounts: AccountStore, blocking: Blocking) -> None:
        self._config = config
        self._accounts = accounts
        self._blocking = blocking

    def canonical(self, username: str) -> str | None:
        """
        The account address a login name refers to: C{alice} means
        C{alice@<first local domain>}; C{None} when it is not an address.
        """
        if "@" not in username:
            default = self._config.domains[0] if self._config.domains else self._config.hostname
            username = f"{username}@{default}"
        try:
            return normalise_address(username)
        except AddressError:
            return None

    def authenticate(self, username: str, password: str) -> "Deferred[str | None]":
        """The canonical address on success, C{None} on failure."""
        address = self.canonical(username)
        if address is None:
            return succeed(None)
        if self._config.test_host:
            return succeed(address)
        d = self._blocking.run(self._accounts.check_password, address, password)
        d.addCallback(lambda ok: address if ok else None)
        return d

    def plaintext_allowed(self, host: str, secure: bool) -> bool:
        """Whether a password may be sent on this connection."""
        if secure or self._config.plaintext_auth == "always":
            return True
        return self._config.plaintext_auth == "loopback" and is_loopback(host)
