# -*- test-case-name: tests.test_disk_faults -*-
"""
Group commit of directory fsyncs, for Maildir delivery: a delivery that
has linked its file into new/ while another thread's fsync of that
directory is in flight waits for the next one, which one of the waiters
starts and which covers every link made before it began.
"""

from __future__ import annotations

import threading

from twisted_mail_screen.runtime.atomic import fsync_directory


class DirectorySync:
    """
    Group commit of one directory's fsync. L{sync} returns once an fsync
    that began after the call has completed, sharing it with every other
    caller that arrived meanwhile.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition(threading.Lock())
        self._requested = 0  # links announced so far
        self._synced = 0  # links known durable
        self._in_flight = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            mine = self._requested
            while self._synced < mine:
                if self._in_flight:
                    self._cond.wait()
                    continue
                self._in_flight = True
                covers = self._requested
                self._cond.release()
                try:
                    fsync_directory(self.path)
                except BaseException:
                    self._cond.acquire()
                    self._in_flight = False
                    self._cond.notify_all()  # a waiter retries with its own fsync
                    raise
                self._cond.acquire()
                self._in_flight = False
                self._synced = max(self._synced, covers)
                self._cond.notify_all()
