# -*- test-case-name: tests.test_web -*-
"""
Who may use the web port, and from which pages.

- A test host answers everyone who can reach it (loopback by default) as
  an administrator, as Mailpit does.
- A site answers only a bearer token from C{web.token_file} (an
  administrator) or HTTP Basic credentials of an account (an administrator
  when listed in C{web.admins}); Basic is refused where a password may not
  be sent in the clear (C{plaintext_auth}, as for the mail protocols).
- Everywhere, a request that carries a foreign C{Origin} is refused: a page
  from another site can neither change anything nor open the event stream
  (Mailpit's CVE-2026-22689 was such a cross-site stream). A changing
  request with a body must say it is JSON, which an HTML form cannot.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.store.auth import Authenticator
from twisted_mail_screen.web.api import JSON_TYPE, ApiError, Principal

SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")
CHALLENGE = {"www-authenticate": 'Basic realm="mailscreen", charset="UTF-8"'}

#: How long a checked password is remembered, so that a page polling the
#: API does not cost an scrypt hash (~50 ms of CPU) per request.
REMEMBER_SECONDS = 60.0
REMEMBER_MOST = 1000


def header(request: Request, name: str) -> str | None:
    """A request header as text (undecodable bytes kept as latin-1, so they never match)."""
    value = request.getHeader(name.encode())
    return value.decode("latin-1") if value is not None else None


def read_tokens(path: str | None) -> tuple[bytes, ...]:
    """The bearer tokens of C{web.token_file}: one a line, blank lines and C{#} comments skipped."""
    if path is None:
        return ()
    with open(path, "rb") as f:
        lines = (line.strip() for line in f)
        return tuple(line for line in lines if line and not line.startswith(b"#"))


class Guard:
    """Decides the L{Principal} of each request, or refuses it with an L{ApiError}."""

    def __init__(self, config: Config, authenticator: Authenticator, clock: IReactorTime,
                 tokens: tuple[bytes, ...] = ()) -> None:
        self._config = config
        self._authenticator = authenticator
        self._clock = clock
        self._tokens = tokens
        self._remembered: dict[tuple[str, bytes], tuple[float, str]] = {}

    def __call__(self, request: Request) -> "Deferred[Principal]":
        try:
            self.check_origin(request)
            if self._config.test_host:
                return succeed(Principal(None, admin=True))
            return self._authenticate(request)
        except ApiError as e:
            d: Deferred[Principal] = Deferred()
            d.errback(e)
            return d

    def check_origin(self, request: Request) -> None:
        origin = header(request, "origin")
        if origin is not None and origin not in self.own_origins(request):
            raise ApiError(403, f"requests from {origin!r} are not allowed")
        if request.method in SAFE_METHODS:
            return
        content = request.content
        if content is not None and content.seek(0, 2) > 0:
            content.seek(0)
            kind = (header(request, "content-type") or "").split(";")[0].strip().lower()
            if kind.encode() != JSON_TYPE:
                raise ApiError(415, "a request body must be application/json")

    def own_origins(self, request: Request) -> tuple[str, ...]:
        host = header(request, "host") or ""
        scheme = "https" if request.isSecure() else "http"
        return (f"{scheme}://{host.lower()}",) + self._config.web.allowed_origins

    def _authenticate(self, request: Request) -> "Deferred[Principal]":
        scheme, _, credentials = (header(request, "authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and credentials:
            token = credentials.strip().encode()
            if any(hmac.compare_digest(token, t) for t in self._tokens):
                return succeed(Principal(None, admin=True))
            raise ApiError(401, "unknown token", CHALLENGE)
        if scheme.lower() != "basic":
            raise ApiError(401, "authentication required", CHALLENGE)
        host = getattr(request.getClientAddress(), "host", "")
        if not self._authenticator.plaintext_allowed(host, request.isSecure()):
            raise ApiError(403, "passwords are accepted only over TLS here")
        try:
            user, sep, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError) as e:
            raise ApiError(401, "malformed Basic credentials", CHALLENGE) from e
        if not sep:
            raise ApiError(401, "malformed Basic credentials", CHALLENGE)
        key = (user.lower(), hashlib.sha256(password.encode()).digest())
        now = self._clock.seconds()
        remembered = self._remembered.get(key)
        if remembered is not None and remembered[0] > now:
            return succeed(self._principal(remembered[1]))
        d = self._authenticator.authenticate(user, password)
        d.addCallback(self._checked, key)
        return d

    def _checked(self, address: str | None, key: tuple[str, bytes]) -> Principal:
        if address is None:
            raise ApiError(401, "wrong user name or password", CHALLENGE)
        if len(self._remembered) >= REMEMBER_MOST:
            self._remembered.clear()
        self._remembered[key] = (self._clock.seconds() + REMEMBER_SECONDS, address)
        return self._principal(address)

    def _principal(self, address: str) -> Principal:
        return Principal(address, admin=address in self._config.web.admins)

