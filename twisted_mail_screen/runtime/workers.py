# -*- test-case-name: tests.test_disk_faults -*-
"""
A thread pool for work that must not run on the reactor thread: fsync'd
Maildir writes, message reads and password hashing. Several threads let
concurrent deliveries' fsyncs overlap, which is where a durable mail
server's throughput comes from.

It is a plain queue and a few threads rather than Twisted's C{ThreadPool}:
that one's worker coordination (a C{Team} with a coordinator lock per
task) cost 30-100 us of CPU per call on the development machine, against
8-28 us for a queue put, a wake-up and a C{callFromThread};
every SMTP delivery and every POP3 read-ahead batch pays it on the
reactor's core. Results go back in bursts: a worker that finishes while
earlier results still wait for the reactor adds its own to them instead
of waking the reactor again (one C{callFromThread}, one waker write and
one loop turn per burst, not per call; deliveries finishing in the same
group-committed directory fsync come back together). Semantics are those
of C{deferToThreadPool}: C{run} returns a Deferred that fires on the
reactor thread with the result or the failure; work queued before the
service starts runs once it does; stopping lets queued work finish and
joins the threads.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any, Callable, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")

_STOP = object()


class Workers(Protocol):
    """What users of a pool call: L{Blocking}, or a test's C{testing.InlineWorkers}."""

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]": ...


class Blocking(Service):
    """Runs blocking calls in its own threads; started and stopped as a service."""

    _log = Logger()

    def __init__(self, reactor: Any, threads: int, name: str = "mailscreen-io") -> None:
        self._reactor = reactor
        self._max = max(1, threads)
        self._name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting on the queue
        self._queued = 0  # tasks put and not yet taken
        self._started = False
        # Outcomes waiting for the reactor thread, in completion order; a
        # drain is scheduled while C{_wake_pending} (deque appends and
        # pops are atomic, so workers take no lock for this).
        self._results: deque[tuple[Callable[[Any], Any], Any]] = deque()
        self._wake_pending = False

    def startService(self) -> None:
        super().startService()
        with self._lock:
            self._started = True
            wanted = min(self._max, self._queued)
        for _ in range(wanted):
            self._spawn()

    def stopService(self) -> None:
        super().stopService()
        with self._lock:
            self._started = False
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(_STOP)  # after every task already queued
        for t in threads:
            t.join()

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        d: Deferred = Deferred()
        with self._lock:
            self._queued += 1
            spawn = self._started and self._idle < self._queued and len(self._threads) < self._max
        self._queue.put((f, args, kwargs, d))
        if spawn:
            self._spawn()
        return d

    def _spawn(self) -> None:
        with self._lock:
            if len(self._threads) >= self._max:
                return
            t = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}",
                                 daemon=True)
            self._threads.append(t)
        t.start()

    def _drain(self) -> None:
        """On the reactor thread: fire every waiting outcome, oldest first."""
        # Cleared before popping: a worker appending after this point either
        # is popped below or sees the flag clear and schedules another drain.
        self._wake_pending = False
        pop = self._results.popleft
        while self._results:
            fire, value = pop()
            try:
                fire(value)
            except Exception:  # a Deferred fired twice: the others still fire
                self._log.failure("workers: firing a result failed")

    def _finished(self, fire: Callable[[Any], Any], value: Any) -> None:
        """From a worker: hand an outcome to the reactor thread."""
        self._results.append((fire, value))
        if not self._wake_pending:
            self._wake_pending = True
            self._reactor.callFromThread(self._drain)

    def _work(self) -> None:
        get, lock = self._queue.get, self._lock
        finished = self._finished
        while True:
            with lock:
                self._idle += 1
            task = get()
            with lock:
                self._idle -= 1
                if task is not _STOP:
                    self._queued -= 1
            if task is _STOP:
                return
            f, args, kwargs, d = task
            try:
                result = f(*args, **kwargs)
            except BaseException:
                finished(d.errback, Failure())
            else:
                finished(d.callback, result)
            task = f = args = kwargs = d = result = None  # hold nothing while idle
