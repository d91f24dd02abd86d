# -*- test-case-name: tests.test_inbound_auth -*-
"""
DMARC (RFC 7489) evaluation of a message's From domain: its policy record
(at the domain, else at its organizational domain, found with the Public
Suffix List), and whether SPF or DKIM passed for an aligned domain.
"""

from __future__ import annotations

from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from twisted_mail_screen.mailauth.dnsquery import Lookup

POLICIES = ("none", "quarantine", "reject")
_psl = PublicSuffixList()


def organizational(domain: str) -> str:
    """The registered domain (RFC 7489 3.2): example.co.uk for mail.example.co.uk."""
    return _psl.privatesuffix(domain.lower()) or domain.lower()


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_domain
    return organizational(domain) == organizational(from_domain)


@dataclass(frozen=True)
class Record:
    policy: str
    adkim: str = "r"
    aspf: str = "r"


class RecordError(ValueError):
    pass


def parse_record(text: bytes) -> tuple[Record, str]:
    """The record's policy and alignment modes, and its C{sp=} (subdomain policy, or "")."""
    tags: dict[str, str] = {}
    for part in text.decode("ascii", "replace").split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = value.strip()
    if tags.get("v") != "DMARC1":
        raise RecordError("not v=DMARC1")
    policy = tags.get("p", "").lower()
    if policy not in POLICIES:
        raise RecordError(f"p={policy!r}")
    record = Record(policy, tags.get("adkim", "r").lower()[:1] or "r",
                    tags.get("aspf", "r").lower()[:1] or "r")
    return record, tags.get("sp", "").lower()


def find_record(lookup: Lookup, from_domain: str) -> Record | None:
    """
    The policy for C{from_domain}: its own record, or its organizational
    domain's (with C{sp=} when given). C{None}: no DMARC record.

    @raise RecordError: a record that is there but unusable (permerror).
    @raise DNSTemporary: a lookup failed (temperror).
    """
    org = organizational(from_domain)
    for name in dict.fromkeys((from_domain, org)):
        records = [t for t in lookup.txt(f"_dmarc.{name}") if t.lower().startswith(b"v=dmarc1")]
        if not records:
            continue
        if len(records) > 1:
            raise RecordError(f"{len(records)} DMARC records at _dmarc.{name}")
        record, subdomain_policy = parse_record(records[0])
        if name != from_domain and subdomain_policy in POLICIES:
            record = Record(subdomain_policy, record.adkim, record.aspf)
        return record
    return None
