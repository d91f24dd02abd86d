# -*- test-case-name: tests.test_pytest_plugin -*-
"""
What a test server's Maildirs hold, read as a test sees mail: each
delivered message once, as an C{email.message.EmailMessage}, with its
envelope, and a small Mailpit-like query language to pick some.

The envelope is rebuilt from the files alone: the sender from the
C{Return-Path:} header the server puts on top of every local delivery,
the recipients from the mailboxes the one delivery was linked into (one
file name, the same in each INBOX). In site mode an alias shows as the
account it delivers to, not as the address given in C{RCPT TO}.

This module imports no Twisted: reading files needs no reactor.
"""

from __future__ import annotations

import email.policy
import os
import shlex
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Callable

from twisted_mail_screen.store.maildir_names import base_of, delivery_order

_parser = BytesParser(policy=email.policy.default)

#: The query fields; any other "word:" is an error, so a typo does not match nothing quietly.
FIELDS = ("to", "from", "subject")


@dataclass(frozen=True)
class Term:
    field: str | None  # None: free text
    value: str
    negated: bool = False


def parse_query(query: str | None) -> list[Term]:
    """
    C{to:bob@x from:alice subject:"two words" invoice -subject:spam}:
    whitespace-separated terms, all of which must match; quotes group
    words; a leading C{-} negates a term.

    @raise ValueError: for an unknown C{field:} prefix.
    """
    terms: list[Term] = []
    for word in shlex.split(query or ""):
        negated = word.startswith("-") and len(word) > 1
        if negated:
            word = word[1:]
        field, colon, value = word.partition(":")
        if colon and field.lower() in FIELDS:
            terms.append(Term(field.lower(), value.lower(), negated))
        elif colon and field.isalpha() and value:
            raise ValueError(f"query {query!r}: unknown field {field + ':'!r} "
                             f"(known: {', '.join(f + ':' for f in FIELDS)} and free text)")
        else:
            terms.append(Term(None, word.lower(), negated))
    return terms


def _matches(term: Term, message: EmailMessage, raw: bytes) -> bool:
    if term.field == "to":
        haystack = " ".join([*message.envelope_to,  # type: ignore[attr-defined]
                             str(message.get("To", "")), str(message.get("Cc", ""))])
    elif term.field == "from":
        haystack = f"{message.envelope_from} {message.get('From', '')}"  # type: ignore[attr-defined]
    elif term.field == "subject":
        haystack = str(message.get("Subject", ""))
    else:
        haystack = raw.decode("utf-8", "replace") + " " + str(message.get("Subject", ""))
    return (term.value in haystack.lower()) != term.negated


def matcher(query: str | None) -> Callable[[EmailMessage, bytes], bool]:
    terms = parse_query(query)
    return lambda message, raw: all(_matches(t, message, raw) for t in terms)


def _inbox_files(mail_root: str) -> dict[str, tuple[list[str], list[str]]]:
    """Base name -> (recipient addresses, paths), over every INBOX."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    for domain in _listdir(mail_root):
        for local in _listdir(os.path.join(mail_root, domain)):
            for sub in ("new", "cur"):
                directory = os.path.join(mail_root, domain, local, sub)
                for name in _listdir(directory):
                    recipients, paths = found.setdefault(base_of(name), ([], []))
                    recipients.append(f"{local}@{domain}")
                    paths.append(os.path.join(directory, name))
    return found


def _listdir(path: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(path) if not n.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def read_messages(mail_root: str, query: str | None = None) -> list[EmailMessage]:
    """Every delivered message (oldest first, by its unique name) that matches C{query}."""
    match = matcher(query)
    out: list[EmailMessage] = []
    files = _inbox_files(mail_root)
    for base in sorted(files, key=delivery_order):
        recipients, paths = files[base]
        raw = _read_any(paths)
        if raw is None:  # expunged meanwhile
            continue
        message = parse(raw, None, recipients)
        if match(message, raw):
            out.append(message)
    return out


def parse(raw: bytes, sender: str | None, recipients: list[str]) -> EmailMessage:
    """
    A message with its envelope as attributes: C{envelope_from} (C{None}:
    read from the C{Return-Path:} header) and C{envelope_to} (sorted).
    """
    message = _parser.parsebytes(raw)
    assert isinstance(message, EmailMessage)
    if sender is None:
        sender = str(message.get("Return-Path", "")).strip()
        sender = sender[1:-1] if sender.startswith("<") else sender
    message.envelope_from = sender  # type: ignore[attr-defined]
    message.envelope_to = sorted(set(recipients))  # type: ignore[attr-defined]
    return message


def _read_any(paths: list[str]) -> bytes | None:
    for path in paths:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            continue
    return None


def purge(mail_root: str) -> int:
    """Delete every message file in every mailbox and folder; the number removed."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(mail_root):
        if os.path.basename(dirpath) in ("new", "cur"):
            for name in filenames:
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def summary(messages: list[EmailMessage], limit: int = 20) -> str:
    """One line a message, for a failed wait's explanation."""
    if not messages:
        return "no message arrived"
    lines = [f"{len(messages)} message(s) arrived:"]
    for m in messages[:limit]:
        lines.append(f"  - from <{m.envelope_from}> to {', '.join(m.envelope_to)}: "  # type: ignore[attr-defined]
                     f"Subject: {m.get('Subject', '(none)')!s}")
    if len(messages) > limit:
        lines.append(f"  ... and {len(messages) - limit} more")
    return "\n".join(lines)
