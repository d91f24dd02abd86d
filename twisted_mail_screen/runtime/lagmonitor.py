# -*- test-case-name: tests.test_reactor_budget -*-
"""
How late the reactor runs its timers: the server's own measure of a
command (or anything else) holding the reactor thread.

A L{LagMonitor} ticks every C{interval} seconds on the injected clock and
compares each tick with when it was due; a tick later than C{threshold}
is logged as a warning ("reactor lag: tick 312 ms late"), naming nothing
about sessions or users. The last and worst lateness stay readable
(L{LagMonitor.last_lag}, L{LagMonitor.worst_lag}) for a metric. Under a
test's C{task.Clock} it ticks only when the test advances the clock.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

INTERVAL = 0.5
THRESHOLD = 0.1


class LagMonitor(Service):
    """Warns when the reactor runs a timer more than C{threshold} seconds late."""

    log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = INTERVAL,
                 threshold: float = THRESHOLD) -> None:
        self.clock = clock
        self.interval = interval
        self.threshold = threshold
        self.last_lag = 0.0
        self.worst_lag = 0.0
        self.late_ticks = 0
        self._due = 0.0  # when the previous tick was due
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        loop = LoopingCall.withCount(self._tick)
        loop.clock = self.clock
        self._due = self.clock.seconds()
        self._loop = loop
        loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _tick(self, count: int) -> None:
        # A late tick covers C{count} intervals; it was due one interval
        # after the previous due time, and the next is due on the grid.
        now = self.clock.seconds()
        lag = max(0.0, now - (self._due + self.interval))
        self._due += max(1, count) * self.interval
        self.last_lag = lag
        self.worst_lag = max(self.worst_lag, lag)
        if lag > self.threshold:
            self.late_ticks += 1
            self.log.warn("reactor lag: tick {ms} ms late", ms=round(lag * 1000))

    def lag(self) -> float:
        """The lateness of the most recent tick, in seconds."""
        return self.last_lag
