# -*- test-case-name: tests.test_quota -*-
"""
The quota service: each account's limits and its usage, asked by SMTP
(RCPT, end of data), IMAP (APPEND, COPY, GETQUOTA) and the web API, told
of every change by the writers (delivery, APPEND, COPY, expunge, POP3
deletion).

The usage of an account with a limit is kept in its Maildir's
C{maildirsize} (L{maildirsize}), so several processes serving one
Maildir volume see each other's changes: a writer's change is appended
there (in the worker pool) before the command that made it answers, and
a check compares the file with the version last read (one C{stat}) before
using its figure. One process's quota jobs for an account run one after
another, so a check made after a change sees it. An account without a
limit keeps no file; asked about (the web API, the CLI), it is counted.
Changes no writer reports (a folder deleted, mail deleted through the web
API) remove the file, so it is recalculated when next read.

The limits themselves (C{quota.json}) are looked at again before a
decision at most once a second (L{LimitsFile}), so a limit set through
another process is enforced here within a second of the clock.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.quota import maildirsize
from twisted_mail_screen.quota.config import Limits
from twisted_mail_screen.quota.limitsfile import LimitsFile
from twisted_mail_screen.quota.state import Override, Usage, count_usage, limits_of
from twisted_mail_screen.store.maildir import MailStore
from twisted_mail_screen.store.maildir_names import size_field

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
    With a C{clock}, the limits file is looked at again before decisions
    (at most once a second); without one, only when told (L{load}).
    """

    log = Logger()

    def __init__(self, store: MailStore, run: Callable[..., Deferred], default: Limits,
                 path: str, clock: IReactorTime | None = None) -> None:
        self._store = store
        self._run = run
        self.default = default
        self.path = path
        self._file = LimitsFile(path, run, clock)
        self._file.replaced = self._limits_replaced
        # The last version of each account's maildirsize read here, and its figure.
        self._known: dict[str, tuple[maildirsize.FileState | None, Usage]] = {}
        self._serial: dict[str, DeferredLock] = {}

    # limits

    def load(self) -> Deferred:
        """Read the accounts' own limits (on C{quota.reload}); fires with how many accounts have some."""
        return self._file.load()

    def replace_overrides(self, overrides: dict[str, Override]) -> int:
        return self._file.replace(overrides)

    def _limits_replaced(self, old: dict[str, Override], new: dict[str, Override]) -> None:
        """
        Accounts whose limits changed have their maildirsize recalculated
        when next read: it carries the old limits line, or none was kept
        while unlimited, or another node that had not yet seen the new
        limits stored mail without appending it.
        """
        for account in set(old) | set(new):
            if limits_of(old.get(account), self.default) != limits_of(new.get(account), self.default):
                self.forget(account)

    def fresh(self) -> Deferred:
        """Fires once the limits are the file's as of at most a second ago (see L{LimitsFile})."""
        return self._file.fresh()

    def limits(self, account: str) -> Limits:
        """C{account}'s limits as last read: a decision calls L{fresh} first."""
        return limits_of(self._file.table.get(account.lower()), self.default)

    def any_limited(self, accounts: tuple[str, ...]) -> bool:
        """
        Whether any of C{accounts} has a limit (else no check needs their
        usage); also true when the limits file is due a look, so that the
        caller's check (which looks first) decides with the limits now.
        """
        return self._file.due() or any(self.limits(a).limited for a in accounts)

    def overrides(self) -> dict[str, Override]:
        return dict(self._file.table)

    def set_limits(self, account: str, changes: dict[str, int | None]) -> Deferred:
        """Change C{account}'s own limits in the file (pool) and here; fires with its new L{Limits}."""
        return self._file.write(account, changes).addCallback(lambda _: self.limits(account))

    # usage

    def _path(self, account: str) -> str:
        return self._store.maildir(account).path

    def _in_turn(self, account: str, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run C{f(*args)} in the pool after this process's earlier quota jobs for C{account}."""
        lock = self._serial.get(account)
        if lock is None:
            lock = self._serial[account] = DeferredLock()

        def done(result: Any) -> Any:
            if not lock.locked and not lock.waiting and self._serial.get(account) is lock:
                del self._serial[account]
            return result

        return lock.run(self._run, f, *args).addBoth(done)

    def usage(self, account: str) -> "Deferred[Usage]":
        return self.fresh().addCallback(lambda _: self._usage(account.lower()))

    def _usage(self, account: str) -> "Deferred[Usage]":
        limits = self.limits(account)
        if not limits.limited:  # no file kept: counted for whoever asks (the API, GETQUOTA)
            return self._run(count_usage, self._path(account))
        known = self._known.get(account)

        def read(out: tuple[maildirsize.FileState | None, Usage | None]) -> Usage:
            state, usage = out
            if usage is None:
                assert known is not None
                return known[1]
            self._known[account] = (state, usage)
            return usage

        return self._in_turn(account, maildirsize.current, self._path(account), limits,
                             known[0] if known is not None else None).addCallback(read)

    def changed(self, account: str, octets: int, messages: int) -> Deferred:
        """
        A writer stored (positive) or removed (negative) C{messages} of
        C{octets} in all; fires when every process can see it.
        """
        # After a look at the limits: an account limited through another node
        # since keeps its maildirsize in step from this change on.
        return self.fresh().addCallback(lambda _: self._changed(account.lower(), octets, messages))

    def _changed(self, account: str, octets: int, messages: int) -> Deferred:
        limits = self.limits(account)
        if not (octets or messages):
            return succeed(None)
        if not limits.limited:
            self._file.look_soon()  # limited through another node meanwhile? then counted again
            return succeed(None)

        def recorded(out: tuple[maildirsize.FileState | None, Usage]) -> None:
            self._known[account] = out

        def failed(reason: Any) -> None:
            # The change is made; only its record failed: the next reader recalculates.
            self._known.pop(account, None)
            self.log.failure("quota: cannot record a change of {account}", reason, account=account)
            self._in_turn(account, maildirsize.drop, self._path(account)).addErrback(
                lambda f: self.log.failure("quota: cannot remove maildirsize of {a}", f, a=account))

        return self._in_turn(account, maildirsize.add, self._path(account), limits, octets,
                             messages).addCallbacks(recorded, failed)

    def stored(self, account: str, names: list[str]) -> Deferred:
        """Message files (by name) added to C{account}."""
        return self.changed(account, sum(stored_size(n) for n in names), len(names))

    def removed(self, account: str, names: list[str]) -> Deferred:
        return self.changed(account, -sum(stored_size(n) for n in names), -len(names))

    def forget(self, account: str) -> Deferred:
        """The account changed in a way no delta says (a folder deleted): recalculated when next read."""
        account = account.lower()
        self._known.pop(account, None)

        def failed(reason: Any) -> None:
            self.log.failure("quota: cannot remove maildirsize of {account}", reason, account=account)

        return self._in_turn(account, maildirsize.drop, self._path(account)).addErrback(failed)

    def on_event(self, event: Any) -> None:
        """The event bus: mail deleted through the web API is counted again (its sizes are not told)."""
        if event.kind == "message.deleted" and isinstance(event.data.get("Mailbox"), str):
            self.forget(event.data["Mailbox"])

    # checks

    def check(self, account: str, octets: int, messages: int = 1) -> "Deferred[str | None]":
        """Whether C{messages} more of C{octets} fit: C{None}, L{FULL} or L{TOO_BIG}."""
        return self.fresh().addCallback(lambda _: self._check(account, octets, messages))

    def _check(self, account: str, octets: int, messages: int) -> "Deferred[str | None]":
        limits = self.limits(account)
        if not limits.limited:
            return succeed(None)
        if verdict(limits, Usage(), octets, messages) == TOO_BIG:
            return succeed(TOO_BIG)
        return self._usage(account.lower()).addCallback(lambda usage: verdict(limits, usage, octets, messages))

    def report(self, account: str) -> "Deferred[dict[str, Any]]":
        """C{account}'s limits and usage, JSON-ready (the CLI, the control channel, the web API)."""
        return self.fresh().addCallback(lambda _: self._report(account))

    def _report(self, account: str) -> "Deferred[dict[str, Any]]":
        limits = self.limits(account)
        own = self._file.table.get(account.lower(), {})

        def described(usage: Usage) -> dict[str, Any]:
            return {"account": account.lower(),
                    "storage": {"used_kib": usage.kib, "used_octets": usage.octets,
                                "limit_kib": limits.storage_kib or None,
                                "own_limit": "storage_kib" in own},
                    "messages": {"used": usage.messages, "limit": limits.messages or None,
                                 "own_limit": "messages" in own}}

        return self._usage(account.lower()).addCallback(described)
