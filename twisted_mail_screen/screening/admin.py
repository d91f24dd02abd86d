# -*- test-case-name: tests.test_cli -*-
"""
The screening service's administration: L{ScreeningAdmin}, the changes
an administrator makes to the block list, the run-time white list and
frozen accounts, and its commands on the control channel, as the
C{mailscreen block}, C{whitelist} and C{frozen} commands see them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
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

    def block_entries(self) -> list[Entry]:
        """The active blocks as block list entries, in file order."""
        return self._blocklist.entries()

    def offence(self, entry: Entry) -> int | None:
        """
        Which offence of its client an automatic block is (1 the first);
        C{None} for a manual block or one whose history was forgotten
        (offence history is kept in memory only).
        """
        return self._rules.offence(entry.name, entry.expires)

    def runtime_whitelist(self) -> list[Entry]:
        """The run-time white list entries (C{whitelist.txt}), with their comments."""
        return self._runtime_whitelist.entries()

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

    #: The cluster backend's state, when there is one (screening/redis_backend.py).
    backend_status: Callable[[], dict[str, object]] | None = None

    def stats(self) -> dict[str, object]:
        """
        Sizes for the control channel: tracked, active, blocked, evicted
        (this node's), and the backend (the blocks are the cluster's).
        """
        counts = self._rules.stats()
        backend = ({"backend": "memory"} if self.backend_status is None
                   else self.backend_status())
        return {"tracked": counts["tracked"], "active": counts["active"],
                "blocked": len(self._blocklist.entries()), "offences": counts["offences"],
                "evicted": counts["evicted"], **backend}


#: The longest block or freeze one command may set (ten years): far beyond
#: any use, and well inside what the list files' timestamps can hold.
MAX_MINUTES = 10 * 366 * 24 * 60
#: The longest reason or comment kept in a list file's line.
MAX_TEXT = 500

_COUNT = re.compile(r"\w+: (\d+)/(\d+)")


def _minutes(value: Any) -> int | None:
    if value is None:
        return None
    # bool is an int in Python, but true is no number of minutes
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MINUTES:
        raise CommandError(
            f"minutes must be a whole number from 0 to {MAX_MINUTES}, or null (until removed)")
    return value


def _text(value: Any, name: str) -> str:
    """A name or free text; control characters would split the list file's line."""
    if not isinstance(value, str):
        raise CommandError(f"{name} must be a string")
    if len(value) > MAX_TEXT or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise CommandError(
            f"{name} must be at most {MAX_TEXT} characters, with no control characters")
    return value


def _seconds_left(expires: float | None, now: float) -> int | None:
    return None if expires is None else max(0, math.ceil(expires - now))


def _expiry(expires: float | None) -> str | None:
    """RFC 3339 (UTC), or C{None} for never."""
    return None if expires is None else format_expiry(expires)


class ScreeningCommands:
    """
    The administrator's screening commands, as JSON-ready values: the one
    implementation behind both the control channel (C{mailscreen block},
    C{whitelist}, C{frozen}) and the web port's C{/api/v1/screening}.
    Every refusal is a L{CommandError}.

    C{freeze_minutes} is C{[freeze] minutes}, the default length of a
    manual freeze (0: until thawed).
    """

    def __init__(self, admin: ScreeningAdmin, clock: IReactorTime, freeze_minutes: int) -> None:
        self._admin = admin
        self._clock = clock
        self._freeze_minutes = freeze_minutes

    def names(self) -> dict[str, Any]:
        """The control channel's command names and their methods."""
        return {"block.list": self.block_list, "block.add": self.block_add,
                "block.remove": self.block_remove, "whitelist.list": self.whitelist_list,
                "whitelist.add": self.whitelist_add, "whitelist.remove": self.whitelist_remove,
                "frozen.list": self.frozen_list, "frozen.freeze": self.frozen_freeze,
                "frozen.thaw": self.frozen_thaw, "screening.stats": self.stats}

    # the block list

    def describe_block(self, entry: Entry) -> dict[str, Any]:
        """
        A block: the address or network, its rule, the count that set it
        off (from the reason an automatic block records), its offence
        number, expiry and seconds left.
        """
        rule = rule_of(entry.reason)
        count = _COUNT.match(entry.reason) if rule != "manual" else None
        return {"address": entry.name, "network": "/" in entry.name, "rule": rule,
                "count": int(count[1]) if count else None,
                "limit": int(count[2]) if count else None,
                "offence": self._admin.offence(entry) if rule != "manual" else None,
                "expires": _expiry(entry.expires),
                "seconds_left": _seconds_left(entry.expires, self._clock.seconds()),
                "reason": entry.reason}

    def block_list(self) -> list[dict[str, Any]]:
        return self.block_page(0, None)[1]

    def block_page(self, start: int, limit: int | None) -> tuple[int, list[dict[str, Any]]]:
        """
        How many blocks there are, and C{limit} of them from C{start}
        (C{None}: all): during a storm the list holds tens of thousands,
        and describing them all would hold the reactor for a tenth of a second.
        """
        entries = self._admin.block_entries()
        end = None if limit is None else start + limit
        return len(entries), [self.describe_block(e) for e in entries[start:end]]

    def block_add(self, address: Any, minutes: Any = None, reason: Any = "") -> dict[str, Any]:
        try:
            entry = self._admin.block(_text(address, "address"), _minutes(minutes),
                                      _text(reason or "", "reason"))
        except ConfigError as e:
            raise CommandError(f"{e.value!r}: {e.problem}") from e
        return self.describe_block(entry)

    def block_remove(self, address: Any) -> bool:
        if not self._admin.unblock(_text(address, "address")):
            raise CommandError(f"{address} is not blocked", not_found=True)
        return True

    # the white list

    def whitelist_list(self) -> list[dict[str, Any]]:
        """Configured entries (C{origin} config, fixed) then run-time ones (removable)."""
        configured = [{"entry": name, "origin": "config", "comment": "", "expires": None}
                      for name, origin in self._admin.whitelist_list() if origin == "config"]
        return configured + [self._describe_runtime(e) for e in self._admin.runtime_whitelist()]

    @staticmethod
    def _describe_runtime(entry: Entry) -> dict[str, Any]:
        return {"entry": entry.name, "origin": "runtime", "comment": entry.reason,
                "expires": _expiry(entry.expires)}

    def whitelist_add(self, entry: Any, comment: Any = "") -> dict[str, Any]:
        entry = _text(entry, "entry").strip()
        try:
            self._admin.whitelist_add(entry, _text(comment or "", "comment"))
        except ConfigError as e:
            raise CommandError(f"{e.value!r}: {e.problem}") from e
        return {"entry": entry, "origin": "runtime", "comment": comment or "", "expires": None}

    def whitelist_remove(self, entry: Any) -> bool:
        if not self._admin.whitelist_remove(_text(entry, "entry")):
            raise CommandError(f"{entry} is not a run-time white list entry "
                                        "(entries from the configuration file stay)",
                                        not_found=True)
        return True

    # frozen accounts

    def _describe_freeze(self, entry: Entry) -> dict[str, Any]:
        return {"user": entry.name, "expires": _expiry(entry.expires),
                "seconds_left": _seconds_left(entry.expires, self._clock.seconds()),
                "reason": entry.reason}

    def frozen_list(self) -> list[dict[str, Any]]:
        store = self._admin.freeze_store
        now = self._clock.seconds()
        entries = store.entries() if store is not None else []
        return [self._describe_freeze(e) for e in entries if e.active(now)]

    def frozen_freeze(self, user: Any, minutes: Any = None, reason: Any = "") -> dict[str, Any]:
        store = self._admin.freeze_store
        if store is None:
            raise CommandError("no freeze store")
        minutes = _minutes(minutes)
        try:
            entry = store.freeze(_text(user, "user"),
                                 self._freeze_minutes if minutes is None else minutes,
                                 _text(reason or "", "reason") or "manual")
        except ValueError as e:
            raise CommandError(str(e)) from e
        return self._describe_freeze(entry)

    def frozen_thaw(self, user: Any) -> bool:
        if not self._admin.thaw(_text(user, "user")):
            raise CommandError(f"{user} is not frozen", not_found=True)
        return True

    def stats(self) -> dict[str, object]:
        return self._admin.stats()


def register_screening_commands(control: ControlFactory, admin: ScreeningAdmin,
                                clock: IReactorTime, freeze_minutes: int) -> ScreeningCommands:
    """Register the screening commands on the control channel; returns them (the web uses the same)."""
    commands = ScreeningCommands(admin, clock, freeze_minutes)
    for name, handler in commands.names().items():
        control.register(name, handler)
    return commands
