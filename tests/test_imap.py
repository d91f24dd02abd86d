"""The IMAP server over real sockets with imaplib: login, folders, FETCH, STORE, SEARCH, UIDPLUS."""

from __future__ import annotations

import base64
import imaplib
import os
import re
import smtplib
import socket
import ssl
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from tests.conftest import LineReader

KINDS = ("smtp", "pop3", "imap")
USER = "bob@localhost"


def connect(server) -> imaplib.IMAP4:
    return imaplib.IMAP4("127.0.0.1", server.port("imap"))


def login(server, user: str = USER, password: str = "x") -> imaplib.IMAP4:
    m = connect(server)
    m.login(user, password)
    return m


def send(server, to: str = USER, subject: str = "hello", body: str = "body text\r\n",
         extra: str = "") -> None:
    s = smtplib.SMTP("127.0.0.1", server.port("smtp"))
    s.sendmail("sender@example.org", [to],
               f"From: Sender <sender@example.org>\r\nTo: {to}\r\nSubject: {subject}\r\n"
               f"Date: Mon, 7 Feb 2022 10:00:00 +0000\r\n{extra}\r\n{body}".encode())
    s.quit()


class Raw(LineReader):
    """A bare socket client for exact protocol checks."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.until(tag)

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(start_server):
    return start_server(kinds=KINDS)


# login, capabilities, TLS ---------------------------------------------------------------


def test_greeting_and_capabilities(server):
    m = connect(server)
    caps = set(m.capabilities)
    for cap in ("IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "UNSELECT", "NAMESPACE", "SPECIAL-USE",
                "LITERAL+", "ID", "ENABLE", "AUTH=PLAIN", "SASL-IR", "CHILDREN"):
        assert cap in caps
    assert "STARTTLS" not in caps  # no certificate configured
    assert "LOGINDISABLED" not in caps  # loopback plaintext is allowed by default
    m.logout()


def test_login_test_host_any_password_creates_mailbox(server, tmp_path):
    m = login(server, "newuser@localhost", "whatever")
    typ, _ = m.select("INBOX")
    assert typ == "OK"
    assert (tmp_path / "data" / "mail" / "localhost" / "newuser" / "cur").is_dir()
    m.logout()


def test_authenticate_plain_with_and_without_initial_response(server):
    m = connect(server)
    typ, _ = m.authenticate("PLAIN", lambda _: b"\0bob@localhost\0pw")
    assert typ == "OK"
    m.logout()
    r = Raw(server.port("imap"))
    token = base64.b64encode(b"\0bob@localhost\0pw")
    assert r.command(b"a1", b"AUTHENTICATE PLAIN " + token)[-1].startswith(b"a1 OK")
    r.close()


def test_site_mode_password_checked(start_server, accounts):
    server = start_server(site=True, kinds=KINDS)
    m = connect(server)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        m.login("alice@example.test", "wrong")
    m.login("alice@example.test", "alice-secret")
    assert m.select("INBOX")[0] == "OK"
    m.logout()


def test_logindisabled_without_tls(start_server, accounts):
    server = start_server(site=True, kinds=KINDS, plaintext_auth="never")
    r = Raw(server.port("imap"))
    assert b"LOGINDISABLED" in r.greeting and b"AUTH=PLAIN" not in r.greeting
    reply = r.command(b"a1", b"LOGIN alice@example.test alice-secret")
    assert reply[-1].startswith(b"a1 NO [PRIVACYREQUIRED]")
    reply = r.command(b"a2", b"AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice@example.test\0alice-secret"))
    assert reply[-1].startswith(b"a2 NO")
    r.close()


def test_starttls_then_login(start_server, accounts, certificate):
    cert, key = certificate
    server = start_server(site=True, kinds=KINDS, plaintext_auth="never",
                          tls__certificate=cert, tls__key=key)
    m = connect(server)
    assert "STARTTLS" in m.capabilities and "LOGINDISABLED" in m.capabilities
    ctx = ssl.create_default_context(cafile=cert)
    ctx.check_hostname = False
    m.starttls(ssl_context=ctx)
    assert "LOGINDISABLED" not in m.capabilities and "STARTTLS" not in m.capabilities
    m.login("alice@example.test", "alice-secret")
    m.select("INBOX")
    m.append("INBOX", None, None, b"Subject: over tls\r\n\r\n" + b"x" * 200000 + b"\r\n")
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    assert len(data[0][1]) > 200000
    m.logout()


# bad input ---------------------------------------------------------------------------------


def test_malformed_commands_get_bad(server):
    r = Raw(server.port("imap"))
    assert r.command(b"a1", b"FROBNICATE")[-1].startswith(b"a1 BAD")
    assert r.command(b"a2", b"LOGIN \"unterminated")[-1].startswith(b"a2 BAD")
    assert r.command(b"a3", b"SELECT INBOX")[-1].startswith(b"a3 BAD")  # not logged in
    r.send(b"\r\n")
    assert r.command(b"a4", b"LOGIN bob@localhost pw")[-1].startswith(b"a4 OK")
    assert r.command(b"a5", b"SELECT INBOX")[-1].startswith(b"a5 OK")
    assert r.command(b"a6", b"FETCH x:y FLAGS")[-1].startswith(b"a6 BAD")
    assert r.command(b"a7", b"FETCH 1 (FLAGS")[-1].startswith(b"a7 BAD")
    assert r.command(b"a8", b"FETCH 1 NOSUCHATT")[-1].startswith(b"a8 BAD")
    assert r.command(b"a9", b"SEARCH FOOBAR")[-1].startswith(b"a9 BAD")
    assert r.command(b"b1", b"STORE 1 +FLAGS (\\Bogus)")[-1].startswith(b"b1 BAD")
    assert r.command(b"b2", b"UID FROB 1")[-1].startswith(b"b2 BAD")
    r.send(b"b3 NOOP " + b"x" * 100000 + b"\r\n")
    assert b"BAD" in r.line()
    assert r.command(b"b4", b"NOOP")[-1].startswith(b"b4 OK")
    r.close()


def test_literal_too_large_is_refused_before_it_is_read(start_server):
    server = start_server(kinds=KINDS, imap__max_literal_size=2048)
    r = Raw(server.port("imap"))
    r.command(b"a1", b"LOGIN bob@localhost pw")
    r.send(b"a2 APPEND INBOX {5000}\r\n")
    assert r.line().startswith(b"a2 NO [TOOBIG]")
    # a non-synchronizing literal that is too large is skipped, not stored
    r.send(b"a3 APPEND INBOX {5000+}\r\n" + b"x" * 5000 + b"\r\n")
    assert r.line().startswith(b"a3 NO [TOOBIG]")
    assert r.command(b"a4", b"NOOP")[-1].startswith(b"a4 OK")
    # a literal within the limit works, synchronizing and LITERAL+
    r.send(b"a5 APPEND INBOX {20}\r\n")
    assert r.line().startswith(b"+")
    r.send(b"Subject: s\r\n\r\nbody\r\n\r\n")
    assert r.until(b"a5")[-1].startswith(b"a5 OK [APPENDUID")
    r.send(b"a6 APPEND INBOX (\\Seen) {20+}\r\nSubject: t\r\n\r\nbody\r\n\r\n")
    assert r.until(b"a6")[-1].startswith(b"a6 OK [APPENDUID")
    # a big literal outside APPEND is refused too
    r.send(b"a7 LOGIN {100000}\r\n")
    assert r.line().startswith(b"a7 BAD")
    r.close()


def test_literals_in_login_and_quoted_escapes(server):
    r = Raw(server.port("imap"))
    r.send(b"a1 LOGIN {14}\r\n")
    assert r.line().startswith(b"+")
    r.send(b"bob@localhost \"p\\\"w\"\r\n")
    assert r.until(b"a1")[-1].startswith(b"a1 OK")
    r.close()


def test_garbage_does_not_grow_memory(server):
    r = Raw(server.port("imap"))
    for _ in range(20):
        r.send(b"x" * 60000)
    r.send(b"\r\n")
    assert b"BAD" in r.line()
    assert r.command(b"a1", b"NOOP")[-1].startswith(b"a1 OK")
    r.close()


# folders -------------------------------------------------------------------------------------


def list_names(m, pattern="*", ref=""):
    typ, data = m.list(f'"{ref}"', pattern)
    out = {}
    for line in data:
        if line is None:
            continue
        if isinstance(line, tuple):
            line = line[0] + line[1]
        mm = re.match(rb'\((.*?)\) "(.)" (.*)', line)
        out[mm.group(3).strip(b'"').decode()] = mm.group(1).decode().split()
    return out


def test_special_use_folders_created_and_subscribed(server, tmp_path):
    m = login(server)
    names = list_names(m)
    assert names["INBOX"] == ["\\HasNoChildren"]
    for name, attr in [("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
                       ("Junk", "\\Junk"), ("Archive", "\\Archive")]:
        assert attr in names[name]
        assert (tmp_path / "data" / "mail" / "localhost" / "bob" / f".{name}" / "cur").is_dir()
        assert (tmp_path / "data" / "mail" / "localhost" / "bob" / f".{name}" / "maildirfolder").exists()
    typ, data = m.lsub('""', "*")
    assert len(data) == 6
    typ, data = m._simple_command("LIST", "(SPECIAL-USE)", '""', '"*"')
    assert len(m.untagged_responses.pop("LIST")) == 5
    typ, data = m.namespace()
    assert data == [b'(("" "/")) NIL NIL']
    m.logout()


def test_create_list_children_delete_rename(server, tmp_path):
    m = login(server)
    assert m.create("Projects/2024/Q1")[0] == "OK"
    names = list_names(m)
    assert "\\HasChildren" in names["Projects"] and "\\HasChildren" in names["Projects/2024"]
    assert "\\HasNoChildren" in names["Projects/2024/Q1"]
    assert (tmp_path / "data/mail/localhost/bob/.Projects.2024.Q1/cur").is_dir()
    assert list(list_names(m, "%")) == ["INBOX", "Archive", "Drafts", "Junk", "Projects", "Sent", "Trash"]
    assert set(list_names(m, "%", "Projects/")) == {"Projects/2024"}
    assert m.create("Projects")[0] == "NO"
    assert m.create("Dots.in.name")[0] == "OK"
    assert "Dots.in.name" in list_names(m)
    assert m.create("&AMw-nicode")[0] == "OK"  # modified UTF-7 from the client
    assert "&AMw-nicode" in list_names(m)
    assert (tmp_path / "data/mail/localhost/bob/.&AMw-nicode/cur").is_dir()
    assert (tmp_path / "data/mail/localhost/bob/.Dots&AC4-in&AC4-name/cur").is_dir()
    assert m.rename("Projects", "Work")[0] == "OK"
    names = list_names(m)
    assert "Work/2024/Q1" in names and "Projects" not in names
    assert m.delete("Work/2024/Q1")[0] == "OK"
    assert "Work/2024/Q1" not in list_names(m)
    assert m.delete("INBOX")[0] == "NO"
    assert m.delete("Nonexistent")[0] == "NO"
    assert m.select("Nonexistent")[0] == "NO"
    m.logout()


def test_subscriptions_persist(server, start_server):
    m = login(server)
    m.create("Lists")
    m.subscribe("Lists")
    m.unsubscribe("Junk")
    m.logout()
    server.stop()
    again = start_server(kinds=KINDS)
    m = login(again)
    typ, data = m.lsub('""', "*")
    names = [d.split(b'"/" ')[1].strip(b'"') for d in data]
    assert b"Lists" in names and b"Junk" not in names
    m.logout()


def test_rename_inbox_moves_messages(server):
    send(server, subject="one")
    send(server, subject="two")
    m = login(server)
    m.select("INBOX")
    m.store("1", "+FLAGS", "($Work \\Flagged)")
    m.store("2", "+FLAGS", "($Later)")
    m.unselect()
    assert m.rename("INBOX", "Old")[0] == "OK"
    assert m.select("INBOX")[1] == [b"0"]
    assert m.select("Old")[1] == [b"2"]
    typ, data = m.fetch("1:2", "(FLAGS)")
    assert b"$Work" in data[0] and b"\\Flagged" in data[0] and b"$Later" in data[1]  # keywords kept
    m.logout()


def test_status(server):
    send(server)
    send(server)
    m = login(server)
    typ, data = m.status("INBOX", "(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)")
    assert typ == "OK"
    text = data[0].decode()
    assert "MESSAGES 2" in text and "UIDNEXT 3" in text and "UNSEEN 2" in text and "RECENT 2" in text
    assert m.status("Nope", "(MESSAGES)")[0] == "NO"
    m.logout()


# FETCH ----------------------------------------------------------------------------------------


def multipart_message() -> bytes:
    outer = MIMEMultipart("mixed")
    outer["Subject"] = "with attachments"
    outer["From"] = "A <a@example.org>"
    outer["To"] = "bob@localhost"
    alt = MIMEMultipart("alternative")
    alt.attach(MIMEText("plain body\nline two\n", "plain"))
    alt.attach(MIMEText("<p>html body</p>\n", "html"))
    outer.attach(alt)
    pdf = MIMEApplication(b"%PDF-1.4 fake" * 10, "pdf")
    pdf.add_header("Content-Disposition", "attachment", filename="doc.pdf")
    outer.attach(pdf)
    inner = MIMEText("forwarded text\n")
    inner["Subject"] = "inner"
    from email.mime.message import MIMEMessage
    outer.attach(MIMEMessage(inner))
    return outer.as_bytes().replace(b"\n", b"\r\n")


def test_bodystructure_and_sections_of_nested_multipart(server):
    m = login(server)
    msg = multipart_message()
    m.append("INBOX", None, None, msg)
    m.select("INBOX")
    typ, data = m.fetch("1", "(BODYSTRUCTURE)")
    bs = data[0].decode()
    assert '("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT"' in bs
    assert '"ALTERNATIVE"' in bs and '"MIXED"' in bs
    assert '("ATTACHMENT" ("FILENAME" "doc.pdf"))' in bs
    assert '"APPLICATION" "PDF"' in bs and '"BASE64"' in bs
    assert '"MESSAGE" "RFC822"' in bs and '"inner"' in bs
    typ, data = m.fetch("1", "(BODY)")
    assert "ATTACHMENT" not in data[0].decode()  # BODY has no extension data
    typ, data = m.fetch("1", "(BODY.PEEK[1.1] BODY.PEEK[1.2.MIME] BODY.PEEK[3.HEADER] BODY.PEEK[3.1] "
                             "BODY.PEEK[2]<0.8>)")
    joined = b"".join(p[1] for p in data if isinstance(p, tuple))
    assert b"plain body\r\nline two\r\n" in joined
    assert b"Content-Type: text/html" in joined
    assert b"Subject: inner" in joined and b"forwarded text" in joined
    assert any(isinstance(p, tuple) and b"BODY[2]<0>" in p[0] for p in data)
    typ, data = m.fetch("1", "(BODY.PEEK[1.1])")
    assert data[0][1] == b"plain body\r\nline two\r\n"
    typ, data = m.fetch("1", "(FLAGS)")
    assert b"\\Seen" not in data[0]  # PEEK does not set \Seen
    m.logout()


def test_fetch_items(server):
    send(server, subject="fetch me", body="line1\r\nline2\r\n", extra="Cc: Carl <carl@example.org>\r\n")
    m = login(server)
    m.select("INBOX")
    typ, data = m.fetch("1", "(UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)")
    text = data[0].decode()
    assert "UID 1" in text and "\\Recent" in text
    assert re.search(r'INTERNALDATE "\d\d-\w{3}-\d{4} \d\d:\d\d:\d\d [+-]\d{4}"', text)
    size = int(re.search(r"RFC822.SIZE (\d+)", text).group(1))
    assert '"fetch me"' in text and '(("Carl" NIL "carl" "example.org"))' in text
    typ, data = m.fetch("1", "(RFC822)")
    assert len(data[0][1]) == size and b"\r\n" in data[0][1] and b"\n\n" not in data[0][1]
    typ, data = m.fetch("1", "(FLAGS)")
    assert b"\\Seen" in data[0]  # RFC822 sets \Seen
    typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT CC)] BODY.PEEK[HEADER.FIELDS.NOT (SUBJECT)])")
    assert data[0][1] == b"Subject: fetch me\r\nCc: Carl <carl@example.org>\r\n\r\n"
    assert b"Subject" not in data[1][1] and b"From:" in data[1][1]
    typ, data = m.fetch("1", "(BODY.PEEK[TEXT] BODY.PEEK[TEXT]<2.3> RFC822.HEADER)")
    assert data[0][1] == b"line1\r\nline2\r\n" and data[1][1] == b"ne1"
    assert data[2][1].endswith(b"\r\n\r\n")
    typ, data = m.fetch("1:*", "FAST")
    assert typ == "OK"
    m.logout()


def test_fetch_answers_from_the_cache_the_same(server):
    """ENVELOPE and INTERNALDATE are kept after the first FETCH; answers do not change."""
    for i in range(3):
        send(server, subject=f"cached {i}", extra="Cc: Carl <carl@example.org>, \"Doe, J.\" <j@x.org>\r\n")
    r = Raw(server.port("imap"))
    r.command(b"a", b"LOGIN bob@localhost x")
    r.command(b"b", b"SELECT INBOX")
    first = r.command(b"c", b"FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)")
    again = r.command(b"d", b"FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)")
    assert first[:-1] == again[:-1] and len(first) == 4
    assert b'"Doe, J." NIL "j" "x.org"' in first[0]
    headers = r.command(b"e", b"FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)] RFC822.HEADER)")
    assert b"Subject: cached 1" in b"\n".join(headers)
    r.command(b"f", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
    r.command(b"g", b"EXPUNGE")
    after = r.command(b"h", b"FETCH 1:* (UID ENVELOPE)")
    assert len(after) == 3 and b"cached 1" in after[0] and b"cached 2" in after[1]
    r.close()


def test_no_expunge_when_store_is_refused(server):
    send(server, subject="a")
    send(server, subject="b")
    r = Raw(server.port("imap"))
    r.command(b"a", b"LOGIN bob@localhost x")
    r.command(b"b", b"SELECT INBOX")
    keywords = " ".join(f"k{i}" for i in range(26)).encode()
    assert r.command(b"c", b"STORE 2 +FLAGS.SILENT (" + keywords + b")")[-1].startswith(b"c OK")
    other = login(server)
    other.select("INBOX")
    other.store("1", "+FLAGS.SILENT", "\\Deleted")
    other.expunge()
    other.logout()
    reply = r.command(b"e", b"STORE 1 +FLAGS (one-too-many)")
    assert reply[-1].startswith(b"e NO [LIMIT]")
    assert not any(b"EXPUNGE" in line for line in reply)  # not during STORE, even a refused one
    assert any(line == b"* 1 EXPUNGE" for line in r.command(b"f", b"NOOP"))
    r.close()


def test_status_counts_recent_of_the_selecting_session(server):
    send(server)
    send(server)
    m = login(server)
    m.select("INBOX")
    typ, data = m.status("INBOX", "(RECENT MESSAGES)")
    assert b"RECENT 2" in data[0] and b"MESSAGES 2" in data[0]
    m.logout()
    m = login(server)
    typ, data = m.status("INBOX", "(RECENT)")
    assert b"RECENT 0" in data[0]  # the first session had them
    m.logout()


def test_list_subscribed_keeps_attributes(server):
    m = login(server)
    m.create("Lists/debian")
    m.subscribe("Lists")
    m.create("Gone")
    m.subscribe("Gone")
    m.delete("Gone")  # subscriptions outlive their folder (RFC 3501 6.3.4)
    typ, data = m._simple_command("LIST", "(SUBSCRIBED)", '""', '"*"')
    lines = {l.split(b'"/" ')[1].strip(b'"'): l for l in m.untagged_responses.pop("LIST")}
    assert b"\\Sent" in lines[b"Sent"] and b"\\Subscribed" in lines[b"Sent"]
    assert b"\\HasChildren" in lines[b"Lists"] and b"\\Subscribed" in lines[b"Lists"]
    assert b"\\NonExistent" in lines[b"Gone"]
    assert b"Lists/debian" not in lines
    m.unsubscribe("Lists")
    m.subscribe("Lists/debian")
    typ, data = m.lsub('""', "%")
    assert b'(\\Noselect) "/" "Lists"' in data  # only a child is subscribed
    m.logout()


def test_store_flags_persisted_in_file_names(server, tmp_path):
    send(server)
    m = login(server)
    m.select("INBOX")
    typ, data = m.store("1", "+FLAGS", "(\\Flagged \\Answered $Label1)")
    assert b"\\Flagged" in data[0] and b"$Label1" in data[0]
    cur = tmp_path / "data/mail/localhost/bob/cur"
    names = os.listdir(cur)
    assert len(names) == 1 and names[0].endswith(":2,FRa")
    assert (tmp_path / "data/mail/localhost/bob/dovecot-keywords").read_text() == "0 $Label1\n"
    typ, data = m.store("1", "-FLAGS.SILENT", "(\\Answered)")
    assert data == [None]
    assert os.listdir(cur)[0].endswith(":2,Fa")
    typ, data = m.store("1", "FLAGS", "(\\Seen \\Draft)")
    assert os.listdir(cur)[0].endswith(":2,DS")
    typ, data = m.uid("STORE", "1", "+FLAGS", "(\\Deleted)")
    assert b"UID 1" in data[0]
    m.logout()
    m = login(server)
    m.select("INBOX")
    typ, data = m.fetch("1", "(FLAGS)")
    assert b"\\Deleted" in data[0] and b"\\Seen" in data[0] and b"\\Draft" in data[0]
    m.logout()


def test_examine_is_read_only(server):
    send(server)
    m = login(server)
    typ, _ = m.select("INBOX", readonly=True)
    assert m.untagged_responses.get("READ-ONLY") is not None
    typ, data = m.store("1", "+FLAGS", "\\Seen")
    assert typ == "NO"
    typ, data = m.fetch("1", "(BODY[])")
    typ, data = m.fetch("1", "(FLAGS)")
    assert b"\\Seen" not in data[0]
    m.logout()


# APPEND / COPY / MOVE / EXPUNGE ---------------------------------------------------------------


def test_append_flags_date_and_appenduid(server, tmp_path):
    m = login(server)
    typ, data = m.append("INBOX", "(\\Seen \\Flagged)", '"14-Jul-2020 10:11:12 +0200"',
                         b"Subject: a\r\n\r\nb\r\n")
    code = m.response("APPENDUID")[1][0].split()
    typ, data = m.status("INBOX", "(UIDVALIDITY)")
    assert code[0] in data[0] and code[1] == b"1"
    m.select("INBOX")
    typ, data = m.fetch("1", "(FLAGS INTERNALDATE)")
    assert b"\\Seen" in data[0] and b"\\Flagged" in data[0]
    path = tmp_path / "data/mail/localhost/bob/cur"
    (name,) = os.listdir(path)
    assert int(os.stat(path / name).st_mtime) == 1594714272
    typ, data = m.append("Nonexistent", None, None, b"x\r\n")
    assert typ == "NO" and data[0].startswith(b"[TRYCREATE] ")  # RFC 3501 6.3.11
    m.logout()


def test_copy_move_return_copyuid(server):
    for i in range(3):
        send(server, subject=f"m{i}")
    m = login(server)
    m.select("INBOX")
    typ, data = m.copy("1:2", "Archive")
    assert typ == "OK" and b"COPYUID" in data[0]
    validity, src, dst = data[0].split(b"[COPYUID ")[1].split(b"]")[0].split()
    assert src == b"1:2" and dst == b"1:2"
    typ, data = m.uid("MOVE", "3", "Trash")
    assert typ == "OK"
    assert m.untagged_responses.get("EXPUNGE") == [b"3"]
    m.untagged_responses.pop("COPYUID", None)
    typ, data = m.uid("COPY", "1", "Archive")
    assert typ == "OK" and m.untagged_responses.pop("COPYUID")[-1].split()[1:] == [b"1", b"3"]
    typ, data = m.copy("1", "Nonexistent")
    assert typ == "NO" and b"TRYCREATE" in data[0]
    m.select("Archive")
    typ, data = m.fetch("1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects = [d[1].strip() for d in data if isinstance(d, tuple)]
    assert subjects == [b"Subject: m0", b"Subject: m1", b"Subject: m0"]
    m.select("Trash")
    typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert data[0][1].strip() == b"Subject: m2"
    m.logout()


def test_expunge_uid_expunge_close_unselect(server):
    for i in range(5):
        send(server, subject=f"m{i}")
    m = login(server)
    m.select("INBOX")
    m.store("1:4", "+FLAGS.SILENT", "\\Deleted")
    typ, data = m.uid("EXPUNGE", "2:3")
    assert m.untagged_responses.pop("EXPUNGE") == [b"3", b"2"]
    typ, data = m.search(None, "ALL")
    assert data == [b"1 2 3"]
    m.unselect()
    m.select("INBOX")
    typ, data = m.uid("SEARCH", None, "ALL")
    assert data == [b"1 4 5"]
    m.close()  # expunges 1 and 4 silently
    m.select("INBOX")
    typ, data = m.uid("SEARCH", None, "ALL")
    assert data == [b"5"]
    m.logout()


# SEARCH ------------------------------------------------------------------------------------------


def test_search_keys(server):
    m = login(server)
    msgs = [
        ("14-Jul-2020 10:00:00 +0000", "(\\Seen \\Answered)",
         b"From: Alice <alice@example.org>\r\nTo: bob@localhost\r\nCc: carol@example.org\r\n"
         b"Subject: Quarterly report\r\nDate: Tue, 14 Jul 2020 09:00:00 +0000\r\nX-Tag: blue\r\n\r\n"
         b"Numbers are up.\r\n"),
        ("15-Jul-2020 10:00:00 +0000", "(\\Flagged $Work)",
         b"From: Bob <bob@example.org>\r\nTo: alice@example.org\r\nBcc: secret@example.org\r\n"
         b"Subject: =?utf-8?q?Caf=C3=A9?= meeting\r\nDate: Wed, 15 Jul 2020 09:00:00 +0000\r\n"
         b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"hidden treasure map\n") + b"\r\n"),
        ("16-Jul-2020 10:00:00 +0000", "(\\Deleted \\Draft)",
         b"From: Carol <carol@example.org>\r\nSubject: big one\r\nDate: Thu, 16 Jul 2020 09:00:00 +0000\r\n\r\n"
         + b"padding line\r\n" * 200),
    ]
    for date, flags, body in msgs:
        m.append("INBOX", flags, f'"{date}"', body)
    m.select("INBOX")

    def s(*criteria, uid=False):
        typ, data = m.uid("SEARCH", *criteria) if uid else m.search(None, *criteria)
        assert typ == "OK", (criteria, data)
        return [int(x) for x in data[0].split()]

    assert s("ALL") == [1, 2, 3]
    assert s("SEEN") == [1] and s("UNSEEN") == [2, 3]
    assert s("ANSWERED") == [1] and s("UNANSWERED") == [2, 3]
    assert s("FLAGGED") == [2] and s("UNFLAGGED") == [1, 3]
    assert s("DELETED") == [3] and s("UNDELETED") == [1, 2]
    assert s("DRAFT") == [3] and s("UNDRAFT") == [1, 2]
    assert s("KEYWORD", "$Work") == [2] and s("UNKEYWORD", "$Work") == [1, 3]
    assert s("RECENT") == [1, 2, 3] and s("OLD") == [] and s("NEW") == [2, 3]
    assert s("FROM", "alice") == [1] and s("TO", "alice") == [2]
    assert s("CC", "carol") == [1] and s("BCC", "secret") == [2]
    assert s("SUBJECT", "report") == [1]
    m.literal = "CAFÉ".encode()
    assert m.search("UTF-8", "SUBJECT") == ("OK", [b"2"])  # decoded, case-insensitive
    assert s("HEADER", "X-Tag", "blue") == [1] and s("HEADER", "X-Tag", '""') == [1]
    assert s("BODY", "numbers") == [1] and s("BODY", "treasure") == [2]
    assert s("TEXT", "carol") == [1, 3] and s("TEXT", "padding") == [3]
    assert s("BEFORE", "15-Jul-2020") == [1] and s("ON", "15-Jul-2020") == [2]
    assert s("SINCE", "15-Jul-2020") == [2, 3]
    assert s("SENTBEFORE", "15-Jul-2020") == [1] and s("SENTON", "16-Jul-2020") == [3]
    assert s("SENTSINCE", "15-Jul-2020") == [2, 3]
    assert s("LARGER", "1000") == [3] and s("SMALLER", "1000") == [1, 2]
    assert s("UID", "2:*") == [2, 3] and s("2,3") == [2, 3] and s("*") == [3]
    assert s("NOT", "SEEN") == [2, 3] and s("OR", "SEEN", "FLAGGED") == [1, 2]
    assert s("(", "OR", "SEEN", "DELETED", ")", "NOT", "DRAFT") == [1]
    assert s("NOT", "(", "SEEN", "UID", "1", ")") == [2, 3]
    assert s("CHARSET", "UTF-8", "SUBJECT", "report") == [1]
    assert s("OR", "FROM", "bob", "SUBJECT", "big", uid=True) == [2, 3]
    typ, data = m.search("KOI8-R", "ALL")
    assert typ == "NO" and b"BADCHARSET" in data[0]
    m.logout()


# misc ---------------------------------------------------------------------------------------------


def test_id_enable_idle_without_select(server):
    r = Raw(server.port("imap"))
    r.command(b"a1", b"LOGIN bob@localhost pw")
    reply = r.command(b"a2", b'ID ("name" "pytest")')
    assert reply[0].startswith(b"* ID (") and reply[-1].startswith(b"a2 OK")
    reply = r.command(b"a3", b"ENABLE CONDSTORE X-UNKNOWN condstore")
    assert reply[0] == b"* ENABLED CONDSTORE" and reply[-1].startswith(b"a3 OK")
    r.send(b"a4 IDLE\r\n")
    assert r.line().startswith(b"+")
    r.send(b"DONE\r\n")
    assert r.until(b"a4")[-1].startswith(b"a4 OK")
    r.command(b"a5", b"LOGOUT")
    r.close()


def test_pipelined_commands_answered_in_order(server):
    send(server)
    r = Raw(server.port("imap"))
    r.send(b"a1 LOGIN bob@localhost pw\r\na2 SELECT INBOX\r\na3 FETCH 1 (UID)\r\n"
           b"a4 STORE 1 +FLAGS (\\Seen)\r\na5 LOGOUT\r\n")
    lines = r.until(b"a5")
    tags = [l.split()[0] for l in lines if not l.startswith(b"*")]
    assert tags == [b"a1", b"a2", b"a3", b"a4", b"a5"]
    r.close()
