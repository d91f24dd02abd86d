# -*- test-case-name: tests.test_web_messages -*-
"""
Message IDs for the web API: opaque, URL-safe and stable, and decodable
without an index.

An ID is the base64url text (no padding) of C{<mailbox>/<folder>/<base>}:
the mailbox address, the Maildir++ folder (empty for INBOX, the only one
the API shows today) and the message file's base name, which never
changes when its flags do. None of the three can hold a C{/}. Decoding
checks each part the way the store itself would (the address must be a
canonical plain address, the base a plain Maildir name), so an ID never
becomes an unchecked file-system path.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from twisted_mail_screen.store.addresses import AddressError, normalise_address
from twisted_mail_screen.store.maildir_names import base_of

#: Longer IDs are refused before any decoding (an address is at most 318
#: characters, a base name about a hundred).
MAX_ID_LENGTH = 1024
_ID = re.compile(r"[A-Za-z0-9_-]+\Z")
#: A Maildir base name: printable ASCII without "/" or ":" (the flags'
#: separator), not starting with a dot (never "." or "..").
_BASE = re.compile(r"(?!\.)[!-.0-9;-~]{1,255}\Z")


class BadMessageId(ValueError):
    """Not an ID this server made (garbled, or naming something it never would)."""


@dataclass(frozen=True)
class MessageRef:
    """Where one message lives: C{mailbox} address, C{folder} (C{""} is INBOX), file C{base}."""

    mailbox: str
    folder: str
    base: str

    @property
    def id(self) -> str:
        text = f"{self.mailbox}/{self.folder}/{self.base}".encode()
        return base64.urlsafe_b64encode(text).rstrip(b"=").decode("ascii")


def message_id(mailbox: str, file_name: str, folder: str = "") -> str:
    """The ID of the message stored as C{file_name} (flags or not) in C{mailbox}'s C{folder}."""
    return MessageRef(mailbox.lower(), folder, base_of(file_name)).id


def decode(message_id: str) -> MessageRef:
    """
    The message an ID names, every part checked.

    @raise BadMessageId: the ID is not one this server could have made.
    """
    if len(message_id) > MAX_ID_LENGTH or not _ID.match(message_id):
        raise BadMessageId("not a message ID")
    try:
        text = base64.urlsafe_b64decode(message_id + "=" * (-len(message_id) % 4)).decode("utf-8")
    except (binascii.Error, ValueError) as e:
        raise BadMessageId("not a message ID") from e
    parts = text.split("/")
    if len(parts) != 3:
        raise BadMessageId("not a message ID")
    mailbox, folder, base = parts
    try:
        canonical = normalise_address(mailbox)
    except AddressError as e:
        raise BadMessageId("not a message ID") from e
    if canonical != mailbox or folder != "" or not _BASE.match(base):
        raise BadMessageId("not a message ID")
    ref = MessageRef(mailbox, folder, base)
    if ref.id != message_id:
        raise BadMessageId("not a message ID")  # one message, one spelling
    return ref


def valid_base(base: str) -> bool:
    """Whether a file's base name can be named by an ID (other files are not shown)."""
    return bool(_BASE.match(base))
