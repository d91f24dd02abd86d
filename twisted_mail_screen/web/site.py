# -*- test-case-name: tests.test_web -*-
"""
The web port: one C{twisted.web} site in the server's own process and
reactor, built from the same service objects the mail listeners and the
control channel use (no second implementation of anything).

Each concern registers its routes on one L{Router}: C{health},
C{messages} (Mailpit's API), C{events} (the live stream), C{screening},
C{queue}, C{faults}, C{metrics} and C{ui} (the page).
"""

from __future__ import annotations

from twisted.web.server import Request, Site

from twisted_mail_screen.web import events, faults, health, messages, metrics, queue, quota, screening, ui
from twisted_mail_screen.web.api import MAX_BODY, Router
from twisted_mail_screen.web.context import WebContext
from twisted_mail_screen.web.security import Guard, read_tokens


class BoundedRequest(Request):
    """
    A request whose body is read no further than L{MAX_BODY}: the rest is
    dropped as it arrives (memory stays bounded) and the answer is 413.
    """

    received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self.received += len(data)
        if self.received <= MAX_BODY:
            super().handleContentChunk(data)

    def process(self) -> None:
        if self.received > MAX_BODY:
            self.setResponseCode(413)
            self.setHeader(b"content-type", b"application/json")
            self.write(b'{"Error": "request body too large"}')
            self.finish()
            return
        super().process()


def build_site(context: WebContext) -> Site:
    guard = Guard(context.config, context.authenticator, context.clock,
                  read_tokens(context.config.web.token_file))
    router = Router(guard)
    for concern in (health, messages, events, screening, queue, quota, faults, metrics, ui):
        concern.register(router, context)
    site = Site(router, requestFactory=BoundedRequest)
    site.displayTracebacks = False
    site.noisy = False
    return site
