# -*- test-case-name: tests.test_quota -*-
"""
The quota service: each account's limits and its usage, asked by SMTP
(RCPT, end of data), IMAP (APPEND, COPY, GETQUOTA) and the web API, told
of every change by the writers (delivery, APPEND, COPY, expunge, POP3
deletion).

Usage is kept in memory, counted once per account in the worker pool (a
walk of its Maildir and folders, sizes read from the file names) the first
time it is asked for, then moved by the writers' deltas: no delivery walks
a Maildir. A delta that arrives while the count runs may or may not be in
it, so such a count is thrown away and made again (up to L{RECOUNTS}
times; after that a busy account's figure may be off by a message until
the next restart). Changes no writer reports (a folder deleted, files
removed by hand) drop the account's figure, so it is counted again when
next asked. Maildir++'s C{maildirsize} is not kept: see docs/quota.md.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from twisted_mail_screen.quota.config import Limits
from twisted_mail_screen.quota.state import (
    Override, Usage, count_usage, limits_of, read_overrides, update_override)
from twisted_mail_screen.store.maildir import MailStore
from twisted_mail_screen.store.maildir_names import size_field

#: How many times a count spoiled by a concurrent change is made again.
RECOUNTS = 3

FULL = "full"        # temporary: room may be made (452 4.2.2, NO [OVERQUOTA])
TOO_BIG = "too big"  # the message alone exceeds the limit (552 5.2.2)


def stored_size(name: str) -> int:
    """A message file's size as counted: its C{W=} (CRLF) size, else its C{S=} size."""
    size = size_field(name, "W")
    if size is None:
        size = size_field(name, "S")
    return size or 0


def verdict(limits: Limits, usage: Usage, octets: int, messages: int = 1) -> str | None:
    """C{None} if C{octets} in C{messages} more fit, else L{FULL} or L{TOO_BIG}."""
    storage = limits.storage_kib * 1024
    if (storage and octets > storage) or (limits.messages and messages > limits.messages):
        return TOO_BIG
    if (storage and usage.octets + octets > storage) or \
            (limits.messages and usage.messages + messages > limits.messages):
        return FULL
    return None


class QuotaService:
    """
    Limits and usage of every account (keyed by lower-case mailbox
    address). Reactor thread only; disk work goes to C{run} (the pool).
    """

    log = Logger()

    def __init__(self, store: MailStore, run: Callable[..., Deferred], default: Limits,
                 path: str) -> None:
        self._store = store
        self._run = run
        self.default = default
        self.path = path
        self._overrides: dict[str, Override] = {}
        self._usage: dict[str, Usage] = {}
        self._counting: dict[str, list[Deferred]] = {}
        self._spoiled: set[str] = set()

    # limits

    def load(self) -> Deferred:
        """Read the accounts' own limits (at start-up and on C{quota.reload})."""
        return self._run(read_overrides, self.path).addCallback(self.replace_overrides)

    def replace_overrides(self, overrides: dict[str, Override]) -> int:
        self._overrides = overrides
        return len(overrides)

    def limits(self, account: str) -> Limits:
        return limits_of(self._overrides.get(account.lower()), self.default)

    def any_limited(self, accounts: tuple[str, ...]) -> bool:
        """Whether any of C{accounts} has a limit (else no check needs their usage)."""
        return any(self.limits(a).limited for a in accounts)

    def overrides(self) -> dict[str, Override]:
        return dict(self._overrides)

    def set_limits(self, account: str, changes: dict[str, int | None]) -> Deferred:
        """Change C{account}'s own limits in the file (pool) and here; fires with its new L{Limits}."""
        def written(table: dict[str, Override]) -> Limits:
            self.replace_overrides(table)
            return self.limits(account)

        return self._run(update_override, self.path, account, changes).addCallback(written)

    # usage

    def usage(self, account: str) -> "Deferred[Usage]":
        account = account.lower()
        known = self._usage.get(account)
        if known is not None:
            return succeed(known)
        d: Deferred = Deferred()
        waiting = self._counting.get(account)
        if waiting is not None:
            waiting.append(d)
        else:
            self._counting[account] = [d]
            self._count(account, 0)
        return d

    def _count(self, account: str, attempt: int) -> None:
        self._spoiled.discard(account)
        path = self._store.maildir(account).path
        self._run(count_usage, path).addCallbacks(
            self._counted, self._count_failed, callbackArgs=(account, attempt),
            errbackArgs=(account,))

    def _counted(self, usage: Usage, account: str, attempt: int) -> None:
        if account in self._spoiled and attempt < RECOUNTS:
            self._count(account, attempt + 1)
            return
        self._spoiled.discard(account)
        self._usage[account] = usage
        for d in self._counting.pop(account, []):
            d.callback(usage)

    def _count_failed(self, reason: Any, account: str) -> None:
        self._spoiled.discard(account)
        for d in self._counting.pop(account, []):
            d.errback(reason)

    def changed(self, account: str, octets: int, messages: int) -> None:
        """A writer stored (positive) or removed (negative) C{messages} of C{octets} in all."""
        account = account.lower()
        if account in self._counting:
            self._spoiled.add(account)
        known = self._usage.get(account)
        if known is not None:
            self._usage[account] = known.plus(octets, messages)

    def stored(self, account: str, names: list[str]) -> None:
        """Message files (by name) added to C{account}."""
        self.changed(account, sum(stored_size(n) for n in names), len(names))

    def removed(self, account: str, names: list[str]) -> None:
        self.changed(account, -sum(stored_size(n) for n in names), -len(names))

    def forget(self, account: str) -> None:
        """The account changed in a way no delta says (a folder deleted): count it again when asked."""
        account = account.lower()
        if account in self._counting:
            self._spoiled.add(account)
        self._usage.pop(account, None)

    def on_event(self, event: Any) -> None:
        """The event bus: mail deleted through the web API is counted again (its sizes are not told)."""
        if event.kind == "message.deleted" and isinstance(event.data.get("Mailbox"), str):
            self.forget(event.data["Mailbox"])

    # checks

    def check(self, account: str, octets: int, messages: int = 1) -> "Deferred[str | None]":
        """Whether C{messages} more of C{octets} fit: C{None}, L{FULL} or L{TOO_BIG}."""
        limits = self.limits(account)
        if not limits.limited:
            return succeed(None)
        if verdict(limits, Usage(), octets, messages) == TOO_BIG:
            return succeed(TOO_BIG)
        return self.usage(account).addCallback(lambda usage: verdict(limits, usage, octets, messages))

    def report(self, account: str) -> "Deferred[dict[str, Any]]":
        """C{account}'s limits and usage, JSON-ready (the CLI, the control channel, the web API)."""
        limits = self.limits(account)
        own = self._overrides.get(account.lower(), {})

        def described(usage: Usage) -> dict[str, Any]:
            return {"account": account.lower(),
                    "storage": {"used_kib": usage.kib, "used_octets": usage.octets,
                                "limit_kib": limits.storage_kib or None,
                                "own_limit": "storage_kib" in own},
                    "messages": {"used": usage.messages, "limit": limits.messages or None,
                                 "own_limit": "messages" in own}}

        return self.usage(account).addCallback(described)
