# -*- test-case-name: tests.test_cli -*-
"""
The screening service's commands on the control channel: the block list,
the run-time white list and frozen accounts, as the C{mailscreen block},
C{whitelist} and C{frozen} commands see them.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.screening.blocklist import Entry, format_expiry
from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.runtime.control import CommandError, ControlFactory
from twisted_mail_screen.screening.service import ScreeningService


def describe(entry: Entry, now: float) -> dict[str, Any]:
    """An entry as JSON: name, expiry, whole minutes remaining, reason."""
    left = None if entry.expires is None else max(0, math.ceil((entry.expires - now) / 60))
    return {"name": entry.name, "expires": format_expiry(entry.expires),
            "minutes_left": left, "reason": entry.reason}


def register_screening_commands(control: ControlFactory, screening: ScreeningService,
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
        return [describe(Entry(n, e, r), now) for n, e, r in screening.blocks()]

    def block_add(address: str, minutes: int | None = None, reason: str = "") -> dict[str, Any]:
        return describe(screening.block(address, minutes, reason), clock.seconds())

    def block_remove(address: str) -> bool:
        if not screening.unblock(address):
            raise CommandError(f"{address} is not blocked")
        return True

    def whitelist_list() -> list[dict[str, str]]:
        return [{"entry": e, "origin": o} for e, o in screening.whitelist_list()]

    def whitelist_add(entry: str, comment: str = "") -> bool:
        screening.whitelist_add(entry, comment)
        return True

    def whitelist_remove(entry: str) -> bool:
        if not screening.whitelist_remove(entry):
            raise CommandError(f"{entry} is not a run-time white list entry "
                               "(entries from the configuration file stay)")
        return True

    def frozen_list() -> list[dict[str, Any]]:
        store = screening.freeze_store
        now = clock.seconds()
        entries = store.entries() if store is not None else []  # type: ignore[attr-defined]
        return [describe(e, now) for e in entries if e.active(now)]

    def frozen_freeze(user: str, minutes: int | None = None, reason: str = "") -> dict[str, Any]:
        store = screening.freeze_store
        if store is None:
            raise CommandError("no freeze store")
        minutes = freeze_minutes if minutes is None else minutes
        return describe(store.freeze(user, minutes, reason or "manual"), clock.seconds())

    def frozen_thaw(user: str) -> bool:
        if not screening.thaw(user):
            raise CommandError(f"{user} is not frozen")
        return True

    for name, handler in {
        "block.list": block_list, "block.add": block_add, "block.remove": block_remove,
        "whitelist.list": whitelist_list, "whitelist.add": whitelist_add,
        "whitelist.remove": whitelist_remove,
        "frozen.list": frozen_list, "frozen.freeze": frozen_freeze, "frozen.thaw": frozen_thaw,
        "screening.stats": screening.stats,
    }.items():
        control.register(name, checked(handler))
