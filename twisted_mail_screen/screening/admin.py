# -*- test-case-name: tests.test_cli -*-
"""
The screening service's administration: L{ScreeningAdmin}, the changes
an administrator makes to the block list, the run-time white list and
frozen accounts, and its commands on the control channel, as the
C{mailscreen block}, C{whitelist} and C{frozen} commands see them.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.runtime.control import CommandError, ControlFactory
from twisted_mail_screen.screening.interfaces import AdminFreezeStore
from twisted_mail_screen.screening.listfile import Entry, format_expiry
from twisted_mail_screen.screening.netmatch import NetMatcher
from twisted_mail_screen.screening.rules import ScreeningRules, rule_of
from twisted_mail_screen.screening.state import StateFiles


class ScreeningAdmin:
    """
    Administrative changes (control channel and CLI): written at once,
    each logged as one decision line.
    """

    def __init__(self, rules: ScreeningRules, state: StateFiles,
                 freeze_store: AdminFreezeStore | None, clock: IReactorTime) -> None:
        self._rules = rules
        self._blocklist = state.blocklist
        self._runtime_whitelist = state.whitelist
        self._freeze_store = freeze_store
        self._clock = clock

    @property
    def freeze_store(self) -> AdminFreezeStore | None:
        return self._freeze_store

    def block(self, address: str, minutes: int | None, reason: str = "") -> Entry:
        """
        Block an address or network for C{minutes} (C{None}/0: until
        removed), written at once.

        @raise twisted_mail_screen.config.base.ConfigError: not an address.
        """
        expires = (None if not minutes
                   else float(math.ceil(self._clock.seconds() + minutes * 60)))
        text = reason if reason.startswith("manual") else (
            f"manual: {reason}" if reason else "manual")
        entry = self._blocklist.add(address, expires, text)
        self._blocklist.flush()
        self._rules.decision("block", entry.name, "manual", minutes=minutes or "never",
                             until=format_expiry(expires), reason=reason)
        return entry

    def unblock(self, address: str) -> bool:
        """Lift the block on C{address} (or the network holding it) now."""
        entry = self._blocklist.remove(address)
        if entry is None:
            return False
        self._blocklist.flush()
        self._rules.forget(entry.name)
        self._rules.decision("unblock", entry.name, rule_of(entry.reason))
        return True

    def blocks(self) -> list[tuple[str, float | None, str]]:
        """The active blocks: C{(address or network, expiry or None, reason)}."""
        return [(e.name, e.expires, e.reason) for e in self._blocklist.entries()]

    def is_whitelisted(self, host: str) -> bool:
        return self._rules.is_whitelisted(host)

    def whitelist_add(self, entry: str, comment: str = "") -> None:
        """
        Add a run-time white list entry (kept in C{whitelist.txt}).

        @raise twisted_mail_screen.config.base.ConfigError: unparseable.
        """
        NetMatcher([entry], "whitelist")
        self._runtime_whitelist.put(Entry(entry.strip(), None, comment))
        self._runtime_whitelist.flush()
        self._rules.decision("whitelist-add", entry.strip(), "manual", comment=comment)

    def whitelist_remove(self, entry: str) -> bool:
        """Remove a run-time white list entry (configured ones stay)."""
        removed = self._runtime_whitelist.delete(entry.strip())
        if removed:
            self._runtime_whitelist.flush()
            self._rules.decision("whitelist-remove", entry.strip(), "manual")
        return removed

    def whitelist_list(self) -> list[tuple[str, str]]:
        """Every white list entry with its origin: C{config} or C{runtime}."""
        return ([(e, "config") for e in self._rules.whitelist.entries]
                + [(e.name, "runtime") for e in self._runtime_whitelist.entries()])

    def thaw(self, user: str) -> bool:
        """Thaw a frozen account now."""
        if self._freeze_store is None:
            return False
        return self._freeze_store.thaw(user)

    def stats(self) -> dict[str, int]:
        """Sizes for the control channel: tracked, active, blocked, evicted."""
        counts = self._rules.stats()
        return {"tracked": counts["tracked"], "active": counts["active"],
                "blocked": len(self._blocklist.entries()), "offences": counts["offences"],
                "evicted": counts["evicted"]}


def describe(entry: Entry, now: float) -> dict[str, Any]:
    """An entry as JSON: name, expiry, whole minutes remaining, reason."""
    left = None if entry.expires is None else max(0, math.ceil((entry.expires - now) / 60))
    return {"name": entry.name, "expires": format_expiry(entry.expires),
            "minutes_left": left, "reason": entry.reason}


def register_screening_commands(control: ControlFactory, admin: ScreeningAdmin,
                                clock: IReactorTime, freeze_minutes: int) -> None:
    """
    Register the commands. C{freeze_minutes} is C{[freeze] minutes}, the
    default length of a manual freeze (0: until thawed).
    """

    def checked(f: Any) -> Any:
        def run(**args: Any) -> Any:
            try:
                return f(**args)
            except ConfigError as e:
                raise CommandError(f"{e.value!r}: {e.problem}") from e
        return run

    def block_list() -> list[dict[str, Any]]:
        now = clock.seconds()
        return [describe(Entry(n, e, r), now) for n, e, r in admin.blocks()]

    def block_add(address: str, minutes: int | None = None, reason: str = "") -> dict[str, Any]:
        return describe(admin.block(address, minutes, reason), clock.seconds())

    def block_remove(address: str) -> bool:
        if not admin.unblock(address):
            raise CommandError(f"{address} is not blocked")
        return True

    def whitelist_list() -> list[dict[str, str]]:
        return [{"entry": e, "origin": o} for e, o in admin.whitelist_list()]

    def whitelist_add(entry: str, comment: str = "") -> bool:
        admin.whitelist_add(entry, comment)
        return True

    def whitelist_remove(entry: str) -> bool:
        if not admin.whitelist_remove(entry):
            raise CommandError(f"{entry} is not a run-time white list entry "
                               "(entries from the configuration file stay)")
        return True

    def frozen_list() -> list[dict[str, Any]]:
        store = admin.freeze_store
        now = clock.seconds()
        entries = store.entries() if store is not None else []
        return [describe(e, now) for e in entries if e.active(now)]

    def frozen_freeze(user: str, minutes: int | None = None, reason: str = "") -> dict[str, Any]:
        store = admin.freeze_store
        if store is None:
            raise CommandError("no freeze store")
        minutes = freeze_minutes if minutes is None else minutes
        return describe(store.freeze(user, minutes, reason or "manual"), clock.seconds())

    def frozen_thaw(user: str) -> bool:
        if not admin.thaw(user):
            raise CommandError(f"{user} is not frozen")
        return True

    for name, handler in {
        "block.list": block_list, "block.add": block_add, "block.remove": block_remove,
        "whitelist.list": whitelist_list, "whitelist.add": whitelist_add,
        "whitelist.remove": whitelist_remove,
        "frozen.list": frozen_list, "frozen.freeze": frozen_freeze, "frozen.thaw": frozen_thaw,
        "screening.stats": admin.stats,
    }.items():
        control.register(name, checked(handler))
