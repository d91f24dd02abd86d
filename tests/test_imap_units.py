"""IMAP syntax and MIME helpers, without a server."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from twisted_mail_screen.imap_account import dir_name, folder_dir, list_entries, pattern_regex
from twisted_mail_screen.imap_mailbox import flag_names, merge_keywords, with_flags
from twisted_mail_screen.imap_message import Part, filter_headers, section_bytes, to_crlf
from twisted_mail_screen.imap_parse import (Atom, BadCommand, format_set, parse_fetch_atts,
                                            parse_section, parse_seqset, quote, tokenize)


def test_tokenize_atoms_strings_lists_literals():
    toks = tokenize(b'A1 "q \\"x\\" \\\\" (a (b c)) \x000\x00 BODY[HEADER.FIELDS (A B)]<0.5> NIL',
                    [b"lit\r\n"])
    assert toks == ["A1", b'q "x" \\', ["a", ["b", "c"]], b"lit\r\n",
                    "BODY[HEADER.FIELDS (A B)]<0.5>", "NIL"]
    assert isinstance(toks[0], Atom) and not isinstance(toks[1], Atom)


@pytest.mark.parametrize("bad", [b'"open', b"(a", b"a)", b"BODY[x", b'"bad\\q"', b"a\xff"])
def test_tokenize_rejects(bad):
    with pytest.raises(BadCommand):
        tokenize(bad, [])


@given(st.binary(max_size=200))
def test_quote_round_trips_through_tokenize(value):
    assert tokenize(quote(value).split(b"\r\n", 1)[0] if not quote(value).startswith(b"{")
                    else b"\x000\x00", [value]) == [value]


def test_seqsets():
    s = parse_seqset(Atom("1:3,7,10:*"))
    assert s.resolve(12) == [(1, 3), (7, 7), (10, 12)]
    assert parse_seqset(Atom("5:*")).resolve(3) == [(3, 5)]
    assert s.contains(11, 12) and not s.contains(5, 12)
    for bad in ["0", "1:", "a", "", "1,,2"]:
        with pytest.raises(BadCommand):
            parse_seqset(Atom(bad))
    assert format_set([1, 2, 3, 7, 9, 10]) == "1:3,7,9:10"


def test_fetch_atts_and_sections():
    atts = parse_fetch_atts(Atom("FAST"))
    assert atts == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    s = parse_section("body.peek[1.2.header.fields (from to)]<10.20>")
    assert s.path == (1, 2) and s.text == "HEADER.FIELDS" and s.fields == ("FROM", "TO")
    assert s.peek and s.partial == (10, 20) and s.label == "BODY[1.2.HEADER.FIELDS (FROM TO)]"
    assert parse_section("BODY[]").label == "BODY[]"
    for bad in ["BODY[MIME]", "BODY[0]", "BODY[FOO]", "BODY[HEADER.FIELDS]"]:
        with pytest.raises(BadCommand):
            parse_section(bad)


MESSAGE = to_crlf(b"""From: a@example.org
Subject: t
Content-Type: multipart/mixed; boundary="XX"

preamble
--XX
Content-Type: text/plain

one
--XX
Content-Type: message/rfc822

Subject: inner
Content-Type: multipart/alternative; boundary=YY

--YY

inner plain
--YY--
--XXnot-a-boundary
--XX--
epilogue
""")


def test_parts_are_exact_slices():
    root = Part(MESSAGE, 0, len(MESSAGE))
    assert [c.ctype for c in root.children] == ["text/plain", "message/rfc822"]
    assert root.children[0].body_bytes() == b"one"
    inner = root.children[1].message
    assert inner.headers["Subject"] == "inner" and inner.is_multipart
    assert inner.children[0].body_bytes() == b"inner plain"
    assert root.children[1].body_bytes().endswith(b"--YY--\r\n--XXnot-a-boundary")

    def sec(spec):
        return section_bytes(root, parse_section(f"BODY[{spec}]"))

    assert sec("1") == b"one" and sec("2.1") == b"inner plain"
    assert sec("2.HEADER").startswith(b"Subject: inner") and sec("2.HEADER").endswith(b"\r\n\r\n")
    assert sec("1.MIME") == b"Content-Type: text/plain\r\n\r\n"
    assert sec("9") == b"" and sec("") == MESSAGE
    structure = root.structure(True)
    assert structure.count(b'"MULTIPART"') == 0 and b'"MIXED"' in structure
    assert b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3 1 NIL NIL NIL NIL)' in structure


def test_filter_headers():
    block = b"A: 1\r\nB: 2\r\n  cont\r\nc: 3\r\n\r\n"
    assert filter_headers(block, ("B", "C"), True) == b"B: 2\r\n  cont\r\nc: 3\r\n\r\n"
    assert filter_headers(block, ("B",), False) == b"A: 1\r\nc: 3\r\n\r\n"


def test_flags_in_names():
    kw = ["$Work"]
    assert flag_names("cur/x:2,FSa", kw) == ["\\Flagged", "\\Seen", "$Work"]
    assert with_flags("new/x", ["\\Seen", "\\Deleted", "$work"], kw) == "cur/x:2,STa"
    assert with_flags("cur/x:2,PS", [], kw) == "cur/x:2,P"  # unknown letters kept
    assert merge_keywords(kw, ["$New", "$WORK", "\\Seen"]) == ["$Work", "$New"]
    assert merge_keywords([str(i) for i in range(26)], ["x"]) is None


def test_folder_names():
    assert folder_dir("/m", "INBOX") == "/m"
    assert folder_dir("/m", "a.b/Ü") == "/m/.a&AC4-b.&ANw-"
    assert dir_name(".a&AC4-b.&ANw-") == "a.b/Ü"
    assert dir_name(".#deleted-1") is None and dir_name("..") is None
    entries = dict(list_entries(["INBOX", "x/y", "Sent"], pattern_regex("", "*")))
    assert entries["x"] == ["\\Noselect", "\\HasChildren"]
    assert entries["Sent"] == ["\\HasNoChildren", "\\Sent"]
    assert [n for n, _ in list_entries(["INBOX", "x/y"], pattern_regex("", "%"))] == ["INBOX", "x"]
    assert pattern_regex("", "inbox").match("INBOX")
