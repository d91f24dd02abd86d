"""UIDs are the contract: stable across sessions and restarts, never reused, given to every file."""

from __future__ import annotations

import imaplib
import os
import poplib
import smtplib

import pytest

KINDS = ("smtp", "pop3", "imap")
USER = "bob@localhost"


def login(server) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login(USER, "x")
    return m


def send(server, subject: str) -> None:
    s = smtplib.SMTP("127.0.0.1", server.port("smtp"))
    s.sendmail("a@example.org", [USER], f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    s.quit()


def uid_map(m) -> dict[int, str]:
    """UID -> subject of every message in the selected folder."""
    typ, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    out = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(item[0].split(b"UID ")[1].split()[0])
            out[uid] = item[1].decode().strip().removeprefix("Subject: ")
    return out


def validity(m, box="INBOX") -> int:
    typ, data = m.status(box, "(UIDVALIDITY)")
    return int(data[0].split(b"UIDVALIDITY ")[1].rstrip(b")"))


@pytest.fixture
def server(start_server):
    return start_server(kinds=KINDS)


def inbox(tmp_path):
    return tmp_path / "data" / "mail" / "localhost" / "bob"


def test_uids_stable_across_sessions_and_restarts(server, start_server, tmp_path):
    for i in range(3):
        send(server, f"m{i}")
    m = login(server)
    m.select("INBOX")
    first = uid_map(m)
    v = validity(m)
    assert first == {1: "m0", 2: "m1", 3: "m2"}
    m.logout()
    m = login(server)
    m.select("INBOX")
    assert uid_map(m) == first
    m.logout()
    server.stop()
    again = start_server(kinds=KINDS)
    send(again, "m3")
    m = login(again)
    m.select("INBOX")
    assert uid_map(m) == {**first, 4: "m3"}
    assert validity(m) == v
    m.logout()
    text = (inbox(tmp_path) / "dovecot-uidlist").read_text().splitlines()
    assert text[0] == f"3 V{v} N5" and text[1].startswith("1 :") and len(text) == 5


def test_uids_not_reused_after_expunge_even_after_restart(server, start_server):
    for i in range(3):
        send(server, f"m{i}")
    m = login(server)
    m.select("INBOX")
    m.store("2:3", "+FLAGS.SILENT", "\\Deleted")
    m.expunge()
    m.logout()
    server.stop()
    again = start_server(kinds=KINDS)
    send(again, "m3")
    m = login(again)
    m.select("INBOX")
    assert uid_map(m) == {1: "m0", 4: "m3"}
    assert m.response("UIDNEXT")[1] == [b"5"]
    m.logout()


def test_hand_written_file_gets_a_uid(server, tmp_path):
    send(server, "via smtp")
    m = login(server)
    m.select("INBOX")
    assert uid_map(m) == {1: "via smtp"}
    new = inbox(tmp_path) / "new"
    (new / "1234567890.handwritten.host").write_bytes(b"Subject: by hand\n\nhello\n")
    m.response("EXISTS")  # forget SELECT's EXISTS: only what NOOP reports counts
    m.noop()
    assert m.response("EXISTS") == ("EXISTS", [b"2"])
    assert uid_map(m) == {1: "via smtp", 2: "by hand"}
    typ, data = m.fetch("2", "(RFC822.SIZE)")
    assert b"RFC822.SIZE 27" in data[0]  # computed with CRLF line endings
    # also a file dropped straight into cur/ with flags
    (inbox(tmp_path) / "cur" / "1234567891.other.host:2,FS").write_bytes(b"Subject: cur\n\nx\n")
    m.noop()
    typ, data = m.fetch("3", "(UID FLAGS)")
    assert b"UID 3" in data[0] and b"\\Flagged" in data[0] and b"\\Seen" in data[0]
    m.logout()


def test_corrupt_uidlist_gives_new_uidvalidity(server, start_server, tmp_path):
    send(server, "a")
    send(server, "b")
    m = login(server)
    m.select("INBOX")
    v = validity(m)
    m.logout()
    server.stop()
    (inbox(tmp_path) / "dovecot-uidlist").write_text("3 V123 N9\nnot a line\n")
    again = start_server(kinds=KINDS)
    m = login(again)
    m.select("INBOX")
    v2 = validity(m)
    assert v2 != v and v2 > 123
    assert sorted(uid_map(m).values()) == ["a", "b"]
    m.logout()
    again.stop()
    os.unlink(inbox(tmp_path) / "dovecot-uidlist")
    third = start_server(kinds=KINDS)
    m = login(third)
    m.select("INBOX")
    assert validity(m) not in (v, v2)
    m.logout()


def test_flags_survive_and_other_maildir_tools_see_them(server, tmp_path):
    send(server, "a")
    m = login(server)
    m.select("INBOX")
    m.store("1", "+FLAGS", "(\\Seen \\Answered)")
    m.logout()
    (name,) = os.listdir(inbox(tmp_path) / "cur")
    assert name.endswith(":2,RS")
    os.rename(inbox(tmp_path) / "cur" / name, inbox(tmp_path) / "cur" / (name[:-2] + "FT"))
    m = login(server)
    m.select("INBOX")
    typ, data = m.fetch("1", "(UID FLAGS)")
    assert b"UID 1" in data[0] and b"\\Flagged" in data[0] and b"\\Deleted" in data[0]
    m.logout()


def test_pop3_deletion_is_seen_as_expunge(server):
    for i in range(3):
        send(server, f"m{i}")
    m = login(server)
    m.select("INBOX")
    assert len(uid_map(m)) == 3
    p = poplib.POP3("127.0.0.1", server.port("pop3"))
    p.user(USER)
    p.pass_("x")
    p.dele(2)
    p.quit()
    m.noop()
    assert m.untagged_responses.pop("EXPUNGE") == [b"2"]
    assert uid_map(m) == {1: "m0", 3: "m2"}
    send(server, "m3")
    m.noop()
    assert uid_map(m) == {1: "m0", 3: "m2", 4: "m3"}
    m.logout()


def test_new_mail_claimed_as_recent_once(server, tmp_path):
    send(server, "a")
    m1 = login(server)
    m1.select("INBOX")
    assert m1.untagged_responses["RECENT"] == [b"1"]
    assert not os.listdir(inbox(tmp_path) / "new")  # moved to cur/ by the claiming session
    m2 = login(server)
    m2.select("INBOX")
    assert m2.untagged_responses["RECENT"] == [b"0"]
    m1.logout()
    m2.logout()


def test_uid_fetch_star_on_range_past_end(server):
    for i in range(2):
        send(server, f"m{i}")
    m = login(server)
    m.select("INBOX")
    typ, data = m.uid("FETCH", "10:*", "(UID)")
    assert data == [b"2 (UID 2)"]
    typ, data = m.uid("SEARCH", None, "UID", "10:*")
    assert data == [b"2"]
    m.logout()


def test_recreated_mailbox_gets_new_uidvalidity(server):
    m = login(server)
    m.create("Tmp")
    m.append("Tmp", None, None, b"Subject: t\r\n\r\nx\r\n")
    other = login(server)
    other.select("Tmp")
    v = validity(m, "Tmp")
    assert m.delete("Tmp")[0] == "OK"
    m.create("Tmp")
    other.noop()  # the session that had it selected sees the messages go
    assert other.untagged_responses.pop("EXPUNGE", None) == [b"1"]
    assert validity(m, "Tmp") != v
    m.append("Tmp", None, None, b"Subject: t2\r\n\r\nx\r\n")
    assert m.response("APPENDUID")[1][0].split()[1] == b"1"
    other.logout()
    m.logout()


def test_append_and_copy_append_to_the_map_then_restart_compacts_it(server, start_server, tmp_path):
    send(server, "m0")
    m = login(server)
    m.select("INBOX")
    m.store("1", "+FLAGS.SILENT", "\\Deleted")
    m.expunge()  # the map still has a line for UID 1 until the next rewrite
    for i in range(3):
        assert m.append("INBOX", None, None, f"Subject: a{i}\r\n\r\nx\r\n".encode())[0] == "OK"
    assert m.uid("COPY", "2:3", "INBOX")[0] == "OK"
    v = validity(m)
    m.logout()
    path = inbox(tmp_path) / "dovecot-uidlist"
    lines = path.read_text().splitlines()
    assert [l.split()[0] for l in lines[1:]] == ["1", "2", "3", "4", "5", "6"]  # appended, not rewritten
    assert lines[0] == f"3 V{v} N2"
    server.stop()
    again = start_server(kinds=KINDS)
    m = login(again)
    m.select("INBOX")
    assert uid_map(m) == {2: "a0", 3: "a1", 4: "a2", 5: "a0", 6: "a1"}
    assert validity(m) == v and m.response("UIDNEXT")[1] == [b"7"]
    m.logout()
    lines = path.read_text().splitlines()
    assert lines[0] == f"3 V{v} N7" and len(lines) == 6  # rewritten once, without UID 1
