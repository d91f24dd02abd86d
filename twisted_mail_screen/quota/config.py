# -*- test-case-name: tests.test_quota -*-
"""
The C{[quota]} section: the limits every account has unless the
administrator sets its own (C{mailscreen quota set}). 0 means unlimited.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted_mail_screen.config.base import Section

#: The largest limits accepted: far above any disk, small enough for any client's integers.
MAX_STORAGE_MB = 2 ** 32
MAX_MESSAGES = 2 ** 31


@dataclass(frozen=True)
class Limits:
    """
    An account's limits: C{storage_kib} in KiB (RFC 9208's STORAGE unit),
    C{messages} in messages; 0 is no limit.
    """

    storage_kib: int = 0
    messages: int = 0

    @property
    def limited(self) -> bool:
        return bool(self.storage_kib or self.messages)


@dataclass(frozen=True)
class QuotaConfig:
    """The limits of an account without limits of its own: C{storage_mb} MiB, C{messages}."""

    storage_mb: int = 0
    messages: int = 0

    @property
    def default(self) -> Limits:
        return Limits(storage_kib=self.storage_mb * 1024, messages=self.messages)


def parse_quota(sec: Section) -> QuotaConfig:
    storage_mb = sec.integer("storage_mb", 0, 0, MAX_STORAGE_MB)
    messages = sec.integer("messages", 0, 0, MAX_MESSAGES)
    sec.finish()
    return QuotaConfig(storage_mb=storage_mb, messages=messages)
