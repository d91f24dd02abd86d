# -*- test-case-name: tests.test_smtp -*-
"""
The seams between protocol code and the shared services.

Protocol code (SMTP, POP3, IMAP) never decides policy itself. For each new
connection it asks the screening service for a L{ClientScreen} and reports
every protocol event to it; the answer says whether to go on or close. It
asks the freeze store whether an account may send. These are plain typing
protocols; the null implementations here are what a server runs with when
screening is switched off. L{AdminFreezeStore} and L{Notifier} are the
seams the screening service itself needs.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted_mail_screen.screening.listfile import Entry, ExpiringFile


class ClientScreen(Protocol):
    """
    Screening's view of one client connection.

    @ivar refusal: C{None} when the connection may be served; otherwise the
        reason text to put in the protocol's refusal reply before closing.
    @ivar blocked: whether an event of this session has blocked its client
        (as opposed to only ending the session).
    """

    refusal: str | None
    blocked: bool

    def auth_failed(self, username: str, secret: bytes) -> bool:
        """
        Report a failed authentication. C{secret} is only ever hashed.

        @return: C{True} when the session must now be closed.
        """

    def auth_succeeded(self, username: str) -> None:
        """Report a successful authentication."""

    def rcpt_unknown(self) -> bool:
        """
        Report a "550 5.1.1 unknown user" reply (SMTP only).

        @return: C{True} when the session must now be closed.
        """

    def rset(self) -> bool:
        """
        Report an RSET command (SMTP only).

        @return: C{True} when the session must now be closed.
        """

    def closed(self) -> None:
        """Report that the connection has ended."""


class Screening(Protocol):
    """The screening service shared by every listener."""

    def open(self, host: str, protocol: str) -> ClientScreen:
        """
        Screen a new connection from C{host} (a textual IP address, or
        C{""} for a UNIX socket) to C{protocol} (C{"smtp"},
        C{"submission"}, C{"pop3"} or C{"imap"}).
        """


class FreezeStore(Protocol):
    """Accounts that may still receive and read mail but not send."""

    def is_frozen(self, username: str) -> bool:
        """Whether C{username} (a canonical address) is frozen now."""


class AdminFreezeStore(FreezeStore, Protocol):
    """
    The freeze store as screening and the administrator use it
    (L{twisted_mail_screen.screening.freeze.FileFreezeStore} and its
    in-memory twin).
    """

    @property
    def table(self) -> ExpiringFile:
        """The in-memory table and its file (for writing it off the reactor thread)."""

    def freeze(self, username: str, minutes: int | None, reason: str,
               log: bool = True) -> Entry:
        """Freeze C{username} for C{minutes} (C{None} or 0: until thawed)."""

    def thaw(self, username: str) -> bool:
        """Thaw C{username} at once; whether it was frozen."""

    def entries(self) -> list[Entry]:
        """The frozen accounts."""

    def reload_if_changed(self) -> bool:
        """Pick up hand edits of the backing file, if any; whether it was re-read."""

    def expire(self) -> list[Entry]:
        """Drop lapsed freezes from the table and its file; the ones dropped."""


class Notifier(Protocol):
    """
    Where screening reports blocks and freezes
    (L{twisted_mail_screen.screening.notify.PostmasterNotifier}).
    """

    def notify_block(self, address: str, rule: str, count: int, limit: int,
                     window_minutes: int | None, protocol: str,
                     expires: float | None, minutes: int | None,
                     events: Any = (), offence: int = 1) -> None:
        """A client was blocked."""

    def notify_freeze(self, username: str, address: str, protocol: str,
                      failures: int, limit: int, frozen: bool,
                      expires: float | None, events: Any = ()) -> None:
        """A session hit its authentication limit (and maybe froze an account)."""

    def flush(self) -> None:
        """Send what is held back now (the service is stopping)."""


class OpenScreen:
    """A client screening does not apply to: counted nowhere, never closed."""

    __slots__ = ()
    refusal = None
    blocked = False

    def auth_failed(self, username: str, secret: bytes) -> bool:
        return False

    def auth_succeeded(self, username: str) -> None:
        pass

    def rcpt_unknown(self) -> bool:
        return False

    def rset(self) -> bool:
        return False

    def closed(self) -> None:
        pass


class NullScreening:
    """Screening switched off: every client is served, nothing counted."""

    def open(self, host: str, protocol: str) -> ClientScreen:
        return OpenScreen()


class NullFreezeStore:
    """No account is ever frozen."""

    def is_frozen(self, username: str) -> bool:
        return False
