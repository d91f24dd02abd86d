# -*- test-case-name: tests.test_inbound_auth -*-
"""
The screening rule C{mail_auth_failures} ([mail_auth] max_failures, off by
default): a client that sends C{max_failures} messages failing SPF or
DMARC outright (C{fail}, not softfail or an error) within
C{failure_window_minutes} is blocked like the other rules' offenders
(C{[screening] block_minutes}), with one decision line in the log and the
block written by the screening service's next check. Whitelisted clients
are never counted. Runs on the reactor thread, on the injected clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.screening.listfile import format_expiry
from twisted_mail_screen.screening.service import ScreeningService

RULE = "mail_auth_failures"
#: Clients remembered at once; the oldest is forgotten first (bounded memory).
MAX_TRACKED = 10_000


class AuthFailureRule:
    def __init__(self, limit: int, window_minutes: int, screening: ScreeningService,
                 clock: IReactorTime) -> None:
        self._limit = limit
        self._window = window_minutes * 60.0
        self._window_minutes = window_minutes
        self._screening = screening
        self._clock = clock
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def failed(self, host: str | None, protocol: str = "smtp") -> None:
        """One message from C{host} failed SPF or DMARC."""
        screening = self._screening
        if not host or not self._limit or not screening.config.enabled:
            return
        rules = screening.rules
        if rules.is_whitelisted(host) or screening.state.blocklist.get(host) is not None:
            return
        now = self._clock.seconds()
        times = [t for t in self._failures.pop(host, []) if t > now - self._window] + [now]
        if len(times) < self._limit:
            self._failures[host] = times
            if len(self._failures) > MAX_TRACKED:
                self._failures.popitem(last=False)
            return
        minutes = screening.config.block_minutes
        expires = float(math.ceil(now + minutes * 60))
        entry = screening.state.blocklist.add(
            host, expires, f"{RULE}: {len(times)}/{self._limit} in {self._window_minutes}m ({protocol})")
        screening.state.block_added()
        rules.decision("block", entry.name, RULE, count=f"{len(times)}/{self._limit}",
                       window=f"{self._window_minutes}m", minutes=minutes, protocol=protocol,
                       until=format_expiry(expires))
