"""
C{/api/v1/faults} over a real socket: a rule set over HTTP is what the
next SMTP client meets, exactly C{times} times; listing, removing and
clearing; bad bodies get 400 with the reason; a site has no such endpoint.
"""

from __future__ import annotations

import smtplib

import pytest

from tests.webclient import call

REJECT = {"kind": "reject", "command": "RCPT", "match": "*@bounce.test",
          "reply": "550 5.1.1 no such user (over http)", "times": 2}


def send(server, to: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("smtp")) as s:
        s.sendmail("a@example.test", [to], b"Subject: x\r\n\r\nx\r\n")


def test_a_rule_set_over_http_answers_rcpt_exactly_times_times(start_server) -> None:
    server = start_server(kinds=("smtp", "web"))
    web = server.port("web")
    added = call(web, "POST", "/api/v1/faults", REJECT)
    assert added.status == 200, added.body
    assert added.json["kind"] == "reject" and added.json["remaining"] == 2
    for _ in range(2):
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send(server, "x@bounce.test")
        assert refused.value.recipients["x@bounce.test"] == (550, b"5.1.1 no such user (over http)")
    assert call(web, "GET", "/api/v1/faults").json == {"total": 0, "rules": []}
    send(server, "x@bounce.test")  # the rule is spent


def test_list_remove_and_clear(start_server) -> None:
    server = start_server(kinds=("smtp", "web"))
    web = server.port("web")
    first = call(web, "POST", "/api/v1/faults", REJECT).json
    second = call(web, "POST", "/api/v1/faults",
                  {"kind": "tempfail", "command": "MAIL", "times": None}).json
    call(web, "POST", "/api/v1/faults", {"kind": "delay", "command": "DATA", "seconds": 3})
    listing = call(web, "GET", "/api/v1/faults").json
    assert listing["total"] == 3
    assert [(r["id"], r["kind"], r["remaining"]) for r in listing["rules"][:2]] == [
        (first["id"], "reject", 2), (second["id"], "tempfail", None)]
    assert call(web, "DELETE", f"/api/v1/faults/{first['id']}").json == {"removed": 1}
    gone = call(web, "DELETE", f"/api/v1/faults/{first['id']}")
    assert gone.status == 404 and "no active fault rule" in gone.json["Error"]
    assert call(web, "DELETE", "/api/v1/faults/abc").status == 404
    assert call(web, "DELETE", "/api/v1/faults").json == {"removed": 2}
    assert call(web, "GET", "/api/v1/faults").json["total"] == 0


@pytest.mark.parametrize("body, message", [
    ({"kind": "explode"}, "kind must be one of reject, tempfail"),
    ({"command": "RCPT"}, "kind must be one of"),
    ({"kind": "reject", "reply": "250 ok"}, "reply must be one line of at most 510 characters starting with a 5xx code"),
    ({"kind": "delay", "command": "DATA"}, "delay: missing a required argument: 'seconds'"),
    ({"kind": "reject", "colour": "blue"}, "reject: got an unexpected keyword argument 'colour'"),
    ({"kind": "reject", "times": 0}, "times must be a positive integer or None"),
    ({"kind": "reject", "match": 5}, "reject: match must be a string"),
    ({"kind": "fail_delivery", "reply": ["451"]}, "fail_delivery: reply must be a string"),
    (["reject"], "the body must be a JSON object"),
])
def test_a_bad_rule_is_a_400_naming_the_problem(start_server, body, message) -> None:
    server = start_server(kinds=("smtp", "web"))
    reply = call(server.port("web"), "POST", "/api/v1/faults", body)
    assert reply.status == 400 and message in reply.json["Error"], reply.body
    assert call(server.port("web"), "GET", "/api/v1/faults").json["total"] == 0


def test_a_body_that_is_not_json_is_refused(start_server) -> None:
    server = start_server(kinds=("smtp", "web"))
    web = server.port("web")
    assert call(web, "POST", "/api/v1/faults", b"kind=reject",
                {"Content-Type": "application/x-www-form-urlencoded"}).status == 415
    assert call(web, "POST", "/api/v1/faults", b"{", {"Content-Type": "application/json"}).status == 400
    assert call(web, "POST", "/api/v1/faults").status == 400


def test_site_mode_has_no_faults_endpoint(start_server, accounts) -> None:
    server = start_server(site=True, kinds=("smtp", "web"), web__admins=["alice@example.test"])
    from tests.webclient import basic
    for method in ("GET", "POST", "DELETE"):
        reply = call(server.port("web"), method, "/api/v1/faults", {"kind": "reject"} if method == "POST" else None,
                     basic("alice@example.test", "alice-secret"))
        assert reply.status == 404, (method, reply.body)
