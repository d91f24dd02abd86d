# -*- test-case-name: tests.test_web_events -*-
"""
C{GET /api/v1/events}: the server's events as Server-Sent Events, one
C{event: <kind>} / C{data: <json>} block per event on the bus, and a
C{: keepalive} comment every L{KEEPALIVE_SECONDS} so that proxies and
browsers keep an idle stream open.

A reader that does not keep up is dropped rather than buffered for: the
stream is a push producer of its connection, and once the transport has
paused it, events are held up to L{MAX_BACKLOG} bytes; past that the
connection is closed (an C{EventSource} reconnects by itself). So memory
per client is bounded whatever the event rate.

On a site, a principal who is not an administrator sees only the
C{message.*} events of their own mailbox. The guard has already refused
a foreign C{Origin} (a page of another site cannot open the stream).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from twisted_mail_screen.runtime.events import Event
from twisted_mail_screen.web.api import ApiRequest, Principal, Router
from twisted_mail_screen.web.context import WebContext

KEEPALIVE_SECONDS = 15.0
#: Bytes of events held for a paused (slow) reader before it is dropped.
MAX_BACKLOG = 1024 * 1024


def visible(principal: Principal) -> Callable[[Event], bool]:
    """Which events C{principal} may see: all for an administrator, else their mailbox's messages."""
    if principal.admin:
        return lambda event: True
    user = (principal.user or "").lower()

    def own(event: Event) -> bool:
        mailbox = event.data.get("Mailbox")
        return (event.kind.startswith("message.") and isinstance(mailbox, str)
                and mailbox.lower() == user)
    return own


def frame(event: Event) -> bytes:
    """One event in the SSE wire form (JSON never contains a raw newline)."""
    data = json.dumps(dict(event.data), default=str, separators=(",", ":"))
    return f"event: {event.kind}\ndata: {data}\n\n".encode()


@implementer(IPushProducer)
class EventStream:
    """One client's stream: subscribed from the first byte until the connection ends."""

    log = Logger()

    def __init__(self, request: Request, context: WebContext, principal: Principal) -> None:
        self._request = request
        self._wanted = visible(principal)
        self._paused = False
        self._backlog: list[bytes] = []
        self._held = 0
        self._ended = False
        request.registerProducer(self, True)
        self._unsubscribe = context.events.subscribe(self.event)
        self._keepalive = LoopingCall(self._send, b": keepalive\n\n")
        self._keepalive.clock = context.clock
        self._keepalive.start(KEEPALIVE_SECONDS, now=False)
        request.notifyFinish().addBoth(self._end)

    def event(self, event: Event) -> None:
        if self._wanted(event):
            self._send(frame(event))

    def _send(self, data: bytes) -> None:
        if self._ended:
            return
        if not self._paused:
            self._request.write(data)
            return
        self._held += len(data)
        if self._held > MAX_BACKLOG:
            self.log.info("web: event stream dropped: the client read too slowly "
                          "({held} bytes waiting)", held=self._held)
            self._drop()
            return
        self._backlog.append(data)

    def _drop(self) -> None:
        self._end()
        transport = self._request.transport
        if transport is not None:
            transport.abortConnection()

    def _end(self, result: Any = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._backlog.clear()
        self._unsubscribe()
        if self._keepalive.running:
            self._keepalive.stop()

    # IPushProducer: the transport says when its buffer is full and when drained

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        backlog, self._backlog, self._held = self._backlog, [], 0
        if backlog and not self._ended:
            self._request.write(b"".join(backlog))

    def stopProducing(self) -> None:
        self._end()


def register(router: Router, context: WebContext) -> None:
    def events(request: ApiRequest) -> Any:
        raw = request.request
        raw.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        raw.setHeader(b"cache-control", b"no-cache")
        raw.setHeader(b"x-accel-buffering", b"no")  # nginx: pass events on at once
        if raw.method == b"HEAD":
            raw.finish()
            return NOT_DONE_YET
        # The first bytes send the headers: the client's EventSource opens now.
        raw.write(b": mailscreen events\n\n")
        EventStream(raw, context, request.principal)
        return NOT_DONE_YET

    router.add("GET", "/api/v1/events", events)
