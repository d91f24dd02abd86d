# -*- test-case-name: tests.test_web -*-
"""(being built: see docs/web.md)"""

from __future__ import annotations

from twisted_mail_screen.web.context import WebContext
from twisted_mail_screen.web.api import Router


def register(router: Router, context: WebContext) -> None:
    pass
