"""
The web page as the server sends it: C{/} and its files under C{/ui/},
each with the page's own Content-Security-Policy and C{nosniff}; nothing
loaded from elsewhere, and no script that turns data into markup.
What the page does in a browser is tests/test_web_browser.py.
"""

from __future__ import annotations

import re
from importlib.resources import files

import pytest

from webclient import call

POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; frame-src 'self'; "
          "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

STATIC = files("twisted_mail_screen.web").joinpath("static")


def static_names() -> list[str]:
    return sorted(entry.name for entry in STATIC.iterdir() if entry.is_file())


@pytest.fixture
def web(start_server):
    return start_server(kinds=("smtp", "web"))


def check_page_headers(reply, kind: str) -> None:
    assert reply.status == 200
    assert reply.headers["content-type"] == f"{kind}; charset=utf-8"
    assert reply.headers["content-security-policy"] == POLICY
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["x-frame-options"] == "DENY"


def test_the_page_is_served_at_the_root_with_its_policy(web):
    reply = call(web.port("web"), "GET", "/")
    check_page_headers(reply, "text/html")
    assert b'<script type="module" src="/ui/app.js">' in reply.body
    assert b'<link rel="stylesheet" href="/ui/app.css">' in reply.body
    assert reply.body == STATIC.joinpath("index.html").read_bytes()


@pytest.mark.parametrize("name,kind", [("app.js", "text/javascript"), ("messages.js", "text/javascript"),
                                       ("app.css", "text/css"), ("index.html", "text/html")])
def test_each_page_file_is_served_with_its_type_and_policy(web, name, kind):
    reply = call(web.port("web"), "GET", f"/ui/{name}")
    check_page_headers(reply, kind)
    assert reply.body == STATIC.joinpath(name).read_bytes()


def test_every_module_the_page_imports_is_served(web):
    """The modules import each other as ./name.js: each must be a file the port serves."""
    port = web.port("web")
    wanted = {"app.js", "app.css"}
    for name in static_names():
        if name.endswith(".js"):
            wanted.update(re.findall(r'from "\./([\w-]+\.js)"', STATIC.joinpath(name).read_text()))
    for name in sorted(wanted):
        assert call(port, "GET", f"/ui/{name}").status == 200, name


def test_head_answers_the_headers_without_a_body(web):
    reply = call(web.port("web"), "HEAD", "/ui/app.js")
    assert reply.status == 200 and reply.body == b""
    assert reply.headers["content-security-policy"] == POLICY


@pytest.mark.parametrize("path", ["/ui/nope.js", "/ui/..%2Fui.py", "/ui/..%2F..%2Fsetup.py",
                                  "/ui/%2e%2e%2fapi.py", "/ui/", "/ui/app.js/x", "/index.html"])
def test_only_the_shipped_files_are_served(web, path):
    """A name is looked up among the files read at start-up, never joined into a path."""
    reply = call(web.port("web"), "GET", path)
    assert reply.status == 404, path
    assert reply.headers["content-type"] == "application/json"


def test_changing_methods_on_the_page_are_refused(web):
    assert call(web.port("web"), "POST", "/").status == 405


def test_a_foreign_origin_cannot_load_the_page(web):
    port = web.port("web")
    assert call(port, "GET", "/", headers={"Origin": "http://evil.example"}).status == 403


def test_site_mode_asks_for_credentials_before_the_page(start_server, accounts):
    server = start_server(site=True, kinds=("smtp", "web"))
    reply = call(server.port("web"), "GET", "/")
    assert reply.status == 401 and reply.headers["www-authenticate"].startswith("Basic")


# The files themselves: nothing from outside, no markup made from strings.

def test_the_page_loads_nothing_from_elsewhere():
    """No CDN, no remote font or image: every reference is to the server itself."""
    for name in static_names():
        source = STATIC.joinpath(name).read_text()
        quoted = r"""(?:\b(?:src|href)\s*=\s*["'`]|url\(\s*["']?)([^"'`)\s>]+)"""
        for url in re.findall(quoted, source):
            assert url.startswith(("/", "./", "data:", "#")) or url.startswith("${"), (name, url)
        assert "http://" not in source.replace("http://www.w3.org/2000/svg", ""), name
        assert "https://" not in source, name
        assert "@import" not in source, name


def test_no_inline_script_or_style_that_the_policy_would_block():
    page = STATIC.joinpath("index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)", page) == []
    assert "<style" not in page and " style=" not in page
    assert re.findall(r"\son\w+=", page) == []


def test_scripts_never_parse_strings_as_markup():
    """Message and header texts go in with textContent or text nodes, never as HTML."""
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|createContextualFragment"
                       r"|DOMParser|\beval\(|new Function|srcdoc")
    for name in static_names():
        if name.endswith(".js"):
            assert sinks.findall(STATIC.joinpath(name).read_text()) == [], name


def test_the_preview_frame_is_an_empty_sandbox():
    """The HTML preview runs no script and has an origin of its own: sandbox with no allowances."""
    page = STATIC.joinpath("index.html").read_text()
    frames = re.findall(r"<iframe\b[^>]*>", page)
    assert len(frames) == 1
    assert re.search(r"\ssandbox(\s|>)", frames[0]), frames[0]
    for name in static_names():
        assert "allow-scripts" not in STATIC.joinpath(name).read_text(), name
        assert "allow-same-origin" not in STATIC.joinpath(name).read_text(), name
