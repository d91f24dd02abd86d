# -*- test-case-name: tests.test_smtp_dsn -*-
"""
The mail transaction's envelope, and the ESMTP parameters of MAIL and RCPT: SIZE and BODY (RFC 1870, 6152),
SMTPUTF8 (RFC 6531), RET and ENVID on MAIL and NOTIFY and ORCPT on RCPT
(RFC 3461). Each check answers with the reply the RFCs give: a
malformed value C{501 5.5.4}, a parameter we do not know C{555 5.5.4}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from twisted_mail_screen.protocols.smtp_bdat import ChunkedMessage
from twisted_mail_screen.store.addresses import AddressError, parse_params
from twisted_mail_screen.store.envelope import (DELAY, FAILURE, NEVER, SUCCESS, EnvelopeRequest,
                                                RecipientRequest, XtextError, xtext_decode)
from twisted_mail_screen.store.routing import Route

#: RFC 1870: size-value ::= 1*20DIGIT, ASCII digits only.
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")
#: RFC 3461 4.2: addr-type is an atom; then ";" and xtext.
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
#: RFC 3461 4.4: ENVID at most 100 characters.
ENVID_LIMIT = 100
#: RFC 3461 4.2: ORCPT at most 500 characters.
ORCPT_LIMIT = 500


class Refused(Exception):
    """A parameter refused, with the reply to give."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(text)
        self.code, self.status, self.text = code, status, text


@dataclass(frozen=True)
class MailParams:
    """MAIL's parameters, checked."""

    smtputf8: bool = False
    ret: str = ""
    envid: str = ""
    size: int = 0  # SIZE=, 0 when not declared (the quota check at RCPT)


@dataclass
class Envelope:
    """One mail transaction: from MAIL to the end of DATA or RSET."""

    sender: str
    recipients: list[Route] = field(default_factory=list)
    #: The BDAT chunks received so far (RFC 3030); DATA is then refused.
    chunks: ChunkedMessage | None = None
    options: MailParams = field(default_factory=MailParams)
    #: Each recipient's DSN parameters, in the order of C{recipients}.
    requests: list[RecipientRequest] = field(default_factory=list)

    def request(self) -> EnvelopeRequest:
        """What delivery is asked beyond the addresses, by final address (the first RCPT wins)."""
        by_address: dict[str, RecipientRequest] = {}
        for route, request in zip(self.recipients, self.requests):
            if request != RecipientRequest():
                for address in route.mailboxes + route.remote:
                    by_address.setdefault(address, request)
        o = self.options
        return EnvelopeRequest(o.smtputf8, o.ret, o.envid, by_address)


def _params(params: str, esmtp: bool, command: str) -> dict[str, str]:
    if params and not esmtp:
        raise Refused(555, "5.5.4", f"{command} parameters need EHLO")
    try:
        return parse_params(params)
    except AddressError as e:
        raise Refused(501, "5.5.4", f"Bad {command} parameters: {e}") from e


def mail_params(params: str, esmtp: bool, max_size: int) -> MailParams:
    """
    Check MAIL's parameters.

    @raise Refused: with the reply for the first bad one.
    """
    smtputf8, ret, envid, size = False, "", "", 0
    for key, value in _params(params, esmtp, "MAIL").items():
        if key == "SIZE":
            if not _SIZE_VALUE.fullmatch(value):
                raise Refused(501, "5.5.4", "Bad SIZE parameter (RFC 1870: 1 to 20 digits)")
            size = int(value)
            if size > max_size:
                raise Refused(552, "5.3.4", "Message size exceeds fixed limit")
        elif key == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise Refused(501, "5.5.4", "Unsupported BODY type")
        elif key == "SMTPUTF8":
            if value:
                raise Refused(501, "5.5.4", "SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET":
            ret = value.upper()
            if ret not in ("FULL", "HDRS"):
                raise Refused(501, "5.5.4", "Bad RET parameter (RFC 3461: FULL or HDRS)")
        elif key == "ENVID":
            try:
                envid = xtext_decode(value)
            except XtextError as e:
                raise Refused(501, "5.5.4", f"Bad ENVID parameter: {e}") from e
            if not envid or len(value) > ENVID_LIMIT:
                raise Refused(501, "5.5.4", "Bad ENVID parameter: 1 to 100 characters")
        else:
            raise Refused(555, "5.5.4", f"Unsupported MAIL parameter {key}")
    return MailParams(smtputf8, ret, envid, size)


def rcpt_params(params: str, esmtp: bool) -> RecipientRequest:
    """
    Check RCPT's parameters.

    @raise Refused: with the reply for the first bad one.
    """
    notify: tuple[str, ...] = ()
    orcpt = ""
    for key, value in _params(params, esmtp, "RCPT").items():
        if key == "NOTIFY":
            words = tuple(value.upper().split(","))
            if words != (NEVER,) and (len(set(words)) != len(words)
                                      or not set(words) <= {SUCCESS, FAILURE, DELAY}):
                raise Refused(501, "5.5.4", "Bad NOTIFY parameter (RFC 3461: NEVER, or "
                              "SUCCESS, FAILURE, DELAY separated by commas)")
            notify = words
        elif key == "ORCPT":
            kind, semi, text = value.partition(";")
            if not semi or not _ADDR_TYPE.match(kind) or not text or len(value) > ORCPT_LIMIT:
                raise Refused(501, "5.5.4", "Bad ORCPT parameter (RFC 3461: addr-type;xtext)")
            try:
                address = xtext_decode(text)
            except XtextError as e:
                raise Refused(501, "5.5.4", f"Bad ORCPT parameter: {e}") from e
            orcpt = f"{kind.lower()};{address}"
        else:
            raise Refused(555, "5.5.4", f"Unsupported RCPT parameter {key}")
    return RecipientRequest(notify, orcpt)
