# -*- test-case-name: tests.test_imap_quota -*-
"""
QUOTA (RFC 9208) for the session: GETQUOTA, GETQUOTAROOT and SETQUOTA,
and the checks APPEND and COPY make before writing (C{NO [OVERQUOTA]}).

Each account has one quota root, named C{""}, holding all its folders
(STORAGE in KiB, MESSAGE in messages; a resource without a limit is not
listed). MOVE within the account changes no usage, so it is never
refused: a full account can still move mail to Trash and expunge it.
SETQUOTA is for the administrators (C{web.admins}) and sets their own
account's limits; everyone else gets C{NO [NOPERM]}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from twisted_mail_screen.protocols.imap.account import FolderError
from twisted_mail_screen.protocols.imap.core import No, SessionCore
from twisted_mail_screen.protocols.imap.parse import (Atom, BadCommand, astring, encode_mailbox,
                                                      mailbox_name)
from twisted_mail_screen.quota.config import Limits
from twisted_mail_screen.quota.service import TOO_BIG, QuotaService, stored_size
from twisted_mail_screen.quota.state import Usage, check_limit

ROOT = ""
CAPABILITIES = ["QUOTA", "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE"]
COMMANDS = {"GETQUOTA", "GETQUOTAROOT", "SETQUOTA"}
#: The resources, their IMAP names and their fields in L{Limits}.
RESOURCES = (("STORAGE", "storage_kib"), ("MESSAGE", "messages"))


def quota_line(limits: Limits, usage: Usage) -> str:
    used = {"storage_kib": usage.kib, "messages": usage.messages}
    parts = [f"{name} {used[field]} {getattr(limits, field)}"
             for name, field in RESOURCES if getattr(limits, field)]
    return f'QUOTA "{ROOT}" ({" ".join(parts)})'


def _service(session: SessionCore) -> QuotaService:
    return session.factory.quota  # type: ignore[attr-defined, no-any-return]


def limited(session: SessionCore) -> bool:
    """Whether the session's account has a limit (else COPY need not add up sizes), or may have now."""
    return session.address is not None and _service(session).any_limited((session.address,))


def room(session: SessionCore, octets: int, messages: int) -> Deferred:
    """
    Fires if C{messages} more of C{octets} fit in the session's account
    (APPEND, COPY); fails with C{NO [OVERQUOTA]}.
    """
    assert session.address is not None

    def checked(verdict: str | None) -> None:
        if verdict == TOO_BIG:
            raise No("Message is larger than the mailbox quota", "OVERQUOTA")
        if verdict is not None:
            raise No("Mailbox quota exceeded", "OVERQUOTA")

    return _service(session).check(session.address, octets, messages).addCallback(checked)


def changed(session: SessionCore, added: list[str], removed: list[str]) -> Deferred:
    """
    Message files (their names) the session stored in or removed from its
    account; fires when every process sharing the Maildir can see the change.
    """
    if session.address is None or not (added or removed):
        return succeed(None)
    octets = sum(stored_size(n) for n in added) - sum(stored_size(n) for n in removed)
    return _service(session).changed(session.address, octets, len(added) - len(removed))


def forget(session: SessionCore) -> None:
    """A change no delta describes (a folder deleted): the account is counted again when asked."""
    if session.address is not None:
        _service(session).forget(session.address)


class QuotaCommands(SessionCore):
    """The quota commands; C{factory.quota} is the server's L{QuotaService}."""

    def _quota(self) -> QuotaService:
        return _service(self)

    def _send_quota(self, _: Any = None) -> "Deferred[None]":
        assert self.address is not None
        quota = self._quota()
        address = self.address

        def send(_: object) -> "Deferred[None]":
            limits = quota.limits(address)
            if not limits.limited:  # no resource listed: nothing to count
                self.untagged(quota_line(limits, Usage()))
                return succeed(None)
            return quota.usage(address).addCallback(lambda usage: self.untagged(quota_line(limits, usage)))

        return quota.fresh().addCallback(send)

    @staticmethod
    def _root_arg(args: list) -> str:
        if not args:
            raise BadCommand("quota root expected")
        root = astring(args[0]).decode("utf-8", "replace")
        if root != ROOT:
            raise No("No such quota root", "NONEXISTENT")
        return root

    def do_GETQUOTA(self, tag: bytes, args: list) -> Deferred:
        if len(args) != 1:
            raise BadCommand("GETQUOTA needs one quota root")
        self._root_arg(args)
        return self._send_quota().addCallback(lambda _: "OK GETQUOTA completed")

    def do_GETQUOTAROOT(self, tag: bytes, args: list) -> Deferred:
        if len(args) != 1:
            raise BadCommand("GETQUOTAROOT needs one mailbox name")
        name = mailbox_name(args[0], self.utf8)
        assert self.folders is not None
        try:
            path = self.folders.path(name)
        except FolderError as e:
            raise No(str(e), "NONEXISTENT") from None

        def answer(exists: bool) -> Deferred:
            if not exists:
                raise No("No such mailbox", "NONEXISTENT")
            self.untagged(b"QUOTAROOT " + encode_mailbox(name, self.utf8) + f' "{ROOT}"'.encode())
            return self._send_quota()

        return self.exists(path).addCallback(answer).addCallback(
            lambda _: "OK GETQUOTAROOT completed")

    def do_SETQUOTA(self, tag: bytes, args: list) -> Deferred:
        if len(args) != 2 or not isinstance(args[1], list):
            raise BadCommand("SETQUOTA needs a quota root and a list of limits")
        items = args[1]
        if len(items) % 2 or not all(isinstance(i, Atom) for i in items):
            raise BadCommand("limits are resource names and numbers in pairs")
        changes: dict[str, int | None] = {field: 0 for _, field in RESOURCES}
        names = dict(RESOURCES)
        for resource, value in zip(items[::2], items[1::2]):
            field = names.get(resource.upper())
            if field is None:
                raise No(f"Unknown or unsupported resource {resource[:20]}")
            if not value.isdigit():
                raise BadCommand("a limit must be a number")
            try:
                changes[field] = check_limit(field, int(value))
            except ValueError as e:
                raise BadCommand(str(e)) from None
        self._root_arg(args)
        if self.address is None or self.address.lower() not in self.factory.config.web.admins:
            raise No("Only administrators may set quotas", "NOPERM")
        return self._quota().set_limits(self.address, changes).addCallback(
            self._send_quota).addCallback(lambda _: "OK SETQUOTA completed")
