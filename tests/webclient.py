"""
A plain HTTP client for the web port's tests (C{http.client}, a real
socket): C{call(port, method, path, body=None, headers=None)} returns a
L{Reply} with the status, headers and body (parsed when it is JSON).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None, *, tls: bool = False,
         timeout: float = 10.0) -> Reply:
    """One request to 127.0.0.1:C{port}; a dict or list C{body} is sent as JSON."""
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                     response.read())
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


#: The bearer token L{site_with_clock} writes; C{ADMIN} sends it.
TOKEN = "web-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def site_with_clock(start_server: Any, tmp_path: Any, **overrides: Any) -> tuple[Any, Any]:
    """
    A site-mode server with SMTP and web (loopback not whitelisted, alice an
    administrator, L{TOKEN} an admin token, plaintext AUTH allowed), its time
    on a C{Clock} started at now.
    """
    import time

    from twisted.internet.task import Clock

    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    clock = Clock()
    clock.advance(time.time() // 1)
    server = start_server(site=True, clock=clock, kinds=("smtp", "web"),
                          web__admins=["alice@example.test"], web__token_file=str(tokens),
                          plaintext_auth="always", **overrides)
    return server, clock
