# -*- test-case-name: tests.test_pytest_plugin -*-
"""
What a test server's Maildirs hold, read as a test sees mail: each
delivered message once, as an C{email.message.EmailMessage}, with its
envelope, picked with a search in Mailpit's syntax (the web API's parser).

The envelope is rebuilt from the files alone: the sender from the
C{Return-Path:} header the server puts on top of every local delivery,
the recipients from the mailboxes the one delivery was linked into (one
file name, the same in each INBOX). In site mode an alias shows as the
account it delivers to, not as the address given in C{RCPT TO}.

This module imports no Twisted: reading files needs no reactor.
"""

from __future__ import annotations

import dataclasses
import email.policy
import os
import re
from email.message import EmailMessage
from email.parser import BytesParser

from twisted_mail_screen.store.maildir_names import base_of, delivery_order, flags_of
from twisted_mail_screen.web.mailsearch import Candidate, Query, split_words
from twisted_mail_screen.web.mailsearch import parse_query as mailsearch_query
from twisted_mail_screen.web.summary import summarize

_parser = BytesParser(policy=email.policy.default)

#: Mailpit's field prefixes (docs/api.md, "Search"). Mailpit reads any other
#: C{word:} as free text; here it is an error, so a typo does not quietly match nothing.
FIELDS = ("from", "to", "cc", "bcc", "reply-to", "addressed", "subject", "message-id", "tag",
          "is", "has", "after", "before", "larger", "smaller")
_PREFIX = re.compile(r"[-!]?([A-Za-z][A-Za-z-]*):([^/])")  # not a URL's "https://"


def parse_query(query: str | None) -> Query:
    """
    A search in Mailpit's syntax, parsed by the web API's own parser
    (L{twisted_mail_screen.web.mailsearch}): one implementation of what
    a query means, here and over HTTP.

    @raise ValueError: an unknown C{field:} prefix, or what the web API
        answers 400 for (a bad date or size, an unclosed quote).
    """
    text = query or ""
    for word in split_words(text):
        found = _PREFIX.match(word)
        if found and found.group(1).lower() not in FIELDS:
            raise ValueError(f"query {query!r}: unknown field {found.group(1) + ':'!r} "
                             f"(Mailpit's fields: {', '.join(f + ':' for f in FIELDS)})")
    return mailsearch_query(text)


def _candidate(message: EmailMessage, raw: bytes, read: bool, created: float) -> Candidate:
    """
    What the query is matched against. As Mailpit does, an envelope
    recipient the headers do not name counts as a Bcc address.
    """
    summary = summarize(raw, len(raw))
    named = {a["Address"].lower() for key in ("To", "Cc", "Bcc")
             for a in summary.addresses[key]}
    hidden = [r for r in message.envelope_to if r.lower() not in named]  # type: ignore[attr-defined]
    if hidden:
        addresses = dict(summary.addresses)
        addresses["Bcc"] = addresses["Bcc"] + [{"Name": "", "Address": r} for r in hidden]
        summary = dataclasses.replace(summary, addresses=addresses, search_text=" ".join(
            [summary.search_text, *(r.lower() for r in hidden)]))
    return Candidate(summary, read, created)


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
    """
    Every delivered message (oldest first, by its unique name) that
    matches C{query}. A message is read (C{is:read}) when some
    recipient's copy has the Seen flag; its arrival (C{after:},
    C{before:}) is its file's modification time.
    """
    compiled = parse_query(query)
    out: list[EmailMessage] = []
    files = _inbox_files(mail_root)
    for base in sorted(files, key=delivery_order):
        recipients, paths = files[base]
        found = _read_any(paths)
        if found is None:  # expunged meanwhile
            continue
        raw, created = found
        message = parse(raw, None, recipients)
        read = any("S" in flags_of(os.path.basename(p)) for p in paths)
        if not compiled.words or compiled.matches(_candidate(message, raw, read, created)):
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


def _read_any(paths: list[str]) -> tuple[bytes, float] | None:
    """The content of the first copy still there, and its modification time."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime
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
