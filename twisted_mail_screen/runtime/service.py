# -*- test-case-name: tests.test_twistd -*-
"""
The composition root: builds every shared service once from a L{Config}
and hands each protocol factory exactly what it needs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.store.accounts import AccountStore
from twisted_mail_screen.store.auth import Authenticator
from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.store.delivery import Delivery
from twisted_mail_screen.faults.auth import FaultyAuthenticator
from twisted_mail_screen.faults.commands import register_fault_commands
from twisted_mail_screen.faults.plan import FaultPlan
from twisted_mail_screen.runtime.events import EventBus
from twisted_mail_screen.runtime.lagmonitor import LagMonitor
from twisted_mail_screen.runtime.metrics import (
    BackendCollector, MeasuredDelivery, ServerMetrics, StateCollector)
from twisted_mail_screen.runtime.control import ControlFactory
from twisted_mail_screen.screening.notify import PostmasterNotifier
from twisted_mail_screen.runtime.endpoints import control_endpoint, server_endpoint
from twisted_mail_screen.runtime.lazyfactory import OnFirstConnection, import_listener
from twisted_mail_screen.screening.service import ScreeningService
from twisted_mail_screen.screening.admin import register_screening_commands
from twisted_mail_screen.store.maildir import MailStore, TmpCleaner
from twisted_mail_screen.store.maildir_names import UniqueNames
from twisted_mail_screen.quota.commands import QuotaCommands
from twisted_mail_screen.quota.service import QuotaService
from twisted_mail_screen.quota.state import QuotaFileError, read_overrides, state_path
from twisted_mail_screen.protocols.session import SessionFactory
from twisted_mail_screen.store.routing import Router
from twisted_mail_screen.protocols.smtp import SMTPFactory
from twisted_mail_screen.runtime.workers import Blocking, Workers
from twisted_mail_screen.web.decisions import Decisions

if TYPE_CHECKING:
    # Imported where they are built: a server without relaying, Redis, IMAP,
    # POP3 or a web port (the pytest plugin's, until a test connects) pays nothing for them.
    from twisted_mail_screen.relay.queue import OutboundQueue

PROTOCOL_TITLES = {"smtp": "SMTP", "submission": "Submission", "pop3": "POP3", "imap": "IMAP",
                   "web": "Web", "control": "Control"}


class ListenError(Exception):
    """A configured endpoint could not be bound."""


class Listener(Service):
    """
    One listening endpoint. It binds in C{privilegedStartService} so that a
    port that cannot be bound stops the server before it runs, and logs
    what a client should connect to.
    """

    log = Logger()

    def __init__(self, kind: str, description: str, endpoint: Any, factory: Any) -> None:
        self.kind = kind
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list[Any] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            raise ListenError(f"listen.{self.kind}: cannot listen on {self.description!r}: "
                              f"{failures[0].getErrorMessage()}")

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self.log.info("{title} listening: {where} ({description})",
                      title=PROTOCOL_TITLES[self.kind], where=_where(port, self.kind, self.description),
                      description=self.description)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def _where(port: IListeningPort, kind: str, description: str) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        if kind == "web":
            scheme = "https" if description.removeprefix("haproxy:").startswith("ssl:") else "http"
            return f"open {scheme}://{host.host}:{host.port}/"
        return f"connect to {host.host}:{host.port}"
    name = getattr(host, "name", host)
    return f"connect to UNIX socket {name.decode() if isinstance(name, bytes) else name}"


class MailService(MultiService):
    """Everything one mailscreen server runs, with handles for tests and tools."""

    accounts: AccountStore
    store: MailStore
    delivery: Delivery
    screening: ScreeningService
    control: ControlFactory
    lag: LagMonitor
    events: EventBus
    metrics: ServerMetrics
    queue: OutboundQueue | None
    faults: FaultPlan | None
    quota: QuotaService

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        #: the listeners started, at start or by L{listen}
        self.listeners: list[Listener] = []
        #: the listeners built with C{on_demand}, until L{listen} binds them
        self.pending: list[Listener] = []
        self.control_listener: Listener | None = None

    def listen(self, kind: str) -> list[int]:
        """
        Bind now the C{kind} listeners a server built with C{on_demand}
        has not bound yet; on the reactor thread. Their port numbers.

        @raise ListenError: a port that cannot be bound, or a stopped server.
        """
        if not self.running:
            raise ListenError(f"listen.{kind}: the server is stopped")
        for listener in [l for l in self.pending if l.kind == kind]:
            self.pending.remove(listener)
            # Listed first: one that fails to bind stays listed without a
            # port, as at start, and so the server is not ready().
            self.listeners.append(listener)
            listener.setServiceParent(self)  # a running MultiService starts it at once
        return self.ports(kind)

    def listen_control(self) -> str:
        """
        Bind the control socket now if it is not bound (a server built with
        C{"control"} in C{on_demand}); on the reactor thread. Returns its path.
        """
        listener = self.control_listener
        if listener is not None and listener.parent is None:
            os.makedirs(os.path.dirname(self.config.control_socket), mode=0o750, exist_ok=True)
            listener.setServiceParent(self)
        return self.config.control_socket

    def ready(self) -> bool:
        """Every listener is bound and the services (stores among them) are started."""
        return self.running and all(l.port is not None for l in self.listeners)

    def ports(self, kind: str) -> list[int]:
        """Bound TCP port numbers of one kind of listener (after start)."""
        return [l.port.getHost().port for l in self.listeners  # type: ignore[union-attr]
                if l.kind == kind and l.port is not None and hasattr(l.port.getHost(), "port")]


def _wants_mail_auth(config: Config) -> bool:
    """Whether C{build_mail_auth} would build anything: DKIM keys or inbound checks."""
    return bool(config.dkim.keys) or config.mail_auth.enabled


def import_for(config: Config, lazy: Collection[str] = ()) -> None:
    """
    Import, in the caller's thread, what L{build_service} imports only when
    C{config} asks for it, so that a build on a running reactor's thread
    (L{testing.RunningServer}'s) does not hold that thread for an import.
    """
    wanted = [name for name, needed in (
        ("twisted_mail_screen.relay.queue", config.relay.enabled),
        ("twisted_mail_screen.screening.redis_backend", config.screening.redis is not None),
        ("twisted_mail_screen.runtime.tlsreload", config.tls.enabled),
        ("twisted_mail_screen.mailauth.gate", _wants_mail_auth(config)),
        ("twisted_mail_screen.runtime.proxyproto",
         any(d.startswith("haproxy:") for _, ds in config.listen.items() for d in ds)),
    ) if needed]
    for name in wanted:
        importlib.import_module(name)
    for kind, descriptions in config.listen.items():
        if descriptions and kind not in lazy:
            import_listener(kind)


def build_service(config: Config, reactor: Any, clock: IReactorTime | None = None,
                  service_class: type[MailService] = MailService,
                  store: MailStore | None = None, workers: Workers | None = None,
                  pools: Callable[[str, int], Service] | None = None,
                  lazy: Collection[str] = (), on_demand: Collection[str] = ()) -> MailService:
    """
    Build the server. C{clock} is the time source for timeouts and
    screening (the reactor unless a test drives a C{Clock}). C{store}
    replaces the Maildir store (tests inject disk faults through it);
    C{workers} replaces every thread pool (a unit test passes
    L{twisted_mail_screen.testing.InlineWorkers} to run every blocking
    call at once, on the reactor thread). C{pools(name, threads)} gives
    the server each of its thread pools, a service the server starts and
    stops (default: a L{Blocking} of its own; the pytest plugin borrows
    the process's, L{runtime.sharedpool}). The listener kinds in C{lazy}
    build their factory on their first connection
    (L{runtime.lazyfactory}). The listener kinds in C{on_demand} are bound
    by L{MailService.listen} when first asked for, not at start, and
    C{"control"} there leaves the control socket to
    L{MailService.listen_control} (the pytest plugin's servers: a test
    that only sends over SMTP binds one port, where five listeners and the
    control socket cost a third of a server's start and stop, and the
    socket file and its lock are two of the few file-system changes a
    test's server makes).

    @raise ConfigError: for an endpoint string the reactor cannot use.
    """
    clock = clock or reactor
    service = service_class(config)

    def pool(threads: int, name: str = "mailscreen-io") -> Any:
        """A thread pool the caller makes a child of the service that must outlive its calls."""
        return pools(name, threads) if pools is not None else Blocking(reactor, threads, name=name)

    # What changed, for the web port's live view and metrics (docs/web.md).
    events = EventBus()
    # The server's own metrics registry (docs/api.md, "Metrics"), fed from the bus.
    metrics = ServerMetrics(events, clock)
    # A data directory made by this start (each of the pytest plugin's
    # servers) has no stale tmp/ file: no sweep, and no storage thread, at start.
    fresh = store is None and not os.path.isdir(config.data_dir)
    os.makedirs(config.data_dir, mode=0o750, exist_ok=True)

    # How late the reactor runs timers: the warning says when some work
    # held the reactor thread (every session waits behind it).
    service.lag = LagMonitor(clock)
    service.lag.setServiceParent(service)
    blocking = workers or pool(config.storage.threads)
    if workers is None:
        blocking.setServiceParent(service)
    accounts = AccountStore(config.data_dir, clock)
    if store is None:
        store = MailStore(os.path.join(config.data_dir, "mail"), UniqueNames(config.hostname),
                          durable=config.storage.fsync)
    TmpCleaner(store, blocking.run, clock, sweep_at_start=not fresh).setServiceParent(service)
    router = Router(config, accounts)
    # Injected faults (docs/faults.md) exist only on a test host; in site mode nothing asks.
    faults = service.faults = FaultPlan() if config.test_host else None
    # The outbound queue (docs/relay.md): only when relaying is enabled.
    delivery = Delivery(store, blocking, events=events)
    quota = _build_quota(config, store, blocking, clock)
    delivery.stored = quota.stored
    events.subscribe(quota.on_event)
    queue = None
    if config.relay.enabled:
        # The queue's spool work has a small pool of its own: a backlog
        # flushed after an outage (up to max_attempts messages read and
        # rewritten at once) cannot take every storage thread from inbound
        # deliveries.
        from twisted_mail_screen.relay.queue import OutboundQueue

        spool = workers or pool(4, "mailscreen-queue")
        # The queue's DSNs go through Delivery, which queues through the queue.
        queue = delivery.relay = OutboundQueue(config, config.relay, router, reactor, clock,
                                               deliver=delivery.deliver, blocking=spool,
                                               faults=faults, events=events)
        if workers is None:
            # A child of the queue: stopped only once the queue's attempts
            # have settled (they still write envelopes).
            spool.setServiceParent(queue)
        queue.setServiceParent(service)
    service.queue = queue
    # Password checks get a pool of their own, one thread per core (scrypt is
    # CPU-bound): under a guessing attack they queue there, and deliveries'
    # fsyncs in the storage pool do not wait behind them.
    hashing = workers or pool(os.cpu_count() or 1, "mailscreen-auth")
    if workers is None:
        hashing.setServiceParent(service)
    authenticator = Authenticator(config, accounts, hashing) if faults is None else \
        FaultyAuthenticator(faults, config, accounts, hashing)
    screening = _build_screening(config, clock, accounts, router, delivery)
    screening.write_files_with(blocking.run)
    screening.setServiceParent(service)
    backend_up: Callable[[], bool] = lambda: True
    if config.screening.redis is not None:
        from twisted_mail_screen.screening.redis_backend import RedisScreening

        cluster = RedisScreening(screening, config.screening.redis, reactor, clock)
        cluster.setServiceParent(service)
        backend_up = lambda: cluster.up  # noqa: E731
        screening.admin.backend_status = cluster.status
    screening.publish_to(events.publish)
    freeze = screening.freeze_store
    control = ControlFactory()
    register_screening_commands(control, screening.admin, clock, config.freeze.minutes)
    if faults is not None:
        register_fault_commands(control, faults)
    QuotaCommands(quota, accounts.users, store.root, blocking.run).register(control)
    # One holder every listener and STARTTLS asks per connection: certificate
    # renewals reach new connections without a restart (docs/deployment.md).
    tls = None
    if config.tls.enabled:
        from twisted_mail_screen.runtime.tlsreload import ReloadingTLS

        tls = ReloadingTLS(config.tls.certificate, config.tls.key, clock, blocking.run)  # type: ignore[arg-type]
        tls.setServiceParent(service)
    pop3_locks: set[str] = set()
    registries: list[Any] = []

    def imap_registry() -> Any:
        """The folder indexes every IMAP listener and the web port share, made on first ask."""
        if not registries:
            from twisted_mail_screen.protocols.imap.registry import Registry

            registries.append(Registry(blocking, clock))
        return registries[0]

    service.accounts = accounts
    service.store = store
    service.delivery = delivery
    service.quota = quota
    service.screening = screening
    service.control = control
    service.events = events
    service.metrics = metrics
    freeze_store = screening.freeze_store
    notifier = screening.notifier
    metrics.register(StateCollector(
        clock, service.lag, blocks=lambda: len(screening.state.blocklist.entries()),
        frozen=lambda: len(freeze_store.entries()) if freeze_store is not None else 0,
        notices=lambda: getattr(notifier, "messages_sent", 0),
        queue=queue.size if queue is not None else None))
    metrics.register(BackendCollector(
        "redis" if config.screening.redis is not None else "memory", backend_up))
    # SMTP's deliveries are counted and timed (end of DATA to the fsync'd 250).
    measured = MeasuredDelivery(delivery, metrics, clock)

    # DKIM signing of submitted mail; SPF, DKIM, DMARC of the rest (docs/mailauth.md).
    mail_auth = None
    if _wants_mail_auth(config):  # the gate's modules only when there is something to do
        from twisted_mail_screen.mailauth.gate import build_mail_auth

        mail_auth = build_mail_auth(config, reactor, blocking, workers, screening, clock)
    if isinstance(mail_auth, Service):
        mail_auth.setServiceParent(service)

    def smtp_factory(kind: str) -> SMTPFactory:
        return SMTPFactory(config=config, router=router, delivery=measured,  # type: ignore[arg-type]
                           blocking=blocking,
                           authenticator=authenticator, screening=screening, freeze=freeze,
                           clock=clock, tls=tls, protocol_name=kind,
                           require_auth=kind == "submission", faults=faults, mail_auth=mail_auth,
                           quota=quota)

    def pop3_factory() -> Any:
        from twisted_mail_screen.protocols.pop3 import POP3Factory

        return POP3Factory(config=config, store=store, blocking=blocking,
                           authenticator=authenticator, screening=screening,
                           clock=clock, locks=pop3_locks, tls=tls, faults=faults, quota=quota)

    def imap_factory() -> Any:
        from twisted_mail_screen.protocols.imap.server import IMAPFactory

        return IMAPFactory(config=config, store=store, blocking=blocking,
                           authenticator=authenticator, screening=screening,
                           clock=clock, registry=imap_registry(), tls=tls, faults=faults,
                           quota=quota)

    # Kept from the start, whenever the site is built (docs/api.md: "since the web port started").
    decisions = Decisions() if config.listen.web else None
    if decisions is not None:
        events.subscribe(decisions)

    def web_site() -> Any:
        from twisted_mail_screen.web.context import WebContext
        from twisted_mail_screen.web.site import build_site

        return build_site(WebContext(
            config=config, reactor=reactor, clock=clock, events=events, store=store,
            delivery=delivery, accounts=accounts, authenticator=authenticator,
            screening=screening, queue=queue, faults=faults, blocking=blocking, lag=service.lag,
            metrics=metrics, ready=service.ready, imap=imap_registry(), quota=quota,
            decisions=decisions))

    factories: dict[str, Callable[[], Any]] = {
        "smtp": lambda: smtp_factory("smtp"),
        "submission": lambda: smtp_factory("submission"),
        "pop3": pop3_factory,
        "imap": imap_factory,
        "web": web_site,
    }

    def observed(kind: str) -> Any:
        factory = factories[kind]()
        if isinstance(factory, SessionFactory):
            factory.observer = metrics  # connections and login failures
        return factory

    for kind, descriptions in config.listen.items():
        if kind not in factories:
            continue
        for description in descriptions:
            try:
                endpoint = server_endpoint(reactor, description, clock, config.proxy.trusted, tls)
            except Exception as e:
                raise ConfigError(f"listen.{kind}", description, f"unusable endpoint: {e}") from e
            factory = OnFirstConnection(kind, lambda kind=kind: observed(kind)) \
                if kind in lazy else observed(kind)
            listener = Listener(kind, description, endpoint, factory)
            if kind in on_demand:
                service.pending.append(listener)
            else:
                listener.setServiceParent(service)
                service.listeners.append(listener)
    service.control_listener = Listener("control", config.control_socket,
                                        control_endpoint(reactor, config.control_socket), control)
    if "control" not in on_demand:
        service.listen_control()
    return service


def _build_quota(config: Config, store: MailStore, blocking: Blocking | Workers,
                 clock: IReactorTime) -> QuotaService:
    """The quota service with the accounts' own limits read (a bad file stops the start)."""
    path = state_path(config.data_dir)
    quota = QuotaService(store, blocking.run, config.quota.default, path, clock)
    try:
        quota.replace_overrides(read_overrides(path))
    except QuotaFileError as e:
        raise ConfigError("quota", path, str(e)) from e
    return quota


def _build_screening(config: Config, clock: IReactorTime, accounts: AccountStore,
                     router: Router, delivery: Delivery) -> ScreeningService:
    """The screening service, its state files, and its postmaster notifier."""

    def to_postmaster(message: bytes) -> Any:
        mailboxes = router.resolve(config.postmaster, may_relay=False).mailboxes
        return delivery.deliver_local(mailboxes or (config.postmaster,), message)

    notifier = PostmasterNotifier(clock, to_postmaster, config.hostname, config.postmaster,
                                  period_seconds=config.screening.notify_period_minutes * 60)
    return ScreeningService.in_directory(
        config.screening, config.freeze, clock, config.data_dir, notifier,
        known_account=accounts.exists if not config.test_host else None)
