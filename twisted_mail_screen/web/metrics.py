# -*- test-case-name: tests.test_web_metrics -*-
"""
C{GET /metrics}: the server's registry in the Prometheus text format,
rendered synchronously on the reactor thread (a few hundred samples: well
under a millisecond; no WSGI thread pool). C{GET /api/v1/stats}:
connections, refusals and blocks per minute over the last hour, for the
page's chart. Both are for administrators (on a test host, everyone).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

# The registry is made on the first scrape, on the reactor thread: its
# module comes in with the web port's, not then.
from twisted_mail_screen.runtime import promrender  # noqa: F401
from twisted_mail_screen.web.api import ApiRequest, Raw, Router
from twisted_mail_screen.web.context import WebContext


def register(router: Router, context: WebContext) -> None:
    metrics = context.metrics

    def scrape(request: ApiRequest) -> Raw:
        request.require_admin()
        return Raw(generate_latest(metrics.registry), CONTENT_TYPE_LATEST,
                   {"cache-control": "no-store"})

    def stats(request: ApiRequest) -> dict[str, Any]:
        request.require_admin()
        return metrics.minutes.snapshot()

    router.add("GET", "/metrics", scrape)
    router.add("GET", "/api/v1/stats", stats)
