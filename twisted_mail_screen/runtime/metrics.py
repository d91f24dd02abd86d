# -*- test-case-name: tests.test_web_metrics -*-
"""
The server's metrics: one C{prometheus_client} registry owned by the
server (never the library's global one), fed from the event bus and from
two narrow hooks, and read by C{/metrics}; and the per-minute counts of
the last hour that the web page draws its chart from.

- Counters that follow changes (refusals, blocks, freezes, outbound
  attempts) subscribe to the L{EventBus}; the services publish there.
- Connections and authentication failures are reported by every
  session's shared code (L{ServerMetrics} is the sessions'
  C{SessionObserver}); deliveries by L{MeasuredDelivery}, which the
  composition root hands to the SMTP listeners.
- Sizes that are state rather than changes (active blocks, the queue,
  reactor lag, notices sent) are read when scraped (L{StateCollector}),
  so nothing has to keep a gauge in step.

Everything here runs on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import time
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.runtime.events import Event, EventBus
from twisted_mail_screen.runtime.lagmonitor import LagMonitor
from twisted_mail_screen.runtime.metricnames import COUNTERS, LATENCY_BUCKETS

if TYPE_CHECKING:
    from prometheus_client.core import Metric


#: The per-minute series the chart draws, one bucket a minute for an hour.
SERIES = ("connections", "refusals", "blocks")
MINUTES = 60

#: Outbound results, as the queue's events name them.
OUTBOUND = {"queue.delivered": "delivered", "queue.deferred": "deferred", "queue.bounced": "bounced"}


class MinuteCounts:
    """
    Counts per minute over the last hour: a ring of L{MINUTES} buckets per
    series, keyed by C{clock.seconds() // 60}. Minutes in which nothing
    happened are zeros; older ones fall off the end.
    """

    def __init__(self, clock: IReactorTime, series: tuple[str, ...] = SERIES,
                 size: int = MINUTES) -> None:
        self._clock = clock
        self._size = size
        self._minute = int(clock.seconds() // 60)
        self._counts = {name: [0] * size for name in series}

    def _roll(self) -> int:
        """Move the ring to the current minute; its index there."""
        minute = int(self._clock.seconds() // 60)
        gap = minute - self._minute
        if gap > 0:
            for counts in self._counts.values():
                if gap >= self._size:
                    counts[:] = [0] * self._size
                else:
                    # the slots of the skipped minutes (and the new one) start at zero
                    for m in range(self._minute + 1, minute + 1):
                        counts[m % self._size] = 0
            self._minute = minute
        # A clock that went back counts into the newest minute.
        return self._minute % self._size

    def add(self, name: str, count: int = 1) -> None:
        self._counts[name][self._roll()] += count

    def snapshot(self) -> dict[str, Any]:
        """C{{"minute": start of the newest minute, "series": {name: counts, oldest first}}}."""
        newest = self._roll()
        start = newest + 1
        return {"minute": self._minute * 60,
                "series": {name: counts[start:] + counts[:start]
                           for name, counts in self._counts.items()}}


class Counts:
    """
    One counter's values by label values, each with its creation time
    (C{time.time()}, as C{prometheus_client} stamps its C{_created} series).
    """

    __slots__ = ("values",)

    def __init__(self, labelled: bool) -> None:
        #: label values -> [count, created]; an unlabelled counter exists from the start
        self.values: dict[tuple[str, ...], list[float]] = {} if labelled else {(): [0.0, time.time()]}

    def inc(self, labels: tuple[str, ...] = (), amount: float = 1.0) -> None:
        value = self.values.get(labels)
        if value is None:
            self.values[labels] = value = [0.0, time.time()]
        value[0] += amount


class Latency:
    """The delivery-latency histogram: counts per bucket (the last one +Inf), their sum."""

    __slots__ = ("buckets", "sum", "created")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                return
        self.buckets[-1] += 1


class ServerMetrics:
    """
    The counters the server feeds and the registry that /metrics reads.
    Build one per server, subscribe it to the bus (the constructor does)
    and hand it to the session factories (C{observer}) and the web port.

    The counts are plain numbers kept from the server's start; the
    C{prometheus_client} registry (and its import) comes on the first
    read of L{registry}, whose collector renders them at each scrape:
    a test host that is never scraped pays for neither
    (docs/performance.md, the plugin's start-up cost, sixth round).
    """

    def __init__(self, events: EventBus, clock: IReactorTime) -> None:
        self.minutes = MinuteCounts(clock)
        self.counters = {name: Counts(bool(labels)) for name, _, labels in COUNTERS}
        self.latency = Latency()
        self._collectors: list[Any] = []
        self._registry: Any = None
        c = self.counters
        self._connections = c["mailscreen_connections"]
        self._auth_failures = c["mailscreen_auth_failures"]
        self._refusals = c["mailscreen_refusals"]
        self._blocks = c["mailscreen_blocks"]
        self._freezes = c["mailscreen_freezes"]
        self._delivered = c["mailscreen_messages_delivered"]
        self._delivered_bytes = c["mailscreen_messages_delivered_bytes"]
        self._outbound = c["mailscreen_outbound_attempts"]
        self.unsubscribe = events.subscribe(self.event)

    def register(self, collector: Any) -> None:
        """Add a collector read at each scrape (registered with the registry when it is made)."""
        self._collectors.append(collector)
        if self._registry is not None:
            self._registry.register(collector)

    @property
    def registry(self) -> Any:
        """The server's own C{prometheus_client} registry (never the library's global one)."""
        if self._registry is None:
            from twisted_mail_screen.runtime.promrender import make_registry

            self._registry = make_registry(self, self._collectors)
        return self._registry

    # the sessions' observer (protocols/session.py)

    def connection(self, protocol: str, accepted: bool) -> None:
        self._connections.inc((protocol, "accepted" if accepted else "refused"))
        self.minutes.add("connections")

    def auth_failed(self, protocol: str) -> None:
        self._auth_failures.inc((protocol,))

    # deliveries (MeasuredDelivery)

    def delivery(self, size: int, seconds: float) -> None:
        self._delivered.inc()
        self._delivered_bytes.inc((), float(size))
        self.latency.observe(seconds)

    # the event bus

    def event(self, event: Event) -> None:
        kind, data = event.kind, event.data
        if kind == "screening.decision":
            if data.get("action") == "refuse":
                self._refusals.inc((str(data.get("rule")),))
                self.minutes.add("refusals")
        elif kind == "screening.block":
            self._blocks.inc((str(data.get("rule")),))
            self.minutes.add("blocks")
        elif kind == "screening.freeze":
            self._freezes.inc()
        elif kind in OUTBOUND and not data.get("expired"):
            self._outbound.inc((OUTBOUND[kind],))


class StateCollector:
    """
    Gauges read when scraped: active blocks, frozen accounts, the queue's
    size and oldest message, reactor lag, and the postmaster notices sent.
    C{blocks}, C{frozen} and C{notices} are callables returning counts;
    C{queue} returns C{(messages, oldest creation time or None)} or is
    C{None} when relaying is off.
    """

    def __init__(self, clock: IReactorTime, lag: LagMonitor, blocks: Callable[[], int],
                 frozen: Callable[[], int], notices: Callable[[], int],
                 queue: Callable[[], tuple[int, float | None]] | None) -> None:
        self._clock = clock
        self._lag = lag
        self._blocks = blocks
        self._frozen = frozen
        self._notices = notices
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("mailscreen_active_blocks", "Addresses and networks blocked now",
                                value=self._blocks())
        yield GaugeMetricFamily("mailscreen_frozen_accounts", "Accounts frozen now",
                                value=self._frozen())
        messages, oldest = self._queue() if self._queue is not None else (0, None)
        yield GaugeMetricFamily("mailscreen_queue_messages", "Messages in the outbound queue",
                                value=messages)
        age = 0.0 if oldest is None else max(0.0, self._clock.seconds() - oldest)
        yield GaugeMetricFamily("mailscreen_queue_oldest_age_seconds",
                                "Age of the oldest queued message (0: the queue is empty)",
                                value=age)
        yield GaugeMetricFamily("mailscreen_reactor_lag_seconds",
                                "How late the reactor ran its last lag-monitor tick",
                                value=self._lag.last_lag)
        yield GaugeMetricFamily("mailscreen_reactor_lag_worst_seconds",
                                "The latest tick since the server started",
                                value=self._lag.worst_lag)
        yield CounterMetricFamily("mailscreen_reactor_late_ticks",
                                  "Lag-monitor ticks later than its warning threshold",
                                  value=self._lag.late_ticks)
        yield CounterMetricFamily("mailscreen_notifier_mails",
                                  "Postmaster notices (and digests) sent by screening",
                                  value=self._notices())


class BackendCollector:
    """
    C{mailscreen_screening_backend_up}: 1 while screening's shared state is
    reachable (always, for the in-memory backend), 0 while a node counts
    on its own because Redis is down (docs/screening.md, "Several nodes").
    """

    def __init__(self, backend: str, up: Callable[[], bool]) -> None:
        self._backend = backend
        self._up = up

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("mailscreen_screening_backend_up",
                                   "Whether screening's shared state is reachable",
                                   labels=["backend"])
        family.add_metric([self._backend], 1 if self._up() else 0)
        yield family


class MeasuredDelivery:
    """
    The SMTP listeners' view of L{Delivery}: the same object, with every
    successful C{deliver} (the one behind a 250 after DATA) counted and
    timed on the injected clock. Everything else goes to the delivery
    itself, so there is still one writer of mail.
    """

    def __init__(self, delivery: Any, metrics: ServerMetrics, clock: IReactorTime) -> None:
        self._delivery = delivery
        self._metrics = metrics
        self._clock = clock

    def deliver(self, sender: str, mailboxes: tuple[str, ...], remote: tuple[str, ...],
                message: bytes, *args: Any, **kwargs: Any) -> Deferred:
        started = self._clock.seconds()
        d = self._delivery.deliver(sender, mailboxes, remote, message, *args, **kwargs)

        def delivered(result: Any) -> Any:
            self._metrics.delivery(len(message), self._clock.seconds() - started)
            return result

        return d.addCallback(delivered)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._delivery, name)
