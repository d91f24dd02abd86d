# -*- test-case-name: tests.test_smtp_injection -*-
"""
The submission checks of a message's header section (RFC 6409): whose
name it is sent in, and what the server must add.

Readers do not agree on where a header field is. Python's C{email}
parser ends the header section at the first line it cannot parse and
takes a line starting C{"From "} for an mbox separator, so
C{From : bob@example.test} (the obsolete syntax of RFC 5322 4.5, space
before the colon) is invisible to it, while our IMAP C{HEADER.FIELDS},
most mail readers and RFC 5322 take it as a From field. A check that uses
one reader's view can be bypassed by writing for another. So the check
here takes the widest view: every line up to the first empty line whose
name, with trailing blanks before the colon removed, is C{From} or
C{Sender} in any case, folded lines unfolded; and it accepts only values
that every reader parses to the same mailboxes.
"""

from __future__ import annotations

import email.header
import re
import secrets
from dataclasses import dataclass
from email.errors import NonASCIILocalPartDefect, ObsoleteHeaderDefect
from email.policy import default as default_policy
from email.utils import formatdate, getaddresses
from typing import Callable


#: The fields the checks need, found on the lower-cased section by C-level
#: searches: after a line break, the name, blanks, the colon (RFC 5322 4.5
#: allows blanks before it).
_SENDERS = re.compile(rb"\n(from|sender)[ \t]*:")
_DATE = re.compile(rb"\ndate[ \t]*:")
_MESSAGE_ID = re.compile(rb"\nmessage-id[ \t]*:")
#: A field's value: the rest of its line and its continuation lines.
_VALUE = re.compile(rb"[^\n]*(?:\n[ \t][^\n]*)*")

#: Largest header section checked (Exim's C{header_maxsize} default). The
#: scan costs about 35 ms per MiB in the worst case, on the reactor thread.
MAX_SECTION = 1024 * 1024
#: Longest From or Sender value checked (unfolded). A legitimate one is a few
#: addresses; the parser used below is recursive and not linear.
MAX_VALUE = 4096


class Refusal(Exception):
    """A message the submission server does not accept; the reason in words."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.status = status
        self.text = text


@dataclass
class HeaderFacts:
    """What the checks found in one header section."""

    senders: dict[str, list[str]]  # "from"/"sender" -> unfolded values, in order
    has_date: bool
    has_message_id: bool


def submission(message: bytes, user: str, owns: Callable[[str], bool], hostname: str,
               now: float) -> bytes:
    """
    C{message} (LF line endings) as submitted by C{user}: refused unless
    every From: and Sender: address is the user's own (C{owns}), with the
    Date: and Message-ID: it lacks added (RFC 6409 8.2, 8.3).

    @raise Refusal: the message names someone else, or cannot be checked.
    """
    facts = scan(header_section(message))
    check_senders(facts, owns, user)
    added = b""
    if not facts.has_date:
        added += b"Date: " + formatdate(now, localtime=True).encode() + b"\n"
    if not facts.has_message_id:
        added += f"Message-ID: <{int(now)}.{secrets.token_hex(8)}@{hostname}>\n".encode()
    return added + message


def header_section(message: bytes) -> bytes:
    """The header lines of an LF-ended message: everything before the first empty line."""
    if message.startswith(b"\n"):
        return b""
    end = message.find(b"\n\n")
    return message if end < 0 else message[:end + 1]


def scan(section: bytes) -> HeaderFacts:
    """
    The From and Sender values and whether Date and Message-ID are there.
    C{section} has LF line endings and no CR (DATA refuses bare CR).
    Stops at the second From or Sender: that is refused anyway, and a
    header of a million From lines then costs no more than one.
    """
    if len(section) > MAX_SECTION:
        raise Refusal(552, "5.3.4", f"Header section larger than {MAX_SECTION} octets")
    lowered = b"\n" + section.lower()
    facts = HeaderFacts({"from": [], "sender": []}, _DATE.search(lowered) is not None,
                        _MESSAGE_ID.search(lowered) is not None)
    for m in _SENDERS.finditer(lowered):
        value = _VALUE.match(section, m.end() - 1)  # the "\n" prepended shifts by one
        assert value is not None
        values = facts.senders[m.group(1).decode("ascii")]
        values.append(_unfold(value.group()))
        if len(values) > 1:
            break
    return facts


def _unfold(raw: bytes) -> str:
    return raw.replace(b"\n", b"").decode("utf-8", "replace").strip(" \t")


def check_senders(facts: HeaderFacts, owns: Callable[[str], bool], user: str) -> None:
    """
    Refuse a header section whose From or Sender a reader could show as
    someone other than C{user} (C{owns(address)} says which addresses are
    the user's).

    @raise Refusal: with the reply to give.
    """
    for name, label in (("from", "From"), ("sender", "Sender")):
        values = facts.senders[name]
        if len(values) > 1:
            raise Refusal(550, "5.7.1", f"Message has more than one {label}: header field "
                          "(RFC 5322 3.6 allows one)")
        for value in values:
            for address in mailboxes(value, label):
                if not owns(address):
                    raise Refusal(553, "5.7.1", f"{label}: <{address}> not owned by user {user}")


def mailboxes(value: str, label: str = "From") -> list[str]:
    """
    Every address a reader could take from a From or Sender value: what
    the strict RFC 5322 parser finds, and what C{getaddresses} finds once
    encoded words are decoded. A value the strict parser finds a defect
    in (lenient parsers guess differently there: C{a@x <b@y>} is a@x to
    one, both to another) or a group in (From and Sender take mailboxes
    only, RFC 5322 3.6.2) is refused.

    @raise Refusal: for such a value.
    """
    if len(value) > MAX_VALUE:
        raise Refusal(550, "5.7.1", f"{label}: header field too long")
    try:
        # The strict parser, through the registry the standard library's default policy already holds.
        parsed = default_policy.header_factory(label, value)
    except Exception:  # the parser's recursion on nested comments, among others
        raise Refusal(550, "5.7.1", f"{label}: header field is not a valid address list")
    # A UTF-8 local part is no defect in a message sent with SMTPUTF8 (RFC 6532 3.2).
    defects = [d for d in parsed.defects
               if not isinstance(d, (ObsoleteHeaderDefect, NonASCIILocalPartDefect))]
    if defects or any(g.display_name is not None for g in parsed.groups):
        raise Refusal(550, "5.7.1", f"{label}: header field is not a plain list of mailboxes "
                      "(RFC 5322 3.6.2)")
    found = [a.addr_spec for a in parsed.addresses]
    if "=?" in value:
        # What a reader that decodes before it parses would find.
        try:
            text = str(email.header.make_header(email.header.decode_header(value)))
        except (ValueError, LookupError, UnicodeError):
            raise Refusal(550, "5.7.1", f"{label}: header field has a malformed encoded word")
        found += [a for _, a in getaddresses([text]) if a]
    return list(dict.fromkeys(found))
