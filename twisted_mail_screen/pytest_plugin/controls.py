# -*- test-case-name: tests.test_pytest_plugin -*-
"""
C{mailserver.faults} and C{mailserver.screening}: a test's handles on
the fault plan and on screening, each call made in the reactor thread
(where those services live) through the same objects the control
channel uses, so a test steers exactly what C{mailscreen block} or
C{POST /api/v1/faults} would.
"""

from __future__ import annotations

import time
from typing import Any

from twisted_mail_screen.runtime.lagmonitor import INTERVAL
from twisted_mail_screen.testing import in_reactor

#: Seconds between two looks at whether the queue's attempts have ended.
SETTLE_POLL = 0.005


class FaultsProxy:
    """
    C{service.faults}, each method called in the reactor thread. The
    attribute is looked up at each use, so a server without fault
    injection fails with a clear message only when a test asks for it.
    """

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        faults = getattr(self._owner.service, "faults", None)
        if faults is None:
            raise AttributeError(
                f"mailserver.faults.{name}: this server has no fault injection "
                "(faults exist only in test-host mode: docs/faults.md)")
        value = getattr(faults, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            return in_reactor(value, *args, **kwargs)

        return call


class ScreeningControl:
    """
    Blocks and freezes as the administrator sets them (the control
    channel's C{block.*} and C{frozen.*} commands), and the server's
    clock, which is a C{task.Clock} that moves only when the test says.
    Each answer is the control channel's (a dict, or a list of them);
    a refused change raises its error (a C{CommandError}) with the reason.
    """

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    def _command(self, name: str, **args: Any) -> Any:
        handler = self._owner.service.control.commands[name]
        return in_reactor(handler, **args)

    def block(self, ip: str, minutes: int | None = None, reason: str = "") -> dict[str, Any]:
        """
        Block an address or network (C{minutes=None}: until unblocked).

        @raise ValueError: C{ip} is on the white list, so the block would
            change nothing: a test host whitelists loopback by default.
        """
        admin = self._owner.service.screening.admin
        if "/" not in ip and in_reactor(admin.is_whitelisted, ip):
            raise ValueError(
                f"screening.block({ip!r}): {ip} is whitelisted on this server, so a block "
                "would change nothing (a test host whitelists 127.0.0.0/8 and ::1): mark the "
                "test @pytest.mark.mailserver(screening__whitelist=[]) to screen loopback")
        return self._command("block.add", address=ip, minutes=minutes, reason=reason)

    def unblock(self, ip: str) -> None:
        """Lift a block now (a C{CommandError} when C{ip} is not blocked)."""
        self._command("block.remove", address=ip)

    def blocks(self) -> list[dict[str, Any]]:
        """The active blocks, automatic and manual."""
        return self._command("block.list")

    def freeze(self, account: str, minutes: int | None = None, reason: str = "") -> dict[str, Any]:
        """Freeze an account (C{minutes=None}: C{[freeze] minutes}, 0: until thawed)."""
        return self._command("frozen.freeze", user=account, minutes=minutes, reason=reason)

    def thaw(self, account: str) -> None:
        """Thaw a frozen account now."""
        self._command("frozen.thaw", user=account)

    def frozen(self) -> list[dict[str, Any]]:
        """The frozen accounts."""
        return self._command("frozen.list")

    def advance(self, minutes: float) -> None:
        """
        Move the server's clock on by C{minutes}, in half-second steps, so
        that blocks and freezes expire, screening windows pass, queued
        messages reach their next attempt and idle sessions time out just
        as that much real time would make them.

        Relay attempts already under way (a message accepted a moment ago
        is being sent) run in real time: they are let finish first, for up
        to the server's C{wait_for} timeout, so that the retry one of them
        schedules counts from now, not from after the move.
        """
        queue = self._owner.service.queue
        if queue is not None:
            deadline = time.monotonic() + self._owner.timeout
            while not in_reactor(queue.idle) and time.monotonic() < deadline:
                time.sleep(SETTLE_POLL)
        self._owner.server.advance(minutes * 60, step=INTERVAL)
