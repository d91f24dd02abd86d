# -*- test-case-name: tests.test_maildir -*-
"""
A thread pool for work that must not run on the reactor thread: fsync'd
Maildir writes and password hashing. Several threads let concurrent
deliveries' fsyncs overlap, which is where a durable mail server's
throughput comes from.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Blocking(Service):
    """Runs blocking calls in its own pool; started and stopped as a service."""

    def __init__(self, reactor: Any, threads: int, name: str = "mailscreen-io") -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)
