"""
CONDSTORE and QRESYNC (RFC 7162) over real sockets: the RFC's examples
with imaplib (raw sockets where imaplib cannot: SELECT parameters,
VANISHED), mod-sequences kept across a restart, and changes made by POP3,
by delivery, by the web API and by hand on the Maildir each bumping them.
"""

from __future__ import annotations

import gc
import imaplib
import os
import poplib
import re
import smtplib
import socket

import pytest
from twisted.internet.task import Clock

from twisted_mail_screen.store import modseqlist
from webclient import call

USER = "alice@example.test"
KINDS = ("smtp", "imap", "pop3", "web")


def send(server, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as s:
        s.sendmail("a@example.org", [USER], f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def login(server) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login(USER, "x")
    return m


class Raw:
    """A line-level IMAP client: sends a tagged command, returns the untagged lines and the tagged one."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.n = 0

    def __call__(self, command: str) -> tuple[list[str], str]:
        self.n += 1
        tag = f"t{self.n}"
        self.sock.sendall(f"{tag} {command}\r\n".encode())
        lines = []
        while True:
            line = self.file.readline().decode().rstrip("\r\n")
            assert line, "connection closed"
            if line.startswith(tag + " "):
                return lines, line[len(tag) + 1:]
            lines.append(line)

    def close(self) -> None:
        self("LOGOUT")
        self.sock.close()


def raw_login(server) -> Raw:
    r = Raw(server.port("imap"))
    assert r(f"LOGIN {USER} x")[1].startswith("OK")
    return r


def modseqs(lines: list[str]) -> dict[int, int]:
    """UID -> MODSEQ of the FETCH lines."""
    out = {}
    for line in lines:
        m = re.search(r"UID (\d+).*MODSEQ \((\d+)\)", line)
        if m:
            out[int(m.group(1))] = int(m.group(2))
    return out


def highest(lines: list[str]) -> int:
    for line in lines:
        m = re.search(r"HIGHESTMODSEQ (\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError(lines)


def folder(tmp_path):
    return tmp_path / "data" / "mail" / "example.test" / "alice"


def file_of(cur, subject: str) -> str:
    """
    The name of the message C{send(server, subject)} stored: names do not
    sort in delivery order (the microseconds after C{M} are not padded).
    """
    [name] = [n for n in os.listdir(cur)
              if f"Subject: {subject}\n".encode() in (cur / n).read_bytes().replace(b"\r\n", b"\n")]
    return name


@pytest.fixture
def server(start_server):
    return start_server(kinds=KINDS)


def test_condstore_rfc_examples_with_imaplib(server):
    for i in range(4):
        send(server, f"m{i}")
    m = login(server)
    assert "CONDSTORE" in m.capabilities and "QRESYNC" in m.capabilities
    typ, data = m.status("INBOX", "(MESSAGES HIGHESTMODSEQ)")
    assert typ == "OK" and b"HIGHESTMODSEQ" in data[0]
    typ, data = m.select("INBOX")
    start = int(m.untagged_responses["HIGHESTMODSEQ"][0])
    assert start >= 1
    # 3.1.4: FETCH ... (CHANGEDSINCE n): nothing changed yet after start.
    typ, data = m.fetch("1:*", "(UID FLAGS) (CHANGEDSINCE %d)" % start)
    assert typ == "OK" and data == [None]
    typ, data = m.fetch("1:*", "(UID FLAGS MODSEQ)")
    before = {int(re.search(rb"UID (\d+)", d).group(1)): int(re.search(rb"MODSEQ \((\d+)\)", d).group(1))
              for d in data}
    assert len(before) == 4 and max(before.values()) == start
    # 3.1.3: STORE with UNCHANGEDSINCE; a message changed since fails with [MODIFIED].
    typ, data = m.store("2", "+FLAGS", "\\Seen")
    changed = int(re.search(rb"MODSEQ \((\d+)\)", data[0]).group(1))
    assert changed > start
    typ, data = m.store("1:3", "(UNCHANGEDSINCE %d) +FLAGS.SILENT" % start, "(\\Flagged)")
    assert typ == "OK" and len(data) == 2 and all(re.fullmatch(rb"[13] \(MODSEQ \(\d+\)\)", d) for d in data)
    assert m.untagged_responses.pop("MODIFIED") == [b"2"]  # the tagged OK's [MODIFIED 2]
    typ, data = m.fetch("1:*", "(UID FLAGS) (CHANGEDSINCE %d)" % changed)
    got = b" ".join(d for d in data)
    assert b"\\Flagged" in got and got.count(b"MODSEQ") == 2 and b"UID 2 " not in got
    # 3.1.5: SEARCH MODSEQ, with the highest mod-sequence of the matches.
    typ, data = m.search(None, "MODSEQ", str(changed + 1))
    assert re.fullmatch(rb"1 3 \(MODSEQ \d+\)", data[0]), data
    typ, data = m.uid("SEARCH", "MODSEQ", '"/flags/\\\\draft"', "all", str(start + 1000))
    assert data == [b""]
    typ, data = m.search(None, "OR", "MODSEQ", str(changed), "DELETED")
    assert data[0].startswith(b"1 2 3 (MODSEQ ")
    typ, data = m.status("INBOX", "(HIGHESTMODSEQ)")
    assert int(re.search(rb"HIGHESTMODSEQ (\d+)", data[0]).group(1)) > changed
    m.logout()


def test_qresync_select_vanished_and_fetch(server):
    for i in range(5):
        send(server, f"m{i}")
    r = raw_login(server)
    assert r("SELECT INBOX (QRESYNC (1 1))")[1].startswith("BAD")  # not enabled yet
    lines, ok = r("ENABLE QRESYNC")
    assert lines == ["* ENABLED QRESYNC"] and ok.startswith("OK")
    lines, ok = r("SELECT INBOX (CONDSTORE)")
    validity = int(re.search(r"UIDVALIDITY (\d+)", " ".join(lines)).group(1))
    known = highest(lines)
    r("STORE 2,4 +FLAGS.SILENT (\\Deleted)")
    lines, ok = r("EXPUNGE")
    assert "* VANISHED 2,4" in lines and not any("EXPUNGE" in x for x in lines)
    r("UID STORE 5 +FLAGS (\\Seen)")
    r("CLOSE")
    lines, ok = r(f"SELECT INBOX (QRESYNC ({validity} {known} 1:5))")
    assert ok.startswith("OK")
    assert "* VANISHED (EARLIER) 2,4" in lines
    fetched = [x for x in lines if "FETCH" in x]
    assert len(fetched) == 1 and "UID 5 " in fetched[0] and "\\Seen" in fetched[0]
    assert highest(lines) > known
    # Another UIDVALIDITY: nothing but the ordinary SELECT responses, after [CLOSED] for the old one.
    lines, ok = r(f"SELECT INBOX (QRESYNC ({validity + 1} {known}))")
    assert lines[0] == "* OK [CLOSED] Previous mailbox closed"
    assert not any("VANISHED" in x or "FETCH" in x for x in lines)
    lines, ok = r(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {known} VANISHED)")
    assert lines[0] == "* VANISHED (EARLIER) 2,4" and len(lines) == 2 and "UID 5 " in lines[1]
    assert r(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {known} VANISHED)")[1].startswith("BAD")
    r.close()


@pytest.mark.parametrize("command", [
    "FETCH 1 (FLAGS) (CHANGEDSINCE)", "FETCH 1 (FLAGS) (CHANGEDSINCE x)",
    "FETCH 1 (FLAGS) (CHANGEDSINCE 99999999999999999999)", "FETCH 1 (FLAGS) (BOGUS 1)",
    "FETCH 1 (FLAGS) ()", "STORE 1 (UNCHANGEDSINCE) +FLAGS (\\Seen)",
    "STORE 1 (UNCHANGEDSINCE -1) +FLAGS (\\Seen)", "STORE 1 (SOMETHING 1) +FLAGS (\\Seen)",
    "SEARCH MODSEQ", "SEARCH MODSEQ x", 'SEARCH MODSEQ "/flags/\\\\seen" nonsense 1',
    "UID FETCH 1:* (FLAGS) (VANISHED)", "SELECT INBOX (BOGUS)",
    "SELECT INBOX (QRESYNC (0 1))",
])
def test_bad_modifiers_are_answered_bad(server, command):
    send(server, "m")
    r = raw_login(server)
    r("SELECT INBOX")
    lines, reply = r(command)
    assert reply.startswith("BAD"), (command, reply)
    assert r("NOOP")[1].startswith("OK")
    r.close()


def test_modseqs_persist_and_follow_pop3_delivery_web_and_disk(server, start_server, tmp_path):
    for i in range(3):
        send(server, f"m{i}")
    r = raw_login(server)
    r("ENABLE QRESYNC")
    lines, _ = r("SELECT INBOX")
    validity = int(re.search(r"UIDVALIDITY (\d+)", " ".join(lines)).group(1))
    r("STORE 1 +FLAGS (\\Answered)")
    lines, _ = r("FETCH 1:* (MODSEQ)")
    known = modseqs(lines)
    mark = highest(r("SELECT INBOX")[0])
    r.close()
    server.stop()
    # The file older code reads is unchanged in form; ours sits beside it.
    assert (folder(tmp_path) / "dovecot-uidlist").read_text().startswith(f"3 V{validity} N4")
    saved, why = modseqlist.load(str(folder(tmp_path)))
    assert why is None and (saved.uidvalidity, saved.highest) == (validity, mark)
    # A flag change made by hand while the server is down.
    cur = folder(tmp_path) / "cur"
    name = file_of(cur, "m2")
    os.rename(cur / name, cur / (name.split(":2,")[0] + ":2,F"))
    server = start_server(kinds=KINDS)
    r = raw_login(server)
    r("ENABLE QRESYNC")
    lines, _ = r(f"SELECT INBOX (QRESYNC ({validity} {mark}))")
    assert modseqs(lines).keys() == {3} and highest(lines) > mark
    lines, _ = r("FETCH 1:2 (MODSEQ)")
    assert modseqs(lines) == {u: known[u] for u in (1, 2)}  # kept across the restart
    mark = highest(r("SELECT INBOX")[0])
    # Delivery, the web API's read flag, and a POP3 deletion.
    send(server, "m3")
    ids = [m["ID"] for m in call(server.port("web"), "GET", "/api/v1/messages").json["messages"]]
    assert call(server.port("web"), "PUT", "/api/v1/messages", {"IDs": ids[-1:], "Read": True}).body == b"ok"
    p = poplib.POP3("127.0.0.1", server.port("pop3"))
    p.user(USER)
    p.pass_("x")
    p.dele(2)
    p.quit()
    r("NOOP")
    lines, _ = r(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {mark} VANISHED)")
    assert lines[0] == "* VANISHED (EARLIER) 2"
    changed = modseqs(lines)
    assert set(changed) == {1, 4} and min(changed.values()) > mark  # uid 1 is the oldest: read via the web
    lines, _ = r("STATUS INBOX (HIGHESTMODSEQ)")
    mark = int(re.search(r"HIGHESTMODSEQ (\d+)", lines[0]).group(1))
    assert mark >= max(changed.values())
    # The web API's delete of the newest (uid 4) is an expunge with a mod-sequence too.
    assert call(server.port("web"), "DELETE", "/api/v1/messages", {"IDs": ids[:1]}).body == b"ok"
    lines, _ = r("NOOP")
    assert "* VANISHED 4" in lines
    lines, _ = r(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {mark} VANISHED)")
    assert lines == ["* VANISHED (EARLIER) 4"]
    assert highest(r("SELECT INBOX")[0]) > mark
    r.close()


def test_file_format_torn_and_corrupt(tmp_path):
    data = b"1 V7 H9 F0\n1 5 =S\n2 6 =\n-3 8\n1 9 =SF\n2 1"
    parsed = modseqlist.parse(data)
    assert (parsed.highest, parsed.entries, parsed.tombstones) == (9, {1: (9, "SF"), 2: (6, "")}, [(8, 3)])
    for bad in (b"2 V7 H9 F0\n", b"1 V7 H9 F0\nx 1 =\n", b"1 V7 H9 F0\n1 2 S\n", b"\xff\n"):
        with pytest.raises(modseqlist.ModSeqListCorrupt):
            modseqlist.parse(bad)


# The reactor while whole-folder CONDSTORE/QRESYNC commands run (tests/test_reactor_budget.py's probe).

BIG = 5000  # as tests/test_reactor_budget.py's whole-folder cases


def test_whole_folder_condstore_commands_keep_the_reactor_free(start_server, accounts, tmp_path):
    from tests.test_reactor_budget import ALICE, Client, check, fill, mailbox, measured
    fill(mailbox(tmp_path, ALICE[0]), BIG)
    server = start_server(site=True, kinds=("smtp", "pop3", "imap"))
    port = server.port("imap")
    c = Client(port)
    assert c.command(b"e", b"ENABLE QRESYNC")[-1].startswith(b"e OK")
    lines = c.command(b"s", b"SELECT INBOX")
    validity = int(re.search(rb"UIDVALIDITY (\d+)", b" ".join(lines)).group(1))
    start = int(re.search(rb"HIGHESTMODSEQ (\d+)", b" ".join(lines)).group(1))
    half = BIG // 2
    for what, tag, text in (
            ("STORE 1:* +FLAGS", b"a", b"STORE 1:* +FLAGS (\\Flagged)"),
            ("SEARCH MODSEQ", b"b", b"SEARCH MODSEQ %d" % (start + 1)),
            ("FETCH CHANGEDSINCE", b"c", b"FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % start),
            ("STORE UNCHANGEDSINCE", b"d", b"STORE 1:%d (UNCHANGEDSINCE %d) +FLAGS.SILENT (\\Deleted)"
             % (half, start + BIG)),
            ("EXPUNGE as VANISHED", b"f", b"EXPUNGE"),
            ("SELECT QRESYNC", b"g", b"SELECT INBOX (QRESYNC (%d %d 1:%d))" % (validity, start, BIG)),
            ("UID FETCH VANISHED", b"h", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % start)):
        # A full collection of the test process's heap (clients and server share it) is not the
        # command's: start each with the collector's counts at zero.
        gc.collect()
        worst, (line, size) = measured(port, lambda: c.drain(tag, text))
        assert line.startswith(tag + b" OK"), line
        # Each answered a line per message, but for EXPUNGE's one "* VANISHED 1:2500".
        assert size > (half * 8 if tag != b"f" else 0), (what, size)
        check(worst, what)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_qresync_over_tls_with_imaplib(start_server, certificate, mode):
    import ssl

    from twisted_mail_screen.testing import EPHEMERAL
    cert, key = certificate
    server = start_server(kinds=("smtp", "imap"), tls__certificate=cert, tls__key=key,
                          listen__imap=[EPHEMERAL, "ssl:0:interface=127.0.0.1"])
    for i in range(3):
        send(server, f"m{i}")
    context = ssl.create_default_context(cafile=cert)
    plain, implicit = server.service.ports("imap")
    if mode == "implicit":
        m = imaplib.IMAP4_SSL("127.0.0.1", implicit, ssl_context=context)
    else:
        m = imaplib.IMAP4("127.0.0.1", plain)
        m.starttls(context)
    m.login(USER, "x")
    assert m.enable("QRESYNC")[0] == "OK" and m.untagged_responses.pop("ENABLED") == [b"QRESYNC"]
    m.select("INBOX")
    start = int(m.untagged_responses.pop("HIGHESTMODSEQ")[0])
    m.store("2", "+FLAGS.SILENT", "(\\Deleted)")
    typ, data = m.expunge()
    assert typ == "OK" and m.untagged_responses.pop("VANISHED") == [b"2"]
    typ, data = m.uid("FETCH", "1:*", "(FLAGS)", "(CHANGEDSINCE %d VANISHED)" % start)
    assert m.untagged_responses.pop("VANISHED") == [b"(EARLIER) 2"] and data == [None]
    m.logout()


def test_lost_or_corrupt_modseq_file_restarts_above_every_value_given(server, start_server, tmp_path):
    for i in range(2):
        send(server, f"m{i}")
    r = raw_login(server)
    r("SELECT INBOX")
    r("STORE 1:* +FLAGS (\\Seen)")
    before = highest(r("SELECT INBOX")[0])
    r.close()
    server.stop()
    path = folder(tmp_path) / modseqlist.FILENAME
    for damage in (lambda: path.write_bytes(b"garbage\n"), path.unlink):
        damage()
        server = start_server(kinds=KINDS)
        r = raw_login(server)
        lines, _ = r("SELECT INBOX")
        after = highest(lines)
        assert after > before  # a client that knew `before` still sees every later change
        lines, _ = r(f"FETCH 1:* (UID FLAGS) (CHANGEDSINCE {before})")
        assert set(modseqs(lines)) == {1, 2}
        r.close()
        server.stop()
        before = after


def test_changes_by_another_process_on_the_folder_get_higher_modseqs(server, tmp_path):
    """Another server on the same Maildir appends its mod-sequences; ours go above them."""
    for i in range(2):
        send(server, f"m{i}")
    r = raw_login(server)
    r("ENABLE CONDSTORE")
    mark = highest(r("SELECT INBOX")[0])
    theirs = mark + 1000
    box = folder(tmp_path)
    cur = box / "cur"
    name = file_of(cur, "m0")
    # What the other process does for a STORE 1 +FLAGS (\Flagged): rename, then append its line.
    os.rename(cur / name, cur / (name.split(":2,")[0] + ":2,F"))
    with open(box / modseqlist.FILENAME, "a") as f:
        f.write(f"1 {theirs} =F\n")
    lines, _ = r("NOOP")
    assert modseqs(lines)[1] > theirs, lines
    lines, _ = r(f"FETCH 1:* (UID FLAGS) (CHANGEDSINCE {theirs})")
    assert set(modseqs(lines)) == {1}
    r.close()


def test_values_another_process_gave_out_unseen_are_caught_up_before_ours_are_written(server, tmp_path):
    """
    Another server on the same Maildir gave out mod-sequences this one has
    not seen (no file of ours changed, so no rescan reads them): under the
    folder's lock, before writing, ours are moved above them, for flag
    changes and expunges alike, and the file stays ascending.
    """
    for i in range(3):
        send(server, f"m{i}")
    r = raw_login(server)
    r("ENABLE QRESYNC")
    mark = highest(r("SELECT INBOX")[0])
    box = folder(tmp_path)
    theirs = mark + 500
    with open(box / modseqlist.FILENAME, "a") as f:  # as if it changed a message of another folder view
        f.write(f"99 {theirs} =S\n")
    lines, ok = r("UID STORE 1 +FLAGS (\\Flagged)")
    assert ok.startswith("OK")
    assert modseqs(lines) == {1: theirs + 1}
    with open(box / modseqlist.FILENAME, "a") as f:
        f.write(f"-98 {theirs + 10}\n")
    r("UID STORE 2 +FLAGS (\\Deleted)")
    lines, ok = r("EXPUNGE")
    assert ok.startswith("OK")
    lines, _ = r(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {theirs + 10} VANISHED)")
    assert lines[0] == "* VANISHED (EARLIER) 2", lines  # the expunge is above their values
    assert modseqs(lines) == {}  # the STORE of 1 was below them, and 3 never changed
    r.close()
    written = [int(line.split()[1]) for line in (box / modseqlist.FILENAME).read_text().splitlines()[1:]]
    tail = written[-5:]
    assert tail == sorted(set(tail)), written


def test_an_idle_session_is_told_the_mod_sequence_as_written(server, tmp_path):
    """
    Another session's change is told to an IDLE session only once its
    mod-sequence is final: after it was moved above what another process
    had given out, not with the value first counted in memory.
    """
    send(server, "m0")
    watcher, writer = raw_login(server), raw_login(server)
    watcher("ENABLE CONDSTORE")
    mark = highest(watcher("SELECT INBOX")[0])
    writer("SELECT INBOX")
    theirs = mark + 500
    with open(folder(tmp_path) / modseqlist.FILENAME, "a") as f:  # another process's change
        f.write(f"99 {theirs} =S\n")
    watcher.sock.sendall(b"i IDLE\r\n")
    assert watcher.file.readline().startswith(b"+")
    lines, ok = writer("UID STORE 1 +FLAGS (\\Flagged)")
    assert ok.startswith("OK")
    told = watcher.file.readline().decode()
    assert re.search(rf"MODSEQ \({theirs + 1}\)", told), told
    watcher.sock.sendall(b"DONE\r\n")
    assert watcher.file.readline().startswith(b"i OK")
    watcher.close()
    writer.close()


def test_unchangedsince_sees_a_change_another_process_made_since_the_last_poll(start_server, tmp_path):
    """
    Another server on the same Maildir flagged a message (renamed its file,
    appended its mod-sequence) and this one's poll has not run (its clock
    stands still): a conditional STORE looks at the folder first, so the
    change counts and the STORE answers [MODIFIED].
    """
    server = start_server(kinds=KINDS, clock=Clock())
    send(server, "m0")
    r = raw_login(server)
    r("ENABLE CONDSTORE")
    mark = highest(r("SELECT INBOX")[0])
    box = folder(tmp_path)
    name = file_of(box / "cur", "m0")
    os.rename(box / "cur" / name, box / "cur" / (name.split(":2,")[0] + ":2,F"))
    with open(box / modseqlist.FILENAME, "a") as f:
        f.write(f"1 {mark + 1} =F\n")
    lines, ok = r(f"UID STORE 1 (UNCHANGEDSINCE {mark}) +FLAGS (\\Seen)")
    assert ok.startswith("OK [MODIFIED 1]"), (lines, ok)
    r.close()
