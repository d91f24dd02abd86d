# -*- test-case-name: tests.test_tls_reload -*-
"""
The C{[tls]} certificate and key, reloaded without a restart when their
files change (a certbot renewal): every listener and every STARTTLS asks
one L{ReloadingTLS} for each new connection's TLS state, so a connection
accepted after a reload gets the new pair while sessions already running
keep theirs. A new pair that cannot be loaded is logged and the previous
one kept, so a half-finished renewal never takes TLS down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from twisted_mail_screen.runtime.filewatch import FileWatch, Signature
from twisted_mail_screen.runtime.tls import TLSFileError, load_server_context

#: Seconds between two looks at the files: a renewal happens days before
#: expiry, so a minute's delay costs nothing, and a stat a minute is free.
RELOAD_INTERVAL = 60.0

Versions = tuple[Signature | None, Signature | None]


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingTLS(Service):
    """
    The server's current TLS options; pass it wherever Twisted takes a
    server connection creator (C{startTLS}, C{TLSMemoryBIOFactory}).
    """

    log = Logger()

    def __init__(self, certificate: str, key: str, clock: IReactorTime,
                 run_blocking: Callable[..., "Deferred[Any]"],
                 interval: float = RELOAD_INTERVAL) -> None:
        self.certificate = certificate
        self.key = key
        self._watches = (FileWatch(certificate), FileWatch(key))
        self._clock = clock
        self._run = run_blocking
        self._interval = interval
        self._loop: LoopingCall | None = None
        # The first load is synchronous and its errors are the caller's:
        # a server must not start without its certificate.
        self._versions = self._current_versions()
        self.options = load_server_context(certificate, key)

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        return self.options.serverConnectionForTLS(protocol)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False).addErrback(
            lambda f: self.log.failure("tls: the reload check stopped", f))

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return None

    def _current_versions(self) -> Versions:
        return (self._watches[0].current(), self._watches[1].current())

    def _probe(self, known: Versions) -> tuple[Versions, Any]:
        """In a worker thread: the files' versions, and a new pair if they changed."""
        versions = self._current_versions()
        if versions == known:
            return versions, None
        try:
            return versions, load_server_context(self.certificate, self.key)
        except TLSFileError as e:
            return versions, e

    def check(self) -> "Deferred[None]":
        """Look at the files (in the worker pool) and swap the pair if they changed."""
        return self._run(self._probe, self._versions).addCallback(self._probed)

    def _probed(self, result: tuple[Versions, Any]) -> None:
        versions, loaded = result
        if loaded is None:
            return
        # Remembered even when the pair is bad, so a bad pair is logged once
        # and the next change to either file is tried again.
        self._versions = versions
        if isinstance(loaded, TLSFileError):
            self.log.warn("tls: cannot reload {which} {path}: {problem}; keeping the previous "
                          "certificate", which=loaded.which, path=loaded.path, problem=loaded.problem)
            return
        self.options = loaded
        self.log.info("tls: reloaded {certificate} and {key}; new connections use them",
                      certificate=self.certificate, key=self.key)
