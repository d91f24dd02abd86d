"""
The blocking pool (runtime/workers.py) on the real reactor thread: every
call's outcome fires on the reactor thread, in its own Deferred, and
outcomes that finish while earlier ones still wait for the reactor go back
in one burst (one hand-over, not one per call).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from twisted.internet.defer import Deferred, DeferredList

from twisted_mail_screen.runtime.workers import Blocking
from twisted_mail_screen.testing import in_reactor, reactor_thread


class CountingReactor:
    """The real reactor, counting the hand-overs the pool makes to it."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.handovers = 0

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.handovers += 1
        self._reactor.callFromThread(f, *args)


def test_every_outcome_fires_on_the_reactor_thread_and_a_burst_is_one_handover() -> None:
    reactor = reactor_thread()
    counting = CountingReactor(reactor)
    pool = Blocking(counting, 8, name="test-workers")
    calls = 200
    release = threading.Event()
    fired_on: list[str] = []
    returned = []  # list.append is atomic: one entry per call that has returned

    def work(i: int) -> int:
        release.wait(10)  # every call finishes at about the same time: one burst
        returned.append(i)
        if i % 50 == 7:
            raise ValueError(i)
        return i * 2

    def start() -> Deferred:
        pool.startService()
        ds = [pool.run(work, i) for i in range(calls)]
        for d in ds:
            d.addBoth(lambda r: (fired_on.append(threading.current_thread().name), r)[1])
        return DeferredList(ds, consumeErrors=True)

    done: list[Any] = []

    def begin() -> None:
        d = start()
        d.addCallback(done.append)
        # The reactor is held here until the workers have all finished, so
        # their outcomes pile up behind the first hand-over.
        release.set()
        while len(returned) < calls:
            threading.Event().wait(0.005)

    try:
        in_reactor(begin)
        for _ in range(400):
            if done:
                break
            threading.Event().wait(0.01)
        results = done[0]
        assert len(results) == calls
        for i, (ok, value) in enumerate(results):
            if i % 50 == 7:
                assert not ok and value.check(ValueError)
            else:
                assert ok and value == i * 2
        reactor_name = in_reactor(lambda: threading.current_thread().name)
        assert set(fired_on) == {reactor_name}
        # 200 outcomes that were all waiting: one hand-over (at most a few
        # if a worker finished before the reactor thread was held).
        assert counting.handovers <= 3, counting.handovers
    finally:
        in_reactor(pool.stopService)


@pytest.mark.parametrize("threads", [1, 4])
def test_outcomes_trickling_in_all_fire(threads: int) -> None:
    pool = Blocking(reactor_thread(), threads, name="test-workers")
    in_reactor(pool.startService)
    try:
        def many() -> Deferred:
            return DeferredList([pool.run(pow, i, 2) for i in range(500)], fireOnOneErrback=True)

        results = in_reactor(many)
        assert [v for _, v in results] == [i * i for i in range(500)]
    finally:
        in_reactor(pool.stopService)
