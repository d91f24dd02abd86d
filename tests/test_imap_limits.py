"""
IMAP input at and past its limits, over real sockets with exact replies:
numbers past 32 bits, nesting, NUL, folder names that sync clients would
turn into paths outside their tree, names too long for the disk, the
per-account folder limit, and a folder deleted and made again under a
session that has it selected (issue 10, sections 3 and 4).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from tests.test_imap import Raw
from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.testing import in_reactor

KINDS = ("smtp", "imap")
USER = b"bob@localhost"
MAX_FOLDERS = 9  # INBOX + 5 special-use + 3


@pytest.fixture
def server(start_server):
    return start_server(kinds=KINDS, imap__max_folders=MAX_FOLDERS)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    return tmp_path / "data" / "mail" / "localhost" / "bob"


def session(server, select: bytes | None = b"INBOX") -> Raw:
    r = Raw(server.port("imap"))
    assert r.command(b"l", b"LOGIN " + USER + b" x")[-1].startswith(b"l OK")
    if select is not None:
        assert r.command(b"s", b"SELECT " + select)[-1].startswith(b"s OK")
    return r


def last(r: Raw, tag: bytes, text: bytes) -> bytes:
    return r.command(tag, text)[-1]


def answer(r: Raw, text: bytes) -> bytes:
    """The tagged reply to the command C{text}, its tag checked and taken off."""
    line = last(r, b"t", text)
    assert line.startswith(b"t "), line
    return line[2:]


def append(r: Raw, folder: bytes, body: bytes = b"Subject: x\r\n\r\nbody\r\n") -> bytes:
    r.send(b"p APPEND " + folder + b" {%d+}\r\n" % len(body) + body + b"\r\n")
    return r.until(b"p")[-1]


def with_a_message(server) -> Raw:
    """A session with INBOX selected and one message in it."""
    r = session(server)
    assert append(r, b"INBOX").startswith(b"p OK")
    return r


def tree(inbox: Path) -> list[str]:
    return sorted(p.name for p in inbox.iterdir() if p.is_dir())


# numbers and nesting ------------------------------------------------------------------------

HUGE = b"9" * 5000


@pytest.mark.parametrize("command,reply", [
    (b"FETCH " + HUGE + b" FLAGS",
     b"BAD bad sequence set '" + b"9" * 40 + b"': message number too large"),
    (b"FETCH 4294967296 FLAGS", b"BAD bad sequence set '4294967296': message number too large"),
    (b"UID FETCH 1:" + HUGE + b" FLAGS",
     b"BAD bad sequence set '1:" + b"9" * 38 + b"': message number too large"),
    (b"FETCH 1 BODY.PEEK[]<" + HUGE + b".1>", b"BAD partial offset too large"),
    (b"FETCH 1 BODY.PEEK[]<0." + HUGE + b">", b"BAD partial length too large"),
    (b"FETCH 1 BODY.PEEK[" + HUGE + b"]", b"BAD section part number too large"),
    (b"FETCH 1 BODY.PEEK[1.0]", b"BAD section part number must not be 0"),
    (b"SEARCH LARGER " + HUGE, b"BAD size too large"),
    (b"SEARCH SMALLER 4294967296", b"BAD size too large"),
    (b"SEARCH LARGER 12x", b"BAD size expected, got '12x'"),
    ("SEARCH LARGER ²".encode(), b"BAD 8-bit characters in an atom"),
    ("SEARCH LARGER ٣".encode(), b"BAD 8-bit characters in an atom"),
    (b"SEARCH UID " + HUGE, b"BAD bad sequence set '" + b"9" * 40 + b"': message number too large"),
    (b"SEARCH " + b"NOT " * 1100 + b"ALL", b"BAD search keys nested more than 32 deep"),
    (b"SEARCH " + b"OR ALL " * 1100 + b"ALL", b"BAD search keys nested more than 32 deep"),
    (b"SEARCH " + b"(" * 1100 + b"ALL" + b")" * 1100, b"BAD lists nested more than 32 deep"),
    (b"FETCH 1 " + b"(" * 40 + b"FLAGS" + b")" * 40, b"BAD lists nested more than 32 deep"),
    (b"SEARCH NOT \x01", b"BAD control character in an atom"),
    (b'LIST "" "\xff*"', b"BAD mailbox name is not valid modified UTF-7"),
    (b'FETCH 1 BODY.PEEK[HEADER.FIELDS ("\x01")]', b"BAD bad header field name"),
    (b'FETCH 1 BODY.PEEK[HEADER.FIELDS ("a)")]', b"BAD bad header field name"),
    (b"SEARCH BEFORE 0-Jan-0000", b"BAD bad date '0-Jan-0000'"),
    (b"SEARCH SENTON 31-Feb-2020", b"BAD bad date '31-Feb-2020'"),
    (b'APPEND INBOX "31-Jan-2020 99:99:99 +0000" {1+}\r\nx', b"BAD bad date-time"),
])
def test_number_and_nesting_limits_answer_bad(server, command, reply):
    r = with_a_message(server)
    assert r.command(b"c", command)[-1] == b"c " + reply
    assert answer(r, b"NOOP").startswith(b"OK")


def test_largest_numbers_and_depths_are_accepted(server):
    r = with_a_message(server)
    assert answer(r, b"UID FETCH 4294967295 FLAGS") == b"OK UID FETCH completed"
    assert answer(r, b"FETCH 1:4294967295 (UID)") == b"OK FETCH completed"
    out = r.command(b"c", b"FETCH 1 BODY.PEEK[]<0.4294967295>")
    assert out[-1] == b"c OK FETCH completed" and b"BODY[]<0>" in out[0]
    assert r.command(b"d", b"SEARCH " + b"NOT " * 32 + b"ALL")[-1] == b"d OK SEARCH completed"
    assert r.command(b"e", b"SEARCH " + b"(" * 32 + b"ALL" + b")" * 32)[-2:] == \
        [b"* SEARCH 1", b"e OK SEARCH completed"]
    assert answer(r, b"SEARCH SMALLER 4294967295") == b"OK SEARCH completed"


def test_nul_in_command_is_bad_and_the_session_goes_on(server):
    r = session(server, select=None)
    assert answer(r, b"SELECT \x00x") == b"BAD NUL character in command"
    assert answer(r, b"SELECT \x000\x00") == b"BAD NUL character in command"
    # a non-synchronising literal after a NUL line is skipped, not run as commands
    r.send(b"c SELECT \x00 {14+}\r\nd DELETE Sent\r\n")
    assert r.until(b"c") == [b"c BAD NUL character in command"]
    assert answer(r, b"SELECT Sent").startswith(b"OK")


@pytest.mark.parametrize("size", [b"4294967296", b"9" * 20, b"9" * 5000])
def test_overlong_literal_sizes_are_refused(server, size):
    r = session(server, select=None)
    assert answer(r, b"SELECT {" + size + b"}").startswith(b"BAD Literal of ")
    assert answer(r, b"NOOP").startswith(b"OK")


def test_a_refused_literal_is_answered_with_the_whole_tag(server):
    r = session(server, select=None)
    tag = b"t" * 1000
    assert last(r, tag, b"SELECT {4294967296}") == tag + b" BAD Literal of 4294967296 octets is too large here"


# folder names -------------------------------------------------------------------------------

BAD_NAMES = [(name, reply) for reply, names in {
    b"NO [CANNOT] '.' and '..' are not allowed as hierarchy levels": [
        b'"../../../../tmp/pwn"', b'"a/../b"', b'"a/."', b'".."'],
    b"NO [CANNOT] Mailbox names cannot start with '~'": [b'"~/mail"', b'"~x"'],
    b"NO [CANNOT] Mailbox names cannot start with '/'": [b'"/etc/x"'],
    b"NO [CANNOT] Mailbox names cannot start with '#'": [b'"#shared"'],
    b"NO [CANNOT] Mailbox names cannot have empty hierarchy levels": [b'"a//b"'],
    b"NO [CANNOT] Mailbox names cannot contain control characters, '*' or '%'": [
        b'"a\x01b"', b'"a\x7fb"', b'"a&AIU-b"', b'"&2AA-"', b'"a*"'],  # &AIU-: U+0085; &2AA-: a surrogate
}.items() for name in names]


@pytest.mark.parametrize("name,reply", BAD_NAMES)
def test_bad_folder_names_are_refused_everywhere(server, inbox, name, reply):
    r = with_a_message(server)
    before = tree(inbox)
    assert answer(r, b"CREATE " + name) == reply
    assert answer(r, b"RENAME Junk " + name) == reply
    assert answer(r, b"SUBSCRIBE " + name) == reply
    assert append(r, name) == b"p " + reply
    assert answer(r, b"COPY 1 " + name) == reply
    assert answer(r, b"MOVE 1 " + name) == reply
    assert tree(inbox) == before
    listed = r.command(b"f", b'LIST "" *')
    assert len(listed) == 7 and listed[-1] == b"f OK LIST completed"  # INBOX + 5 special-use
    assert not os.path.exists("/tmp/pwn")


def test_names_near_the_length_limit(server, inbox):
    r = session(server)
    ok = b"n" * 249  # ".nnn..." is 250 bytes on disk
    assert answer(r, b"CREATE " + ok) == b"OK CREATE completed"
    assert answer(r, b"CREATE " + ok + b"n") == \
        b"NO [LIMIT] Mailbox name too long (251 bytes stored, at most 250)"
    # a "." inside a name is stored as "&AC4-": the stored size is what counts
    assert answer(r, b"CREATE " + b"." * 50) == \
        b"NO [LIMIT] Mailbox name too long (251 bytes stored, at most 250)"
    assert os.path.isdir(inbox / ("." + "n" * 249))


def test_deep_create_fails_whole_and_leaves_nothing(server, inbox):
    r = session(server)
    before = tree(inbox)
    deep = b"/".join([b"a"] * 200)
    assert answer(r, b"CREATE " + deep) == \
        b"NO [LIMIT] Mailbox name too long (400 bytes stored, at most 250)"
    assert tree(inbox) == before
    assert r.command(b"b", b'LIST "" a*') == [b"b OK LIST completed"]


def test_create_interrupted_by_the_disk_removes_what_it_made(server, inbox):
    r = session(server)
    (inbox / ".x.y").write_bytes(b"")  # not a directory: making x/y fails after x was made
    before = tree(inbox)
    assert answer(r, b"CREATE x/y/z") == b"NO [SERVERBUG] Internal error"
    assert tree(inbox) == before and not (inbox / ".x").exists()


def test_rename_whose_subfolder_would_be_too_long_moves_nothing(server, inbox):
    r = session(server)
    assert answer(r, b"CREATE p/" + b"c" * 200).startswith(b"OK")
    before = tree(inbox)
    assert answer(r, b"RENAME p " + b"q" * 60) == \
        b"NO [LIMIT] Mailbox name too long (262 bytes stored, at most 250)"
    assert tree(inbox) == before


def test_create_of_an_existing_folder_is_refused(server, inbox):
    r = session(server, select=None)
    assert answer(r, b"CREATE a") == b"OK CREATE completed"
    assert answer(r, b"CREATE a") == b"NO [ALREADYEXISTS] Mailbox already exists"
    assert answer(r, b"CREATE INBOX") == b"NO [ALREADYEXISTS] Mailbox already exists"
    assert answer(r, b"CREATE Sent/") == b"NO [ALREADYEXISTS] Mailbox already exists"
    assert answer(r, b"CREATE a/b") == b"OK CREATE completed"  # under an existing parent
    assert (inbox / ".a.b" / "cur").is_dir()


def test_folder_limit_per_account(server, inbox):
    r = session(server)
    assert answer(r, b"CREATE one") == b"OK CREATE completed"  # 7 of 9
    # x/y/z needs three folders (x, x/y, x/y/z): refused whole
    assert answer(r, b"CREATE x/y/z") == b"NO [LIMIT] Too many mailboxes (at most 9 per account)"
    assert not (inbox / ".x").exists()
    assert answer(r, b"CREATE x/y") == b"OK CREATE completed"  # 9 of 9
    assert answer(r, b"CREATE three") == b"NO [LIMIT] Too many mailboxes (at most 9 per account)"
    assert answer(r, b"RENAME INBOX old") == b"NO [LIMIT] Too many mailboxes (at most 9 per account)"
    assert answer(r, b"RENAME one p/one") == b"NO [LIMIT] Too many mailboxes (at most 9 per account)"
    assert answer(r, b"RENAME one two") == b"OK RENAME completed"  # renaming adds nothing
    assert answer(r, b"DELETE two") == b"OK DELETE completed"
    assert answer(r, b"CREATE three") == b"OK CREATE completed"


def test_bad_names_already_on_disk_are_not_listed(server, inbox):
    r = session(server, select=None)
    for entry in (".&AC4-&AC4-.&AC4-&AC4-.tmp.pwn", ".~x", ".&AC4-", ".INBOX", ".a&AAE-b", ".good"):
        for sub in ("cur", "new", "tmp"):
            os.makedirs(inbox / entry / sub)
    with open(inbox / "subscriptions", "a", encoding="utf-8") as f:
        f.write("../../tmp/pwn\n~x\ngood\n")
    names = [line.rsplit(b" ", 1)[1] for line in r.command(b"a", b'LIST "" *')[:-1]]
    assert names == [b'"INBOX"', b'"Archive"', b'"Drafts"', b'"Junk"', b'"Sent"', b'"Trash"', b'"good"']
    subscribed = [line.rsplit(b" ", 1)[1] for line in r.command(b"b", b'LSUB "" *')[:-1]]
    assert b'"good"' in subscribed and not any(b"pwn" in n or b"~" in n for n in subscribed)


# subscriptions ------------------------------------------------------------------------------

def test_subscribe_needs_an_existing_folder(server):
    r = session(server, select=None)
    assert answer(r, b"SUBSCRIBE nothere") == b"NO [NONEXISTENT] No such mailbox"
    assert answer(r, b"CREATE there") == b"OK CREATE completed"
    assert answer(r, b"SUBSCRIBE there") == b"OK SUBSCRIBE completed"
    assert answer(r, b"DELETE there") == b"OK DELETE completed"
    assert r.command(b"e", b'LSUB "" there') == [b'* LSUB (\\Noselect) "/" "there"', b"e OK LSUB completed"]
    # a subscribed name whose folder is gone can still be unsubscribed
    assert answer(r, b"UNSUBSCRIBE there") == b"OK UNSUBSCRIBE completed"
    assert r.command(b"g", b'LSUB "" there') == [b"g OK LSUB completed"]


# a folder deleted and made again ------------------------------------------------------------

def uidvalidity(lines: list[bytes]) -> bytes:
    return next(l.split(b"UIDVALIDITY ")[1].split(b"]")[0] for l in lines if b"UIDVALIDITY" in l)


def test_folder_deleted_and_made_again_while_another_session_has_it_selected(server):
    a = session(server, select=None)
    assert answer(a, b"CREATE X") == b"OK CREATE completed"
    assert append(a, b"X").startswith(b"p OK")
    b = session(server, select=None)
    old = uidvalidity(b.command(b"s2", b"SELECT X"))
    assert answer(a, b"DELETE X") == b"OK DELETE completed"
    assert answer(a, b"CREATE X") == b"OK CREATE completed"
    selected = a.command(b"d", b"SELECT X")
    assert selected[-1] == b"d OK [READ-WRITE] SELECT completed"
    assert b"* 0 EXISTS" in selected and uidvalidity(selected) != old
    assert append(a, b"X").startswith(b"p OK")
    # B sees its messages expunged, and never the new folder's message
    assert b.command(b"n", b"NOOP") == [b"* 1 EXPUNGE", b"n OK NOOP completed"]
    assert b.command(b"n2", b"NOOP") == [b"n2 OK NOOP completed"]
    assert b.command(b"f", b"UID FETCH 1:* UID") == [b"f OK UID FETCH completed"]
    # and selecting it again shows the new folder
    again = b.command(b"s3", b"SELECT X")
    assert b"* 1 EXISTS" in again and uidvalidity(again) == uidvalidity(selected)


def read_until(r: Raw, needle: bytes, timeout: float = 5) -> list[bytes]:
    """Lines until one contains C{needle}: an answer due now, not after a poll (the clock is a Clock)."""
    r.sock.settimeout(timeout)
    lines = [r.line()]
    while needle not in lines[-1]:
        lines.append(r.line())
    r.sock.settimeout(10)
    return lines


def test_delete_expunges_at_once_for_a_session_idling_in_the_folder(start_server):
    server = start_server(kinds=KINDS, clock=Clock())  # no poll runs unless the test advances it
    a = session(server, select=None)
    assert answer(a, b"CREATE X") == b"OK CREATE completed"
    assert append(a, b"X").startswith(b"p OK")
    b = session(server, select=b"X")
    b.send(b"i IDLE\r\n")
    assert b.line().startswith(b"+ ")
    assert answer(a, b"DELETE X") == b"OK DELETE completed"
    assert read_until(b, b"EXPUNGE") == [b"* 1 EXPUNGE"]


def test_the_old_index_of_a_deleted_folder_never_evicts_the_new_one(start_server):
    server = start_server(kinds=KINDS, clock=Clock())
    a = session(server, select=None)
    for name in (b"X", b"f1", b"f2", b"f3"):
        assert answer(a, b"CREATE " + name) == b"OK CREATE completed"
    b = session(server, select=b"X")
    assert answer(a, b"DELETE X") == b"OK DELETE completed"
    assert answer(a, b"CREATE X") == b"OK CREATE completed"
    assert answer(a, b"SELECT X") == b"OK [READ-WRITE] SELECT completed"
    a.send(b"i IDLE\r\n")
    assert a.line().startswith(b"+ ")
    assert answer(b, b"SELECT INBOX").startswith(b"OK")  # B leaves the retired index
    # more unattached folders than the registry keeps (KEEP_IDLE = 8)
    for name in (b"Sent", b"Drafts", b"Trash", b"Junk", b"Archive", b"f1", b"f2", b"f3"):
        assert answer(b, b"STATUS " + name + b" (MESSAGES)") == b"OK STATUS completed"
    # one index for X: B's APPEND reaches A's IDLE at once
    assert append(b, b"X").startswith(b"p OK")
    assert read_until(a, b"EXISTS") == [b"* 1 EXISTS"]


def test_folder_removed_behind_the_servers_back_and_made_again(server, inbox):
    a = session(server, select=None)
    assert answer(a, b"CREATE Y") == b"OK CREATE completed"
    b = session(server, select=b"Y")
    shutil.rmtree(inbox / ".Y")
    assert answer(a, b"CREATE Y") == b"OK CREATE completed"
    assert answer(a, b"SELECT Y") == b"OK [READ-WRITE] SELECT completed"
    assert answer(a, b"STATUS Y (MESSAGES)") == b"OK STATUS completed"
    b.close()


# configuration ------------------------------------------------------------------------------

def test_max_folders_is_validated(tmp_path):
    assert load_config(None, {"data_dir": str(tmp_path), "imap.max_folders": 6}).imap.max_folders == 6
    assert load_config(None, {"data_dir": str(tmp_path)}).imap.max_folders == 1000
    with pytest.raises(ConfigError, match=r"imap\.max_folders.*must be at least 6"):
        load_config(None, {"data_dir": str(tmp_path), "imap.max_folders": 5})
    with pytest.raises(ConfigError, match=r"imap\.max_folders"):
        load_config(None, {"data_dir": str(tmp_path), "imap.max_folders": "many"})


# a client that leaves in the middle of a command ----------------------------------------------

def test_client_leaving_mid_command_leaves_no_traceback_and_no_session(server, inbox):
    failures: list[dict] = []

    def observe(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event)

    r = session(server, select=None)
    body = b"Subject: x\r\n\r\nbody\r\n"
    r.send(b"".join(b"p%d APPEND INBOX {%d+}\r\n%s\r\n" % (i, len(body), body) for i in range(40)))
    assert r.until(b"p39")[-1].startswith(b"p39 OK")
    r.close()
    globalLogPublisher.addObserver(observe)
    try:
        # a set past store.LONG_SET is resolved in the worker: the client may leave meanwhile
        long_set = b",".join([b"1:*"] * 700)
        for command in [b"f FETCH 1:* (BODY[] FLAGS)", b"t SELECT Sent", b"x EXAMINE Drafts",
                        b"g FETCH " + long_set + b" (BODY[] FLAGS)", b"c COPY " + long_set + b" Sent",
                        b"s STORE " + long_set + b" +FLAGS (\\Seen)"] * 10:
            # a command whose answer needs the worker pool, and the connection is gone
            gone = session(server)
            # unseen again, so that FETCH BODY[] has flags to set in the worker before it answers
            assert answer(gone, b"STORE 1:* -FLAGS.SILENT (\\Seen)").startswith(b"OK")
            gone.send(command + b"\r\n")
            gone.close()
        r = session(server)  # everything before it is answered in order, so they are all over
        assert answer(r, b"NOOP").startswith(b"OK")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, [e["log_failure"].getTraceback()[-600:] for e in failures]
    registry = next(l.factory for l in server.service.listeners if l.kind == "imap").registry
    attached = in_reactor(lambda: {p: len(f.sessions) for p, f in registry.folders.items() if f.sessions})
    assert attached == {str(inbox): 1}  # only the session above; no session that left stays attached


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_client_leaving_mid_command_over_tls(start_server, certificate, tmp_path, mode):
    """The same over TLS, where the close comes through the TLS layer: commands on a long set."""
    from tests.test_tls_clients import IMPLICIT, Session
    from twisted_mail_screen.testing import EPHEMERAL

    cert, key = certificate
    server = start_server(kinds=KINDS, tls__certificate=cert, tls__key=key, listen__imap=[EPHEMERAL, IMPLICIT])
    failures: list[dict] = []

    def observe(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event)

    def tls_session() -> Session:
        s = Session(server, "imap", mode, certificate)
        s.send(b"l LOGIN " + USER + b" x\r\ns SELECT INBOX\r\n")
        assert s.until(b"s ")[-1].startswith(b"s OK")
        return s

    r = tls_session()
    body = b"Subject: x\r\n\r\nbody\r\n"
    r.send(b"".join(b"p%d APPEND INBOX {%d+}\r\n%s\r\n" % (i, len(body), body) for i in range(40)))
    assert r.until(b"p39 ")[-1].startswith(b"p39 OK")
    r.sock.close()
    long_set = b",".join([b"1:*"] * 700)
    globalLogPublisher.addObserver(observe)
    try:
        for command in [b"g FETCH " + long_set + b" (BODY[] FLAGS)", b"c COPY " + long_set + b" Sent",
                        b"s STORE " + long_set + b" +FLAGS (\\Seen)"] * 5:
            gone = tls_session()
            gone.send(b"u STORE 1:* -FLAGS.SILENT (\\Seen)\r\n")
            assert gone.until(b"u ")[-1].startswith(b"u OK")
            gone.send(command + b"\r\n")
            gone.sock.close()
        r = tls_session()  # everything before it is answered in order, so they are all over
        r.send(b"n NOOP\r\n")
        assert r.until(b"n ")[-1].startswith(b"n OK")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, [e["log_failure"].getTraceback()[-600:] for e in failures]
    registry = next(l.factory for l in server.service.listeners if l.kind == "imap").registry
    inbox = str(tmp_path / "data" / "mail" / "localhost" / "bob")
    attached = in_reactor(lambda: {p: len(f.sessions) for p, f in registry.folders.items() if f.sessions})
    assert attached == {inbox: 1}  # only the session above


def test_authenticate_plain_cancel_and_bad_responses(server):
    """SASL PLAIN (protocols/session.py): "*" after "+" cancels; "*" or bad base64 up front is BAD."""
    import base64

    r = Raw(server.port("imap"))
    r.send(b"a1 AUTHENTICATE PLAIN\r\n")
    assert r.line() == b"+ "
    r.send(b"*\r\n")
    assert r.line() == b"a1 BAD Authentication cancelled"
    r.send(b"a2 AUTHENTICATE PLAIN\r\n")
    assert r.line() == b"+ "
    r.send(b"!!notbase64\r\n")
    assert r.line().startswith(b"a2 BAD Cannot decode response")
    assert r.command(b"a3", b"AUTHENTICATE PLAIN *") == [b"a3 BAD Cannot decode response: invalid base64"]
    token = base64.b64encode(b"\0bob@localhost\0pw")
    r.send(b"a4 AUTHENTICATE PLAIN\r\n")
    assert r.line() == b"+ "
    r.send(token + b"\r\n")
    assert r.until(b"a4")[-1].startswith(b"a4 OK")
    r.close()
