# -*- test-case-name: tests.test_imap_list_extended -*-
"""
LIST-EXTENDED (RFC 5258) and LIST-STATUS (RFC 5819): selection options
SUBSCRIBED, REMOTE, RECURSIVEMATCH and SPECIAL-USE (RFC 6154), return
options CHILDREN, SUBSCRIBED, SPECIAL-USE and STATUS, several patterns.

The entries are computed in the worker pool next to the directory scan
(L{extended_entries}); the STATUS of each listed mailbox is then answered
one folder after another as STATUS answers it, right after its LIST line
(RFC 5819 requires nothing in between). LSUB and the plain LIST stay as
L{AccountCommands} answers them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed

from twisted_mail_screen.protocols.imap.account import SPECIAL_USE, FolderError
from twisted_mail_screen.protocols.imap.account_commands import AccountCommands
from twisted_mail_screen.protocols.imap.core import No
from twisted_mail_screen.protocols.imap.listing import MAX_PATTERNS, ListPattern
from twisted_mail_screen.protocols.imap.names import DELIMITER
from twisted_mail_screen.protocols.imap.parse import Atom, BadCommand, encode_mailbox, mailbox_text

CAPABILITIES = ["LIST-EXTENDED", "LIST-STATUS"]
SELECT_OPTIONS = {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
RETURN_OPTIONS = {"CHILDREN", "SUBSCRIBED", "SPECIAL-USE", "STATUS"}
STATUS_ITEMS = {"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ"}

Entry = tuple[str, list[str], bool]  # name, attributes, CHILDINFO ("SUBSCRIBED")


def extended_entries(names: list[str], subs: list[str], patterns: list[ListPattern],
                     select: set[str], returns: set[str]) -> list[Entry]:
    """What an extended LIST answers, in order; blocking-free but long, for a worker."""
    existing = set(names)
    parents: set[str] = set()
    for n in names:
        parts = n.split(DELIMITER)
        parents.update(DELIMITER.join(parts[:i]) for i in range(1, len(parts)))
    subscribed = set(subs)
    sub_parents: set[str] = set()
    for n in subs:
        parts = n.split(DELIMITER)
        sub_parents.update(DELIMITER.join(parts[:i]) for i in range(1, len(parts)))
    by_subscription = "SUBSCRIBED" in select
    recursive = "RECURSIVEMATCH" in select
    if by_subscription:
        candidates = subscribed | (sub_parents if recursive else set())
    else:
        candidates = existing | parents
    show_subscribed = by_subscription or "SUBSCRIBED" in returns
    out: list[Entry] = []
    sent: set[str] = set()  # RFC 5258 3: a name matching several patterns is listed once
    for pat in patterns:
        for name in sorted(candidates, key=lambda n: (n != "INBOX", n)):
            if name in sent or not pat.match(name):
                continue
            attrs: list[str] = []
            if name not in existing:
                attrs.append("\\NonExistent" if name not in parents else "\\Noselect")
            if name in subscribed and show_subscribed:
                attrs.append("\\Subscribed")
            if name in existing or name in parents:
                attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")
            special = SPECIAL_USE.get(name)
            if special and name in existing:
                attrs.append(special)
            if "SPECIAL-USE" in select and not special:
                continue
            childinfo = by_subscription and recursive and name in sub_parents
            if by_subscription and name not in subscribed and not childinfo:
                continue
            sent.add(name)
            out.append((name, attrs, childinfo))
    return out


def _options(tok: Any, what: str) -> list[Any]:
    if not isinstance(tok, list):
        raise BadCommand(f"{what} options must be a parenthesized list")
    return tok


class ExtendedList(AccountCommands):
    """LIST with RFC 5258 and RFC 5819 syntax (state in L{SessionCore})."""

    def do_LIST(self, tag: bytes, args: list, lsub: bool = False) -> Any:
        extended = not lsub and (
            (args and isinstance(args[0], list)) or
            (len(args) > 2 and isinstance(args[2], Atom) and args[2].upper() == "RETURN") or
            (len(args) == 2 and isinstance(args[1], list)))
        if not extended:
            return super().do_LIST(tag, args, lsub)
        args = list(args)
        select: set[str] = set()
        if isinstance(args[0], list):
            for opt in _options(args.pop(0), "selection"):
                name = str(opt).upper()
                if not isinstance(opt, Atom) or name not in SELECT_OPTIONS:
                    raise BadCommand(f"unknown LIST selection option {str(opt)[:20]}")
                select.add(name)
        # RFC 5258 3.1: RECURSIVEMATCH alone means nothing and is an error.
        if "RECURSIVEMATCH" in select and not select - {"RECURSIVEMATCH", "REMOTE"}:
            raise BadCommand("RECURSIVEMATCH needs another selection option")
        returns, status = self._return_options(args[2:])
        if len(args) < 2:
            raise BadCommand("LIST needs a reference and a mailbox pattern")
        reference = mailbox_text(args[0], self.utf8)
        raw = args[1] if isinstance(args[1], list) else [args[1]]
        if not raw or len(raw) > MAX_PATTERNS:
            raise BadCommand("between 1 and %d mailbox patterns" % MAX_PATTERNS)
        pats = [mailbox_text(p, self.utf8) for p in raw]
        assert self.folders is not None
        folders = self.folders
        matchers = [ListPattern(reference, p) for p in pats]

        def gather() -> list[Entry]:
            return extended_entries(folders.names(), folders.subscriptions(), matchers, select, returns)

        def answer(entries: list[Entry]) -> Deferred:
            return self._write_entries(tag, entries, status)

        return self._account_call(gather).addCallback(self.still_here).addCallback(answer)

    def _return_options(self, rest: list) -> tuple[set[str], list[Atom]]:
        if not rest:
            return set(), []
        if len(rest) != 2 or not isinstance(rest[0], Atom) or rest[0].upper() != "RETURN":
            raise BadCommand("LIST arguments: [(selection)] reference pattern(s) [RETURN (options)]")
        returns: set[str] = set()
        status: list[Atom] = []
        opts = _options(rest[1], "return")
        i = 0
        while i < len(opts):
            opt = opts[i]
            name = str(opt).upper()
            if not isinstance(opt, Atom) or name not in RETURN_OPTIONS:
                raise BadCommand(f"unknown LIST return option {str(opt)[:20]}")
            if name == "STATUS":
                i += 1
                if i >= len(opts) or not isinstance(opts[i], list) or not opts[i]:
                    raise BadCommand("STATUS needs a list of status items")
                for item in opts[i]:
                    if not isinstance(item, Atom) or item.upper() not in STATUS_ITEMS:
                        raise BadCommand(f"unknown status item {str(item)[:20]}")
                    status.append(Atom(item.upper()))
            returns.add(name)
            i += 1
        return returns, status

    def _write_entries(self, tag: bytes, entries: list[Entry], status: list[Atom]) -> Deferred:
        todo = iter(entries)

        def next_entry(_: object = None) -> Any:
            for name, attrs, childinfo in todo:
                line = f"LIST ({' '.join(attrs)}) \"{DELIMITER}\" ".encode() \
                    + encode_mailbox(name, self.utf8)
                if childinfo:
                    line += b' ("CHILDINFO" ("SUBSCRIBED"))'
                self.untagged(line)
                if status and not any(a in ("\\NonExistent", "\\Noselect") for a in attrs):
                    # RFC 5819: STATUS right after the mailbox's LIST; a folder that
                    # vanished meanwhile just has none.
                    raw = name.encode("utf-8" if self.utf8 else "imap4-utf-7")
                    d = maybeDeferred(self.do_STATUS, tag, [raw, list(status)])
                    return d.addErrback(lambda f: f.trap(No, FolderError)).addCallback(next_entry)
            return succeed("OK LIST completed")

        return next_entry()
