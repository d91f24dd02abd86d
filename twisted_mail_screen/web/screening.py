# -*- test-case-name: tests.test_web_screening -*-
"""
C{/api/v1/screening}: the block list, the white list, frozen accounts,
the recent decisions and the counters, for administrators.

Every change goes through L{ScreeningCommands}, the object the control
channel (and so C{mailscreen block|whitelist|frozen}) calls: one
implementation, the same service objects. The decisions are the last
C{screening.decision} events of the server's event bus, kept in a
bounded ring (L{web.decisions}) from the moment the server starts.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from twisted_mail_screen.screening.admin import ScreeningCommands
from twisted_mail_screen.web.api import ApiError, ApiRequest, Router
from twisted_mail_screen.web.context import WebContext
from twisted_mail_screen.web.decisions import DECISIONS_KEPT, Decisions

#: What C{limit} is when the query does not say.
DEFAULT_LIMIT = 100
#: Blocks listed per request unless C{limit} says otherwise, and at most: a
#: storm's tens of thousands would hold the reactor thread past its budget
#: (5000 take about 40 ms to describe and encode).
BLOCKS_LIMIT = 1000
BLOCKS_LIMIT_MAX = 5000


def body(request: ApiRequest, required: tuple[str, ...],
         optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object of a request, with the C{required} fields and no unknown ones."""
    value = request.json(required=True)
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object")
    missing = [name for name in required if name not in value]
    if missing:
        raise ApiError(400, f"missing field: {', '.join(missing)}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise ApiError(400, f"unknown field: {', '.join(unknown)}")
    return value


def path_part(raw: str) -> str:
    """A path segment as named: C{198.51.100.0%2F24} is the network C{198.51.100.0/24}."""
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError as e:
        raise ApiError(400, "the path is not UTF-8") from e


def created(request: ApiRequest, value: Any) -> Any:
    request.request.setResponseCode(201)
    return value


def register(router: Router, context: WebContext) -> None:
    commands = ScreeningCommands(context.screening.admin, context.clock,
                                 context.config.freeze.minutes)
    decisions = context.decisions
    if decisions is None:  # a site built without the composition root (a unit test's)
        decisions = Decisions()
        context.events.subscribe(decisions)

    # blocks

    def blocks(request: ApiRequest) -> dict[str, Any]:
        start = request.int_arg("start", 0)
        limit = request.int_arg("limit", BLOCKS_LIMIT, minimum=1, maximum=BLOCKS_LIMIT_MAX)
        total, page = commands.block_page(start, limit)
        return {"total": total, "start": start, "blocks": page}

    def block(request: ApiRequest) -> dict[str, Any]:
        fields = body(request, ("address",), ("minutes", "reason"))
        return created(request, commands.block_add(fields["address"],
                                    fields.get("minutes"), fields.get("reason") or ""))

    def unblock(request: ApiRequest, address: str | None = None) -> dict[str, Any]:
        if address is None:
            address = body(request, ("address",))["address"]
        else:
            address = path_part(address)
        commands.block_remove(address)
        return {"unblocked": address}

    # the white list

    def whitelist(request: ApiRequest) -> dict[str, Any]:
        return {"whitelist": commands.whitelist_list()}

    def whitelist_add(request: ApiRequest) -> dict[str, Any]:
        fields = body(request, ("entry",), ("comment",))
        return created(request, commands.whitelist_add(fields["entry"],
                                    fields.get("comment") or ""))

    def whitelist_remove(request: ApiRequest, entry: str | None = None) -> dict[str, Any]:
        if entry is None:
            entry = body(request, ("entry",))["entry"]
        else:
            entry = path_part(entry)
        commands.whitelist_remove(entry)
        return {"removed": entry}

    # frozen accounts

    def frozen(request: ApiRequest) -> dict[str, Any]:
        return {"frozen": commands.frozen_list()}

    def freeze(request: ApiRequest) -> dict[str, Any]:
        fields = body(request, ("user",), ("minutes", "reason"))
        return created(request, commands.frozen_freeze(fields["user"],
                                    fields.get("minutes"), fields.get("reason") or ""))

    def thaw(request: ApiRequest, user: str | None = None) -> dict[str, Any]:
        if user is None:
            user = body(request, ("user",))["user"]
        else:
            user = path_part(user)
        commands.frozen_thaw(user)
        return {"thawed": user}

    # what screening decided, and its counters

    def recent(request: ApiRequest) -> dict[str, Any]:
        limit = request.int_arg("limit", DEFAULT_LIMIT, minimum=1, maximum=DECISIONS_KEPT)
        return {"decisions": decisions.latest(limit, request.arg("client") or None,
                                              request.arg("action") or None)}

    def stats(request: ApiRequest) -> dict[str, object]:
        return commands.stats()

    base = "/api/v1/screening"
    for method, path, handler in (
            ("GET", "/blocks", blocks), ("POST", "/blocks", block),
            ("DELETE", "/blocks", unblock), ("DELETE", "/blocks/{address}", unblock),
            ("GET", "/whitelist", whitelist), ("POST", "/whitelist", whitelist_add),
            ("DELETE", "/whitelist", whitelist_remove),
            ("DELETE", "/whitelist/{entry}", whitelist_remove),
            ("GET", "/frozen", frozen), ("POST", "/frozen", freeze),
            ("DELETE", "/frozen", thaw), ("DELETE", "/frozen/{user}", thaw),
            ("GET", "/decisions", recent), ("GET", "/stats", stats)):
        # Who is blocked, white-listed or frozen is the site's business, not a user's.
        router.add(method, base + path, handler, admin=True)
