"""
The web port's frame: where it listens, health, JSON errors, the guard
against other sites' pages, body limits and site-mode authentication.
The endpoints themselves have their own test files (test_web_*.py).
"""

from __future__ import annotations

import pytest

from conftest import log_lines
from webclient import basic, call


@pytest.fixture
def web(start_server):
    return start_server(kinds=("smtp", "web"))


def test_test_host_web_port_answers_health_and_logs_its_address(start_server):
    with log_lines("Web listening") as lines:
        server = start_server(kinds=("smtp", "web"))
    port = server.port("web")
    assert any(f"open http://127.0.0.1:{port}/" in line for line in lines), lines
    assert call(port, "GET", "/livez").status == 200
    assert call(port, "GET", "/readyz").body == b"ok\n"


def test_web_is_on_by_default_on_a_test_host_and_off_in_site_mode():
    from twisted_mail_screen.config.settings import load_config

    assert load_config(None, {"data_dir": "/tmp/x"}).listen.web == ("tcp:8025:interface=127.0.0.1",)
    site = load_config(None, {"data_dir": "/tmp/x", "mode": "site", "domains": ["example.test"]})
    assert site.listen.web == ()


def test_unknown_paths_and_methods_get_json_errors(web):
    port = web.port("web")
    missing = call(port, "GET", "/api/v1/no-such-thing")
    assert (missing.status, missing.headers["content-type"]) == (404, "application/json")
    assert "no such endpoint" in missing.json["Error"]
    wrong = call(port, "DELETE", "/livez")
    assert wrong.status == 405 and "GET" in wrong.json["Error"]
    assert call(port, "GET", "/%ff%fe").status == 404


def test_a_foreign_origin_is_refused_and_the_own_origin_accepted(web):
    port = web.port("web")
    refused = call(port, "GET", "/livez", headers={"Origin": "http://evil.example"})
    assert refused.status == 403 and "not allowed" in refused.json["Error"]
    assert call(port, "GET", "/livez", headers={"Origin": f"http://127.0.0.1:{port}"}).status == 200


def test_a_changing_request_with_a_non_json_body_is_refused(web):
    """An HTML form can post text/plain or form data cross-site, never JSON without asking."""
    port = web.port("web")
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        reply = call(port, "DELETE", "/api/v1/messages", body=b"IDs=1", headers={"Content-Type": kind})
        assert reply.status == 415, kind


def test_a_huge_body_gets_413_and_memory_stays_bounded(web):
    reply = call(web.port("web"), "POST", "/api/v1/screening/blocks", body=b"[" + b" " * (3 << 20) + b"]",
                 headers={"Content-Type": "application/json"})
    assert reply.status == 413


def test_errors_never_show_a_traceback(web):
    reply = call(web.port("web"), "GET", "/readyz", headers={"Host": "\u00e9" * 3})
    assert b"Traceback" not in reply.body


@pytest.fixture
def site_web(start_server, accounts, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# scrapers\nsecret-token-1\n")
    return start_server(site=True, kinds=("smtp", "web"), web__admins=["alice@example.test"],
                        web__token_file=str(tokens))


def test_site_mode_needs_authentication_everywhere(site_web):
    port = site_web.port("web")
    for path in ("/livez", "/readyz", "/api/v1/messages", "/metrics"):
        reply = call(port, "GET", path)
        assert reply.status == 401, path
        assert reply.headers["www-authenticate"].startswith("Basic realm=")


def test_site_mode_accepts_basic_over_loopback_and_a_bearer_token(site_web):
    port = site_web.port("web")
    assert call(port, "GET", "/livez", headers=basic("alice@example.test", "alice-secret")).status == 200
    assert call(port, "GET", "/livez", headers=basic("bob", "bob-secret")).status == 200
    assert call(port, "GET", "/livez", headers=basic("bob", "wrong")).status == 401
    assert call(port, "GET", "/livez", headers={"Authorization": "Bearer secret-token-1"}).status == 200
    assert call(port, "GET", "/livez", headers={"Authorization": "Bearer guess"}).status == 401
    assert call(port, "GET", "/livez", headers={"Authorization": "Basic !!!"}).status == 401


def test_site_mode_refuses_basic_in_the_clear_where_plaintext_auth_says_never(start_server, accounts):
    server = start_server(site=True, kinds=("smtp", "web"), plaintext_auth="never")
    reply = call(server.port("web"), "GET", "/livez", headers=basic("bob", "bob-secret"))
    assert reply.status == 403 and "TLS" in reply.json["Error"]


def test_site_mode_basic_over_tls(start_server, accounts, certificate):
    cert, key = certificate
    server = start_server(site=True, kinds=("smtp",), plaintext_auth="never",
                          tls__certificate=cert, tls__key=key,
                          listen__web=["ssl:0:interface=127.0.0.1"])
    port = server.port("web")
    assert call(port, "GET", "/livez", headers=basic("bob", "bob-secret"), tls=True).status == 200
