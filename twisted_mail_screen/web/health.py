# -*- test-case-name: tests.test_web -*-
"""C{/livez} and C{/readyz}, as Mailpit and Kubernetes spell them."""

from __future__ import annotations

from twisted_mail_screen.web.context import WebContext
from twisted_mail_screen.web.api import ApiError, ApiRequest, Raw, Router


def register(router: Router, context: WebContext) -> None:
    def livez(request: ApiRequest) -> Raw:
        return Raw(b"ok\n", "text/plain; charset=utf-8")

    def readyz(request: ApiRequest) -> Raw:
        if not context.ready():
            raise ApiError(503, "not ready: a listener is not bound yet")
        return Raw(b"ok\n", "text/plain; charset=utf-8")

    router.add("GET", "/livez", livez)
    router.add("GET", "/readyz", readyz)
