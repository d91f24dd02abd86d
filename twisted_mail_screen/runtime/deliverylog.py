# -*- test-case-name: tests.test_delivery_log -*-
"""
One structured log line per delivery, so a site can grep a message's fate
(docs/deployment.md, "Logs"): mail accepted over SMTP (stored locally,
queued, or failed with a 4xx) and each relay attempt's outcome for each
remote recipient. The text is C{key=value} fields after C{delivery:}; the
same fields are in the log event for JSON observers (C{delivery_*} keys).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="mailscreen.delivery")

#: What C{kind=} says: stored in local mailboxes, accepted into the
#: outbound queue, or one relay attempt's outcome for one recipient.
KINDS = ("local", "queued", "relay")


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _quoted(text: str) -> str:
    """A field value with spaces or quotes, quoted so that the line stays splittable."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def log_delivery(*, id: str, kind: str, sender: str, recipients: Iterable[str], size: int,
                 result: str, now: float, host: str | None = None, reply: str | None = None,
                 next_attempt: float | None = None, client: str | None = None) -> None:
    """Log one delivery line; C{now} comes from the injected clock."""
    assert kind in KINDS, kind
    rcpts = list(recipients)
    extra = ""
    if client:  # the SMTP client that sent it (the line SMTP logs per message)
        extra += f" client={client}"
    if host:
        extra += f" host={host}"
    if reply:
        extra += f" reply={_quoted(reply)}"
    if next_attempt is not None:
        extra += f" next={utc(next_attempt)}"
    # The id may hold several local file names (one per mailbox): only the
    # first is the message's name, the one the 250 reply gives.
    log.info("delivery: id={delivery_id} kind={delivery_kind} from=<{delivery_sender}> "
             "to={delivery_to} size={delivery_size} result={delivery_result}{delivery_extra} "
             "time={delivery_time}",
             delivery_id=id.split(",")[0], delivery_kind=kind, delivery_sender=sender,
             delivery_to=",".join(rcpts), delivery_recipients=rcpts, delivery_size=size,
             delivery_result=result, delivery_extra=extra, delivery_time=utc(now),
             delivery_host=host, delivery_reply=reply, delivery_client=client)


def logged(d: "Deferred[str]", *, sender: str, mailboxes: tuple[str, ...], remote: tuple[str, ...],
           size: int, clock: IReactorTime, client: str | None = None) -> "Deferred[str]":
    """
    C{d}, a delivery of accepted mail (its result: the local file name, or
    the queue id when every recipient is remote), with its line logged
    whichever way it ends; the result or failure passes on unchanged.
    """
    recipients = mailboxes + remote
    kind = "local" if mailboxes else "queued"

    def done(result: Any) -> Any:
        failed = isinstance(result, Failure)
        log_delivery(id="-" if failed else result, kind=kind, sender=sender, recipients=recipients,
                     size=size, result="failed" if failed else "stored" if mailboxes else "queued",
                     now=clock.seconds(), client=client)
        return result

    return d.addBoth(done)
