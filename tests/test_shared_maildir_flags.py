"""
Flag changes through two servers sharing one Maildir. A STORE renames a
message's file from the flags its name has on disk at that moment
(Maildir's rule, and Dovecot's), applying only the change asked for
(+FLAGS/-FLAGS; FLAGS replaces with the given set): a flag the other
server set meanwhile, a keyword, the web's read mark stay, and a POP3
deletion stays done.

Two kinds of pair: two servers in this process on one data directory
whose folder polls never run (their clocks stand still), so each one's
index is surely behind the other's change when it stores; and two
`twistd -n mailscreen` processes (as in tests/test_shared_maildir.py),
storing at the same time.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import smtplib
import ssl
import threading
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from test_shared_maildir import imap_login, node, stop
from twisted_mail_screen.protocols.imap.store import store_files_locked
from twisted_mail_screen.testing import RunningServer
from test_twistd import pytestmark as twistd_only
from webclient import call

KINDS = ("smtp", "imap", "pop3", "web")
USER = "shared@example.com"  # the user test_shared_maildir's nodes log in as
ALL_FLAGS = {"\\Answered", "\\Draft", "\\Flagged", "\\Seen"}


def inbox(tmp_path: Path) -> Path:
    return tmp_path / "data/mail/example.com/shared"


def letters_on_disk(tmp_path: Path) -> dict[str, str]:
    """Base name -> the flag letters of every message file in INBOX."""
    out = {}
    for sub in ("new", "cur"):
        for name in os.listdir(inbox(tmp_path) / sub):
            base, _, info = name.partition(":2,")
            assert base not in out, f"{base} twice on disk"
            out[base] = info
    return out


def deliver(port: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        for i in range(count):
            assert s.sendmail("a@example.org", [USER], f"Subject: m{i}\r\n\r\nbody\r\n".encode()) == {}


def login(where: RunningServer | int) -> imaplib.IMAP4:
    """
    A session with INBOX selected: on a twistd node's port, or on a server
    (inside STARTTLS when it has TLS).
    """
    if isinstance(where, int):
        c = imap_login(where)
    else:
        c = imaplib.IMAP4("127.0.0.1", where.port("imap"), timeout=30)
        if where.config.tls.enabled:
            context = ssl.create_default_context(cafile=where.config.tls.certificate)
            context.check_hostname = False
            c.starttls(ssl_context=context)
        c.login(USER, "whatever")
    assert c.select("INBOX")[0] == "OK"
    return c


def store(c: imaplib.IMAP4, uid: int | str, mode: str, flags: str) -> None:
    typ, data = c.uid("STORE", str(uid), mode, flags)
    assert typ == "OK", data


def flags_seen(c: imaplib.IMAP4) -> dict[int, set[str]]:
    """UID -> flags, as this server's index has them after looking at the folder (NOOP)."""
    assert c.noop()[0] == "OK"
    c.untagged_responses.clear()  # the NOOP's own FETCH lines
    typ, data = c.uid("FETCH", "1:*", "(UID FLAGS)")
    assert typ == "OK"
    out = {}
    for item in data:
        m = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)|FLAGS \(([^)]*)\) UID (\d+)", item)
        uid = int(m.group(1) or m.group(4))
        out[uid] = set((m.group(2) or m.group(3) or b"").decode().split()) - {"\\Recent"}
    return out


@pytest.fixture(params=["plain", "starttls"])
def pair(request, start_server, tmp_path, certificate):
    """
    Two servers on one data directory; neither polls the folder by itself
    (clocks stand still); their IMAP sessions in the clear or inside STARTTLS.
    """
    cert, key = certificate
    tls = {"tls__certificate": cert, "tls__key": key} if request.param == "starttls" else {}
    return tuple(start_server(kinds=KINDS, clock=Clock(), control_socket=str(tmp_path / f"{n}.sock"), **tls)
                 for n in "ab")


@pytest.fixture
def sessions(pair):
    """
    C{sessions(count)}: C{count} messages delivered through A, then an IMAP
    session with INBOX selected on each server (A's, B's); both logged out
    when the test ends.
    """
    opened: list[imaplib.IMAP4] = []

    def open_both(count: int) -> tuple[imaplib.IMAP4, imaplib.IMAP4]:
        a, b = pair
        deliver(a.port("smtp"), count)
        opened.extend((login(a), login(b)))
        return opened[0], opened[1]

    yield open_both
    for c in opened:
        try:
            c.logout()
        except (imaplib.IMAP4.error, OSError):  # a session the test closed, or a failed test's
            pass


def test_flags_stored_through_two_servers_in_turn_are_all_kept(sessions, tmp_path):
    """Each STORE comes from an index that has not seen the other server's change."""
    ca, cb = sessions(10)
    for uid in range(1, 11):
        store(cb, uid, "+FLAGS", "(\\Flagged)")
        store(ca, uid, "+FLAGS", "(\\Seen)")      # A's index: no \Flagged
    for uid in range(1, 11):
        store(ca, uid, "+FLAGS", "(\\Answered)")
        store(cb, uid, "+FLAGS", "(\\Draft)")     # B's index: no \Seen, no \Answered
    assert sorted(letters_on_disk(tmp_path).values()) == ["DFRS"] * 10
    assert flags_seen(ca) == flags_seen(cb) == {uid: ALL_FLAGS for uid in range(1, 11)}


def test_plus_and_minus_of_different_flags_through_two_servers(sessions, tmp_path):
    ca, cb = sessions(6)
    store(ca, "1:*", "+FLAGS", "(\\Flagged \\Seen)")
    flags_seen(cb)  # B knows both flags on every message
    for uid in range(1, 7):
        store(cb, uid, "-FLAGS", "(\\Flagged)")
        store(ca, uid, "-FLAGS", "(\\Seen)")      # A's index still has \Flagged: not put back
    for uid in range(1, 7):
        store(ca, uid, "+FLAGS", "(\\Answered)")
        store(cb, uid, "+FLAGS", "(\\Draft)")     # B's index still has \Seen: not put back
    assert sorted(letters_on_disk(tmp_path).values()) == ["DR"] * 6
    # A flag B's index already shows, removed by A meanwhile: B's +FLAGS still sets it.
    store(ca, "1:3", "-FLAGS", "(\\Answered)")
    store(cb, "1:3", "+FLAGS", "(\\Answered)")
    # A replace sets exactly the given set, whatever the other server set meanwhile.
    store(cb, 6, "+FLAGS", "(\\Seen)")
    store(ca, 6, "FLAGS", "(\\Flagged)")
    assert [v for _, v in sorted(letters_on_disk(tmp_path).items())] == ["DR"] * 5 + ["F"]
    want = {uid: {"\\Answered", "\\Draft"} for uid in range(1, 6)} | {6: {"\\Flagged"}}
    assert flags_seen(ca) == flags_seen(cb) == want


def test_a_keyword_set_on_one_server_is_kept_when_the_other_stores_seen(sessions, tmp_path):
    ca, cb = sessions(5)
    store(cb, "1:*", "+FLAGS", "($Important)")  # B writes dovecot-keywords; A's table is empty
    for uid in range(1, 6):
        store(ca, uid, "+FLAGS", "(\\Seen)")
    assert (inbox(tmp_path) / "dovecot-keywords").read_text() == "0 $Important\n"
    assert sorted(letters_on_disk(tmp_path).values()) == ["Sa"] * 5
    store(ca, 1, "-FLAGS", "(\\Seen)")
    store(cb, 1, "+FLAGS", "(\\Flagged)")           # B's index: no \Seen to put back
    want = {uid: {"\\Seen", "$Important"} for uid in range(2, 6)} | {1: {"\\Flagged", "$Important"}}
    assert flags_seen(ca) == flags_seen(cb) == want


def test_web_read_and_pop3_deletion_on_one_server_are_not_undone_by_the_others_store(pair, tmp_path):
    a, b = pair
    deliver(a.port("smtp"), 4)
    ca = login(a)
    assert call(b.port("web"), "PUT", "/api/v1/messages", {"Read": True}).status == 200
    store(ca, "1:*", "+FLAGS", "(\\Flagged)")       # A's index: none read
    assert sorted(letters_on_disk(tmp_path).values()) == ["FS"] * 4
    # B's POP3 session deletes message 1; A renames its file before B's QUIT removes it.
    pop = poplib.POP3("127.0.0.1", b.port("pop3"), timeout=10)
    pop.user(USER)
    pop.pass_("x")
    pop.dele(1)
    store(ca, 1, "+FLAGS", "(\\Answered)")
    pop.quit()
    # B's POP3 deletes message 2 outright; A's STORE after it makes no file again.
    pop = poplib.POP3("127.0.0.1", b.port("pop3"), timeout=10)
    pop.user(USER)
    pop.pass_("x")
    pop.dele(1)
    pop.quit()
    store(ca, 2, "+FLAGS", "(\\Answered)")
    assert sorted(letters_on_disk(tmp_path).values()) == ["FS"] * 2
    assert flags_seen(ca) == {3: {"\\Flagged", "\\Seen"}, 4: {"\\Flagged", "\\Seen"}}
    ca.logout()


@twistd_only
def test_flags_stored_through_two_twistd_nodes_at_once_are_all_kept(tmp_path):
    """
    Two processes store different flags on the same messages at the same
    time (each node's poll runs every second, so its index is often behind).
    """
    a, ports_a = node(tmp_path, "a")
    b, ports_b = node(tmp_path, "b")
    try:
        deliver(ports_a["smtp"], 20)
        ca, cb = login(ports_a["imap"]), login(ports_b["imap"])
        errors: list[BaseException] = []

        def writer(c: imaplib.IMAP4, plan: list[tuple[str, str]]) -> None:
            try:
                for mode, flags in plan:
                    for uid in range(1, 21):
                        store(c, uid, mode, flags)
            except BaseException as e:  # reported by the test thread
                errors.append(e)

        plan_a = [("+FLAGS", "(\\Seen)"), ("+FLAGS", "(\\Answered)"), ("-FLAGS", "(\\Draft)")]
        plan_b = [("+FLAGS", "(\\Flagged)"), ("+FLAGS", "($Label)"), ("+FLAGS", "(\\Draft)")]
        threads = [threading.Thread(target=writer, args=(ca, plan_a)),
                   threading.Thread(target=writer, args=(cb, plan_b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        on_disk = letters_on_disk(tmp_path)
        assert len(on_disk) == 20
        for info in on_disk.values():
            # A's -\Draft and B's +\Draft race per message; every other flag is set by one side only.
            assert set(info) - {"D"} == set("FRSa"), on_disk
        seen_a, seen_b = flags_seen(ca), flags_seen(cb)
        assert seen_a == seen_b
        assert all(f - {"\\Draft"} == ALL_FLAGS - {"\\Draft"} | {"$Label"} for f in seen_a.values()), seen_a
        ca.logout()
        cb.logout()
    finally:
        stop(a, b)


@pytest.mark.parametrize("count", [3, 300])  # a stat per message, or one listing for them all
def test_messages_the_index_thinks_unchanged_are_looked_at_on_disk(tmp_path, count):
    """
    The index says every message is already \\Seen, so +FLAGS (\\Seen)
    would change nothing; on disk another process took \\Seen off every
    third one meanwhile: those get it back, the rest are left alone.
    """
    box = tmp_path / "box"
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    rows = []
    for i in range(count):
        base = f"1700000000.M{i}P1.host,S=10,W=11"
        (box / "cur" / f"{base}:2,{'F' if i % 3 == 0 else 'FS'}").touch()
        rows.append((i + 1, f"cur/{base}:2,FS"))
    # Nothing to tell the index: every name is now the one it has.
    assert store_files_locked(str(box), rows, "+", ["\\Seen"], [], None) == []
    assert sorted(os.listdir(box / "cur")) == sorted(rel[4:] for _, rel in rows)


@pytest.mark.parametrize("command", ["COPY", "MOVE"])
def test_a_copy_or_move_carries_the_flags_another_server_set(sessions, tmp_path, command):
    ca, cb = sessions(2)
    assert ca.create("Kept")[0] == "OK"
    store(cb, "1:2", "+FLAGS", "(\\Flagged)")    # A's index: not flagged
    typ, data = ca.uid(command, "1:2", "Kept")
    assert typ == "OK", data
    kept = [n.partition(":2,")[2] for n in os.listdir(inbox(tmp_path) / ".Kept/cur")]
    assert kept == ["F", "F"]


def test_expunge_spares_a_message_the_other_server_took_deleted_off(sessions, tmp_path):
    ca, cb = sessions(3)
    store(ca, "1:3", "+FLAGS", "(\\Deleted)")
    flags_seen(cb)
    store(cb, 2, "-FLAGS", "(\\Deleted)")          # A's index: still \Deleted
    store(cb, 3, "+FLAGS", "(\\Seen)")             # still \Deleted, under another name
    assert ca.expunge()[0] == "OK"
    assert list(letters_on_disk(tmp_path).values()) == [""]
    assert flags_seen(ca) == flags_seen(cb) == {2: set()}
