# -*- test-case-name: tests.test_quota -*-
"""
The quota commands of the control channel (C{mailscreen quota ...}) and
the web API's listing: one implementation over the running server's
L{QuotaService}.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults

from twisted_mail_screen.quota.service import QuotaService
from twisted_mail_screen.quota.state import check_limit, mailbox_accounts
from twisted_mail_screen.runtime.control import CommandError, ControlFactory
from twisted_mail_screen.store.addresses import AddressError, normalise_address


def account_arg(value: Any) -> str:
    if not isinstance(value, str):
        raise CommandError("user must be an address")
    try:
        return normalise_address(value)
    except AddressError as e:
        raise CommandError(f"{value!r}: {e}") from e


def limit_arg(resource: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        return check_limit(resource, value)
    except ValueError as e:
        raise CommandError(str(e)) from e


class QuotaCommands:
    """
    @param users: the configured accounts (the users file), listed with
        those that have a Maildir or limits of their own.
    """

    def __init__(self, quota: QuotaService, users: Callable[[], Any], root: str,
                 run: Callable[..., Deferred]) -> None:
        self.quota = quota
        self._users = users
        self._root = root
        self._run = run

    def show(self, user: Any) -> Deferred:
        return self.quota.report(account_arg(user))

    def set(self, user: Any, storage_kib: Any = None, messages: Any = None,
            default: Any = False) -> Deferred:
        """New limits for C{user}; a resource given as C{None} keeps its limit, C{default} drops both."""
        account = account_arg(user)
        changes: dict[str, int | None] = (
            {"storage_kib": None, "messages": None} if default is True else {})
        for resource, value in (("storage_kib", storage_kib), ("messages", messages)):
            if value is not None:
                changes[resource] = limit_arg(resource, value)
        if not changes:
            raise CommandError("give a storage limit, a message limit, or default")
        return self.quota.set_limits(account, changes).addCallback(lambda _: self.quota.report(account))

    def reload(self) -> Deferred:
        return self.quota.load().addCallback(lambda n: {"accounts_with_own_limits": n})

    def accounts(self) -> Deferred:
        """Every known account: configured, with a Maildir, or with limits of its own."""
        def merged(on_disk: list[str]) -> list[str]:
            return sorted(set(on_disk) | {u.lower() for u in self._users()}
                          | set(self.quota.overrides()))
        return self._run(mailbox_accounts, self._root).addCallback(merged)

    def list(self) -> Deferred:
        return self.accounts().addCallback(
            lambda names: gatherResults([self.quota.report(n) for n in names], consumeErrors=True))

    def register(self, control: ControlFactory) -> None:
        control.register("quota.show", self.show)
        control.register("quota.set", self.set)
        control.register("quota.reload", self.reload)
        control.register("quota.list", self.list)
