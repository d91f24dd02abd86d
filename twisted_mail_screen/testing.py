# -*- test-case-name: tests.test_smtp -*-
"""
Run a real server inside a test suite: the reactor runs in a background
thread, the test talks to real sockets with blocking clients (smtplib,
poplib, imaplib) from its own thread.

    with RunningServer(load_config(None, {"data_dir": str(tmp_path)})) as server:
        smtplib.SMTP("127.0.0.1", server.port("smtp"))

Every listener binds 127.0.0.1 port 0 unless the config says otherwise,
so tests never collide.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.runtime.service import MailService, build_service

T = TypeVar("T")

_started = threading.Lock()
_thread: threading.Thread | None = None

EPHEMERAL = "tcp:0:interface=127.0.0.1"


def reactor_thread() -> Any:
    """Start the global reactor in a daemon thread (once) and return it."""
    global _thread
    from twisted.internet import reactor

    with _started:
        if _thread is None:
            _thread = threading.Thread(target=lambda: reactor.run(installSignalHandlers=False),
                                       name="reactor", daemon=True)
            _thread.start()
    return reactor


def in_reactor(f: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call C{f} in the reactor thread and wait for its (Deferred) result."""
    from twisted.internet.threads import blockingCallFromThread

    return blockingCallFromThread(reactor_thread(), f, *args, **kwargs)


def ephemeral_overrides(data_dir: str, kinds: tuple[str, ...] = ("smtp", "pop3", "imap")) -> dict[str, Any]:
    """Config overrides for a test server on loopback ports chosen by the OS."""
    out: dict[str, Any] = {"data_dir": data_dir}
    for kind in ("smtp", "submission", "pop3", "imap"):
        out[f"listen.{kind}"] = [EPHEMERAL] if kind in kinds else []
    return out


class RunningServer:
    """A started L{MailService}; stop it with L{stop} or a C{with} block."""

    def __init__(self, config: Config, clock: IReactorTime | None = None) -> None:
        self.config = config
        self.clock = clock
        self.service: MailService | None = None

    def start(self) -> "RunningServer":
        reactor = reactor_thread()

        def start() -> MailService:
            service = build_service(self.config, reactor, self.clock)
            service.privilegedStartService()
            service.startService()
            return service

        self.service = in_reactor(start)
        return self

    def port(self, kind: str) -> int:
        assert self.service is not None
        return self.service.ports(kind)[0]

    def advance(self, seconds: float) -> None:
        """Move the injected C{Clock} on, in the reactor thread."""
        assert self.clock is not None
        in_reactor(self.clock.advance, seconds)  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            in_reactor(service.stopService)

    def __enter__(self) -> "RunningServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
