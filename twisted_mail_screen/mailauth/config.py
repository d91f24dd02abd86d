# -*- test-case-name: tests.test_dkim -*-
"""
The C{[dkim]} and C{[mail_auth]} sections (docs/configuration.md,
docs/mailauth.md): the keys that sign mail submitted by authenticated
users, per sending domain; the checks of inbound mail.

    [dkim]
    keys = [
      { domain = "example.org", selector = "s2026", key = "/var/lib/mailscreen/dkim/example.org.s2026.key" },
      { domain = "example.org", selector = "e2026", key = "...", algorithm = "ed25519" },
    ]

Each key file is read once, here, while the server still runs as root: it
may stay readable by root only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from twisted_mail_screen.config.base import ConfigError, Section
from twisted_mail_screen.mailauth.keys import ALGORITHMS, SELECTOR, DKIMKeyError, load
from twisted_mail_screen.store.addresses import valid_domain


@dataclass(frozen=True)
class DKIMKey:
    """
    One signing key. C{private} is the key as dkimpy takes it; C{public}
    the TXT record's C{p=} value.
    """

    domain: str
    selector: str
    key: str
    algorithm: str = "rsa"
    private: bytes = field(default=b"", repr=False)
    public: str = ""


@dataclass(frozen=True)
class DKIMConfig:
    keys: tuple[DKIMKey, ...] = ()

    def for_domain(self, domain: str) -> tuple[DKIMKey, ...]:
        """The keys that sign mail from C{domain}: its own, or its parent domain's (relaxed alignment)."""
        domain = domain.lower()
        return tuple(k for k in self.keys if domain == k.domain or domain.endswith("." + k.domain))


def parse_dkim(s: Section, domains: tuple[str, ...], test_host: bool) -> DKIMConfig:
    entries = s.get("keys", list, [])
    keys: list[DKIMKey] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(entries):
        e = Section(entry, s.key(f"keys[{i}]"))
        domain = e.get("domain", str, "").lower()
        if not domain or not valid_domain(domain):
            raise ConfigError(e.key("domain"), domain, "must be a domain name")
        if not test_host and domain not in domains:
            raise ConfigError(e.key("domain"), domain,
                              "must be one of the local domains (" + ", ".join(domains) + ")")
        selector = e.get("selector", str, "")
        if not SELECTOR.match(selector):
            raise ConfigError(e.key("selector"), selector,
                              "must be a DNS label or dotted labels (letters, digits, '-')")
        if (domain, selector.lower()) in seen:
            raise ConfigError(e.key("selector"), selector, f"used twice for {domain}")
        seen.add((domain, selector.lower()))
        algorithm = e.choice("algorithm", "rsa", ALGORITHMS)
        path = e.readable_file("key")
        if path is None:
            raise ConfigError(e.key("key"), None, "is required: the private key file "
                              "('mailscreen dkim keygen' writes one)")
        try:
            with open(path, "rb") as f:
                private, public = load(f.read(), algorithm)
        except (OSError, DKIMKeyError) as err:
            raise ConfigError(e.key("key"), path, str(err)) from err
        e.finish()
        keys.append(DKIMKey(domain, selector, path, algorithm, private, public))
    s.finish()
    return DKIMConfig(tuple(keys))


@dataclass(frozen=True)
class MailAuthConfig:
    """
    C{[mail_auth]}: SPF, DKIM and DMARC checks of mail from unauthenticated
    clients. C{nameservers} empty: the system's resolvers (/etc/resolv.conf).
    """

    enabled: bool = False
    dmarc_reject: bool = False
    nameservers: tuple[str, ...] = ()
    dns_timeout: float = 10.0
    max_failures: int = 0
    failure_window_minutes: int = 60

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        return tuple(_server(n) for n in self.nameservers)


def _server(text: str) -> tuple[str, int]:
    """"192.0.2.53", "192.0.2.53:5353", "2001:db8::53" or "[2001:db8::53]:5353" -> (address, port)."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = int(number)
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port {port}")
    return host, port


def parse_mail_auth(s: Section) -> MailAuthConfig:
    nameservers = s.string_list("nameservers", ())
    for n in nameservers:
        try:
            _server(n)
        except ValueError as e:
            raise ConfigError(s.key("nameservers"), n,
                              f"must be an IP address, optionally with :port ({e})") from e
    config = MailAuthConfig(
        enabled=s.get("enabled", bool, False),
        dmarc_reject=s.get("dmarc_reject", bool, False),
        nameservers=nameservers,
        dns_timeout=s.number("dns_timeout", MailAuthConfig.dns_timeout, 0.5),
        max_failures=s.integer("max_failures", 0, 0),
        failure_window_minutes=s.integer("failure_window_minutes",
                                         MailAuthConfig.failure_window_minutes, 1))
    s.finish()
    return config
