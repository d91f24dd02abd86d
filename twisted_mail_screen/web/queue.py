# -*- test-case-name: tests.test_web_queue -*-
"""
C{/api/v1/queue}: the outbound queue for administrators: list, flush,
hold, release, delete, through L{QueueCommands} on the running server's
own L{OutboundQueue} (the change is made at once, and the queue's own
events follow). With relaying off the list is empty and the rest answer
404.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from twisted_mail_screen.relay.admin import QueueCommands
from twisted_mail_screen.web.api import ApiRequest, Router
from twisted_mail_screen.web.context import WebContext


#: Messages listed per request unless C{limit} says otherwise, and at most:
#: after an outage thousands wait, and each costs about 65 us of the
#: reactor thread to copy, describe and encode.
LIMIT = 100
LIMIT_MAX = 500


def register(router: Router, context: WebContext) -> None:
    commands = QueueCommands(context.queue, context.clock)

    def listing(request: ApiRequest) -> dict[str, Any]:
        start = request.int_arg("start", 0)
        limit = request.int_arg("limit", LIMIT, minimum=1, maximum=LIMIT_MAX)
        total, messages = commands.page(start, limit)
        return {"relaying": context.queue is not None, "total": total, "start": start,
                "messages": messages}

    def flush(request: ApiRequest) -> Deferred:
        return maybeDeferred(commands.flush).addCallback(lambda due: {"flushed": due})

    def hold(request: ApiRequest, id: str) -> Deferred:
        return maybeDeferred(commands.hold, id).addCallback(lambda queue_id: {"held": queue_id})

    def release(request: ApiRequest, id: str) -> Deferred:
        return maybeDeferred(commands.release, id).addCallback(
            lambda queue_id: {"released": queue_id})

    def delete(request: ApiRequest, id: str) -> Deferred:
        return maybeDeferred(commands.delete, id).addCallback(lambda queue_id: {"deleted": queue_id})

    for method, path, handler in (
            ("GET", "/api/v1/queue", listing), ("POST", "/api/v1/queue/flush", flush),
            ("POST", "/api/v1/queue/{id}/hold", hold),
            ("POST", "/api/v1/queue/{id}/release", release),
            ("DELETE", "/api/v1/queue/{id}", delete)):
        # The queue holds every user's outgoing mail: administrators only.
        router.add(method, path, handler, admin=True)
