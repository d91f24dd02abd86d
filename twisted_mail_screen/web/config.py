# -*- test-case-name: tests.test_web -*-
"""
The C{[web]} section: who may use the web port and from which pages.

Where it listens is C{listen.web}, beside the other listeners.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted_mail_screen.config.base import ConfigError, Section


@dataclass(frozen=True)
class WebConfig:
    """
    @ivar admins: accounts that see and steer everything in site mode
        (other accounts see their own mailbox only).
    @ivar token_file: a file of bearer tokens, one a line, each granting
        administrator rights (for scrapers and scripts).
    @ivar allowed_origins: web origins, besides the port's own, whose pages
        may send changing requests and open the event stream.
    @ivar max_page: the largest C{limit} a listing accepts.
    """

    admins: tuple[str, ...] = ()
    token_file: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_page: int = 1000


def _origin(key: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ConfigError(key, value, "must be an origin such as https://mail.example.org")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def parse_web(sec: Section) -> WebConfig:
    admins = tuple(a.lower() for a in sec.string_list("admins", ()))
    token_file = sec.readable_file("token_file")
    origins = tuple(_origin(sec.key("allowed_origins"), o)
                    for o in sec.string_list("allowed_origins", ()))
    max_page = sec.integer("max_page", WebConfig.max_page, 1, 100_000)
    sec.finish()
    return WebConfig(admins=admins, token_file=token_file, allowed_origins=origins,
                     max_page=max_page)
