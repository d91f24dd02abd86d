# -*- test-case-name: tests.test_open_relay -*-
"""
Where a recipient address goes: which local mailboxes, or the outside
world, or nowhere. Pure policy; knows nothing of SMTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted_mail_screen.store.accounts import AccountStore
from twisted_mail_screen.store.addresses import AddressError, normalise_address
from twisted_mail_screen.config.settings import Config

MAX_ALIAS_DEPTH = 8
FORWARDING_DISABLED = "alias forwards to another domain, and relaying is not enabled"


@dataclass(frozen=True)
class Route:
    """
    The result of resolving one recipient.

    @ivar mailboxes: local mailbox addresses to deliver into.
    @ivar remote: addresses outside the local domains (for the relay).
    @ivar refusal: C{None}, or one of C{"unknown"}, C{"relay"},
        C{"syntax"}, with the text in C{reason}.
    """

    mailboxes: tuple[str, ...] = ()
    remote: tuple[str, ...] = ()
    refusal: str | None = None
    reason: str = ""
    address: str = field(default="")


class Router:
    """Resolves recipients against the config's domains, accounts and aliases."""

    def __init__(self, config: Config, accounts: AccountStore) -> None:
        self._config = config
        self._accounts = accounts

    def canonical(self, address: str) -> str:
        """
        Normalise, mapping a bare C{postmaster} (RFC 5321 4.5.1) and
        C{postmaster@<local domain>} to the configured postmaster.
        """
        if address.lower() == "postmaster":
            return self._config.postmaster
        address = normalise_address(address)
        local, _, domain = address.rpartition("@")
        if local == "postmaster" and self.is_local(domain) and not self._known(address):
            return self._config.postmaster
        return address

    def is_local(self, domain: str) -> bool:
        # A test host that relays (to its capture smarthost) keeps only its
        # listed domains; one that does not keeps every address.
        if self._config.test_host and not self._config.relay.enabled:
            return True
        return self._config.is_local_domain(domain)

    def _known(self, address: str) -> bool:
        return self._accounts.exists(address) or self._accounts.alias_targets(address) is not None

    def resolve(self, address: str, may_relay: bool, may_forward: bool = False) -> Route:
        """
        Where C{address} goes. C{may_relay}: the client may send to remote
        addresses. C{may_forward}: a local alias may expand to remote
        addresses (the relay exists); that is forwarding, not relaying, so
        it does not depend on who the client is.
        """
        try:
            address = self.canonical(address)
        except AddressError as e:
            return Route(refusal="syntax", reason=str(e), address=address)
        mailboxes: list[str] = []
        remote: list[str] = []
        if not self._expand(address, mailboxes, remote, 0, top=True):
            return Route(refusal="unknown", reason="no such user here", address=address)
        # A relaying test host relays for any client: only to its smarthost.
        may_relay = may_relay or (self._config.test_host and self._config.relay.enabled)
        if remote and not may_relay:
            if remote == [address]:
                return Route(refusal="relay", reason="relaying denied", address=address)
            if not may_forward:
                return Route(refusal="relay", reason=FORWARDING_DISABLED, address=address)
        return Route(tuple(dict.fromkeys(mailboxes)), tuple(dict.fromkeys(remote)),
                     address=address)

    def _expand(self, address: str, mailboxes: list[str], remote: list[str],
                depth: int, top: bool = False) -> bool:
        local, _, domain = address.rpartition("@")
        if not self.is_local(domain):
            remote.append(address)
            return True
        if depth > MAX_ALIAS_DEPTH:
            return False
        if local == "postmaster" and address == self._config.postmaster:
            targets = self._accounts.alias_targets(address)
            if targets is None:
                mailboxes.append(address)
                return True
            return all(self._expand(t, mailboxes, remote, depth + 1) for t in targets)
        targets = self._accounts.alias_targets(address)
        if targets is not None:
            return all(self._expand(t, mailboxes, remote, depth + 1) for t in targets)
        if self._config.test_host or self._accounts.exists(address):
            mailboxes.append(address)
            return True
        catch_all = self._accounts.alias_targets("@" + domain)
        if catch_all is not None:
            return all(self._expand(t, mailboxes, remote, depth + 1) for t in catch_all)
        return False

    def owns(self, user: str, address: str) -> bool:
        """
        Whether the authenticated C{user} may send as C{address}: its own
        address, or an alias that has C{user} among its targets.
        """
        try:
            address = normalise_address(address)
        except AddressError:
            return False
        if address == user.lower():
            return True
        targets = self._accounts.alias_targets(address)
        return targets is not None and user.lower() in targets
