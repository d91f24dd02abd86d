# -*- test-case-name: tests.test_imap -*-
"""
What every part of an IMAP session shares: its state (authenticated
account, selected folder and the view of it), the way replies are
written, the C{NO} answer, and what the session needs of its factory.

The session is one L{IMAPServer} assembled from L{SessionCore} and the
command classes built on it (L{SelectedView}, L{AccountCommands},
L{MessageCommands}): each is a part of the one session and works on
this shared state, so they are written as its base classes.
"""

from __future__ import annotations

from array import array
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.protocols.imap.account import AccountFolders
from twisted_mail_screen.protocols.imap.flags import SYSTEM_FLAGS
from twisted_mail_screen.protocols.imap.mailbox import Folder
from twisted_mail_screen.protocols.imap.parse import Atom, BadCommand, Token
from twisted_mail_screen.protocols.imap.registry import Registry
from twisted_mail_screen.protocols.session import ScreenedSession
from twisted_mail_screen.runtime.workers import Blocking
from twisted_mail_screen.screening.interfaces import Screening
from twisted_mail_screen.store.auth import Authenticator
from twisted_mail_screen.store.maildir import Maildir, MailStore


class No(Exception):
    """A command that is answered NO, with an optional response code."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.code = code


class Gone(Exception):
    """The connection closed while the command waited on the worker pool: nothing more to do or answer."""


class Services(Protocol):
    """What a session uses of its factory (L{IMAPFactory}): built once, shared by its sessions."""

    config: Config
    store: MailStore
    blocking: Blocking
    registry: Registry
    authenticator: Authenticator
    screening: Screening
    clock: IReactorTime
    tls: Any


class SessionCore(ScreenedSession):
    """
    One IMAP session's state, and its reply primitives.

    @ivar state: C{"unauth"}, C{"auth"} or C{"selected"}.
    @ivar folders: the logged-in account's folders.
    @ivar folder: the selected folder's shared index; C{view} is this
        session's UIDs of it (hence its sequence numbers), C{recent} its
        \\Recent UIDs, C{doomed} UIDs expunged but not yet announced,
        C{seen} the position in the folder's change log caught up to.
    """

    factory: Services

    def __init__(self) -> None:
        super().__init__()
        self.state = "unauth"
        self.address: str | None = None
        self.folders: AccountFolders | None = None
        self.folder: Folder | None = None
        self.folder_name = ""
        self.writable = False
        self.view: array[int] = array("L")
        self.recent: set[int] = set()
        self.doomed: set[int] = set()
        self.seen = 0
        #: UTF8=ACCEPT (RFC 6855) is enabled: mailbox names are UTF-8 both ways.
        self.utf8 = False
        self._idle_tag: bytes | None = None
        self._sasl: Callable[[bytes], Any] | None = None

    def exists(self, path: str) -> "Deferred[bool]":
        """
        Whether the folder at C{path} is (still) a Maildir: a C{stat}, so it
        runs in the worker pool like all other disk work, never on the reactor.
        """
        return self.factory.blocking.run(Maildir(path).exists)

    def still_here(self, result: Any) -> Any:
        """
        C{result}, after a hop through the worker pool, unless the session
        closed meanwhile (its view is then gone): L{Gone} ends the command.
        """
        if self.closing:
            raise Gone()
        return result

    def untagged(self, text: str | bytes) -> None:
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        self.send(b"* " + data + b"\r\n")

    def tagged(self, tag: bytes, text: str) -> None:
        self.send(tag + b" " + text.encode("utf-8", "surrogateescape") + b"\r\n")

    @staticmethod
    def _no_args(args: list) -> None:
        if args:
            raise BadCommand("unexpected arguments")

    def _flag_list(self, tok: Token) -> list[str]:
        items = tok if isinstance(tok, list) else [tok]
        out = []
        for item in items:
            if not isinstance(item, Atom) or not item:
                raise BadCommand("flag expected")
            if item.startswith("\\"):
                if item.lower() == "\\recent":
                    out.append("\\Recent")
                    continue
                match = [f for f in SYSTEM_FLAGS if f.lower() == item.lower()]
                if not match:
                    raise BadCommand(f"unknown system flag {item[:20]}")
                out.append(match[0])
            else:
                if any(c in item for c in "(){%*\"\\]"):
                    raise BadCommand("bad keyword")
                out.append(str(item))
        return out
