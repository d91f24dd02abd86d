# -*- test-case-name: tests.test_quota -*-
"""
C{GET /api/v1/quota}: accounts' limits and usage (docs/quota.md). An
administrator sees every account (C{?account=} for one); anyone else
their own. Answered from the running server's L{QuotaService}: usage
counted once per account in the worker pool, then kept up to date.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from twisted_mail_screen.quota.commands import QuotaCommands
from twisted_mail_screen.web.api import ApiError, ApiRequest, Router
from twisted_mail_screen.web.context import WebContext


def register(router: Router, context: WebContext) -> None:
    quota = context.quota
    if quota is None:
        return
    commands = QuotaCommands(quota, context.accounts.users, context.store.root, context.blocking.run)

    def listing(request: ApiRequest) -> Deferred:
        principal = request.principal
        wanted = request.arg("account")
        if not principal.admin:
            if principal.user is None or (wanted and wanted.lower() != principal.user.lower()):
                raise ApiError(403, "an account sees its own quota only")
            wanted = principal.user
        if wanted:  # a bad address is a CommandError: the router answers 400
            return commands.show(wanted).addCallback(lambda report: {"accounts": [report]})
        return commands.list().addCallback(lambda reports: {"accounts": reports})

    router.add("GET", "/api/v1/quota", listing)

