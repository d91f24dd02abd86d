# -*- test-case-name: tests.test_reactor_budget -*-
"""
LIST and LSUB (RFC 3501 6.3.8-9, RFC 5258): mailbox patterns and the
response lines.

A pattern is matched without backtracking: a pattern of literals and
C{*} only by finding its pieces left to right (what one C{*} skips can
never help a later piece), any other as a bit-parallel automaton whose
states are the pattern positions, so a match costs O(len(name)) big-int
operations however many wildcards the pattern has. A regular expression
with several C{.*} (what this replaced) backtracks exponentially on a
name that almost matches. Patterns are bounded (L{MAX_PATTERN}), and the
whole answer is computed in the worker pool, next to the directory scan
it needs, so a thousand folders cost the reactor only the writing.
"""

from __future__ import annotations

from twisted_mail_screen.protocols.imap.account import SPECIAL_USE
from twisted_mail_screen.protocols.imap.names import DELIMITER
from twisted_mail_screen.protocols.imap.parse import BadCommand, encode_mailbox

#: Characters of reference + pattern; longer is answered BAD. Twice the
#: longest folder name leaves room for any reference a client can mean.
MAX_PATTERN = 1024

#: Patterns in one extended LIST command (RFC 5258); more is answered BAD.
MAX_PATTERNS = 32

_SPECIAL = frozenset(SPECIAL_USE.values())


class ListPattern:
    """A LIST reference and mailbox pattern; L{match} says whether a name is listed."""

    def __init__(self, reference: str, pattern: str) -> None:
        if reference and pattern.startswith(DELIMITER):
            pattern = pattern[1:]
        full = reference + pattern
        if len(full) > MAX_PATTERN:
            raise BadCommand("mailbox pattern too long")
        # INBOX is case-insensitive (names reach us with it spelt "INBOX").
        if full[:5].upper() == "INBOX" and (len(full) == 5 or full[5] == DELIMITER):
            full = "INBOX" + full[5:]
        tokens: list[str] = []
        for c in full:
            # A run of wildcards matches what its widest member matches.
            if c in "*%" and tokens and tokens[-1] in "*%":
                if c == "*":
                    tokens[-1] = "*"
                continue
            tokens.append(c)
        self.text = "".join(tokens)
        self._pieces: list[str] | None = None
        if "%" not in self.text:
            self._pieces = self.text.split("*")
        lit: dict[str, int] = {}
        star = pct = 0
        for i, t in enumerate(tokens):
            if t == "*":
                star |= 1 << i
            elif t == "%":
                pct |= 1 << i
            else:
                lit[t] = lit.get(t, 0) | (1 << i)
        self._lit, self._star, self._wild = lit, star, star | pct
        self._accept = 1 << len(tokens)

    def match(self, name: str) -> bool:
        pieces = self._pieces
        if pieces is not None:
            return self._match_stars(name, pieces)
        lit, star, wild = self._lit, self._star, self._wild
        states = 1 | ((1 & wild) << 1)
        for ch in name:
            stay = states & (star if ch == DELIMITER else wild)
            states = ((states & lit.get(ch, 0)) << 1) | stay
            if not states:
                return False
            states |= (states & wild) << 1
        return bool(states & self._accept)

    @staticmethod
    def _match_stars(name: str, pieces: list[str]) -> bool:
        if len(pieces) == 1:
            return name == pieces[0]
        first, last = pieces[0], pieces[-1]
        if len(name) < len(first) + len(last) or not name.startswith(first) or \
                not name.endswith(last):
            return False
        pos, end = len(first), len(name) - len(last)
        for piece in pieces[1:-1]:
            i = name.find(piece, pos, end)
            if i < 0:
                return False
            pos = i + len(piece)
        return True


class _Everything:
    @staticmethod
    def match(name: str) -> bool:
        return True


def list_entries(names: list[str], regex: "ListPattern | _Everything") -> list[tuple[str, list[str]]]:
    """(name, attributes) for every existing or implied folder that matches."""
    existing = set(names)
    implied: set[str] = set()
    for n in names:
        parts = n.split(DELIMITER)
        for i in range(1, len(parts)):
            implied.add(DELIMITER.join(parts[:i]))
    parents = set(implied)
    out = []
    for name in sorted(existing | implied, key=lambda n: (n != "INBOX", n)):
        if not regex.match(name):
            continue
        attrs = []
        if name not in existing:
            attrs.append("\\Noselect")
        attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")
        if name in SPECIAL_USE:
            attrs.append(SPECIAL_USE[name])
        out.append((name, attrs))
    return out


def list_lines(names: list[str], subs: list[str], patterns: list[ListPattern], lsub: bool,
               select_opts: set[str], return_opts: set[str], utf8: bool = False) -> list[bytes]:
    """The untagged LIST (or LSUB) lines, without the C{* }: blocking-free but long, for a worker."""
    word = "LSUB" if lsub else "LIST"
    subscribed = set(subs)
    present = set(names)
    lines = []
    sent: set[str] = set()  # RFC 5258 3: a name matching several patterns is listed once
    existing: dict[str, list[str]] | None = None
    for pat in patterns:
        if lsub or "SUBSCRIBED" in select_opts:
            if existing is None and not lsub:
                existing = dict(list_entries(names, _Everything()))
            entries = []
            listed = set()
            for n in subs:
                if pat.match(n):
                    if lsub:
                        attrs = [] if n in present else ["\\Noselect"]
                    else:
                        attrs = (existing or {}).get(n, ["\\NonExistent"])
                    entries.append((n, attrs))
                    listed.add(n)
                elif lsub:
                    # RFC 3501 6.3.9: "%" matching only the parent of a
                    # subscribed folder lists the parent as \Noselect.
                    parts = n.split(DELIMITER)
                    for i in range(len(parts) - 1, 0, -1):
                        parent = DELIMITER.join(parts[:i])
                        if pat.match(parent):
                            if parent not in listed and parent not in subscribed:
                                entries.append((parent, ["\\Noselect"]))
                                listed.add(parent)
                            break
        else:
            entries = list_entries(names, pat)
        for n, attrs in entries:
            if n in sent:
                continue
            sent.add(n)
            if "SPECIAL-USE" in select_opts and not any(a in _SPECIAL for a in attrs):
                continue
            if not lsub and n in subscribed and ("SUBSCRIBED" in return_opts or
                                                 "SUBSCRIBED" in select_opts):
                attrs = attrs + ["\\Subscribed"]
            lines.append(f"{word} ({' '.join(attrs)}) \"{DELIMITER}\" ".encode()
                         + encode_mailbox(n, utf8))
    return lines
