# -*- test-case-name: tests.test_smtp -*-
"""The C{Received:} header every accepted message gets, and its date."""

from __future__ import annotations

from email.utils import formatdate


class HeaderDate:
    """
    The local date and time of C{now} in RFC 5322's form with a numeric
    zone (C{Wed, 02 Dec 2026 07:01:02 +0100}), computed once per second:
    the Received header of every message needs it, and formatting a date
    costs more than the rest of the header. One per factory (reactor thread).
    C{email.utils}, not C{twisted.mail.smtp}'s C{rfc822date} (the same
    form): that module brings C{twisted.cred} into every server.
    """

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._text = formatdate(second, localtime=True)
            self._second = second
        return self._text


def received(helo: str, peer_host: str, hostname: str, with_: str, rcpts: list[str],
             date: str) -> bytes:
    """The header (LF line ends); C{for} only with one recipient, so Bcc stays private."""
    for_ = f"\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
    peer = f" ([{peer_host}])" if peer_host else ""  # a UNIX socket has no address
    return (f"Received: from {helo}{peer}\n\tby {hostname} "
            f"(twisted-mail-screen) with {with_}{for_};\n\t{date}\n").encode()
