# -*- test-case-name: tests.test_web -*-
"""What the web port's handlers are given: the server's own service objects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.faults.plan import FaultPlan
from twisted_mail_screen.protocols.imap.registry import Registry
from twisted_mail_screen.quota.service import QuotaService
from twisted_mail_screen.relay.queue import OutboundQueue
from twisted_mail_screen.runtime.events import EventBus
from twisted_mail_screen.runtime.lagmonitor import LagMonitor
from twisted_mail_screen.runtime.metrics import ServerMetrics
from twisted_mail_screen.runtime.workers import Blocking
from twisted_mail_screen.screening.service import ScreeningService
from twisted_mail_screen.store.accounts import AccountStore
from twisted_mail_screen.store.auth import Authenticator
from twisted_mail_screen.store.delivery import Delivery
from twisted_mail_screen.store.maildir import MailStore
from twisted_mail_screen.web.decisions import Decisions


@dataclass(frozen=True)
class WebContext:
    """
    Everything the web port's handlers may use, handed down by the
    composition root. C{ready} says whether every listener is bound and
    the stores are open.
    """

    config: Config
    reactor: Any
    clock: IReactorTime
    events: EventBus
    store: MailStore
    delivery: Delivery
    accounts: AccountStore
    authenticator: Authenticator
    screening: ScreeningService
    queue: OutboundQueue | None
    faults: FaultPlan | None
    blocking: Blocking
    lag: LagMonitor
    metrics: ServerMetrics  # its registry for /metrics, its minute counts for /api/v1/stats
    ready: Callable[[], bool]
    #: the IMAP folder indexes: the messages API takes their account locks
    #: and refreshes them after a change, so IMAP sessions see it at once
    imap: Registry | None = None
    #: accounts' limits and usage (C{/api/v1/quota})
    quota: QuotaService | None = None
    #: the screening decisions kept since the server started (None: the
    #: screening routes keep their own from when the site is built)
    decisions: Decisions | None = None
