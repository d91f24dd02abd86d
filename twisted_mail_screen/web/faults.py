# -*- test-case-name: tests.test_web_faults -*-
"""
C{/api/v1/faults}: the fault plan of a test host over HTTP (docs/api.md,
"Faults"), through the same L{FaultCommands} as the control channel. A
site has no plan: the routes do not exist there and answer 404.
"""

from __future__ import annotations

from typing import Any

from twisted_mail_screen.faults.commands import FaultCommands, UnknownRule
from twisted_mail_screen.web.api import ApiError, ApiRequest, Router
from twisted_mail_screen.web.context import WebContext


def register(router: Router, context: WebContext) -> None:
    if context.faults is None:
        return
    commands = FaultCommands(context.faults)

    def listing(request: ApiRequest) -> dict[str, Any]:
        request.require_admin()
        rules = commands.list()
        return {"total": len(rules), "rules": rules}

    def add(request: ApiRequest) -> dict[str, Any]:
        request.require_admin()
        body = request.json(required=True)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object with a \"kind\"")
        try:
            return commands.add(body)
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    def clear(request: ApiRequest) -> dict[str, Any]:
        request.require_admin()
        return {"removed": commands.clear()}

    def remove(request: ApiRequest, id: str) -> dict[str, Any]:
        request.require_admin()
        if not id.isdigit():
            raise ApiError(404, f"no active fault rule with id {id!r}")
        try:
            commands.remove(int(id))
        except UnknownRule as e:
            raise ApiError(404, str(e)) from e
        return {"removed": 1}

    router.add("GET", "/api/v1/faults", listing)
    router.add("POST", "/api/v1/faults", add)
    router.add("DELETE", "/api/v1/faults", clear)
    router.add("DELETE", "/api/v1/faults/{id}", remove)
