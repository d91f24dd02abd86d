# -*- test-case-name: tests.test_pop3 -*-
"""
The POP3 server (RFC 1939, with CAPA RFC 2449, AUTH RFC 5034, STLS RFC
2595) on the same Maildirs SMTP writes.

A session works on a snapshot of the mailbox taken at login (only names
and sizes; bodies are read when asked for). DELE only marks a message;
the files are removed in the UPDATE state, after QUIT, so a dropped
connection deletes nothing. One POP3 session per mailbox at a time.
The message codec is L{pop3_wire}; the maildrop, its file reads and the
RETR/TOP read-ahead are L{pop3_drop}.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twisted_mail_screen.faults.seam import guard, pop3_reply
from twisted_mail_screen.protocols.session import SASLError, ScreenedSession, SessionFactory, sasl_plain
from twisted_mail_screen.protocols.pop3_drop import Drop, MailboxInUse, Retriever, open_drop, uidl_of
from twisted_mail_screen.quota.service import QuotaService
from twisted_mail_screen.store.folderlock import locked_unless_gone
from twisted_mail_screen.store.maildir import MailStore
from twisted_mail_screen.runtime.workers import Blocking


#: A command's number argument: ASCII digits only (int() also takes "²"-like
#: Unicode digits, "1_0" and thousands of digits, the last with a ValueError).
_NUMBER = re.compile(r"[0-9]{1,20}")


def _number(text: str) -> int | None:
    """C{text} as a non-negative number, or C{None} when it is not one."""
    return int(text) if _NUMBER.fullmatch(text) else None


class POP3Server(ScreenedSession):
    """One POP3 session."""

    log = Logger()
    factory: "POP3Factory"
    max_line_length = 1024

    def __init__(self) -> None:
        super().__init__()
        self.drop: Drop | None = None
        self._user: str | None = None
        self._sasl: Callable[[bytes], Any] | None = None
        self._retriever = Retriever(self, self._blocking)

    def connectionMade(self) -> None:
        f = self.factory
        self.clock = f.clock
        self.idle_timeout = f.config.pop3.idle_timeout
        super().connectionMade()
        if self.open_screen(f.screening, "pop3"):
            self.ok("twisted-mail-screen POP3 ready")

    def refuse(self, reason: str) -> None:
        self.err(f"[SYS/TEMP] {reason}")

    def session_ended(self) -> None:
        self._retriever.clear()
        if self.drop is not None:
            self.factory.locks.discard(self.drop.address)
            self.drop.release()
            self.drop = None
        self.close_screen()

    def _blocking(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        return self.factory.blocking.run(f, *args, **kwargs)

    def ok(self, text: str = "") -> None:
        self.send(f"+OK {text}\r\n".encode() if text else b"+OK\r\n")

    def err(self, text: str) -> None:
        self.send(f"-ERR {text}\r\n".encode())

    def line_too_long(self) -> None:
        self.err("Line too long")

    def timed_out(self) -> None:
        self.err("Disconnected for inactivity")
        self.close()

    def internal_error(self) -> None:
        self.err("[SYS/TEMP] Internal error, closing")
        self.close()

    def line_received(self, line: bytes) -> Deferred | None:
        if self._sasl is not None:
            step, self._sasl = self._sasl, None
            return step(line)
        verb, _, arg = line.decode("utf-8", "replace").partition(" ")
        verb = verb.upper()
        state = "TRANSACTION" if self.drop is not None else "AUTHORIZATION"
        handler = getattr(self, f"{state}_{verb}", None) if verb.isalpha() else None
        if handler is None:
            self.err("Unknown command" if not hasattr(self, f"TRANSACTION_{verb}") and
                     not hasattr(self, f"AUTHORIZATION_{verb}") else f"{verb} not allowed now")
            return None
        subject = (self._user or "") if verb == "PASS" else arg.strip()  # what a fault rule matches
        return guard(self.factory.faults, self, verb, subject, lambda: handler(arg), pop3_reply)

    # AUTHORIZATION state

    def _plaintext_ok(self) -> bool:
        return self.factory.authenticator.plaintext_allowed(self.peer_host, self.secure)

    def AUTHORIZATION_CAPA(self, arg: str) -> None:
        self.TRANSACTION_CAPA(arg)

    def TRANSACTION_CAPA(self, arg: str) -> None:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                "IMPLEMENTATION twisted-mail-screen"]
        if self.drop is None:
            if self.factory.tls is not None and not self.secure:
                caps.append("STLS")
            if self._plaintext_ok():
                caps += ["USER", "SASL PLAIN"]
        self.send(("+OK Capability list follows\r\n" + "".join(c + "\r\n" for c in caps)
                   + ".\r\n").encode())

    def AUTHORIZATION_STLS(self, arg: str) -> None:
        if self.factory.tls is None or self.secure:
            return self.err("STLS not available")
        self.ok("Begin TLS negotiation")
        self.start_tls(self.factory.tls)
        self._user = None

    def AUTHORIZATION_USER(self, arg: str) -> None:
        if not self._plaintext_ok():
            return self.err("[AUTH] Plaintext authentication disallowed on non-secure connections")
        if not arg:
            return self.err("Syntax: USER name")
        self._user = arg.strip()
        self.ok("Send PASS")

    def AUTHORIZATION_PASS(self, arg: str) -> Deferred | None:
        if self._user is None:
            return self.err("Send USER first")
        user, self._user = self._user, None
        return self._login(user, arg)

    def AUTHORIZATION_AUTH(self, arg: str) -> Deferred | None:
        if not arg:
            self.send(b"+OK\r\nPLAIN\r\n.\r\n")
            return None
        mechanism, _, initial = arg.partition(" ")
        if mechanism.upper() != "PLAIN":
            return self.err("Unsupported authentication mechanism")
        if not self._plaintext_ok():
            return self.err("[AUTH] Plaintext authentication disallowed on non-secure connections")
        if initial and initial != "=":
            return self._auth_plain(initial.encode())
        self._sasl = self._auth_plain
        self.send(b"+ \r\n")
        return None

    def _auth_plain(self, line: bytes) -> Deferred | None:
        try:
            credentials = sasl_plain(line)
        except SASLError as e:
            return self.err(f"Cannot decode response: {e}")
        if credentials is None:
            return self.err("Authentication cancelled")
        return self._login(*credentials)

    def AUTHORIZATION_QUIT(self, arg: str) -> None:
        self.ok("Bye")
        self.close()

    def AUTHORIZATION_NOOP(self, arg: str) -> None:
        self.err("NOOP not allowed before login")

    def _login(self, username: str, password: str) -> Deferred:
        f = self.factory
        d = f.authenticator.authenticate(username, password)

        def checked(address: str | None) -> Deferred | None:
            if address is None:
                self.err("[AUTH] Authentication failed")
                if self.auth_failed(username, password):
                    self.close()
                return None
            self.auth_succeeded(address)
            if address in f.locks:
                self.err("[IN-USE] Mailbox is locked by another POP3 session")
                return None
            f.locks.add(address)
            opened = f.blocking.run(open_drop, address, f.store.maildir(address))
            return opened.addCallbacks(self._opened, self._open_failed, errbackArgs=(address,))

        return d.addCallback(checked)

    def _opened(self, drop: Drop) -> None:
        if self.closing:
            self.factory.locks.discard(drop.address)
            drop.release()
            return
        self.drop = drop
        self.ok(f"Logged in, {len(drop.messages)} messages ({sum(drop.sizes)} octets)")

    def _open_failed(self, reason: Any, address: str) -> None:
        self.factory.locks.discard(address)
        if reason.check(MailboxInUse):
            self.err("[IN-USE] Mailbox is locked by another POP3 session")
            return
        self.log.failure("pop3: cannot open mailbox {address}", reason, address=address)
        self.err("[SYS/TEMP] Cannot open mailbox")

    # TRANSACTION state

    def _message(self, arg: str) -> int | None:
        """The 0-based index of a live message named by C{arg}, else reply."""
        assert self.drop is not None
        words = arg.split()
        n = _number(words[0]) if words else None
        if n is None:
            self.err("Syntax error: message number expected")
            return None
        n -= 1
        if not 0 <= n < len(self.drop.messages) or n in self.drop.deleted:
            self.err("No such message")
            return None
        return n

    def TRANSACTION_STAT(self, arg: str) -> None:
        drop = self.drop
        assert drop is not None
        live = [i for i in range(len(drop.messages)) if i not in drop.deleted]
        self.ok(f"{len(live)} {sum(drop.sizes[i] for i in live)}")

    def _listing(self, arg: str, value: Callable[[int], str]) -> None:
        drop = self.drop
        assert drop is not None
        if arg.strip():
            n = self._message(arg)
            if n is not None:
                self.ok(f"{n + 1} {value(n)}")
            return
        lines = [f"{i + 1} {value(i)}\r\n" for i in range(len(drop.messages)) if i not in drop.deleted]
        self.send(("+OK\r\n" + "".join(lines) + ".\r\n").encode())

    def TRANSACTION_LIST(self, arg: str) -> None:
        assert self.drop is not None
        sizes = self.drop.sizes
        self._listing(arg, lambda i: str(sizes[i]))

    def TRANSACTION_UIDL(self, arg: str) -> None:
        assert self.drop is not None
        messages = self.drop.messages
        self._listing(arg, lambda i: uidl_of(messages[i]))

    def TRANSACTION_RETR(self, arg: str) -> Deferred | None:
        n = self._message(arg)
        return None if n is None else self._retriever.send_message(n, None)

    def TRANSACTION_TOP(self, arg: str) -> Deferred | None:
        parts = arg.split()
        lines = _number(parts[1]) if len(parts) == 2 else None
        if lines is None:
            return self.err("Syntax: TOP msg lines")
        n = self._message(parts[0])
        return None if n is None else self._retriever.send_message(n, lines)

    def TRANSACTION_DELE(self, arg: str) -> None:
        n = self._message(arg)
        if n is not None:
            assert self.drop is not None
            self.drop.deleted.add(n)
            self._retriever.discard(n)
            self.ok(f"Message {n + 1} deleted")

    def TRANSACTION_RSET(self, arg: str) -> None:
        assert self.drop is not None
        self.drop.deleted.clear()
        self.ok()

    def TRANSACTION_NOOP(self, arg: str) -> None:
        self.ok()

    def TRANSACTION_QUIT(self, arg: str) -> Deferred:
        drop = self.drop
        assert drop is not None
        doomed = [drop.messages[i] for i in sorted(drop.deleted)]

        def remove() -> list[str]:
            return [m.name for m in doomed if drop.maildir.remove(m)]

        def update() -> list[str]:
            # Under the folder's cross-process lock, as IMAP's STORE and
            # EXPUNGE are: a flag rename another node makes meanwhile
            # happens wholly before (the file is found by its new name)
            # or after (there is nothing left to rename). The mailbox's
            # pop3.lock is held until the session ends, so [IN-USE] holds.
            if not doomed:
                return []
            return locked_unless_gone(drop.maildir.path, [], remove)

        def done(removed: list[str]) -> Any:
            if self.factory.quota is not None and removed:
                # Answered once every process sharing the Maildir sees the room made.
                return self.factory.quota.removed(drop.address, removed).addCallback(bye)
            return bye(None)

        def bye(_: object) -> None:
            self.ok(f"Bye, {len(doomed)} messages deleted")
            self.close()

        def failed(reason: Any) -> None:
            self.log.failure("pop3: UPDATE failed for {address}", reason, address=drop.address)
            self.err("[SYS/TEMP] Some deleted messages were not removed")
            self.close()

        return self.factory.blocking.run(update).addCallbacks(done, failed)


class POP3Factory(SessionFactory):
    """Builds POP3 sessions; C{locks} is shared by every POP3 listener."""

    protocol = POP3Server

    def __init__(self, *, store: MailStore, blocking: Blocking, locks: set[str],
                 quota: QuotaService | None = None, **services: Any) -> None:
        super().__init__(**services)
        self.quota = quota  # told of deletions: the account's usage
        self.store = store
        self.blocking = blocking
        self.locks = locks
