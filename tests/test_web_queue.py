"""
The web port's queue API over real sockets, against a site server relaying
to a capture smarthost (tests/relay_sink.py) that answers 451 until told
otherwise: list, hold, release, flush and delete act on the running queue
at once. Time is a Clock.
"""

from __future__ import annotations

import smtplib

import pytest
from twisted.internet.task import Clock

from conftest import queue_settled, queued
from relay_sink import Sink, wait_for
from webclient import basic, call

ADMIN = basic("alice@example.test", "alice-secret")
USER = basic("bob@example.test", "bob-secret")


def busy(stage, arg, sink):
    return "451 4.3.0 busy" if stage == "rcpt" else None


@pytest.fixture
def sink():
    s = Sink(policy=busy).start()
    yield s
    s.stop()


@pytest.fixture
def relaying(start_server, accounts, sink):
    """A site server relaying to the busy sink, alice its web administrator."""
    return start_server(site=True, clock=Clock(), kinds=("submission", "web"),
                        web__admins=["alice@example.test"],
                        relay__smarthost=f"tcp:host=127.0.0.1:port={sink.port}",
                        relay__starttls="none", relay__retry_minutes=10)


def api(server, method: str, path: str = "", headers=ADMIN):
    return call(server.port("web"), method, "/api/v1/queue" + path, headers=headers)


def send(server, rcpts=("carol@remote.example",)) -> str:
    """Submit a message for remote recipients; its queue ID once its first attempt is over."""
    before = {e["id"] for e in queued_now(server)}
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.login("alice@example.test", "alice-secret")
    assert client.sendmail("alice@example.test", list(rcpts), b"Subject: q\r\n\r\nx\r\n") == {}
    client.quit()
    [queue_id] = wait_for(lambda: [e["id"] for e in queued_now(server)
                                   if e["id"] not in before and e["attempts"] == 1])
    # the attempt counts in memory before its envelope is rewritten: let it end
    queue_settled(server)
    return queue_id


def queued_now(server) -> list[dict]:
    reply = api(server, "GET")
    assert reply.status == 200, reply.body
    return reply.json["messages"]


def test_list_shows_each_recipient_with_its_state_and_last_reply(relaying, sink, tmp_path):
    queue_id = send(relaying, ("carol@remote.example", "dave@remote.example"))
    reply = api(relaying, "GET").json
    assert (reply["relaying"], reply["total"]) == (True, 1)
    [entry] = reply["messages"]
    [env] = queued(tmp_path)
    assert entry == {
        "id": queue_id, "sender": "alice@example.test", "size": env["size"],
        "created": "1970-01-01T00:00:00Z", "attempts": 1, "next_attempt": "1970-01-01T00:10:00Z",
        "held": False,
        "recipients": [{"address": a, "state": "pending", "reply": "451 4.3.0 busy",
                        "host": f"127.0.0.1:{sink.port}"} for a in ("carol@remote.example", "dave@remote.example")]}


def test_the_list_comes_a_page_at_a_time_oldest_first(relaying):
    """After an outage thousands wait: each request lists at most a page of them."""
    ids = []
    for n in range(3):
        ids.append(send(relaying, (f"r{n}@remote.example",)))
        relaying.advance(1)
    page = api(relaying, "GET", "?start=1&limit=1").json
    assert (page["total"], page["start"], [m["id"] for m in page["messages"]]) == (3, 1, ids[1:2])
    assert [m["id"] for m in queued_now(relaying)] == ids
    assert [m["created"] for m in queued_now(relaying)] == [
        "1970-01-01T00:00:00Z", "1970-01-01T00:00:01Z", "1970-01-01T00:00:02Z"]
    for bad in ("?limit=0", "?limit=501", "?start=-1"):
        assert api(relaying, "GET", bad).status == 400, bad


def test_hold_keeps_a_message_back_until_released(relaying, sink, tmp_path):
    queue_id = send(relaying)
    held = api(relaying, "POST", f"/{queue_id.lower()}/hold")
    assert (held.status, held.json) == (200, {"held": queue_id})
    # held at once in the running queue, and on disk for the CLI
    assert queued_now(relaying)[0]["held"] is True
    assert (tmp_path / "data" / "queue" / "hold" / queue_id).exists()
    sink.policy = lambda stage, arg, s: None
    relaying.advance(601)
    relaying.advance(1)
    queue_settled(relaying)
    assert sink.messages == [] and queued(tmp_path)[0]["attempts"] == 1
    released = api(relaying, "POST", f"/{queue_id}/release")
    assert (released.status, released.json) == (200, {"released": queue_id})
    # released and due: sent at once, without waiting for a poll
    wait_for(lambda: sink.messages, what="delivery after release")
    wait_for(lambda: queued(tmp_path) == [] and queued_now(relaying) == [])
    assert api(relaying, "POST", f"/{queue_id}/release").status == 404


def test_flush_retries_at_once(relaying, sink, tmp_path):
    first, second = send(relaying), send(relaying, ("erin@remote.example",))
    assert api(relaying, "POST", f"/{second}/hold").status == 200
    sink.policy = lambda stage, arg, s: None
    flushed = api(relaying, "POST", "/flush")
    assert (flushed.status, flushed.json) == (200, {"flushed": 1})
    wait_for(lambda: sink.messages, what="delivery after flush")
    assert sink.recipients() == ["carol@remote.example"]
    wait_for(lambda: [e["id"] for e in queued(tmp_path)] == [second]
             and [m["id"] for m in queued_now(relaying)] == [second])


def test_delete_removes_a_message_for_good(relaying, sink, tmp_path):
    queue_id = send(relaying)
    gone = api(relaying, "DELETE", f"/{queue_id}")
    assert (gone.status, gone.json) == (200, {"deleted": queue_id})
    assert queued(tmp_path) == [] and queued_now(relaying) == []
    assert not (tmp_path / "data" / "queue" / "msg" / queue_id).exists()
    sink.policy = lambda stage, arg, s: None
    relaying.advance(601)
    relaying.advance(1)
    queue_settled(relaying)
    assert sink.messages == []
    again = api(relaying, "DELETE", f"/{queue_id}")
    assert again.status == 404 and "no such queued message" in again.json["Error"]


def test_delete_during_an_attempt_is_not_undone_by_it(relaying, sink, tmp_path):
    """The attempt in flight ends (451 here) without bringing the deleted message back."""
    queue_id = send(relaying)
    sink.hold_greeting()
    relaying.advance(601)
    wait_for(lambda: sink.active, what="the retry's connection")
    assert api(relaying, "DELETE", f"/{queue_id}").status == 200
    assert queued_now(relaying) == []
    sink.open_gate()
    wait_for(lambda: sink.transactions_per_connection, what="the retry's end")
    queue_settled(relaying)
    assert queued(tmp_path) == [] and queued_now(relaying) == [] and sink.messages == []


def test_unknown_and_malformed_ids_get_404(relaying):
    for method, path in (("POST", "/0123456789ABCDEF/hold"), ("POST", "/0123456789ABCDEF/release"),
                         ("DELETE", "/0123456789ABCDEF"), ("POST", "/not-an-id/hold"),
                         ("DELETE", "/..%2F..%2Fusers"), ("DELETE", "/" + "A" * 65)):
        reply = api(relaying, method, path)
        assert reply.status == 404 and reply.json["Error"], (method, path)
    assert api(relaying, "GET", "/flush").status == 405


def test_only_administrators_see_or_steer_the_queue(relaying):
    queue_id = send(relaying)
    for method, path in (("GET", ""), ("POST", "/flush"), ("POST", f"/{queue_id}/hold"),
                         ("POST", f"/{queue_id}/release"), ("DELETE", f"/{queue_id}")):
        assert api(relaying, method, path, headers=USER).status == 403, path
        assert api(relaying, method, path, headers={}).status == 401, path
    assert [m["id"] for m in queued_now(relaying)] == [queue_id]


def test_with_relaying_off_the_list_is_empty_and_changes_get_404(start_server):
    server = start_server(kinds=("smtp", "web"))  # a test host never relays
    assert api(server, "GET", headers={}).json == {"relaying": False, "total": 0, "start": 0,
                                                   "messages": []}
    for method, path in (("POST", "/flush"), ("POST", "/0123456789ABCDEF/hold"),
                         ("DELETE", "/0123456789ABCDEF")):
        reply = api(server, method, path, headers={})
        assert reply.status == 404 and "relaying is off" in reply.json["Error"], path
