# -*- test-case-name: tests.test_smtp -*-
"""
Mail addresses as the server uses them: parsed from SMTP paths, normalised
to lower case, and checked so that every part is safe as a directory name.

Only dot-atom local parts are accepted for delivery (no quoted strings, no
C{%} or C{!} routing, no C{/}); that rules out the classic relay tricks and
means an address can never name a path outside the mail directory.

Local parts may hold UTF-8 (RFC 6531 3.3, atext =/ UTF8-non-ascii): they
are NFC-normalised and lower-cased, at most 64 octets, and refused when a
non-ASCII character is a control, format (bidi overrides, zero-width),
space, separator, surrogate, private-use or unassigned character, so the
directory name is one visible word, and two spellings of one name (composed
or not) are one mailbox. Domains in U-labels are turned into A-labels
(UTS 46 / IDNA 2008, C{xn--...}): routing, storage and the relay see one
ASCII form.
"""

from __future__ import annotations

import re
import unicodedata

import idna

# Every character from U+0080 up, written as "not ASCII": the same set as the
# range \u0080-\U0010ffff inside the class, whose compile takes 5 ms of every
# process's start (the range's charset is expanded; a negated one is not).
_ATEXT = r"(?:[a-z0-9#$&'*+=?^_`{|}~-]|[^\x00-\x7f])"
_LOCAL = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
#: An address literal (RFC 5321 4.1.3), loosely: its characters only.
_LITERAL = re.compile(r"\[(?:ipv6:)?[0-9a-f:.]{1,45}\]\Z")
#: RFC 5321 4.1.2: esmtp-keyword and esmtp-value (no "=", no SP, no controls).
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}\Z")
_VALUE = re.compile(r"[!-<>-~]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Unicode categories never accepted in a local part (see the module docstring).
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


class AddressError(ValueError):
    """An address the server will not use, with the reason in words."""


def valid_domain(domain: str) -> bool:
    return len(domain) <= 253 and bool(_DOMAIN.match(domain))


def valid_local_part(local: str) -> bool:
    if local.isascii():
        return len(local) <= 64 and bool(_LOCAL.match(local))
    return (len(local.encode("utf-8")) <= 64 and bool(_LOCAL.match(local))
            and unicodedata.is_normalized("NFC", local)
            and not any(unicodedata.category(c) in _UNSAFE for c in local if ord(c) > 127))


def ascii_domain(domain: str) -> str:
    """
    C{domain} (lower case) with its U-labels as A-labels.

    @raise AddressError: if it is no valid internationalised domain name.
    """
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as e:
        raise AddressError("domain is not a valid internationalised host name") from e


def normalise_local(local: str) -> str:
    """A local part as mailboxes are named: lower case, and NFC when it is not ASCII."""
    if local.isascii():
        return local.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", local).lower())


def normalise_address(address: str) -> str:
    """
    Return C{address} in canonical form: the local part lower-cased (and
    NFC-normalised), the domain lower-cased ASCII (A-labels).

    @raise AddressError: if it is not a plain C{local@domain} address.
    """
    local, at, domain = address.strip(" \t\r\n").rpartition("@")
    if not at:
        raise AddressError("must be local@domain")
    local = normalise_local(local)
    if not valid_local_part(local):
        raise AddressError("local part is not a plain dot-atom")
    domain = ascii_domain(domain.lower())
    if not valid_domain(domain):
        raise AddressError("domain is not a valid host name")
    return f"{local}@{domain}"


def parse_path(text: str) -> tuple[str, str]:
    """
    Split an SMTP C{MAIL FROM}/C{RCPT TO} argument into the path inside the
    angle brackets and the ESMTP parameters after it.

    Source routes (C{<@a,@b:user@c>}) are accepted and ignored as RFC 5321
    section 3.3 asks. Returns C{("", params)} for the null path C{<>}.

    @raise AddressError: for a malformed path.
    """
    if _CONTROL.search(text):
        # Defence in depth (SMTP refuses such command lines first): a CR or LF
        # in a path would break Return-Path: and the relay's commands.
        raise AddressError("control characters in the path")
    text = text.strip()
    if not text.startswith("<"):
        # Lenient: some clients omit the brackets; the path ends at a space.
        path, _, params = text.partition(" ")
        return path, params.strip()
    end = text.find(">")
    if end < 0:
        raise AddressError("path is missing its closing '>'")
    path, params = text[1:end], text[end + 1:].strip()
    if path.startswith("@"):
        _, colon, path = path.partition(":")
        if not colon:
            raise AddressError("malformed source route")
    if '"' in path or " " in path:
        raise AddressError("quoted local parts are not accepted")
    return path, params


def valid_sender_path(path: str) -> bool:
    """
    Whether C{path} (a MAIL FROM path, not the null path) is a plain
    C{local@domain} in any case, or C{local@[address literal]}: nothing in
    it can break the C{Return-Path:} header or the relay's MAIL command.
    """
    local, at, domain = path.rpartition("@")
    if not at or len(path) > 254:
        return False
    domain = domain.lower()
    try:
        domain = ascii_domain(domain)
    except AddressError:
        return False
    return valid_local_part(normalise_local(local)) and (valid_domain(domain)
                                                         or bool(_LITERAL.match(domain)))


def parse_params(params: str) -> dict[str, str]:
    """
    ESMTP parameters (C{SIZE=123 BODY=8BITMIME}) as an upper-cased dict.

    @raise AddressError: for a keyword or value outside RFC 5321 4.1.2's
        grammar, or a keyword given twice.
    """
    out: dict[str, str] = {}
    for word in params.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            raise AddressError(f"malformed parameter {word[:40]!r}")
        key = key.upper()
        if key in out:
            raise AddressError(f"parameter {key} given twice")
        out[key] = value
    return out
