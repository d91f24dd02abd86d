# -*- test-case-name: tests.test_faults -*-
"""
The authenticator of a test host with a fault plan: C{fail_auth(user)}
refuses a login in every protocol at the one place they all ask.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.faults.plan import FaultPlan
from twisted_mail_screen.runtime.workers import Blocking
from twisted_mail_screen.store.accounts import AccountStore
from twisted_mail_screen.store.auth import Authenticator


class FaultyAuthenticator(Authenticator):
    """An L{Authenticator} that first asks the plan whether this login fails."""

    def __init__(self, plan: FaultPlan, config: Config, accounts: AccountStore,
                 blocking: Blocking) -> None:
        super().__init__(config, accounts, blocking)
        self.plan = plan

    def authenticate(self, username: str, password: str) -> "Deferred[str | None]":
        # The answer of a wrong password: the session reports it to
        # screening and replies exactly as it would to a real failure.
        if self.plan.auth_fails(username):
            return succeed(None)
        return super().authenticate(username, password)
