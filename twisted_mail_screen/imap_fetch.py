# -*- test-case-name: tests.test_imap_fetch -*-
"""
FETCH responses, rendered a bounded chunk of messages at a time.

A row is C{(seq, uid, rel, size, recent)}: everything the folder index
knows. Items that need only the row (FLAGS, UID, RFC822.SIZE) are rendered
without touching the disk; INTERNALDATE needs a C{stat}; the rest read
the message file, once per message, in a worker thread.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

from twisted_mail_screen.imap_message import Part, envelope, literal, section_response, to_crlf
from twisted_mail_screen.imap_mailbox import base_of, flag_names
from twisted_mail_screen.imap_parse import Section, format_datetime

Row = tuple[int, int, str, int, bool]
Att = Union[str, Section]

META = {"UID", "FLAGS", "RFC822.SIZE"}


def needs_disk(atts: Sequence[Att]) -> bool:
    return any(not isinstance(a, str) or a not in META for a in atts)


def needs_body(atts: Sequence[Att]) -> bool:
    return any(not isinstance(a, str) or a not in META | {"INTERNALDATE"} for a in atts)


def flags_item(rel: str, keywords: list[str], recent: bool) -> bytes:
    names = flag_names(rel, keywords)
    if recent:
        names.append("\\Recent")
    return ("FLAGS (" + " ".join(names) + ")").encode("utf-8", "surrogateescape")


def find_file(path: str, rel: str) -> str | None:
    """The current name of a message whose flags another session changed."""
    base = base_of(rel)
    for sub in ("cur", "new"):
        try:
            with os.scandir(os.path.join(path, sub)) as it:
                for e in it:
                    if e.name == base or e.name.startswith(base + ":"):
                        return f"{sub}/{e.name}"
        except FileNotFoundError:
            continue
    return None


def _open(path: str, rel: str) -> tuple[str, bytes | None, float | None]:
    for attempt in range(2):
        try:
            full = os.path.join(path, rel)
            st = os.stat(full)
            return rel, None, st.st_mtime
        except FileNotFoundError:
            if attempt:
                break
            found = find_file(path, rel)
            if found is None:
                break
            rel = found
    return rel, None, None


def render_rows(path: str, rows: Sequence[Row], atts: Sequence[Att], keywords: list[str]) -> bytes:
    """C{* n FETCH (...)} lines for C{rows}; vanished files are left out."""
    out = bytearray()
    disk = needs_disk(atts)
    body = needs_body(atts)
    for seq, uid, rel, size, recent in rows:
        mtime = None
        data: bytes | None = None
        if disk:
            rel, _, mtime = _open(path, rel)
            if mtime is None:
                continue
            if body:
                try:
                    with open(os.path.join(path, rel), "rb") as f:
                        data = to_crlf(f.read())
                except FileNotFoundError:
                    continue
        root = Part(data, 0, len(data)) if data is not None else None
        items: list[bytes] = []
        for att in atts:
            if att == "UID":
                items.append(b"UID %d" % uid)
            elif att == "FLAGS":
                items.append(flags_item(rel, keywords, recent))
            elif att == "RFC822.SIZE":
                items.append(b"RFC822.SIZE %d" % (size if data is None else len(data)))
            elif att == "INTERNALDATE":
                items.append(b'INTERNALDATE "' + format_datetime(mtime or 0).encode() + b'"')
            elif root is None:
                continue
            elif att == "ENVELOPE":
                items.append(b"ENVELOPE " + envelope(root.headers))
            elif att == "BODYSTRUCTURE":
                items.append(b"BODYSTRUCTURE " + root.structure(True))
            elif att == "BODY":
                items.append(b"BODY " + root.structure(False))
            elif att == "RFC822":
                items.append(b"RFC822 " + literal(root.data))
            elif att == "RFC822.HEADER":
                items.append(b"RFC822.HEADER " + literal(root.header_bytes()))
            elif att == "RFC822.TEXT":
                items.append(b"RFC822.TEXT " + literal(root.body_bytes()))
            elif isinstance(att, Section):
                items.append(section_response(root, att))
        out += b"* %d FETCH (" % seq + b" ".join(items) + b")\r\n"
    return bytes(out)


def chunk_rows(rows: list[Row], atts: Sequence[Att]) -> int:
    """How many rows to render per chunk: bounded work and memory."""
    if not needs_disk(atts):
        return 2000
    if not needs_body(atts):
        return 500
    return 50


def body_budget() -> int:
    return 4 * 1024 * 1024


__all__ = ["render_rows", "needs_disk", "needs_body", "flags_item", "chunk_rows", "body_budget",
           "find_file", "Row"]
