# -*- test-case-name: tests.test_plugin_startup -*-
"""
A listener whose factory is built when its first connection comes: the
port is bound at start (a client can connect at once, and a port that
cannot be bound still stops the start), but the protocol's modules and
its factory cost nothing until a client uses them.

The pytest plugin's test host listens on five ports and a typical test
talks to one: the IMAP modules and C{twisted.web} were a quarter of the
first test's imports, and building the web site a tenth of each server's
start. The plugin imports a listener's modules in the test's thread when
the test reads its port (L{import_listener}), so the build on the
reactor thread finds them imported. A server run by twistd builds every
factory at start, as before.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from twisted.internet.protocol import Factory, Protocol

#: The module each kind of listener's factory comes from.
LISTENER_MODULES = {
    "smtp": "twisted_mail_screen.protocols.smtp",
    "submission": "twisted_mail_screen.protocols.smtp",
    "pop3": "twisted_mail_screen.protocols.pop3",
    "imap": "twisted_mail_screen.protocols.imap.server",
    "web": "twisted_mail_screen.web.site",
}


def import_listener(kind: str) -> None:
    """Import what a C{kind} listener's factory is built from (in the caller's thread)."""
    importlib.import_module(LISTENER_MODULES[kind])


class OnFirstConnection(Factory):
    """
    Stands for the factory C{build()} returns, building it for the first
    connection. Started and stopped with its ports, as the real one would
    be from then on.
    """

    noisy = False

    def __init__(self, kind: str, build: Callable[[], Any]) -> None:
        self.kind = kind
        self._build = build
        #: the real factory, once a connection came
        self.built: Any = None
        self._ports = 0

    def doStart(self) -> None:
        self._ports += 1
        if self.built is not None:
            self.built.doStart()

    def doStop(self) -> None:
        self._ports -= 1
        if self.built is not None:
            self.built.doStop()

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if self.built is None:
            self.built = self._build()
            for _ in range(self._ports):
                self.built.doStart()
        return self.built.buildProtocol(addr)  # type: ignore[no-any-return]

    def logPrefix(self) -> str:
        return f"{self.kind} (built on first connection)"
