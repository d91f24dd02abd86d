# -*- test-case-name: tests.test_web_ui -*-
"""
The web page: C{/} and the files it loads from C{/ui/}, plain HTML, CSS and
JavaScript modules shipped in the package's C{static/} folder. There is no
build step and nothing is loaded from anywhere else, so the page works on a
host with no network and its Content-Security-Policy can allow C{'self'}
only.

The files are read once per process, when the first site is built: a
request never touches the disk, and only the names found then are served
(a path is never joined from what the client sent).
"""

from __future__ import annotations

import functools
from importlib.resources import files

from twisted_mail_screen.web.api import ApiError, ApiRequest, Raw, Router
from twisted_mail_screen.web.context import WebContext

#: The policy of the page itself. The message preview is a sandboxed
#: frame from /view/ (frame-src 'self'), served under its own, stricter
#: policy; no inline script or style is allowed, so data the page shows
#: can never become code even if it reached the markup.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; frame-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

HEADERS = {
    "content-security-policy": PAGE_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    # Revalidated on each load, so an upgraded server never runs an old script.
    "cache-control": "no-cache",
}

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


@functools.lru_cache(maxsize=1)
def _static_files() -> tuple[tuple[str, bytes, str], ...]:
    """
    (name, content, type) of every page file, read once per process: a
    test suite builds a site per test, and the package's files do not
    change under a running process.
    """
    found = []
    for entry in files("twisted_mail_screen.web").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in TYPES:
            found.append((entry.name, entry.read_bytes(), TYPES[suffix]))
    return tuple(found)


def load_static() -> dict[str, Raw]:
    """Every page file of the package's C{static/} folder, by name, ready to answer."""
    return {name: Raw(body, kind, dict(HEADERS)) for name, body, kind in _static_files()}


def register(router: Router, context: WebContext) -> None:
    pages = load_static()

    def index(request: ApiRequest) -> Raw:
        return pages["index.html"]

    def static(request: ApiRequest, name: str) -> Raw:
        page = pages.get(name)
        if page is None:
            raise ApiError(404, f"no such page file: {name}")
        return page

    router.add("GET", "/", index)
    router.add("GET", "/ui/{name}", static)
