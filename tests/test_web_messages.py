"""
The messages API (Mailpit v1 compatible), its search and the wait
endpoint, over real sockets: mail goes in with smtplib, the API is read
with a plain HTTP client, IMAP and POP3 are checked with imaplib/poplib.
"""

from __future__ import annotations

import base64
import imaplib
import re
import smtplib
import threading
import time
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any
from urllib.parse import quote

import pytest
from twisted.internet import reactor
from twisted.internet.task import Clock

from twisted_mail_screen.store.message_ids import MessageRef
from twisted_mail_screen.testing import in_reactor
from webclient import Reply, basic, call

HTML = "<p>Hello <b>there</b></p><script>alert(1)</script><img src='http://evil.example/x.png'>"


def send(server: Any, to: str = "alice@example.test", subject: str = "Hello",
         text: str = "Plain body text", html: str | None = None,
         attachment: bytes | None = None, sender: str = "Sender Name <sender@example.org>",
         cc: str | None = None) -> None:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{re.sub(r'[^A-Za-z0-9]', '-', subject)}@example.org>"
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream",
                           filename="data.bin")
    rcpts = [to] + ([cc] if cc else [])
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as s:
        s.sendmail("sender@example.org", rcpts, msg.as_bytes(policy=SMTP))


def get(port: int, path: str, **kw: Any) -> Reply:
    return call(port, "GET", path, **kw)


def listing(port: int, path: str = "/api/v1/messages", **kw: Any) -> dict:
    reply = get(port, path, **kw)
    assert reply.status == 200, reply.body
    return reply.json


@pytest.fixture
def web(start_server):
    return start_server(kinds=("smtp", "web", "imap", "pop3"))


def test_sent_mail_is_listed_newest_first_in_mailpit_shape(web):
    port = web.port("web")
    send(web, subject="First", cc="carol@example.test")
    send(web, subject="Second", attachment=b"\x00\x01" * 10)
    page = listing(port)
    # A message to two local mailboxes is shown once per mailbox.
    assert (page["total"], page["unread"], page["messages_count"], page["count"]) == (3, 3, 3, 3)
    assert page["start"] == 0 and page["tags"] == []
    newest = page["messages"][0]
    assert newest["Subject"] == "Second"
    assert set(newest) >= {"ID", "MessageID", "Read", "From", "To", "Cc", "Bcc", "ReplyTo", "Subject",
                           "Created", "Size", "Attachments", "Snippet", "Tags"}
    assert newest["From"] == {"Name": "Sender Name", "Address": "sender@example.org"}
    assert newest["To"] == [{"Name": "", "Address": "alice@example.test"}]
    assert newest["MessageID"] == "Second@example.org"
    assert newest["Attachments"] == 1 and newest["Read"] is False
    assert newest["Snippet"] == "Plain body text" and newest["Tags"] == []
    assert newest["Created"].endswith("Z") and newest["Created"][:2] == "20"
    assert isinstance(newest["Size"], int) and newest["Size"] > 100
    firsts = [m for m in page["messages"] if m["Subject"] == "First"]
    assert len(firsts) == 2 and firsts[0]["Cc"] == [{"Name": "", "Address": "carol@example.test"}]
    assert len({m["ID"] for m in page["messages"]}) == 3


def test_encoded_headers_and_bodies_are_decoded(web):
    port = web.port("web")
    send(web, subject="Grüße aus Köln", text="Schöne Grüße", sender="Jörg Müller <j@example.org>")
    [m] = listing(port)["messages"]
    assert m["Subject"] == "Grüße aus Köln" and m["Snippet"] == "Schöne Grüße"
    assert m["From"] == {"Name": "Jörg Müller", "Address": "j@example.org"}
    assert listing(port, "/api/v1/search?query=" + quote("köln"))["messages_count"] == 1
    assert listing(port, "/api/v1/search?query=" + quote("from:müller"))["messages_count"] == 1


def test_paging_and_limits(web):
    port = web.port("web")
    for i in range(5):
        send(web, subject=f"N{i}")
    page = listing(port, "/api/v1/messages?start=1&limit=2")
    assert [m["Subject"] for m in page["messages"]] == ["N3", "N2"]
    assert (page["start"], page["count"], page["messages_count"], page["total"]) == (1, 2, 5, 5)
    for bad in ("limit=1001", "limit=-1", "limit=abc", "start=-3"):
        reply = get(port, f"/api/v1/messages?{bad}")
        assert reply.status == 400 and "Error" in reply.json, bad
    only_bob = listing(port, "/api/v1/messages?mailbox=bob@example.test")
    assert only_bob["total"] == 0
    assert get(port, "/api/v1/messages?mailbox=../etc").status == 400


def test_one_message_its_parts_and_views(web):
    port = web.port("web")
    send(web, subject="Full", html=HTML, attachment=b"PK\x03\x04binary")
    entry = listing(port)["messages"][0]
    msg = get(port, f"/api/v1/message/{entry['ID']}").json
    assert msg["ID"] == entry["ID"] and msg["Subject"] == "Full"
    assert msg["Text"].strip() == "Plain body text" and "<b>there</b>" in msg["HTML"]
    assert msg["Date"].endswith("Z") and msg["Inline"] == []
    [att] = msg["Attachments"]
    assert (att["FileName"], att["ContentType"], att["Size"]) == ("data.bin", "application/octet-stream", 10)
    part = get(port, f"/api/v1/message/{entry['ID']}/part/{att['PartID']}")
    assert part.status == 200 and part.body == b"PK\x03\x04binary"
    assert part.headers["content-type"] == "application/octet-stream"
    assert "sandbox" in part.headers["content-security-policy"]
    assert part.headers["x-content-type-options"] == "nosniff"
    assert 'filename="data.bin"' in part.headers["content-disposition"]
    headers = get(port, f"/api/v1/message/{entry['ID']}/headers").json
    assert headers["Subject"] == ["Full"] and headers["Message-Id"] == ["<Full@example.org>"]
    assert "Return-Path" in headers and "Received" in headers
    raw = get(port, f"/api/v1/message/{entry['ID']}/raw")
    assert raw.headers["content-type"].startswith("text/plain") and b"Subject: Full" in raw.body
    view = get(port, f"/view/{entry['ID']}.html")
    assert view.headers["content-type"].startswith("text/html")
    assert view.headers["content-security-policy"] == (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data: cid:; sandbox")
    assert view.headers["x-content-type-options"] == "nosniff"
    text = get(port, f"/view/{entry['ID']}.txt")
    assert text.body.strip() == b"Plain body text"
    # Opening it marked it read, as Mailpit does.
    assert listing(port)["messages"][0]["Read"] is True
    latest = get(port, "/api/v1/message/latest").json
    assert latest["ID"] == entry["ID"]


def test_unknown_garbled_and_foreign_ids_are_404(web, tmp_path):
    port = web.port("web")
    send(web)
    real = listing(port)["messages"][0]["ID"]
    (tmp_path / "secret").write_text("top secret")
    gone = MessageRef("alice@example.test", "", "1.M1P1Q1.nowhere").id
    sneaky = [
        base64.urlsafe_b64encode(b"alice@example.test//../../../../etc/passwd").decode().rstrip("="),
        base64.urlsafe_b64encode(b"../x@example.test//a").decode().rstrip("="),
        base64.urlsafe_b64encode(b"alice@example.test/.Sent/a").decode().rstrip("="),
        MessageRef("alice@example.test", "", "..").id, MessageRef("alice@example.test", "", ".").id,
        MessageRef("Alice@example.test", "", "x").id, MessageRef("alice@", "", "x").id,
        "not-an-id!", "A" * 2000, real + "A",
    ]
    for bad in [gone] + sneaky:
        for suffix in ("", "/headers", "/raw", "/part/1"):
            reply = get(port, f"/api/v1/message/{quote(bad)}{suffix}")
            assert reply.status == 404 and reply.headers["content-type"] == "application/json", (bad, suffix)
            assert b"Traceback" not in reply.body
        assert get(port, f"/view/{quote(bad)}.html").status == 404
    assert get(port, f"/api/v1/message/{real}/part/9").status == 404
    assert get(port, f"/view/{real}.html").status == 404  # no HTML part
    assert call(port, "DELETE", "/api/v1/messages", {"IDs": ["garbled"]}).status == 404
    assert call(port, "PUT", "/api/v1/messages", {"IDs": [7], "Read": True}).status == 400
    assert call(port, "PUT", "/api/v1/messages", {"Read": "yes"}).status == 400
    assert listing(port)["total"] == 1


def test_search_syntax(web):
    port = web.port("web")
    send(web, subject="Invoice 42", text="please pay", sender="billing@shop.example")
    send(web, to="bob@example.test", subject="Party time", text="cake and tea", attachment=b"x" * 3000)
    send(web, subject="Weekly news", text="nothing to pay here, honestly")

    def subjects(query: str) -> list[str]:
        page = listing(port, "/api/v1/search?query=" + quote(query))
        return sorted(m["Subject"] for m in page["messages"])

    assert subjects("pay") == ["Invoice 42", "Weekly news"]
    assert subjects("-pay") == ["Party time"]
    assert subjects("!pay") == ["Party time"]
    assert subjects("from:billing") == ["Invoice 42"]
    assert subjects("to:bob@example.test") == ["Party time"]
    assert subjects('subject:"party time"') == ["Party time"]
    assert subjects('"pay here"') == ["Weekly news"]
    assert subjects("message-id:Invoice-42") == ["Invoice 42"]
    assert subjects("has:attachment") == ["Party time"]
    assert subjects("larger:2k") == ["Party time"]
    assert subjects("smaller:2k") == ["Invoice 42", "Weekly news"]
    assert subjects("after:2000-01-01 before:2999-01-01 is:unread") == ["Invoice 42", "Party time",
                                                                        "Weekly news"]
    assert subjects("before:2000-01-01") == [] and subjects("is:read") == []
    page = listing(port, "/api/v1/search?query=pay")
    assert (page["total"], page["messages_count"]) == (3, 2)
    for bad in ("", "after:yesterdayish", "larger:huge", 'subject:"open', "x" * 5000):
        reply = get(port, "/api/v1/search?query=" + quote(bad))
        assert reply.status == 400 and reply.json["Error"], bad
    assert get(port, "/api/v1/search?query=after:2020-01-01&tz=Mars/Olympus").status == 400
    assert call(port, "DELETE", "/api/v1/search?query=pay").body == b"ok"
    assert subjects("cake") == ["Party time"] and listing(port)["total"] == 1


def test_read_unread_and_delete_reach_imap_and_publish_events(web):
    port = web.port("web")
    events: list[Any] = []
    in_reactor(web.service.events.subscribe, events.append)
    for i in range(3):
        send(web, subject=f"M{i}")
    ids = [m["ID"] for m in listing(port)["messages"]]
    imap = imaplib.IMAP4("127.0.0.1", web.port("imap"))
    imap.login("alice@example.test", "x")
    imap.select("INBOX")
    assert call(port, "PUT", "/api/v1/messages", {"IDs": ids[:1], "Read": True}).body == b"ok"
    # The IMAP index was refreshed by the change: no wait for the session's poll.
    imap.noop()
    assert imap.search(None, "SEEN")[1] == [b"3"]
    page = listing(port)
    assert (page["unread"], [m["Read"] for m in page["messages"]]) == (2, [True, False, False])
    assert call(port, "PUT", "/api/v1/messages", {"Read": True}).status == 200
    assert listing(port)["unread"] == 0
    assert call(port, "PUT", "/api/v1/messages", {"Search": "subject:M2", "Read": False}).status == 200
    assert [m["Read"] for m in listing(port)["messages"]] == [False, True, True]
    assert call(port, "PUT", "/api/v1/messages", {"IDs": ids[:1], "Search": "x", "Read": True}).status == 400
    assert call(port, "DELETE", "/api/v1/messages", {"IDs": ids[1:2]}).body == b"ok"
    assert [m["ID"] for m in listing(port)["messages"]] == [ids[0], ids[2]]
    imap.noop()
    assert imap.select("INBOX")[1] == [b"2"]
    assert call(port, "DELETE", "/api/v1/messages").body == b"ok"
    assert listing(port)["total"] == 0
    imap.logout()
    kinds = [e.kind for e in events]
    assert kinds.count("message.new") == 3
    assert {"message.read", "message.unread", "message.deleted"} <= set(kinds)
    deleted = [e.data for e in events if e.kind == "message.deleted"]
    assert deleted[0] == {"IDs": [ids[1]], "Mailbox": "alice@example.test"}
    new = [e.data for e in events if e.kind == "message.new"]
    assert {n["ID"] for n in new} == set(ids) and new[0]["Mailbox"] == "alice@example.test"


def test_imap_sees_a_change_when_the_api_answers_without_waiting_for_its_poll(start_server):
    """On a clock that never moves, the session's once-a-second poll never comes."""
    server = start_server(clock=Clock(), kinds=("smtp", "web", "imap"))
    port = server.port("web")
    send(server, subject="A")
    send(server, subject="B")
    ids = [m["ID"] for m in listing(port)["messages"]]
    imap = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    imap.login("alice@example.test", "x")
    imap.select("INBOX")
    assert call(port, "PUT", "/api/v1/messages", {"IDs": ids[:1], "Read": True}).body == b"ok"
    assert imap.search(None, "SEEN")[1] == [b"2"]
    imap.store("1", "+FLAGS", "\\Seen")
    assert listing(port)["unread"] == 0  # and IMAP's \Seen is Read here
    assert call(port, "DELETE", "/api/v1/messages", {"IDs": ids[1:]}).body == b"ok"
    # The expunge is known (A, message 1, is out of the search) but not yet announced.
    assert imap.search(None, "ALL")[1] == [b"2"]
    imap.noop()
    assert imap.search(None, "ALL")[1] == [b"1"]
    imap.logout()


def _plant(data: Any, mailbox: str, n: int, subject: str = "Planted") -> list[Any]:
    """Messages written straight into a Maildir's new/ (as another delivery agent would)."""
    local, _, domain = mailbox.partition("@")
    new = data / "mail" / domain / local / "new"
    for sub in ("new", "cur", "tmp"):
        (new.parent / sub).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = new / f"1700000000.M{i}P1Q{i}.planted"
        path.write_bytes(f"From: a@example.org\nSubject: {subject} {i}\n\nbody {i}\n".encode())
        paths.append(path)
    return paths


def test_summaries_are_parsed_once_per_file_and_a_large_mailbox_lists_fast(web, tmp_path):
    port = web.port("web")
    [first] = _plant(tmp_path / "data", "dave@example.test", 1, "Original")
    assert listing(port)["messages"][0]["Subject"] == "Original 0"
    # Maildir files never change: a listing trusts what it parsed (by file name).
    first.write_bytes(b"Subject: Rewritten\n\nx\n")
    assert listing(port)["messages"][0]["Subject"] == "Original 0"
    _plant(tmp_path / "data", "erin@example.test", 5000)
    started = time.monotonic()
    cold = listing(port, "/api/v1/messages?limit=1000")
    parsed = time.monotonic() - started
    started = time.monotonic()
    warm = listing(port, "/api/v1/search?query=" + quote("subject:planted -is:read") + "&limit=10")
    cached = time.monotonic() - started
    print(f"5,001 messages: first listing {parsed:.2f} s, a search after it {cached:.2f} s")
    assert cold["total"] == 5001 and warm["messages_count"] == 5000
    assert cached < 2.0  # what the cache saves is shown above: the file rewritten is not re-read


def test_hostile_messages_list_and_open_without_errors(web, tmp_path):
    """Garbage, undecodable bytes and 6,000 nested multiparts: shown (quickly), never a 500."""
    deep = b"Subject: deep\nContent-Type: multipart/mixed; boundary=b0\n\n"
    deep += b"".join(b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i, i + 1)
                     for i in range(6000)) + b"--b6000\nContent-Type: text/plain\n\nbottom\n"
    hostile = [
        deep,
        bytes(range(256)) * 20,
        b"Subject: caf\xe9 \xff\nFrom: J\xf6rg <j@example.org>\nDate: not a date\n\n\xff\xfe body\n",
        b"Subject: =?utf-8?b?!!!?=\nContent-Type: text/plain; charset=x-unknown\n"
        b"Content-Transfer-Encoding: base64\n\n!!!!not base64\n",
        b"",
        b"Content-Type: multipart/mixed; boundary=x\n\n--x\nContent-Type: text/html\n"
        b'Content-Disposition: attachment; filename="a\\"b\r\n.html"\n\n<script>x</script>\n--x--\n',
    ]
    paths = _plant(tmp_path / "data", "mallory@example.test", len(hostile))
    for path, data in zip(paths, hostile):
        path.write_bytes(data)
    started = time.monotonic()
    page = listing(port := web.port("web"))
    assert page["total"] == len(hostile) and time.monotonic() - started < 3
    by_subject = {m["Subject"]: m for m in page["messages"]}
    assert "caf\ufffd \ufffd" in by_subject and "deep" in by_subject
    # Undecodable bytes become U+FFFD, never lone surrogates (invalid in JSON text for strict readers).
    assert by_subject["caf\ufffd \ufffd"]["From"] == {"Name": "J\ufffdrg", "Address": "j@example.org"}
    for m in page["messages"]:
        for suffix in ("", "/headers", "/raw"):
            assert get(port, f"/api/v1/message/{m['ID']}{suffix}").status == 200, (m, suffix)
        full = get(port, f"/api/v1/message/{m['ID']}").json
        for att in full["Attachments"]:
            part = get(port, f"/api/v1/message/{m['ID']}/part/{att['PartID']}")
            assert part.status == 200 and "sandbox" in part.headers["content-security-policy"]
            assert '"' not in part.headers["content-disposition"].split('filename="')[1][:-1]


def _wait_in_thread(port: int, path: str, results: list) -> threading.Thread:
    def run() -> None:
        reply = get(port, path, timeout=30)
        results.append((time.monotonic(), reply))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _timer_at(clock: Any, seconds: float, deadline: float = 10.0) -> None:
    """Wait until the server has armed a timer C{seconds} from now (the wait is registered)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        calls = in_reactor(lambda: [c.getTime() - clock.seconds() for c in clock.getDelayedCalls()])
        if any(abs(c - seconds) < 0.5 for c in calls):
            return
        time.sleep(0.005)
    raise AssertionError(f"no timer at +{seconds} s: {calls}")


def test_wait_answers_within_100_ms_of_delivery(web):
    port = web.port("web")
    send(web, subject="Old one")
    results: list = []
    thread = _wait_in_thread(port, "/api/v1/messages/wait?query=" + quote("subject:Awaited")
                             + "&count=2&timeout=137", results)
    _timer_at(reactor, 137)
    send(web, subject="Awaited 1")
    assert not results  # one of two
    send(web, subject="Awaited 2")
    delivered = time.monotonic()
    thread.join(10)
    answered, reply = results[0]
    assert reply.status == 200, reply.body
    assert reply.json["messages_count"] == 2
    assert {m["Subject"] for m in reply.json["messages"]} == {"Awaited 1", "Awaited 2"}
    print(f"wait answered {1000 * (answered - delivered):.1f} ms after the delivery's 250")
    assert answered - delivered < 0.1
    # Already there: it answers at once.
    assert get(port, "/api/v1/messages/wait?query=subject:Old").json["messages_count"] == 1


def test_wait_times_out_with_408_on_the_injected_clock(start_server):
    clock = Clock()
    server = start_server(clock=clock, kinds=("smtp", "web"))
    port = server.port("web")
    results: list = []
    thread = _wait_in_thread(port, "/api/v1/messages/wait?query=subject:never&timeout=123", results)
    _timer_at(clock, 123)
    server.advance(122.5)
    send(server, subject="Something else")
    thread.join(0.2)
    assert not results
    server.advance(1)
    thread.join(10)
    _, reply = results[0]
    assert reply.status == 408 and "123" in reply.json["Error"]
    for bad in ("timeout=0", "timeout=301", "timeout=nan", "count=0", "count=x", "query=%22"):
        assert get(port, f"/api/v1/messages/wait?{bad}").status == 400, bad


def test_a_waiting_client_that_leaves_cancels_its_timer(start_server):
    import socket
    clock = Clock()
    server = start_server(clock=clock, kinds=("smtp", "web"))
    port = server.port("web")
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /api/v1/messages/wait?timeout=211 HTTP/1.1\r\nHost: x\r\n\r\n")
    _timer_at(clock, 211)
    sock.close()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        left = in_reactor(lambda: [c.getTime() - clock.seconds() for c in clock.getDelayedCalls()])
        if not any(abs(c - 211) < 0.5 for c in left):
            break
        time.sleep(0.005)
    else:
        raise AssertionError("the timer of a client that left is still armed")


@pytest.fixture
def site(start_server, accounts):
    return start_server(site=True, kinds=("smtp", "web"), web__admins=["alice@example.test"])


def test_site_mode_each_account_sees_its_own_mailbox(site):
    port = site.port("web")
    send(site, to="alice@example.test", subject="For Alice")
    send(site, to="bob@example.test", subject="For Bob")
    alice, bob = basic("alice@example.test", "alice-secret"), basic("bob@example.test", "bob-secret")
    assert get(port, "/api/v1/messages").status == 401
    bobs = listing(port, headers=bob)
    assert [m["Subject"] for m in bobs["messages"]] == ["For Bob"] and bobs["total"] == 1
    everything = listing(port, headers=alice)  # alice is an administrator
    assert sorted(m["Subject"] for m in everything["messages"]) == ["For Alice", "For Bob"]
    alices_id = next(m["ID"] for m in everything["messages"] if m["Subject"] == "For Alice")
    for suffix in ("", "/headers", "/raw", "/part/1"):
        assert get(port, f"/api/v1/message/{alices_id}{suffix}", headers=bob).status == 404
    assert get(port, f"/view/{alices_id}.txt", headers=bob).status == 404
    assert call(port, "DELETE", "/api/v1/messages", {"IDs": [alices_id]}, headers=bob).status == 404
    assert get(port, "/api/v1/messages?mailbox=alice@example.test", headers=bob).status == 403
    assert call(port, "DELETE", "/api/v1/messages", headers=bob).status == 200  # all of *his*
    assert listing(port, headers=alice)["total"] == 1
    assert get(port, "/api/v1/message/latest", headers=bob).status == 404
    assert get(port, f"/api/v1/message/{alices_id}", headers=alice).json["Subject"] == "For Alice"


def test_site_mode_wait_sees_only_the_callers_mailbox(start_server, accounts):
    clock = Clock()
    server = start_server(site=True, clock=clock, kinds=("smtp", "web"))
    port = server.port("web")
    bob = basic("bob@example.test", "bob-secret")
    results: list = []

    def run() -> None:
        results.append(get(port, "/api/v1/messages/wait?timeout=55", headers=bob, timeout=30))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _timer_at(clock, 55)
    send(server, to="alice@example.test", subject="Not for Bob")
    thread.join(0.3)
    assert not results
    send(server, to="bob@example.test", subject="For Bob")
    thread.join(10)
    assert [m["Subject"] for m in results[0].json["messages"]] == ["For Bob"]
    assert get(port, "/api/v1/messages/wait?mailbox=alice@example.test", headers=bob).status == 403
