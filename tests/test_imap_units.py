"""IMAP syntax and MIME helpers, without a server."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from twisted_mail_screen.protocols.imap.account import dir_name, folder_dir
from twisted_mail_screen.protocols.imap.listing import ListPattern, list_entries
from twisted_mail_screen.protocols.imap.flags import flag_names, merge_keywords, with_flags
from twisted_mail_screen.protocols.imap.message import Part, filter_headers, section_bytes, to_crlf
from twisted_mail_screen.protocols.imap.parse import (Atom, BadCommand, format_set, parse_fetch_atts,
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
    entries = dict(list_entries(["INBOX", "x/y", "Sent"], ListPattern("", "*")))
    assert entries["x"] == ["\\Noselect", "\\HasChildren"]
    assert entries["Sent"] == ["\\HasNoChildren", "\\Sent"]
    assert [n for n, _ in list_entries(["INBOX", "x/y"], ListPattern("", "%"))] == ["INBOX", "x"]
    assert ListPattern("", "inbox").match("INBOX")


HEADER_SAMPLES = [
    b"From: a@b\r\nTo: c@d,\r\n e@f\r\nSubject: hi\r\n\r\nbody",
    b"From sender Mon Jan 1\r\nFrom: a@b\r\n\r\n",
    b" cont first\r\nSubject: x\r\n\r\n",
    b"Subject: x\r\nnot a header\r\nTo: y\r\n\r\n",
    b"Subject: x\r\n:bad\r\n cont\r\nTo: y\r\n\r\n",
    b"Subject:\r\nTo:   \t spaced\r\n\r\n",
    b"Subject: a\rTo: b\r\n\r\n",
    b"Subject: a\r\nX: 1\r\nFrom x\r\n\r\n",
    b"Subject: no end",
    b"\r\nbody",
    b"SUBJECT: Upper\r\nsubject: lower\r\n\tfolded\r\n\r\n",
    b"Subject : space\r\n\r\n",
    b"X\x0bY: v\r\nA: b\x0c c\r\n\x1cZ: q\r\n\r\n",
    b'From: "Doe, J." <j@x.org>, k@y (K)\r\nTo: undisclosed-recipients:;\r\n\r\n',
]


@given(st.lists(st.sampled_from([b"From: ", b"To: ", b"Subject: ", b" ", b"\t", b"\r\n", b"\n", b"\r",
                                 b":", b"a", b"<x@y>", b"From ", b'"q"', b",", b"Cc:", b"\x0b",
                                 b"\x7f"]), max_size=24).map(b"".join))
def test_fast_headers_read_like_the_email_parser(block):
    _same_headers(block)


@pytest.mark.parametrize("block", HEADER_SAMPLES)
def test_fast_headers_samples(block):
    _same_headers(block)


def _same_headers(block: bytes) -> None:
    from twisted_mail_screen.protocols.imap.message import _header_parser, envelope, fast_headers

    fast, slow = fast_headers(block), _header_parser.parsebytes(block)
    assert fast is not None
    assert fast.keys() == slow.keys()
    for name in set(slow.keys()) | {"From", "Nope"}:
        assert fast.get(name) == slow.get(name) and fast.get_all(name) == slow.get_all(name)
    assert envelope(fast) == envelope(slow)


def test_8bit_headers_go_back_as_stored():
    from twisted_mail_screen.protocols.imap.message import decoded_header_values, envelope, fast_headers

    utf8 = fast_headers("Subject: Caf\u00e9\r\nFrom: J\u00fcrgen <j@x.de>\r\n\r\n".encode())
    assert b"{5}\r\nCaf\xc3\xa9 " in envelope(utf8) and b"{7}\r\nJ\xc3\xbcrgen NIL" in envelope(utf8)
    assert decoded_header_values(utf8, "Subject") == ["Caf\u00e9"]  # SEARCH finds it
    latin1 = fast_headers("Subject: caf\u00e9\r\n\r\n".encode("latin-1"))
    assert b"{4}\r\ncaf\xe9 " in envelope(latin1)


def test_fetch_cache_is_bounded_and_forgets_expunged():
    from twisted_mail_screen.protocols.imap.fetch import Budget

    budget = Budget(100_000)
    a, b = budget.cache(), budget.cache()
    a.learn({f"a{i}": [b"x" * 200, 1.0] for i in range(400)})  # 360 bytes each, counted
    assert budget.used <= budget.limit and len(a.entries) < 400
    assert a.get("a399") is not None and a.get("a0") is None  # oldest go first
    b.learn({f"b{i}": [b"y" * 200, None] for i in range(400)})
    assert budget.used <= budget.limit and b.get("b399") is not None
    assert len(a.entries) < len(b.entries)  # the other folder's entries went first
    b.drop(["b399"])
    assert b.get("b399") is None
    budget.release(a)
    budget.release(b)
    assert budget.used == 0
    a.learn({"late": [b"z", 2.0]})  # a chunk rendered after its folder was forgotten
    assert budget.used == 0 and a.get("late") is None
