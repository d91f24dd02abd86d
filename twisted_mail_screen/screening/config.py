# -*- test-case-name: tests.test_screening_config -*-
"""
The C{[screening]}, C{[screening.session_auth]} and C{[freeze]} sections.

The defaults are chosen for a real small site, where the clients that
matter are legitimate: an IMAP client that opens five connections at once,
a phone that reconnects every few minutes, a whole office behind one NAT
address. Each default is explained in C{docs/screening.md}; in short, the
limits sit well above what any of those does in normal use, and well below
what a password-guessing or address-harvesting bot needs to get anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from twisted_mail_screen.config.base import ConfigError, Section
from twisted_mail_screen.screening.netmatch import shared_matcher

PROTOCOLS = ("smtp", "submission", "pop3", "imap")
BACKENDS = ("memory", "redis")
TEST_HOST_WHITELIST = ("127.0.0.0/8", "::1")


@dataclass(frozen=True)
class SessionAuthConfig:
    """
    Limits on authentication failures within one connection, which catch
    a client brute-forcing inside one long session.

    @ivar max_failures: failures in one session that close it (0 = off).
    @ivar freeze_account: also freeze the account tried last.
    @ivar notify_postmaster: tell the postmaster when the limit is hit.
    @ivar protocols: the protocols this applies to.
    """

    max_failures: int = 5
    freeze_account: bool = False
    notify_postmaster: bool = False
    protocols: tuple[str, ...] = PROTOCOLS


@dataclass(frozen=True)
class RedisConfig:
    """
    Where several nodes share screening (C{backend = "redis"}).

    @ivar endpoint: a client endpoint string, C{tcp:HOST:PORT} or C{unix:PATH}.
    @ivar key_prefix: put before every key and the channel, so several
        clusters can share one Redis.
    @ivar password_file: a file holding the password (first line), or C{None}.
    @ivar lease_seconds: how long a simultaneous-connection lease outlives
        the node that holds it (nodes renew theirs every third of it).
    @ivar timeout_seconds: a command unanswered this long counts as Redis down.
    """

    endpoint: str = "tcp:127.0.0.1:6379"
    key_prefix: str = "mailscreen:"
    password_file: str | None = None
    lease_seconds: int = 60
    timeout_seconds: float = 1.0


@dataclass(frozen=True)
class ScreeningConfig:
    """
    Dynamic screening settings; a limit of 0 switches that rule off.
    """

    enabled: bool = True
    max_connections: int = 60
    connection_window_minutes: int = 5
    max_simultaneous: int = 20
    block_on_simultaneous: bool = False
    max_auth_failures: int = 10
    auth_failure_window_minutes: int = 15
    max_failed_rcpts: int = 10
    max_rsets: int = 20
    block_minutes: int = 30
    repeat_multiplier: float = 2.0
    max_block_minutes: int = 1440
    repeat_memory_hours: int = 24
    close_smtp_after_block: bool = True
    exempt_authenticated: bool = True
    notify_on_block: bool = True
    notify_period_minutes: float = 10.0
    whitelist: tuple[str, ...] = ()
    ipv6_prefix: int = 64
    max_tracked_clients: int = 100_000
    session_auth: SessionAuthConfig = field(default_factory=SessionAuthConfig)
    redis: RedisConfig | None = None


@dataclass(frozen=True)
class FreezeConfig:
    """
    @ivar minutes: how long an automatic freeze lasts (0 = until thawed).
    """

    minutes: int = 60


def default_whitelist(mode: str) -> tuple[str, ...]:
    """A test host trusts loopback; a site trusts nobody by default."""
    return TEST_HOST_WHITELIST if mode == "test-host" else ()


def parse_session_auth(section: Section) -> SessionAuthConfig:
    d = SessionAuthConfig()
    protocols = section.string_list("protocols", d.protocols)
    for name in protocols:
        if name not in PROTOCOLS:
            raise ConfigError(section.key("protocols"), list(protocols),
                              f"unknown protocol {name!r}; use "
                              + ", ".join(PROTOCOLS))
    result = SessionAuthConfig(
        max_failures=section.integer("max_failures", d.max_failures, 0),
        freeze_account=section.get("freeze_account", bool, d.freeze_account),
        notify_postmaster=section.get("notify_postmaster", bool, d.notify_postmaster),
        protocols=tuple(dict.fromkeys(protocols)),
    )
    section.finish()
    return result


def parse_screening(section: Section, mode: str) -> ScreeningConfig:
    """
    Read C{[screening]} (and its C{session_auth} table); unknown keys are
    refused, whitelist entries are parsed now so a typo stops the start.
    """
    d = ScreeningConfig()
    whitelist = section.string_list("whitelist", default_whitelist(mode))
    shared_matcher(tuple(whitelist), section.key("whitelist"))
    block_minutes = section.integer("block_minutes", d.block_minutes, 1)
    max_block = section.integer("max_block_minutes", max(d.max_block_minutes, block_minutes), 1)
    if max_block < block_minutes:
        raise ConfigError(section.key("max_block_minutes"), max_block,
                          f"must be at least block_minutes ({block_minutes})")
    multiplier = section.number("repeat_multiplier", d.repeat_multiplier, 1.0)
    result = ScreeningConfig(
        enabled=section.get("enabled", bool, d.enabled),
        max_connections=section.integer("max_connections", d.max_connections, 0),
        connection_window_minutes=section.integer(
            "connection_window_minutes", d.connection_window_minutes, 1, 24 * 60),
        max_simultaneous=section.integer("max_simultaneous", d.max_simultaneous, 0),
        block_on_simultaneous=section.get("block_on_simultaneous", bool,
                                          d.block_on_simultaneous),
        max_auth_failures=section.integer("max_auth_failures", d.max_auth_failures, 0),
        auth_failure_window_minutes=section.integer(
            "auth_failure_window_minutes", d.auth_failure_window_minutes, 1, 7 * 24 * 60),
        max_failed_rcpts=section.integer("max_failed_rcpts", d.max_failed_rcpts, 0),
        max_rsets=section.integer("max_rsets", d.max_rsets, 0),
        block_minutes=block_minutes,
        repeat_multiplier=multiplier,
        max_block_minutes=max_block,
        repeat_memory_hours=section.integer("repeat_memory_hours", d.repeat_memory_hours, 0),
        close_smtp_after_block=section.get("close_smtp_after_block", bool,
                                           d.close_smtp_after_block),
        exempt_authenticated=section.get("exempt_authenticated", bool,
                                         d.exempt_authenticated),
        notify_on_block=section.get("notify_on_block", bool, d.notify_on_block),
        notify_period_minutes=section.number("notify_period_minutes",
                                             d.notify_period_minutes, 0.05),
        whitelist=whitelist,
        ipv6_prefix=section.integer("ipv6_prefix", d.ipv6_prefix, 16, 128),
        max_tracked_clients=section.integer("max_tracked_clients",
                                            d.max_tracked_clients, 100),
        session_auth=parse_session_auth(section.section("session_auth")),
        redis=parse_redis(section),
    )
    section.finish()
    return result


def _redis_endpoint(section: Section) -> str:
    endpoint = section.get("redis", str, RedisConfig.endpoint)
    kind, _, rest = endpoint.partition(":")
    if kind == "unix" and rest:
        return endpoint
    host, _, port = rest.rpartition(":")
    if kind == "tcp" and host and port.isdigit() and 0 < int(port) < 65536:
        return endpoint
    raise ConfigError(section.key("redis"), endpoint,
                      "must be tcp:HOST:PORT or unix:PATH")


def parse_redis(section: Section) -> RedisConfig | None:
    """
    The Redis keys of C{[screening]}; C{None} with C{backend = "memory"}
    (their values are still checked, so a typo is found before a switch).
    """
    d = RedisConfig()
    backend = section.get("backend", str, "memory")
    if backend not in BACKENDS:
        raise ConfigError(section.key("backend"), backend,
                          "must be " + " or ".join(repr(b) for b in BACKENDS))
    endpoint = _redis_endpoint(section)
    prefix = section.get("key_prefix", str, d.key_prefix)
    if not prefix or any(c.isspace() for c in prefix):
        raise ConfigError(section.key("key_prefix"), prefix,
                          "must be non-empty, without spaces")
    password_file = section.get("password_file", str, "") or None
    if password_file is not None and not os.access(password_file, os.R_OK):
        raise ConfigError(section.key("password_file"), password_file,
                          "is not a readable file")
    config = RedisConfig(
        endpoint=endpoint, key_prefix=prefix, password_file=password_file,
        lease_seconds=section.integer("lease_seconds", d.lease_seconds, 2, 3600),
        timeout_seconds=section.number("redis_timeout_seconds", d.timeout_seconds, 0.05))
    return config if backend == "redis" else None


def parse_freeze(section: Section) -> FreezeConfig:
    """Read C{[freeze]}."""
    result = FreezeConfig(minutes=section.integer("minutes", FreezeConfig.minutes, 0))
    section.finish()
    return result
