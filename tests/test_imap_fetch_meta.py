"""
FETCH of index-only items (UID, FLAGS, RFC822.SIZE, INTERNALDATE,
ENVELOPE, MODSEQ) rendered a column at a time (protocols/imap/fetchmeta.py),
over a real socket: the same octets as the general row-by-row path, from
the files, from the header index and from the FETCH cache; a session whose
view lags the folder (another session expunged) gets the rows of the
messages still there under its own sequence numbers; \\Recent, keywords
and messages whose names carry no size.
"""

from __future__ import annotations

import os
import re
from array import array
from types import SimpleNamespace

import pytest

from tests.test_imap import Raw
from tests.test_reactor_budget import ALICE, mailbox
from twisted_mail_screen.protocols.imap.fetchmeta import column_chunks

ITEMS = b"(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)"
# An item that is not index-only sends the same FETCH the general way (it adds an empty item).
GENERAL = b"(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODY.PEEK[HEADER.FIELDS (X-NONE)])"
EMPTY_ITEM = re.compile(rb' BODY\[HEADER\.FIELDS \("?X-NONE"?\)\] \{2\}$')


@pytest.fixture
def site(start_server, accounts, tmp_path):
    return start_server(site=True, kinds=("smtp", "pop3", "imap"))


def populate(box, n: int = 4500) -> None:
    """More than two chunks; flags, keywords, unsized names and new/ (\\Recent) messages."""
    for sub in ("cur", "new", "tmp"):
        os.makedirs(box / sub, exist_ok=True)
    (box / "dovecot-keywords").write_text("0 $Work\n1 Later\n")
    for i in range(n):
        data = (f"Subject: =?UTF-8?Q?caf=C3=A9_{i}?=\nFrom: \"S {i % 7}\" <s{i % 7}@example.org>\n"
                f"To: b@example.test\nDate: Mon, {1 + i % 28} Feb 2022 10:00:00 +0000\n"
                f"Message-ID: <{i}@example.org>\n\n" + "x" * (i % 50) + "\n").encode()
        base = f"{1600000000 + i}.M{i}P1Q1.host"
        if i % 5:
            wsize = len(data) + data.count(b"\n")
            base += f",S={len(data)},W={wsize}"  # else the scan counts it
        if i % 97 == 3:
            path = box / "new" / base  # \\Recent for the session that claims it
        else:
            path = box / "cur" / (base + ":2," + ["", "S", "FS", "Sa", "Rab"][i % 5])
        path.write_bytes(data)
        os.utime(path, (1_600_000_000 + i, 1_600_000_000 + i))


def fetch(r: Raw, tag: bytes, what: bytes, items: bytes) -> list[bytes]:
    lines = r.command(tag, b"FETCH " + what + b" " + items)
    assert lines[-1] == tag + b" OK FETCH completed", lines[-1]
    return lines[:-1]


def general(r: Raw, tag: bytes, what: bytes) -> list[bytes]:
    """The row-by-row answer, its extra item (a literal of two octets) taken out again."""
    r.send(tag + b" FETCH " + what + b" " + GENERAL + b"\r\n")
    out = []
    while True:
        line = r.line()
        if line.startswith(tag + b" "):
            assert line == tag + b" OK FETCH completed"
            return out
        assert EMPTY_ITEM.search(line), line
        assert (r.line(), r.line()) == (b"", b")")  # the literal (CRLF), then the line's end
        out.append(EMPTY_ITEM.sub(b"", line) + b")")


def test_index_only_fetch_is_the_general_answer_from_files_index_and_cache(site, start_server, tmp_path):
    box = mailbox(tmp_path, ALICE[0])
    populate(box)
    r = Raw(site.port("imap"))
    r.command(b"l", f"LOGIN {ALICE[0]} {ALICE[1]}".encode())
    r.command(b"s", b"SELECT INBOX")
    expected = general(r, b"a", b"1:*")
    assert len(expected) == 4500
    assert b"\\Recent" in expected[3] and b"$Work Later" in expected[4]
    assert b"RFC822.SIZE" in expected[0] and b'"=?UTF-8?Q?caf=C3=A9_0?="' in expected[0]
    assert fetch(r, b"b", b"1:*", ITEMS) == expected  # from the files (no header index yet)
    r.command(b"c", b"SEARCH HEADER Subject nothing-like-this")  # builds the header index
    assert fetch(r, b"d", b"1:*", ITEMS) == expected  # from the cache (what the files gave)
    r.close()
    site.stop()
    site = start_server(site=True, kinds=("smtp", "pop3", "imap"))  # nothing cached
    r = Raw(site.port("imap"))  # another session: nothing \\Recent for it now
    r.command(b"l", f"LOGIN {ALICE[0]} {ALICE[1]}".encode())
    r.command(b"s", b"EXAMINE INBOX")
    indexed = fetch(r, b"b", b"1:*", ITEMS)  # from the header index (the general way would fill the cache)
    expected = general(r, b"a", b"1:*")
    assert not any(b"\\Recent" in x for x in expected)
    assert indexed == expected
    assert fetch(r, b"e", b"1:*", ITEMS) == expected  # again
    parts = b"2,5:7,400:650,1990:2010,4499:*"  # ranges across chunk boundaries
    assert fetch(r, b"c", parts, ITEMS) == general(r, b"d", parts)
    r.close()


def test_a_session_behind_the_folder_gets_its_own_numbers(site, tmp_path):
    box = mailbox(tmp_path, ALICE[0])
    populate(box, 1200)
    a, b = Raw(site.port("imap")), Raw(site.port("imap"))
    for r in (a, b):
        r.command(b"l", f"LOGIN {ALICE[0]} {ALICE[1]}".encode())
        r.command(b"s", b"SELECT INBOX")
    before = fetch(a, b"a", b"1:*", b"(UID FLAGS RFC822.SIZE)")
    # b expunges every third message of the first chunk and a few later; a has not been told
    gone = [u for u in range(1, 1201) if (u < 500 and u % 3 == 0) or u in (700, 1199)]
    b.command(b"d", b"UID STORE " + ",".join(map(str, gone)).encode() + b" +FLAGS.SILENT (\\Deleted)")
    assert b.command(b"e", b"EXPUNGE")[-1] == b"e OK EXPUNGE completed"
    b.command(b"f", b"UID STORE 10 +FLAGS.SILENT (\\Flagged)")
    got = fetch(a, b"g", b"1:*", b"(UID FLAGS RFC822.SIZE)")
    fetched = [line for line in got if b"RFC822.SIZE" in line]  # not the flag update of UID 10
    kept = [line for line in before if int(line.split(b"(UID ")[1].split()[0]) not in gone]
    # the same sequence numbers as before (a has seen no EXPUNGE), the gone ones left out
    assert [x.split(b" FLAGS")[0] for x in fetched] == [x.split(b" FLAGS")[0] for x in kept]
    uid10 = [x for x in fetched if b"(UID 10 " in x]
    assert b"\\Flagged" in uid10[0]  # the flags as they are now
    assert a.command(b"n", b"NOOP")[-1] == b"n OK NOOP completed"
    after = fetch(a, b"h", b"1:*", b"(UID FLAGS RFC822.SIZE)")
    assert len(after) == 1200 - len(gone)
    assert after[0].startswith(b"* 1 FETCH (UID 1 ") and after[-1].startswith(b"* %d FETCH (UID 1200 " % len(after))
    a.close()
    b.close()


@pytest.mark.parametrize("ranges", [[(0, 1200)], [(0, 3), (5, 1200)], [(i, i + 1) for i in range(0, 1200, 2)],
                                    [(0, 1), (0, 1), (0, 1)], [(600, 601), (10, 900)]])
def test_column_chunks_cover_the_ranges_in_bounded_chunks(ranges):
    uids = array("L", range(1, 1201))
    folder = SimpleNamespace(uids=uids, names=[f"cur/{u}:2,S" for u in uids], sizes={7: 70}, recent=set())
    chunks = list(column_chunks(ranges, array("L", uids), folder, {3, 900}, 500, 100))
    assert all(0 < len(c) <= 500 for c in chunks) and len(chunks[0]) <= 100
    positions = [p for lo, hi in ranges for p in range(lo, hi)]
    assert [s for c in chunks for s in c.seqs] == [p + 1 for p in positions]
    assert [u for c in chunks for u in c.uids] == [p + 1 for p in positions]
    assert [r for c in chunks for r in c.rels] == [f"cur/{p + 1}:2,S" for p in positions]
    assert set().union(*(c.recent for c in chunks)) == {3, 900} & {p + 1 for p in positions}
    # a view with UIDs the folder no longer has (and so at other positions)
    folder.uids = array("L", (u for u in uids if u % 4))
    folder.names = [f"cur/{u}:2," for u in folder.uids]
    chunks = list(column_chunks(ranges, array("L", uids), folder, set(), 500))
    assert [(s, u, r) for c in chunks for s, u, r in zip(c.seqs, c.uids, c.rels)] == \
        [(p + 1, p + 1, f"cur/{p + 1}:2,") for p in positions if (p + 1) % 4]
