"""
The web port's screening API over real sockets: blocks that real SMTP
clients feel, blocks made by real failed logins, the white list, frozen
accounts, the recent decisions, and the CLI and the API seeing the same
entries (one implementation). Time is a Clock.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time

import pytest
from twisted.internet.task import Clock

from webclient import basic, call
from twisted_mail_screen.runtime import control
from twisted_mail_screen.testing import in_reactor

ADMIN = basic("alice@example.test", "alice-secret")
USER = basic("bob@example.test", "bob-secret")


class Api:
    """The screening API of one server, as its administrator (alice) calls it."""

    def __init__(self, server) -> None:
        self.server = server
        self.port = server.port("web")

    def __call__(self, method: str, path: str, body=None, headers=ADMIN):
        return call(self.port, method, "/api/v1/screening" + path, body, headers)

    def blocks(self) -> list[dict]:
        reply = self("GET", "/blocks")
        assert reply.status == 200, reply.body
        return reply.json["blocks"]


@pytest.fixture
def site(start_server, accounts):
    """
    C{site(**overrides)}: a site server (loopback not white-listed) with
    SMTP, submission and the web port, alice its web administrator, time
    on a Clock started at the real time (the Maildir cleaner compares it
    with file times).
    """

    def start(**overrides):
        clock = Clock()
        clock.advance(time.time() // 1)
        server = start_server(site=True, clock=clock, kinds=("smtp", "submission", "web"),
                              web__admins=["alice@example.test"], **overrides)
        return Api(server), clock

    return start


def smtp_accepted(server) -> bool:
    """Whether a real SMTP client from 127.0.0.1 is greeted (220) rather than refused."""
    try:
        client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected):
        return False
    client.quit()
    return True


def mailscreen(data_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twisted_mail_screen.admin.cli",
                           "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=60)


def cli_output(data_dir, *args: str) -> str:
    result = mailscreen(data_dir, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def failed_logins(server, count: int) -> None:
    for n in range(count):
        try:
            client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
        except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected):
            return
        try:
            client.login("alice@example.test", f"wrong-{n}")
        except (smtplib.SMTPAuthenticationError, smtplib.SMTPServerDisconnected):
            pass
        finally:
            client.close()


# blocks


def test_a_block_made_through_the_api_refuses_smtp_and_its_removal_accepts_it_again(site):
    api, _ = site()
    assert smtp_accepted(api.server)
    reply = api("POST", "/blocks", {"address": "127.0.0.1", "minutes": 30, "reason": "web test"})
    assert reply.status == 201, reply.body
    assert reply.json == {"address": "127.0.0.1", "network": False, "rule": "manual", "count": None,
                          "limit": None, "offence": None, "expires": reply.json["expires"],
                          "seconds_left": 1800, "reason": "manual: web test"}
    assert reply.json["expires"].endswith("Z") and "T" in reply.json["expires"]
    assert not smtp_accepted(api.server)
    assert [b["address"] for b in api.blocks()] == ["127.0.0.1"]
    gone = api("DELETE", "/blocks/127.0.0.1")
    assert (gone.status, gone.json) == (200, {"unblocked": "127.0.0.1"})
    assert smtp_accepted(api.server)
    assert api.blocks() == []
    again = api("DELETE", "/blocks/127.0.0.1")
    assert again.status == 404 and "not blocked" in again.json["Error"]


def test_time_left_follows_the_clock_and_the_block_lapses(site):
    api, clock = site()
    assert api("POST", "/blocks", {"address": "127.0.0.1", "minutes": 10}).status == 201
    api.server.advance(299.5)
    [entry] = api.blocks()
    assert entry["seconds_left"] == 301  # rounded up: never says 0 while it still refuses
    assert not smtp_accepted(api.server)
    api.server.advance(301)
    assert api.blocks() == []
    assert smtp_accepted(api.server)


def test_a_network_block_until_removed_and_its_encoded_slash(site):
    api, _ = site()
    made = api("POST", "/blocks", {"address": "127.0.0.0/8", "minutes": None})
    assert made.status == 201
    assert (made.json["address"], made.json["network"]) == ("127.0.0.0/8", True)
    assert (made.json["expires"], made.json["seconds_left"]) == (None, None)
    assert not smtp_accepted(api.server)
    assert api("DELETE", "/blocks/127.0.0.0%2F8").status == 200
    assert smtp_accepted(api.server)
    # the body form, for clients that would rather not encode the slash
    assert api("POST", "/blocks", {"address": "198.51.100.0/24"}).status == 201
    assert api("DELETE", "/blocks", {"address": "198.51.100.0/24"}).json == {
        "unblocked": "198.51.100.0/24"}
    assert api.blocks() == []


def test_blocks_are_listed_in_pages(site):
    """A storm's block list is listed a page at a time (the reactor's budget), in file order."""
    api, _ = site()
    for n in range(5):
        assert api("POST", "/blocks", {"address": f"192.0.2.{n}"}).status == 201
    page = api("GET", "/blocks?start=1&limit=2").json
    assert (page["total"], page["start"]) == (5, 1)
    assert [b["address"] for b in page["blocks"]] == ["192.0.2.1", "192.0.2.2"]
    assert [b["address"] for b in api.blocks()] == [f"192.0.2.{n}" for n in range(5)]
    assert api("GET", "/blocks?start=5").json == {"total": 5, "start": 5, "blocks": []}
    for bad in ("?limit=0", "?limit=5001", "?start=-1", "?start=x"):
        assert api("GET", "/blocks" + bad).status == 400, bad


def test_a_block_by_failed_logins_shows_its_rule_count_and_offence(site):
    api, clock = site(screening__max_auth_failures=2, screening__block_minutes=10)
    failed_logins(api.server, 2)
    [entry] = api.blocks()
    assert (entry["address"], entry["rule"], entry["count"], entry["limit"], entry["offence"]) == (
        "127.0.0.1", "auth_failures", 2, 2, 1)
    assert entry["seconds_left"] == 600 and entry["reason"].startswith("auth_failures: 2/2")
    assert not smtp_accepted(api.server)
    # a second block within the repeat memory is the second offence, twice as long
    api.server.advance(601)
    assert api.blocks() == []
    failed_logins(api.server, 2)
    [entry] = api.blocks()
    assert (entry["rule"], entry["count"], entry["offence"], entry["seconds_left"]) == (
        "auth_failures", 2, 2, 1200)


def test_the_cli_and_the_api_see_the_same_entries(site, tmp_path):
    api, _ = site()
    data = tmp_path / "data"
    cli_output(data, "block", "add", "192.0.2.7", "--minutes", "45", "--reason", "from cli")
    assert [(b["address"], b["seconds_left"], b["reason"]) for b in api.blocks()] == [
        ("192.0.2.7", 2700, "manual: from cli")]
    assert api("POST", "/blocks", {"address": "198.51.100.0/24", "reason": "from web"}).status == 201
    listing = cli_output(data, "block", "list")
    assert "192.0.2.7" in listing and "45 min left" in listing
    assert "198.51.100.0/24  never  (never expires)  # manual: from web" in listing
    # the control channel answers exactly what the web does: one implementation
    assert control.call(str(data), "block.list") == api.blocks()
    assert cli_output(data, "block", "remove", "198.51.100.7") == "unblocked 198.51.100.7\n"
    assert [b["address"] for b in api.blocks()] == ["192.0.2.7"]
    assert api("DELETE", "/blocks/192.0.2.7").status == 200
    assert cli_output(data, "block", "list") == "no blocks\n"


# the white list


def test_whitelist_round_trip_and_its_effect(site, tmp_path):
    api, _ = site(screening__whitelist=["10.0.0.0/8"])
    assert api("GET", "/whitelist").json == {"whitelist": [
        {"entry": "10.0.0.0/8", "origin": "config", "comment": "", "expires": None}]}
    assert api("POST", "/blocks", {"address": "127.0.0.1"}).status == 201
    assert not smtp_accepted(api.server)
    added = api("POST", "/whitelist", {"entry": "127.0.0.*", "comment": "lab"})
    assert (added.status, added.json["origin"]) == (201, "runtime")
    assert smtp_accepted(api.server)  # the white list beats the block list
    assert [e["entry"] for e in api("GET", "/whitelist").json["whitelist"]] == ["10.0.0.0/8",
                                                                               "127.0.0.*"]
    assert "127.0.0.*" in cli_output(tmp_path / "data", "whitelist", "list")
    assert api("DELETE", "/whitelist/127.0.0.%2A").json == {"removed": "127.0.0.*"}
    assert not smtp_accepted(api.server)
    fixed = api("DELETE", "/whitelist/10.0.0.0%2F8")
    assert fixed.status == 404 and "configuration file" in fixed.json["Error"]
    bad = api("POST", "/whitelist", {"entry": "not an address"})
    assert bad.status == 400 and "not an address" in bad.json["Error"]


# frozen accounts


def submission_auth(server, user: str, password: str) -> int:
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    try:
        return client.login(user, password)[0]
    except smtplib.SMTPAuthenticationError as e:
        return e.smtp_code
    finally:
        client.close()


def test_freeze_and_thaw_round_trip(site, tmp_path):
    api, _ = site()
    assert submission_auth(api.server, "bob@example.test", "bob-secret") == 235
    frozen = api("POST", "/frozen", {"user": "Bob@Example.test", "minutes": 30, "reason": "web"})
    assert frozen.status == 201
    assert frozen.json == {"user": "bob@example.test", "expires": frozen.json["expires"],
                           "seconds_left": 1800, "reason": "web"}
    assert submission_auth(api.server, "bob@example.test", "bob-secret") == 535
    assert [f["user"] for f in api("GET", "/frozen").json["frozen"]] == ["bob@example.test"]
    assert "bob@example.test" in cli_output(tmp_path / "data", "frozen", "list")
    assert api("DELETE", "/frozen/bob@example.test").json == {"thawed": "bob@example.test"}
    assert submission_auth(api.server, "bob@example.test", "bob-secret") == 235
    assert api("GET", "/frozen").json == {"frozen": []}
    assert api("DELETE", "/frozen/bob@example.test").status == 404
    # without minutes: [freeze] minutes; 0: until thawed
    default = api("POST", "/frozen", {"user": "bob@example.test"}).json
    assert (default["seconds_left"], default["reason"]) == (3600, "manual")
    forever = api("POST", "/frozen", {"user": "bob@example.test", "minutes": 0}).json
    assert (forever["expires"], forever["seconds_left"]) == (None, None)
    assert api("DELETE", "/frozen", {"user": "bob@example.test"}).status == 200


# decisions


def publish(server, **data) -> None:
    in_reactor(server.service.events.publish, "screening.decision", **data)


def test_decisions_newest_first_filtered_by_client_and_action(site):
    api, clock = site()
    for n, (action, client) in enumerate([("block", "192.0.2.1"), ("refuse", "192.0.2.1"),
                                          ("refuse", "192.0.2.2"), ("refuse", "192.0.2.1"),
                                          ("block", "192.0.2.3")]):
        publish(api.server, time=1000.0 + n, action=action, client=client, rule="connections",
                count="4/3")

    def decisions(query: str) -> list[tuple[float, str, str]]:
        reply = api("GET", "/decisions" + query)
        assert reply.status == 200, reply.body
        return [(d["time"], d["action"], d["client"]) for d in reply.json["decisions"]
                if d["client"].startswith("192.0.2.")]

    assert decisions("?client=192.0.2.1") == [(1003.0, "refuse", "192.0.2.1"),
                                              (1001.0, "refuse", "192.0.2.1"),
                                              (1000.0, "block", "192.0.2.1")]
    assert decisions("?client=192.0.2.1&action=refuse&limit=1") == [(1003.0, "refuse", "192.0.2.1")]
    assert decisions("?action=block") == [(1004.0, "block", "192.0.2.3"),
                                          (1000.0, "block", "192.0.2.1")]
    whole = api("GET", "/decisions?client=192.0.2.3").json["decisions"]
    assert whole == [{"time": 1004.0, "action": "block", "client": "192.0.2.3",
                      "rule": "connections", "count": "4/3"}]
    for bad in ("?limit=0", "?limit=100000", "?limit=ten"):
        assert api("GET", "/decisions" + bad).status == 400, bad


def test_decisions_of_real_traffic_show_with_their_fields(site):
    """A block by the API, then a real SMTP client refused: both decisions, newest first."""
    api, clock = site()
    api("POST", "/blocks", {"address": "127.0.0.1", "minutes": 5})
    assert not smtp_accepted(api.server)
    decisions = api("GET", "/decisions?client=127.0.0.1").json["decisions"]
    assert [d["action"] for d in decisions] == ["refuse", "block"], decisions
    refused, blocked = decisions
    assert (refused["action"], refused["rule"], refused["protocol"]) == ("refuse", "manual", "smtp")
    assert (blocked["action"], blocked["rule"], blocked["minutes"]) == ("block", "manual", 5)
    assert refused["time"] == blocked["time"] == clock.seconds()
    assert api("GET", "/decisions?client=127.0.0.1&action=block").json["decisions"] == [blocked]


def test_decisions_are_bounded(site):
    api, _ = site()
    for n in range(1100):
        publish(api.server, time=float(n), action="refuse", client="198.51.100.9", rule="manual")
    kept = api("GET", "/decisions?limit=1000&client=198.51.100.9").json["decisions"]
    assert len(kept) == 1000 and kept[0]["time"] == 1099.0 and kept[-1]["time"] == 100.0
    assert len(api("GET", "/decisions?client=198.51.100.9").json["decisions"]) == 100


def test_stats_are_the_control_channels(site, tmp_path):
    api, _ = site()
    api("POST", "/blocks", {"address": "192.0.2.9"})
    stats = api("GET", "/stats").json
    assert stats == control.call(str(tmp_path / "data"), "screening.stats")
    assert stats["blocked"] == 1 and set(stats) == {"tracked", "active", "blocked", "offences",
                                                    "backend",
                                                    "evicted"}


# bad input and who may ask


@pytest.mark.parametrize("body, status, words", [
    ({"address": "not-an-ip"}, 400, "not-an-ip"),
    ({"address": "192.0.2.1", "minutes": "ten"}, 400, "minutes"),
    ({"address": "192.0.2.1", "minutes": True}, 400, "minutes"),
    ({"address": "192.0.2.1", "minutes": -1}, 400, "minutes"),
    ({"address": "192.0.2.1", "minutes": 10 ** 12}, 400, "minutes"),
    ({"address": 3221225985}, 400, "address must be a string"),
    ({"minutes": 5}, 400, "missing field: address"),
    ({"address": "192.0.2.1", "color": "red"}, 400, "unknown field: color"),
    (["192.0.2.1"], 400, "JSON object"),
    ({"address": "192.0.2.1", "reason": "x\n198.51.100.0/24 never"}, 400, "control characters"),
])
def test_bad_block_requests_get_a_json_4xx(site, tmp_path, body, status, words):
    api, _ = site()
    reply = api("POST", "/blocks", body)
    assert reply.status == status and words in reply.json["Error"], reply.body
    assert api.blocks() == []
    blocklist = tmp_path / "data" / "blocklist.txt"
    assert not blocklist.exists() or "198.51.100.0/24" not in blocklist.read_text()


def test_bad_paths_and_bodies(site):
    api, _ = site()
    assert api("DELETE", "/blocks/%ff%fe").status == 400
    assert api("DELETE", "/blocks/not-an-ip").status == 404
    assert api("DELETE", "/blocks").status == 400  # no body, no address
    assert api("POST", "/frozen", {"user": "two words"}).status == 400
    assert api("POST", "/frozen", {"user": "bob@example.test", "minutes": 1.5}).status == 400
    assert api("POST", "/whitelist", {"comment": "no entry"}).status == 400
    assert api("POST", "/blocks", b"{not json", {**ADMIN, "Content-Type": "application/json"}
               ).status == 400


def test_only_administrators_see_or_steer_screening(site):
    api, _ = site()
    for method, path, body in (("GET", "/blocks", None), ("POST", "/blocks", {"address": "192.0.2.1"}),
                               ("DELETE", "/blocks/192.0.2.1", None), ("GET", "/whitelist", None),
                               ("GET", "/frozen", None), ("DELETE", "/frozen/bob@example.test", None),
                               ("GET", "/decisions", None), ("GET", "/stats", None)):
        reply = api(method, path, body, headers=USER)
        assert reply.status == 403 and reply.json == {"Error": "administrators only"}, path
        assert api(method, path, body, headers={}).status == 401, path
    assert api.blocks() == []
