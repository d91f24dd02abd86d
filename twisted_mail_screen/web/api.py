# -*- test-case-name: tests.test_web -*-
"""
A small JSON router on C{twisted.web}: routes are a method and a path
pattern (C{/api/v1/message/{id}}) mapped to a handler; every answer and
every error is JSON, and no exception reaches the client as a traceback.

Why not klein: it would add werkzeug and a second routing model for some
thirty routes that need nothing but a pattern match and a guard.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from twisted_mail_screen.runtime.control import CommandError

#: A request body larger than this is refused (413): API bodies are small.
MAX_BODY = 1024 * 1024

JSON_TYPE = b"application/json"


class ApiError(Exception):
    """An answer other than success: C{status} and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Raw:
    """A non-JSON answer (a message's source, a page, an attachment)."""

    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Principal:
    """
    Who is asking: C{user} is the account (C{None} for a token or a test
    host), C{admin} whether they see and steer everything.
    """

    user: str | None
    admin: bool


class ApiRequest:
    """What a handler sees of one request."""

    def __init__(self, request: Request, principal: Principal) -> None:
        self.request = request
        self.principal = principal
        self.method = request.method.decode("ascii", "replace")

    def arg(self, name: str, default: str | None = None) -> str | None:
        """A query-string argument, decoded (the last one when repeated)."""
        values = (self.request.args or {}).get(name.encode())
        if not values:
            return default
        try:
            return values[-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"query argument {name!r} is not UTF-8") from e

    def int_arg(self, name: str, default: int, minimum: int = 0,
                maximum: int | None = None) -> int:
        raw = self.arg(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError as e:
            raise ApiError(400, f"{name} must be an integer") from e
        if value < minimum or (maximum is not None and value > maximum):
            limit = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise ApiError(400, f"{name} must be {limit}")
        return value

    def json(self, required: bool = False) -> Any:
        """The JSON body (C{None} when empty and not C{required})."""
        content = self.request.content
        body = content.read(MAX_BODY + 1) if content is not None else b""
        if len(body) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        if not body.strip():
            if required:
                raise ApiError(400, "a JSON body is required")
            return None
        try:
            return json.loads(body)
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from e

    def require_admin(self) -> None:
        if not self.principal.admin:
            raise ApiError(403, "administrators only")


Handler = Callable[..., Any]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    admin: bool


@functools.lru_cache(maxsize=256)  # the same few dozen paths for every site a process builds
def _compile(path: str) -> re.Pattern[str]:
    regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path))
    return re.compile(f"^{regex}$")


Guard = Callable[[Request], "Deferred[Principal]"]


class Router(Resource):
    """
    Dispatches every path below where it is mounted. C{guard} decides who
    the caller is (and refuses with an L{ApiError}); handlers get an
    L{ApiRequest} and the path's named parts, and return a JSON-ready
    value, a L{Raw}, or a Deferred of either.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self._guard = guard
        self._routes: list[Route] = []

    def add(self, method: str, path: str, handler: Handler, *, admin: bool = False) -> None:
        """C{admin}: only administrators may call it (others get 403)."""
        self._routes.append(Route(method, _compile(path), handler, admin))

    def route(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        for route in self._routes:
            match = route.pattern.match(path)
            if match is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, match.groupdict()
            allowed.append(route.method)
        if allowed:
            raise ApiError(405, f"{method} is not allowed here (allowed: {', '.join(allowed)})")
        raise ApiError(404, f"no such endpoint: {path}")

    def render(self, request: Request) -> Any:
        try:
            path = request.path.decode("utf-8")
        except UnicodeDecodeError:
            path = ""
        method = request.method.decode("ascii", "replace")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = self._guard(request)
        d.addCallback(self._dispatch, request, method, path)
        d.addCallbacks(self._answer, self._failed, callbackArgs=(request, gone),
                       errbackArgs=(request, gone))
        return NOT_DONE_YET

    def _dispatch(self, principal: Principal, request: Request, method: str, path: str) -> Any:
        route, params = self.route(method, path)
        api_request = ApiRequest(request, principal)
        if route.admin:
            api_request.require_admin()
        return maybeDeferred(route.handler, api_request, **params)

    def _answer(self, result: Any, request: Request, gone: list[bool]) -> None:
        # NOT_DONE_YET: the handler answers by itself (a stream, a long poll).
        if result is NOT_DONE_YET or request.finished or gone:
            return
        if isinstance(result, Raw):
            request.setHeader(b"content-type", result.content_type.encode())
            for name, value in result.headers.items():
                request.setHeader(name.encode(), value.encode("latin-1"))
            body = result.body
        else:
            request.setHeader(b"content-type", JSON_TYPE)
            body = json.dumps(result).encode()
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body if request.method != b"HEAD" else b"")
        request.finish()

    def _failed(self, failure: Failure, request: Request, gone: list[bool]) -> None:
        if failure.check(ApiError):
            error: ApiError = failure.value  # type: ignore[assignment]
        elif failure.check(CommandError):
            # The control channel's commands, called by the web: one implementation.
            refusal: CommandError = failure.value  # type: ignore[assignment]
            error = ApiError(404 if refusal.not_found else 400, str(refusal))
        else:
            self.log.failure("web: {method} {uri} failed", failure,
                             method=request.method, uri=request.uri)
            error = ApiError(500, "internal error (see the server log)")
        request.setResponseCode(error.status)
        for name, value in error.headers.items():
            request.setHeader(name.encode(), value.encode("latin-1"))
        self._answer({"Error": error.message}, request, gone)
