# -*- test-case-name: tests.test_smtp_dsn -*-
"""
What an SMTP envelope asks of delivery beyond its addresses: SMTPUTF8
(RFC 6531) and the DSN requests (RFC 3461), as the SMTP server accepted
them and as the queue keeps and passes them on.

C{xtext} (RFC 3461 4) is how ENVID and ORCPT travel in a command line:
printable ASCII but C{+} and C{=}, and C{+XX} for any other octet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SUCCESS, FAILURE, DELAY, NEVER = "SUCCESS", "FAILURE", "DELAY", "NEVER"

#: xtext: xchar (ASCII "!".."~" but "+" and "=") or "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*\Z")
_HEX = re.compile(r"\+([0-9A-F]{2})")


class XtextError(ValueError):
    """Text that is not xtext, or decodes to something unusable."""


def xtext_decode(text: str) -> str:
    """The text C{text} (xtext) stands for; printable ASCII or UTF-8, no controls."""
    if not _XTEXT.match(text):
        raise XtextError("not xtext (RFC 3461 4)")
    raw = _HEX.sub(lambda m: chr(int(m.group(1), 16)), text).encode("latin-1")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise XtextError("xtext does not decode to UTF-8") from e
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded):
        raise XtextError("control character in xtext")
    return decoded


def xtext_encode(text: str) -> str:
    """C{text} as xtext (UTF-8 octets outside xchar as C{+XX})."""
    return "".join(chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
                   for b in text.encode("utf-8"))


@dataclass(frozen=True)
class RecipientRequest:
    """
    One RCPT's DSN parameters. C{notify}: the NOTIFY keywords given,
    C{()} when none was (the default, RFC 3461 4.1: failure and delay
    notices). C{orcpt}: the ORCPT value, C{"type;address"} decoded.
    """

    notify: tuple[str, ...] = ()
    orcpt: str = ""

    def wants(self, what: str) -> bool:
        """Whether a notice of kind C{what} (SUCCESS, FAILURE, DELAY) is asked for."""
        if not self.notify:
            return what != SUCCESS
        return what in self.notify


@dataclass(frozen=True)
class EnvelopeRequest:
    """
    The envelope's extensions. C{smtputf8}: MAIL carried SMTPUTF8.
    C{ret}: C{"FULL"}, C{"HDRS"} or C{""}; C{envid}: the ENVID, decoded;
    C{recipients}: the DSN parameters of each final address that has any.
    """

    smtputf8: bool = False
    ret: str = ""
    envid: str = ""
    recipients: dict[str, RecipientRequest] = field(default_factory=dict)

    def of(self, address: str) -> RecipientRequest:
        return self.recipients.get(address, RecipientRequest())

    def wants(self, address: str, what: str) -> bool:
        return self.of(address).wants(what)
