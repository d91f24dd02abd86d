"""
Tests for L{twisted_mail_screen.screening.config}: the C{[screening]},
C{[screening.session_auth]} and C{[freeze]} sections.
"""

from __future__ import annotations

from typing import Any

import pytest

from twisted_mail_screen.config.base import ConfigError, Section
from twisted_mail_screen.screening.config import (
    FreezeConfig, RedisConfig, ScreeningConfig, SessionAuthConfig, parse_freeze,
    parse_screening)


def screening(table: dict[str, Any], mode: str = "site") -> ScreeningConfig:
    return parse_screening(Section(table, "screening"), mode)


def test_defaults_site() -> None:
    """An empty section gives the documented defaults and no white list on a site."""
    config = screening({})
    assert config == ScreeningConfig()
    assert config.max_connections == 60 and config.connection_window_minutes == 5
    assert config.max_simultaneous == 20 and not config.block_on_simultaneous
    assert config.max_auth_failures == 10 and config.auth_failure_window_minutes == 15
    assert config.max_failed_rcpts == 10 and config.max_rsets == 20
    assert config.block_minutes == 30 and config.repeat_multiplier == 2.0
    assert config.max_block_minutes == 1440 and config.repeat_memory_hours == 24
    assert config.close_smtp_after_block and config.exempt_authenticated
    assert config.notify_on_block and config.enabled
    assert config.whitelist == () and config.ipv6_prefix == 64
    assert config.session_auth == SessionAuthConfig()


def test_defaults_test_host() -> None:
    """A test host trusts loopback by default."""
    assert screening({}, "test-host").whitelist == ("127.0.0.0/8", "::1")
    assert screening({"whitelist": []}, "test-host").whitelist == ()


def test_values_read() -> None:
    """Every key is read, including the session_auth table."""
    config = screening({
        "enabled": False, "max_connections": 5, "connection_window_minutes": 2,
        "max_simultaneous": 3, "block_on_simultaneous": True, "max_auth_failures": 4,
        "auth_failure_window_minutes": 60, "max_failed_rcpts": 2, "max_rsets": 0,
        "block_minutes": 10, "repeat_multiplier": 3, "max_block_minutes": 100,
        "repeat_memory_hours": 2, "close_smtp_after_block": False,
        "exempt_authenticated": False, "notify_on_block": False,
        "whitelist": ["10.0.0.0/8", "192.168.*.*"], "ipv6_prefix": 56,
        "max_tracked_clients": 5000,
        "session_auth": {"max_failures": 3, "freeze_account": True,
                         "notify_postmaster": True, "protocols": ["imap", "pop3"]},
    })
    assert not config.enabled and config.max_connections == 5
    assert config.repeat_multiplier == 3.0 and config.ipv6_prefix == 56
    assert config.whitelist == ("10.0.0.0/8", "192.168.*.*")
    assert config.session_auth == SessionAuthConfig(3, True, True, ("imap", "pop3"))


@pytest.mark.parametrize("table, key", [
    ({"max_conections": 5}, "screening.max_conections"),
    ({"session_auth": {"max_failure": 3}}, "screening.session_auth.max_failure"),
    ({"whitelist": ["10.0.0.0/8", "10.0.0.300"]}, "screening.whitelist"),
    ({"session_auth": {"protocols": ["smtp", "http"]}}, "screening.session_auth.protocols"),
    ({"block_minutes": 60, "max_block_minutes": 30}, "screening.max_block_minutes"),
    ({"repeat_multiplier": 0.5}, "screening.repeat_multiplier"),
    ({"ipv6_prefix": 8}, "screening.ipv6_prefix"),
    ({"max_connections": -1}, "screening.max_connections"),
    ({"enabled": "yes"}, "screening.enabled"),
    ({"connection_window_minutes": 0}, "screening.connection_window_minutes"),
])
def test_errors_name_the_key(table: dict[str, Any], key: str) -> None:
    """Typos, bad values and bad whitelist entries are refused with the key path."""
    with pytest.raises(ConfigError) as raised:
        screening(table)
    assert raised.value.key == key


def test_freeze_section() -> None:
    """[freeze] minutes defaults to an hour; 0 means until thawed; unknown keys fail."""
    assert parse_freeze(Section({}, "freeze")) == FreezeConfig(60)
    assert parse_freeze(Section({"minutes": 0}, "freeze")).minutes == 0
    with pytest.raises(ConfigError) as raised:
        parse_freeze(Section({"minute": 0}, "freeze"))
    assert raised.value.key == "freeze.minute"


def test_redis_backend_keys(tmp_path) -> None:
    """backend = "redis" gives the Redis settings; the memory backend has none."""
    assert screening({}).redis is None
    assert screening({"redis": "unix:/run/redis.sock"}).redis is None
    password = tmp_path / "redis.pass"
    password.write_text("secret\n")
    config = screening({"backend": "redis", "redis": "unix:/run/redis/redis.sock",
                        "key_prefix": "site1:", "password_file": str(password),
                        "lease_seconds": 30, "redis_timeout_seconds": 0.5,
                        "notify_period_minutes": 2})
    assert config.redis == RedisConfig("unix:/run/redis/redis.sock", "site1:", str(password),
                                       30, 0.5)
    assert config.notify_period_minutes == 2.0
    assert screening({"backend": "redis"}).redis == RedisConfig()
    assert RedisConfig().endpoint == "tcp:127.0.0.1:6379"


@pytest.mark.parametrize("table, key, words", [
    ({"backend": "memcached"}, "screening.backend", "'memory' or 'redis'"),
    ({"backend": "redis", "redis": "localhost:6379"}, "screening.redis", "tcp:HOST:PORT"),
    ({"backend": "redis", "redis": "tcp:localhost:99999"}, "screening.redis", "tcp:HOST:PORT"),
    ({"backend": "redis", "key_prefix": "a b"}, "screening.key_prefix", "without spaces"),
    ({"backend": "redis", "password_file": "/nonexistent/pass"}, "screening.password_file",
     "readable"),
    ({"backend": "redis", "lease_seconds": 1}, "screening.lease_seconds", "at least 2"),
    ({"notify_period_minutes": 0}, "screening.notify_period_minutes", "at least"),
])
def test_redis_errors_name_the_key(table: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        screening(table)
    assert key in str(e.value) and words in str(e.value)
