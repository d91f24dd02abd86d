# -*- test-case-name: tests.test_plugin_startup -*-
"""
Thread pools shared by the servers of one test process (the pytest
plugin's function-scoped C{mailserver}s): each server borrows a pool
instead of starting threads of its own.

A server that owns its pools starts a storage thread at start (the
temporary-file sweep's first run) and joins it at stop: two thread
hand-overs on the reactor thread, 1-3 ms a test on two busy cores.
L{Borrowed} keeps what a server's own pool promised: its C{stopService}
waits until every call this server made has finished, so nothing of a
stopped server still runs, and its calls run only on the server's
behalf. What it does not keep: the pool's size is shared, so servers
running at the same time queue behind each other's calls.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed

from twisted_mail_screen.runtime.workers import Blocking

T = TypeVar("T")


class Borrowed(Service):
    """
    One server's share of a L{Blocking} pool it does not own. C{run} and
    the callbacks of its results are on the reactor thread, as for
    L{Blocking}.
    """

    def __init__(self, pool: Blocking) -> None:
        self._pool = pool
        self._pending = 0
        self._settled: list[Deferred[None]] = []

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        self._pending += 1
        d = self._pool.run(f, *args, **kwargs)
        d.addBoth(self._done)
        return d

    def _done(self, result: Any) -> Any:
        self._pending -= 1
        if self._pending == 0:
            waiting, self._settled = self._settled, []
            for d in waiting:
                d.callback(None)
        return result

    def stopService(self) -> "Deferred[None]":
        """Fires when this server's calls have all finished (the pool runs on)."""
        super().stopService()
        if self._pending == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._settled.append(d)
        return d


class SharedPools:
    """
    The process's pools, one per name and size, started on first use and
    never stopped (daemon threads, idle between tests). Pass
    L{SharedPools.borrow} as C{build_service(pools=...)}.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pools: dict[tuple[str, int], Blocking] = {}

    def borrow(self, name: str, threads: int) -> Borrowed:
        """A new server's share of the pool C{name} of C{threads} threads (reactor thread)."""
        pool = self._pools.get((name, threads))
        if pool is None:
            pool = self._pools[(name, threads)] = Blocking(self._reactor, threads, name=name)
            pool.startService()
        return Borrowed(pool)
