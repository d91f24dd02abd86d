# -*- test-case-name: tests.test_smtp -*-
"""
SMTP AUTH (RFC 4954): PLAIN and LOGIN, with or without an initial
response, checked by the factory's authenticator (scrypt in a worker
thread). A mixin of L{smtp.SMTPServer}: it shares the session's state.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from twisted_mail_screen.protocols.session import SASLError, sasl_plain
from twisted_mail_screen.store.auth import decode_base64


class Authentication:
    """The AUTH command and its SASL exchanges."""

    def do_AUTH(self: Any, arg: str) -> Deferred | None:
        f = self.factory
        if self.user is not None:
            return self.reply(503, "5.5.1", "Already authenticated")
        if self.envelope is not None:
            return self.reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
        if not self.esmtp:
            return self.reply(503, "5.5.1", "Send EHLO first")
        if not f.authenticator.plaintext_allowed(self.peer_host, self.secure):
            return self.reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            if initial:
                return self._auth_plain(initial.encode())
            self._sasl = self._auth_plain
            self.send(b"334 \r\n")
            return None
        if mechanism == "LOGIN":
            if initial:
                return self._login_user(initial.encode())
            self._sasl = self._login_user
            self.send(b"334 VXNlcm5hbWU6\r\n")
            return None
        return self.reply(504, "5.5.4", "Unrecognized authentication mechanism")

    def _cancelled(self: Any) -> None:
        self.reply(501, "5.7.0", "Authentication cancelled")

    def _sasl_cancelled(self: Any, line: bytes) -> bool:
        if line.strip() == b"*":
            self._cancelled()
            return True
        return False

    def _auth_plain(self: Any, line: bytes) -> Deferred | None:
        try:
            credentials = sasl_plain(line)
        except SASLError as e:
            return self.reply(501, "5.5.2", f"Cannot decode response: {e}")
        if credentials is None:
            return self._cancelled()
        return self._check(*credentials)

    def _login_user(self: Any, line: bytes) -> None:
        if self._sasl_cancelled(line):
            return None
        try:
            username = decode_base64(line.strip()).decode("utf-8")
        except (SASLError, UnicodeDecodeError):
            return self.reply(501, "5.5.2", "Cannot decode response")
        self._sasl = lambda l: self._login_password(username, l)
        self.send(b"334 UGFzc3dvcmQ6\r\n")
        return None

    def _login_password(self: Any, username: str, line: bytes) -> Deferred | None:
        if self._sasl_cancelled(line):
            return None
        try:
            password = decode_base64(line.strip()).decode("utf-8")
        except (SASLError, UnicodeDecodeError):
            return self.reply(501, "5.5.2", "Cannot decode response")
        return self._check(username, password)

    def _check(self: Any, username: str, password: str) -> Deferred:
        f = self.factory
        d = f.authenticator.authenticate(username, password)

        def answer(address: str | None) -> None:
            if address is not None and not f.freeze.is_frozen(address):
                self.user = address
                self.auth_succeeded(address)
                self.log.info("smtp: {peer} authenticated as {user}", peer=self.peer_host, user=address)
                return self.reply(235, "2.7.0", "Authentication successful")
            # A frozen account gets the same answer as a wrong password.
            self.reply(535, "5.7.8", "Authentication credentials invalid")
            if address is None and self.auth_failed(username, password):
                self.close_for_block()

        return d.addCallback(answer)
