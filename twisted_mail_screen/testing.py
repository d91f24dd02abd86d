# -*- test-case-name: tests.test_testing -*-
"""
Run a real server inside a test suite: the reactor runs in a background
thread, the test talks to real sockets with blocking clients (smtplib,
poplib, imaplib) from its own thread.

    with RunningServer(load_config(None, {"data_dir": str(tmp_path)})) as server:
        smtplib.SMTP("127.0.0.1", server.port("smtp"))

Every listener binds 127.0.0.1 port 0 unless the config says otherwise,
so tests never collide.

For unit tests that need no socket, in-memory twins of three seams:
L{InlineWorkers} (a L{Blocking} pool that runs each call at once),
L{FakeScreening} and L{FakeScreen} (screening that records events and
refuses or closes on demand) and L{RecordingNotifier} (postmaster notices
recorded instead of mailed).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.runtime.service import MailService, build_service, import_for

T = TypeVar("T")

EPHEMERAL = "tcp:0:interface=127.0.0.1"
REACTOR_THREAD = "reactor"


def reactor_thread() -> Any:
    """
    Start the global reactor in a daemon thread (once) and return it. The
    thread is found by name rather than kept in a module global: the
    reactor is the process's, and so is the thread that runs it. Call it
    from the test's thread (one caller at a time).
    """
    from twisted.internet import reactor

    if not any(t.name == REACTOR_THREAD for t in threading.enumerate()):
        threading.Thread(target=lambda: reactor.run(installSignalHandlers=False),
                         name=REACTOR_THREAD, daemon=True).start()
    return reactor


def in_reactor(f: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call C{f} in the reactor thread and wait for its (Deferred) result."""
    from twisted.internet.threads import blockingCallFromThread

    return blockingCallFromThread(reactor_thread(), f, *args, **kwargs)


def ephemeral_overrides(data_dir: str, kinds: tuple[str, ...] = ("smtp", "pop3", "imap")) -> dict[str, Any]:
    """Config overrides for a test server on loopback ports chosen by the OS."""
    out: dict[str, Any] = {"data_dir": data_dir}
    for kind in ("smtp", "submission", "pop3", "imap", "web"):
        out[f"listen.{kind}"] = [EPHEMERAL] if kind in kinds else []
    return out


@functools.cache
def _process_pools(reactor: Any) -> Any:
    """The thread pools the process's servers share (built on the reactor thread)."""
    from twisted_mail_screen.runtime.sharedpool import SharedPools

    return SharedPools(reactor)


class RunningServer:
    """
    A started L{MailService}; stop it with L{stop} or a C{with} block.
    With C{shared_pools}, the server borrows the process's thread pools
    (L{runtime.sharedpool}: no threads started and joined per server);
    the listener kinds in C{lazy} build their factory on their first
    connection (L{runtime.lazyfactory}); those in C{on_demand} are bound
    when L{port} first asks for them, and C{"control"} there leaves the
    control socket to L{listen_control}. The pytest plugin uses all three.
    """

    def __init__(self, config: Config, clock: IReactorTime | None = None, *,
                 shared_pools: bool = False, lazy: Collection[str] = (),
                 on_demand: Collection[str] = ()) -> None:
        self.config = config
        self.clock = clock
        self.shared_pools = shared_pools
        self.lazy = frozenset(lazy)
        self.on_demand = frozenset(on_demand)
        self.service: MailService | None = None
        #: the ports of the C{on_demand} kinds bound so far (read without a reactor hand-over)
        self._bound: dict[str, int] = {}

    def start(self) -> "RunningServer":
        reactor = reactor_thread()
        import_for(self.config, self.lazy)  # here, not on the reactor thread
        self._bound = {}

        def start() -> MailService:
            pools = _process_pools(reactor).borrow if self.shared_pools else None
            service = build_service(self.config, reactor, self.clock, pools=pools, lazy=self.lazy,
                                    on_demand=self.on_demand)
            service.privilegedStartService()
            service.startService()
            return service

        self.service = in_reactor(start)
        return self

    def port(self, kind: str) -> int:
        """The first C{kind} listener's port, bound now if it is one of C{on_demand}."""
        assert self.service is not None
        if kind not in self.on_demand:
            return self.service.ports(kind)[0]
        if kind not in self._bound:
            self._bound[kind] = in_reactor(self.service.listen, kind)[0]
        return self._bound[kind]

    def listen_control(self) -> str:
        """The control socket's path, bound now if it was not (C{"control"} in C{on_demand})."""
        assert self.service is not None
        return in_reactor(self.service.listen_control)

    def advance(self, seconds: float, step: float | None = None) -> None:
        """
        Move the injected C{Clock} on, in the reactor thread: at once, or
        with C{step} in steps of at most that many seconds, so that every
        periodic timer (the lag monitor's half-second tick, screening's
        once-a-second check, the queue's poll) runs as often as it would
        in real time, and none logs itself as late.
        """
        assert self.clock is not None
        in_reactor(advance_clock, self.clock, seconds, step)

    def stop(self) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            in_reactor(service.stopService)

    def __enter__(self) -> "RunningServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def advance_clock(clock: Any, seconds: float, step: float | None = None) -> None:
    """C{clock.advance(seconds)}, in steps of at most C{step} when given."""
    if seconds < 0:
        raise ValueError(f"cannot move a clock back ({seconds} s)")
    if step is None:
        clock.advance(seconds)
        return
    left = seconds
    while left > 1e-9:
        clock.advance(min(step, left))
        left -= step


class InlineWorkers:
    """
    A stand-in for L{Blocking}: C{run} calls the function at once on the
    caller's thread and returns an already fired Deferred (its result, or
    its exception as a failure), so a unit test needs no threads and no
    reactor turn. C{calls} counts the calls.
    """

    def __init__(self) -> None:
        self.calls = 0

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        self.calls += 1
        try:
            result = f(*args, **kwargs)
        except BaseException:
            return fail()
        return succeed(result)


@dataclass
class FakeScreen:
    """
    A L{ClientScreen} that records each event as C{(name, detail)} in
    C{events} and answers "close the session" for the event names in
    C{close_on}. C{refusal}, when set, refuses the connection.
    """

    host: str = ""
    protocol: str = ""
    refusal: str | None = None
    close_on: frozenset[str] = frozenset()
    blocked: bool = False
    events: list[tuple[str, str]] = field(default_factory=list)

    def _event(self, name: str, detail: str = "") -> bool:
        self.events.append((name, detail))
        return name in self.close_on

    def auth_failed(self, username: str, secret: bytes) -> bool:
        return self._event("auth_failed", username)

    def auth_succeeded(self, username: str) -> None:
        self._event("auth_succeeded", username)

    def rcpt_unknown(self) -> bool:
        return self._event("rcpt_unknown")

    def rset(self) -> bool:
        return self._event("rset")

    def closed(self) -> None:
        self._event("closed")


class FakeScreening:
    """
    A L{Screening} that hands every connection a L{FakeScreen} (kept in
    C{screens}, newest last), refusing with C{refusal} while it is set and
    closing sessions on the event names in C{close_on}.
    """

    def __init__(self, refusal: str | None = None, close_on: frozenset[str] = frozenset()) -> None:
        self.refusal = refusal
        self.close_on = close_on
        self.screens: list[FakeScreen] = []

    def open(self, host: str, protocol: str) -> FakeScreen:
        screen = FakeScreen(host, protocol, self.refusal, self.close_on)
        self.screens.append(screen)
        return screen


class RecordingNotifier:
    """
    The screening service's notifier, recording each notice's facts (in
    C{blocks} and C{freezes}) instead of mailing the postmaster.
    """

    def __init__(self) -> None:
        self.blocks: list[dict[str, Any]] = []
        self.freezes: list[dict[str, Any]] = []
        self.flushes = 0

    def notify_block(self, address: str, rule: str, count: int, limit: int,
                     window_minutes: int | None, protocol: str, expires: float | None,
                     minutes: int | None, events: Any = (), offence: int = 1) -> None:
        self.blocks.append(dict(address=address, rule=rule, count=count, limit=limit,
                                protocol=protocol, expires=expires, minutes=minutes,
                                events=list(events), offence=offence))

    def notify_freeze(self, username: str, address: str, protocol: str, failures: int,
                      limit: int, frozen: bool, expires: float | None,
                      events: Any = ()) -> None:
        self.freezes.append(dict(username=username, address=address, frozen=frozen,
                                 failures=failures))

    def flush(self) -> None:
        self.flushes += 1
