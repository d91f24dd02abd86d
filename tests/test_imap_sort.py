"""
SORT and THREAD (RFC 5256) over real sockets with imaplib and a raw
client, the base-subject rules, the threading corner cases (missing Date,
duplicate Message-IDs, reference loops), and the folder header index that
SEARCH, SORT and THREAD read (persisted, updated on delivery and expunge,
rebuilt when broken).
"""

from __future__ import annotations

import imaplib
import marshal
import os
import poplib
import time
from array import array
from pathlib import Path

import pytest

from tests.test_imap import Raw
from tests.test_reactor_budget import ALICE, check, fill, mailbox, measured
from twisted_mail_screen.protocols.imap import headerdir, headerindex, sortcache
from twisted_mail_screen.protocols.imap.fetch import read_message
from twisted_mail_screen.protocols.imap.sortkeys import base_subject, fields_of
from twisted_mail_screen.protocols.imap.threads import references, render


@pytest.fixture
def site(start_server, accounts, tmp_path):
    return start_server(site=True, kinds=("smtp", "pop3", "imap"))


def login(server) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login(*ALICE)
    return m


def msg(subject: str | None = "s", date: str | None = "Mon, 7 Feb 2022 10:00:00 +0000",
        frm: str = "a@example.org", to: str = "b@example.test", cc: str | None = None,
        mid: str | None = None, refs: str | None = None, irt: str | None = None,
        body: str = "body\r\n") -> bytes:
    h = [f"From: {frm}", f"To: {to}"]
    for name, value in (("Subject", subject), ("Date", date), ("Cc", cc), ("Message-ID", mid),
                        ("References", refs), ("In-Reply-To", irt)):
        if value is not None:
            h.append(f"{name}: {value}")
    return ("\r\n".join(h) + "\r\n\r\n" + body).encode()


def append(m: imaplib.IMAP4, data: bytes, when: float = 1_600_000_000.0) -> None:
    typ, _ = m.append("INBOX", None, imaplib.Time2Internaldate(when), data)
    assert typ == "OK"


def numbers(data: list) -> list[int]:
    return [int(x) for x in data[0].split()]


# base subject (RFC 5256 section 2.1) ------------------------------------------------------


@pytest.mark.parametrize("subject,base,reply", [
    ("hello", "hello", False),
    ("Re: hello", "hello", True),
    ("RE: Re: re:hello", "hello", True),
    ("Fwd: hello (fwd)", "hello", True),
    ("hello (fwd) (FWD)  ", "hello", True),
    ("[list] Re: hello", "hello", True),
    ("Re [list]: hello", "hello", True),
    ("[fwd: Re: hello]", "hello", True),
    ("[list]", "[list]", False),  # a blob that is all there is stays
    ("  \t hello\r\n\tworld", "hello world", False),
    ("Fw: [x] [y] Re: z", "z", True),
    ("", "", False),
])
def test_base_subject(subject, base, reply):
    assert base_subject(subject) == (base, reply)


def test_non_ascii_subjects_are_decoded_before_extraction():
    f = fields_of(b"Subject: =?UTF-8?Q?Re:_=C3=89t=C3=A9?=\r\nFrom: \"X\" <Zed@example.org>\r\n\r\n")
    assert (f.subject, f.reply, f.from_) == ("E\u0301TE\u0301", True, "ZED")
    raw = fields_of("Subject: Re: Ünïcode\r\n\r\n".encode())
    assert raw.subject == "U\u0308NI\u0308CODE" and raw.reply


# SORT ------------------------------------------------------------------------------------


@pytest.fixture
def sortbox(site):
    m = login(site)
    append(m, msg("Re: beta", "Tue, 8 Feb 2022 10:00:00 +0000", "carol@x.org", "zoe@y.org",
                  cc="mike@z.org", body="x" * 300), when=1_600_000_300)
    append(m, msg("alpha", "Mon, 7 Feb 2022 10:00:00 +0000", "bob@x.org", "adam@y.org",
                  body="x" * 100), when=1_600_000_100)
    append(m, msg("[list] Gamma", None, "alice@x.org", "yan@y.org", cc="al@z.org",
                  body="x" * 200), when=1_600_000_200)  # no Date: its internal date is used
    append(m, msg("alpha", "Mon, 7 Feb 2022 10:00:00 +0000", "bob@x.org", "adam@y.org",
                  body="x" * 100), when=1_600_000_050)
    m.select("INBOX")
    yield m
    m.logout()


@pytest.mark.parametrize("criteria,expected", [
    ("(ARRIVAL)", [4, 2, 3, 1]),
    ("(REVERSE ARRIVAL)", [1, 3, 2, 4]),
    ("(DATE)", [3, 2, 4, 1]),  # 2020-09-13 internal date of 3 is before 2022
    ("(SUBJECT)", [2, 4, 1, 3]),  # alpha alpha beta gamma, ties by sequence
    ("(FROM)", [3, 2, 4, 1]),
    ("(TO)", [2, 4, 3, 1]),
    ("(CC)", [2, 4, 3, 1]),  # none, none, al, mike
    ("(SIZE)", [2, 4, 3, 1]),
    ("(REVERSE SIZE ARRIVAL)", [1, 3, 4, 2]),
    ("(SUBJECT REVERSE DATE)", [2, 4, 1, 3]),
])
def test_sort_keys(sortbox, criteria, expected):
    typ, data = sortbox.sort(criteria, "UTF-8", "ALL")
    assert typ == "OK" and numbers(data) == expected


def test_uid_sort_with_search_keys_and_charsets(sortbox):
    typ, data = sortbox.uid("SORT", "(SUBJECT)", "US-ASCII", "FROM", "bob")
    assert typ == "OK" and numbers(data) == [2, 4]
    typ, data = sortbox.sort("(DATE)", "UTF-8", "NOT", "SUBJECT", "alpha")
    assert numbers(data) == [3, 1]
    typ, data = sortbox.sort("(DATE)", "UTF-8", "SUBJECT", "nothing-like-this")
    assert typ == "OK" and data == [None] or data == [b""]


def test_sort_errors(site):
    r = Raw(site.port("imap"))
    r.command(b"l", f"LOGIN {ALICE[0]} {ALICE[1]}".encode())
    assert r.command(b"a", b"SORT (DATE) UTF-8 ALL")[-1] == b"a BAD SORT not allowed now"
    r.command(b"s", b"SELECT INBOX")
    assert r.command(b"b", b"SORT (DATE) KOI8-R ALL")[-1].startswith(b"b NO [BADCHARSET")
    assert r.command(b"c", b"SORT (WEIGHT) UTF-8 ALL")[-1].startswith(b"c BAD")
    assert r.command(b"d", b"SORT (REVERSE) UTF-8 ALL")[-1].startswith(b"d BAD")
    assert r.command(b"e", b"SORT DATE UTF-8 ALL")[-1].startswith(b"e BAD")
    assert r.command(b"f", b"SORT (DATE) UTF-8")[-1].startswith(b"f BAD")
    assert r.command(b"g", b"THREAD SIDEWAYS UTF-8 ALL")[-1].startswith(b"g BAD")
    assert r.command(b"h", b"UID SORT (DATE) UTF-8 BOGUS")[-1].startswith(b"h BAD")
    assert r.command(b"i", b"SORT () UTF-8 ALL")[-1].startswith(b"i BAD")
    assert r.command(b"j", b"SORT (DATE) UTF-8 ALL") == [b"* SORT", b"j OK SORT completed"]
    r.close()


def test_capabilities_announced(site):
    m = login(site)
    assert {"SORT", "THREAD=REFERENCES", "THREAD=ORDEREDSUBJECT"} <= set(m.capabilities)
    m.logout()


def test_sort_non_ascii_subjects_over_tls(start_server, accounts, certificate):
    cert, key = certificate
    server = start_server(site=True, kinds=("smtp", "pop3", "imap"),
                          tls__certificate=cert, tls__key=key)
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.starttls()
    m.login(*ALICE)
    append(m, msg("=?UTF-8?B?w4lsw6lwaGFudA==?="))  # "Éléphant"
    append(m, msg("Re: =?ISO-8859-1?Q?=E9cole?="))  # "école"
    append(m, msg("Zèbre".encode("utf-8").decode("latin-1")))  # raw 8-bit UTF-8
    append(m, msg("abeille"))
    m.select("INBOX")
    typ, data = m.sort("(SUBJECT)", "UTF-8", "ALL")
    assert numbers(data) == [4, 2, 1, 3]  # abeille, école, éléphant, zèbre (é after a, before z)
    m.logout()


# THREAD --------------------------------------------------------------------------------


def test_thread_orderedsubject(site):
    m = login(site)
    append(m, msg("Re: meet", "Mon, 7 Feb 2022 12:00:00 +0000"))
    append(m, msg("meet", "Mon, 7 Feb 2022 10:00:00 +0000"))
    append(m, msg("lunch", "Mon, 7 Feb 2022 11:00:00 +0000"))
    append(m, msg("Fwd: meet", "Mon, 7 Feb 2022 13:00:00 +0000"))
    append(m, msg("Re: lunch", "Mon, 7 Feb 2022 11:30:00 +0000"))
    append(m, msg("solo", "Mon, 7 Feb 2022 09:00:00 +0000"))
    m.select("INBOX")
    typ, data = m.thread("ORDEREDSUBJECT", "UTF-8", "ALL")
    assert typ == "OK" and data == [b"(6)(2 (1)(4))(3 5)"]
    typ, data = m.uid("THREAD", "ORDEREDSUBJECT", "UTF-8", "NOT", "SUBJECT", "solo")
    assert data == [b"(2 (1)(4))(3 5)"]
    m.logout()


def test_thread_references(site):
    m = login(site)
    d = "Mon, 7 Feb 2022 1{}:00:00 +0000".format
    append(m, msg("root", d(0), mid="<a@x>"))                                     # 1
    append(m, msg("Re: root", d(1), mid="<b@x>", refs="<a@x>"))                  # 2
    append(m, msg("Re: root", d(2), mid="<c@x>", refs="<a@x> <b@x>"))            # 3
    append(m, msg("Re: root", d(3), mid="<d@x>", refs="<a@x>"))                  # 4
    append(m, msg("orphan", d(4), mid="<e@x>", refs="<missing@x>"))              # 5
    append(m, msg("Re: other", d(5), mid="<f@x>", irt="<gone@x> <a@x>"))         # 6
    append(m, msg("Re: other", d(6), mid="<g@x>", irt="<gone@x>"))               # 7
    m.select("INBOX")
    typ, data = m.thread("REFERENCES", "UTF-8", "ALL")
    # 6 and 7 share an absent parent <gone@x> (a dummy with two children)
    assert typ == "OK" and data == [b"(1 (2 3)(4))(5)((6)(7))"]
    typ, data = m.uid("THREAD", "REFERENCES", "US-ASCII", "UID", "2:4")
    assert data == [b"((2 3)(4))"]  # 2 and 4 have the same absent parent <a@x>: a dummy root
    m.logout()


def test_thread_answers_kept_until_the_folder_changes(site, tmp_path, start_server):
    box = mailbox(tmp_path, ALICE[0])
    m = login(site)
    d = "Mon, 7 Feb 2022 1{}:00:00 +0000".format
    append(m, msg("root", d(0), mid="<a@x>"))                                     # 1
    append(m, msg("Re: root", d(1), mid="<b@x>", refs="<a@x>"))                  # 2
    append(m, msg("other", d(2), mid="<c@x>"))                                    # 3
    m.select("INBOX")
    assert m.thread("REFERENCES", "UTF-8", "ALL")[1] == [b"(1 2)(3)"]
    table = marshal.loads((box / sortcache.FILENAME).read_bytes())
    [key] = [k for k in table if k.startswith("THREAD REFERENCES")]
    # what is kept is what is answered: plant another answer under the same key
    table[key] = b"(3)(1 2)"
    (box / sortcache.FILENAME).write_bytes(marshal.dumps(table, 2))
    assert m.thread("REFERENCES", "UTF-8", "ALL")[1] == [b"(3)(1 2)"]
    assert m.thread("REFERENCES", "UTF-8", "NOT", "UID", "3")[1] == [b"(1 2)"]  # not the whole folder
    # a delivery, a flag change and an expunge by another session each make another key
    append(m, msg("Re: other", d(3), mid="<e@x>", refs="<c@x>"))                 # 4
    m.noop()
    assert m.thread("REFERENCES", "UTF-8", "ALL")[1] == [b"(1 2)(3 4)"]
    other = login(site)
    other.select("INBOX")
    other.store("1", "+FLAGS", "(\\Deleted)")
    other.expunge()
    other.logout()
    m.noop()
    assert m.thread("REFERENCES", "UTF-8", "ALL")[1] == [b"(1)(2 3)"]  # 2 lost its parent's message
    assert m.uid("THREAD", "REFERENCES", "UTF-8", "ALL")[1] == [b"(2)(3 4)"]  # kept apart: other numbers
    pop = poplib.POP3("127.0.0.1", site.port("pop3"))  # a POP3 client deletes "Re: root"
    pop.user(ALICE[0])
    pop.pass_(ALICE[1])
    [first] = [n for n in range(1, 4) if b"Message-ID: <b@x>" in pop.retr(n)[1]]
    pop.dele(first)
    pop.quit()
    m.noop()
    assert m.thread("REFERENCES", "UTF-8", "ALL")[1] == [b"(1 2)"]
    m.logout()
    site.stop()
    # while stopped: a message replaced by hand by another (the same count)
    [old] = [p for p in (box / "cur").iterdir() if b"<e@x>" in p.read_bytes()]
    data = msg("new root", d(5), mid="<n@x>")
    old.unlink()
    (box / "cur" / f"1700000000.M1P1Q1.host,S={len(data)}:2,").write_bytes(data)
    again = start_server(site=True, kinds=("smtp", "pop3", "imap"))
    m = login(again)
    m.select("INBOX")
    assert m.thread("REFERENCES", "UTF-8", "ALL")[1] == [b"(1)(2)"]  # other, new root
    m.logout()


def test_thread_references_merges_by_subject_and_handles_tricky_input(site):
    m = login(site)
    d = "Mon, 7 Feb 2022 1{}:00:00 +0000".format
    append(m, msg("topic", d(0), mid="<t1@x>"))                                   # 1
    append(m, msg("Re: topic", d(1), mid="<t2@x>"))                              # 2 no refs: by subject
    append(m, msg("dup", d(2), mid="<same@x>"))                                   # 3
    append(m, msg("dup", d(3), mid="<same@x>"))                                   # 4 duplicate id
    append(m, msg("loop", d(4), mid="<l1@x>", refs="<l2@x>"))                    # 5
    append(m, msg("loop", d(5), mid="<l2@x>", refs="<l1@x>"))                    # 6 loop
    append(m, msg("selfref", d(6), mid="<s@x>", refs="<s@x>"))                   # 7
    append(m, msg("undated", None, mid="<u@x>"), when=1_500_000_000)             # 8 oldest
    m.select("INBOX")
    typ, data = m.thread("REFERENCES", "UTF-8", "ALL")
    assert typ == "OK"
    # 5 made <l2@x> (then a dummy) 5's parent; 6 fills it, and its reference to 5 would
    # close a loop, so it is not linked
    assert data == [b"(8)(1 2)((3)(4))(6 5)(7)"]
    m.logout()


def test_thread_references_keeps_first_links_and_prunes_placeholders(site):
    m = login(site)
    d = "Mon, 7 Feb 2022 1{}:00:00 +0000".format
    append(m, msg("a", d(0), mid="<A@x>"))                                        # 1
    append(m, msg("c", d(1), mid="<C@x>"))                                        # 2
    append(m, msg("Re: a", d(2), mid="<B@x>", refs="<A@x>"))                     # 3
    append(m, msg("Re: a", d(3), mid="<D@x>", refs="<C@x> <B@x>"))               # 4
    append(m, msg("x", d(4), mid="<X@x>"))                                        # 5
    append(m, msg("Re: x", d(5), mid="<Y@x>", refs="<missing@x>"))               # 6
    m.select("INBOX")
    typ, data = m.thread("REFERENCES", "UTF-8", "ALL")
    # <B@x> keeps the parent its first mention gave it (not <C@x>); 6's absent parent is
    # pruned, so 6 is a root, a reply, and goes under 5 (same base subject)
    assert typ == "OK" and data == [b"(1 3 4)(2)(5 6)"]
    m.logout()


def test_deep_reference_chains_are_no_recursion():
    from twisted_mail_screen.protocols.imap.sortkeys import SortFields
    msgs = []
    for i in range(1, 3001):
        f = SortFields(float(i), "s", False, "", "", "", f"m{i}", (f"m{i - 1}",) if i > 1 else ())
        msgs.append((i, f, 0.0))
    out = render(references(msgs))
    assert out == ("(" + " ".join(str(i) for i in range(1, 3001)) + ")").encode()
    refs = tuple(f"r{j}" for j in range(5000))  # thousands of absent ancestors
    out = render(references([(1, SortFields(1.0, "s", False, "", "", "", "x", refs), 0.0)]))
    assert out == b"(1)"


# the header index -----------------------------------------------------------------------


def loaded_index(box: Path) -> headerindex.HeaderIndex:
    """The folder's header index as a server starting now finds it (its files read)."""
    index = headerindex.HeaderIndex(str(box))
    index.load()
    return index


def names_in(box: Path) -> list[str]:
    """The folder's messages as the index is given them: "cur/NAME", sorted."""
    return sorted("cur/" + n for n in os.listdir(box / "cur"))


def test_header_index_is_kept_in_step_and_persisted(site, tmp_path, start_server):
    box = mailbox(tmp_path, ALICE[0])
    m = login(site)
    append(m, msg("first needle"))
    append(m, msg("second", frm='"Second Sender" <s@example.org>', cc="c@example.org"))
    m.select("INBOX")
    typ, early = m.fetch("2", "(ENVELOPE)")  # read from the file: no index yet
    assert not (box / headerindex.FILENAME).exists()
    assert numbers(m.uid("SEARCH", None, "SUBJECT", "needle")[1]) == [1]
    index_file = box / headerindex.FILENAME
    assert index_file.exists()
    assert numbers(m.uid("SORT", "(REVERSE SUBJECT)", "UTF-8", "ALL")[1]) == [2, 1]
    # delivery after the index was built (and a SORT order kept for the folder as it was)
    append(m, msg("third NEEDLE"))
    m.noop()
    assert numbers(m.uid("SEARCH", None, "SUBJECT", "needle")[1]) == [1, 3]
    assert numbers(m.uid("SORT", "(REVERSE SUBJECT)", "UTF-8", "ALL")[1]) == [3, 2, 1]
    assert numbers(m.uid("SORT", "(REVERSE SUBJECT)", "UTF-8", "SUBJECT", "needle")[1]) == [3, 1]
    # flag changes do not hide a message; expunge removes it
    m.store("1", "+FLAGS", "(\\Deleted)")
    assert numbers(m.uid("SEARCH", None, "HEADER", "Subject", "needle")[1]) == [1, 3]
    m.expunge()
    assert numbers(m.uid("SEARCH", None, "SUBJECT", "needle")[1]) == [3]
    assert numbers(m.sort("(REVERSE SUBJECT)", "UTF-8", "ALL")[1]) == [2, 1]  # sequence numbers
    typ, from_files = m.fetch("1:*", "(ENVELOPE INTERNALDATE)")
    m.logout()
    site.stop()
    # after a restart, the entries on disk answer (the file is kept, not rebuilt)
    headerindex.forget(str(box))
    before = index_file.stat().st_ino
    again = start_server(site=True, kinds=("smtp", "pop3", "imap"))
    m = login(again)
    m.select("INBOX")
    assert numbers(m.uid("SORT", "(SUBJECT)", "UTF-8", "ALL")[1]) == [2, 3]
    assert numbers(m.uid("SEARCH", None, "SUBJECT", "needle")[1]) == [3]
    assert index_file.stat().st_ino == before
    assert (box / sortcache.FILENAME).exists()  # that SORT came from the order kept on disk
    # the first ENVELOPE/INTERNALDATE fetch after the restart takes the index's blocks
    typ, data = m.fetch("1:*", "(ENVELOPE INTERNALDATE)")
    assert typ == "OK" and data == from_files
    assert [time.mktime(imaplib.Internaldate2tuple(line)) for line in data] == [1_600_000_000.0] * 2
    assert b'"second"' in data[0] and b'"third NEEDLE"' in data[1]
    assert early[0].split(b" (ENVELOPE ", 1)[1][:-1] in data[0]  # the same text as from the file
    m.logout()


def test_header_index_torn_or_garbage_file_is_rebuilt(tmp_path):
    box = tmp_path / "box"
    fill(box, 3)
    rels = names_in(box)
    index = headerindex.HeaderIndex(str(box))
    with index.lock:
        headerindex.prepare(index)
        assert index.ensure(str(box), rels, read_message) == [0, 1, 2]
    data = (box / headerindex.FILENAME).read_bytes()
    (box / headerindex.FILENAME).write_bytes(data[:-5])  # a crash during an append
    torn = loaded_index(box)
    assert len(torn.bases) == 2  # the torn record dropped, the file rewritten without it
    assert len((box / headerindex.FILENAME).read_bytes()) < len(data) - 5
    assert torn.ensure(str(box), rels, read_message) == [0, 1, 2]
    assert torn.hits("x") == {0, 1, 2} and torn.hits("nowhere") == set()
    (box / headerindex.FILENAME).write_bytes(b"not an index at all")
    broken = loaded_index(box)
    assert broken.bases == [] and broken.ensure(str(box), rels, read_message) == [0, 1, 2]
    assert (box / headerindex.FILENAME).read_bytes().startswith(headerindex.MAGIC)


def _state(index: headerindex.HeaderIndex) -> tuple:
    return (index.bases, index.metas, index.starts, index.ends, index.by_base, index.unplain,
            index._joined())


def test_header_index_directory_is_used_and_a_stale_torn_or_foreign_one_ignored(tmp_path):
    box, other = tmp_path / "box", tmp_path / "other"
    fill(box, 300)
    fill(other, 300, body=b"other\n")
    rels = names_in(box)
    for b in (box, other):
        first = headerindex.HeaderIndex(str(b))
        first.load()
        first.ensure(str(b), names_in(b), read_message)
    walked = headerindex.HeaderIndex(str(box))
    walked.load()  # 300 records walked: the directory is written
    directory = box / headerdir.DIRNAME
    assert directory.read_bytes().startswith(headerdir.MAGIC)
    assert directory.stat().st_mode & 0o077 == 0
    loaded = loaded_index(box)
    assert _state(loaded) == _state(walked)
    assert loaded.hits("example.org") == set(range(300)) and loaded.hits("nowhere") == set()

    # the directory is what a load takes: a name planted in it shows
    covered, ino, head, tail, bases, *rest = marshal.loads(directory.read_bytes()[len(headerdir.MAGIC):])
    directory.write_bytes(headerdir.MAGIC + marshal.dumps(
        (covered, ino, head, tail, ["planted"] + bases[1:], *rest), 2))
    planted = loaded_index(box)
    assert planted.bases[0] == "planted" and planted.by_base["planted"] == 0

    # records appended after it: walked on top of it
    data = b"Subject: late\nFrom: a@example.org\n\nlate\n"
    for i in range(3):
        (box / "cur" / f"1700000000.M{i}P2Q1.host,S={len(data)}:2,").write_bytes(data)
    rels = names_in(box)
    directory.write_bytes(headerdir.MAGIC + marshal.dumps((covered, ino, head, tail, bases, *rest), 2))
    grown = loaded_index(box)
    assert grown.ensure(str(box), rels, read_message) == list(range(303))
    reloaded = loaded_index(box)
    assert _state(reloaded) == _state(grown) and len(reloaded.bases) == 303

    # torn, garbage, another folder's, or describing a file since rewritten: the records are walked
    good = directory.read_bytes()
    other_index = headerindex.HeaderIndex(str(other))
    other_index.load()  # writes other's directory
    for bad in (good[:len(good) // 2], b"garbage", headerdir.MAGIC + b"\xff\x00",
                (other / headerdir.DIRNAME).read_bytes()):
        directory.write_bytes(bad)
        again = headerindex.HeaderIndex(str(box))
        again.load()
        assert _state(again) == _state(reloaded)
        assert directory.read_bytes() != bad  # written again
    covered, ino, head, tail, bases, *rest = marshal.loads(good[len(headerdir.MAGIC):])
    directory.write_bytes(headerdir.MAGIC + marshal.dumps(
        (covered, ino, head, tail, ["planted"] + bases[1:], *rest), 2))
    copy = box / "copy"
    copy.write_bytes((box / headerindex.FILENAME).read_bytes())
    os.replace(copy, box / headerindex.FILENAME)  # the same octets in another file (a rewrite)
    again = loaded_index(box)
    assert _state(again) == _state(reloaded) and "planted" not in again.by_base


def test_header_index_directory_is_written_when_a_search_indexes_many_messages(tmp_path):
    # The first search after a restart must not walk every record of an index
    # a search (not a load) filled: the directory is written with the records.
    box = tmp_path / "box"
    fill(box, headerdir.WRITE_AFTER + 4)
    rels = names_in(box)
    index = loaded_index(box)
    index.ensure(str(box), rels, read_message)
    covered, ino = marshal.loads((box / headerdir.DIRNAME).read_bytes()[len(headerdir.MAGIC):])[:2]
    st = (box / headerindex.FILENAME).stat()
    assert (covered, ino) == (st.st_size, st.st_ino)
    restored = headerindex.HeaderIndex(str(box))
    assert headerdir.restore(restored, (box / headerindex.FILENAME).read_bytes(), st.st_ino) == covered
    restored.load()
    assert _state(restored) == _state(index)


def test_header_index_map_gives_the_entries_after_a_restart_until_a_name_changes(tmp_path):
    box = tmp_path / "box"
    fill(box, headerdir.WRITE_AFTER + 44)
    rels = names_in(box)
    first = loaded_index(box)
    entries = first.ensure(str(box), rels, read_message)
    assert (box / headerdir.MAPNAME).exists()
    restarted = loaded_index(box)
    assert restarted.ensure(str(box), rels, read_message) == entries
    assert restarted._by_base is None  # mapped: no name looked up, no name table built
    assert restarted.hits("example.org") == set(entries)
    # the map is what is taken: a planted one for these names and this index file shows
    identity, key, _ = marshal.loads((box / headerdir.MAPNAME).read_bytes())
    planted = list(reversed(entries))
    (box / headerdir.MAPNAME).write_bytes(marshal.dumps((identity, key, array("i", planted).tobytes()), 2))
    again = loaded_index(box)
    assert again.ensure(str(box), rels, read_message) == planted
    # a flag changed by hand (another name): looked up, and the map written again
    flagged = rels[:3] + [rels[3] + "F"] + rels[4:]
    os.rename(box / rels[3], box / flagged[3])
    renamed = loaded_index(box)
    assert renamed.ensure(str(box), flagged, read_message) == entries
    again = loaded_index(box)
    assert again.ensure(str(box), flagged, read_message) == entries and again._by_base is None
    # the index file replaced since (another inode): the map, planted for these names, is not taken
    identity, key, _ = marshal.loads((box / headerdir.MAPNAME).read_bytes())
    (box / headerdir.MAPNAME).write_bytes(marshal.dumps((identity, key, array("i", planted).tobytes()), 2))
    copy = box / "copy"
    copy.write_bytes((box / headerindex.FILENAME).read_bytes())
    os.replace(copy, box / headerindex.FILENAME)
    replaced = loaded_index(box)
    assert replaced.ensure(str(box), flagged, read_message) == entries


def test_header_index_a_name_indexed_twice_keeps_the_later_entry(tmp_path):
    box = tmp_path / "box"
    os.makedirs(box)
    records = [headerindex._record("a", 1.0, (), None, b"Subject: %s\r\n\r\n" % s) for s in (b"old", b"new")]
    (box / headerindex.FILENAME).write_bytes(headerindex.MAGIC + b"".join(records))
    index = loaded_index(box)
    assert index.by_base == {"a": 1} and index.ends[0] == -2
    assert index.hits("old") == set() and index.hits("new") == {1}


def test_sort_orders_kept_on_disk(tmp_path):
    box = tmp_path / "box"
    os.makedirs(box)
    rels = ["cur/a:2,", "cur/b:2,S", "cur/c:2,"]
    key = sortcache.key_of([("DATE", True)], rels)
    assert sortcache.lookup(str(box), key, 3) is None
    sortcache.store(str(box), key, [2, 0, 1])
    assert sortcache.lookup(str(box), key, 3) == [2, 0, 1]
    assert sortcache.lookup(str(box), key, 2) is None  # positions past the folder: not used
    assert key != sortcache.key_of([("DATE", True)], ["cur/a:2,S"] + rels[1:])  # a flag changed
    assert key != sortcache.key_of([("DATE", False)], rels)
    for i in range(sortcache.KEEP + 2):
        sortcache.store(str(box), f"k{i}", [0])
    assert sortcache.lookup(str(box), key, 3) is None  # the oldest went
    (box / sortcache.FILENAME).write_bytes(b"garbage")
    assert sortcache.lookup(str(box), "k9", 3) is None


def test_header_index_compacts_expunged_entries(tmp_path):
    box = tmp_path / "box"
    fill(box, 300)
    rels = names_in(box)
    index = loaded_index(box)
    index.ensure(str(box), rels, read_message)
    size = (box / headerindex.FILENAME).stat().st_size
    assert index.ensure(str(box), rels[:10], read_message) == list(range(10))  # 290 expunged
    assert len(index.bases) == 10
    assert (box / headerindex.FILENAME).stat().st_size < size / 20


def test_sort_of_a_large_folder_leaves_the_reactor_free(site, tmp_path):
    fill(mailbox(tmp_path, ALICE[0]), 5000)
    r = Raw(site.port("imap"))
    r.command(b"l", f"LOGIN {ALICE[0]} {ALICE[1]}".encode())
    r.command(b"s", b"SELECT INBOX")
    for cmd in (b"SORT (SUBJECT REVERSE DATE) UTF-8 ALL", b"THREAD REFERENCES UTF-8 ALL",
                b"SEARCH HEADER Subject zzz"):
        t = time.monotonic()
        worst, lines = measured(site.port("imap"), lambda: r.command(b"t", cmd))
        assert lines[-1].startswith(b"t OK"), lines[-1]
        check(worst, f"{cmd.decode()} of 5000 messages ({time.monotonic() - t:.2f} s)")
    r.close()
