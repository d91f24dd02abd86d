# -*- test-case-name: tests.test_web_metrics -*-
"""
A server's C{prometheus_client} registry, made on the first scrape: one
collector renders L{ServerMetrics}' plain counts as the counter and
histogram families C{Counter} and C{Histogram} objects would expose (the
same names, help, labels, C{_total}, C{_created}, buckets), then the
collectors the composition root added.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from twisted_mail_screen.runtime.metricnames import COUNTERS, LATENCY, LATENCY_BUCKETS

#: The histogram's families come after these counters (the order of old).
_BEFORE_LATENCY = "mailscreen_messages_delivered_bytes"


class CountsCollector:
    """
    Renders the counts of one server's L{ServerMetrics
    <twisted_mail_screen.runtime.metrics.ServerMetrics>} at each scrape
    (typed C{Any}: metrics.py imports this module on the first scrape).
    """

    def __init__(self, metrics: Any) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for name, documentation, labels in COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=list(labels))
            for values, (count, created) in self._metrics.counters[name].values.items():
                family.add_metric(list(values), count, created=created)
            yield family
            if name == _BEFORE_LATENCY:
                yield self._latency()

    def _latency(self) -> Metric:
        latency = self._metrics.latency
        cumulative, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), latency.buckets):
            running += count
            cumulative.append((floatToGoString(bound), float(running)))
        family = HistogramMetricFamily(LATENCY[0], LATENCY[1])
        family.add_metric([], cumulative, latency.sum)
        family.samples.append(Sample(LATENCY[0] + "_created", {}, latency.created, None))
        return family


def make_registry(metrics: Any, collectors: Iterable[Any]) -> CollectorRegistry:
    """The registry /metrics reads: the counts, then each of C{collectors}."""
    registry = CollectorRegistry()
    registry.register(CountsCollector(metrics))
    for collector in collectors:
        registry.register(collector)
    return registry
