"""
Tests for L{twisted_mail_screen.screening.netmatch}: screening keys and white lists.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.screening.netmatch import (
    NetMatcher, NetworkIndex, client_key, format_network, parse_host, parse_network)


def test_ipv4_key_is_the_address() -> None:
    """An IPv4 address is its own key."""
    assert client_key("192.0.2.7", 64) == "192.0.2.7"


def test_ipv4_mapped_key_is_ipv4() -> None:
    """An IPv4-mapped IPv6 peer is keyed as the IPv4 address it carries."""
    assert client_key("::ffff:192.0.2.7", 64) == "192.0.2.7"
    assert client_key("::FFFF:c000:0207", 64) == "192.0.2.7"


def test_ipv6_key_is_the_network() -> None:
    """An IPv6 address is keyed by its network at the configured prefix."""
    assert client_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64) == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2::1", 48) == "2001:db8:1::/48"
    assert client_key("2001:db8::1", 128) == "2001:db8::1"


def test_ipv6_scope_and_brackets() -> None:
    """A zone index or brackets do not change the key."""
    assert client_key("fe80::1%eth0", 64) == "fe80::/64"
    assert client_key("[2001:db8::5]", 64) == "2001:db8::/64"


def test_non_ip_key_unchanged() -> None:
    """A UNIX socket peer (empty host) is not an IP and keys as itself."""
    assert client_key("", 64) == ""
    assert parse_host("") is None
    assert parse_host("mail.example.com") is None
    assert parse_host("010.1.2.3") is None


def test_same_slash64_same_key() -> None:
    """Any two addresses in one /64 share a key; the key holds them both."""
    rng = random.Random(64)
    for _ in range(2000):
        address, low = rng.getrandbits(128), rng.getrandbits(64)
        if rng.random() < 0.2:
            address &= (1 << 64) - 1  # exercise the all-zero upper half too
        a = ipaddress.IPv6Address(address)
        if a.ipv4_mapped is not None:
            continue
        b = ipaddress.IPv6Address(((address >> 64) << 64) | low)
        key = client_key(str(a), 64)
        assert key == client_key(str(b), 64)
        assert a in ipaddress.ip_network(key)
        assert key == str(ipaddress.ip_network((a, 64), strict=False))


def test_ipv4_key_roundtrip() -> None:
    """Every IPv4 address keys as its canonical text, mapped or not."""
    rng = random.Random(4)
    for value in [0, 2**32 - 1] + [rng.getrandbits(32) for _ in range(2000)]:
        text = str(ipaddress.IPv4Address(value))
        assert client_key(text, 64) == text
        assert client_key(f"::ffff:{text}", 64) == text


@pytest.mark.parametrize("entry, inside, outside", [
    ("192.0.2.7", "192.0.2.7", "192.0.2.8"),
    ("192.0.2.0/24", "192.0.2.200", "192.0.3.1"),
    ("2001:db8::/32", "2001:db8:ffff::1", "2001:db9::1"),
    ("::1", "::1", "::2"),
    ("[2001:db8::1]", "2001:db8::1", "2001:db8::2"),
    ("192.168.*.*", "192.168.44.9", "192.169.0.1"),
    ("192.168.*", "192.168.1.1", "10.168.1.1"),
    ("10.*", "10.200.3.4", "11.0.0.1"),
    ("10.0.?.1", "10.0.7.1", "10.0.17.1"),
    ("10.0.0.#", "10.0.0.5", "10.0.0.55"),
    ("192.168.0.1??", "192.168.0.123", "192.168.0.12"),
    ("10.0.0.1*", "10.0.0.199", "10.0.0.2"),
    ("10.0.0.5-10.0.0.20", "10.0.0.17", "10.0.0.21"),
])
def test_whitelist_entries(entry: str, inside: str, outside: str) -> None:
    """Addresses, CIDR, wildcards and ranges match what they should only."""
    matcher = NetMatcher([entry])
    assert matcher.matches(inside)
    assert not matcher.matches(outside)


def test_whitelist_matches_mapped() -> None:
    """An IPv4 entry matches the same client connecting over IPv6-mapped."""
    matcher = NetMatcher(["192.0.2.0/24", "10.0.*.*"])
    assert matcher.matches("::ffff:192.0.2.9")
    assert matcher.matches("::ffff:10.0.3.3")
    assert not matcher.matches("")


@pytest.mark.parametrize("entry", [
    "192.0.2.300", "hello", "192.168.*.*.*", "10.0.x.*", "2001:db8::/200",
    "10.0.0.9-10.0.0.1", "", "1.2.3.999*"])
def test_bad_entries_name_the_key(entry: str) -> None:
    """An unparseable entry raises ConfigError naming the key."""
    with pytest.raises(ConfigError) as raised:
        NetMatcher(["127.0.0.1", entry], "screening.whitelist")
    assert raised.value.key == "screening.whitelist"


def test_parse_network_canonical() -> None:
    """Networks are canonical: host bits cleared, lone addresses bare, mapped as IPv4."""
    assert format_network(parse_network("10.1.2.3/8")) == "10.0.0.0/8"
    assert format_network(parse_network("192.0.2.1/32")) == "192.0.2.1"
    assert format_network(parse_network("::ffff:192.0.2.1")) == "192.0.2.1"
    assert format_network(parse_network("2001:db8::1/64")) == "2001:db8::/64"
    with pytest.raises(ConfigError):
        parse_network("nonsense", "blocklist")


def test_network_index_most_specific() -> None:
    """The index answers with the most specific network holding an address."""
    index: NetworkIndex[str] = NetworkIndex()
    index.add(parse_network("10.0.0.0/8"), "wide")
    index.add(parse_network("10.1.0.0/16"), "narrow")
    assert index.lookup(*parse_host("10.1.2.3")) == "narrow"  # type: ignore[misc]
    assert index.lookup(*parse_host("10.2.2.3")) == "wide"  # type: ignore[misc]
    assert index.lookup(*parse_host("11.0.0.1")) is None  # type: ignore[misc]
    assert index.remove(parse_network("10.1.0.0/16"))
    assert not index.remove(parse_network("10.1.0.0/16"))
    assert index.lookup(*parse_host("10.1.2.3")) == "wide"  # type: ignore[misc]
    assert len(index) == 1
