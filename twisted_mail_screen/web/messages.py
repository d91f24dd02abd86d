# -*- test-case-name: tests.test_web_messages -*-
"""
Mailpit's messages API (v1) over the server's Maildirs: list, search,
read/unread, delete, one message with its headers, source, parts and
rendered views, and the long-polling wait (L{twisted_mail_screen.web.wait}).

Who sees what: on a test host, every mailbox's INBOX (C{mailbox=}
narrows it); on a site, an account sees its own mailbox, an
administrator every one. A message of another mailbox answers 404, as an
unknown one does. File work runs in the worker pool (L{MailFiles}); file
changes take the IMAP account lock and then refresh the IMAP index, so
IMAP sessions see flags and expunges at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, gatherResults, succeed
from twisted.logger import Logger

from twisted_mail_screen.store.addresses import AddressError, normalise_address
from twisted_mail_screen.store.message_ids import BadMessageId, MessageRef, decode
from twisted_mail_screen.web import summary as summaries
from twisted_mail_screen.web.api import ApiError, ApiRequest, Raw, Router
from twisted_mail_screen.web.context import WebContext
from twisted_mail_screen.web.mailfiles import Found, MailFiles
from twisted_mail_screen.web.mailsearch import EVERYTHING, Query, QueryError, parse_query
from twisted_mail_screen.web.wait import Waiter

log = Logger()

OK = Raw(b"ok", "text/plain; charset=utf-8")
#: The rendered HTML view may not run script nor load anything remote.
VIEW_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data: cid:; sandbox"
#: An attachment opened in the browser runs nothing either (an HTML
#: attachment would otherwise run script on the API's own origin).
PART_CSP = "default-src 'none'; sandbox"
SAFE = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
NOT_FOUND = "message not found"


class Messages:
    """The handlers; what they share: the file side, the caller's scope, queries."""

    def __init__(self, context: WebContext) -> None:
        self.context = context
        self.files = MailFiles(context.store)
        self.max_page = context.config.web.max_page

    # who sees what

    def scope(self, request: ApiRequest) -> list[str] | None:
        """The mailboxes a request covers (C{None}: every one)."""
        principal = request.principal
        wanted = request.arg("mailbox")
        if wanted:
            try:
                mailbox = normalise_address(wanted)
            except AddressError as e:
                raise ApiError(400, f"mailbox: {e}") from e
            if not principal.admin and mailbox != principal.user:
                raise ApiError(403, "you may see your own mailbox only")
            return [mailbox]
        if principal.admin:
            return None
        return [principal.user or ""]

    def ref(self, request: ApiRequest, message_id: str) -> "Deferred[MessageRef]":
        """The message an ID (or C{latest}) names, if the caller may see it; else 404."""
        if message_id == "latest":
            query = self.query(request, required=False)
            d = self.run(self.files.matching, self.scope(request), query)

            def newest(refs: list[MessageRef]) -> MessageRef:
                if not refs:
                    raise ApiError(404, "no messages")
                return refs[0]
            return d.addCallback(newest)
        return succeed(self.decode(request, message_id))

    def decode(self, request: ApiRequest, message_id: str) -> MessageRef:
        try:
            ref = decode(message_id)
        except BadMessageId as e:
            raise ApiError(404, NOT_FOUND) from e
        principal = request.principal
        if not principal.admin and ref.mailbox != principal.user:
            raise ApiError(404, NOT_FOUND)
        return ref

    def query(self, request: ApiRequest, required: bool = True) -> Query:
        text = (request.arg("query") or "").strip()
        if not text:
            if required:
                raise ApiError(400, "no search query")
            return EVERYTHING
        try:
            return parse_query(text, request.arg("tz"))
        except QueryError as e:
            raise ApiError(400, str(e)) from e

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return self.context.blocking.run(f, *args)

    # listing

    def page(self, request: ApiRequest, query: Query | None) -> Deferred:
        start = request.int_arg("start", 0)
        limit = request.int_arg("limit", 50, 0, self.max_page)
        return self.run(self.json_page, self.scope(request), query, start, limit)

    def json_page(self, scope: list[str] | None, query: Query | None, start: int, limit: int) -> Raw:
        """A page as JSON text, encoded here in the worker (1,000 entries are ~0.5 MB)."""
        page = self.files.page(scope, query, start, limit)
        return Raw(json.dumps(page).encode(), "application/json")

    def list_messages(self, request: ApiRequest) -> Deferred:
        return self.page(request, None)

    def search(self, request: ApiRequest) -> Deferred:
        return self.page(request, self.query(request))

    # changes

    def body(self, request: ApiRequest) -> dict[str, Any]:
        body = request.json()
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        ids = body.get("IDs")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise ApiError(400, "IDs must be a list of message IDs")
        return body

    def refs(self, request: ApiRequest, ids: list[str]) -> "Deferred[list[MessageRef]]":
        """The messages of a body's IDs, decoded in the worker (12,000 IDs take ~250 ms)."""
        return self.run(lambda: [self.decode(request, i) for i in dict.fromkeys(ids)])

    def everything(self, request: ApiRequest, query: Query | None) -> "Deferred[list[MessageRef] | list[str]]":
        """What a change without IDs covers: the messages a search matches, or whole mailboxes."""
        scope = self.scope(request)
        if query is not None:
            return self.run(self.files.matching, scope, query)
        if scope is None:
            return self.run(self.files.mailboxes)
        return succeed(scope)

    def delete_messages(self, request: ApiRequest) -> Deferred:
        ids = self.body(request).get("IDs") or []
        if ids:
            return self.refs(request, ids).addCallback(self.change, "delete").addCallback(lambda _: OK)
        return self.everything(request, None).addCallback(self.change_all, "delete")

    def delete_search(self, request: ApiRequest) -> Deferred:
        d = self.everything(request, self.query(request))
        return d.addCallback(self.change, "delete").addCallback(lambda _: OK)

    def set_read(self, request: ApiRequest) -> Deferred:
        body = self.body(request)
        read = body.get("Read", False)
        search = body.get("Search", "")
        if not isinstance(read, bool) or not isinstance(search, str):
            raise ApiError(400, "Read must be true or false, Search a string")
        action = "read" if read else "unread"
        ids = body.get("IDs") or []
        if ids and search.strip():
            raise ApiError(400, "give either IDs or a search, not both")
        if ids:
            return self.refs(request, ids).addCallback(self.change, action).addCallback(lambda _: OK)
        if search.strip():
            try:
                query = parse_query(search.strip(), request.arg("tz"))
            except QueryError as e:
                raise ApiError(400, str(e)) from e
            return self.everything(request, query).addCallback(self.change, action).addCallback(
                lambda _: OK)
        return self.everything(request, None).addCallback(self.change_all, action)

    def change_all(self, mailboxes: list[str], action: str) -> Deferred:
        groups: dict[str, list[str] | None] = {m: None for m in mailboxes}
        return self.apply(groups, action).addCallback(lambda _: OK)

    def change(self, refs: list[MessageRef], action: str) -> Deferred:
        groups: dict[str, list[str] | None] = {}
        for ref in refs:
            bases = groups.setdefault(ref.mailbox, [])
            assert bases is not None
            bases.append(ref.base)
        return self.apply(groups, action)

    def apply(self, groups: dict[str, list[str] | None], action: str) -> Deferred:
        """One job per mailbox, under its IMAP account lock; events for what changed."""
        jobs = []
        for mailbox, bases in groups.items():
            path = self.files.folder_path(mailbox)
            if action == "delete":
                job: tuple[Any, ...] = (self.files.delete, mailbox, bases)
            else:
                job = (self.files.set_read, mailbox, bases, action == "read")
            d = self.lock(path).run(self.run, *job)
            d.addCallback(self.changed, mailbox, path, action)
            jobs.append(d)
        return gatherResults(jobs, consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def lock(self, path: str) -> DeferredLock:
        registry = self.context.imap
        return registry.lock(path) if registry is not None else DeferredLock()

    def changed(self, ids: list[str], mailbox: str, path: str, action: str) -> Any:
        if not ids:
            return ids
        self.context.events.publish(f"message.{'deleted' if action == 'delete' else action}",
                                    IDs=ids, Mailbox=mailbox)
        registry = self.context.imap
        folder = registry.folders.get(path) if registry is not None else None
        if registry is None or folder is None or not folder.loaded or folder.retired:
            return ids
        # Sessions that have the INBOX selected see the change by the time we
        # answer, not at their next poll.
        d = registry.sync(folder)
        d.addErrback(lambda f: log.failure("web: IMAP index refresh of {path} failed", f, path=path))
        return d.addCallback(lambda _: ids)

    # one message

    def found(self, ref: MessageRef) -> Deferred:
        def check(result: tuple[Found, bytes] | None) -> tuple[Found, bytes]:
            if result is None:
                raise ApiError(404, NOT_FOUND)
            return result
        return self.run(self.files.read, ref).addCallback(check)

    def with_message(self, request: ApiRequest, message_id: str,
                     render: Callable[[Found, bytes], Any]) -> Deferred:
        """Find the message, read it, and C{render(found, data)} in the worker pool."""
        d = self.ref(request, message_id).addCallback(self.found)
        return d.addCallback(lambda r: self.run(render, *r))

    def message(self, request: ApiRequest, id: str) -> Deferred:
        def render(found: Found, data: bytes) -> tuple[Found, dict[str, Any]]:
            view = summaries.full_view(data, summaries.rfc3339(found.created))
            return found, {"ID": found.ref.id, **view, "Size": found.size(data), "Username": "",
                           "ListUnsubscribe": {"Header": "", "Links": [], "Errors": "",
                                               "HeaderPost": ""}}

        def mark_read(result: tuple[Found, dict[str, Any]]) -> Any:
            found, view = result
            if found.read:
                return view
            # Opening a message marks it read, as Mailpit does.
            d = self.change([found.ref], "read")
            return d.addCallback(lambda _: view)
        return self.with_message(request, id, render).addCallback(mark_read)

    def headers(self, request: ApiRequest, id: str) -> Deferred:
        return self.with_message(request, id, lambda found, data: summaries.headers(data))

    def raw(self, request: ApiRequest, id: str) -> Deferred:
        def render(found: Found, data: bytes) -> Raw:
            extra = {}
            if request.arg("dl") == "1":
                extra["Content-Disposition"] = f'attachment; filename="{found.ref.id}.eml"'
            return Raw(data, "text/plain; charset=utf-8", {**SAFE, **extra})
        return self.with_message(request, id, render)

    def part(self, request: ApiRequest, id: str, part: str) -> Deferred:
        def render(found: Found, data: bytes) -> Raw:
            leaf = summaries.part(data, part)
            if leaf is None:
                raise ApiError(404, "no such part")
            name = _quoted(leaf.filename or leaf.content_id or f"part-{part}")
            return Raw(leaf.payload(), leaf.content_type,
                       {**SAFE, "Content-Security-Policy": PART_CSP,
                        "Content-Disposition": f'inline; filename="{name}"'})
        return self.with_message(request, id, render)

    def view_html(self, request: ApiRequest, id: str) -> Deferred:
        def render(found: Found, data: bytes) -> Raw:
            markup = summaries.parse(data).html
            if not markup:
                raise ApiError(404, "the message has no HTML part")
            return Raw(markup.encode("utf-8"), "text/html; charset=utf-8",
                       {**SAFE, "Content-Security-Policy": VIEW_CSP})
        return self.with_message(request, id, render)

    def view_text(self, request: ApiRequest, id: str) -> Deferred:
        def render(found: Found, data: bytes) -> Raw:
            return Raw(summaries.parse(data).text.encode("utf-8"), "text/plain; charset=utf-8",
                       {**SAFE, "Content-Security-Policy": PART_CSP})
        return self.with_message(request, id, render)


def _quoted(name: str) -> str:
    """A file name safe inside a quoted header parameter (no quotes, controls or non-Latin-1)."""
    return "".join(c if c.isprintable() and c not in '"\\' and ord(c) < 256 else "_" for c in name)[:200]


def register(router: Router, context: WebContext) -> None:
    m = Messages(context)
    router.add("GET", "/api/v1/messages", m.list_messages)
    router.add("DELETE", "/api/v1/messages", m.delete_messages)
    router.add("PUT", "/api/v1/messages", m.set_read)
    router.add("GET", "/api/v1/messages/wait", Waiter(m).wait)
    router.add("GET", "/api/v1/search", m.search)
    router.add("DELETE", "/api/v1/search", m.delete_search)
    router.add("GET", "/api/v1/message/{id}", m.message)
    router.add("GET", "/api/v1/message/{id}/headers", m.headers)
    router.add("GET", "/api/v1/message/{id}/raw", m.raw)
    router.add("GET", "/api/v1/message/{id}/part/{part}", m.part)
    router.add("GET", "/view/{id}.html", m.view_html)
    router.add("GET", "/view/{id}.txt", m.view_text)
