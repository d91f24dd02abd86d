# -*- test-case-name: tests.test_web_messages -*-
"""
C{GET /api/v1/messages/wait?query=…&count=N&timeout=S}: a long poll that
answers, in the shape of a search, as soon as C{N} messages match, or 408
at the timeout. No peer has it server-side; with it a user's test waits
for mail without a polling loop.

It checks once at once, then again on each C{message.new} event of the
mailboxes it covers (events that come while a check runs cause one more
check, not one each). The timeout runs on the injected clock. A client
that goes away cancels its timer and its subscription.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from twisted_mail_screen.runtime.events import Event
from twisted_mail_screen.web.api import ApiError, ApiRequest
from twisted_mail_screen.web.context import WebContext
from twisted_mail_screen.web.mailfiles import MailFiles
from twisted_mail_screen.web.mailsearch import Query

MAX_TIMEOUT = 300.0
DEFAULT_TIMEOUT = 30.0


class Messages(Protocol):
    """What the wait needs of the messages API (L{twisted_mail_screen.web.messages.Messages})."""

    context: WebContext
    files: MailFiles
    max_page: int

    def query(self, request: ApiRequest, required: bool = True) -> Query: ...

    def scope(self, request: ApiRequest) -> list[str] | None: ...

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred: ...


class Waiter:
    def __init__(self, messages: Messages) -> None:
        self.messages = messages

    def wait(self, request: ApiRequest) -> Deferred:
        m = self.messages
        query = m.query(request, required=False)
        count = request.int_arg("count", 1, 1, m.max_page)
        limit = request.int_arg("limit", 50, 0, m.max_page)
        timeout = _seconds(request.arg("timeout"))
        scope = m.scope(request)
        pending = Pending(m, scope, query, count, limit, timeout)
        # The client went away: stop listening and drop the timer.
        request.request.notifyFinish().addErrback(lambda _: pending.stop())
        return pending.start()


def _seconds(raw: str | None) -> float:
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError as e:
        raise ApiError(400, "timeout must be a number of seconds") from e
    if not 0 < value <= MAX_TIMEOUT:  # also refuses nan and inf
        raise ApiError(400, f"timeout must be over 0 and at most {MAX_TIMEOUT:g} seconds")
    return value


class Pending:
    """One waiting request."""

    def __init__(self, messages: Messages, scope: list[str] | None, query: Query,
                 count: int, limit: int, timeout: float) -> None:
        self.messages = messages
        self.scope = scope
        self.query = query
        self.count = count
        self.limit = limit
        self.timeout = timeout
        self.result: Deferred = Deferred()
        self.done = False
        self.checking = False
        self.again = False
        self.timer: IDelayedCall | None = None
        self.unsubscribe: Any = None

    def start(self) -> Deferred:
        context = self.messages.context
        self.unsubscribe = context.events.subscribe(self.event)
        self.timer = context.clock.callLater(self.timeout, self.expire)
        self.check()
        return self.result

    def event(self, event: Event) -> None:
        if event.kind != "message.new":
            return
        if self.scope is not None and event.data.get("Mailbox") not in self.scope:
            return
        self.check()

    def check(self) -> None:
        if self.done:
            return
        if self.checking:
            self.again = True
            return
        self.checking = True
        m = self.messages
        d = m.run(m.files.page, self.scope, self.query, 0, self.limit)
        d.addCallbacks(self.checked, self.failed)

    def checked(self, page: dict[str, Any]) -> None:
        self.checking = False
        if self.done:
            return
        if page["messages_count"] >= self.count:
            self.finish(page)
        elif self.again:
            self.again = False
            self.check()

    def failed(self, failure: Failure) -> None:
        self.checking = False
        if not self.done:
            self.finish(failure)

    def expire(self) -> None:
        self.timer = None
        if not self.done:
            plural = "" if self.count == 1 else "s"
            self.finish(Failure(ApiError(
                408, f"timed out after {self.timeout:g} s waiting for {self.count} matching message{plural}")))

    def finish(self, result: Any) -> None:
        self.stop()
        self.result.callback(result)

    def stop(self) -> None:
        self.done = True
        if self.unsubscribe is not None:
            self.unsubscribe()
            self.unsubscribe = None
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
