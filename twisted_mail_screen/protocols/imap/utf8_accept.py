# -*- test-case-name: tests.test_imap_utf8 -*-
"""
UTF8=ACCEPT (RFC 6855). Once a client has sent C{ENABLE UTF8=ACCEPT}
(before selecting a folder, as 3 requires), mailbox names are UTF-8 in its
commands and in our responses instead of modified UTF-7 (L{parse} reads
and writes them by the session's C{utf8} flag); quoted strings may hold
UTF-8 (SEARCH, LIST patterns) as they always could here; and APPEND takes
the message as C{UTF8 (~{n}...)}, a literal8 (RFC 3516) whose message may
carry UTF-8 headers (RFC 6532).
"""

from __future__ import annotations

from typing import Any

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
