# -*- test-case-name: tests.test_imap_utf8 -*-
"""
UTF8=ACCEPT (RFC 6855). Once a client has sent C{ENABLE UTF8=ACCEPT}
(before selecting a folder, as 3 requires), mailbox names are UTF-8 in its
commands and in our responses instead of modified UTF-7 (L{parse} reads
and writes them by the session's C{utf8} flag); quoted strings may hold
UTF-8 (SEARCH, LIST patterns) as they always could here; and APPEND takes
the message as C{UTF8 (~{n}...)}, a literal8 (RFC 3516) whose message may
carry UTF-8 headers (RFC 6532). As RFC 6855 3 (and its erratum 4029)
ask, a SEARCH with a CHARSET, or a SORT or THREAD with a charset other than
UTF-8, is then BAD: the strings are UTF-8 whatever the label says.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from twisted_mail_screen.protocols.imap.account_commands import AccountCommands
from twisted_mail_screen.protocols.imap.parse import Atom, BadCommand

CAPABILITIES = ["UTF8=ACCEPT"]


class Utf8Accept(AccountCommands):
    """ENABLE UTF8=ACCEPT and APPEND's UTF8 data item (state in L{SessionCore})."""

    def enable_extension(self, name: str) -> bool:
        if name == "UTF8=ACCEPT":
            if self.state == "selected":
                raise BadCommand("UTF8=ACCEPT must be enabled before a mailbox is selected")
            self.utf8 = True
            return True
        return super().enable_extension(name)

    def do_APPEND(self, tag: bytes, args: list) -> Any:
        # APPEND mailbox [flags] [date] UTF8 (~{n}<message>): the tokenizer
        # gives the literal8 as Atom "~" then the literal, in a list.
        if len(args) >= 3 and isinstance(args[-2], Atom) and args[-2].upper() == "UTF8":
            data = args[-1]
            if not (isinstance(data, list) and len(data) == 2 and data[0] == "~"
                    and isinstance(data[1], bytes)):
                raise BadCommand("UTF8 needs a parenthesized literal8: UTF8 (~{n})")
            if not self.utf8:
                raise BadCommand("APPEND UTF8 needs ENABLE UTF8=ACCEPT first")
            args = list(args[:-2]) + [data[1]]
        return super().do_APPEND(tag, args)

    def do_SEARCH(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        if self.utf8 and args and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
            raise BadCommand("SEARCH takes no CHARSET once UTF8=ACCEPT is enabled")
        return super().do_SEARCH(tag, args, uid)  # type: ignore[misc]

    def do_SORT(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        self._utf8_charset(args, 1)
        return super().do_SORT(tag, args, uid)  # type: ignore[misc]

    def do_THREAD(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        self._utf8_charset(args, 1)
        return super().do_THREAD(tag, args, uid)  # type: ignore[misc]

    def _utf8_charset(self, args: list, index: int) -> None:
        if self.utf8 and len(args) > index and isinstance(args[index], (Atom, bytes)):
            label = args[index]
            charset = label.decode("ascii", "replace") if isinstance(label, bytes) else str(label)
            if charset.upper() != "UTF-8":
                raise BadCommand(f"charset must be UTF-8 once UTF8=ACCEPT is enabled, not {charset[:20]}")
